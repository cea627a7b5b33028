"""Stage 03: k-fold retraining on train + pseudo-labels (phase 2), same trainer as 01.

Reads:  output/<exp>/00_prepare/, 02_pseudo/pseudo_labels.csv
Writes: output/<exp>/03_retrain/fold_<k>/ (as 01), 03_retrain/record.json with the CV score
Pseudo-labelled rows only ever join training folds, never validation, weighted by weight**pseudo.weight_power.
"""
from __future__ import annotations

import argparse
import sys
import time

from lib import pipeline
from lib.config import Config
from lib.stages import log, read_record, run_cli, stage_parser

NAME = "03_retrain"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run, folds_only=bool(args.fold))
    if stage is None:
        return 0
    started = time.time()
    import pandas as pd

    from lib.prepare import load_rois
    from lib.taxonomy import load_taxonomy_json
    from lib.train import run_folds

    prep = cfg.out_dir / "00_prepare"
    rois, tax = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    pseudo = pd.read_csv(cfg.out_dir / "02_pseudo" / "pseudo_labels.csv")
    test = rois[rois["split"] == "test"][["annotation_id"] + [c for c in rois.columns if c.endswith("_path") and c != "testlike_path"]]
    extra = pseudo.merge(test, on="annotation_id", how="inner")
    extra["weight"] = extra["weight"] ** cfg.pseudo.weight_power
    epochs = cfg.retrain.epochs or cfg.train.epochs
    cv = run_folds(cfg, stage, rois, tax, epochs, args.fold, args.force, args.dry_run, extra=extra)
    if cv is None:
        if not args.dry_run:
            log.info("%s: some folds are not done yet; the stage record is written once all are", NAME)
        return 0
    cv["pseudo_rows"] = len(extra)
    stage.finish(cv, started)
    phase1 = (read_record(cfg.out_dir / "01_train" / "record.json") or {}).get("result", {})
    log.info("%s: CV distance %.4f (phase 1: %.4f), top1 %.3f (phase 1: %.3f), test-like view %.4f (phase 1: %.4f), with %d pseudo-labels",
             NAME, cv["cv_distance"], phase1.get("cv_distance", float("nan")), cv["cv_top1"], phase1.get("cv_top1", float("nan")),
             cv.get("cv_distance_testlike", float("nan")), phase1.get("cv_distance_testlike", float("nan")), len(extra))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0], folds=True), argv)


if __name__ == "__main__":
    sys.exit(main())
