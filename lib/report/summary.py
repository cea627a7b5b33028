"""Human-readable reports: 04's report.md and the end-of-run summary of `make demo`.

    python -m lib.report --config configs/demo.yaml

prints the CV of phase 1 and 2, the kNN baseline's CV and, where the data folder holds a
`solution.csv` (the demo does; read by lib.report.truth only, for reports), the test score of each
submission and the precision of the pseudo-labels, saying which file they were scored against.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lib.config import Config, load_config
from lib.core.errors import UserError
from lib.decide.blending import option_key
from lib.decide.metric import score_labels
from lib.pipeline.records import read_record
from lib.report.truth import Truth, find_truth


def score_options(cfg: Config, options: pd.DataFrame, test_labels: dict[str, dict[str, np.ndarray]], test_ids: np.ndarray,
                  names: Sequence[str], dist: np.ndarray) -> tuple[pd.DataFrame, Truth | None]:
    """04's options with `test_<decoding>` columns where `solution.csv` knows some test rows (else unchanged)."""
    truth = find_truth(cfg)
    known = truth.labels(test_ids, names) if truth is not None else np.zeros(0, dtype=np.int64)
    if truth is None or not (known >= 0).any():
        return options, None
    out = options.copy()
    rows = known >= 0
    for method in ("argmax", "min_risk"):
        contexts = out["frame_context"] if "frame_context" in out else ["none"] * len(out)
        out[f"test_{method}"] = [score_labels(known[rows], test_labels[option_key(m, c, f)][method][rows], dist)
                                 for m, c, f in zip(out["model"], out["calibration"], contexts)]
    return out, truth


