"""Stage 03: k-fold retraining on train + pseudo-labels (phase 2), same trainer as 01; self-training rounds.

Reads:  output/<exp>/00_prepare/, 02_pseudo/pseudo_labels.csv
Writes: output/<exp>/03_retrain/fold_<k>/ (as 01; round 1), 03_retrain/record.json with the CV score;
        with pseudo.rounds R > 1, round_<r>/ for r = 2..R: pseudo/ (as 02, from round r-1's folds) and fold_<k>/
Pseudo-labelled rows only ever join training folds, never validation, weighted by weight**pseudo.weight_power.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from typing import Callable

from lib.config import Config
from lib.modelref import ModelRef
from lib.pipeline import fold_parallel, graph
from lib.pipeline.cli import run_cli, stage_parser
from lib.pipeline.records import Stage

log = logging.getLogger("pipeline")

NAME = "03_retrain"


def pseudo_label_round(cfg: Config, force: bool) -> Callable[[Stage, int], None]:
    """Round r's pseudo-labels from round r-1's folds, for the fold-parallel parent between the rounds it spreads."""
    def make(stage: Stage, r: int) -> None:
        from lib.data.artifacts import load_prepared
        from lib.engine.selftrain import round_pseudo_labels

        prep = load_prepared(cfg)
        round_pseudo_labels(cfg, stage, r, prep.n_folds, prep, force, False)

    return make


def run(args: argparse.Namespace, cfg: Config) -> int:
    """The stage body: decide, run the self-training rounds not up to date, record the last round's CV."""
    started, only, force = time.time(), args.fold, args.force
    spread = fold_parallel.plan(cfg, NAME, args.fold, args.force, args.dry_run)  # several GPUs: one process each
    if spread is not None and spread.mode == "torchrun":
        return fold_parallel.relaunch_torchrun(spread, NAME, args)
    if spread is not None:  # the children trained the folds (round by round); the CV and the record are a plain run's
        stage, only, force = fold_parallel.train_spread(cfg, NAME, spread, args, pseudo_label=pseudo_label_round(cfg, args.force)), None, False
    else:
        stage = graph.begin(cfg, NAME, args.force, args.dry_run, folds_only=bool(args.fold))
    if stage is None:
        return 0
    from lib.data.artifacts import load_prepared
    from lib.engine.selftrain import run_rounds
    from lib.model.dist import close

    try:
        rounds = run_rounds(cfg, stage, load_prepared(cfg), only=only, force=force, dry_run=args.dry_run)
    finally:
        close()  # under torchrun: leave the process group
    if rounds is None:  # a dry run, or some fold not done yet
        return 0
    result = rounds.to_record()
    stage.finish(result, started)
    phase1 = graph.member_result(cfg, ModelRef.parse("phase1"))
    log.info("%s: CV distance %.4f (phase 1: %.4f), top1 %.3f (phase 1: %.3f), test-like view %.4f (phase 1: %.4f), after %d round(s)",
             NAME, result["cv_distance"], phase1.get("cv_distance", math.nan), result["cv_top1"], phase1.get("cv_top1", math.nan),
             result.get("cv_distance_testlike", math.nan), phase1.get("cv_distance_testlike", math.nan), len(rounds.rounds))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: flags and config, then `run`; exit code 2 with one sentence on a user error."""
    return run_cli(run, stage_parser(__doc__.splitlines()[0], folds=True), argv)


if __name__ == "__main__":
    sys.exit(main())
