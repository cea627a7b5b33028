"""Stage 00: competition JSON + frames -> ROI crops, folds grouped by frame, the taxonomy.

Reads:  data.root/{train_json,test_json,train_images,test_images}, data.taxonomy_csv
Writes: output/<exp>/00_prepare/ rois.csv, crops/, taxonomy.json, rejects.csv, record.json
"""
from __future__ import annotations

import argparse
import sys
import time

from lib import pipeline
from lib.config import Config
from lib.stages import (
    atomic_path,
    atomic_write_json,
    log,
    run_cli,
    save_resolved_config,
    setup_logging,
    stage_parser,
)

NAME = "00_prepare"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.stage(cfg, NAME)
    if not pipeline.decide(cfg, stage, args.force, args.dry_run):
        return 0
    started = time.time()
    from lib.prepare import prepare

    stage.invalidate()
    setup_logging(stage.dir)
    save_resolved_config(cfg, stage.dir)
    prep = prepare(cfg, stage.dir)
    with atomic_path(stage.dir / "rois.csv") as tmp:
        prep.rois.to_csv(tmp, index=False)
    with atomic_path(stage.dir / "rejects.csv") as tmp:
        prep.rejects.to_csv(tmp, index=False)
    atomic_write_json(stage.dir / "taxonomy.json", prep.taxonomy.to_json())
    counts = prep.rois.groupby("split")["ok"].agg(["size", "sum"]).to_dict("index")
    result = {
        "train_rois": int(counts.get("train", {}).get("sum", 0)),
        "test_rois": int(counts.get("test", {}).get("size", 0)),
        "test_rois_without_crop": int(counts.get("test", {}).get("size", 0) - counts.get("test", {}).get("sum", 0)),
        "rejects": len(prep.rejects),
        "classes": prep.taxonomy.n_classes,
    }
    stage.finish(result, started)
    log.info("%s: done in %.1fs: %s", NAME, time.time() - started, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
