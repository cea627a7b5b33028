"""Device choice, memory format and mixed precision: one policy for training and inference.
"""
from __future__ import annotations

import contextlib

import torch

from lib.core.errors import StageError


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU, where fp32 is both faster and exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()



def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC memory layout for 4-D image batches (faster convolutions); view stacks stay as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device is cuda but no CUDA GPU is visible; set train.device=auto or cpu.")
    from lib.model import dist

    kind = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if kind == "cuda" and dist.world_size() > 1:
        return torch.device(f"cuda:{dist.local_rank()}")  # one GPU per torchrun process
    return torch.device(kind)
