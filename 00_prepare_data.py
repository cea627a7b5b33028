"""Stage 00: competition JSON + frames -> ROI crops, folds grouped by frame, the taxonomy.

Reads:  data.root/{train_json,test_json,train_images,test_images}, data.taxonomy_csv
Writes: output/<exp>/00_prepare/ rois.csv, extra_rois.csv, crops/, crops_manifest.json, taxonomy.json, rejects.csv, summary.json, record.json
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from lib.config import Config
from lib.pipeline import graph
from lib.pipeline.cli import run_cli, stage_parser

log = logging.getLogger("pipeline")

NAME = "00_prepare"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """The stage body: (download the frames, fetch the extra data,) decide, prepare, write, record."""
    if args.extra:  # shorthand for data.extra=[fathomnet]: a run without it prepares without the extra rows
        cfg.data.extra = sorted({*cfg.data.extra, args.extra})
    if args.download and not args.dry_run:
        from lib.data.prepare import fetch_frames

        graph.preflight(cfg, NAME, frames=False)
        graph.lock(cfg, NAME)  # one download at a time into the same frames
        fetch_frames(cfg, download=True)  # before the fingerprint: downloads change the inputs
    if cfg.data.extra and not args.dry_run:
        from lib.data.prepare import fetch_extra

        graph.preflight(cfg, NAME)
        graph.lock(cfg, NAME)
        fetch_extra(cfg)  # cached in data.extra_dir: online once, then offline
    stage = graph.begin(cfg, NAME, args.force or _crops_lost(cfg), args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    from lib.data.prepare import prepare

    prep = prepare(cfg, stage.dir)
    prep.write(stage.dir)
    stage.finish(prep.to_record(), started)
    prep.log_summary(NAME)
    log.info("%s: done in %.1fs", NAME, time.time() - started)
    return 0


def _crops_lost(cfg: Config) -> bool:
    """True (with a warning naming them) when crops 00's record vouches for are lost, emptied or changed: 00 runs again."""
    from lib.data.manifest import crop_problems
    from lib.pipeline.records import read_record

    folder = cfg.out_dir / NAME
    problems = crop_problems(folder, (read_record(folder / "record.json") or {}).get("result"))
    if problems:
        log.warning("%s: the crops are not those its record vouches for (%s); cutting them again", NAME, "; ".join(problems))
    return bool(problems)


def main(argv: list[str] | None = None) -> int:
    """The command line: flags and config, then `run`; exit code 2 with one sentence on a user error."""
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--download", action="store_true", help="fetch missing frames from each image's coco_url first")
    parser.add_argument("--extra", choices=["fathomnet"],
                        help="add train-only rows from the FathomNet Database (fetched once online into data.extra_dir, then reused)")
    return run_cli(run, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
