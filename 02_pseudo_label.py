"""Stage 02: the phase-1 fold ensemble on the test ROIs (with TTA) -> pseudo-labels (round 1).

Reads:  output/<exp>/00_prepare/ (rois.csv, crops, taxonomy.json), 01_train/fold_<k>/best.pt
Writes: output/<exp>/02_pseudo/ test_probs.npz, pseudo_labels.csv, umap.png, summary.md, record.json
Selection: pseudo.methods (confidence, vote with GMU, cluster_core); see lib/pseudo.py.
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

NAME = "02_pseudo"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    from lib.data.artifacts import load_rois
    from lib.data.taxonomy import load_taxonomy_json
    from lib.engine.rounds import run_round
    from lib.model.device import pick_device

    prep = cfg.out_dir / "00_prepare"
    rois, tax = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    test = rois[(rois["split"] == "test") & (rois["ok"] == 1)]
    fold_dirs = pipeline.fold_dirs(cfg, "01_train")
    result = run_round(cfg, fold_dirs, test, tax, stage.dir, pick_device(cfg.train.device), f"{NAME} (round 1)")
    stage.finish(result, started)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
