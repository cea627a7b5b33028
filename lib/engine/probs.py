"""04's per-model probabilities: each `submit.models` entry's out-of-fold and test probabilities.

The test probabilities (every fold model with TTA, the costly part of 04) are cached per model in
`probs/<model>.npz`, keyed by what they depend on (the model's training stage, TTA, the test ROIs),
so changing only submit.* (blend, decoding) reuses them and reruns in seconds. Phase 1's come
from 02's test_probs.npz when 02 is current (same folds, same TTA).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from lib.config import Config
from lib.core import graph as pipeline
from lib.core.graph import ModelRef
from lib.core.io import cached_npz, load_npz
from lib.core.records import Stage
from lib.data.taxonomy import Taxonomy
from lib.decide.blending import ModelProbs, check_aligned, load_oof

log = logging.getLogger("pipeline")


def _from_02(cfg: Config, stage: Stage, ids: np.ndarray) -> np.ndarray | None:
    """Phase 1's test probabilities from 02's test_probs.npz when 02 is current and holds the same ROIs."""
    reuse = cfg.out_dir / "02_pseudo" / "test_probs.npz"
    if reuse.is_file() and not pipeline.stage(cfg, "02_pseudo").reasons():
        pipeline.check_vouched(reuse)
        z = load_npz(reuse, "delete it and rerun 02_pseudo_label.py")
        if np.array_equal(z["annotation_id"], ids):
            log.info("%s: phase1 test probabilities taken from 02_pseudo", stage.name)
            return z["probs"]
    return None


def model_probs(cfg: Config, stage: Stage, ref: ModelRef, test: pd.DataFrame, tax: Taxonomy) -> ModelProbs:
    """One model's out-of-fold probabilities and test probabilities (from probs/<name>.npz, or computed once and stored)."""
    folds = ref.folds(cfg)
    ids = test["annotation_id"].to_numpy()
    key = f"{stage.fingerprint['inputs'][ref.stage]}|{ref.name}|{cfg.tta.views}|{cfg.tta.mode}|{cfg.train.precision}|{ids.tolist()}"

    def compute() -> dict:
        probs = _from_02(cfg, stage, ids) if ref.name == "phase1" else None
        if probs is None:
            from lib.data.context import model_inputs
            from lib.engine.inference import predict_folds_tta
            from lib.model.device import pick_device

            probs = predict_folds_tta(folds, model_inputs(test, cfg.model.context), cfg, tax, pick_device(cfg.train.device),
                                      features=False)["probs"]
        return {"annotation_id": ids, "probs": probs}

    arrays, hit = cached_npz(stage.dir / "probs" / f"{ref.name}.npz", key, compute)
    log.info("%s: %s test probabilities %s", stage.name, ref.name, "from cache" if hit else f"stored in probs/{ref.name}.npz")
    for d in folds:  # the out-of-fold rows of the very models predicted above
        pipeline.check_vouched(d / "oof.npz")
    oof_ids, oof_labels, oof = load_oof(folds)
    record = ref.result(cfg)  # for round<r>, that round's own CV (03's per_round)
    return ModelProbs(ref.name, float(record.get("cv_distance", float("nan"))), oof_ids, oof_labels, oof, arrays["probs"].mean(0), record)


def load_models(cfg: Config, stage: Stage, test: pd.DataFrame, tax: Taxonomy) -> list[ModelProbs]:
    """Every `submit.models` entry, in order, checked to share the same out-of-fold rows."""
    models = [model_probs(cfg, stage, ModelRef.parse(name), test, tax) for name in cfg.submit.models]
    check_aligned(models)
    return models
