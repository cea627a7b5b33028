"""Loaders of what 00_prepare wrote (rois.csv, taxonomy.json), shared by every later stage.

`load_prepared(cfg)` is the common prologue of stages 01-04 and the kNN baseline: every ROI with
its crop paths made absolute, the taxonomy, and the views of them the stages read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lib.data.taxonomy import Taxonomy, load_taxonomy_json

if TYPE_CHECKING:
    from lib.config import Config


def load_rois(prepare_dir: Path, name: str = "rois.csv") -> pd.DataFrame:
    """rois.csv (or another table of 00's) with every crop path made absolute (relative to the stage folder on disk)."""
    rois = pd.read_csv(prepare_dir / name, keep_default_na=False)
    for c in rois.columns:
        if c.endswith("_path"):
            rois[c] = [str(prepare_dir / p) if p else "" for p in rois[c]]
    return rois


def load_extra(prepare_dir: Path, weight: float) -> pd.DataFrame:
    """00's extra training rows (data.extra; none when it wrote no extra_rois.csv), crop paths absolute, each with `weight`.

    They join every fold's training rows and no validation fold (lib.engine.folds.fold_splits), so
    the CV with extra data is computed on the same competition rows as without.
    """
    path = Path(prepare_dir) / "extra_rois.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["label", "weight"])
    return load_rois(Path(prepare_dir), path.name).assign(weight=float(weight))


@dataclass(frozen=True, eq=False)
class Prepared:
    """00_prepare's artifacts, loaded: every ROI (train and test, usable or not) and the taxonomy."""

    dir: Path
    rois: pd.DataFrame
    taxonomy: Taxonomy

    @classmethod
    def load(cls, prepare_dir: Path) -> "Prepared":
        return cls(Path(prepare_dir), load_rois(Path(prepare_dir)), load_taxonomy_json(Path(prepare_dir) / "taxonomy.json"))

    @property
    def train(self) -> pd.DataFrame:
        """Every train ROI (usable or not)."""
        return self.rois[self.rois["split"] == "train"]

    @property
    def test(self) -> pd.DataFrame:
        """The usable test ROIs (those with a crop): what the models predict."""
        return self.rois[(self.rois["split"] == "test") & (self.rois["ok"] == 1)]

    @property
    def usable(self) -> pd.DataFrame:
        """Every ROI with a crop, train and test, renumbered from 0."""
        return self.rois[self.rois["ok"] == 1].reset_index(drop=True)

    @property
    def n_folds(self) -> int:
        return int(self.train["fold"].max()) + 1

    @property
    def train_counts(self) -> np.ndarray:
        """Usable train ROIs per class (the train prior's counts)."""
        train = self.train
        return np.bincount(train.loc[train["ok"] == 1, "label"], minlength=self.taxonomy.n_classes)


def load_prepared(cfg: Config) -> Prepared:
    """What 00_prepare wrote for this experiment (output/<exp>/00_prepare/)."""
    return Prepared.load(cfg.out_dir / "00_prepare")
