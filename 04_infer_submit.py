"""Stage 04: each model's test probabilities (cached, with TTA) -> calibrate -> blend -> frame context -> prior -> decode -> submission.csv.

Reads:  output/<exp>/00_prepare/, 01_train/ and 03_retrain/ folds (best.pt, oof.npz), 02_pseudo/test_probs.npz, data.test_json;
        for a member <exp2>/<model> of submit.models output/<exp2>/00_prepare/ and its training stage's folds
Writes: output/<exp>/04_submit/ probs/<model>.npz (fold models' test probabilities), probs/<model>.oof.npz (out-of-fold rows
        with TTA views), probs/blend_*.npz, probs/calibrators.json, probs/temperatures.json, probs/frame_context.json,
        submission.csv, fallbacks.csv, options.csv, calibration.csv, reliability.png, report.md, error_correlation.png
        (two or more models), record.json
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
    from lib.decide.blending import blend_models
    from lib.decide.frame_context import FrameIndex, frame_rows
    from lib.decide.options import chosen, compare, submitted_score
    from lib.decide.submission import write_full_submission
    from lib.engine.probs import load_models
    from lib.report.summary import write_submit_report

    prep, fit_cache = load_prepared(cfg), stage.dir / "probs" / "blend_fit.npz"  # fitted weights, calibrators beside it
    tax, counts, ids = prep.taxonomy, prep.train_counts, prep.test["annotation_id"].to_numpy()
    models = load_models(cfg, stage, prep)
    frames, frame_note = frame_rows(FrameIndex.from_rois(prep.rois, tax.n_classes), models[0].oof_ids, models[0].oof_fold, ids,
                                    required=cfg.submit.frame_context != "none" and cfg.submit.pick == "settings")
    if frame_note:
        log.info("%s: %s", NAME, frame_note)
    options = compare(cfg, models, tax, counts / counts.sum(), fit_cache, frames)
    choice = chosen(cfg, models, options)
    if cfg.submit.pick == "rule" and options.pick is not None:
        for line in options.pick.lines():
            (log.warning if line.startswith("warning") else log.info)("%s: %s", NAME, line)
    blended = blend_models(cfg, models, tax, counts, fit_cache, frames, choice)
    sub = write_full_submission(cfg, dict(zip(ids.tolist(), blended.labels.tolist())), tax, counts, stage.dir / "submission.csv",
                                fallbacks_csv=stage.dir / "fallbacks.csv")
    write_submit_report(cfg, stage.dir, models, blended, options, sub, ids, tax, rois=prep.rois, frame_note=frame_note,
                        train_counts=counts)
    s, score = cfg.submit, submitted_score(options, choice)
    result = {"rows": sub.rows, "fallbacks": len(sub.fell_back), "models": list(s.models), "weights": blended.weights.round(4).tolist(),
              "pick": s.pick, "option": choice.model, "calibrate": choice.calibration, "frame_context": choice.frame_context,
              "test_prior": choice.test_prior, "decode": choice.decode, "fold_average": s.fold_average,
              "temperatures": [round(t, 4) for t in blended.temperatures], "blend_temperature": round(blended.blend_temperature, 4),
              "fold_temperatures": [round(t, 4) for t in blended.fold_temperatures], "oof_distance": score,
              "submission": str(stage.dir / "submission.csv")}
    if options.pick is not None and options.pick.runner_up is not None:
        result.update(margin=round(options.pick.margin, 6), spread=round(options.pick.spread, 6), close=options.pick.close)
    if blended.frame is not None:
        result["frame_params"] = {"b": [round(b, 4) for b in blended.frame.b], "eps": round(blended.frame.eps, 6),
                                  "buckets": list(blended.frame.edges)}
    stage.finish(result, started)
    log.info("%s: %s (weights %s), nested out-of-fold distance %.4f; wrote %s (%d rows, %d answered by the prior)", NAME,
             choice.describe(), result["weights"], score, stage.dir / "submission.csv", sub.rows, len(sub.fell_back))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: flags and config, then `run`; exit code 2 with one sentence on a user error."""
    return run_cli(run, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
