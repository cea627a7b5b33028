"""Several GPUs through torchrun: process-group setup and the "only rank 0 writes" rule.

`torchrun --nproc_per_node=G 01_train_folds.py ...` starts G processes; each trains on its share
of every batch with DistributedDataParallel (NCCL on CUDA, gloo on CPU), and rank 0 alone
validates, writes checkpoints, records and logs. Without torchrun everything is a no-op.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, seen by every rank (so all stop or go on together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
