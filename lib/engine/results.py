"""What training stages hand on: a fold's result, the CV summary of a fold set (01, each round of 03) and 03's rounds.

Each has `to_record()`, the dict its stage writes as `record.json`'s result (the keys reports and
later stages read).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FoldResult:
    """One trained fold: its best epoch, that epoch's validation scores and the rows it trained and validated on.

    `scores` holds every `val_*` figure of the best epoch: distance and top-1, accuracy per rank,
    top-1 on head / middle / tail classes and, where 00 cut them, the test-like view's.
    `validated_epochs` are the epochs the best was chosen among (`train.val_every`);
    `loader_workers` the training loader's workers (they seed its augmentation; `auto` resolves per host).
    """

    best_epoch: int
    scores: dict[str, float]
    n_train: int
    n_val: int
    validated_epochs: tuple[int, ...] = ()
    loader_workers: int | None = None

    @property
    def val_distance(self) -> float:
        return self.scores["val_distance"]

    def to_record(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"validated_epochs": list(self.validated_epochs)} if self.validated_epochs else {}
        if self.loader_workers is not None:
            extra["loader_workers"] = self.loader_workers
        return {"best_epoch": self.best_epoch, **self.scores, "n_train": self.n_train, "n_val": self.n_val, **extra}


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
