"""Dataset over cached crops: image(s), label and a per-sample loss weight (pseudo-label confidence); its loaders.

Loader workers: the training loader's workers persist across a fold's epochs, and each reseeds
its augmentation (albumentations' own generator, numpy, random, torch) from (epoch seed, worker
id) when the first item of a new epoch reaches it; `EpochSampler` tags every index with the
epoch's seed for that. A transform seeded once and forked into every worker would repeat one
sequence of random draws in each group of `num_workers` batches. Batches go to the workers in a
fixed round-robin order, so a run is reproducible for a given seed and worker count.

With frame ids (`model.frame_context: attention`), an item is (image, label, weight, frame id,
row index): the model groups a batch's rows by frame, and inference puts the rows of frame-packed
batches (lib.data.samplers.FrameBatchSampler) back in input order by their row index.
"""
from __future__ import annotations

import random
from typing import Any, Iterable, Iterator, Sequence, Sized

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from lib.data.augment import build_transforms
from lib.data.budget import PREFETCH_FACTOR
from lib.data.resample import FrameResample
from lib.data.samplers import FrameBatchSampler


def read_rgb(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"crop {path} could not be read; rerun 00_prepare_data.py --force")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class CropDataset(Dataset):
    """Reads RGB crops from `paths`; labels -1 mean unknown (test).

    An item of `paths` may be a tuple of view paths (ROI first, then its context crops): the
    views then get the same random augmentation (albumentations additional targets, built by
    `build_transforms(..., n_views=V)`) and come back stacked as one (V, 3, H, W) tensor.
    With `frames` (one frame id per row), items end with the row's frame id and its index. With `resample`
    (training only: `augment.frame_resample`, lib.data.resample), a row's views are first resampled by one
    whole-frame factor, before the transform.
    """

    def __init__(self, paths: Sequence, labels: Sequence[int] | None = None, weights: Sequence[float] | None = None, transform=None,
                 frames: np.ndarray | None = None, resample: FrameResample | None = None):
        self.paths = list(paths)
        self.labels = np.asarray(labels if labels is not None else [-1] * len(self.paths), dtype=np.int64)
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(self.paths), dtype=np.float32)
        self.frames = None if frames is None else np.asarray(frames, dtype=np.int64)
        if self.frames is not None and len(self.frames) != len(self.paths):
            raise ValueError(f"{len(self.frames)} frame ids for {len(self.paths)} crops; give one frame id per crop.")
        if resample is not None and len(resample.extents) != len(self.paths):
            raise ValueError(f"{len(resample.extents)} rows of frame extents for {len(self.paths)} crops; give one per crop.")
        self.transform = transform
        self.resample = resample
        self._epoch_seed: int | None = None  # the epoch a loader worker last reseeded itself for

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        """Item `key`, or (epoch seed, i) from an `EpochSampler`: a worker then reseeds itself once per epoch."""
        i, img = self._image(key)
        if self.frames is None:
            return img, int(self.labels[i]), float(self.weights[i])
        return img, int(self.labels[i]), float(self.weights[i]), int(self.frames[i]), i

    def _image(self, key: int | tuple[int, int]) -> tuple[int, torch.Tensor | np.ndarray]:
        """The row index of `key` and its image (or stacked views), augmented by the transform."""
        if isinstance(key, tuple):
            epoch_seed, i = key
            info = get_worker_info()
            if info is not None and epoch_seed != self._epoch_seed:
                seed_worker(worker_seed(epoch_seed, info.id), self.transform)
                self._epoch_seed = epoch_seed
        else:
            i = key
        item = self.paths[i]
        if isinstance(item, (tuple, list)):
            imgs = [read_rgb(p) for p in item]
            h, w = imgs[0].shape[:2]
            imgs = [im if im.shape[:2] == (h, w) else cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in imgs]
            if self.resample is not None:
                imgs = self.resample(imgs, i)
            if self.transform is None:
                return i, torch.stack([torch.from_numpy(im) for im in imgs])
            out = self.transform(image=imgs[0], **{f"image{v}": im for v, im in enumerate(imgs[1:], 1)})
            return i, torch.stack([out["image"], *(out[f"image{v}"] for v in range(1, len(imgs)))])
        img = read_rgb(item)
        if self.resample is not None:
            img = self.resample([img], i)[0]
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return i, img




