"""04's options and the rule that picks the one submitted.

An option is a model or a blend of them, a calibration (none, temperature, vector, dirichlet), frame context (none,
stack), a test-prior correction (none, em, balanced) and a decoding (argmax, min_risk). Each is scored out of fold three
ways: in-sample (`oof_*`: fitted on the rows it scores, optimistic), nested (`nested_*`: for each fold k, every fitted
quantity comes from the other folds' rows and decodes fold k's) and nested under the test set's estimated class prior
(`shifted_*`).

Why `shifted`: out-of-fold rows carry the train prior, the test rows may not (FathomNet 2025's test holds about ten ROIs
per class, its train set follows the long tail). With `submit.pick_prior` totals (or estimated: EM's label-free estimate
on the test rows, shrunk toward the train prior) each out-of-fold row is weighted by pi_test[y] / pi_train[y]: the
held-out rows then stand for a set with the test's class mix, the prior corrections see those weights as they would see
such a set, and the mean distance is weighted alike. Under `train` (the default) the weights are 1 and `shifted` equals
`nested`.

The rule (`submit.pick: rule`): the option and decoding of least `shifted` distance; exact ties go to the simpler
option (the order of the table: no calibration first, single models before blends, no frame context, no prior
correction, argmax). It is printed with its margin over the runner-up and a warning when that margin lies within the
fold-to-fold spread (the standard deviation over folds of the two options' per-fold difference).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from lib.config import Config
from lib.data.taxonomy import Taxonomy
from lib.decide.blending import (
    BLENDS,
    PRIORS,
    Choice,
    ModelProbs,
    apply_decoding,
    blended,
    cache_file,
    calibrate_models,
    calibrator_file,
    derived,
    frame_params,
    option_key,
    temperature_file,
    test_totals,
    weights_for,
)
from lib.decide.frame_context import FrameRows, adjust
from lib.decide.prior import correct

DECODES = ("argmax", "min_risk")


@dataclass
class FoldScores:
    """Per fold: the plain and the prior-weighted sums of one candidate's distances, and their denominators."""

    plain: np.ndarray
    weighted: np.ndarray
    rows: np.ndarray
    weight: np.ndarray

    @staticmethod
    def empty(k: int) -> FoldScores:
        return FoldScores(np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k))

    def add(self, k: int, d: np.ndarray, w: np.ndarray) -> None:
        self.plain[k] += d.sum()
        self.weighted[k] += (w * d).sum()
        self.rows[k] += len(d)
        self.weight[k] += w.sum()

    @property
    def nested(self) -> float:
        return float(self.plain.sum() / max(self.rows.sum(), 1))

    @property
    def shifted(self) -> float:
        return float(self.weighted.sum() / max(self.weight.sum(), 1e-12))

    @property
    def per_fold(self) -> np.ndarray:
        return self.weighted / np.maximum(self.weight, 1e-12)


@dataclass(frozen=True)
class Pick:
    """The rule's choice, its score, the runner-up and the margin between them against the fold-to-fold spread."""

    choice: Choice
    score: float
    runner_up: Choice | None = None
    runner_up_score: float = float("nan")
    spread: float = float("nan")

    @property
    def margin(self) -> float:
        return self.runner_up_score - self.score

    @property
    def close(self) -> bool:
        """The margin lies within the fold-to-fold spread: another split of the folds could pick the runner-up."""
        return self.runner_up is not None and bool(np.isfinite(self.spread)) and self.margin <= self.spread

    def lines(self) -> list[str]:
        out = [f"picked by the nested out-of-fold rule: {self.choice.describe()} (weighted nested distance {self.score:.4f})"]
        if self.runner_up is not None:
            out.append(f"runner-up: {self.runner_up.describe()} ({self.runner_up_score:.4f}; margin {self.margin:.4f}, "
                       f"fold-to-fold spread {self.spread:.4f})")
        if self.close:
            out.append("warning: the margin lies within the fold-to-fold spread, so the out-of-fold evidence cannot tell "
                       "these two apart; more folds or more models would")
        return out


@dataclass(frozen=True)
class Options:
    """Every option scored out of fold, their test labels, the estimated test prior and the rule's pick."""

    table: pd.DataFrame
    test_labels: dict[str, dict[str, np.ndarray]]
    pick: Pick | None
    eval_prior: np.ndarray  # the test prior the `shifted` scores weight rows to
    oof_distance: float = float("nan")  # the submitted option's nested, prior-weighted distance
    scores: dict[str, FoldScores] = field(default_factory=dict)


