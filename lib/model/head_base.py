"""What every classifier head shares: its output (`HeadOutput`), the `Head` base class, the cosine leaf classifier and
the masked, weighted cross-entropy helpers the rank-aware and tree heads build their losses from.

Logits leave every head in float32 (features may arrive in bf16 under autocast), and the
taxonomy tables are buffers so `.to(device)` moves them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.data.taxonomy import RANKS, Taxonomy

EPS = 1e-8  # keeps log(parent probability) finite under hard routing


@dataclass
class HeadOutput:
    """Leaf logits (B, C); auxiliary logits by name; each head's leaf logits (H, B, C) for multi."""

    logits: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: torch.Tensor | None = None


# ----------------------------------------------------------------------------- helpers


def split_ranks(taxonomy: Taxonomy) -> list[str]:
    """The ranks with at least 2 distinct values: the only ones a classifier can learn anything at."""
    return [r for r in RANKS if len(taxonomy.rank_labels(r)[1]) >= 2]


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean CE over samples with a label (>= 0), and 1.0 if any sample counted else 0.0.

    Same weighting as lib.model.losses.WeightedLoss (sum w * l / sum w); a batch with no labelled
    sample gives 0 without a device sync, so callers average only over the terms present.
    """
    valid = labels >= 0
    ce = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
    w = valid.float() if weight is None else weight.float() * valid
    total = w.sum()
    return (ce * w).sum() / total.clamp_min(1e-12), (total > 0).float()


def mean_present(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean of the `masked_ce` terms whose batch had labels (0 when none had)."""
    loss = torch.stack([t for t, _ in terms]).sum()
    count = torch.stack([p for _, p in terms]).sum()
    return loss / count.clamp_min(1.0)


def long_tensor(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.long)


# ----------------------------------------------------------------------------- base and flat heads


class NormedLinear(nn.Module):
    """Cosine classifier: normalised features times normalised class weights, no bias; logits in [-1, 1].

    The LDAM-DRW authors' NormedLinear (kaidic/LDAM-DRW, models/resnet_cifar.py): LDAM's margins
    (at most `max_m` = 0.5) and its scale s = 30 are set for cosine logits; on raw linear logits
    they mean nothing and s blows them up. Weights start as unit vectors of a uniform draw.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        w = torch.empty(out_features, in_features).uniform_(-1.0, 1.0)
        self.weight = nn.Parameter(F.normalize(w, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


def classifier(in_features: int, out_features: int, normalized: bool = False) -> nn.Module:
    """The leaf classifier: a Linear, or with `normalized` the cosine `NormedLinear`."""
    return NormedLinear(in_features, out_features) if normalized else nn.Linear(in_features, out_features)


class Head(nn.Module):
    """Base: softmax probabilities of the leaf logits and the base loss alone.

    `logit_scale` multiplies the logits before the softmax of `probs`: 1, except for a cosine
    leaf classifier, where it is LDAM's s, so the probabilities are the softmax its loss trains
    (s x cosine, margins aside) rather than a near-uniform softmax of values in [-1, 1].
    """

    logit_scale: float = 1.0

    def forward(self, feats: torch.Tensor) -> HeadOutput:
        raise NotImplementedError

    def probs(self, out: HeadOutput) -> torch.Tensor:
        return (self.logit_scale * out.logits.float()).softmax(-1)

    def loss(self, out: HeadOutput, target: torch.Tensor, weight: torch.Tensor | None, base: nn.Module) -> torch.Tensor:
        return base(out.logits, target, weight)
