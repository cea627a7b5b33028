"""kNN baseline: embeddings of the crops, a FAISS index of the train ROIs, taxonomic votes scored by CV.

Reads:  output/<exp>/00_prepare/ (rois.csv, crops, taxonomy.json), data.test_json;
        with knn.source=phase1 also output/<exp>/01_train/fold_<k>/best.pt
Writes: output/<exp>/knn/ embeddings*.npz, oof.npz, table.md, submission.csv, record.json

CV: each train fold's queries against an index of the other folds. With knn.source=phase1,
fold k's queries and index are embedded by fold k's model (which never saw fold k), and the
test's label distribution is the mean over the fold models, each with an index of all train ROIs.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Iterator

from lib.config import Config
from lib.core import graph as pipeline
from lib.core.cli import run_cli, stage_parser
from lib.core.errors import StageError

log = logging.getLogger("pipeline")

NAME = "knn"


def embeddings(cfg: Config, stage, paths: list[str], tax) -> Iterator[tuple[int | None, "object"]]:
    """(None, one backbone's embeddings) or, per fold model, (k, fold k's embeddings); cached per file."""
    from lib.core.io import cached_npz
    from lib.data.dataset import make_loader
    from lib.engine.inference import predict
    from lib.model.checkpoint import load_fold_model
    from lib.model.device import pick_device
    from lib.model.net import build_model, mean_std

    k, inputs = cfg.knn, stage.fingerprint["inputs"]

    def embed(model, img_size: int, desc: str) -> dict:
        mean, std = mean_std(model)
        loader = make_loader(paths, img_size=img_size, mean=mean, std=std, batch_size=k.batch_size, num_workers=cfg.train.num_workers,
                             device=device)
        return {"embeddings": predict(model, loader, device, probs=False, desc=desc)["embeddings"]}

    device = pick_device(cfg.train.device)
    if k.source == "backbone":
        key = f"{inputs['00_prepare']}|{k.backbone}|{k.pretrained}|{k.pretrained_file}|{k.img_size}"
        compute = lambda: embed(build_model(k.backbone, 0, k.pretrained, k.pretrained_file).to(device), k.img_size, "embed")  # noqa: E731
        arrays, hit = cached_npz(stage.dir / "embeddings.npz", key, compute)
        log.info("%s: %s embeddings %s", NAME, k.backbone, "from cache" if hit else "computed")
        yield None, arrays["embeddings"]
        return
    for fold, d in enumerate(pipeline.fold_dirs(cfg, "01_train")):
        key = f"{inputs['00_prepare']}|{inputs['01_train']}|{d.name}|{cfg.model.img_size}"
        compute = lambda d=d: embed(load_fold_model(d, cfg, tax, device), cfg.model.img_size, f"embed {d.name}")  # noqa: E731
        arrays, hit = cached_npz(stage.dir / f"embeddings_{d.name}.npz", key, compute)
        log.info("%s: %s embeddings %s", NAME, d.name, "from cache" if hit else "computed")
        yield fold, arrays["embeddings"]


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    import numpy as np

    from lib.core.io import atomic_path, atomic_write_text
    from lib.data.artifacts import load_rois
    from lib.data.coco import read_coco
    from lib.data.taxonomy import load_taxonomy_json
    from lib.decide.ensemble import prior_answer
    from lib.decide.knn import (
        best_vote,
        gpu_available,
        neighbour_distribution,
        score_votes,
        vote,
        votes_table,
    )
    from lib.decide.submission import assemble, write_submission

    prep = cfg.out_dir / "00_prepare"
    rois, tax = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    rois = rois[rois["ok"] == 1].reset_index(drop=True)
    k = cfg.knn
    is_train = (rois["split"] == "train").to_numpy()
    train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    labels = rois["label"].to_numpy()
    train_fold = rois["fold"].to_numpy()[train_idx]
    log.info("%s: %s index of %s, k=%d, %s", NAME, k.index, k.source, k.k, "faiss on the GPU" if gpu_available() else "faiss on the CPU")

    def distribution(emb: np.ndarray, base: np.ndarray, query: np.ndarray) -> np.ndarray:
        return neighbour_distribution(emb[base], labels[base], emb[query], n_classes=tax.n_classes, k=k.k, index=k.index,
                                      nlist=k.nlist, nprobe=k.nprobe)

    oof = np.zeros((len(train_idx), tax.n_classes))
    test_p = np.zeros((len(test_idx), tax.n_classes))
    done, models = np.zeros(len(train_idx), dtype=bool), 0
    for model_fold, emb in embeddings(cfg, stage, rois["crop_path"].tolist(), tax):
        held_out = np.unique(train_fold) if model_fold is None else [model_fold]  # a fold model answers only its own fold
        for f in held_out:
            q = train_fold == f
            oof[q], done[q] = distribution(emb, train_idx[~q], train_idx[q]), True
        test_p += distribution(emb, train_idx, test_idx)
        models += 1
    if not done.all():
        raise StageError(f"{int((~done).sum())} train ROIs lie in folds without a 01_train model; rerun 01_train_folds.py with all folds.")
    test_p /= max(models, 1)

    with atomic_path(stage.dir / "oof.npz") as tmp:
        np.savez(tmp, annotation_id=rois["annotation_id"].to_numpy()[train_idx], label=labels[train_idx], probs=oof)
    scores = score_votes(oof, labels[train_idx], tax, k.votes)
    chosen = best_vote(scores) if k.vote == "best" else k.vote
    table = votes_table(scores, chosen)
    atomic_write_text(stage.dir / "table.md", table)
    for line in table.splitlines():
        log.info("%s: %s", NAME, line)

    dist = tax.distance_matrix()
    test_pred = vote(test_p, tax, chosen)
    fallback = prior_answer(np.bincount(labels[train_idx], minlength=tax.n_classes), dist)
    test_ids = read_coco(cfg.data.paths()["test_json"]).annotations["id"].astype(int).tolist()
    sub, fell_back = assemble(test_ids, dict(zip(rois["annotation_id"].to_numpy()[test_idx].tolist(), test_pred.tolist())), tax.names, fallback)
    write_submission(sub, stage.dir / "submission.csv", test_ids, tax.names)
    result = {**scores[chosen], "votes": scores, "vote": chosen, "k": k.k, "source": k.source, "index": k.index,
              "rows": len(sub), "fallbacks": len(fell_back)}
    stage.finish(result, started)
    log.info("%s: %s vote, CV distance %.4f, top1 %.3f; wrote %s", NAME, chosen, scores[chosen]["cv_distance"],
             scores[chosen]["cv_top1"], stage.dir / "submission.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
