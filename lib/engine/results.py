"""What training stages hand on: the CV summary of a fold set (01, each round of 03) and 03's rounds.

Each has `to_record()`, the dict its stage writes as `record.json`'s result (the keys reports and
later stages read).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class CVSummary:
    """Out-of-fold scores over every fold of one training run; the test-like view's where every fold has one."""

    cv_distance: float
    cv_top1: float
    folds: int
    oof_rows: int
    fold_distance_mean: float
    fold_distance_std: float
    cv_distance_testlike: float | None = None
    cv_top1_testlike: float | None = None

    def to_record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class RoundResult:
    """One self-training round of 03: its folds' CV and how many pseudo-labelled rows joined training."""

    cv: CVSummary
    pseudo_rows: int

    def to_record(self) -> dict[str, Any]:
        return {**self.cv.to_record(), "pseudo_rows": self.pseudo_rows}

    def scores(self) -> dict[str, Any]:
        """The round's entry of 03's `per_round`: its CV figures and pseudo-label count."""
        return {k: v for k, v in self.to_record().items() if k.startswith("cv_") or k == "pseudo_rows"}


@dataclass(frozen=True)
class SelfTraining:
    """03's rounds 1..R, the last one's folds (under `fold_root`, relative to 03's folder) being phase 2."""

    rounds: tuple[RoundResult, ...]
    fold_root: str

    @property
    def last(self) -> RoundResult:
        return self.rounds[-1]

    def to_record(self) -> dict[str, Any]:
        return {**self.last.to_record(), "rounds": len(self.rounds), "fold_root": self.fold_root,
                "per_round": [r.scores() for r in self.rounds]}
