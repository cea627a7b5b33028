"""matplotlib figures (Agg backend, written atomically)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.io import atomic_path


def plot_history(history: pd.DataFrame, path: Path, title: str) -> None:
    """Training loss and validation distance per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(11, 3))
    if len(history):
        ax[0].plot(history["epoch"], history["train_loss"], marker="o")
        val = history.dropna(subset=["val_distance"])  # epochs that validated (train.val_every)
        ax[1].plot(val["epoch"], val["val_distance"], marker="o", color="tab:red", label="random split")
        if "val_distance_testlike" in history:
            tl = history.dropna(subset=["val_distance_testlike"])  # validated epochs that scored the view (train.testlike_every)
            ax[1].plot(tl["epoch"], tl["val_distance_testlike"], marker="s", color="tab:purple", label="test-like view")
            ax[1].legend()
        ax[2].plot(history["epoch"], history["lr"], marker="o", color="tab:green")
    ax[0].set(title="train loss", xlabel="epoch")
    ax[1].set(title="val distance (lower is better)", xlabel="epoch")
    ax[2].set(title="learning rate (head)", xlabel="epoch")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def plot_umap(coords2d: np.ndarray, labels: np.ndarray, core_mask: np.ndarray, names: Sequence[str] | None, path: Path,
              title: str, max_legend: int = 20) -> None:
    """Embedding scatter coloured by predicted label; cluster-core pseudo-labels ringed in black.

    Shows at a glance whether the selected cores sit inside clean clusters. Only the first two
    columns of `coords2d` are drawn; the legend names the `max_legend` most frequent labels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords2d, labels = np.asarray(coords2d, dtype=float), np.asarray(labels)
    core_mask = np.asarray(core_mask, dtype=bool)
    fig, ax = plt.subplots(figsize=(7, 6))
    if len(coords2d) and coords2d.shape[1] >= 2:
        x, y = coords2d[:, 0], coords2d[:, 1]
        uniq, counts = np.unique(labels, return_counts=True)
        if len(uniq) <= 20:  # qualitative colours while they last, then a spread over a continuous map
            colour = {lab: plt.get_cmap("tab20")(i) for i, lab in enumerate(uniq)}
        else:
            colour = {lab: plt.get_cmap("gist_ncar")(i / (len(uniq) - 1)) for i, lab in enumerate(uniq)}
        shown = set(uniq[np.argsort(-counts, kind="stable")[:max_legend]])
        for lab in uniq:
            sel = labels == lab
            name = (names[int(lab)] if names is not None else str(lab)) if lab in shown else None
            ax.scatter(x[sel], y[sel], s=12, color=colour[lab], alpha=0.7, linewidths=0, label=name)
        if core_mask.any():
            ax.scatter(x[core_mask], y[core_mask], s=30, facecolors="none", edgecolors="black", linewidths=0.8,
                       label=f"cluster core ({int(core_mask.sum())})")
        ax.legend(fontsize=6, markerscale=1.2, loc="best", frameon=False)
    else:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
    ax.set(title=title, xlabel="UMAP 1", ylabel="UMAP 2")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def plot_matrix(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    """A small annotated heat map of a square matrix (the members' error correlations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 0.9 * n), max(3.2, 1.4 + 0.8 * n)))
    im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_reliability(panels: Mapping[str, Sequence[tuple[str, np.ndarray, np.ndarray]]], path: Path, title: str = "",
                     n_bins: int = 15) -> None:
    """Reliability diagrams: one panel per title (e.g. "out of fold", "test-like views"), one curve per (label, probs, labels).

    Accuracy against mean top probability in the bins of `expected_calibration_error`, whose value
    each legend entry gives: below the diagonal is over-confident, above it under-confident. Marker
    area grows with the bin's share of rows, so a sparse bin's swing reads as the noise it is.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.decide.calibration import expected_calibration_error, reliability

    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        for label, probs, labels in series:
            conf, acc, count = reliability(probs, labels, n_bins)
            seen = count > 0
            line, = ax.plot(conf[seen], acc[seen], lw=1.2, label=f"{label} (ECE {expected_calibration_error(probs, labels, n_bins):.3f})")
            ax.scatter(conf[seen], acc[seen], s=8 + 120 * count[seen] / count.sum(), color=line.get_color(), zorder=3)
        if not series:
            ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=7, loc="upper left", frameon=False)
        ax.set(title=name, xlabel="mean top probability", ylabel="accuracy", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
