"""Evaluation truth: the one reader of `solution.csv`, for reports only.

The demo writes `<data.root>/solution.csv`; a user may put one beside their own data (a labelled
hold-out). Only report code reads it (04's report.md and options.csv test columns, `python -m
lib.report`): its presence or absence changes no record, result or up-to-date decision.
Reports score against it and say where it came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lib.config import Config

SOLUTION = "solution.csv"


@dataclass(frozen=True)
class Truth:
    """Known test labels: annotation_id -> concept name, and the file they came from."""

    path: Path
    concepts: pd.Series

    @property
    def data(self) -> str:
        """What the truth labels: `demo test` where lib.demo generated the data folder (its demo_record.json), else `test`."""
        return "demo test" if (self.path.parent / "demo_record.json").is_file() else "test"

    @property
    def note(self) -> str:
        return f"scored against {self.path}"

    def frame(self) -> pd.DataFrame:
        """The solution as the metric reads it (annotation_id, concept_name)."""
        return self.concepts.rename("concept_name").reset_index()

    def labels(self, annotation_ids: Sequence[int] | np.ndarray, names: Sequence[str]) -> np.ndarray:
        """Class index per id in the order of `names`; -1 where the id or its concept is unknown."""
        index = {n: i for i, n in enumerate(names)}
        return np.array([index.get(self.concepts.get(int(a), ""), -1) for a in annotation_ids], dtype=np.int64)


def find_truth(cfg: Config) -> Truth | None:
    """`<data.root>/solution.csv` when it exists, else None."""
    path = cfg.data.root_dir() / SOLUTION
    if not path.is_file():
        return None
    sol = pd.read_csv(path)
    return Truth(path, sol.set_index("annotation_id")["concept_name"])
