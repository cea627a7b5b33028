"""Build, validate and write submission.csv (`annotation_id,concept_name`, one row per test id)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from lib.core.errors import StageError
from lib.core.io import atomic_path

if TYPE_CHECKING:
    from lib.config import Config
    from lib.data.taxonomy import Taxonomy


def validate_submission(sub: pd.DataFrame, test_ids: Sequence[int], names: Sequence[str]) -> None:
    """Exactly the test ids, each once, every name a known concept; else one clear error."""
    if list(sub.columns) != ["annotation_id", "concept_name"]:
        raise StageError(f"Submission columns are {list(sub.columns)}, expected annotation_id,concept_name.")
    ids = set(int(i) for i in test_ids)
    got = list(sub["annotation_id"])
    dup = len(got) - len(set(got))
    missing, extra = ids - set(got), set(got) - ids
    bad = set(sub["concept_name"]) - set(names)
    if dup or missing or extra or bad:
        raise StageError(
            f"Submission is invalid ({dup} duplicate ids, {len(missing)} missing ids, {len(extra)} extra ids, "
            f"{len(bad)} unknown names); this is a bug, please report it with the stage log."
        )


def write_submission(sub: pd.DataFrame, path: Path, test_ids: Sequence[int], names: Sequence[str]) -> None:
    validate_submission(sub, test_ids, names)
    with atomic_path(path) as tmp:
        sub.to_csv(tmp, index=False)


def assemble(test_ids: Sequence[int], predicted: dict[int, int], names: Sequence[str], fallback: int) -> tuple[pd.DataFrame, list[int]]:
    """One row per test id in JSON order (an id listed twice, once); ids without a prediction get `fallback` and are listed."""
    rows, fell_back = [], []
    for i in dict.fromkeys(int(i) for i in test_ids):
        label = predicted.get(int(i))
        if label is None:
            fell_back.append(int(i))
            label = fallback
        rows.append({"annotation_id": int(i), "concept_name": names[label]})
    return pd.DataFrame(rows, columns=["annotation_id", "concept_name"]), fell_back


@dataclass(frozen=True)
class SubmissionResult:
    """A written submission: its rows, the ids answered by the prior (no usable crop) and that prior answer."""

    frame: pd.DataFrame
    fell_back: list[int]
    fallback: int

    @property
    def rows(self) -> int:
        return len(self.frame)


def write_full_submission(cfg: Config, predicted: dict[int, int], taxonomy: Taxonomy, train_counts: np.ndarray, path: Path,
                          fallbacks_csv: Path | None = None) -> SubmissionResult:
    """submission.csv with one row per annotation of data.test_json: `predicted` labels, the rest the train prior's answer.

    The prior's answer is the concept of least expected distance under the train class counts;
    `fallbacks_csv`, when given, lists the ids it answered.
    """
    from lib.data.coco import read_coco
    from lib.decide.decode import prior_answer

    fallback = prior_answer(train_counts, taxonomy.distance_matrix())
    test_ids = read_coco(cfg.data.paths()["test_json"]).annotations["id"].astype(int).tolist()
    sub, fell_back = assemble(test_ids, predicted, taxonomy.names, fallback)
    write_submission(sub, path, test_ids, taxonomy.names)
    if fallbacks_csv is not None:
        with atomic_path(fallbacks_csv) as tmp:
            pd.DataFrame({"annotation_id": fell_back, "concept_name": taxonomy.names[fallback]}).to_csv(tmp, index=False)
    return SubmissionResult(sub, fell_back, fallback)