def evaluation_prior(cfg: Config, models: Sequence[ModelProbs], tax: Taxonomy, train_prior: np.ndarray,
                     cache: Path | None = None) -> np.ndarray:
    """The class mix the `shifted` scores weight rows to (`submit.pick_prior`): the train prior (`train`: no weights),
    the user's totals or equal totals (`totals`), or EM's label-free estimate on the test rows of the uniform blend under
    temperature calibration, shrunk toward the train prior by n_test / C pseudo-rows per class (`estimated`): raw EM on
    a few rows per class zeroes many classes, which would make the weights noise."""
    s = cfg.submit
    if s.pick_prior == "train":
        return np.asarray(train_prior, dtype=np.float64)
    if s.pick_prior == "totals":
        totals = test_totals(s.test_totals, tax)
        t = np.ones(tax.n_classes) if totals is None else totals
        return t / t.sum()
    dist = tax.distance_matrix()
    ms = calibrate_models(cfg, models, dist, "temperature", calibrator_file(cache))
    _, test, _ = blended(cfg, ms, np.full(len(ms), 1 / len(ms)), dist, "temperature", temperature_file(cache))
    est = correct("em", test, train_prior).prior
    n, c = len(test), len(est)
    pseudo = max(n / c, 1.0) * c  # pseudo-rows in all, spread as the train prior
    return (est * n + pseudo * np.asarray(train_prior, dtype=np.float64)) / (n + pseudo)


def row_weights(labels: np.ndarray, eval_prior: np.ndarray, train_prior: np.ndarray) -> np.ndarray:
    """pi_eval[y] / pi_train[y] per row, scaled to mean 1: the out-of-fold rows as a sample of the test's class mix."""
    ratio = np.where(train_prior > 0, eval_prior / np.maximum(train_prior, 1e-12), 0.0)
    w = ratio[labels]
    return w / max(float(w.mean()), 1e-12)


def _variants(cfg: Config, fitted: np.ndarray, sib_fit: Any, ms: Sequence[ModelProbs], w: np.ndarray, t: float,
              frames: FrameRows | None, cache: Path | None, rows: Sequence[tuple[np.ndarray, Any, np.ndarray | None]]
              ) -> list[tuple[str, list[np.ndarray], str]]:
    """(frame context, each of `rows` (probabilities, their siblings, the placeholders' prior) under it, described
    parameters): as they are, and, when frames are given, with frame context fitted once on `fitted` and applied to each."""
    out = [("none", [p for p, _, _ in rows], "")]
    if frames is not None:
        params = frame_params(cfg, ms, w, t, fitted, sib_fit, frames, cache)
        out.append(("stack", [adjust(p, sib, params, prior) for p, sib, prior in rows], params.describe()))
    return out


def option_list(cfg: Config, ms: Sequence[ModelProbs], calibration: str, dist: np.ndarray, cache: Path | None,
                fold: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Every single model and, for two or more models, every blend method's weights (fitted on these models' rows)."""
    out: list[tuple[str, np.ndarray]] = [(m.name, np.eye(len(ms))[i]) for i, m in enumerate(ms)]
    if len(ms) > 1:
        for method in BLENDS:
            out.append((f"blend {method}", weights_for(method, cfg, ms, dist, cache_file(cache, method, calibration, fold))))
    return out


def nested_scores(cfg: Config, models: Sequence[ModelProbs], tax: Taxonomy, train_prior: np.ndarray, weights: np.ndarray,
                  cache: Path | None = None, frames: FrameRows | None = None) -> dict[str, FoldScores]:
    """Per candidate (`option_key` + ' ' + decoding), the per-fold distances of a nested fit: for each fold k, calibrators,
    blend weights, the blend temperature and frame context's parameters come from the other folds' out-of-fold rows; the
    prior correction sees fold k's rows with their weights; fold k's rows are decoded and scored. Folds grouped by frame
    keep fold k's siblings in fold k. Empty when the fold of each row is unknown."""
    dist = tax.distance_matrix()
    folds = models[0].oof_fold
    if folds is None or len(np.unique(folds)) < 2:
        return {}
    labels = models[0].oof_labels
    totals = test_totals(cfg.submit.test_totals, tax)
    out: dict[str, FoldScores] = {}
    ks = np.unique(folds)
    for j, k in enumerate(ks):
        tr, te = folds != k, folds == k
        part = [derived(m, f"fold {k} held out", oof_ids=m.oof_ids[tr], oof_labels=m.oof_labels[tr], oof=m.oof[tr],
                        test=m.oof[te], fold_test=None, stored_oof=None) for m in models]
        sib_tr, sib_te = (frames.oof.subset(tr), frames.oof.subset(te)) if frames is not None else (None, None)
        truth = dist[labels[te]]
        for calibration in cfg.submit.calibrations:
            ms = calibrate_models(cfg, part, dist, calibration, calibrator_file(cache))
            for name, w in option_list(cfg, ms, calibration, dist, cache, int(k)):
                fitted, held, t = blended(cfg, ms, w, dist, calibration, temperature_file(cache))
                for context, (probs,), _ in _variants(cfg, fitted, sib_tr, ms, w, t, frames, cache, [(held, sib_te, None)]):
                    for prior in PRIORS:
                        p = probs if prior == "none" else correct(prior, probs, train_prior, totals, weights[te]).probs
                        for method in DECODES:
                            d = truth[np.arange(te.sum()), apply_decoding(cfg, p, tax, train_prior, dist, method)]
                            key = f"{option_key(name, calibration, context, prior)} {method}"
                            out.setdefault(key, FoldScores.empty(len(ks))).add(j, d, weights[te])
    return out


