"""The kNN baseline's model side: crop embeddings and the cross-validated neighbour distributions over them.

CV: each train fold's queries against an index of the other folds. With knn.source=phase1,
fold k's queries and index are embedded by fold k's model (which never saw fold k), and the
test's label distribution is the mean over the fold models, each with an index of all train ROIs.
The search and the votes themselves are lib.decide.knn's (numpy and faiss only).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lib.config import Config
from lib.core.errors import StageError
from lib.core.io import atomic_path, cached_npz
from lib.data.artifacts import Prepared
from lib.data.context import frame_ids
from lib.data.taxonomy import Taxonomy
from lib.decide.knn import gpu_available, neighbour_distribution
from lib.pipeline import graph
from lib.pipeline.records import Stage

log = logging.getLogger("pipeline")


def embeddings(cfg: Config, stage: Stage, paths: list[str], tax: Taxonomy,
               frames: np.ndarray | None = None) -> Iterator[tuple[int | None, np.ndarray]]:
    """(None, one backbone's embeddings) or, per fold model, (k, fold k's embeddings); cached per file.

    `frames` (one frame id per path) batch whole frames for fold models with model.frame_context=attention."""
    from lib.data.budget import plan_here
    from lib.data.dataset import make_loader
    from lib.engine.inference import predict
    from lib.model.checkpoint import load_fold_model
    from lib.model.device import describe_device, pick_device
    from lib.model.net import build_model, mean_std

    k, inputs = cfg.knn, stage.fingerprint["inputs"]

    def embed(model, img_size: int, desc: str, frames: np.ndarray | None = None) -> dict:
        mean, std = mean_std(model)
        plan = plan_here(cfg, on_cpu=device.type != "cuda", testlike=False).get("predict")  # its workers and prefetch
        loader = make_loader(paths, img_size=img_size, mean=mean, std=std, batch_size=k.batch_size, num_workers=plan.workers,
                             prefetch=plan.prefetch, device=device, frames=frames)
        return {"embeddings": predict(model, loader, device, probs=False, precision=cfg.train.precision, desc=desc)["embeddings"]}

    device = pick_device(cfg.train.device)
    log.info("%s: embedding on %s", stage.name, describe_device(device, cfg.train.precision))
    if k.source == "backbone":
        key = f"{inputs['00_prepare']}|{k.backbone}|{k.pretrained}|{k.pretrained_file}|{k.img_size}|{cfg.train.precision}"
        compute = lambda: embed(build_model(k.backbone, 0, k.pretrained, k.pretrained_file, section="knn", img_size=k.img_size).to(device),
                                k.img_size, "embed")
        arrays, hit = cached_npz(stage.dir / "embeddings.npz", key, compute)
        log.info("%s: %s embeddings %s", stage.name, k.backbone, "from cache" if hit else "computed")
        yield None, arrays["embeddings"]
        return
    for fold, d in enumerate(graph.fold_dirs(cfg, "01_train")):
        key = f"{inputs['00_prepare']}|{inputs['01_train']}|{d.name}|{cfg.model.input_size}|{cfg.train.precision}"

        def compute(d: Path = d) -> dict:
            return embed(load_fold_model(d, cfg, tax, device), cfg.model.input_size, f"embed {d.name}",
                         frames if cfg.model.frame_context == "attention" else None)

        arrays, hit = cached_npz(stage.dir / f"embeddings_{d.name}.npz", key, compute)
        log.info("%s: %s embeddings %s", stage.name, d.name, "from cache" if hit else "computed")
        yield fold, arrays["embeddings"]


@dataclass(frozen=True)
class KnnCV:
    """Neighbour label distributions: out of fold over the usable train ROIs, and over the usable test ROIs."""

    oof_ids: np.ndarray
    oof_labels: np.ndarray
    oof: np.ndarray  # (n_train, C)
    test_ids: np.ndarray
    test: np.ndarray  # (n_test, C), the mean over the embedding models

    def save(self, path: Path) -> None:
        """The out-of-fold distributions as oof.npz (annotation_id, label, probs), as a training fold's."""
        with atomic_path(path) as tmp:
            np.savez(tmp, annotation_id=self.oof_ids, label=self.oof_labels, probs=self.oof)


def knn_cv(cfg: Config, stage: Stage, prep: Prepared) -> KnnCV:
    """Each train fold's distributions from an index of the other folds, the test's from one of every train ROI."""
    rois, tax, k = prep.usable, prep.taxonomy, cfg.knn
    is_train = (rois["split"] == "train").to_numpy()
    train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    labels = rois["label"].to_numpy()
    train_fold = rois["fold"].to_numpy()[train_idx]
    log.info("%s: %s index of %s, k=%d, %s", stage.name, k.index, k.source, k.k, "faiss on the GPU" if gpu_available() else "faiss on the CPU")

    def distribution(emb: np.ndarray, base: np.ndarray, query: np.ndarray) -> np.ndarray:
        return neighbour_distribution(emb[base], labels[base], queries=emb[query], n_classes=tax.n_classes, k=k.k, index=k.index,
                                      nlist=k.nlist, nprobe=k.nprobe)

    oof = np.zeros((len(train_idx), tax.n_classes))
    test_p = np.zeros((len(test_idx), tax.n_classes))
    done, models = np.zeros(len(train_idx), dtype=bool), 0
    frames = frame_ids(rois) if cfg.model.frame_context == "attention" else None
    for model_fold, emb in embeddings(cfg, stage, rois["crop_path"].tolist(), tax, frames):
        held_out = np.unique(train_fold) if model_fold is None else [model_fold]  # a fold model answers only its own fold
        for f in held_out:
            q = train_fold == f
            oof[q], done[q] = distribution(emb, train_idx[~q], train_idx[q]), True
        test_p += distribution(emb, train_idx, test_idx)
        models += 1
    if not done.all():
        raise StageError(f"{int((~done).sum())} train ROIs lie in folds without a 01_train model; rerun 01_train_folds.py with all folds.")
    ids = rois["annotation_id"].to_numpy()
    return KnnCV(ids[train_idx], labels[train_idx], oof, ids[test_idx], test_p / max(models, 1))
