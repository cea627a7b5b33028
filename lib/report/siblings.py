"""Label-only frame yardsticks for reports: how many ROIs have siblings, and what the siblings' labels alone predict.

The oracle answers each train ROI that has siblings with its siblings' most common true label (no
pixels, no model): a yardstick for what frame context (lib.decide.frame_context) can add. On the
real FathomNet 2025 train labels 78.2% of ROIs have siblings, their label is among the siblings'
for 82.8%, and the oracle is right 68.1% of the time (mean distance 2.56). The counting is
lib/data/siblings.py's; this module scores it with the competition's distance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.data.siblings import label_in_siblings, sibling_counts, sibling_majority, sibling_share
from lib.decide.metric import score_labels


@dataclass(frozen=True)
class FrameYardsticks:
    """One split's figures; the label ones are nan without labels (a test split) or without any ROI with siblings."""

    rois: int
    frames: int
    with_siblings: float  # share of ROIs with at least one sibling
    oracle_rows: int  # ROIs with a known label and a sibling with a known label: what the oracle answers
    label_in_siblings: float  # of those: share whose label a sibling has
    majority_right: float  # of those: share the siblings' most common label gets right
    majority_distance: float  # of those: the mean competition distance of that label

    def line(self) -> str:
        """One human-readable line."""
        s = f"{self.rois} ROIs in {self.frames} frames, {100 * self.with_siblings:.1f}% with siblings"
        if self.oracle_rows:
            s += (f"; label among the siblings' {100 * self.label_in_siblings:.1f}%, siblings' majority right "
                  f"{100 * self.majority_right:.1f}% (mean distance {self.majority_distance:.2f})")
        return s


def frame_yardsticks(frames: np.ndarray, labels: np.ndarray | None, dist: np.ndarray) -> FrameYardsticks:
    """The yardsticks of one split's ROIs: `frames` their image ids, `labels` their label indices (None or -1 where
    unknown: those rows count for the share only and are nobody's sibling in the oracle), `dist` the taxonomy's
    distance matrix in the same label order."""
    frames = np.asarray(frames)
    share = sibling_share(frames)
    n_rows, in_sib, right, distance = 0, float("nan"), float("nan"), float("nan")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        known = labels >= 0
        f, y = frames[known], labels[known]
        pred = sibling_majority(f, y)
        rows = pred >= 0
        n_rows = int(rows.sum())
        if n_rows:
            in_sib = float(label_in_siblings(f, y)[rows].mean())
            right = float((pred[rows] == y[rows]).mean())
            distance = score_labels(y[rows], pred[rows], dist)
    return FrameYardsticks(rois=len(frames), frames=len(np.unique(frames)), with_siblings=share, oracle_rows=n_rows,
                           label_in_siblings=in_sib, majority_right=right, majority_distance=distance)


@dataclass(frozen=True)
class FrameFacts:
    """00's rois.csv in frame terms: the train split's yardsticks, the test split's share, placeholders beside usable ROIs."""

    train: FrameYardsticks  # usable train ROIs (rejected ones are not rows)
    test_share: float  # test ROIs (placeholders included) that share their frame with another
    placeholder_siblings: int = 0  # test ROIs without a crop that share a frame with a usable one (siblings with the prior)

    def lines(self) -> list[str]:
        """Report lines in words."""
        t = self.train
        out = [f"ROIs sharing their frame with another: {t.with_siblings:.1%} of train, {self.test_share:.1%} of test."]
        if t.oracle_rows:
            out.append(f"Label-only oracle (the siblings' most common true label, no pixels) on the {t.oracle_rows} train ROIs with "
                       f"siblings: top-1 {t.majority_right:.1%}, distance {t.majority_distance:.3f}; the label is among the "
                       f"siblings' labels for {t.label_in_siblings:.1%}.")
        if self.placeholder_siblings:
            out.append(f"{self.placeholder_siblings} test ROI(s) without a crop share a frame with usable ones: frame context counts "
                       "each as a sibling carrying the train prior's distribution (the prior also answers it).")
        return out


def frame_facts(rois: pd.DataFrame, dist: np.ndarray) -> FrameFacts:
    """The facts of 00's rois.csv: usable train ROIs (rejected ones are not rows) and every test ROI."""
    train = rois[(rois["split"] == "train") & (rois["ok"] == 1)]
    test = rois[rois["split"] == "test"]
    usable_frames = set(test.loc[test["ok"] == 1, "image_id"])
    placeholders = int(test.loc[test["ok"] != 1, "image_id"].isin(usable_frames).sum())
    yard = frame_yardsticks(train["image_id"].to_numpy(), train["label"].to_numpy(dtype=np.int64), dist)
    test_share = float((sibling_counts(test["image_id"].to_numpy()) > 0).mean()) if len(test) else 0.0
    return FrameFacts(train=yard, test_share=test_share, placeholder_siblings=placeholders)
