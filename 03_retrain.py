"""Stage 03: k-fold retraining on train + pseudo-labels (phase 2), same trainer as 01; self-training rounds.

Reads:  output/<exp>/00_prepare/, 02_pseudo/pseudo_labels.csv
Writes: output/<exp>/03_retrain/fold_<k>/ (as 01; round 1), 03_retrain/record.json with the CV score;
        with pseudo.rounds R > 1, round_<r>/ for r = 2..R: pseudo/ (as 02, from round r-1's folds) and fold_<k>/
Pseudo-labelled rows only ever join training folds, never validation, weighted by weight**pseudo.weight_power.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from lib.config import Config
from lib.core import graph as pipeline
from lib.core.cli import run_cli, stage_parser
from lib.core.records import read_record

log = logging.getLogger("pipeline")

NAME = "03_retrain"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run, folds_only=bool(args.fold))
    if stage is None:
        return 0
    started = time.time()
    import pandas as pd

    from lib.core.cli import check
    from lib.data.artifacts import load_rois
    from lib.data.taxonomy import load_taxonomy_json
    from lib.engine.rounds import run_round
    from lib.engine.train import cv_summary, run_folds
    from lib.model.device import pick_device

    prep = cfg.out_dir / "00_prepare"
    rois, tax = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    test = rois[rois["split"] == "test"]
    paths = test[["annotation_id"] + [c for c in rois.columns if c.endswith("_path") and c != "testlike_path"]]
    epochs = cfg.retrain.epochs or cfg.train.epochs
    pseudo_csv, rounds = cfg.out_dir / "02_pseudo" / "pseudo_labels.csv", []
    for r in range(1, cfg.pseudo.rounds + 1):
        rs = pipeline.round_stage(stage, r)
        if r > 1:  # this round's pseudo-labels come from the previous round's fold ensemble
            ps = rs.child(f"{rs.name}/pseudo", rs.dir / "pseudo", {"step": "pseudo"})
            if check(ps, args.force, args.dry_run):
                t0 = time.time()
                ps.invalidate()
                prev = pipeline.round_stage(stage, r - 1).dir
                res = run_round(cfg, [prev / f"fold_{k}" for k in range(rounds[-1]["folds"])], test[test["ok"] == 1], tax, ps.dir,
                                pick_device(cfg.train.device), f"{NAME} round {r}")
                ps.finish(res, t0)
            elif args.dry_run and (args.force or ps.reasons()):
                return 0  # this round and the ones after it would run
            pseudo_csv = ps.dir / "pseudo_labels.csv"
        extra = pd.read_csv(pseudo_csv).merge(paths, on="annotation_id", how="inner")
        extra["weight"] = extra["weight"] ** cfg.pseudo.weight_power
        cv = run_folds(cfg, rs, rois=rois, taxonomy=tax, epochs=epochs, only=args.fold, force=args.force, dry_run=args.dry_run,
                       extra=extra)
        if cv is None and args.dry_run:  # a round complete and current lets the dry run judge the next one
            cv = None if args.force else cv_summary(rs, int(rois.loc[rois["split"] == "train", "fold"].max()) + 1, tax)
        if cv is None:
            if not args.dry_run:
                log.info("%s: some folds of round %d are not done yet; the stage record is written once all are", NAME, r)
            return 0
        cv["pseudo_rows"] = len(extra)
        rounds.append(cv)
        log.info("%s round %d: CV distance %.4f, top1 %.3f, test-like view %.4f, with %d pseudo-labels", NAME, r, cv["cv_distance"],
                 cv["cv_top1"], cv.get("cv_distance_testlike", float("nan")), len(extra))
    if args.dry_run:
        return 0
    last = pipeline.round_stage(stage, cfg.pseudo.rounds)
    result = {**rounds[-1], "rounds": len(rounds), "fold_root": str(last.dir.relative_to(stage.dir)),
              "per_round": [{k: v for k, v in c.items() if k.startswith("cv_") or k == "pseudo_rows"} for c in rounds]}
    stage.finish(result, started)
    phase1 = (read_record(cfg.out_dir / "01_train" / "record.json") or {}).get("result", {})
    log.info("%s: CV distance %.4f (phase 1: %.4f), top1 %.3f (phase 1: %.3f), test-like view %.4f (phase 1: %.4f), after %d round(s)",
             NAME, result["cv_distance"], phase1.get("cv_distance", float("nan")), result["cv_top1"], phase1.get("cv_top1", float("nan")),
             result.get("cv_distance_testlike", float("nan")), phase1.get("cv_distance_testlike", float("nan")), len(rounds))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0], folds=True), argv)


if __name__ == "__main__":
    sys.exit(main())
