"""Label shift: test probabilities reweighted for a test set whose classes come in other proportions than the train set's.

A classifier's posteriors p(y|x) carry the train prior. Under label shift (the test set's class proportions differ,
what a class looks like does not) Bayes' rule gives the posteriors under the test prior pi as

    q_ij ∝ p_ij * pi_j / pi_train_j        (renormalised over the classes)

so one weight per class corrects every row. Two ways to set the weights without test labels:

- `em_prior` estimates pi by maximum likelihood on the unlabelled test rows (Saerens, Latinne & Decaestecker 2002):
  pi = the mean of the q it implies, iterated to a fixed point. It trusts p as calibrated posteriors under pi_train,
  so it belongs after calibration.
- `balanced` takes the class totals from the user (equal by default: FathomNet 2025's test holds about 10 ROIs per
  class, while a model's predictions on it give some classes 20) and scales the matrix until its column sums meet
  them (Sinkhorn-Knopp's fixed point, found by Newton's method on its dual).

`correct` is the one entry point (none | em | balanced). Its `PriorShift` carries the class weights, so the same
correction applies to each fold model of an ensemble (`PriorShift.apply`), and the argmax counts before and after.
Weights per row let a caller simulate a label-shifted evaluation set by weighting out-of-fold rows: a row of weight 2
counts as that row twice. Pure numpy, no test labels anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from lib.config.schema import ConfigError

Kind = Literal["none", "em", "balanced"]
KINDS: tuple[str, ...] = ("none", "em", "balanced")


# ----------------------------------------------------------------------------- checks and row helpers


def _matrix(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (rows, classes) with at least 2 classes, got {p.shape}.")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative; check the calibration before the prior correction.")
    return p


def _row_weights(weights: np.ndarray | None, p: np.ndarray) -> np.ndarray:
    """Per row weight, 0 for an all-zero row (it says nothing about the classes)."""
    v = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=np.float64)
    if v.shape != (len(p),) or not np.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"weights must be {len(p)} finite non-negative numbers, one per row, got shape {v.shape}.")
    return np.where(p.sum(1) > 0, v, 0.0)


def _prior(train_prior: np.ndarray | Sequence[float], n_classes: int) -> np.ndarray:
    """The train prior normalised, a class without train rows raised to the smallest positive share (no 0/0)."""
    pi = np.asarray(train_prior, dtype=np.float64)
    if pi.shape != (n_classes,) or not np.isfinite(pi).all() or (pi < 0).any() or pi.sum() <= 0:
        raise ValueError(f"train_prior must be {n_classes} non-negative counts or shares with a positive sum, got shape {pi.shape}.")
    pi = np.where(pi > 0, pi, pi[pi > 0].min())
    return pi / pi.sum()


def normalise_rows(probs: np.ndarray) -> np.ndarray:
    """Rows divided by their sums; an all-zero row stays zero."""
    p = np.asarray(probs, dtype=np.float64)
    s = p.sum(-1, keepdims=True)
    return np.divide(p, s, out=np.zeros_like(p), where=s > 0)


def reweight(probs: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """q ∝ probs * class_weights per row (any leading axes: one model's (N, C) or a stack (M, N, C)).

    A row that every weight zeroes (all its mass on classes weighted 0) keeps its probabilities: there is nothing to
    shift it toward."""
    p = normalise_rows(probs)
    q = normalise_rows(p * np.asarray(class_weights, dtype=np.float64))
    lost = (q.sum(-1) == 0) & (p.sum(-1) > 0)
    q[lost] = p[lost]
    return q


def predicted_counts(probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(C,) rows per argmax class (weighted by `weights` when given); all-zero rows count nowhere."""
    p = np.asarray(probs)
    counts = np.bincount(p.argmax(1), weights=_row_weights(weights, p), minlength=p.shape[1])
    return counts.round().astype(np.int64) if weights is None else counts


# ----------------------------------------------------------------------------- the two corrections


def _em(p: np.ndarray, base: np.ndarray, v: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, np.ndarray, int, bool]:
    pi = base.copy()
    for it in range(1, max_iter + 1):
        new = v @ reweight(p, pi / base) / v.sum()
        step = float(np.abs(new - pi).max())
        pi = new
        if step < tol:
            return pi, reweight(p, pi / base), it, True
    return pi, reweight(p, pi / base), max_iter, False


def em_prior(probs: np.ndarray, train_prior: np.ndarray | Sequence[float], weights: np.ndarray | None = None,
             tol: float = 1e-6, max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray, int]:
    """(test prior, adjusted probabilities, iterations) by Saerens et al.'s EM.

    E step: q_ij ∝ p_ij * pi_j / pi_train_j; M step: pi = the (weighted) mean of the rows q_i; from pi = pi_train until
    no share moves by `tol`. Each step raises the likelihood of the unlabelled rows, so it ends at the maximum
    likelihood prior (classes the rows give no evidence for drift toward 0). `train_prior` may be counts. A class
    without train rows is treated as the rarest seen class (never predicted: it keeps 0). All-zero rows stay zero and
    count nowhere; with no row left the train prior comes back unchanged.
    """
    p = normalise_rows(_matrix(probs))
    base, v = _prior(train_prior, p.shape[1]), _row_weights(weights, p)
    if v.sum() <= 0:
        return base, p, 0
    pi, q, it, _ = _em(p, base, v, tol, max_iter)
    return pi, q, it


def _totals(totals: np.ndarray | Sequence[float] | None, n_classes: int) -> np.ndarray:
    t = np.ones(n_classes) if totals is None or len(totals) == 0 else np.asarray(totals, dtype=np.float64)
    if t.shape != (n_classes,) or not np.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"totals must be {n_classes} positive counts, one per class, got shape {t.shape}.")
    return t


