"""Stage 02: the phase-1 fold ensemble on the test ROIs -> confident pseudo-labels.

Reads:  output/<exp>/00_prepare/ (rois.csv, crops, taxonomy.json), 01_train/fold_<k>/best.pt
Writes: output/<exp>/02_pseudo/ test_probs.npz, pseudo_labels.csv, record.json
"""
from __future__ import annotations

import argparse
import sys
import time

from lib import pipeline
from lib.config import Config
from lib.stages import log, run_cli, stage_parser

NAME = "02_pseudo"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    import numpy as np

    from lib.context import model_inputs
    from lib.models import pick_device
    from lib.predict import predict_folds
    from lib.prepare import load_rois
    from lib.pseudo import select_confident
    from lib.stages import atomic_path
    from lib.taxonomy import load_taxonomy_json

    prep = cfg.out_dir / "00_prepare"
    rois, tax = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    test = rois[(rois["split"] == "test") & (rois["ok"] == 1)]
    fold_dirs = pipeline.fold_dirs(cfg, "01_train")
    probs = predict_folds(fold_dirs, model_inputs(test, cfg.model.context), cfg, tax, pick_device(cfg.train.device))
    mean = probs.mean(0)
    with atomic_path(stage.dir / "test_probs.npz") as tmp:
        np.savez(tmp, annotation_id=test["annotation_id"].to_numpy(), probs=probs, mean=mean)
    pseudo = select_confident(test["annotation_id"].to_numpy(), mean, cfg.pseudo.threshold)
    pseudo.insert(2, "concept_name", [tax.names[i] for i in pseudo["label"]])
    with atomic_path(stage.dir / "pseudo_labels.csv") as tmp:
        pseudo.to_csv(tmp, index=False)
    result = {"test_rois": len(test), "models": len(fold_dirs), "pseudo_labels": len(pseudo),
              "mean_weight": float(pseudo["weight"].mean()) if len(pseudo) else None}
    stage.finish(result, started)
    log.info("%s: %d of %d test ROIs pseudo-labelled (threshold %.2f)", NAME, len(pseudo), len(test), cfg.pseudo.threshold)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
