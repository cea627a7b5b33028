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
        priors = out["test_prior"] if "test_prior" in out else ["none"] * len(out)
        out[f"test_{method}"] = [score_labels(known[rows], test_labels[option_key(m, c, f, p)][method][rows], dist)
                                 for m, c, f, p in zip(out["model"], out["calibration"], contexts, priors)]
    return out, truth


REPORT_OPTIONS = 25  # report.md lists the options of least shifted distance (options.csv holds them all)


def submit_report(cfg: Config, members: list[dict], options: pd.DataFrame, sub: pd.DataFrame, fell_back: list[int],
                  truth: Truth | None = None, corr: np.ndarray | None = None, chosen=None,
                  frames: list[str] | None = None, extra: dict[str, list[str]] | None = None) -> str:
    """04's report.md: the members (origin, CV, calibration, ECE, weight), their error correlation, the submitted option
    and why (the rule, its margin), calibration, the test prior, what the frames hold, the best options and the
    predicted classes. `extra`: sections by title (calibration, test prior, constant answer, the rule's lines)."""
    s, extra = cfg.submit, extra or {}
    lines = [f"# Submission report: {cfg.exp}", "", "## Members", "",
             "Calibration: the submitted option's, fitted on the member's out-of-fold rows (test-like views under "
             "`submit.oof_tta`); ECE: expected calibration error of those rows (15 bins) before and after.", "",
             "| member | origin | CV distance | CV top-1 | test-like CV | calibration | ECE before | ECE after | fold T | weight |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in members:
        lines.append(f"| {r['member']} | {r['origin']} | {r['cv_distance']:.4f} | {r['cv_top1']:.3f} | {r['cv_distance_testlike']:.4f} | "
                     f"{r['calibrator']} | {r['ece_before']:.4f} | {r['ece_after']:.4f} | {r['fold_temperature']:.3f} | {r['weight']:.3f} |")
    if corr is not None and len(members) > 1:
        names = [r["member"] for r in members]
        lines += ["", "Correlation of the members' out-of-fold errors (argmax distance per row; lower means more "
                      "diverse; error_correlation.png):", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for n, row in zip(names, corr)]
    choice = getattr(chosen, "choice", None)
    post = []
    if s.logit_tau > 0:
        post.append(f"logit adjustment tau {s.logit_tau:g}")
    if s.backoff_rank:
        post.append(f"back-off to {s.backoff_rank} or above below a top probability of {s.backoff_tau:g}")
    lines += ["", "## Submitted", "", f"`submit.pick: {s.pick}`: " + (choice.describe() if choice is not None else "?")
              + (f"; blend temperature {chosen.blend_temperature:.3f}" if chosen is not None else "")
              + (f", {', '.join(post)}" if post else "") + ".",
              *[line + "  " for line in extra.get("rule", [])],
              f"Rows: {len(sub)}; answered by the train prior (no usable crop): {len(fell_back)}.", ""]
    for title in ("Calibration", "Test prior", "Constant answer"):
        if extra.get(title):
            lines += [f"## {title}", "", *extra[title], ""]
    lines += [*(["## Frame context", "", *frames, ""] if frames else []),
              "## Options (distance, lower is better)", "",
              "Out-of-fold (OOF) scores are over the train ROIs; fitted blends, calibrated rows, frame-context (`stack`) rows "
              "and prior-corrected rows are scored on the rows they were fitted on, so their OOF score is optimistic. The "
              "nested columns are honest: for each fold, calibrators, fitted weights, the blend temperature and frame "
              "context's b and eps are fitted on the other folds' out-of-fold rows and score that fold's; `shifted` weights "
              "each row to the test prior estimated without labels (README: Which option 04 submits), the rule's score. "
              f"The {REPORT_OPTIONS} options of least shifted distance (options.csv holds all {len(options)})." +
              (f" Test columns: {truth.note} (for this report only; it decides nothing)." if truth is not None else ""), ""]
    cols = [c for c in ("oof_argmax", "oof_min_risk", "nested_argmax", "nested_min_risk", "shifted_argmax", "shifted_min_risk",
                        "test_argmax", "test_min_risk") if c in options]
    shown = options
    if "shifted_min_risk" in options and options["shifted_min_risk"].notna().any():
        best = options[["shifted_argmax", "shifted_min_risk"]].min(axis=1)
        shown = options.loc[best.sort_values(kind="stable").index[:REPORT_OPTIONS]]
    lines += ["| model | calibration | temperature | weights | frame context | test prior | " + " | ".join(cols) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(cols)]
    for _, r in shown.iterrows():
        context = r.get("frame_context", "none")
        if context != "none" and isinstance(r.get("frame_params"), str) and r["frame_params"]:
            context += f" ({r['frame_params']})"
        lines.append(f"| {r['model']} | {r['calibration']} | {r['temperature']:.3f} | {r['weights']} | {context} | "
                     f"{r.get('test_prior', 'none')} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    lines += ["", "## Predicted class distribution (top 15)", "", "| concept | rows |", "|---|---|"]
    for name, n in sub["concept_name"].value_counts().head(15).items():
        lines.append(f"| {name} | {n} |")
    return "\n".join(lines) + "\n"


def write_submit_report(cfg: Config, folder: Path, models: Sequence, chosen, options, sub, test_ids: np.ndarray, taxonomy,
                        rois: pd.DataFrame | None = None, frame_note: str = "", train_counts: np.ndarray | None = None) -> None:
    """04's options.csv (with test columns where a truth is known), calibration.csv, reliability.png, report.md and, for
    two or more models, error_correlation.png.

    `models`: lib.decide.blending.ModelProbs in `submit.models` order (uncalibrated); `chosen`: the
    submitted lib.decide.blending.Blended; `options`: lib.decide.options.Options; `sub`:
    lib.decide.submission.SubmissionResult; `rois`: 00's rois.csv (what the frames hold); `frame_note`: frame
    context's note (nothing to use, or left out); `train_counts`: usable train ROIs per class (the constant answer).
    """
    from lib.core.io import atomic_path, atomic_write_text
    from lib.report.calibration import calibration_lines, calibration_table, constant_answer, prior_lines, reliability_panels
    from lib.report.plots import plot_matrix, plot_reliability

    dist = taxonomy.distance_matrix()
    cache = folder / "probs" / "blend_fit.npz"
    table, truth = score_options(cfg, options.table, options.test_labels, test_ids, taxonomy.names, dist)
    with atomic_path(folder / "options.csv") as tmp:
        table.to_csv(tmp, index=False)
    cal = calibration_table(cfg, models, chosen, dist, cache)
    with atomic_path(folder / "calibration.csv") as tmp:
        cal.to_csv(tmp, index=False)
    known = truth.labels(test_ids, taxonomy.names) if truth is not None else None
    plot_reliability(reliability_panels(cfg, models, chosen, dist, cache, known), folder / "reliability.png")
    members = member_rows(cfg, models, chosen, dist, cache)
    corr = error_correlation(models, dist, "argmax")
    if len(models) > 1:
        plot_matrix(corr, [m.name for m in models], folder / "error_correlation.png", "out-of-fold error correlation\n(argmax distance per row)")
    counts = train_counts if train_counts is not None else np.bincount(models[0].oof_labels, minlength=taxonomy.n_classes)
    c, oof_c, test_c = constant_answer(counts, dist, models[0].oof_labels, known)
    data = truth.data if truth is not None else "test"
    extra = {"rule": options.pick.lines() if options.pick is not None and cfg.submit.pick == "rule" else [],
             "Calibration": calibration_lines(cal, cfg.submit.fold_average) + ["", "Reliability diagrams: reliability.png."],
             "Test prior": prior_lines(chosen, taxonomy.names, counts),
             "Constant answer": [f"Answering `{taxonomy.names[c]}` everywhere (the train prior's least expected distance) scores "
                                 f"{oof_c:.4f} out of fold" + (f" and {test_c:.4f} on the {data}" if np.isfinite(test_c) else "")
                                 + "; every option above should beat it."]}
    report = submit_report(cfg, members, table, sub.frame, sub.fell_back, truth, corr, chosen,
                           frame_lines(cfg, rois, taxonomy, chosen, frame_note), extra)
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


def member_rows(cfg: Config, models: Sequence, chosen, dist: np.ndarray, cache: Path | None) -> list[dict]:
    """One row per member: origin, CV figures, the submitted calibration, ECE out of fold before and after, the fold
    average's temperature, its weight."""
    from lib.decide.blending import calibrate_models, calibrator_file
    from lib.decide.calibration import expected_calibration_error
    from lib.modelref import ModelRef
    from lib.pipeline.graph import stage_dir

    kind = chosen.choice.calibration if getattr(chosen, "choice", None) is not None else cfg.submit.calibrate
    rows = []
    for i, (m, c) in enumerate(zip(models, calibrate_models(cfg, models, dist, kind, calibrator_file(cache)))):
        ref = ModelRef.parse(m.name)
        origin = f"experiment {ref.exp} ({stage_dir(cfg, ref.key)})" if ref.exp else f"this experiment ({ref.stage})"
        rows.append({"member": m.name, "origin": origin, **{k: m.record.get(k, float("nan")) for k in
                                                            ("cv_distance", "cv_top1", "cv_distance_testlike")},
                     "calibrator": c.calibrator, "ece_before": expected_calibration_error(m.oof, m.oof_labels),
                     "ece_after": expected_calibration_error(c.oof, c.oof_labels), "fold_temperature": c.fold_temperature,
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


def option_lines(cfg: Config, result: dict, options: Path, data: str) -> list[str]:
    """The submitted option and, where the truth is known, each model and blend under it (its calibration, frame
    context and prior correction) on the test rows: argmax and min-risk."""
    if not result or not options.is_file():
        return []
    lines = [f"{'submitted':<20}: {result.get('option')}, {result.get('calibrate')} calibration, frame context "
             f"{result.get('frame_context')}, test prior {result.get('test_prior')}, {result.get('decode')} decoding"
             + (f" (pick: {result.get('pick')}; nested OOF {result['oof_distance']:.4f})" if isinstance(result.get("oof_distance"), float) else "")]
    opts = pd.read_csv(options, keep_default_na=False)
    if "test_min_risk" not in opts:
        return lines
    same = opts[(opts["calibration"] == result.get("calibrate")) & (opts.get("frame_context", "none") == result.get("frame_context"))
                & (opts.get("test_prior", "none") == result.get("test_prior"))]
    for _, r in same.iterrows():
        lines.append(f"{data}, {r['model']:<14}: {float(r['test_min_risk']):.4f} min-risk, {float(r['test_argmax']):.4f} argmax")
    return lines


def constant_score(cfg: Config, truth: Truth | None) -> tuple[str, float, float] | None:
    """The best constant answer (lib.report.calibration.constant_answer) from 00's artifacts; None before 00 ran."""
    rois, tax_json = cfg.out_dir / "00_prepare" / "rois.csv", cfg.out_dir / "00_prepare" / "taxonomy.json"
    if not rois.is_file() or not tax_json.is_file():
        return None
    from lib.data.taxonomy import load_taxonomy_json
    from lib.report.calibration import constant_answer

    tax = load_taxonomy_json(tax_json)
    r = pd.read_csv(rois, keep_default_na=False)
    train = r[(r["split"] == "train") & (r["ok"].astype(int) == 1)]
    labels = train["label"].astype(int).to_numpy()
    test = r[(r["split"] == "test") & (r["ok"].astype(int) == 1)]
    known = truth.labels(test["annotation_id"].astype(int).to_numpy(), tax.names) if truth is not None else None
    c, oof, t = constant_answer(np.bincount(labels, minlength=tax.n_classes), tax.distance_matrix(), labels, known)
    return tax.names[c], oof, t


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
    truth = find_truth(cfg)
    data = truth.data if truth is not None else "test"
    lines += option_lines(cfg, res("04_submit"), out / "04_submit" / "options.csv", data)
    sub, knn_sub = out / "04_submit" / "submission.csv", out / "knn" / "submission.csv"
    for label, path in ((f"{data} distance", sub), ("kNN " + data + " distance", knn_sub)):
        s = test_score(cfg, path)
        if s is not None:
            lines.append(f"{label:<20}: {s:.4f}")
    const = constant_score(cfg, truth)
    if const is not None:
        lines.append(f"{'constant answer':<20}: {const[1]:.4f} out of fold" + (f", {const[2]:.4f} on the {data}" if const[2] == const[2] else "")
                     + f" (`{const[0]}` everywhere: the score to beat)")
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
