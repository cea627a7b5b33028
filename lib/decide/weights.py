"""Blend weights over models, fitted on out-of-fold rows only, and the weighted mean they blend with.

`blend_weights`: `uniform`; `cv`, a softmax of the models' CV distances; `fit`, weights on the
simplex fitted to out-of-fold probabilities (SLSQP on a smooth stand-in for the decoded distance);
`greedy`, Caruana's forward selection with replacement on the decoded out-of-fold distance.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lib.decide.decode import EPS, expected_distance

SOFT_BETA = 0.25  # the distance surrogate's softness, in distance units (see soft_min_risk_distance)


def blend(probs: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of probability arrays of equal shape (uniform by default)."""
    w = np.ones(len(probs)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    nonzero = np.flatnonzero(w)
    if len(nonzero) == 1 and w[nonzero[0]] == 1.0:  # one model (04 scores each alone): 1.0 * p exactly, without stacking them all
        return np.array(probs[int(nonzero[0])], dtype=np.float64)
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    return np.tensordot(w, stack, axes=1)


# ----------------------------------------------------------------------------- blend weights


def cv_weights(cv_scores: Sequence[float], temperature: float) -> np.ndarray:
    """softmax(-score / T) of CV distances (lower is better).

    T is in distance units: models 0.1 apart get weights e^(0.1/T) apart, so T -> 0 keeps only
    the best model and T -> inf is uniform.
    """
    if temperature <= 0:
        raise ValueError("The cv blend temperature must be positive; set submit.cv_temperature above 0.")
    z = -np.asarray(cv_scores, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def soft_min_risk_distance(probs: np.ndarray, labels: np.ndarray, dist: np.ndarray, beta: float = SOFT_BETA) -> float:
    """A smooth stand-in for the mean distance of min-risk decoding: answers weighted by softmax(-risk / beta).

    The plain expected distance mean(sum_j p_j D[y, j]) is linear in the blend weights, so
    minimising it always puts all weight on one model; this surrogate instead rewards blends
    whose min-risk answer is right (beta -> 0 gives the decoded distance exactly).
    """
    d = np.asarray(dist, dtype=np.float64)
    return _soft_risk_loss(expected_distance(probs, d), d[np.asarray(labels)], beta)


def _soft_risk_loss(risk: np.ndarray, truth_rows: np.ndarray, beta: float) -> float:
    """mean_i sum_j softmax(-risk_i / beta)_j D[y_i, j], given risk (N, C) and D[y] (N, C)."""
    z = -risk / beta
    z -= z.max(1, keepdims=True)
    a = np.exp(z)
    a /= a.sum(1, keepdims=True)
    return float((a * truth_rows).sum(1).mean())


def fit_weights(oof_probs: Sequence[np.ndarray], labels: np.ndarray, dist: np.ndarray | None, objective: str = "distance") -> np.ndarray:
    """Non-negative weights summing to one that minimise `objective` on out-of-fold probabilities (SLSQP).

    The models' rows must be the same samples in the same order. `distance`:
    `soft_min_risk_distance` of the blend; `logloss`: its negative log-likelihood. Starts from
    uniform and from each single model, keeping the best, since the distance surrogate is not
    convex. Gradients are exact: the blend's risk is linear in w (sum_m w_m P_m @ D, computed once).
    """
    from scipy.optimize import minimize

    stack = np.stack([np.asarray(p, dtype=np.float64) for p in oof_probs])
    m = len(stack)
    if m == 1:
        return np.ones(1)
    labels = np.asarray(labels)
    if objective == "distance":
        if dist is None:
            raise ValueError("The distance blend objective needs the distance matrix; pass dist.")
        d = np.asarray(dist, dtype=np.float64)
        risks, truth_rows = stack @ d, d[labels]  # (M, N, C), (N, C)

        buf = np.empty_like(truth_rows)

        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            # The same arithmetic as a = softmax(-(w . risks) / beta), per_row = sum(a * D[y]),
            # g = -a * (D[y] - per_row) / (beta N), done in place: each evaluation touches (N, C)
            # arrays a dozen times, and fresh allocations of that size cost as much as the maths.
            a = np.tensordot(w, risks, axes=1)
            np.negative(a, out=a)
            a /= SOFT_BETA
            a -= a.max(1, keepdims=True)
            np.exp(a, out=a)
            a /= a.sum(1, keepdims=True)
            per_row = np.multiply(a, truth_rows, out=buf).sum(1, keepdims=True)
            np.subtract(truth_rows, per_row, out=buf)
            np.negative(a, out=a)
            a *= buf
            a /= SOFT_BETA * len(a)  # dL/drisk
            return float(per_row.mean()), np.einsum("mnc,nc->m", risks, a)
    elif objective == "logloss":
        truth_p = stack[:, np.arange(len(labels)), labels].T  # (N, M): each model's probability of the truth

        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            q = np.clip(truth_p @ w, EPS, None)
            return float(-np.log(q).mean()), -(truth_p / q[:, None]).mean(0)
    else:
        raise ValueError(f"Unknown blend objective '{objective}'; choose distance or logloss.")
    starts = [np.full(m, 1.0 / m), *np.eye(m)]
    best_w, best_f = starts[0], loss(starts[0])[0]
    for w0 in starts:
        res = minimize(loss, w0, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
                       options={"maxiter": 200, "ftol": 1e-10})
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else starts[0]
        f = loss(w)[0]
        if f < best_f - 1e-12:
            best_w, best_f = w, f
    return best_w


def _selection_counts(scores: np.ndarray, truth_rows: np.ndarray, members: np.ndarray, rounds: int) -> np.ndarray:
    """Selection counts over all M members of one forward selection among `members` (sorted indices).

    `scores[m]` is member m's (N, C) array whose row argmin is its decision; a blend's is the sum
    over its selected members (risk and probability are linear in the weights, and scaling by the
    count total moves no argmin), so a candidate costs one addition, not a matmul.
    """
    rows = np.arange(truth_rows.shape[0])

    def distance(s: np.ndarray) -> float:
        return float(truth_rows[rows, s.argmin(1)].mean())

    counts = np.zeros(len(scores), dtype=np.int64)
    first = [distance(scores[m]) for m in members]
    best = int(members[int(np.argmin(first))])  # argmin: the lowest index among ties
    counts[best], current, total = 1, min(first), scores[best].copy()
    for _ in range(rounds):
        trial = [distance(total + scores[m]) for m in members]
        k = int(np.argmin(trial))
        if not trial[k] < current - 1e-12:  # stop when no addition strictly lowers the distance
            break
        m = int(members[k])
        counts[m] += 1
        current = trial[k]
        total += scores[m]
    return counts


def greedy_weights(oof_probs: Sequence[np.ndarray], labels: np.ndarray, dist: np.ndarray, rounds: int = 20, bags: int = 0,
                   bag_fraction: float = 0.5, seed: int = 0, decode_method: str = "min_risk") -> np.ndarray:
    """Ensemble selection (Caruana et al. 2004): greedy forward selection with replacement on out-of-fold rows.

    Starts from the member of least decoded distance (`decode_method`, scored by D[y, answer]),
    then adds, up to `rounds` times, the member (possibly again) whose addition lowers the blend's
    decoded distance most, stopping early when none lowers it strictly; weights are the selection
    counts over their total. It optimises the competition's score itself rather than a
    surrogate, and the counts act as a regulariser against over-fitting many weights. `bags` > 0
    repeats the selection on random subsets of round(bag_fraction * M) members (rng `seed`) and
    sums the counts, which damps a member that wins by chance. Ties go to the lowest index.
    """
    if len(oof_probs) == 0:
        raise ValueError("Greedy selection needs at least one model's out-of-fold probabilities; pass oof_probs.")
    shapes = {np.shape(p) for p in oof_probs}
    if len(shapes) > 1:
        raise ValueError(f"Out-of-fold probabilities differ in shape ({', '.join(map(str, sorted(shapes)))}); pass the same rows and classes.")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in oof_probs])
    m = len(stack)
    if stack.ndim != 3:
        raise ValueError(f"Greedy selection needs (rows, classes) probabilities per model, got {stack.shape[1:]}; pass 2-D arrays.")
    labels = np.asarray(labels)
    d = np.asarray(dist, dtype=np.float64)
    n, c = stack.shape[1:]
    if labels.shape != (n,):
        raise ValueError(f"Greedy selection got {n} probability rows but labels of shape {labels.shape}; pass one label per row.")
    if d.shape != (c, c):
        raise ValueError(f"The distance matrix has shape {d.shape} but the probabilities have {c} classes; pass the (C, C) matrix.")
    if not np.issubdtype(labels.dtype, np.integer) or (n and (labels.min() < 0 or labels.max() >= c)):
        raise ValueError(f"Greedy selection labels must be integers in [0, {c}); pass the rows' class indices.")
    if rounds < 0 or bags < 0:
        raise ValueError(f"Greedy selection needs rounds >= 0 and bags >= 0, got rounds={rounds}, bags={bags}; pass non-negative counts.")
    if not 0 < bag_fraction <= 1:
        raise ValueError(f"The greedy bag fraction must lie in (0, 1], got {bag_fraction}; pass a fraction of the models.")
    if decode_method == "min_risk":
        scores = stack @ d  # (M, N, C): each member's risk, computed once
    elif decode_method == "argmax":
        scores = -stack
    else:
        raise ValueError(f"Unknown decoding '{decode_method}' for greedy selection; choose argmax or min_risk.")
    truth_rows = d[labels]
    if bags == 0:
        counts = _selection_counts(scores, truth_rows, np.arange(m), rounds)
    else:
        rng = np.random.default_rng(seed)
        size = max(1, int(round(bag_fraction * m)))
        counts = np.zeros(m, dtype=np.int64)
        for _ in range(bags):
            counts += _selection_counts(scores, truth_rows, np.sort(rng.choice(m, size=size, replace=False)), rounds)
    return counts / counts.sum()


