"""Cross-validation folds: stratified by label, grouped by frame, deterministic from the seed.

Boxes from one frame share background, light and often species, so a frame split across folds
leaks; grouping by frame keeps CV honest (the 5th place's lesson).
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def assign_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row; every group (frame) lands in exactly one fold."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    folds = np.full(len(labels), -1, dtype=np.int64)
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise ValueError(f"Only {n_groups} frames for {n_folds} folds; lower prepare.n_folds or add data.")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare classes with fewer members than folds are expected in long-tailed data.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            folds[val_idx] = k
    return folds
