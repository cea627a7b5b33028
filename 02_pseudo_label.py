"""Stage 02: the fold ensembles of pseudo.members (phase 1 by default) on the test ROIs (with TTA) -> pseudo-labels (round 1).

Reads:  output/<exp>/00_prepare/ (rois.csv, crops, taxonomy.json), 01_train/fold_<k>/ (best.pt; oof.npz under pseudo.calibrate),
        and for a member <exp2>/<model> of pseudo.members output/<exp2>/00_prepare/ and its training stage's folds
Writes: output/<exp>/02_pseudo/ test_probs.npz, pseudo_labels.csv, umap.png, summary.md, record.json
Selection: pseudo.methods (confidence, vote with GMU, cluster_core); see lib/decide/pseudo.py. pseudo.frame_context: stack
adjusts the test probabilities by the other ROIs of each frame first (lib/decide/frame_context.py), pseudo.test_prior corrects
them for label shift (lib/decide/prior.py).
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

NAME = "02_pseudo"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """The stage body: decide, label the test ROIs with 01's fold ensemble, record."""
    stage = graph.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    from lib.data.artifacts import load_prepared
    from lib.decide.frame_context import FrameIndex
    from lib.engine.members import load_members
    from lib.engine.rounds import run_round
    from lib.model.device import pick_device

    prep = load_prepared(cfg)
    members = load_members(cfg, cfg.pseudo.members, prep)
    result = run_round(cfg, members, prep.test, prep.taxonomy, stage.dir, pick_device(cfg.train.device), f"{NAME} (round 1)",
                       FrameIndex.from_rois(prep.rois, prep.taxonomy.n_classes))
    stage.finish(result, started)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: flags and config, then `run`; exit code 2 with one sentence on a user error."""
    return run_cli(run, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
