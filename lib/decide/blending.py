"""04's decisions on cached probabilities: each model's out-of-fold and test probabilities ->
calibration -> blend weights -> frame context -> logit adjustment -> decoding, and the comparison of the options for report.md.

Calibration (`submit.calibrate: temperature`) scales each model by a temperature fitted on its
out-of-fold rows only (never the test rows), and the blend by one more; min-risk decoding trusts
the probabilities, so the `distance` objective fits the temperature that min-risk decoding needs.

Frame context (`submit.frame_context: stack`, lib.decide.frame_context) adjusts the blend's probabilities by the
other ROIs of each frame, with two parameters fitted on the blend's out-of-fold rows (a nested fold's: the other
folds' rows) and cached by content in probs/frame_context.json; the options score every option without and with it.

Nothing here loads a model: once `probs/<model>.npz` exist, changing the blend or the decoding
costs seconds (the point of caching per model).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from lib.config import Config
from lib.core.errors import StageError
from lib.core.io import content_key
from lib.data.taxonomy import Taxonomy
from lib.decide.decode import backoff_decode, decode, logit_adjust
from lib.decide.frame_context import FrameParams, FrameRows, Siblings, adjust
from lib.decide.metric import score_labels
from lib.decide.weights import blend, blend_weights


@dataclass
class ModelProbs:
    """One model (a phase's fold ensemble): out-of-fold rows over train, test rows over the test ROIs."""

    name: str
    cv: float  # its record's CV distance
    oof_ids: np.ndarray
    oof_labels: np.ndarray
    oof: np.ndarray  # (n_train, C)
    test: np.ndarray  # (n_test, C), mean over its folds
    record: dict = field(default_factory=dict)  # its training record's result (CV figures for the report)
    temperature: float = 1.0  # the calibration temperature its oof and test were scaled by (1: none)
    oof_fold: np.ndarray | None = None  # the fold each out-of-fold row was held out of (for the nested out-of-fold scores)
    digest: str = ""  # a content key of its out-of-fold rows (labels, probabilities), filled by `digest_of`; derived models carry theirs


def check_aligned(models: Sequence[ModelProbs]) -> None:
    for m in models[1:]:
        if not np.array_equal(m.oof_ids, models[0].oof_ids):
            raise StageError(f"The out-of-fold rows of {m.name} and {models[0].name} differ; rerun both with the same folds.")


def apply_decoding(cfg: Config, probs: np.ndarray, tax: Taxonomy, prior: np.ndarray, dist: np.ndarray,
                   decode_method: str | None = None) -> np.ndarray:
    """Labels from blended probabilities: optional logit adjustment, then argmax / min-risk, with the optional back-off."""
    s = cfg.submit
    method = decode_method or s.decode
    if s.logit_tau > 0:
        probs = logit_adjust(probs, prior, s.logit_tau)
    if s.backoff_rank:
        return backoff_decode(probs, dist, tax, s.backoff_rank, s.backoff_tau, method=method)
    return decode(probs, dist, method)


CALIBRATIONS = ("none", "temperature")


def digest_of(m: ModelProbs) -> str:
    """The model's content key (its out-of-fold labels and probabilities), hashed once and kept on it: the keys of
    everything fitted from it derive from this string, not from hashing its arrays again."""
    if not m.digest:
        m.digest = content_key("model", [m.oof_labels, m.oof])
    return m.digest


def derived(m: ModelProbs, how: str, **changes) -> ModelProbs:
    """A model made from `m` (calibrated, a nested fold's rows) whose digest says how: no array is hashed again."""
    import hashlib

    return replace(m, **changes, digest=hashlib.sha256(f"{digest_of(m)}|{how}".encode()).hexdigest())


TEMPERATURE_CACHE_ENTRIES = 512


def temperature(probs: np.ndarray, labels: np.ndarray, objective: str, dist: np.ndarray, cache: Path | None = None,
                key: str | None = None) -> float:
    """`fit_temperature` on out-of-fold rows, remembered in `cache` (a JSON file of content key -> T) when given:
    a blend-only rerun of 04 (and every nested fold's refit) reads the temperatures back instead of fitting again."""
    from lib.core.io import cached_json
    from lib.decide.calibration import fit_temperature

    if cache is None:
        return float(fit_temperature(probs, labels, objective, dist))
    key = content_key(f"T|{objective}|{key or ''}", [dist if objective == "distance" else np.zeros(0)] + ([] if key else [labels, probs]))
    t, _ = cached_json(cache, key, lambda: float(fit_temperature(probs, labels, objective, dist)), TEMPERATURE_CACHE_ENTRIES)
    return float(t)


def calibrate_models(cfg: Config, models: Sequence[ModelProbs], dist: np.ndarray, calibration: str,
                     cache: Path | None = None) -> list[ModelProbs]:
    """Each model scaled by a temperature fitted on its own out-of-fold rows to `submit.calibrate_objective` (`none`: as is)."""
    from lib.decide.calibration import apply_temperature

    if calibration == "none":
        return list(models)
    out = []
    for m in models:
        t = temperature(m.oof, m.oof_labels, cfg.submit.calibrate_objective, dist, cache, key=digest_of(m))
        out.append(derived(m, f"T={t!r}", oof=apply_temperature(m.oof, t), test=apply_temperature(m.test, t), temperature=t))
    return out


def blended(cfg: Config, models: Sequence[ModelProbs], weights: np.ndarray, dist: np.ndarray, calibration: str,
            cache: Path | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(out-of-fold, test, temperature) of a blend; under calibration a blend of two or more models gets its own temperature."""
    from lib.decide.calibration import apply_temperature

    oof, test = blend([m.oof for m in models], weights), blend([m.test for m in models], weights)
    if calibration == "none" or np.count_nonzero(weights) < 2:
        return oof, test, 1.0
    key = "blend|" + "|".join(digest_of(m) for m in models) + "|" + np.asarray(weights, dtype=np.float64).tobytes().hex()
    t = temperature(oof, models[0].oof_labels, cfg.submit.calibrate_objective, dist, cache, key=key)
    return apply_temperature(oof, t), apply_temperature(test, t), t


def fit_key(cfg: Config, models: Sequence[ModelProbs], dist: np.ndarray, method: str = "fit") -> str:
    """What fitted weights depend on: the method's settings, the distances and every model's out-of-fold labels and
    probabilities in order (their digests: `submit.blend` does not enter it)."""
    from lib.decide.weights import SOFT_BETA

    s = cfg.submit
    settings = (f"{s.fit_objective}|{SOFT_BETA}" if method == "fit" else
                f"greedy|{s.decode}|{s.greedy_rounds}|{s.greedy_bags}|{s.greedy_bag_fraction}|{cfg.seed}")
    return content_key(f"{settings}|{len(models)}|" + "|".join(digest_of(m) for m in models), [dist])


FITTED = ("fit", "greedy")  # the blend methods fitted on out-of-fold rows (their weights are cached)


def weights_for(method: str, cfg: Config, models: Sequence[ModelProbs], dist: np.ndarray, cache: Path | None = None) -> np.ndarray:
    """The blend weights of `method`. `uniform` and `cv` are closed-form; `fit` (an SLSQP over every out-of-fold row,
    the one costly part of 04 after prediction) and `greedy` (Caruana's selection on the out-of-fold `submit.decode`
    distance) are kept in `cache` (an npz keyed by `fit_key`), so a rerun that changes only submit.blend never fits
    again, and the options table reuses the fit of the submission.
    """
    s = cfg.submit

    def compute() -> dict:
        if method == "greedy":
            from lib.decide.weights import greedy_weights

            return {"weights": greedy_weights([m.oof for m in models], models[0].oof_labels, dist, rounds=s.greedy_rounds,
                                              bags=s.greedy_bags, bag_fraction=s.greedy_bag_fraction, seed=cfg.seed,
                                              decode_method=s.decode)}
        return {"weights": blend_weights(method, [m.oof for m in models], models[0].oof_labels, dist, [m.cv for m in models],
                                         s.cv_temperature, s.fit_objective)}

    if method not in FITTED or cache is None:
        return compute()["weights"]
    from lib.core.io import cached_npz

    arrays, _ = cached_npz(cache, fit_key(cfg, models, dist, method), compute)
    return np.asarray(arrays["weights"], dtype=np.float64)


def cache_file(cache: Path | None, method: str, calibration: str, fold: int | None = None) -> Path | None:
    """Where fitted weights are kept beside 04's `probs/blend_fit.npz`: one file per method, calibration and nested fold
    (blend_fit.npz, blend_greedy_temperature.npz, blend_fit_temperature_fold2.npz ...)."""
    if cache is None:
        return None
    name = f"blend_{method}" + ("" if calibration == "none" else f"_{calibration}") + ("" if fold is None else f"_fold{fold}")
    return cache.with_name(name + cache.suffix)


def temperature_file(cache: Path | None) -> Path | None:
    """The temperatures' cache beside the weights' (probs/temperatures.json)."""
    return None if cache is None else cache.with_name("temperatures.json")


def option_key(model: str, calibration: str, frame_context: str = "none") -> str:
    """The key of an option's test labels: its model (or blend), its calibration and its frame context."""
    return f"{model}|{calibration}" + ("" if frame_context == "none" else f"|{frame_context}")


FRAME_CACHE_ENTRIES = 2048  # options x calibrations x (1 + folds) fits per set of models


def frame_file(cache: Path | None) -> Path | None:
    """The frame-context parameters' cache beside the weights' (probs/frame_context.json)."""
    return None if cache is None else cache.with_name("frame_context.json")


def frame_params(cfg: Config, ms: Sequence[ModelProbs], weights: np.ndarray, t: float, oof: np.ndarray, sib: Siblings,
                 frames: FrameRows, cache: Path | None = None) -> FrameParams:
    """Frame context's b and eps fitted on a blend's out-of-fold rows (lib.decide.frame_context.fit), kept in
    probs/frame_context.json under a key of what they depend on: the models' digests (calibrated, a nested fold's rows),
    the weights, the blend temperature, the frames and `submit.frame_context_buckets`; never `submit.decode`."""
    from lib.core.io import cached_json
    from lib.decide.frame_context import fit

    edges = tuple(int(e) for e in cfg.submit.frame_context_buckets)
    key = content_key(f"frame|{edges}|" + "|".join(digest_of(m) for m in ms) + f"|{t!r}|{frames.key}",
                      [np.asarray(weights, dtype=np.float64)])
    value, _ = cached_json(frame_file(cache), key, lambda: fit(oof, ms[0].oof_labels, sib, edges=edges).to_list(), FRAME_CACHE_ENTRIES)
    return FrameParams.from_list(value)


BLENDS = ("uniform", "cv", "fit", "greedy")


def nested_labels(cfg: Config, models: Sequence[ModelProbs], options: Sequence[tuple[str, np.ndarray]], tax: Taxonomy,
                  prior: np.ndarray, calibration: str, cache: Path | None = None, frames: FrameRows | None = None
                  ) -> list[dict[str, np.ndarray]]:
    """Per option, the out-of-fold labels of a nested fit: for each fold k, the temperatures, the blend's weights (`fit`,
    `greedy`; `uniform`, `cv` and single models keep theirs), the blend temperature and, with `frames`, frame context's
    parameters are fitted on the other folds' out-of-fold rows and decode fold k's (keys `argmax`, `min_risk`, and
    `stack argmax`, `stack min_risk`). Folds grouped by frame keep fold k's siblings in fold k. The honest out-of-fold
    score of anything fitted on out-of-fold rows; empty dicts when the fold of each row is unknown."""
    dist = tax.distance_matrix()
    folds = models[0].oof_fold
    if folds is None or len(np.unique(folds)) < 2:
        return [{} for _ in options]
    keys = ("argmax", "min_risk") + (("stack argmax", "stack min_risk") if frames is not None else ())
    out: list[dict[str, np.ndarray]] = [{k: np.empty(len(folds), dtype=np.int64) for k in keys} for _ in options]
    temps = temperature_file(cache)
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        part = [derived(m, f"fold {k} held out", oof_ids=m.oof_ids[tr], oof_labels=m.oof_labels[tr], oof=m.oof[tr], test=m.oof[te])
                for m in models]
        part = calibrate_models(cfg, part, dist, calibration, temps)
        sib_tr, sib_te = (frames.oof.subset(tr), frames.oof.subset(te)) if frames is not None else (None, None)
        for i, (name, w) in enumerate(options):
            method = name.removeprefix("blend ")
            if name.startswith("blend ") and method in FITTED:
                w = weights_for(method, cfg, part, dist, cache_file(cache, method, calibration, int(k)))
            fitted, held, t = blended(cfg, part, w, dist, calibration, temps)
            for d in ("argmax", "min_risk"):
                out[i][d][te] = apply_decoding(cfg, held, tax, prior, dist, d)
            if frames is not None and sib_tr is not None and sib_te is not None:
                params = frame_params(cfg, part, w, t, fitted, sib_tr, frames, cache)
                held = adjust(held, sib_te, params)
                for d in ("argmax", "min_risk"):
                    out[i][f"stack {d}"][te] = apply_decoding(cfg, held, tax, prior, dist, d)
    return out


def compare(cfg: Config, models: Sequence[ModelProbs], tax: Taxonomy, prior: np.ndarray,
            cache: Path | None = None, frames: FrameRows | None = None) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """Every single model and every blend, without and with calibration (and, with `frames`, without and with frame
    context), scored out of fold; with each option's decoded test labels.

    Returns the options table (one row per option, calibration and frame context: weights, temperature, frame-context
    parameters, OOF and nested OOF distance per decoding) and, per `option_key` and decoding, the test labels, which a
    report may score where the truth is known (lib.report; nothing here reads it). The `fit` and `greedy` rows,
    calibrated rows and frame-context rows are scored on the out-of-fold rows they were fitted on, so their OOF score is
    optimistic; the nested columns are not. `cache`: see `weights_for`.
    """
    dist = tax.distance_matrix()
    labels = models[0].oof_labels
    rows: list[dict[str, Any]] = []
    test_labels: dict[str, dict[str, np.ndarray]] = {}
    temps = temperature_file(cache)
    for calibration in CALIBRATIONS:
        ms = calibrate_models(cfg, models, dist, calibration, temps)
        options: list[tuple[str, np.ndarray]] = [(m.name, np.eye(len(ms))[i]) for i, m in enumerate(ms)]
        if len(ms) > 1:
            for method in BLENDS:
                w = weights_for(method, cfg, ms, dist, cache_file(cache, method, calibration))
                options.append((f"blend {method}", w))
        nested = nested_labels(cfg, models, options, tax, prior, calibration, cache, frames)
        for (name, w), nest in zip(options, nested):
            oof, test, t = blended(cfg, ms, w, dist, calibration, temps)
            shown = ms[int(np.flatnonzero(w)[0])].temperature if np.count_nonzero(w) == 1 else t
            base = {"model": name, "calibration": calibration, "temperature": round(shown, 4), "weights": " ".join(f"{x:.2f}" for x in w)}
            variants = [("none", oof, test, "")]
            if frames is not None:
                params = frame_params(cfg, ms, w, t, oof, frames.oof, frames, cache)
                variants.append(("stack", adjust(oof, frames.oof, params), adjust(test, frames.test, params, frames.prior),
                                 params.describe()))
            for context, o, te, described in variants:
                row: dict[str, Any] = {**base, "frame_context": context, "frame_params": described}
                key, prefix = option_key(name, calibration, context), "" if context == "none" else f"{context} "
                test_labels[key] = {}
                for method in ("argmax", "min_risk"):
                    row[f"oof_{method}"] = score_labels(labels, apply_decoding(cfg, o, tax, prior, dist, method), dist)
                    test_labels[key][method] = apply_decoding(cfg, te, tax, prior, dist, method)
                for method in ("argmax", "min_risk"):
                    row[f"nested_{method}"] = score_labels(labels, nest[prefix + method], dist) if nest else float("nan")
                rows.append(row)
    return pd.DataFrame(rows), test_labels


@dataclass(frozen=True)
class Blended:
    """The submission's blend: one weight per model (in `submit.models` order), the decoded test labels, the temperatures
    and, under `submit.frame_context: stack`, frame context's parameters."""

    weights: np.ndarray
    labels: np.ndarray  # one concept label per test row of the models
    temperatures: tuple[float, ...] = ()  # per model (all 1 without calibration)
    blend_temperature: float = 1.0
    frame: FrameParams | None = None


def _need_frames(cfg: Config, frames: FrameRows | None) -> None:
    if cfg.submit.frame_context != "none" and frames is None:
        raise ValueError(f"submit.frame_context={cfg.submit.frame_context} needs the frames of the rows; pass frames.")


def blend_models(cfg: Config, models: Sequence[ModelProbs], tax: Taxonomy, train_counts: np.ndarray, cache: Path | None = None,
                 frames: FrameRows | None = None) -> Blended:
    """`submit.calibrate`, `submit.blend` weights (one model: weight 1), `submit.frame_context`, then logit adjustment
    and `submit.decode` on the blended test probabilities."""
    _need_frames(cfg, frames)
    dist = tax.distance_matrix()
    calibration = cfg.submit.calibrate
    ms = calibrate_models(cfg, models, dist, calibration, temperature_file(cache))
    weights = weights_for(cfg.submit.blend, cfg, ms, dist, cache_file(cache, cfg.submit.blend, calibration)) if len(ms) > 1 else np.ones(1)
    oof, test, t = blended(cfg, ms, weights, dist, calibration, temperature_file(cache))
    params = None
    if cfg.submit.frame_context == "stack" and frames is not None:
        params = frame_params(cfg, ms, weights, t, oof, frames.oof, frames, cache)
        test = adjust(test, frames.test, params, frames.prior)
    prior = train_counts / train_counts.sum()
    return Blended(weights, apply_decoding(cfg, test, tax, prior, dist), tuple(m.temperature for m in ms), t, params)


@dataclass(frozen=True)
class Options:
    """Every single model and blend option scored out of fold (see `compare`), and the submitted option's score."""

    table: pd.DataFrame
    test_labels: dict[str, dict[str, np.ndarray]]
    oof_distance: float  # the submitted option (the single model, or `blend <submit.blend>`, under `submit.calibrate`) under `submit.decode`


def blend_options(cfg: Config, models: Sequence[ModelProbs], tax: Taxonomy, train_counts: np.ndarray, cache: Path | None = None,
                  frames: FrameRows | None = None) -> Options:
    """The options table of report.md and options.csv, with the submitted option's out-of-fold distance."""
    _need_frames(cfg, frames)
    table, test_labels = compare(cfg, models, tax, train_counts / train_counts.sum(), cache, frames)
    mine = table[(table["calibration"] == cfg.submit.calibrate) & (table["frame_context"] == cfg.submit.frame_context)]
    chosen = mine.iloc[0] if len(models) == 1 else mine[mine["model"] == f"blend {cfg.submit.blend}"].iloc[0]
    return Options(table, test_labels, float(chosen[f"oof_{cfg.submit.decode}"]))
