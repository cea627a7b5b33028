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
from typing import Sequence

import numpy as np

from lib.config import Config
from lib.core.errors import StageError
from lib.core.io import content_key
from lib.data.taxonomy import Taxonomy
from lib.decide.calibration import Calibrator, fit_calibrator
from lib.decide.decode import backoff_decode, decode, logit_adjust
from lib.decide.frame_context import FrameParams, FrameRows, Siblings, adjust
from lib.decide.prior import PriorShift, check_totals, correct
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
    fold_test: np.ndarray | None = None  # (M, N, C): each fold model's test probabilities; `test` is their average
    stored_oof: np.ndarray | None = None  # the training stage's one-view rows, where `oof` was predicted again with TTA views
    calibrator: str = "none"  # what its oof and test were calibrated by (lib.decide.calibration.Calibrator.describe)
    fold_temperature: float = 1.0  # the `matched` fold average's temperature on its test rows (1: none)


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


CALIBRATIONS = ("none", "temperature", "vector", "dirichlet")
PRIORS = ("none", "em", "balanced")


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


CALIBRATOR_CACHE_ENTRIES = 1024


def fitted_calibrator(cfg: Config, m: ModelProbs, kind: str, dist: np.ndarray, cache: Path | None = None,
                      weights: np.ndarray | None = None) -> Calibrator:
    """`kind` fitted on the model's out-of-fold rows only (never test rows), remembered in `cache` (probs/calibrators.json,
    content key -> parameters): a rerun that changes only the blend or the decoding, and every nested fold's refit, reads
    it back instead of fitting again."""
    from lib.core.io import cached_json

    s = cfg.submit
    settings = f"{kind}|{s.calibrate_objective if kind == 'temperature' else ''}|{s.calibrate_l2 if kind in ('vector', 'dirichlet') else ''}"
    extra = [np.asarray(weights, dtype=np.float64) if weights is not None else np.zeros(0),
             dist if kind == "temperature" and s.calibrate_objective == "distance" else np.zeros(0)]

    def fit() -> list:
        return fit_calibrator(kind, m.oof, m.oof_labels, objective=s.calibrate_objective, dist=dist, l2=s.calibrate_l2,
                              weights=weights).to_list()

    if kind == "none":
        return Calibrator("none")
    if cache is None:
        return Calibrator.from_list(fit())
    value, _ = cached_json(cache, content_key(f"cal|{settings}|{digest_of(m)}", extra), fit, CALIBRATOR_CACHE_ENTRIES)
    return Calibrator.from_list(value)


def calibrate_models(cfg: Config, models: Sequence[ModelProbs], dist: np.ndarray, calibration: str,
                     cache: Path | None = None) -> list[ModelProbs]:
    """Each model's out-of-fold rows and each of its fold models' test rows mapped by `calibration` (fitted on its
    out-of-fold rows), then its fold models averaged by `submit.fold_average` (lib.decide.averaging): the test rows of
    a model are the average of fold models that each out-of-fold row never was."""
    from lib.decide.averaging import average_folds

    out = []
    for m in models:
        cal = fitted_calibrator(cfg, m, calibration, dist, cache)
        if m.fold_test is not None:
            test, t_fold = average_folds(np.stack([cal.apply(f) for f in m.fold_test]), cfg.submit.fold_average)
        else:
            test, t_fold = cal.apply(m.test), 1.0
        t = cal.params[0] if cal.kind == "temperature" else 1.0
        out.append(derived(m, f"{cal.to_list()!r}|{cfg.submit.fold_average}", oof=cal.apply(m.oof), test=test, fold_test=None,
                           temperature=t, calibrator=cal.kind + (f" T={t:.3f}" if cal.kind == "temperature" else ""),
                           fold_temperature=t_fold))
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


def calibrator_file(cache: Path | None) -> Path | None:
    """The calibrators' cache beside the weights' (probs/calibrators.json)."""
    return None if cache is None else cache.with_name("calibrators.json")


def temperature_file(cache: Path | None) -> Path | None:
    """The temperatures' cache beside the weights' (probs/temperatures.json)."""
    return None if cache is None else cache.with_name("temperatures.json")


def option_key(model: str, calibration: str, frame_context: str = "none", test_prior: str = "none") -> str:
    """The key of an option's test labels: its model (or blend), its calibration, its frame context and its prior correction."""
    return (f"{model}|{calibration}" + ("" if frame_context == "none" else f"|{frame_context}")
            + ("" if test_prior == "none" else f"|prior {test_prior}"))


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


