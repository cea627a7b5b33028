"""Which network reads which view, at which size: the per-view features (and tokens) that the context fusion joins.

By default every view of `model.context` goes through `model.backbone` at `model.img_size`. The
2nd place of FathomNet 2025 read the ROI with one network at 224 px and the full frame with a
second at 384 (`model.view_backbones`): a small frame shrunk to the ROI's size loses the habitat's
detail, a large ROI wastes compute. The loader reads every view at the largest size
(`ModelCfg.input_size`), normalised for `model.backbone`; each `StreamInput` picks its backbone's views,
resizes them on the device (antialiased) and renormalises them for that backbone's own mean and
std, so loaders, mixing and TTA stay one code path over one (N, V, 3, H, W) tensor.

`tokens_of` turns what a backbone's `forward_features` gives into a sequence of tokens, for
`model.fusion: cross_attention`: a ViT's patch tokens (its class and register tokens dropped) or a
CNN's final feature map flattened to H x W tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib.config import ModelCfg


@dataclass(frozen=True)
class StreamSpec:
    """One backbone's share of the views: their indices in `model.context` and the side it reads them at."""

    views: tuple[int, ...]
    size: int


def stream_specs(m: ModelCfg) -> list[StreamSpec]:
    """`model.backbone`'s views (the ROI and every view no view backbone names) first, then one spec per view backbone."""
    named = {v for vb in m.view_backbones for v in vb.views}
    main = StreamSpec(tuple(i for i, v in enumerate(m.context) if v not in named), m.img_size)
    return [main, *(StreamSpec(tuple(m.context.index(v) for v in vb.views), vb.img_size) for vb in m.view_backbones)]


class StreamInput(nn.Module):
    """(N, V, 3, H, W) views -> this backbone's (N * v, 3, size, size) input: picked, resized, renormalised.

    The loader normalised with `loader_mean`/`loader_std` (model.backbone's); a backbone trained with
    other statistics gets x * (loader_std / std) + (loader_mean - mean) / std per channel, the same
    image under its own normalisation. The buffers are not saved with the model (they follow from the config).
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, spec: StreamSpec, loader_mean: Sequence[float], loader_std: Sequence[float],
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.views, self.size = list(spec.views), spec.size
        # compared on the CPU, so a Net built on the meta device (lib.doctor.memory: no weights) builds too
        lm, ls, m, s = (torch.tensor(list(t), dtype=torch.float32, device="cpu").view(1, 3, 1, 1)
                        for t in (loader_mean, loader_std, mean, std))
        self.same_norm = bool(torch.equal(lm, m) and torch.equal(ls, s))
        here = torch.get_default_device()
        self.register_buffer("scale", (ls / s).to(here), persistent=False)
        self.register_buffer("shift", ((lm - m) / s).to(here), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picked = x if len(self.views) == x.shape[1] else x[:, self.views]
        xs = picked.flatten(0, 1)
        if xs.shape[-1] != self.size or xs.shape[-2] != self.size:
            xs = F.interpolate(xs, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if not self.same_norm:
            xs = xs * self.scale.to(xs.dtype) + self.shift.to(xs.dtype)
        return xs


def tokens_of(backbone: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """`forward_features` output -> (N, T, F) tokens: a ViT's patch tokens (prefix tokens dropped), a CNN's H x W map cells."""
    if feats.dim() == 3:
        return feats[:, int(getattr(backbone, "num_prefix_tokens", 0)):]
    if feats.dim() == 4:
        if str(getattr(backbone, "output_fmt", "NCHW")).endswith("NHWC"):  # Swin and some others keep channels last
            return feats.flatten(1, 2)
        return feats.flatten(2).transpose(1, 2)
    raise ValueError(f"forward_features gave a {feats.dim()}-d tensor of shape {tuple(feats.shape)}; "
                     f"cross_attention needs (N, T, F) tokens or an (N, C, H, W) map.")


def encode(backbone: nn.Module, x: torch.Tensor, with_tokens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled features (N, F) of a (N, 3, H, W) batch and, with `with_tokens`, its tokens (N, T, F) from the same pass.

    forward_head(pre_logits=True) on forward_features is exactly the pooled output of a timm model built with
    num_classes=0, so the pooled path is the same computation either way.
    """
    if not with_tokens:
        return backbone(x), None
    timm_model: Any = backbone  # timm's forward_features / forward_head split
    feats = timm_model.forward_features(x)
    return timm_model.forward_head(feats, pre_logits=True), tokens_of(backbone, feats)
