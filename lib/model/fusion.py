"""Context views: which crops of 00 a model reads per ROI, and how their features are fused.

The 1st and 2nd places of FathomNet 2025 read the ROI together with wider crops around it
(the habitat and neighbours tell a sea pen from a soft coral when the ROI alone cannot).
`model.context` names the views ("1" = the ROI, "3" = the 3x context crop, "full" = the
frame); every view goes through the same backbone, then `ContextFusion` joins the features:
`concat` (the head sees all views side by side) or `attention` (the ROI token attends to
every view, so the fused vector keeps the ROI's size and the head stays the same).
"""
from __future__ import annotations

import torch
from torch import nn

from lib.core.errors import StageError


def _n_heads(dim: int) -> int:
    return next(h for h in (8, 4, 2, 1) if dim % h == 0)


class ContextFusion(nn.Module):
    """(N, V, F) view features -> (N, out_dim): concatenation, or attention from the ROI token."""

    def __init__(self, dim: int, n_views: int, mode: str):
        super().__init__()
        self.mode, self.n_views = mode, n_views
        if mode == "concat":
            self.out_dim = dim * n_views
        elif mode == "attention":
            self.out_dim = dim
            self.view_embed = nn.Parameter(torch.zeros(n_views, dim))  # tells the views apart
            nn.init.normal_(self.view_embed, std=0.02)
            self.attn = nn.MultiheadAttention(dim, _n_heads(dim), batch_first=True)
            self.norm = nn.LayerNorm(dim)
        else:
            raise StageError(f"Unknown model.fusion '{mode}'; choose concat or attention.")

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.mode == "concat":
            return f.flatten(1)
        kv = f + self.view_embed.to(f.dtype)
        out, _ = self.attn(kv[:, :1], kv, kv, need_weights=False)
        return self.norm(f[:, 0] + out[:, 0])  # residual on the ROI: with no useful context it stays the ROI
