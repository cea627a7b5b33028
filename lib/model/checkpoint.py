"""Checkpoints: the one torch.load wrapper (weights only) and a fold's best model ready for inference.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lib.core.errors import StageError
from lib.model.net import build_net
from lib.pipeline.graph import check_vouched


def load_checkpoint(path: Path) -> dict:
    """A checkpoint saved by lib.engine.resume; loaded with weights_only=True (no pickle)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StageError(f"Checkpoint '{path}' is missing; rerun the training stage.") from None
    except Exception as e:
        raise StageError(f"Checkpoint '{path}' cannot be loaded safely ({type(e).__name__}); delete it and rerun the training stage.") from e


def load_fold_model(fold_dir: Path, cfg, taxonomy, device: torch.device) -> nn.Module:
    """The best model of one fold, ready for inference (architecture from `cfg.model` and `cfg.head`).

    `best.pt` must be the file the fold's record vouches for: never a model another run is rewriting.
    """
    check_vouched(fold_dir / "best.pt")
    ckpt = load_checkpoint(fold_dir / "best.pt")
    model = build_net(cfg, taxonomy, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise StageError(f"Checkpoint '{fold_dir / 'best.pt'}' does not fit the configured model or head; rerun the training stage.") from None
    model.to(device)
    model = model.to(memory_format=torch.channels_last)  # faster on CUDA and on CPU alike
    return model.eval()
