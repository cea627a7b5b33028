"""kNN baseline: pretrained embeddings of the crops, a FAISS index of the train ROIs, weighted votes.

Reads:  output/<exp>/00_prepare/ (rois.csv, crops, taxonomy.json), data.test_json
Writes: output/<exp>/knn/ embeddings.npz, oof.npz, submission.csv, record.json (CV over the same folds)
"""
from __future__ import annotations

import argparse
import sys
import time

from lib import pipeline
from lib.config import Config
from lib.stages import log, run_cli, stage_parser

NAME = "knn"


def main_(args: argparse.Namespace, cfg: Config) -> int:
    stage = pipeline.begin(cfg, NAME, args.force, args.dry_run)
    if stage is None:
        return 0
    started = time.time()
    import numpy as np

    from lib.coco import read_coco
    from lib.ensemble import decode, prior_answer
    from lib.knn import label_distribution, search
    from lib.metric import score_labels
    from lib.prepare import load_rois
    from lib.stages import atomic_path, cached_npz
    from lib.submission import assemble, write_submission
    from lib.taxonomy import load_taxonomy_json

    prep = cfg.out_dir / "00_prepare"
    rois, tax = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    rois = rois[rois["ok"] == 1].reset_index(drop=True)
    k = cfg.knn
    key = f"{stage.fingerprint['inputs']['00_prepare']}|{k.backbone}|{k.pretrained}|{k.pretrained_file}|{k.img_size}"

    def compute() -> dict:
        from lib.models import build_model, mean_std, pick_device
        from lib.predict import make_loader, predict

        device = pick_device(cfg.train.device)
        model = build_model(k.backbone, 0, k.pretrained, k.pretrained_file).to(device)
        mean, std = mean_std(model)
        loader = make_loader(rois["crop_path"].tolist(), k.img_size, mean, std, k.batch_size, cfg.train.num_workers, device)
        return {"embeddings": predict(model, loader, device, features=True, desc="embed")}

    emb = cached_npz(stage.dir / "embeddings.npz", key, compute)[0]["embeddings"]
    dist = tax.distance_matrix()
    is_train = (rois["split"] == "train").to_numpy()
    train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    labels = rois["label"].to_numpy()
    folds = rois["fold"].to_numpy()

    def answer(base: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sims, nn = search(emb[base], emb[query], k.k)
        p = label_distribution(np.where(nn >= 0, labels[base][nn], -1), sims, tax.n_classes)
        return p, decode(p, dist, cfg.submit.decode)

    oof = np.zeros((len(train_idx), tax.n_classes))
    pred = np.zeros(len(train_idx), dtype=np.int64)
    for f in np.unique(folds[train_idx]):
        q = folds[train_idx] == f
        oof[q], pred[q] = answer(train_idx[~q], train_idx[q])
    cv = {"cv_distance": score_labels(labels[train_idx], pred, dist), "cv_top1": float((pred == labels[train_idx]).mean())}
    with atomic_path(stage.dir / "oof.npz") as tmp:
        np.savez(tmp, annotation_id=rois["annotation_id"].to_numpy()[train_idx], label=labels[train_idx], probs=oof)
    _, test_pred = answer(train_idx, test_idx)
    fallback = prior_answer(np.bincount(labels[train_idx], minlength=tax.n_classes), dist)
    test_ids = read_coco(cfg.data.paths()["test_json"]).annotations["id"].astype(int).tolist()
    sub, fell_back = assemble(test_ids, dict(zip(rois["annotation_id"].to_numpy()[test_idx].tolist(), test_pred.tolist())), tax.names, fallback)
    write_submission(sub, stage.dir / "submission.csv", test_ids, tax.names)
    result = {**cv, "k": k.k, "vote": k.vote, "rows": len(sub), "fallbacks": len(fell_back)}
    stage.finish(result, started)
    log.info("%s: CV distance %.4f, top1 %.3f; wrote %s", NAME, cv["cv_distance"], cv["cv_top1"], stage.dir / "submission.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(main_, stage_parser(__doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