def compare(cfg: Config, models: Sequence[ModelProbs], tax: Taxonomy, train_prior: np.ndarray, cache: Path | None = None,
            frames: FrameRows | None = None) -> Options:
    """Every option scored out of fold (in-sample, nested, nested under the estimated test prior), its test labels (which
    a report may score where the truth is known: lib.report; nothing here reads it) and the rule's pick."""
    from lib.decide.metric import score_labels

    dist = tax.distance_matrix()
    labels = models[0].oof_labels
    eval_prior = evaluation_prior(cfg, models, tax, train_prior, cache)
    weights = row_weights(labels, eval_prior, train_prior)
    nested = nested_scores(cfg, models, tax, train_prior, weights, cache, frames)
    totals = test_totals(cfg.submit.test_totals, tax)
    rows: list[dict[str, Any]] = []
    test_labels: dict[str, dict[str, np.ndarray]] = {}
    for calibration in cfg.submit.calibrations:
        ms = calibrate_models(cfg, models, dist, calibration, calibrator_file(cache))
        for name, w in option_list(cfg, ms, calibration, dist, cache):
            oof, test, t = blended(cfg, ms, w, dist, calibration, temperature_file(cache))
            shown = ms[int(np.flatnonzero(w)[0])].temperature if np.count_nonzero(w) == 1 else t
            base = {"model": name, "calibration": calibration, "temperature": round(shown, 4),
                    "weights": " ".join(f"{x:.2f}" for x in w)}
            variants = _variants(cfg, oof, frames.oof if frames else None, ms, w, t, frames, cache,
                                 [(oof, frames.oof if frames else None, None),
                                  (test, frames.test if frames else None, frames.prior if frames else None)])
            for context, (o, te), described in variants:
                for prior in PRIORS:
                    o2 = o if prior == "none" else correct(prior, o, train_prior, totals).probs
                    te2 = te if prior == "none" else correct(prior, te, train_prior, totals).probs
                    key = option_key(name, calibration, context, prior)
                    row: dict[str, Any] = {**base, "frame_context": context, "frame_params": described, "test_prior": prior}
                    test_labels[key] = {}
                    for method in DECODES:
                        row[f"oof_{method}"] = score_labels(labels, apply_decoding(cfg, o2, tax, train_prior, dist, method), dist)
                        test_labels[key][method] = apply_decoding(cfg, te2, tax, train_prior, dist, method)
                    for method in DECODES:
                        got = nested.get(f"{key} {method}")
                        row[f"nested_{method}"] = got.nested if got else float("nan")
                        row[f"shifted_{method}"] = got.shifted if got else float("nan")
                    rows.append(row)
    table = pd.DataFrame(rows)
    return Options(table, test_labels, pick_option(table, nested), eval_prior, scores=nested)


def candidates(table: pd.DataFrame) -> list[tuple[Choice, float]]:
    """Every (option, decoding) with its `shifted` score, in the table's order (the simpler first)."""
    out = []
    for _, r in table.iterrows():
        for method in DECODES:
            out.append((Choice(r["model"], r["calibration"], r["frame_context"], r["test_prior"], method),
                        float(r[f"shifted_{method}"])))
    return out


def pick_option(table: pd.DataFrame, scores: dict[str, FoldScores]) -> Pick | None:
    """The rule: least `shifted` distance, exact ties (to 1e-12) to the earlier (simpler) option; None without folds."""
    ranked = [(c, s) for c, s in candidates(table) if np.isfinite(s)]
    if not ranked:
        return None
    order = sorted(range(len(ranked)), key=lambda i: (round(ranked[i][1], 12), i))
    best, score = ranked[order[0]]
    if len(order) == 1:
        return Pick(best, score)
    second, second_score = ranked[order[1]]
    a, b = scores[f"{best.key} {best.decode}"].per_fold, scores[f"{second.key} {second.decode}"].per_fold
    spread = float(np.std(b - a, ddof=1)) if len(a) > 1 else float("nan")
    return Pick(best, score, second, second_score, spread)


def chosen(cfg: Config, models: Sequence[ModelProbs], options: Options) -> Choice:
    """The option 04 submits: the rule's pick under `submit.pick: rule` (when folds exist), else the submit.* settings."""
    if cfg.submit.pick == "rule" and options.pick is not None:
        return options.pick.choice
    return Choice.from_settings(cfg, models)


def submitted_score(options: Options, choice: Choice) -> float:
    """The chosen option's nested, prior-weighted out-of-fold distance (nan without folds)."""
    got = options.scores.get(f"{choice.key} {choice.decode}")
    return got.shifted if got else float("nan")
