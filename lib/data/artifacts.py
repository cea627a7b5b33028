"""Loaders of what 00_prepare wrote (rois.csv), shared by every later stage.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def load_rois(prepare_dir: Path) -> pd.DataFrame:
    """rois.csv with every crop path made absolute (relative to the stage folder on disk)."""
    rois = pd.read_csv(prepare_dir / "rois.csv", keep_default_na=False)
    for c in rois.columns:
        if c.endswith("_path"):
            rois[c] = [str(prepare_dir / p) if p else "" for p in rois[c]]
    return rois
