"""What the frames of the data at hand hold, for reports: the share of ROIs with siblings and the label-only oracle.

The oracle answers each train ROI that has siblings with its siblings' most common true label (no
pixels, no model): a yardstick for what frame context (lib.decide.frame_context) can add. On the
real FathomNet train labels it is right 68.1% of the time, a mean distance of 2.56.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class FrameFacts:
    """Sibling shares per split and the label-only sibling-majority oracle on the train labels."""

    train_share: float  # train ROIs (usable) that share their frame with another
    test_share: float  # test ROIs (placeholders included) that do
    oracle_rows: int  # train ROIs with siblings (what the oracle answers)
    oracle_top1: float  # its accuracy there
    oracle_distance: float  # its mean competition distance there
    label_among_siblings: float  # share of those whose label is among their siblings' labels
    placeholder_siblings: int = 0  # test ROIs without a crop that share a frame with a usable one (siblings with the prior)

    def lines(self) -> list[str]:
        """Report lines in words."""
        out = [f"ROIs sharing their frame with another: {self.train_share:.1%} of train, {self.test_share:.1%} of test."]
        if self.oracle_rows:
            out.append(f"Label-only oracle (the siblings' most common true label, no pixels) on the {self.oracle_rows} train ROIs with "
                       f"siblings: top-1 {self.oracle_top1:.1%}, distance {self.oracle_distance:.3f}; the label is among the "
                       f"siblings' labels for {self.label_among_siblings:.1%}.")
        if self.placeholder_siblings:
            out.append(f"{self.placeholder_siblings} test ROI(s) without a crop share a frame with usable ones: frame context counts "
                       "each as a sibling carrying the train prior's distribution (the prior also answers it).")
        return out


def share_with_siblings(frame: np.ndarray) -> float:
    """The share of ROIs whose frame holds another ROI."""
    ids = pd.Series(np.asarray(frame))
    return float((ids.map(ids.value_counts()) > 1).mean()) if len(ids) else 0.0


def majority_oracle(frame: np.ndarray, labels: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows with siblings, the siblings' most common label of each): ties go to the lowest label index.

    Per frame, a (frames x classes) count table; a row's sibling counts are its frame's less its own label, so a
    frame of hundreds of ROIs costs its rows times the classes, not its rows squared.
    """
    frame, labels = np.asarray(frame), np.asarray(labels, dtype=np.int64)
    _, g = np.unique(frame, return_inverse=True)
    g = g.reshape(-1)
    counts = np.zeros((g.max() + 1 if len(g) else 0, dist.shape[0]), dtype=np.int64)
    np.add.at(counts, (g, labels), 1)
    rows = np.flatnonzero(counts.sum(1)[g] > 1)
    sib = counts[g[rows]].copy()
    sib[np.arange(len(rows)), labels[rows]] -= 1
    return rows, sib.argmax(1)


def frame_facts(rois: pd.DataFrame, dist: np.ndarray) -> FrameFacts:
    """The facts of 00's rois.csv: usable train ROIs (rejected ones are not rows) and every test ROI."""
    train = rois[(rois["split"] == "train") & (rois["ok"] == 1)]
    test = rois[rois["split"] == "test"]
    y = train["label"].to_numpy(dtype=np.int64)
    rows, guess = majority_oracle(train["image_id"].to_numpy(), y, dist)
    among = _label_among_siblings(train["image_id"].to_numpy(), y)
    usable_frames = set(test.loc[test["ok"] == 1, "image_id"])
    placeholders = int(test.loc[test["ok"] != 1, "image_id"].isin(usable_frames).sum())
    return FrameFacts(share_with_siblings(train["image_id"].to_numpy()), share_with_siblings(test["image_id"].to_numpy()),
                      len(rows), float((guess == y[rows]).mean()) if len(rows) else float("nan"),
                      float(dist[y[rows], guess].mean()) if len(rows) else float("nan"), among, placeholders)


def _label_among_siblings(frame: np.ndarray, labels: np.ndarray) -> float:
    """Among ROIs with siblings, the share whose label another ROI of the frame carries too."""
    df = pd.DataFrame({"f": frame, "y": labels})
    size = df.groupby("f")["y"].transform("size")
    same = df.groupby(["f", "y"])["y"].transform("size")
    has = size > 1
    return float((same[has] > 1).mean()) if has.any() else float("nan")
