"""Which crops of 00 a model reads per ROI (`model.context`): the rois.csv column of each view; and each ROI's frame
(`model.frame_context: attention` reads the other ROIs of the same frame).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from lib.core.errors import StageError


def view_column(view: str) -> str:
    """rois.csv column of a view: 1 -> crop_path, 3 -> ctx3_path, full -> full_path."""
    if view == "1":
        return "crop_path"
    if view == "full":
        return "full_path"
    return f"ctx{float(view):g}_path"


def model_inputs(rows: pd.DataFrame, context: Sequence[str], roi_column: str = "crop_path") -> list:
    """Per row, the crop path (one view) or the tuple of view paths, in `context` order.

    `roi_column` replaces the ROI view (e.g. testlike_path: the same ROI shrunk to test box sizes).
    """
    cols = [roi_column if v == "1" else view_column(v) for v in context]
    missing = [v for v, c in zip(context, cols) if c not in rows.columns]
    if missing:
        raise StageError(f"model.context asks for views {missing} that 00_prepare did not cut; add them to prepare.context_scales "
                         f"(or set prepare.context_full) and rerun 00_prepare_data.py.")
    if len(cols) == 1:
        return rows[cols[0]].tolist()
    return list(zip(*(rows[c].tolist() for c in cols)))


def frame_ids(rows: pd.DataFrame) -> np.ndarray:
    """One integer id per frame of `rows` (int64, one per row), keyed by (split, image_id): train and test image ids
    may overlap in the real data, and 03's pseudo-labelled test rows train beside train rows."""
    if "image_id" not in rows.columns:
        raise StageError("These ROI rows have no image_id column, which model.frame_context=attention needs to group ROIs by "
                         "frame; rerun 00_prepare_data.py (rois.csv holds it) or set model.frame_context=none.")
    if rows["image_id"].isna().any():
        raise StageError(f"{int(rows['image_id'].isna().sum())} ROI rows have no image_id, which model.frame_context=attention "
                         f"needs to group ROIs by frame; rerun 00_prepare_data.py or set model.frame_context=none.")
    split = rows["split"].astype(str).to_numpy() if "split" in rows.columns else np.full(len(rows), "train")
    keys = pd.MultiIndex.from_arrays([split, rows["image_id"].astype(str).to_numpy()])
    return np.asarray(pd.factorize(keys)[0], dtype=np.int64)