def blend_weights(method: str, oof_probs: Sequence[np.ndarray] | None = None, labels: np.ndarray | None = None,
                  dist: np.ndarray | None = None, cv_scores: Sequence[float] | None = None, temperature: float = 0.1,
                  objective: str = "distance", *, rounds: int = 20, bags: int = 0, bag_fraction: float = 0.5, seed: int = 0,
                  decode_method: str = "min_risk") -> np.ndarray:
    """The blend's weights (non-negative, summing to one) by `uniform`, `cv`, `fit` or `greedy` (`greedy_weights`'s keywords)."""
    if method == "uniform":
        n = len(oof_probs) if oof_probs is not None else len(cv_scores) if cv_scores is not None else 0
        if n == 0:
            raise ValueError("uniform weights need the models' oof_probs or cv_scores to count them.")
        return np.full(n, 1.0 / n)
    if method == "cv":
        if cv_scores is None or len(cv_scores) == 0:
            raise ValueError("The cv blend needs each model's CV distance; pass cv_scores.")
        return cv_weights(cv_scores, temperature)
    if method == "fit":
        if not oof_probs or labels is None:
            raise ValueError("The fit blend needs out-of-fold probabilities and their labels; pass oof_probs and labels.")
        return fit_weights(oof_probs, labels, dist, objective)
    if method == "greedy":
        if not oof_probs or labels is None or dist is None:
            raise ValueError("The greedy blend needs out-of-fold probabilities, labels and the distance matrix; pass oof_probs, labels and dist.")
        return greedy_weights(oof_probs, labels, dist, rounds, bags, bag_fraction, seed, decode_method)
    raise ValueError(f"Unknown blend method '{method}'; choose uniform, cv, fit or greedy.")
