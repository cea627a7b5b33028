"""Several GPUs through torchrun: process-group setup and the "only rank 0 writes" rule.

`torchrun --nproc_per_node=G 01_train_folds.py ...` starts G processes; each trains on its share
of every batch with DistributedDataParallel (NCCL on CUDA, gloo on CPU), and rank 0 alone
validates, writes checkpoints, records and logs. `train.batch_size` is the global batch: each
process loads batch_size / G rows, so the steps per epoch and the learning rate are those of one
process. Without torchrun everything is a no-op.

NCCL serves CUDA tensors only, so every collective here puts its tensor on `collective_device()`
(the rank's GPU under NCCL, the CPU under gloo).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from lib.core.errors import StageError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device_type: str) -> None:
    """Join the process group once when started by torchrun."""
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(local_rank())


def close() -> None:
    """Leave the process group at the end of a stage (NCCL warns, and may hang at exit, when it is left to the interpreter)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where a collective's tensor must live: the CPU when the group's backend serves CPU tensors (gloo), else
    this rank's GPU (NCCL, or any backend bound to cuda only: it rejects CPU tensors)."""
    if not _active():
        return torch.device("cpu")
    types = getattr(dist.group.WORLD, "_device_types", None)
    serves_cpu = any(t.type == "cpu" for t in types) if types is not None else dist.get_backend() != "nccl"
    return torch.device("cpu") if serves_cpu else torch.device("cuda", local_rank())


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, seen by every rank (so all stop or go on together)."""
    if not _active():
        return flag
    t = torch.tensor([int(flag)], device=collective_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    """Every rank waits here; under NCCL on this rank's own GPU (not a guessed one)."""
    if not _active():
        return
    device = collective_device()
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index if device.index is not None else local_rank()])
    else:
        dist.barrier()


def rank_batch(batch_size: int, world: int) -> int:
    """Rows per process in one step: `train.batch_size` is the global batch, split evenly over the processes."""
    if batch_size % world:
        raise StageError(f"train.batch_size {batch_size} does not split evenly over {world} torchrun processes; "
                         f"set it to a multiple of {world}.")
    return batch_size // world