def test_totals(totals: Sequence[float], tax: Taxonomy, key: str = "submit.test_totals") -> np.ndarray | None:
    """The user's class totals for `balanced` (None: equal totals), checked to hold one count per concept."""
    if not len(totals):
        return None
    check_totals(totals, tax.n_classes, key)
    return np.asarray(totals, dtype=np.float64)


@dataclass(frozen=True)
class Choice:
    """One option 04 can submit: a model (its name) or `blend <method>`, a calibration, frame context, prior correction
    and decoding."""

    model: str
    calibration: str
    frame_context: str
    test_prior: str
    decode: str

    @property
    def key(self) -> str:
        return option_key(self.model, self.calibration, self.frame_context, self.test_prior)

    def describe(self) -> str:
        return (f"{self.model}, {self.calibration} calibration, frame context {self.frame_context}, test prior "
                f"{self.test_prior}, {self.decode} decoding")

    @staticmethod
    def from_settings(cfg: Config, models: Sequence[ModelProbs]) -> Choice:
        """The option the submit.* settings name."""
        s = cfg.submit
        model = models[0].name if len(models) == 1 else f"blend {s.blend}"
        return Choice(model, s.calibrate, s.frame_context, s.test_prior, s.decode)


def option_weights(choice: Choice, cfg: Config, ms: Sequence[ModelProbs], dist: np.ndarray, cache: Path | None) -> np.ndarray:
    """The weights of an option over the (calibrated) models: one-hot for a single model, the blend method's otherwise."""
    if not choice.model.startswith("blend "):
        names = [m.name for m in ms]
        if choice.model not in names:
            raise ValueError(f"The option names model {choice.model}, which is not among {names}.")
        return np.eye(len(ms))[names.index(choice.model)]
    if len(ms) == 1:
        return np.ones(1)
    method = choice.model.removeprefix("blend ")
    return weights_for(method, cfg, ms, dist, cache_file(cache, method, choice.calibration))


@dataclass(frozen=True)
class Blended:
    """The submitted option: one weight per model (in `submit.models` order), the decoded test labels, the temperatures,
    under frame context its parameters, and the prior correction's estimate and counts."""

    weights: np.ndarray
    labels: np.ndarray  # one concept label per test row of the models
    temperatures: tuple[float, ...] = ()  # per model (all 1 without temperature calibration)
    blend_temperature: float = 1.0
    frame: FrameParams | None = None
    choice: Choice | None = None
    prior: PriorShift | None = None  # the test prior correction (None: none)
    calibrators: tuple[str, ...] = ()  # per model, what calibrated it
    fold_temperatures: tuple[float, ...] = ()  # per model, the matched fold average's temperature
    probs: np.ndarray | None = None  # the test probabilities decoded (after every correction, before logit adjustment)
    oof: np.ndarray | None = None  # the out-of-fold rows of the same option (calibrated, blended, frame context; no prior)


def _need_frames(choice: Choice, frames: FrameRows | None) -> None:
    if choice.frame_context != "none" and frames is None:
        raise ValueError(f"frame_context={choice.frame_context} needs the frames of the rows; pass frames.")


def blend_models(cfg: Config, models: Sequence[ModelProbs], tax: Taxonomy, train_counts: np.ndarray, cache: Path | None = None,
                 frames: FrameRows | None = None, choice: Choice | None = None) -> Blended:
    """One option on the test rows (`choice`, else the submit.* settings): calibration and fold averaging, the blend's
    weights, frame context, the prior correction, then logit adjustment and decoding."""
    choice = choice or Choice.from_settings(cfg, models)
    _need_frames(choice, frames)
    dist = tax.distance_matrix()
    ms = calibrate_models(cfg, models, dist, choice.calibration, calibrator_file(cache))
    weights = option_weights(choice, cfg, ms, dist, cache)
    oof, test, t = blended(cfg, ms, weights, dist, choice.calibration, temperature_file(cache))
    params = None
    if choice.frame_context == "stack" and frames is not None:
        params = frame_params(cfg, ms, weights, t, oof, frames.oof, frames, cache)
        test = adjust(test, frames.test, params, frames.prior)
    prior = train_counts / train_counts.sum()
    moved = correct(choice.test_prior, test, prior, test_totals(cfg.submit.test_totals, tax)) if choice.test_prior != "none" else None
    if moved is not None:
        test = moved.probs
    if params is not None and frames is not None:
        oof = adjust(oof, frames.oof, params)
    return Blended(weights, apply_decoding(cfg, test, tax, prior, dist, choice.decode), tuple(m.temperature for m in ms), t, params,
                   choice, moved, tuple(m.calibrator for m in ms), tuple(m.fold_temperature for m in ms), test, oof)
