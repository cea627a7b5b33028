"""The fold loop shared by 01 (phase 1) and 03 (phase 2): each fold's rows, its record, and the CV over all folds.

A fold ends by writing its `record.json`, which vouches for `best.pt` and `oof.npz`: a fold whose
files were lost or damaged runs again (alone), and a fold whose record matches is skipped. So a
run that fails halfway keeps the folds it finished (the stage's own record, voided when the run
began, is written again once every fold is done). Before the first epoch, every crop the folds
will read is checked against 00's `crops_manifest.json` (`check_crops`): a broken crop stops the
run before any training, not after an epoch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from lib.config import Config
from lib.core.errors import StageError
from lib.core.io import load_npz
from lib.core.locks import locked
from lib.data import manifest
from lib.data.artifacts import load_extra
from lib.data.context import view_column
from lib.data.resample import GEOMETRY
from lib.data.taxonomy import Taxonomy
from lib.engine.results import CVSummary
from lib.engine.train import FoldSplit, evaluate, fit_fold
from lib.model import dist as ddp
from lib.model.device import pick_device
from lib.pipeline.cli import check
from lib.pipeline.graph import rerun_hint, stage_dir
from lib.pipeline.records import Stage

log = logging.getLogger("pipeline")
FOLD_OUTPUTS = ("best.pt", "oof.npz")  # what a fold's record vouches for (last.pt may be deleted to save space)
CHECK_THREADS = 8  # crops read and hashed at once before the first epoch (reads and sha256 release the GIL)


def fold_splits(rois: pd.DataFrame, folds: list[int], extra: pd.DataFrame | None = None) -> list[FoldSplit]:
    """Per fold: train on the other folds (+ `extra` rows: pseudo-labels, the extra data; never validated on).

    Rows keep their frame (split, image_id; lib.data.context.frame_ids) for model.frame_context=attention;
    `extra` rows carry theirs (pseudo-labelled test rows: their test frame).
    """
    train = rois[(rois["split"] == "train") & (rois["ok"] == 1)].assign(weight=1.0)
    views = [c for c in train.columns if c.endswith("_path") and c != "testlike_path"]  # the ROI and every context crop
    frame = [c for c in ("split", "image_id") if c in train]
    geometry = [c for c in GEOMETRY if c in train]  # box and frame size: augment.frame_resample's native pixels
    out = []
    for k in folds:
        tr = train[train["fold"] != k][views + ["label", "weight"] + frame + geometry]
        if extra is not None and len(extra):
            tr = pd.concat([tr, extra[[c for c in views + frame + geometry if c in extra] + ["label", "weight"]]], ignore_index=True)
        cols = ["annotation_id", "label"] + views + (["testlike_path"] if "testlike_path" in train else []) + frame
        val = train[train["fold"] == k][cols].reset_index(drop=True)
        out.append(FoldSplit(fold=k, train=tr.reset_index(drop=True), val=val))
    return out


def with_extra_data(cfg: Config, extra: pd.DataFrame | None) -> pd.DataFrame | None:
    """`extra` (03's pseudo-labels) plus 00's extra data rows (data.extra, weighted by data.extra_weight): train only."""
    db = load_extra(stage_dir(cfg, "00_prepare"), cfg.data.extra_weight)
    if not len(db):
        return extra
    log.info("adding %d extra data rows (data.extra) to every fold's training rows, weight %g", len(db), cfg.data.extra_weight)
    return db if extra is None or not len(extra) else pd.concat([extra, db], ignore_index=True)


def fold_stage(stage: Stage, k: int) -> Stage:
    """The record of fold `k` of a training stage: its own folder, the stage's fingerprint plus the fold."""
    return stage.child(f"{stage.name}/fold_{k}", stage.dir / f"fold_{k}", {"fold": k}, outputs=FOLD_OUTPUTS)


def run_folds(cfg: Config, stage: Stage, *, rois: pd.DataFrame, taxonomy: Taxonomy, epochs: int, only: list[int] | None = None,
              force: bool = False, dry_run: bool = False, extra: pd.DataFrame | None = None) -> CVSummary | None:
    """Train every fold that is not up to date (`only` these folds, else `train.folds` or all), adding `extra`
    training rows (phase 2's pseudo-labels); returns the CV summary once all folds are done (None on a dry run)."""
    ddp.init(pick_device(cfg.train.device).type)
    n_folds = int(rois.loc[rois["split"] == "train", "fold"].max()) + 1
    wanted = only or cfg.train.folds or list(range(n_folds))
    extra = with_extra_data(cfg, extra)
    todo = [split for split in fold_splits(rois, wanted, extra) if check(fold_stage(stage, split.fold), force, dry_run)]
    if todo:
        check_crops(cfg, stage, fold_crops(todo, cfg.model.context))
    for split in todo:
        fs = fold_stage(stage, split.fold)
        started = time.time()
        ddp.barrier()  # every rank has decided before rank 0 voids the old record
        # Rank 0 holds the fold's lock (a --fold run of the same fold elsewhere refuses) and sweeps temp files.
        with locked(fs.dir, fs.name) if ddp.is_main() else contextlib.nullcontext():
            if ddp.is_main():
                fs.invalidate()
            result = fit_fold(cfg, split, taxonomy, fs, epochs, fresh=force)
            if result is None:  # a rank other than 0
                continue
            fs.finish(result.to_record(), started)
        s = result.scores
        tl = f", test-like view {s['val_distance_testlike']:.3f}" if "val_distance_testlike" in s else ""
        log.info("%s: val distance %.3f, top1 %.3f%s at epoch %d (%.0fs)", fs.name, s["val_distance"],
                 s["val_top1"], tl, result.best_epoch, time.time() - started)
    if dry_run or not ddp.is_main():
        return None
    return cv_summary(stage, n_folds, taxonomy)


def fold_crops(splits: Sequence[FoldSplit], context: Sequence[str]) -> set[str]:
    """Every crop file these folds read: the views of `model.context` of their training rows (pseudo-labelled test
    rows included) and validation rows, and the validation rows' test-like crops."""
    views = [view_column(v) for v in context]
    out: set[str] = set()
    for s in splits:
        for rows, cols in ((s.train, views), (s.val, [*views, "testlike_path"])):
            for c in cols:
                if c in rows:
                    out.update(p for p in rows[c] if isinstance(p, str) and p)
    return out


# (path, size, mtime_ns) of the crops found as 00 wrote them by this process: 03's later rounds read only their
# new pseudo-label crops, and a crop rewritten since (another size or mtime) is read again.
_verified: set[tuple[str, int, int]] = set()


def _stat_key(path: str) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path, st.st_size, st.st_mtime_ns


def crop_problem(cfg: Config, stage: Stage, paths: Iterable[str]) -> str | None:
    """One sentence when a crop of `paths` is missing or not the bytes 00's manifest lists (what to rerun); None when all are.

    00's own up-to-date check only stats the crops; this reads and hashes them, so a crop replaced
    by other bytes of the same size is caught too.
    """
    keys = {p: _stat_key(p) for p in paths}
    todo = sorted(p for p, k in keys.items() if k is None or k not in _verified)
    if not todo:
        return None
    prep, started = stage_dir(cfg, "00_prepare"), time.time()
    rerun = f"rerun {rerun_hint(cfg, '00_prepare')} --force to cut them again, then {rerun_hint(cfg, stage.name.split('/')[0])}"
    try:
        files = manifest.load(prep)
    except manifest.ManifestError as e:
        return f"{stage.name} cannot check its crops against {prep / manifest.MANIFEST} ({e}); {rerun}."
    bad = manifest.verify(prep, files, [os.path.relpath(p, prep) for p in todo], CHECK_THREADS)
    log.info("%s: %d crops checked against %s in %.1fs", stage.name, len(todo), manifest.MANIFEST, time.time() - started)
    if bad:
        return (f"{len(bad)} of the {len(todo)} crops {stage.name} reads are not the ones {prep / manifest.MANIFEST} lists "
                f"({manifest.describe(bad)}); {rerun} (folds already finished are kept).")
    _verified.update(k for p in todo if (k := keys[p]) is not None)
    return None


def check_crops(cfg: Config, stage: Stage, paths: Iterable[str]) -> None:
    """Stop before the first epoch when a crop the folds read is broken; under torchrun rank 0 reads, every rank stops."""
    problem = crop_problem(cfg, stage, paths) if ddp.is_main() else None
    if not ddp.broadcast_flag(problem is None):
        raise StageError(problem or f"{stage.name}: rank 0 found crops that are not those 00_prepare wrote (see its message).")


def cv_summary(stage: Stage, n_folds: int, taxonomy: Taxonomy) -> CVSummary | None:
    """Out-of-fold score over all folds, or None while some fold is missing or stale."""
    oofs = []
    for k in range(n_folds):
        fs = fold_stage(stage, k)
        if fs.reasons() or not (fs.dir / "oof.npz").is_file():
            return None
        oofs.append(load_npz(fs.dir / "oof.npz", "delete it and rerun the training stage (its fold runs again)"))
    labels = np.concatenate([o["label"] for o in oofs])
    dist = taxonomy.distance_matrix()
    m = evaluate(np.concatenate([o["probs"] for o in oofs]), labels, dist)
    per_fold = [evaluate(o["probs"], o["label"], dist)["val_distance"] for o in oofs]
    t = {}
    if all("probs_testlike" in o for o in oofs):
        t = evaluate(np.concatenate([o["probs_testlike"] for o in oofs]), labels, dist)
    return CVSummary(m["val_distance"], m["val_top1"], n_folds, int(len(labels)), float(np.mean(per_fold)), float(np.std(per_fold)),
                     t.get("val_distance"), t.get("val_top1"))
