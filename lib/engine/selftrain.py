"""03's self-training: rounds 1..R of k-fold retraining on train + pseudo-labels (phase 2).

Round 1 trains on 02's pseudo-labels in 03's own folder; round r > 1 first labels the test ROIs
with round r-1's fold ensemble (and the other experiments' members of pseudo.members) (`round_<r>/pseudo/`, as 02 does) and trains in `round_<r>/`.
Each round and each fold decides for itself (lib.pipeline.graph.round_stage), so raising
`pseudo.rounds` trains only the new rounds, and a `--fold K` run trains fold K of every round.
Pseudo-labelled rows only ever join training folds, never validation (lib.engine.folds.fold_splits).

Kept apart from lib.engine.rounds (one pseudo-labelling round, which 02 runs too) so that 02's code
digest does not take in the trainer.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pandas as pd

from lib.config import Config
from lib.data.artifacts import Prepared
from lib.data.resample import GEOMETRY
from lib.decide.frame_context import FrameIndex
from lib.engine.folds import cv_summary, run_folds
from lib.engine.members import Member, load_members
from lib.engine.results import RoundResult, SelfTraining
from lib.engine.rounds import run_round
from lib.model import dist as ddp
from lib.model.device import pick_device
from lib.pipeline import graph
from lib.pipeline.cli import check
from lib.pipeline.records import Stage

log = logging.getLogger("pipeline")


def pseudo_rows(cfg: Config, pseudo_csv: Path, rois: pd.DataFrame) -> pd.DataFrame:
    """A round's extra training rows: its pseudo-labels with their test ROIs' crop paths, frames (split, image_id), boxes and
    frame sizes, weights raised to pseudo.weight_power."""
    test = rois[rois["split"] == "test"]
    paths = test[["annotation_id"] + [c for c in rois.columns if c.endswith("_path") and c != "testlike_path"]
                 + [c for c in ("split", "image_id", *GEOMETRY) if c in rois]]
    extra = pd.read_csv(pseudo_csv).merge(paths, on="annotation_id", how="inner")
    extra["weight"] = extra["weight"] ** cfg.pseudo.weight_power
    return extra


def round_pseudo_labels(cfg: Config, stage: Stage, r: int, n_folds: int, prep: Prepared, force: bool, dry_run: bool) -> Path | None:
    """Round r's (r > 1) pseudo_labels.csv, made from round r-1's `n_folds` fold models unless current.

    None when a dry run finds they would be made: this round and the ones after it would run.
    Under torchrun rank 0 makes them while the other ranks wait.
    """
    rs = graph.round_stage(stage, r)
    ps = rs.child(f"{rs.name}/pseudo", rs.dir / "pseudo", {"step": "pseudo"})
    if check(ps, force, dry_run):
        ddp.barrier()  # every rank has decided before rank 0 voids the record
        if ddp.is_main():
            t0 = time.time()
            ps.invalidate()
            prev = graph.round_stage(stage, r - 1).dir
            own = Member(f"round{r - 1}", cfg, [prev / f"fold_{k}" for k in range(n_folds)], prep.test)
            others = load_members(cfg, [m for m in cfg.pseudo.members if "/" in m], prep)  # other experiments label every round
            res = run_round(cfg, [own, *others], prep.test, prep.taxonomy, ps.dir, pick_device(cfg.train.device),
                            f"{stage.name} round {r}", FrameIndex.from_rois(prep.rois, prep.taxonomy.n_classes))
            ps.finish(res, t0)
        ddp.barrier()  # the other ranks read rank 0's pseudo-labels
    elif dry_run and (force or ps.reasons()):
        return None
    return ps.dir / "pseudo_labels.csv"


def train_round(cfg: Config, stage: Stage, r: int, prep: Prepared, extra: pd.DataFrame, only: list[int] | None, force: bool,
                dry_run: bool) -> RoundResult | None:
    """Round r's folds, trained where not current; its result once every fold is done (in a dry run: once current)."""
    rs = graph.round_stage(stage, r)
    epochs = cfg.retrain.epochs or cfg.train.epochs
    cv = run_folds(cfg, rs, rois=prep.rois, taxonomy=prep.taxonomy, epochs=epochs, only=only, force=force, dry_run=dry_run,
                   extra=extra)
    if cv is None and dry_run:  # a round complete and current lets the dry run judge the next one
        cv = None if force else cv_summary(rs, prep.n_folds, prep.taxonomy)
    if cv is None:
        if not dry_run:
            log.info("%s: some folds of round %d are not done yet; the stage record is written once all are", stage.name, r)
        return None
    testlike = cv.cv_distance_testlike if cv.cv_distance_testlike is not None else math.nan
    log.info("%s round %d: CV distance %.4f, top1 %.3f, test-like view %.4f, with %d pseudo-labels", stage.name, r, cv.cv_distance,
             cv.cv_top1, testlike, len(extra))
    return RoundResult(cv, len(extra))


def run_rounds(cfg: Config, stage: Stage, prep: Prepared, *, only: list[int] | None, force: bool, dry_run: bool) -> SelfTraining | None:
    """Rounds 1..pseudo.rounds, reusing those already trained; None while some fold is not done, on a dry run, and on
    every torchrun rank but 0 (which go through the rounds with rank 0, as rank 0 decides)."""
    pseudo_csv = cfg.out_dir / "02_pseudo" / "pseudo_labels.csv"
    done: list[RoundResult] = []
    for r in range(1, cfg.pseudo.rounds + 1):
        if r > 1:  # this round's pseudo-labels come from the previous round's fold ensemble
            found = round_pseudo_labels(cfg, stage, r, prep.n_folds, prep, force, dry_run)
            if found is None:
                return None
            pseudo_csv = found
        result = train_round(cfg, stage, r, prep, pseudo_rows(cfg, pseudo_csv, prep.rois), only, force, dry_run)
        if not ddp.broadcast_flag(result is not None):  # rank 0's result decides; the other ranks never have one
            return None
        if result is not None:
            done.append(result)
    if dry_run or not ddp.is_main():
        return None
    last = graph.round_stage(stage, cfg.pseudo.rounds)
    return SelfTraining(tuple(done), str(last.dir.relative_to(stage.dir)))
