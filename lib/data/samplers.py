"""Training samplers for the long tail: how often each class is drawn per epoch.

`random` leaves shuffling to the DataLoader (each sample once per epoch). `class_balanced`
draws every class equally often (per-sample weight 1 / n_class), which shows the rare taxa
often but repeats their few crops many times; `sqrt` sits between the two (class frequency
proportional to sqrt(n_class)), the usual compromise. Both draw with replacement, so pair them
with augmentation, and avoid stacking them on a loss that already re-weights classes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

SAMPLERS = ("random", "class_balanced", "sqrt")


def sample_weights(name: str, labels: np.ndarray) -> np.ndarray:
    """Per-sample draw weights: 1 / n_class (class_balanced) or 1 / sqrt(n_class) (sqrt)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0:
        raise ValueError(f"sampler '{name}' needs a non-empty 1-D array of class labels >= 0")
    counts = np.bincount(labels).astype(np.float64)[labels]
    if name == "class_balanced":
        return 1.0 / counts
    if name == "sqrt":
        return 1.0 / np.sqrt(counts)
    raise ValueError(f"sampler '{name}' has no sample weights; choose class_balanced or sqrt")


def build_sampler(name: str, labels: np.ndarray, num_samples: int | None = None,
                  generator: torch.Generator | None = None) -> Sampler | None:
    """The sampler for `train.sampler`, or None for `random` (then the DataLoader shuffles).

    Draws `num_samples` indices (default len(labels), so an epoch keeps its length) with
    replacement; the same `generator` state gives the same indices.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    if name == "random":
        return None
    weights = sample_weights(name, labels).astype(np.float64).tolist()
    n = len(weights) if num_samples is None else int(num_samples)
    if n < 1:
        raise ValueError(f"sampler '{name}' needs num_samples >= 1, got {n}")
    return WeightedRandomSampler(weights, num_samples=n, replacement=True, generator=generator)
