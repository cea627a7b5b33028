"""matplotlib figures (Agg backend, written atomically)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.stages import atomic_path


def plot_history(history: pd.DataFrame, path: Path, title: str) -> None:
    """Training loss and validation distance per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(11, 3))
    if len(history):
        ax[0].plot(history["epoch"], history["train_loss"], marker="o")
        ax[1].plot(history["epoch"], history["val_distance"], marker="o", color="tab:red", label="random split")
        if "val_distance_testlike" in history:
            ax[1].plot(history["epoch"], history["val_distance_testlike"], marker="s", color="tab:purple", label="test-like view")
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
