"""Decoding probabilities into concepts, and the adjustments made just before it.

`min_risk` answers the concept j minimising the expected competition distance sum_i p_i D[i, j]
rather than the most probable one: under taxonomic scoring a confident genus-level answer often
beats a coin-flip between two species. Before decoding, `logit_adjust` removes the train prior
(long-tail correction) and `backoff_decode` answers uncertain rows at a coarse rank only.
"""
from __future__ import annotations

import numpy as np

from lib.data.taxonomy import RANKS, Taxonomy

EPS = 1e-12


def expected_distance(probs: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """E[d | predict j] for every row and concept j: probs @ D (D[i, j] = d(truth i, prediction j))."""
    return np.asarray(probs, dtype=np.float64) @ np.asarray(dist, dtype=np.float64)


def decode(probs: np.ndarray, dist: np.ndarray, method: str, allowed: np.ndarray | None = None) -> np.ndarray:
    """Labels from probabilities: `argmax` or `min_risk`, optionally only among the `allowed` concepts (bool, (C,))."""
    if method == "argmax":
        score = np.asarray(probs, dtype=np.float64)
    elif method == "min_risk":
        score = -expected_distance(probs, dist)
    else:
        raise ValueError(f"unknown decoding '{method}'")
    if allowed is not None:
        if not np.any(allowed):
            raise ValueError("decode was given no allowed concept; allow at least one.")
        score = np.where(np.asarray(allowed, dtype=bool)[None, :], score, -np.inf)
    return score.argmax(1)


def prior_answer(class_counts: np.ndarray, dist: np.ndarray) -> int:
    """The concept of least expected distance under the train prior (for ROIs with no crop)."""
    prior = np.asarray(class_counts, dtype=np.float64)
    prior = prior / prior.sum()
    return int(expected_distance(prior[None], dist)[0].argmin())


# ----------------------------------------------------------------------------- adjustments before decoding


def logit_adjust(probs: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Post-hoc logit adjustment (Menon et al. 2021): p_j ∝ p_j / prior_j^tau, rows renormalised.

    Undoes the train set's class prior so tail concepts are not drowned by head ones; tau 0 and
    a uniform prior both leave the probabilities as they are. Unseen classes get the smallest
    positive prior rather than a division by zero.
    """
    p = np.asarray(probs, dtype=np.float64)
    if tau == 0:
        return p / np.maximum(p.sum(1, keepdims=True), EPS)
    pr = np.asarray(prior, dtype=np.float64)
    pr = pr / pr.sum()
    pr = np.where(pr > 0, pr, pr[pr > 0].min() if np.any(pr > 0) else 1.0)
    out = p * pr[None, :] ** (-tau)
    return out / np.maximum(out.sum(1, keepdims=True), EPS)


def concept_depth(taxonomy: Taxonomy) -> np.ndarray:
    """Per concept, the index in RANKS of its deepest rank; exceptions count one rank deeper (they hang below it)."""
    deepest = [max((i for i, v in enumerate(lin) if v is not None), default=-1) for lin in taxonomy.lineages]
    return np.array([d + (n in taxonomy.exceptions) for d, n in zip(deepest, taxonomy.names)], dtype=np.int64)


def at_or_above(taxonomy: Taxonomy, rank: str) -> np.ndarray:
    """Bool mask of the concepts no deeper than `rank` (e.g. `order`: orders, classes, phyla, ...)."""
    if rank not in RANKS:
        raise ValueError(f"Unknown rank '{rank}'; choose one of {', '.join(RANKS)}.")
    return concept_depth(taxonomy) <= RANKS.index(rank)


def backoff_decode(probs: np.ndarray, dist: np.ndarray, taxonomy: Taxonomy, rank: str, tau: float,
                   method: str = "min_risk", uncertain: np.ndarray | None = None) -> np.ndarray:
    """Decode by `method`, but rows whose top probability is below `tau` by min-risk among concepts at or above `rank`.

    A novelty back-off: an unsure fine answer is traded for a sure coarse one. `uncertain`
    (bool per row) replaces the `tau` test, e.g. a two-level head's `novelty()["novel"]`.
    Where no concept lies at or above `rank`, uncertain rows keep their ordinary answer.
    """
    p = np.asarray(probs, dtype=np.float64)
    out = decode(p, dist, method)
    low = p.max(1) < tau if uncertain is None else np.asarray(uncertain, dtype=bool)
    allowed = at_or_above(taxonomy, rank)
    if low.any() and allowed.any():
        out[low] = decode(p[low], dist, "min_risk", allowed)
    return out
