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
from lib.core.errors import StageError
from lib.core.io import cached_npz, content_key, load_npz
from lib.data.artifacts import Prepared
from lib.data.taxonomy import Taxonomy
from lib.decide.blending import ModelProbs, check_aligned
from lib.decide.oof import OutOfFold, load_oof
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


def tta_oof(cfg: Config, stage: Stage, member: Member, tax: Taxonomy, stored: OutOfFold) -> OutOfFold:
    """The member's out-of-fold rows predicted again the way its test rows are: each fold model (best.pt) on the rows it
    held out, with the member's tta views and mode, cached in probs/<model>.oof.npz by the same kind of key as its test
    probabilities. A calibrator fitted on these fits the probabilities that are decoded; the rows the training stage
    stored are one plain view. With `submit.oof_tta: false`, or tta.views [identity], the stored rows as they are."""
    ref, mcfg = ModelRef.parse(member.name), member.cfg
    if not cfg.submit.oof_tta or list(mcfg.tta.views) == ["identity"]:
        return stored
    train = member.train
    if train is None:
        raise StageError(f"Member {member.name} came without its train rows, which submit.oof_tta needs; load it with load_members.")
    key = content_key(f"oof|{stage.fingerprint['inputs'][ref.key]}|{ref.name}|{mcfg.tta.views}|{mcfg.tta.mode}|{mcfg.train.precision}",
                      [stored.ids, stored.folds])

    def compute() -> dict:
        from lib.data.context import frame_ids, model_inputs
        from lib.engine.inference import predict_folds_tta
        from lib.model.device import pick_device

        rows = train.set_index("annotation_id")
        missing = np.setdiff1d(stored.ids, rows.index.to_numpy())
        if len(missing):
            raise StageError(f"Member {member.name}'s out-of-fold rows name {len(missing)} train ROIs its 00_prepare has no crop "
                             f"of (e.g. {missing[0]}); rerun its training stage with --force.")
        probs = np.zeros(stored.probs.shape, dtype=np.float32)
        device = pick_device(cfg.train.device)
        for k, d in enumerate(member.folds):
            held = np.flatnonzero(stored.folds == k)
            part = rows.loc[stored.ids[held]].reset_index()
            frames = frame_ids(part) if mcfg.model.frame_context == "attention" else None
            probs[held] = predict_folds_tta([d], model_inputs(part, mcfg.model.context), mcfg, tax, device, features=False,
                                            frames=frames)["probs"][0]
        return {"annotation_id": stored.ids, "probs": probs}

    arrays, hit = cached_npz(stage.dir / "probs" / f"{ref.file_stem}.oof.npz", key, compute)
    log.info("%s: %s out-of-fold rows with its TTA views %s", stage.name, ref.name,
             "from cache" if hit else f"stored in probs/{ref.file_stem}.oof.npz")
    return OutOfFold(stored.ids, stored.labels, np.asarray(arrays["probs"], dtype=np.float32), stored.folds)


def model_probs(cfg: Config, stage: Stage, member: Member, tax: Taxonomy) -> ModelProbs:
    """One member's out-of-fold probabilities (TTA-matched under `submit.oof_tta`) and its fold models' test
    probabilities (from probs/<name>.npz, or computed once and stored).

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
    stored = load_oof(member.folds)
    oof = tta_oof(cfg, stage, member, tax, stored)
    record = graph.member_result(cfg, ref)  # for round<r>, that round's own CV (03's per_round)
    folds = np.asarray(arrays["probs"], dtype=np.float64)
    return ModelProbs(ref.name, float(record.get("cv_distance", float("nan"))), oof.ids, oof.labels, oof.probs, folds.mean(0),
                      record, oof_fold=oof.folds, fold_test=folds, stored_oof=stored.probs if oof is not stored else None)


def load_models(cfg: Config, stage: Stage, prep: Prepared) -> list[ModelProbs]:
    """Every `submit.models` entry, in order, checked to share the same folds (other experiments' too) and out-of-fold rows."""
    members = load_members(cfg, cfg.submit.models, prep)
    models = [model_probs(cfg, stage, m, prep.taxonomy) for m in members]
    check_aligned(models)
    return models
