"""What the other ROIs of a frame (its siblings) say about each ROI, from labels alone: label-only yardsticks.

Why: in the real FathomNet 2025 train set 78% of ROIs share their frame with another, and the siblings' most common
label alone is right 68% of the time; these numbers, for the data at hand, say how much frame context could add
before any model uses it. Pure numpy/pandas on (frame id, label) per ROI of one split; scoring the oracle by the
competition's distance is lib/report/siblings.py (this layer may not import the metric).
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def sibling_counts(frames: np.ndarray) -> np.ndarray:
    """How many other ROIs share each ROI's frame."""
    frames = np.asarray(frames)
    if len(frames) == 0:
        return np.zeros(0, dtype=np.int64)
    _, inv, cnt = np.unique(frames, return_inverse=True, return_counts=True)
    return (cnt[inv.reshape(-1)] - 1).astype(np.int64)


def sibling_share(frames: np.ndarray) -> float:
    """The share of ROIs that share their frame with at least one other ROI (nan for no ROI)."""
    n = sibling_counts(frames)
    return float((n > 0).mean()) if len(n) else float("nan")


def label_in_siblings(frames: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per ROI: whether another ROI of its frame has its label (False for an ROI alone in its frame)."""
    df = pd.DataFrame({"f": np.asarray(frames), "y": np.asarray(labels)})
    return (df.groupby(["f", "y"], sort=False)["y"].transform("size").to_numpy() > 1)


def sibling_majority(frames: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per ROI: the most common label among its siblings' labels (its own row left out); -1 for an ROI alone.

    Ties go to the smallest label index (the taxonomy's label order), a rule that needs nothing but the labels and
    reproduces the real-data figures (68.1% right, mean distance 2.56). Labels must be integers >= 0.
    Vectorised: with a frame's label counts ranked (count down, label up) as (a1, m1), (a2, m2), an ROI whose label
    is not a1 gets a1; one whose label is a1 sees a1 at m1 - 1 and gets a1 if m1 - 1 > m2, a2 if m2 > m1 - 1, the
    smaller of the two on a tie.
    """
    frames, labels = np.asarray(frames), np.asarray(labels, dtype=np.int64)
    out = np.full(len(labels), -1, dtype=np.int64)
    if len(labels) == 0:
        return out
    if labels.min() < 0:
        raise ValueError("sibling_majority needs integer labels >= 0 (a test split's unknown labels have no oracle).")
    pairs = pd.DataFrame({"f": frames, "y": labels}).groupby(["f", "y"]).size().rename("m").reset_index()
    pairs = pairs.sort_values(["f", "m", "y"], ascending=[True, False, True], kind="stable")
    rank = pairs.groupby("f").cumcount()
    first = pairs[rank == 0].set_index("f")
    second = pairs[rank == 1].set_index("f")
    a1 = first["y"].reindex(frames).to_numpy()
    m1 = first["m"].reindex(frames).to_numpy()
    a2 = second["y"].reindex(frames).fillna(-1).to_numpy().astype(np.int64)
    m2 = second["m"].reindex(frames).fillna(0).to_numpy().astype(np.int64)
    own = labels == a1
    pred = a1.astype(np.int64)
    left = m1 - 1  # a1's count among the siblings of an ROI labelled a1
    pred[own & (m2 > left)] = a2[own & (m2 > left)]
    tie = own & (m2 == left) & (m2 > 0)
    pred[tie] = np.minimum(a1[tie], a2[tie])
    has = sibling_counts(frames) > 0
    out[has] = pred[has]
    return out
