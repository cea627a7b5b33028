"""Batch mixing (mixup, cutmix) with soft targets, and the loss that reads them.

Mixing needs two samples, so it runs on the batch in the training loop, after the per-image
albumentations ops. A mixed sample's target is lam * onehot(own) + (1 - lam) * onehot(partner);
its per-sample weight (pseudo-label confidence) is mixed the same way, since the loss trusts
both halves of the image by their own confidence.

`same_leaf` draws each partner among samples of the same class, so targets stay one-hot: the
image is regularised while the label stays a leaf, which a taxonomic-distance metric prefers
to a blend of two distant taxa.

`frames` (with `model.frame_context: attention`, whose batches hold whole frames) draws each
partner among the other ROIs of the same frame (and of the same label with `same_leaf`); an ROI
alone in its frame is its own partner, so it stays unmixed. The frame attention then still sees
the frame's own ROIs, each mixed only with a sibling.

Soft targets and the losses of `lib.model.losses`: those take class indices. When mixing is on the
trainer uses `soft_target_loss` (soft cross-entropy, with per-sample weights as in
lib.model.losses) instead of the configured loss; the taxonomy-aware and long-tail losses
(dwce, taxonomy_smoothing, ce_expected_distance, ldam, ...) then fall back to this soft CE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class MixInfo:
    """What `mix_batch` drew (for tests and logs)."""

    kind: Literal["none", "mixup", "cutmix"]
    lam: float  # weight of each sample's own label; 1.0 when unmixed
    partner: torch.Tensor  # (B,) index of each sample's partner; arange when unmixed
    box: tuple[int, int, int, int] | None = None  # cutmix: (y1, y2, x1, x2) pasted from the partner


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator).item())


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """lam ~ Beta(alpha, alpha), drawn reproducibly from the torch generator (torch's Beta takes none)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _partners(y: torch.Tensor, same_leaf: bool, generator: torch.Generator | None, frames: torch.Tensor | None = None) -> torch.Tensor:
    """A random permutation, or a random other sample of the same group (itself if alone): the same label with
    `same_leaf`, the same frame with `frames`, both with both."""
    y = y.cpu()
    n = len(y)
    if not same_leaf and frames is None:
        return torch.randperm(n, generator=generator)
    if frames is None:
        key = y
    else:
        key = torch.unique(torch.stack([frames.cpu(), y if same_leaf else torch.zeros_like(y)], 1), dim=0, return_inverse=True)[1]
    partner = torch.arange(n)
    for c in torch.unique(key):
        idx = (key == c).nonzero().flatten()
        k = len(idx)
        if k > 1:
            shift = torch.randint(1, k, (k,), generator=generator)  # never 0: a partner other than itself
            partner[idx] = idx[(torch.arange(k) + shift) % k]
    return partner


def _box(h: int, w: int, lam: float, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """A box of about (1 - lam) of the area, centred uniformly, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(round(h * cut)), int(round(w * cut))
    cy = int(torch.randint(0, h, (1,), generator=generator).item())
    cx = int(torch.randint(0, w, (1,), generator=generator).item())
    y1, y2 = max(0, cy - ch // 2), min(h, cy + ch - ch // 2)
    x1, x2 = max(0, cx - cw // 2), min(w, cx + cw - cw // 2)
    return y1, y2, x1, x2


def mix_batch(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, *, n_classes: int, mixup_alpha: float, cutmix_alpha: float,
              prob: float, same_leaf: bool = False, generator: torch.Generator | None = None, return_info: bool = False,
              frames: torch.Tensor | None = None):
    """Mixup or cutmix a batch; returns (x_mixed, y_soft (B, C) float32, w_mixed) [+ MixInfo].

    With probability 1 - prob (or both alphas 0) the batch comes back as is, with one-hot
    targets. When both alphas are > 0, mixup or cutmix is chosen with equal chance. One lam
    per batch; cutmix's lam is the unpasted area fraction after clipping the box. With `frames`
    (the rows' frame ids), partners come from the same frame.
    """
    onehot = F.one_hot(y.long(), n_classes).float()
    n = len(y)
    pairs: tuple[tuple[Literal["mixup", "cutmix"], float], ...] = (("mixup", mixup_alpha), ("cutmix", cutmix_alpha))
    methods = [m for m, a in pairs if a > 0]
    if not methods or n == 0 or _rand(generator) >= prob:
        info = MixInfo("none", 1.0, torch.arange(n))
        return (x, onehot, w, info) if return_info else (x, onehot, w)
    kind = methods[0] if len(methods) == 1 else methods[int(_rand(generator) < 0.5)]
    lam = _beta(mixup_alpha if kind == "mixup" else cutmix_alpha, generator)
    partner = _partners(y, same_leaf, generator, frames)
    p_dev = partner.to(x.device)
    box = None
    if kind == "mixup":
        x_mixed = lam * x + (1.0 - lam) * x[p_dev]
    else:
        h, wd = x.shape[-2:]
        box = _box(h, wd, lam, generator)
        y1, y2, x1, x2 = box
        x_mixed = x.clone()
        x_mixed[..., y1:y2, x1:x2] = x[p_dev][..., y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * wd)
    y_soft = lam * onehot + (1.0 - lam) * onehot[partner.to(onehot.device)]
    w_mixed = None if w is None else lam * w + (1.0 - lam) * w[partner.to(w.device)]
    info = MixInfo(kind, lam, partner, box)
    return (x_mixed, y_soft, w_mixed, info) if return_info else (x_mixed, y_soft, w_mixed)


def soft_target_loss(logits: torch.Tensor, y_soft: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples of -sum_c y_soft * log_softmax(logits); weighted as in lib.model.losses: (l * w).sum() / w.sum()."""
    loss = -(y_soft.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    if weight is None:
        return loss.mean()
    weight = weight.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)
