"""Temperature scaling of cached probabilities and the top-label calibration error.

Min-risk decoding weighs every concept by its probability, so an over-confident model answers
a species where the genus would score better: its decisions, not only its log-loss, depend on
calibration. The cache holds probabilities, not logits, so the temperature acts on log p
(softmax(log p / t) equals softmax(z / t) up to the constant a softmax removes).

`fit_temperature` fits on exactly the rows it is given. Pass out-of-fold rows only, never the
test rows: a temperature chosen on the rows it is scored on is an optimistic score, and on
test rows it would read labels the pipeline must not see.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

EPS = 1e-12
LOGLOSS_BOUNDS = (0.05, 20.0)  # the bracket of the log-loss fit, in t
DISTANCE_GRID = tuple(float(t) for t in np.geomspace(0.1, 10.0, 41))  # the decoded distance is piecewise constant in t
TIE = 1e-12  # objective values this close are a tie (the t nearest 1 wins)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, None))


def _softmax_t(logp: np.ndarray, t: float) -> np.ndarray:
    z = logp / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _check_t(t: float) -> None:
    if not (np.isfinite(t) and t > 0):
        raise ValueError(f"The temperature must be a positive finite number, got {t}; pass t > 0.")


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """softmax(log p / t) over the last axis: t < 1 sharpens, t > 1 flattens, t = 1 is an unchanged copy.

    p is clipped at 1e-12 first, so zero probabilities stay (nearly) zero instead of log 0.
    """
    _check_t(t)
    if t == 1.0:
        return np.array(probs, dtype=np.float64, copy=True)
    return _softmax_t(_log_probs(probs), t)


def _check_rows(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"Calibration needs probabilities of shape (rows, classes) with at least one row, got {p.shape}; pass the 2-D array.")
    if y.shape != (len(p),):
        raise ValueError(f"Calibration got {len(p)} probability rows but labels of shape {y.shape}; pass one label per row.")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"Calibration labels must be integers in [0, {p.shape[1]}); pass the rows' class indices.")
    return p, y


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels (probabilities clipped at 1e-12)."""
    p, y = _check_rows(probs, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], EPS, None)).mean())


def _nearest_one(ts: np.ndarray, losses: np.ndarray) -> float:
    """The t of least loss; among ties, the one nearest 1 (in log t), so a flat objective changes nothing."""
    tied = np.flatnonzero(losses <= losses.min() + TIE)
    return float(ts[tied[np.argmin(np.abs(np.log(ts[tied])))]])


def fit_temperature(probs: np.ndarray, labels: np.ndarray, objective: str, dist: np.ndarray | None = None,
                    grid: Sequence[float] = DISTANCE_GRID, bounds: tuple[float, float] = LOGLOSS_BOUNDS) -> float:
    """The temperature minimising `objective` on these rows (out-of-fold rows only; never the test rows).

    `logloss`: mean NLL, a bounded scalar search on log t within `bounds` (NLL is unimodal in t).
    `distance`: the mean distance of min-risk decoding (argmin_j of apply_temperature(p, t) @ D),
    piecewise constant in t, so the best point of `grid` (t = 1 is always tried). Either way
    t = 1 is kept unless another t is strictly better, so calibration that does not help changes nothing.
    """
    p, y = _check_rows(probs, labels)
    logp = _log_probs(p)
    rows = np.arange(len(y))
    if objective == "logloss":
        from scipy.optimize import minimize_scalar

        lo, hi = bounds
        if not (0 < lo < 1 < hi and np.isfinite(hi)):
            raise ValueError(f"The log-loss temperature bounds must satisfy 0 < low < 1 < high, got {bounds}; widen them around 1.")

        def loss(log_t: float) -> float:
            q = _softmax_t(logp, float(np.exp(log_t)))
            return float(-np.log(np.clip(q[rows, y], EPS, None)).mean())

        res = minimize_scalar(loss, bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-5})
        ts = np.array([1.0, float(np.exp(res.x))])
        return _nearest_one(ts, np.array([loss(0.0), loss(float(res.x))]))
    if objective == "distance":
        if dist is None:
            raise ValueError("The distance temperature objective needs the distance matrix; pass dist.")
        d = np.asarray(dist, dtype=np.float64)
        if d.shape != (p.shape[1], p.shape[1]):
            raise ValueError(f"The distance matrix has shape {d.shape} but the probabilities have {p.shape[1]} classes; pass the (C, C) matrix.")
        ts = np.unique(np.append(np.asarray(grid, dtype=np.float64), 1.0))
        for t in ts:
            _check_t(float(t))
        truth_rows = d[y]
        losses = np.array([truth_rows[rows, (_softmax_t(logp, float(t)) @ d).argmin(1)].mean() for t in ts])
        return _nearest_one(ts, losses)
    raise ValueError(f"Unknown temperature objective '{objective}'; choose logloss or distance.")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - mean confidence| * fraction of rows.

    Bins are (k/n, (k+1)/n], the first also holding confidence 0 (Guo et al. 2017).
    """
    p, y = _check_rows(probs, labels)
    if n_bins < 1:
        raise ValueError(f"ECE needs at least one bin, got n_bins={n_bins}; pass n_bins >= 1.")
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.bincount(b, weights=correct - conf, minlength=n_bins)  # per bin: sum(acc - conf) = n_b * (acc_b - conf_b)
    return float(np.abs(gap).sum() / len(y))
