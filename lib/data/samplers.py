"""Training samplers for the long tail: how often each class is drawn per epoch.

`random` leaves shuffling to the DataLoader (each sample once per epoch). `class_balanced`
draws every class equally often (per-sample weight 1 / n_class), which shows the rare taxa
often but repeats their few crops many times; `sqrt` sits between the two (class frequency
proportional to sqrt(n_class)), the usual compromise. Both draw with replacement, so pair them
with augmentation, and avoid stacking them on a loss that already re-weights classes.

`FrameBatchSampler` gives whole frames per batch, which `model.frame_context: attention` needs
(each ROI attends to the other ROIs of its frame in the same batch). Its units are frames; a frame
larger than the batch is split into ceil(n / batch) chunks of near-equal size (they differ by at
most one row), consecutive after a seeded shuffle of the frame's rows (in row order at inference).
The units are packed in the drawn order, next-fit: a batch closes when the next unit would
overflow it or belongs to a frame it already holds (so one frame's rows in a batch are one unit).
A lone last row joins an earlier batch with room (training BatchNorm needs two rows). `random`
shuffles the units, each row once per epoch; `class_balanced` and `sqrt` draw units with
replacement, each with the mean of its rows' weights, until the epoch holds as many rows as the
data: exact for frames of one class, and where they cannot compose, a rare ROI in a frame of
common ones is drawn at its frame's mean weight, less often than the per-row sampler would.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

SAMPLERS = ("random", "class_balanced", "sqrt")
FRAME_SAMPLER_NOTE = ("with model.frame_context=attention, train.sampler={name} draws whole frames, each with the mean of its "
                      "rows' weights: exact for frames of one class, while a rare ROI among common siblings is drawn less often "
                      "than the per-row sampler would")


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


# ----------------------------------------------------------------------------- whole frames per batch


def frame_units(frames: np.ndarray, batch_size: int, generator: torch.Generator | None = None) -> list[np.ndarray]:
    """Row indices per frame, frames in order of first appearance; a frame over `batch_size` rows split into
    ceil(n / batch_size) near-equal consecutive chunks, after a shuffle of its rows when `generator` is given."""
    frames = np.asarray(frames)
    if frames.ndim != 1:
        raise ValueError("frame ids must be a 1-D array, one per row")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    _, first, inv = np.unique(frames, return_index=True, return_inverse=True)
    rows = np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv))[:-1]) if len(frames) else []
    units: list[np.ndarray] = []
    for g in np.argsort(first, kind="stable"):
        r = rows[g]
        if len(r) > batch_size:
            if generator is not None:
                r = r[torch.randperm(len(r), generator=generator).numpy()]
            units.extend(np.array_split(r, -(-len(r) // batch_size)))
        else:
            units.append(r)
    return units


def pack_units(units: Sequence[np.ndarray], unit_frames: Sequence[int], batch_size: int) -> list[list[int]]:
    """Next-fit packing in the given order: a batch closes when the next unit would overflow it or its frame is in it
    already. A batch of one row (BatchNorm cannot train on it; weighted draws repeat one-ROI frames back to back) joins
    the first other batch with room that holds none of its frame, else the smallest such batch (one row over the size),
    else (every other batch holds its frame: a weighted draw repeating it) the smallest other batch."""
    batches: list[list[int]] = []
    held: list[set[int]] = []
    for rows, f in zip(units, unit_frames):
        if not batches or len(batches[-1]) + len(rows) > batch_size or f in held[-1]:
            batches.append([])
            held.append(set())
        batches[-1].extend(int(i) for i in rows)
        held[-1].add(f)
    for i in [k for k, b in enumerate(batches) if len(b) == 1][::-1]:  # from the end, so earlier indices stay valid
        f = next(iter(held[i]))
        others = [k for k in range(len(batches)) if k != i and f not in held[k]]
        with_room = [k for k in others if len(batches[k]) < batch_size]
        rest = others or [k for k in range(len(batches)) if k != i]  # every other batch holds its frame: a repeated draw
        target = with_room[0] if with_room else min(rest, key=lambda k: len(batches[k]), default=None)
        if target is not None:
            batches[target].extend(batches[i])
            held[target].add(f)
            del batches[i], held[i]
    return batches


class FrameBatchSampler(Sampler[list[int]]):
    """Batches of whole frames (see the module docstring), computed once at construction: make one per epoch.

    `name` is the train.sampler (random / class_balanced / sqrt, which need `labels`); without a
    `generator` the batches are the deterministic inference ones (units in order, no shuffle).
    Under torchrun, every rank builds the same batches from the same seed and takes every
    `world`-th one from its `rank`, each rank as many (the last len % world batches are left out).
    """

    def __init__(self, frames: np.ndarray, batch_size: int, *, name: str = "random", labels: np.ndarray | None = None,
                 generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
        frames = np.asarray(frames)
        units = frame_units(frames, batch_size, generator)
        if name != "random":
            if labels is None or generator is None:
                raise ValueError(f"sampler '{name}' over frames needs the rows' labels and a generator")
            w = sample_weights(name, labels)
            p = torch.tensor([float(w[u].mean()) for u in units], dtype=torch.float64)
            draws = torch.multinomial(p, len(frames), replacement=True, generator=generator).numpy()
            keep = int(np.searchsorted(np.cumsum([len(units[d]) for d in draws]), len(frames))) + 1  # up to N rows
            units = [units[d] for d in draws[:keep]]
        elif generator is not None:
            units = [units[i] for i in torch.randperm(len(units), generator=generator).tolist()]
        batches = pack_units(units, [int(frames[u[0]]) for u in units], batch_size)
        self.batches = batches[rank: len(batches) // world * world: world] if world > 1 else batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
