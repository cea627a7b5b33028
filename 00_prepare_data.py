"""Stage 00: competition JSON + frames -> ROI crops, folds grouped by frame, the taxonomy.

Reads:  data.root/{train_json,test_json,train_images,test_images}, data.taxonomy_csv
Writes: output/<exp>/00_prepare/ rois.csv, crops/, taxonomy.json, rejects.csv, record.json
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from lib.config import Config
from lib.core import graph as pipeline
from lib.core.cli import run_cli, stage_parser
from lib.core.io import atomic_path, atomic_write_json

log = logging.getLogger("pipeline")

NAME = "00_prepare"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    if args.download and not args.dry_run:
        from lib.data.prepare import fetch_frames

        pipeline.preflight(cfg, NAME, frames=False)
        pipeline.lock(cfg, NAME)  # one download at a time into the same frames
        fetch_frames(cfg, download=True)  # before the fingerprint: downloads change the inputs
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    from lib.data.prepare import prepare

    prep = prepare(cfg, stage.dir)
    with atomic_path(stage.dir / "rois.csv") as tmp:
        prep.rois.to_csv(tmp, index=False)
    with atomic_path(stage.dir / "rejects.csv") as tmp:
        prep.rejects.to_csv(tmp, index=False)
    atomic_write_json(stage.dir / "taxonomy.json", prep.taxonomy.to_json())
    atomic_write_json(stage.dir / "summary.json", prep.summary)
    counts = prep.rois.groupby("split")["ok"].agg(["size", "sum"]).to_dict("index")
    result = {
        "train_rois": int(counts.get("train", {}).get("sum", 0)),
        "test_rois": int(counts.get("test", {}).get("size", 0)),
        "test_rois_without_crop": int(counts.get("test", {}).get("size", 0) - counts.get("test", {}).get("sum", 0)),
        "rejects": len(prep.rejects),
        "classes": prep.taxonomy.n_classes,
    }
    stage.finish(result, started)
    s = prep.summary
    log.info("%s: %s", NAME, ", ".join(f"{k} {v['usable']}/{v['rows']} usable" for k, v in s["rois"].items()))
    log.info("%s: %d classes, %d..%d train boxes per class; box side quantiles %s: train %s, test %s", NAME, s["classes"],
             *s["per_class_min_max"], s["box_side_quantiles"]["q"], s["box_side_quantiles"]["train"], s["box_side_quantiles"]["test"])
    for reason, n in s["rejects"].items():
        log.info("%s: rejected %d x %s", NAME, n, reason)
    log.info("%s: done in %.1fs", NAME, time.time() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--download", action="store_true", help="fetch missing frames from each image's coco_url first")
    return run_cli(main_, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
