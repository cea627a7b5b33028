"""Stage 04: every model's test probabilities (cached per model, with TTA) -> blend -> decode -> submission.csv.

Reads:  output/<exp>/00_prepare/, 01_train/ and 03_retrain/ folds (best.pt, oof.npz), 02_pseudo/test_probs.npz, data.test_json
Writes: output/<exp>/04_submit/ probs/<model>.npz, probs/blend_fit.npz, submission.csv, fallbacks.csv, options.csv, report.md, record.json
Changing only submit.* (blend, decoding) reuses probs/ and reruns in seconds.
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

NAME = "04_submit"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    import numpy as np
    import pandas as pd

    from lib.core.io import atomic_path, atomic_write_text
    from lib.data.artifacts import load_rois
    from lib.data.coco import read_coco
    from lib.data.taxonomy import load_taxonomy_json
    from lib.decide.blending import (
        apply_decoding,
        check_aligned,
        compare,
        weights_for,
    )
    from lib.decide.ensemble import blend, prior_answer
    from lib.decide.submission import assemble, write_submission
    from lib.report.summary import score_options, submit_report

    prep = cfg.out_dir / "00_prepare"
    rois, tax = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    test = rois[(rois["split"] == "test") & (rois["ok"] == 1)]
    ids = test["annotation_id"].to_numpy()
    models = [_model_probs(cfg, stage, m, test, tax) for m in cfg.submit.models]
    check_aligned(models)

    dist = tax.distance_matrix()
    train = rois[rois["split"] == "train"]
    counts = np.bincount(train.loc[train["ok"] == 1, "label"], minlength=tax.n_classes)
    prior = counts / counts.sum()
    fit_cache = stage.dir / "probs" / "blend_fit.npz"  # the fit weights, kept across blend-only reruns
    weights = weights_for(cfg.submit.blend, cfg, models, dist, fit_cache) if len(models) > 1 else np.ones(1)
    labels = apply_decoding(cfg, blend([m.test for m in models], weights), tax, prior, dist)
    fallback = prior_answer(counts, dist)
    test_ids = read_coco(cfg.data.paths()["test_json"]).annotations["id"].astype(int).tolist()
    sub, fell_back = assemble(test_ids, dict(zip(ids.tolist(), labels.tolist())), tax.names, fallback)
    write_submission(sub, stage.dir / "submission.csv", test_ids, tax.names)
    with atomic_path(stage.dir / "fallbacks.csv") as tmp:
        pd.DataFrame({"annotation_id": fell_back, "concept_name": tax.names[fallback]}).to_csv(tmp, index=False)

    options, _, test_labels = compare(cfg, models, tax, prior, fit_cache)
    options, truth = score_options(cfg, options, test_labels, ids, tax.names, dist)  # test columns where a truth is known
    with atomic_path(stage.dir / "options.csv") as tmp:
        options.to_csv(tmp, index=False)
    records = {m.name: m.record for m in models}
    atomic_write_text(stage.dir / "report.md", submit_report(cfg, records, dict(zip(cfg.submit.models, weights.tolist())), options, sub, fell_back, truth))
    chosen = options.iloc[-1] if len(models) == 1 else options[options["model"] == f"blend {cfg.submit.blend}"].iloc[0]
    result = {"rows": len(sub), "fallbacks": len(fell_back), "models": list(cfg.submit.models), "weights": weights.round(4).tolist(),
              "blend": cfg.submit.blend, "decode": cfg.submit.decode, f"oof_distance_{cfg.submit.decode}": float(chosen[f"oof_{cfg.submit.decode}"]),
              "submission": str(stage.dir / "submission.csv")}
    stage.finish(result, started)
    log.info("%s: %s blend (weights %s), %s decoding, OOF distance %.4f; wrote %s (%d rows, %d answered by the prior)", NAME,
             cfg.submit.blend, result["weights"], cfg.submit.decode, result[f"oof_distance_{cfg.submit.decode}"],
             stage.dir / "submission.csv", len(sub), len(fell_back))
    return 0


def _model_probs(cfg: Config, stage, name: str, test, tax):
    """A model's (phase1, phase2, round<r>) out-of-fold and test probabilities, from probs/<name>.npz or computed once.

    Phase 1's test probabilities come from 02's test_probs.npz when 02 is current (same folds, same TTA).
    """
    import numpy as np

    from lib.core.io import cached_npz
    from lib.core.records import read_record
    from lib.decide.blending import ModelProbs, load_oof

    phase = pipeline.model_stage(name)
    folds = pipeline.model_folds(cfg, name)
    ids = test["annotation_id"].to_numpy()
    key = f"{stage.fingerprint['inputs'][phase]}|{name}|{cfg.tta.views}|{cfg.tta.mode}|{ids.tolist()}"

    def compute() -> dict:
        reuse = cfg.out_dir / "02_pseudo" / "test_probs.npz"
        if name == "phase1" and reuse.is_file() and not pipeline.stage(cfg, "02_pseudo").reasons():
            with np.load(reuse) as z:
                if np.array_equal(z["annotation_id"], ids):
                    log.info("%s: phase1 test probabilities taken from 02_pseudo", NAME)
                    return {"annotation_id": ids, "probs": z["probs"]}
        from lib.data.context import model_inputs
        from lib.engine.inference import predict_folds_tta
        from lib.model.device import pick_device

        p = predict_folds_tta(folds, model_inputs(test, cfg.model.context), cfg, tax, pick_device(cfg.train.device), features=False)
        return {"annotation_id": ids, "probs": p["probs"]}

    arrays, hit = cached_npz(stage.dir / "probs" / f"{name}.npz", key, compute)
    log.info("%s: %s test probabilities %s", NAME, name, "from cache" if hit else f"stored in probs/{name}.npz")
    oof_ids, oof_labels, oof = load_oof(folds)
    record = (read_record(cfg.out_dir / phase / "record.json") or {}).get("result", {})
    if name.startswith("round"):  # a round's own CV, from 03's per-round summary
        record = record.get("per_round", [{}])[int(name[5:]) - 1]
    return ModelProbs(name, float(record.get("cv_distance", float("nan"))), oof_ids, oof_labels, oof, arrays["probs"].mean(0), record)


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