def worker_seed(epoch_seed: int, worker_id: int) -> int:
    """A well-mixed 32-bit seed of (epoch seed, worker id): distinct for every worker of every epoch."""
    return int(np.random.SeedSequence([epoch_seed, worker_id]).generate_state(1)[0])


def seed_worker(seed: int, transform: Any = None) -> None:
    """Seed every generator an augmentation may draw from in this process: random, numpy, torch and the
    albumentations pipeline's own (which is seeded apart from numpy's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


class EpochSampler(Sampler[tuple[int, int]]):
    """The epoch's indices (another sampler's, or a sequence), each tagged with the epoch's seed, so that
    persistent loader workers know when a new epoch starts and reseed their augmentation for it."""

    def __init__(self) -> None:
        self.seed = 0
        self.indices: Iterable[int] = ()

    def set_epoch(self, seed: int, indices: Iterable[int]) -> None:
        self.seed, self.indices = seed, indices

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.seed, int(i)) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices) if isinstance(self.indices, Sized) else 0


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """`EpochSampler` for a batch sampler: the epoch's batches (lists of indices, e.g. whole frames), every index
    tagged with the epoch's seed."""

    def __init__(self) -> None:
        self.seed = 0
        self.batches: Sequence[Sequence[int]] = ()

    def set_epoch(self, seed: int, batches: Sequence[Sequence[int]]) -> None:
        self.seed, self.batches = seed, batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return ([(self.seed, int(i)) for i in b] for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_train_loader(ds: Dataset, *, batch_size: int, drop_last: bool, num_workers: int, pin_memory: bool,
                      frames: bool = False, prefetch: int = PREFETCH_FACTOR) -> DataLoader:
    """A fold's training loader over worker processes (num_workers > 0), kept for all its epochs: call
    `loader.sampler.set_epoch(seed, order)` before each (with `frames`, `loader.batch_sampler.set_epoch(seed, batches)`).
    Persistent workers skip the start-up every epoch; each keeps `prefetch` batches ready (lib.data.budget bounds it)."""
    if frames:
        return DataLoader(ds, batch_sampler=EpochBatches(), num_workers=num_workers, pin_memory=pin_memory, persistent_workers=True,
                          prefetch_factor=prefetch)
    return DataLoader(ds, batch_size=batch_size, sampler=EpochSampler(), drop_last=drop_last, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=True, prefetch_factor=prefetch)


def make_loader(paths: Sequence, *, img_size: int, mean, std, batch_size: int, num_workers: int, device: torch.device,
                persistent: bool = False, frames: np.ndarray | None = None, prefetch: int = PREFETCH_FACTOR) -> DataLoader:
    """Eval loader over crop paths, or over tuples of view paths (lib.data.context.model_inputs).

    `persistent` keeps its workers between passes (validation runs every epoch); with workers,
    each keeps `prefetch` batches ready (lib.data.budget bounds it with the batch size). With `frames`
    (one frame id per path), batches hold whole frames (FrameBatchSampler's inference batches: frames
    in order, one larger than the batch in near-equal consecutive chunks) and items carry their frame
    id and row index.
    """
    n_views = len(paths[0]) if len(paths) and isinstance(paths[0], (tuple, list)) else 1
    ds = CropDataset(paths, transform=build_transforms(img_size, train=False, mean=mean, std=std, n_views=n_views), frames=frames)
    pin, keep = device.type == "cuda", persistent and num_workers > 0
    prefetch_or_none = max(1, prefetch) if num_workers > 0 else None
    if frames is not None:
        return DataLoader(ds, batch_sampler=FrameBatchSampler(frames, batch_size), num_workers=num_workers, pin_memory=pin,
                          persistent_workers=keep, prefetch_factor=prefetch_or_none)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin, persistent_workers=keep,
                      prefetch_factor=prefetch_or_none)
