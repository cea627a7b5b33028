"""Label-only frame yardsticks for one split: how many ROIs have siblings, and what the siblings' labels alone predict.

Why: before any model reads a frame's other ROIs, these say how much frame context could add on the data at hand
(issue 25: on the real FathomNet 2025 train labels 78.2% of ROIs have siblings, their label is among the siblings'
in 82.8% of cases, and the siblings' most common label is right 68.1% of the time at mean distance 2.56). The
oracle's predictions come from lib/data/siblings.py; the distance is the competition's (lib/decide/metric).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lib.data.siblings import label_in_siblings, sibling_counts, sibling_majority
from lib.decide.metric import score_labels


@dataclass(frozen=True)
class FrameYardsticks:
    """One split's figures; the label ones are nan without labels (a test split) or without any ROI with siblings."""

    rois: int
    frames: int
    with_siblings: float  # share of ROIs with at least one sibling
    label_in_siblings: float  # of ROIs with siblings: share whose label a sibling has
    majority_right: float  # of ROIs with siblings: share the siblings' most common label gets right
    majority_distance: float  # of ROIs with siblings: the mean competition distance of that label

    def line(self) -> str:
        """One human-readable line."""
        s = (f"{self.rois} ROIs in {self.frames} frames, {100 * self.with_siblings:.1f}% with siblings")
        if not np.isnan(self.label_in_siblings):
            s += (f"; label among the siblings' {100 * self.label_in_siblings:.1f}%, siblings' majority right "
                  f"{100 * self.majority_right:.1f}% (mean distance {self.majority_distance:.2f})")
        return s


def frame_yardsticks(frames: np.ndarray, labels: np.ndarray | None, dist: np.ndarray) -> FrameYardsticks:
    """The yardsticks of one split's ROIs: `frames` their image ids, `labels` their label indices (None or -1 where
    unknown: those rows count for the share only and are nobody's sibling in the oracle), `dist` the taxonomy's
    distance matrix in the same label order."""
    frames = np.asarray(frames)
    n_sib = sibling_counts(frames)
    share = float((n_sib > 0).mean()) if len(frames) else float("nan")
    in_sib = right = distance = float("nan")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        known = labels >= 0
        f, y = frames[known], labels[known]
        pred = sibling_majority(f, y)
        rows = pred >= 0
        if rows.any():
            in_sib = float(label_in_siblings(f, y)[rows].mean())
            right = float((pred[rows] == y[rows]).mean())
            distance = score_labels(y[rows], pred[rows], dist)
    return FrameYardsticks(rois=len(frames), frames=len(np.unique(frames)), with_siblings=share, label_in_siblings=in_sib,
                           majority_right=right, majority_distance=distance)
