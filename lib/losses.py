"""Every loss behind one factory: `build_loss(cfg, class_counts, distance)`.

Each loss is a module whose `forward(logits, target, weight=None)` returns the mean loss, with
`weight` a per-sample factor (pseudo-label confidence) so phase 2 can trust labels unequally.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.config import TrainCfg


class WeightedLoss(nn.Module):
    """Base: subclasses give per-sample losses; this applies the sample weights and the mean."""

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.per_sample(logits.float(), target)
        if weight is None:
            return loss.mean()
        weight = weight.to(loss.dtype)
        return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


class CrossEntropy(WeightedLoss):
    """Softmax cross-entropy with optional label smoothing."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)


def build_loss(cfg: TrainCfg, class_counts: np.ndarray, distance: np.ndarray) -> WeightedLoss:
    """The configured loss; `class_counts` and `distance` serve the long-tail and taxonomy-aware ones."""
    if cfg.loss == "ce":
        return CrossEntropy(cfg.label_smoothing)
    raise ValueError(f"Unknown loss '{cfg.loss}'.")
