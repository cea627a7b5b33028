"""How one model's fold models combine on the test rows (`submit.fold_average`), and why it needs a correction.

A test row is predicted by every fold model (and every TTA view); an out-of-fold row by one fold model only. A
calibrator fitted out of fold therefore calibrates one fold model, and the arithmetic mean of several calibrated
models is underconfident: where they disagree the mean spreads its mass, while the ensemble's accuracy rises (on a
10-species dataset: mean top probability 0.638 at accuracy 0.815, against 0.711 at 0.702 out of fold). Min-risk
decoding then backs off to coarse ranks it should not.

- `mean`: the arithmetic mean of the probabilities (what 04 did before).
- `log`: the geometric mean, renormalised (a log-space average of calibrated members: sharper where they agree).
- `matched`: the geometric mean, then one temperature that makes its mean top probability equal the fold models' own
  mean top probability on the same rows. Each calibrated fold model's confidence equals its expected accuracy, and an
  average of fold models is at least as accurate as they are, so matching never makes the average more confident than
  its members claim to be right: it undoes the spread that averaging adds, from the members' disagreement on the test
  rows alone (no label is read; one scalar, so nothing is overfitted). Where the members agree exactly it is the
  identity.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-12
AVERAGES = ("mean", "log", "matched")
T_BOUNDS = (0.02, 50.0)  # the bracket of the matched temperature


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def geometric_mean(members: np.ndarray) -> np.ndarray:
    """The renormalised geometric mean over axis 0 of (M, N, C) probabilities (clipped at 1e-12 before the log)."""
    m = np.asarray(members, dtype=np.float64)
    return _softmax(np.log(np.clip(m, EPS, None)).mean(0))


def mean_confidence(probs: np.ndarray) -> float:
    """The mean top probability of (N, C) rows (of (M, N, C): over members and rows)."""
    return float(np.asarray(probs, dtype=np.float64).max(-1).mean())


def match_temperature(probs: np.ndarray, target: float, bounds: tuple[float, float] = T_BOUNDS, iters: int = 60) -> float:
    """The temperature t with mean top probability of softmax(log p / t) equal to `target` (bisection on log t: each row's
    top probability falls as t rises). A target beyond what the bracket reaches returns the bracket's end; 1 when no
    row is predicted (or the target is met already)."""
    p = np.asarray(probs, dtype=np.float64)
    if len(p) == 0:
        return 1.0
    logp = np.log(np.clip(p, EPS, None))

    def conf(t: float) -> float:
        return float(_softmax(logp / t).max(-1).mean())

    if abs(conf(1.0) - target) < 1e-9:
        return 1.0
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    if conf(float(np.exp(lo))) <= target:
        return float(bounds[0])
    if conf(float(np.exp(hi))) >= target:
        return float(bounds[1])
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if conf(float(np.exp(mid))) > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def average_folds(members: np.ndarray, how: str) -> tuple[np.ndarray, float]:
    """(N, C) probabilities of (M, N, C) fold models' (already calibrated) test probabilities, and the matched
    temperature (1 unless `how` is matched). One member: its probabilities as they are, whatever `how`."""
    m = np.asarray(members, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"average_folds needs (models, rows, classes) probabilities, got shape {m.shape}; stack the fold models.")
    if how not in AVERAGES:
        raise ValueError(f"Unknown fold average '{how}'; choose one of {', '.join(AVERAGES)}.")
    if len(m) == 1:
        return m[0] / np.maximum(m[0].sum(-1, keepdims=True), EPS), 1.0
    if how == "mean":
        return m.mean(0), 1.0
    g = geometric_mean(m)
    if how == "log":
        return g, 1.0
    t = match_temperature(g, mean_confidence(m))
    return (g if t == 1.0 else _softmax(np.log(np.clip(g, EPS, None)) / t)), t
