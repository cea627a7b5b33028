"""The competition score: mean taxonomic distance between solution and submission (lower is better).

    python -m lib.decide.metric SOLUTION.csv SUBMISSION.csv [--per-row OUT.csv] [--taxonomy CSV]

Rows are joined on `annotation_id`, never by position. Missing or extra ids are an error; a
submitted name that is not a known concept scores 12 with a warning, as on Kaggle.
`--taxonomy CSV` is the table the distances come from (concept_name and the 7 rank columns, as
`data.taxonomy_csv`); the default is the competition's, configs/taxonomy/fathomnet2025.csv, so
another dataset's files are scored with `--taxonomy` naming that dataset's table.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lib.core.errors import UserError
from lib.data.taxonomy import MAX_DISTANCE, Taxonomy, load_taxonomy_csv, plural

DEFAULT_TAXONOMY = Path(__file__).resolve().parents[2] / "configs" / "taxonomy" / "fathomnet2025.csv"


class MetricError(UserError, ValueError):
    """A solution/submission pair that cannot be scored; the message names the fix."""


def score_labels(y_true: np.ndarray, y_pred: np.ndarray, dist: np.ndarray) -> float:
    """Mean distance for integer labels (both in the taxonomy's label order)."""
    if len(y_true) == 0:
        return float("nan")
    return float(dist[np.asarray(y_true), np.asarray(y_pred)].mean())


def _ids(df: pd.DataFrame, what: str) -> pd.DataFrame:
    need = {"annotation_id", "concept_name"}
    if not need.issubset(df.columns):
        raise MetricError(f"The {what} file needs the columns annotation_id,concept_name; it has {', '.join(map(str, df.columns))}.")
    dup = df["annotation_id"][df["annotation_id"].duplicated()]
    if len(dup):
        raise MetricError(f"The {what} file lists {dup.nunique()} annotation ids more than once "
                          f"(e.g. {', '.join(map(str, dup.unique()[:5]))}); keep one row per id.")
    return df


def score_frames(solution: pd.DataFrame, submission: pd.DataFrame, taxonomy: Taxonomy) -> tuple[float, pd.DataFrame]:
    """Score two `annotation_id,concept_name` tables; returns the mean and a per-row table."""
    solution, submission = _ids(solution, "solution"), _ids(submission, "submission")
    sol_ids, sub_ids = set(solution["annotation_id"]), set(submission["annotation_id"])
    missing, extra = sorted(sol_ids - sub_ids), sorted(sub_ids - sol_ids)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} solution ids missing from the submission (e.g. {', '.join(map(str, missing[:5]))})")
        if extra:
            parts.append(f"{len(extra)} submission ids not in the solution (e.g. {', '.join(map(str, extra[:5]))})")
        raise MetricError("Cannot score: " + " and ".join(parts) + "; submit exactly one row per solution annotation id.")
    unknown_sol = sorted(set(solution["concept_name"]) - set(taxonomy.names))
    if unknown_sol:
        raise MetricError(f"The solution names {plural(len(unknown_sol), 'concept', 'concepts')} not in the taxonomy table "
                          f"(e.g. {', '.join(unknown_sol[:5])}); pass your dataset's table with --taxonomy CSV "
                          "(python -m lib.decide.metric; data.taxonomy_csv in a config).")
    merged = solution.merge(submission, on="annotation_id", suffixes=("_solution", "_submission"))
    unknown = ~merged["concept_name_submission"].isin(taxonomy.names)
    if unknown.any():
        bad = merged.loc[unknown, "concept_name_submission"].astype(str).unique()[:5]
        warnings.warn(f"{int(unknown.sum())} submitted names are not known concepts and score {MAX_DISTANCE} (e.g. {', '.join(bad)}).", stacklevel=2)
    dist = taxonomy.distance_matrix()
    idx = {n: i for i, n in enumerate(taxonomy.names)}
    s = merged["concept_name_solution"].map(idx).to_numpy()
    p = merged["concept_name_submission"].map(idx)
    d = np.full(len(merged), float(MAX_DISTANCE))
    known = p.notna().to_numpy()
    d[known] = dist[s[known], p[known].astype(int).to_numpy()]
    per_row = pd.DataFrame(
        {
            "annotation_id": merged["annotation_id"],
            "solution": merged["concept_name_solution"],
            "submission": merged["concept_name_submission"],
            "distance": d,
        }
    ).sort_values("annotation_id", kind="stable")
    return float(d.mean()) if len(d) else float("nan"), per_row.reset_index(drop=True)


def read_labels(what: str, path: str | Path) -> pd.DataFrame:
    """One annotation_id,concept_name CSV as read; a file pandas cannot parse is one MetricError naming it (not a parser
    traceback), since these files are often written by hand or by another tool."""
    p = Path(path)
    if not p.is_file():
        raise MetricError(f"The {what} file '{p}' does not exist; pass the path of an annotation_id,concept_name CSV.")
    try:
        return pd.read_csv(p, dtype={"concept_name": str}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise MetricError(f"The {what} file '{p}' is empty; write the header annotation_id,concept_name and one row per "
                          "annotation.") from None
    except pd.errors.ParserError as e:
        detail = str(e).strip().splitlines()[0].removeprefix("Error tokenizing data. C error: ")
        raise MetricError(f"The {what} file '{p}' is not a well-formed CSV ({detail}); fix that line (an unclosed quote or "
                          "a stray comma) and score again.") from None
    except UnicodeDecodeError:
        raise MetricError(f"The {what} file '{p}' is not UTF-8 text; save it as a UTF-8 annotation_id,concept_name CSV.") from None


def score_files(solution_csv: str | Path, submission_csv: str | Path, taxonomy: Taxonomy) -> tuple[float, pd.DataFrame]:
    frames = [read_labels(what, path) for what, path in (("solution", solution_csv), ("submission", submission_csv))]
    return score_frames(frames[0], frames[1], taxonomy)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.decide.metric", description=__doc__.splitlines()[0])
    ap.add_argument("solution")
    ap.add_argument("submission")
    ap.add_argument("--per-row", help="write per-annotation distances with both concepts to this CSV")
    ap.add_argument("--taxonomy", default=str(DEFAULT_TAXONOMY), metavar="CSV",
                    help="the taxonomy table the distances come from: concept_name and the 7 rank columns, as data.taxonomy_csv "
                         "(default: configs/taxonomy/fathomnet2025.csv, the competition's 79 concepts)")
    args = ap.parse_args(argv)
    try:
        taxonomy = load_taxonomy_csv(args.taxonomy)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mean, per_row = score_files(args.solution, args.submission, taxonomy)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.per_row:
        per_row.to_csv(args.per_row, index=False)
    print(f"score {mean:.4f} over {len(per_row)} annotations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
