"""Context views: which crops of 00 a model reads per ROI, and how their features are fused.

The 1st and 2nd places of FathomNet 2025 read the ROI together with wider crops around it
(the habitat and neighbours tell a sea pen from a soft coral when the ROI alone cannot).
`model.context` names the views ("1" = the ROI, "3" = the 3x context crop, "full" = the
frame); every view goes through the same backbone, then `ContextFusion` joins the features:
`concat` (the head sees all views side by side) or `attention` (the ROI token attends to
every view, so the fused vector keeps the ROI's size and the head stays the same).
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from torch import nn

from lib.stages import StageError


def view_column(view: str) -> str:
    """rois.csv column of a view: 1 -> crop_path, 3 -> ctx3_path, full -> full_path."""
    if view == "1":
        return "crop_path"
    if view == "full":
        return "full_path"
    return f"ctx{float(view):g}_path"


def model_inputs(rows: pd.DataFrame, context: Sequence[str], roi_column: str = "crop_path") -> list:
    """Per row, the crop path (one view) or the tuple of view paths, in `context` order.

    `roi_column` replaces the ROI view (e.g. testlike_path: the same ROI shrunk to test box sizes).
    """
    cols = [roi_column if v == "1" else view_column(v) for v in context]
    missing = [v for v, c in zip(context, cols) if c not in rows.columns]
    if missing:
        raise StageError(f"model.context asks for views {missing} that 00_prepare did not cut; add them to prepare.context_scales "
                         f"(or set prepare.context_full) and rerun 00_prepare_data.py.")
    if len(cols) == 1:
        return rows[cols[0]].tolist()
    return list(zip(*(rows[c].tolist() for c in cols)))


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
