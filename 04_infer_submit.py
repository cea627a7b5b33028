"""Stage 04: every model's test probabilities (cached per model, with TTA) -> blend -> frame context -> decode -> submission.csv.

Reads:  output/<exp>/00_prepare/, 01_train/ and 03_retrain/ folds (best.pt, oof.npz), 02_pseudo/test_probs.npz, data.test_json;
        for a member <exp2>/<model> of submit.models output/<exp2>/00_prepare/ and its training stage's folds
Writes: output/<exp>/04_submit/ probs/<model>.npz, probs/blend_*.npz, probs/temperatures.json, probs/frame_context.json,
        submission.csv, fallbacks.csv, options.csv, report.md, error_correlation.png (two or more models), record.json
Changing only submit.* (blend, decoding) reuses probs/ and reruns in seconds.
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

NAME = "04_submit"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """The stage body: decide, each model's probabilities, blend and decode, write the submission and its report, record."""
    stage = graph.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    from lib.data.artifacts import load_prepared
    from lib.decide.blending import blend_models, blend_options
    from lib.decide.frame_context import FrameIndex, frame_rows
    from lib.decide.submission import write_full_submission
    from lib.engine.probs import load_models
    from lib.report.summary import write_submit_report

    prep, fit_cache = load_prepared(cfg), stage.dir / "probs" / "blend_fit.npz"  # fitted weights, temperatures beside it
    tax, counts, ids = prep.taxonomy, prep.train_counts, prep.test["annotation_id"].to_numpy()
    models = load_models(cfg, stage, prep)
    frames, frame_note = frame_rows(FrameIndex.from_rois(prep.rois, tax.n_classes), models[0].oof_ids, models[0].oof_fold, ids,
                                    required=cfg.submit.frame_context != "none")
    if frame_note:
        log.info("%s: %s", NAME, frame_note)
    blended = blend_models(cfg, models, tax, counts, fit_cache, frames)
    sub = write_full_submission(cfg, dict(zip(ids.tolist(), blended.labels.tolist())), tax, counts, stage.dir / "submission.csv",
                                fallbacks_csv=stage.dir / "fallbacks.csv")
    options = blend_options(cfg, models, tax, counts, fit_cache, frames)
    write_submit_report(cfg, stage.dir, models, blended, options, sub, ids, tax, rois=prep.rois, frame_note=frame_note)
    s = cfg.submit
    result = {"rows": sub.rows, "fallbacks": len(sub.fell_back), "models": list(s.models), "weights": blended.weights.round(4).tolist(),
              "blend": s.blend, "decode": s.decode, "calibrate": s.calibrate, "temperatures": [round(t, 4) for t in blended.temperatures],
              "blend_temperature": round(blended.blend_temperature, 4), "frame_context": s.frame_context,
              f"oof_distance_{s.decode}": options.oof_distance, "submission": str(stage.dir / "submission.csv")}
    if blended.frame is not None:
        result["frame_params"] = {"b": [round(b, 4) for b in blended.frame.b], "eps": round(blended.frame.eps, 6),
                                  "buckets": list(blended.frame.edges)}
    stage.finish(result, started)
    log.info("%s: %s blend (weights %s), %s decoding, OOF distance %.4f; wrote %s (%d rows, %d answered by the prior)", NAME,
             s.blend, result["weights"], s.decode, options.oof_distance, stage.dir / "submission.csv", sub.rows, len(sub.fell_back))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: flags and config, then `run`; exit code 2 with one sentence on a user error."""
    return run_cli(run, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
