"""Out-of-fold rows of a fold ensemble: what every fold's `oof.npz` holds, merged and sorted by annotation id.

Kept apart from lib.decide.blending (04's blend) because 02 and 03 read out-of-fold rows too (the
pseudo-label calibration): a change to how 04 blends must not retrain phase 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lib.core.errors import StageError


@dataclass(frozen=True, eq=False)
class OutOfFold:
    """Every fold's held-out rows, sorted by annotation id so that models trained on the same folds line up."""

    ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray  # (N, C)
    folds: np.ndarray  # the fold (position in the folder list) each row was held out of


def load_oof(fold_dirs: Sequence[Path]) -> OutOfFold:
    """The folds' out-of-fold rows. A missing, corrupt or pickled `oof.npz`, or one without these arrays, is one sentence naming it."""
    from lib.core.io import load_npz

    fix = "delete it and rerun the training stage (its fold runs again)"
    parts = [load_npz(d / "oof.npz", fix) for d in fold_dirs]
    for d, p in zip(fold_dirs, parts):
        lacking = [k for k in ("annotation_id", "label", "probs") if k not in p]
        if lacking:
            raise StageError(f"'{d / 'oof.npz'}' lacks the array(s) {', '.join(lacking)}; {fix}.")
    ids = np.concatenate([p["annotation_id"] for p in parts])
    order = np.argsort(ids, kind="stable")
    folds = np.concatenate([np.full(len(p["annotation_id"]), k) for k, p in enumerate(parts)])
    return OutOfFold(ids[order], np.concatenate([p["label"] for p in parts])[order], np.concatenate([p["probs"] for p in parts])[order],
                     folds[order])
