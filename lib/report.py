"""Human-readable reports: 04's report.md and the end-of-run summary of `make demo`.

    python -m lib.report --config configs/demo.yaml

prints the CV of phase 1 and 2, the kNN baseline's CV and, where the data folder holds a
`solution.csv` (the demo does; the stages never read it), the test score of each submission.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from lib.config import Config, ConfigError, load_config
from lib.stages import read_record


def submit_report(cfg: Config, cv: dict[str, dict], sub: pd.DataFrame, fell_back: list[int]) -> str:
    lines = [f"# Submission report: {cfg.exp}", "", "| model | CV distance | CV top-1 | weight |", "|---|---|---|---|"]
    for m, r in cv.items():
        lines.append(f"| {m} | {r.get('cv_distance', float('nan')):.4f} | {r.get('cv_top1', float('nan')):.3f} | {1 / len(cv):.3f} |")
    lines += ["", f"Decoding: `{cfg.submit.decode}`. Rows: {len(sub)}; answered by the train prior (no usable crop): {len(fell_back)}.", "",
              "## Predicted class distribution (top 15)", "", "| concept | rows |", "|---|---|"]
    for name, n in sub["concept_name"].value_counts().head(15).items():
        lines.append(f"| {name} | {n} |")
    return "\n".join(lines) + "\n"


def test_score(cfg: Config, submission: Path) -> float | None:
    """Score a submission against `<data.root>/solution.csv` when that file exists (demo only)."""
    from lib.metric import score_files
    from lib.taxonomy import load_taxonomy_csv

    solution = Path(cfg.data.root) / "solution.csv"
    if not solution.is_file() or not submission.is_file():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean, _ = score_files(solution, submission, load_taxonomy_csv(cfg.data.taxonomy_csv))
    return mean


def summary(cfg: Config) -> list[str]:
    out = cfg.out_dir

    def res(stage: str) -> dict:
        return (read_record(out / stage / "record.json") or {}).get("result", {})

    def fmt(r: dict) -> str:
        if "cv_distance" not in r:
            return "not run"
        tl = f"; test-like view {r['cv_distance_testlike']:.4f}" if "cv_distance_testlike" in r else ""
        return f"{r['cv_distance']:.4f} (top-1 {r['cv_top1']:.3f}{tl})"

    lines = [
        f"phase 1 CV distance : {fmt(res('01_train'))}",
        f"phase 2 CV distance : {fmt(res('03_retrain'))}",
        f"kNN baseline CV     : {fmt(res('knn'))}",
    ]
    sub, knn_sub = out / "04_submit" / "submission.csv", out / "knn" / "submission.csv"
    for label, path in (("demo test distance  ", sub), ("kNN test distance   ", knn_sub)):
        s = test_score(cfg, path)
        if s is not None:
            lines.append(f"{label}: {s:.4f}")
    lines.append(f"submission          : {sub if sub.is_file() else 'not written'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.report", description="Print the run's scores.")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--force", action="store_true", help="accepted (and ignored) so `make stages ARGS=...` passes through")
    ap.add_argument("--dry-run", action="store_true", help="accepted (and ignored), as --force")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
