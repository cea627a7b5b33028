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

    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    if len(history):
        ax[0].plot(history["epoch"], history["train_loss"], marker="o")
        ax[1].plot(history["epoch"], history["val_distance"], marker="o", color="tab:red")
    ax[0].set(title="train loss", xlabel="epoch")
    ax[1].set(title="val distance (lower is better)", xlabel="epoch")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
