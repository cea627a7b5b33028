"""Build, validate and write submission.csv (`annotation_id,concept_name`, one row per test id)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from lib.core.errors import StageError
from lib.core.io import atomic_path


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
