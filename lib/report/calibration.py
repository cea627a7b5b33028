"""04's calibration report: each model's and the blend's calibration error out of fold on one view and on test-like
views, the fold average's effect on the test rows' confidence, reliability diagrams, the test-prior correction's
estimate and counts, and the best constant answer.

Everything here reads what 04 computed (calibrators come back from probs/calibrators.json); the test rows' labels are
read only through lib.report.truth, for the figures a reader may compare, never for a decision.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lib.config import Config
from lib.decide.blending import Blended, ModelProbs, blend, calibrate_models, calibrator_file
from lib.decide.calibration import expected_calibration_error, nll
from lib.decide.decode import prior_answer


def calibration_table(cfg: Config, models: Sequence[ModelProbs], chosen: Blended, dist: np.ndarray, cache: Path | None
                      ) -> pd.DataFrame:
    """Per model (and the submitted blend's weights when two or more), per calibrator: ECE and NLL of the out-of-fold
    rows on one view (as the training stage stored them) and on test-like views (TTA, what calibrators fit), each
    calibrator fitted on those very rows (in-sample; the options' nested columns are the honest comparison), and the
    mean top probability of its test rows after the fold average (no label)."""
    rows = []
    for kind in cfg.submit.calibrations:
        ms = calibrate_models(cfg, models, dist, kind, calibrator_file(cache))
        named = [(m.name, m, raw) for m, raw in zip(ms, models)]
        for name, m, raw in named:
            one_view = raw.stored_oof if raw.stored_oof is not None else raw.oof
            rows.append({"model": name, "calibration": kind, "ece_one_view_raw": expected_calibration_error(one_view, raw.oof_labels),
                         "ece_test_like": expected_calibration_error(m.oof, m.oof_labels), "nll_test_like": nll(m.oof, m.oof_labels),
                         "oof_top1": float((m.oof.argmax(1) == m.oof_labels).mean()), "oof_confidence": float(m.oof.max(1).mean()),
                         "test_confidence": float(m.test.max(1).mean()), "fold_temperature": m.fold_temperature})
        if len(ms) > 1:
            w = chosen.weights
            oof, test = blend([m.oof for m in ms], w), blend([m.test for m in ms], w)
            rows.append({"model": "blend (submitted weights)", "calibration": kind, "ece_one_view_raw": float("nan"),
                         "ece_test_like": expected_calibration_error(oof, models[0].oof_labels), "nll_test_like": nll(oof, models[0].oof_labels),
                         "oof_top1": float((oof.argmax(1) == models[0].oof_labels).mean()), "oof_confidence": float(oof.max(1).mean()),
                         "test_confidence": float(test.max(1).mean()), "fold_temperature": float("nan")})
    return pd.DataFrame(rows)


def calibration_lines(table: pd.DataFrame, fold_average: str) -> list[str]:
    """report.md's calibration section."""
    lines = ["ECE: top-label expected calibration error (15 bins); one view: the out-of-fold rows as the training stage stored "
             "them, uncalibrated; test-like: predicted again with the model's TTA views (`submit.oof_tta`), after the calibrator "
             "(fitted on those rows: in-sample). Confidence: mean top probability; on the test rows after the fold models' "
             f"average (`submit.fold_average: {fold_average}`, no label read): an average of fold models that each is "
             "calibrated claims less than it is right, the matched average restores the members' own confidence.", "",
             "| model | calibration | ECE one view | ECE test-like | NLL test-like | OOF top-1 | OOF confidence | test confidence | fold T |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['model']} | {r['calibration']} | {r['ece_one_view_raw']:.4f} | {r['ece_test_like']:.4f} | "
                     f"{r['nll_test_like']:.4f} | {r['oof_top1']:.3f} | {r['oof_confidence']:.3f} | {r['test_confidence']:.3f} | "
                     f"{r['fold_temperature']:.3f} |")
    return lines


def reliability_panels(cfg: Config, models: Sequence[ModelProbs], chosen: Blended, dist: np.ndarray, cache: Path | None,
                       test_truth: np.ndarray | None = None) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """The reliability diagrams' series: out of fold on one view, out of fold on test-like views (raw and under the
    submitted calibration, and the submitted option), and the test rows where a truth is known (report only)."""
    kind = chosen.choice.calibration if chosen.choice is not None else cfg.submit.calibrate
    ms = calibrate_models(cfg, models, dist, kind, calibrator_file(cache))
    labels = models[0].oof_labels
    panels: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {
        "out of fold, one view": [(m.name, m.stored_oof if m.stored_oof is not None else m.oof, labels) for m in models],
        "out of fold, test-like views": [(f"{m.name} raw", m.oof, labels) for m in models]
        + [(f"{m.name} {kind}", m.oof, labels) for m in ms]}
    if chosen.oof is not None:
        panels["out of fold, test-like views"].append(("submitted option", chosen.oof, labels))
    if test_truth is not None and chosen.probs is not None and (test_truth >= 0).any():
        known = test_truth >= 0
        panels["test (report only)"] = [("submitted option", chosen.probs[known], test_truth[known])]
    return panels


def prior_lines(chosen: Blended, names: Sequence[str], train_counts: np.ndarray, top: int = 12) -> list[str]:
    """The test-prior correction: the estimated prior (em) or the target totals (balanced) of the classes it moves most,
    with the predicted counts before and after."""
    moved = chosen.prior
    if moved is None:
        return []
    train_prior = train_counts / max(train_counts.sum(), 1)
    before, after = np.asarray(moved.counts_before), np.asarray(moved.counts_after)
    order = np.argsort(-np.abs(after - before), kind="stable")[:top]
    kind = chosen.choice.test_prior if chosen.choice is not None else "?"
    lines = [f"Test prior `{kind}`: " + ("the class prior EM estimates on the test rows (Saerens et al. 2002)" if kind == "em" else
                                         "class totals scaled to the target") + "; the classes whose predicted count moved most:", "",
             "| concept | train prior | test prior | predicted before | predicted after |", "|---|---|---|---|---|"]
    for c in order:
        lines.append(f"| {names[c]} | {train_prior[c]:.4f} | {moved.prior[c]:.4f} | {int(before[c])} | {int(after[c])} |")
    return lines


def constant_answer(train_counts: np.ndarray, dist: np.ndarray, oof_labels: np.ndarray, test_truth: np.ndarray | None
                    ) -> tuple[int, float, float]:
    """The best constant answer a model must beat: the concept of least expected distance under the train prior, with
    its mean distance out of fold and on the known test rows (nan when none is known)."""
    c = prior_answer(train_counts, dist)
    oof = float(dist[oof_labels, c].mean())
    test = float(dist[test_truth[test_truth >= 0], c].mean()) if test_truth is not None and (test_truth >= 0).any() else float("nan")
    return c, oof, test