def _dual(pr_: np.ndarray, v: np.ndarray, target: np.ndarray, u: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """f(u) = sum_i v_i log sum_k p_ik e^u_k - target . u (convex), the rows q ∝ p e^u and their weighted column sums."""
    shift = u.max()
    c = np.exp(u - shift)
    rows = pr_ @ c
    q = pr_ * c / np.where(rows > 0, rows, 1.0)[:, None]
    return float(v @ (np.log(np.where(rows > 0, rows, 1.0)) + shift) - target @ u), q, v @ q


def _balance(p: np.ndarray, t: np.ndarray, v: np.ndarray, max_iter: int, tol: float, min_mass: float
             ) -> tuple[np.ndarray, np.ndarray, int, bool, tuple[int, ...]]:
    """(adjusted, column weights, iterations, converged, unmet classes): see `balanced`."""
    reach = v @ p > min_mass * v.sum()
    unmet = tuple(int(j) for j in np.flatnonzero(~reach))
    pr_ = p[:, reach]
    v = np.where(pr_.sum(1) > 0, v, 0.0)  # a row whose mass is all on unmet classes keeps its probabilities
    target = t[reach] * v.sum() / t[reach].sum()
    u = np.zeros(reach.sum())
    f, q, col = _dual(pr_, v, target, u)
    off = float(np.abs(col / target - 1).max())
    it = 0
    while off > tol and it < max_iter:
        it += 1
        # one Sinkhorn-Knopp sweep: every column scaled to its total, the rows renormalised (steady, but linear) ...
        u = u + np.log(target / np.maximum(col, 1e-300))
        f, q, col = _dual(pr_, v, target, u)
        # ... then one Newton step on the dual (quadratic near the answer), kept where it lowers f
        grad = col - target  # sums to 0: f does not change along u + const, which the rank-one term below pins
        hess = np.diag(col) - (q * v[:, None]).T @ q + col.mean() * np.full((len(u), len(u)), 1.0 / len(u))
        step = np.linalg.lstsq(hess, -grad, rcond=None)[0]
        size = 1.0
        while size > 1e-6:  # backtracking (Armijo, give or take f's rounding): far from the answer a full step overshoots
            f_new, q_new, col_new = _dual(pr_, v, target, u + size * step)
            if f_new <= f + 1e-4 * size * float(grad @ step) + 1e-12 * abs(f):
                u, f, q, col = u + size * step, f_new, q_new, col_new
                break
            size /= 2
        off = float(np.abs(col / target - 1).max())
    c = np.zeros(len(reach))
    c[reach] = np.exp(u - u.max())
    return reweight(p, c), c, it, off <= tol, unmet


def balanced(probs: np.ndarray, totals: np.ndarray | Sequence[float] | None = None, weights: np.ndarray | None = None,
             max_iter: int = 300, tol: float = 1e-9, min_mass: float = 1e-9) -> np.ndarray:
    """Probabilities scaled per class so that the (weighted) column sums meet `totals`, each row summing to 1.

    `totals` (one per class; None or empty: equal) are shares: they are rescaled to the (weighted) number of non-zero
    rows. The answer is the unique Q = diag(r) P diag(c) with rows summing to 1 and column sums equal to the totals
    whenever one exists (always when P > 0): the matrix closest to P in KL divergence with those margins, the fixed point
    of Sinkhorn-Knopp's alternating row and column scaling, and the label-shift posteriors under the test prior whose
    expected class counts are the totals. Sinkhorn-Knopp alone converges linearly and slowly when a class's mass sits in
    few rows (1,000 sweeps left columns 1e-4 off on 790 rows of 79 classes), so each iteration is one of its sweeps and
    then one Newton step with backtracking on the convex dual, f(u) = sum_i v_i log sum_j p_ij e^u_j - sum_j t_j u_j,
    c = e^u (O(N C^2)): the sweep moves every class toward its total even where the Hessian is near singular, the step
    ends the job quadratically (about 10 iterations for 790 rows of 79 classes). Converged: every column within `tol`
    of its total, relatively.
    A class whose (weighted) mass is below `min_mass` of the rows everywhere cannot meet its total (that would turn
    noise into labels): its column is set to 0, the other classes meet theirs, and `correct` reports it as unmet.
    When the zeros of P make the totals impossible (or nearly: totals far from what near one-hot rows say), the
    iterations stop unconverged at `max_iter` (`correct` says so).
    """
    p = normalise_rows(_matrix(probs))
    v = _row_weights(weights, p)
    if v.sum() <= 0:
        return p
    return _balance(p, _totals(totals, p.shape[1]), v, max_iter, tol, min_mass)[0]


# ----------------------------------------------------------------------------- the entry point


@dataclass(frozen=True, eq=False)
class PriorShift:
    """What a prior correction did: adjusted ∝ probs * class_weights per row, and what that changed."""

    kind: str
    probs: np.ndarray  # (N, C) adjusted, rows summing to 1 (all-zero rows stay zero); none: the input as it came
    prior: np.ndarray  # (C,) the test prior assumed: em's estimate, balanced's totals as shares, none's train prior
    train_prior: np.ndarray  # (C,) normalised
    class_weights: np.ndarray  # (C,)
    counts_before: np.ndarray  # (C,) argmax counts of the input (weighted with weights)
    counts_after: np.ndarray  # (C,) argmax counts of `probs`
    iterations: int = 0
    converged: bool = True
    unmet: tuple[int, ...] = field(default=())  # balanced: classes with (near) zero mass that could not meet their totals

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """The same correction on other probabilities of the same rows (each fold model of a member, a stack)."""
        return np.asarray(probs) if self.kind == "none" else reweight(probs, self.class_weights)

    def moved(self, k: int = 5) -> np.ndarray:
        """The k classes whose argmax counts changed most, largest change first."""
        change = np.abs(self.counts_after.astype(np.float64) - self.counts_before)
        return np.argsort(-change, kind="stable")[:k]

    def describe(self, names: Sequence[str], k: int = 5) -> str:
        """One line: the classes moved most, each with its train share, assumed test share and counts before -> after."""
        if self.kind == "none":
            return "none (probabilities as predicted)"
        parts = [f"{names[j]} {self.train_prior[j]:.3f}->{self.prior[j]:.3f} ({self.counts_before[j]:g}->{self.counts_after[j]:g})"
                 for j in self.moved(k) if self.counts_after[j] != self.counts_before[j]]
        head = f"{self.kind} after {self.iterations} iterations" + ("" if self.converged else " (not converged)")
        unmet = f"; {len(self.unmet)} classes without mass cannot meet their totals: " + ", ".join(names[j] for j in self.unmet) \
            if self.unmet else ""
        return f"{head}; moved most (train share->test share (argmax count before->after)): {', '.join(parts) or 'nothing'}{unmet}"


def correct(kind: str, probs: np.ndarray, train_prior: np.ndarray | Sequence[float],
            totals: np.ndarray | Sequence[float] | None = None, weights: np.ndarray | None = None,
            max_iter: int | None = None) -> PriorShift:
    """The prior correction `kind` (none | em | balanced) of `probs` (N, C); `totals` is balanced's (None: equal);
    `max_iter` caps em's iterations (default 1000) or balanced's (default 300)."""
    if kind not in KINDS:
        raise ValueError(f"test_prior {kind!r} is unknown; use one of {', '.join(KINDS)}.")
    p0 = _matrix(probs)
    base = _prior(train_prior, p0.shape[1])
    before = predicted_counts(p0, weights)
    p, v = normalise_rows(p0), _row_weights(weights, p0)
    if kind == "none" or v.sum() <= 0:
        return PriorShift(kind, np.asarray(probs) if kind == "none" else p, base, base, np.ones(len(base)), before, before)
    if kind == "em":
        pi, q, it, ok = _em(p, base, v, 1e-6, max_iter or 1000)
        return PriorShift(kind, q, pi, base, pi / base, before, predicted_counts(q, weights), it, ok)
    t = _totals(totals, p.shape[1])
    q, c, it, ok, unmet = _balance(p, t, v, max_iter or 300, 1e-9, 1e-9)
    shares = t.copy()
    shares[list(unmet)] = 0.0
    return PriorShift(kind, q, shares / shares.sum(), base, c, before, predicted_counts(q, weights), it, ok, unmet)


def check_totals(totals: Sequence[float], n_classes: int, key: str) -> None:
    """A user's `<section>.test_totals` must hold one count per concept (or none: equal totals)."""
    if len(totals) and len(totals) != n_classes:
        raise ConfigError(f"{key} lists {len(totals)} totals but the taxonomy has {n_classes} concepts; give one count per "
                          "concept in taxonomy order, or leave it empty for equal totals.")
