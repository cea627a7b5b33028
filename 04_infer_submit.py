"""Stage 04: every model's test probabilities (cached per model) -> blend -> decode -> submission.csv.

Reads:  output/<exp>/00_prepare/, 01_train/fold_<k>/best.pt, 03_retrain/fold_<k>/best.pt, data.test_json
Writes: output/<exp>/04_submit/ probs/<model>.npz, submission.csv, fallbacks.csv, report.md, record.json
"""
from __future__ import annotations

import argparse
import sys
import time

from lib import pipeline
from lib.config import Config
from lib.stages import log, run_cli, stage_parser

NAME = "04_submit"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    import numpy as np
    import pandas as pd

    from lib.coco import read_coco
    from lib.ensemble import blend, decode, prior_answer
    from lib.prepare import load_rois
    from lib.report import submit_report
    from lib.stages import (
        atomic_path,
        atomic_write_text,
        cached_npz,
        read_record,
    )
    from lib.submission import assemble, write_submission
    from lib.taxonomy import load_taxonomy_json

    prep = cfg.out_dir / "00_prepare"
    rois, tax = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    test = rois[(rois["split"] == "test") & (rois["ok"] == 1)]
    ids = test["annotation_id"].to_numpy()

    models = {}
    for m in cfg.submit.models:
        folds = pipeline.fold_dirs(cfg, pipeline.PHASE_STAGES[m])
        key = f"{stage.fingerprint['inputs'][pipeline.PHASE_STAGES[m]]}|{cfg.model.backbone}|{cfg.model.img_size}|{cfg.head}|{len(ids)}"

        def compute(folds: list = folds) -> dict:
            from lib.context import model_inputs
            from lib.models import pick_device
            from lib.predict import predict_folds

            p = predict_folds(folds, model_inputs(test, cfg.model.context), cfg, tax, pick_device(cfg.train.device))
            return {"annotation_id": ids, "probs": p.mean(0)}

        arrays, hit = cached_npz(stage.dir / "probs" / f"{m}.npz", key, compute)
        log.info("%s: %s test probabilities %s", NAME, m, "from cache" if hit else "computed")
        models[m] = arrays["probs"]

    dist = tax.distance_matrix()
    probs = blend(list(models.values()))
    labels = decode(probs, dist, cfg.submit.decode)
    train = rois[rois["split"] == "train"]
    fallback = prior_answer(np.bincount(train["label"], minlength=tax.n_classes), dist)
    test_ids = read_coco(cfg.data.paths()["test_json"]).annotations["id"].astype(int).tolist()
    sub, fell_back = assemble(test_ids, dict(zip(ids.tolist(), labels.tolist())), tax.names, fallback)
    write_submission(sub, stage.dir / "submission.csv", test_ids, tax.names)
    with atomic_path(stage.dir / "fallbacks.csv") as tmp:
        pd.DataFrame({"annotation_id": fell_back, "concept_name": tax.names[fallback]}).to_csv(tmp, index=False)
    cv = {m: (read_record(cfg.out_dir / pipeline.PHASE_STAGES[m] / "record.json") or {}).get("result", {}) for m in models}
    atomic_write_text(stage.dir / "report.md", submit_report(cfg, cv, sub, fell_back))
    result = {"rows": len(sub), "fallbacks": len(fell_back), "models": list(models), "decode": cfg.submit.decode,
              "submission": str(stage.dir / "submission.csv")}
    stage.finish(result, started)
    log.info("%s: wrote %s (%d rows, %d answered by the prior)", NAME, stage.dir / "submission.csv", len(sub), len(fell_back))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
