"""Where the ROI looked: the cross_attention fusion's weights over each context view's tokens, for one batch.

01 writes them after each fold of a `model.fusion: cross_attention` model (`attention.npz`, `attention.png` beside
curves.png): per context view, the last block's head-averaged weights of each ROI over that view's tokens,
laid out on the token grid (a CNN's feature map, a ViT's patches) when the tokens form a square. A map
that stays uniform says the ROI learned nothing from that view; one that peaks at the centre of the
3x crop says it reads the ROI's immediate surroundings; peaks elsewhere in the frame, its neighbours.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lib.core.io import atomic_path


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """{f"view{v}": (N, T) weights} of a Net with cross_attention on views x (N, V, 3, H, W); (N, h, w) for square grids."""
    cross = getattr(getattr(model, "fusion", None), "cross", None)
    if cross is None:
        raise ValueError("attention maps need a model built with model.fusion: cross_attention.")
    was_training = model.training
    model.eval()
    cross.keep_weights = True
    try:
        getattr(model, "features")(x)  # noqa: B009 (a Net's)
    finally:
        cross.keep_weights = False
        model.train(was_training)
    out = {}
    for v, w in enumerate(cross.last_weights, start=1):
        if w is None:
            continue
        side = math.isqrt(w.shape[1])
        arr = w.float().cpu().numpy()
        out[f"view{v}"] = arr.reshape(len(arr), side, side) if side * side == w.shape[1] else arr
    return out


def write_attention(model: nn.Module, x: torch.Tensor, views: Sequence[str], folder: Path, rows: int = 8) -> Path:
    """attention.npz (the maps, the view names) and attention.png (each ROI beside its maps) for the first `rows` of x."""
    x = x[:rows]
    maps = attention_maps(model, x)
    npz = folder / "attention.npz"
    with atomic_path(npz) as tmp:
        arrays: dict[str, Any] = {"views": np.array(list(views)), **maps}
        np.savez(tmp, **arrays)
    plot_attention(x.float().cpu().numpy(), maps, list(views), folder / "attention.png")
    return npz


def plot_attention(x: np.ndarray, maps: dict[str, np.ndarray], views: list[str], path: Path) -> None:
    """One row per ROI: each view's crop (min-max scaled), the context views' maps over their crops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(x)
    fig, axes = plt.subplots(n, len(views), figsize=(2.2 * len(views), 2.2 * n), squeeze=False)
    for i in range(n):
        for v, name in enumerate(views):
            ax = axes[i][v]
            img = x[i, v].transpose(1, 2, 0)
            ax.imshow((img - img.min()) / max(1e-6, float(np.ptp(img))))
            m = maps.get(f"view{v}")
            if m is not None and m.ndim == 3:
                ax.imshow(m[i], cmap="magma", alpha=0.55, extent=(0, img.shape[1], img.shape[0], 0), interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title("ROI" if name == "1" else f"{name}{'x' if name != 'full' else ''}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
