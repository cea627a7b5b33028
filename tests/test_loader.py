"""The training loader's workers (lib.data.dataset): each draws its own augmentations, reproducibly, epoch after epoch."""
import dataclasses

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lib.config import AugmentCfg
from lib.data.augment import build_transforms
from lib.data.dataset import CropDataset, EpochSampler, make_loader, make_train_loader, worker_seed

N = 8  # copies of one image: 4 batches of 2, batches 0 and 2 on worker 0, 1 and 3 on worker 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> CropDataset:
    """One crop listed N times, with a train transform whose every op draws (an affine of random angle and scale)."""
    path = tmp_path_factory.mktemp("crop") / "crop.png"
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)
    aug = dataclasses.replace(AugmentCfg(), affine=1.0, hflip=0.5, brightness_contrast=1.0)
    tf = build_transforms(32, train=True, mean=(0.5,) * 3, std=(0.5,) * 3, aug=aug)
    return CropDataset([str(path)] * N, [0] * N, transform=tf)


def images(loader: DataLoader) -> list[torch.Tensor]:
    return [img for x, _, _ in loader for img in x]


def epochs(loader: DataLoader, seeds: list[int]) -> list[list[torch.Tensor]]:
    """The augmented images of each epoch (seed) in turn, through one persistent loader."""
    out = []
    for s in seeds:
        sampler = loader.sampler
        assert isinstance(sampler, EpochSampler)
        sampler.set_epoch(s, range(N))
        out.append(images(loader))
    return out


def all_different(imgs: list[torch.Tensor]) -> bool:
    return all(not torch.equal(imgs[i], imgs[j]) for i in range(len(imgs)) for j in range(i))


def test_a_transform_seeded_once_repeats_itself_in_every_worker(dataset):
    """The bug: forked into 2 workers with one seed, batch 1 (worker 1) repeats batch 0 (worker 0) draw for draw."""
    dataset.transform.set_random_seed(5)
    imgs = images(DataLoader(dataset, batch_size=2, num_workers=2))
    assert torch.equal(imgs[0], imgs[2]) and torch.equal(imgs[1], imgs[3])


def test_each_worker_draws_its_own_augmentations(dataset):
    loader = make_train_loader(dataset, batch_size=2, drop_last=False, num_workers=2, pin_memory=False)
    assert loader.persistent_workers and loader.prefetch_factor == 4
    first, second = epochs(loader, [11, 12])
    assert len(first) == N and all_different(first)  # the same image, a different augmentation in every batch
    assert all(not torch.equal(a, b) for a, b in zip(first, second))  # the persistent workers reseeded for epoch 2


def test_runs_are_reproducible_and_resume_mid_run(dataset):
    """The same seed and worker count give the same images; a loader that starts at epoch 2 (a resumed run) too."""
    a = epochs(make_train_loader(dataset, batch_size=2, drop_last=False, num_workers=2, pin_memory=False), [11, 12])
    b = epochs(make_train_loader(dataset, batch_size=2, drop_last=False, num_workers=2, pin_memory=False), [12])
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[0]))
    c = epochs(make_train_loader(dataset, batch_size=2, drop_last=False, num_workers=2, pin_memory=False), [11])
    assert all(torch.equal(x, y) for x, y in zip(a[0], c[0]))


def test_worker_seeds_differ_by_epoch_and_worker():
    seeds = {worker_seed(e, w) for e in range(50) for w in range(8)}
    assert len(seeds) == 400 and worker_seed(3, 1) == worker_seed(3, 1)


def test_without_workers_the_index_is_plain(dataset):
    """num_workers=0 (the demo and the CPU default) reads plain indices as before; an eval loader keeps no workers."""
    dataset.transform.set_random_seed(5)
    x, label, weight = dataset[0]
    assert x.shape == (3, 32, 32) and label == 0 and weight == 1.0
    loader = make_loader(dataset.paths[:2], img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=2, num_workers=0,
                         device=torch.device("cpu"), persistent=True)
    assert not loader.persistent_workers and loader.prefetch_factor is None
