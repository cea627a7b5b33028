"""Stage 01: k-fold training of a timm backbone on the train ROIs (phase 1).

Reads:  output/<exp>/00_prepare/ rois.csv, crops/, taxonomy.json
Writes: output/<exp>/01_train/fold_<k>/ best.pt last.pt oof.npz history.csv curves.png record.json;
        01_train/record.json with the out-of-fold CV score once every fold is done
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from lib.config import Config
from lib.pipeline import fold_parallel, graph
from lib.pipeline.cli import run_cli, stage_parser

log = logging.getLogger("pipeline")

NAME = "01_train"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """The stage body: decide, train the folds not up to date, record the CV once every fold is done."""
    started, only, force = time.time(), args.fold, args.force
    spread = fold_parallel.plan(cfg, NAME, args.fold, args.force, args.dry_run)  # several GPUs: one process each
    if spread is not None and spread.mode == "torchrun":
        return fold_parallel.relaunch_torchrun(spread, NAME, args)
    if spread is not None:  # the children trained the folds; what is left is a plain run's end: the CV and the record
        stage, only, force = fold_parallel.train_spread(cfg, NAME, spread, args), None, False
    else:
        stage = graph.begin(cfg, NAME, args.force, args.dry_run, folds_only=bool(args.fold))
    if stage is None:
        return 0
    from lib.data.artifacts import load_prepared
    from lib.engine.folds import run_folds
    from lib.model.dist import close

    prep = load_prepared(cfg)
    try:
        cv = run_folds(cfg, stage, rois=prep.rois, taxonomy=prep.taxonomy, epochs=cfg.train.epochs, only=only, force=force,
                       dry_run=args.dry_run)
    finally:
        close()  # under torchrun: leave the process group
    if cv is None:
        if not args.dry_run:
            log.info("%s: some folds are not done yet; the stage record is written once all are", NAME)
        return 0
    stage.finish(cv.to_record(), started)
    log.info("%s: CV distance %.4f (folds %.3f +- %.3f), top1 %.3f over %d folds%s", NAME, cv.cv_distance, cv.fold_distance_mean,
             cv.fold_distance_std, cv.cv_top1, cv.folds,
             f"; test-like view {cv.cv_distance_testlike:.4f}" if cv.cv_distance_testlike is not None else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: flags and config, then `run`; exit code 2 with one sentence on a user error."""
    return run_cli(run, stage_parser(__doc__.splitlines()[0], folds=True), argv)


if __name__ == "__main__":
    sys.exit(main())
