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
from lib.core import graph as pipeline
from lib.core.cli import run_cli, stage_parser

log = logging.getLogger("pipeline")

NAME = "01_train"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run, folds_only=bool(args.fold))
    if stage is None:
        return 0
    started = time.time()
    from lib.data.artifacts import load_rois
    from lib.data.taxonomy import load_taxonomy_json
    from lib.engine.train import run_folds

    prep = cfg.out_dir / "00_prepare"
    rois, taxonomy = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    cv = run_folds(cfg, stage, rois=rois, taxonomy=taxonomy, epochs=cfg.train.epochs, only=args.fold, force=args.force,
                   dry_run=args.dry_run)
    if cv is None:
        if not args.dry_run:
            log.info("%s: some folds are not done yet; the stage record is written once all are", NAME)
        return 0
    stage.finish(cv, started)
    log.info("%s: CV distance %.4f (folds %.3f +- %.3f), top1 %.3f over %d folds%s", NAME, cv["cv_distance"], cv["fold_distance_mean"],
             cv["fold_distance_std"], cv["cv_top1"], cv["folds"],
             f"; test-like view {cv['cv_distance_testlike']:.4f}" if "cv_distance_testlike" in cv else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0], folds=True), argv)


if __name__ == "__main__":
    sys.exit(main())
