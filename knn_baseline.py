"""kNN baseline: embeddings of the crops, a FAISS index of the train ROIs, taxonomic votes scored by CV.

Reads:  output/<exp>/00_prepare/ (rois.csv, crops, taxonomy.json), data.test_json;
        with knn.source=phase1 also output/<exp>/01_train/fold_<k>/best.pt
Writes: output/<exp>/knn/ embeddings*.npz, oof.npz, table.md, submission.csv, record.json

CV: each train fold's queries against an index of the other folds. With knn.source=phase1,
fold k's queries and index are embedded by fold k's model (which never saw fold k), and the
test's label distribution is the mean over the fold models, each with an index of all train ROIs
(lib/engine/neighbours.py; the votes are lib/decide/knn.py's).
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

NAME = "knn"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """The stage body: decide, neighbour distributions by CV, choose the vote, write table and submission, record."""
    stage = graph.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    from lib.core.io import atomic_write_text
    from lib.data.artifacts import load_prepared
    from lib.decide.knn import choose_vote, vote
    from lib.decide.submission import write_full_submission
    from lib.engine.neighbours import knn_cv

    prep, k = load_prepared(cfg), cfg.knn
    cv = knn_cv(cfg, stage, prep)
    cv.save(stage.dir / "oof.npz")
    votes = choose_vote(cv.oof, cv.oof_labels, prep.taxonomy, k.votes, k.vote)
    atomic_write_text(stage.dir / "table.md", votes.table)
    for line in votes.table.splitlines():
        log.info("%s: %s", NAME, line)
    predicted = dict(zip(cv.test_ids.tolist(), vote(cv.test, prep.taxonomy, votes.chosen).tolist()))
    sub = write_full_submission(cfg, predicted, prep.taxonomy, prep.train_counts, stage.dir / "submission.csv")
    best = votes.scores[votes.chosen]
    stage.finish({**best, "votes": votes.scores, "vote": votes.chosen, "k": k.k, "source": k.source, "index": k.index,
                  "rows": sub.rows, "fallbacks": len(sub.fell_back)}, started)
    log.info("%s: %s vote, CV distance %.4f, top1 %.3f; wrote %s", NAME, votes.chosen, best["cv_distance"], best["cv_top1"],
             stage.dir / "submission.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: flags and config, then `run`; exit code 2 with one sentence on a user error."""
    return run_cli(run, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
