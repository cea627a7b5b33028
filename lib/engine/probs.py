"""04's per-model probabilities: each `submit.models` entry's out-of-fold and test probabilities.

The test probabilities (every fold model with TTA, the costly part of 04) are cached per model in
`probs/<model>.npz` (`probs/<exp>__<model>.npz` for another experiment's), keyed by what they
depend on (the model's training record, its TTA and precision, the test ROIs),
so changing only submit.* (blend, decoding) reuses them and reruns in seconds. Phase 1's come
from 02's test_probs.npz when 02 is current (same folds, same TTA).
"""
from __future__ import annotations

import logging

import numpy as np

from lib.config import Config
from lib.core.io import cached_npz, load_npz
from lib.data.artifacts import Prepared
from lib.data.taxonomy import Taxonomy
from lib.decide.blending import ModelProbs, check_aligned
from lib.decide.oof import load_oof
from lib.engine.members import Member, load_members
from lib.modelref import ModelRef
from lib.pipeline import graph
from lib.pipeline.records import Stage

log = logging.getLogger("pipeline")


def _from_02(cfg: Config, stage: Stage, ids: np.ndarray) -> np.ndarray | None:
    """Phase 1's test probabilities from 02's test_probs.npz when 02 is current and holds the same ROIs."""
    reuse = cfg.out_dir / "02_pseudo" / "test_probs.npz"
    if reuse.is_file() and not graph.stage(cfg, "02_pseudo").reasons():
        graph.check_vouched(reuse)
        z = load_npz(reuse, "delete it and rerun 02_pseudo_label.py")
        names = [str(n) for n in z["member_names"]] if "member_names" in z else ["phase1"]
        if np.array_equal(z["annotation_id"], ids) and "phase1" in names:
            log.info("%s: phase1 test probabilities taken from 02_pseudo", stage.name)
            probs = z["probs"]
            return probs[z["member_of"] == names.index("phase1")] if "member_of" in z else probs
    return None


def model_probs(cfg: Config, stage: Stage, member: Member, tax: Taxonomy) -> ModelProbs:
    """One member's out-of-fold probabilities and test probabilities (from probs/<name>.npz, or computed once and stored).

    A member of another experiment predicts with the config it was trained with (backbone, image
    size, context views, TTA, precision) on its own crops of the test ROIs.
    """
    ref, mcfg = ModelRef.parse(member.name), member.cfg
    ids = member.test["annotation_id"].to_numpy()
    key = f"{stage.fingerprint['inputs'][ref.key]}|{ref.name}|{mcfg.tta.views}|{mcfg.tta.mode}|{mcfg.train.precision}|{ids.tolist()}"

    def compute() -> dict:
        probs = _from_02(cfg, stage, ids) if ref.name == "phase1" else None
        if probs is None:
            from lib.data.context import frame_ids, model_inputs
            from lib.engine.inference import predict_folds_tta
            from lib.model.device import pick_device

            frames = frame_ids(member.test) if mcfg.model.frame_context == "attention" else None
            probs = predict_folds_tta(member.folds, model_inputs(member.test, mcfg.model.context), mcfg, tax,
                                      pick_device(cfg.train.device), features=False, frames=frames)["probs"]
        return {"annotation_id": ids, "probs": probs}

    arrays, hit = cached_npz(stage.dir / "probs" / f"{ref.file_stem}.npz", key, compute)
    log.info("%s: %s test probabilities %s", stage.name, ref.name, "from cache" if hit else f"stored in probs/{ref.file_stem}.npz")
    for d in member.folds:  # the out-of-fold rows of the very models predicted above
        graph.check_vouched(d / "oof.npz")
    oof = load_oof(member.folds)
    record = graph.member_result(cfg, ref)  # for round<r>, that round's own CV (03's per_round)
    return ModelProbs(ref.name, float(record.get("cv_distance", float("nan"))), oof.ids, oof.labels, oof.probs, arrays["probs"].mean(0),
                      record, oof_fold=oof.folds)


def load_models(cfg: Config, stage: Stage, prep: Prepared) -> list[ModelProbs]:
    """Every `submit.models` entry, in order, checked to share the same folds (other experiments' too) and out-of-fold rows."""
    members = load_members(cfg, cfg.submit.models, prep)
    models = [model_probs(cfg, stage, m, prep.taxonomy) for m in members]
    check_aligned(models)
    return models
