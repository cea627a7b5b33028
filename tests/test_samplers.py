"""Long-tail samplers: class frequencies per epoch, determinism, and the config key."""
import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from lib.config import ConfigError, load_config
from lib.data.samplers import build_sampler

COUNTS = np.array([90, 9, 1])
LABELS = np.repeat(np.arange(3), COUNTS)
N = 20_000


def weighted(name: str, num_samples: int | None, generator: torch.Generator | None) -> WeightedRandomSampler:
    """build_sampler for a sampler that is not `random` (the one that gives None)."""
    sampler = build_sampler(name, LABELS, num_samples, generator)
    assert isinstance(sampler, WeightedRandomSampler)
    return sampler


def class_shares(name: str, seed: int = 0) -> np.ndarray:
    sampler = weighted(name, N, torch.Generator().manual_seed(seed))
    idx = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(idx) == N
    return np.bincount(LABELS[idx], minlength=3) / N


def test_class_balanced_draws_classes_equally():
    assert np.allclose(class_shares("class_balanced"), 1 / 3, atol=0.03)


def test_sqrt_draws_by_sqrt_of_counts():
    expected = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()
    assert np.allclose(class_shares("sqrt"), expected, atol=0.03)


def test_random_is_left_to_the_loader():
    assert build_sampler("random", LABELS, None, None) is None


def test_default_length_is_the_dataset():
    assert len(weighted("sqrt", None, None)) == len(LABELS)


def test_same_seed_same_indices():
    a = list(weighted("class_balanced", 500, torch.Generator().manual_seed(3)))
    b = list(weighted("class_balanced", 500, torch.Generator().manual_seed(3)))
    c = list(weighted("class_balanced", 500, torch.Generator().manual_seed(4)))
    assert a == b and a != c


def test_bad_input():
    with pytest.raises(ValueError, match="unknown sampler 'balanced'"):
        build_sampler("balanced", LABELS, None, None)
    with pytest.raises(ValueError, match="labels >= 0"):
        build_sampler("sqrt", np.array([0, -1]), None, None)


def test_config_key():
    assert load_config(None, ["train.sampler=sqrt"]).train.sampler == "sqrt"
    with pytest.raises(ConfigError, match=r"unknown value 'balanced' \(did you mean 'class_balanced'\?\)"):
        load_config(None, ["train.sampler=balanced"])