def submit_report(cfg: Config, members: list[dict], options: pd.DataFrame, sub: pd.DataFrame, fell_back: list[int],
                  truth: Truth | None = None, corr: np.ndarray | None = None, blend_temperature: float = 1.0,
                  frames: list[str] | None = None) -> str:
    """04's report.md: the members (origin, CV, temperature, ECE, weight), their error correlation, what the frames hold
    (`frames`: lines of lib.report.siblings and frame context's note), every blend, calibration, frame context and
    decoding option, the predicted classes."""
    s = cfg.submit
    lines = [f"# Submission report: {cfg.exp}", "", "## Members", "",
             "Temperature: fitted on the member's out-of-fold rows to the `" + s.calibrate_objective + "` objective (applied only "
             "under `submit.calibrate: temperature`); ECE: expected calibration error of its out-of-fold probabilities (15 bins).", "",
             "| member | origin | CV distance | CV top-1 | test-like CV | temperature | ECE before | ECE after | weight |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in members:
        lines.append(f"| {r['member']} | {r['origin']} | {r['cv_distance']:.4f} | {r['cv_top1']:.3f} | {r['cv_distance_testlike']:.4f} | "
                     f"{r['temperature']:.3f} | {r['ece_before']:.4f} | {r['ece_after']:.4f} | {r['weight']:.3f} |")
    if corr is not None and len(members) > 1:
        names = [r["member"] for r in members]
        lines += ["", f"Correlation of the members' out-of-fold errors (`{s.decode}` distance per row; lower means more "
                      "diverse; error_correlation.png):", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for n, row in zip(names, corr)]
    post = []
    if s.calibrate != "none":
        post.append(f"{s.calibrate} calibration ({s.calibrate_objective}; blend temperature {blend_temperature:.3f})")
    if s.logit_tau > 0:
        post.append(f"logit adjustment tau {s.logit_tau:g}")
    if s.frame_context != "none":
        post.append(f"frame context `{s.frame_context}`")
    if s.backoff_rank:
        post.append(f"back-off to {s.backoff_rank} or above below a top probability of {s.backoff_tau:g}")
    lines += ["", f"Submitted: `{s.blend}` blend, `{s.decode}` decoding" + (f", {', '.join(post)}" if post else "") + ".",
              f"Rows: {len(sub)}; answered by the train prior (no usable crop): {len(fell_back)}.", "",
              *(["## Frame context", "", *frames, ""] if frames else []),
              "## Options (distance, lower is better)", "",
              "Out-of-fold (OOF) scores are over the train ROIs; `blend fit`, `blend greedy`, every calibrated row and every "
              "frame-context (`stack`) row are scored on the rows they were fitted on, so their OOF score is optimistic. The "
              "nested columns are honest: for each fold, temperatures, fitted weights, the blend temperature and frame "
              "context's b and eps are fitted on the other folds' out-of-fold rows and score that fold's (unfitted options "
              "equal their OOF score)." +
              (f" Test columns: {truth.note} (for this report only; it decides nothing)." if truth is not None else ""), ""]
    cols = [c for c in ("oof_argmax", "oof_min_risk", "nested_argmax", "nested_min_risk", "test_argmax", "test_min_risk")
            if c in options]
    lines += ["| model | calibration | temperature | weights | frame context | " + " | ".join(cols) + " |",
              "|---|---|---|---|---|" + "---|" * len(cols)]
    for _, r in options.iterrows():
        context = r.get("frame_context", "none")
        if context != "none" and isinstance(r.get("frame_params"), str) and r["frame_params"]:
            context += f" ({r['frame_params']})"
        lines.append(f"| {r['model']} | {r['calibration']} | {r['temperature']:.3f} | {r['weights']} | {context} | "
                     + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    lines += ["", "## Predicted class distribution (top 15)", "", "| concept | rows |", "|---|---|"]
    for name, n in sub["concept_name"].value_counts().head(15).items():
        lines.append(f"| {name} | {n} |")
    return "\n".join(lines) + "\n"


def write_submit_report(cfg: Config, folder: Path, models: Sequence, chosen, options, sub, test_ids: np.ndarray, taxonomy,
                        rois: pd.DataFrame | None = None, frame_note: str = "") -> None:
    """04's options.csv (with test columns where a truth is known), report.md and, for two or more models, error_correlation.png.

    `models`: lib.decide.blending.ModelProbs in `submit.models` order (uncalibrated); `chosen`: the
    submitted lib.decide.blending.Blended; `options`: lib.decide.blending.Options; `sub`:
    lib.decide.submission.SubmissionResult; `rois`: 00's rois.csv (what the frames hold); `frame_note`: frame
    context's note (nothing to use, or left out).
    """
    from lib.core.io import atomic_path, atomic_write_text
    from lib.report.plots import plot_matrix

    dist = taxonomy.distance_matrix()
    table, truth = score_options(cfg, options.table, options.test_labels, test_ids, taxonomy.names, dist)
    with atomic_path(folder / "options.csv") as tmp:
        table.to_csv(tmp, index=False)
    members = member_rows(cfg, models, chosen, table)
    corr = error_correlation(models, dist, cfg.submit.decode)
    if len(models) > 1:
        plot_matrix(corr, [m.name for m in models], folder / "error_correlation.png",
                    f"out-of-fold error correlation\n({cfg.submit.decode} distance per row)")
    report = submit_report(cfg, members, table, sub.frame, sub.fell_back, truth, corr, chosen.blend_temperature,
                           frame_lines(cfg, rois, taxonomy, chosen, frame_note))
    atomic_write_text(folder / "report.md", report)


def frame_lines(cfg: Config, rois: pd.DataFrame | None, taxonomy, chosen=None, note: str = "") -> list[str]:
    """What the frames hold (sibling shares, the label-only oracle), frame context's note and the submitted parameters."""
    from lib.report.siblings import frame_facts

    lines = frame_facts(rois, taxonomy.distance_matrix()).lines() if rois is not None else []
    if note:
        lines.append(note[0].upper() + note[1:] + ".")
    frame = getattr(chosen, "frame", None)
    if frame is not None:
        lines.append(f"Submitted with `submit.frame_context: {cfg.submit.frame_context}`: {frame.describe()} (fitted on the "
                     "blend's out-of-fold rows; log q = log p + b log(eps + siblings' mean)).")
    return [line + "  " for line in lines[:-1]] + lines[-1:]  # markdown line breaks


def member_rows(cfg: Config, models: Sequence, chosen, table: pd.DataFrame) -> list[dict]:
    """One row per member: origin, CV figures, its calibration temperature, ECE out of fold before and after, its weight."""
    from lib.decide.calibration import apply_temperature, expected_calibration_error
    from lib.modelref import ModelRef
    from lib.pipeline.graph import stage_dir

    rows = []
    for i, m in enumerate(models):
        ref = ModelRef.parse(m.name)
        fitted = table[(table["model"] == m.name) & (table["calibration"] == "temperature")]["temperature"]
        t = float(fitted.iloc[0]) if len(fitted) else 1.0
        origin = f"experiment {ref.exp} ({stage_dir(cfg, ref.key)})" if ref.exp else f"this experiment ({ref.stage})"
        rows.append({"member": m.name, "origin": origin, **{k: m.record.get(k, float("nan")) for k in
                                                            ("cv_distance", "cv_top1", "cv_distance_testlike")},
                     "temperature": t, "ece_before": expected_calibration_error(m.oof, m.oof_labels),
                     "ece_after": expected_calibration_error(apply_temperature(m.oof, t), m.oof_labels),
                     "weight": float(chosen.weights[i])})
    return rows


def error_correlation(models: Sequence, dist: np.ndarray, method: str) -> np.ndarray:
    """Pairwise Pearson correlation of the members' out-of-fold errors (each row's distance under `method`); diversity
    shows as low values. A member with constant errors correlates 0 with the others."""
    from lib.decide.decode import decode

    errs = np.stack([dist[m.oof_labels, decode(m.oof, dist, method)] for m in models]).astype(np.float64)
    errs -= errs.mean(1, keepdims=True)
    norm = np.linalg.norm(errs, axis=1)
    safe = np.where(norm > 0, norm, 1.0)
    corr = (errs @ errs.T) / np.outer(safe, safe)
    np.fill_diagonal(corr, 1.0)
    return corr


def test_score(cfg: Config, submission: Path) -> float | None:
    """Score a submission against the known truth (`<data.root>/solution.csv`) when both exist."""
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.metric import score_frames

    truth = find_truth(cfg)
    if truth is None or not submission.is_file():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean, _ = score_frames(truth.frame(), pd.read_csv(submission), load_taxonomy_csv(cfg.data.paths()["taxonomy_csv"]))
    return mean


def pseudo_precision(cfg: Config, folder: Path) -> dict | None:
    """Precision of the pseudo-labels in `folder/pseudo_labels.csv` (overall, by source) against the truth; None if unknown."""
    from lib.data.taxonomy import load_taxonomy_json
    from lib.decide.pseudo import summarize

    path, tax_path = folder / "pseudo_labels.csv", cfg.out_dir / "00_prepare" / "taxonomy.json"
    truth = find_truth(cfg)
    if truth is None or not path.is_file() or not tax_path.is_file():
        return None
    pseudo = pd.read_csv(path)
    return summarize(pseudo, len(pseudo), truth.concepts, load_taxonomy_json(tax_path).names).get("precision")


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
    pseudo = res("02_pseudo")
    if "pseudo_labels" in pseudo:
        prec = (pseudo_precision(cfg, out / "02_pseudo") or {}).get("by_source", {})
        parts = [f"{k} {v}" + (f" ({prec[k]:.0%} right)" if prec.get(k) is not None else "") for k, v in pseudo.get("by_source", {}).items()]
        lines.append(f"pseudo-labels       : {pseudo['pseudo_labels']} of {pseudo['test_rois']} test ROIs; {', '.join(parts)}")
    rois, tax_json = out / "00_prepare" / "rois.csv", out / "00_prepare" / "taxonomy.json"
    if rois.is_file() and tax_json.is_file():
        from lib.data.taxonomy import load_taxonomy_json
        from lib.report.siblings import frame_facts

        facts = frame_facts(pd.read_csv(rois, keep_default_na=False), load_taxonomy_json(tax_json).distance_matrix())
        t = facts.train
        lines.append(f"frames              : {t.with_siblings:.1%} of train ROIs and {facts.test_share:.1%} of test ROIs have siblings"
                     + (f"; the label-only sibling oracle scores {t.majority_distance:.4f} ({t.majority_right:.1%} right) on the "
                        f"{t.oracle_rows} train ROIs with siblings" if t.oracle_rows else ""))
    options = out / "04_submit" / "options.csv"
    if options.is_file():
        opts = pd.read_csv(options)
        if "test_min_risk" in opts:
            for _, r in opts.iterrows():
                name = r["model"] + (" +T" if r.get("calibration", "none") != "none" else "")  # +T: temperature-calibrated
                name += " +F" if r.get("frame_context", "none") != "none" else ""  # +F: frame context (stack)
                lines.append(f"demo test, {name:<16}: {r['test_min_risk']:.4f} min-risk, {r['test_argmax']:.4f} argmax")
    sub, knn_sub = out / "04_submit" / "submission.csv", out / "knn" / "submission.csv"
    for label, path in (("demo test distance  ", sub), ("kNN test distance   ", knn_sub)):
        s = test_score(cfg, path)
        if s is not None:
            lines.append(f"{label}: {s:.4f}")
    truth = find_truth(cfg)
    if truth is not None:
        lines.append(f"test scores         : {truth.note} (for reports only: it decides nothing)")
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
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
