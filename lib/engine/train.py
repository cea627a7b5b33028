"""Fit one fold, and the fold loop shared by 01 (phase 1) and 03 (phase 2).

Readable top to bottom: build model, loss and optimiser; for each epoch train, validate in the
competition metric, checkpoint. `last.pt` (model, optimiser, epoch, best score, history, RNG)
is written atomically every epoch so a killed run resumes where it stopped; `best.pt` and
`oof.npz` follow the best validation distance. A fold ends by writing its `record.json`, which
vouches for `best.pt` and `oof.npz`: a fold whose files were lost or damaged runs again (alone).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from lib.config import Config
from lib.core.cli import check
from lib.core.errors import StageError
from lib.core.faults import fault_point
from lib.core.io import atomic_path
from lib.core.locks import locked
from lib.core.records import Stage
from lib.data.augment import build_transforms
from lib.data.context import model_inputs
from lib.data.dataset import CropDataset, make_loader
from lib.data.mix import mix_batch, soft_target_loss
from lib.data.samplers import build_sampler
from lib.data.taxonomy import RANKS, Taxonomy
from lib.decide.metric import score_labels
from lib.engine.inference import predict, predict_with_features
from lib.engine.results import CVSummary
from lib.model import dist as ddp
from lib.model.checkpoint import load_checkpoint
from lib.model.device import autocast, channels_last, pick_device
from lib.model.losses import build_loss
from lib.model.net import build_net, mean_std
from lib.model.optim import Ema, lr_factor, param_groups

log = logging.getLogger("pipeline")
FOLD_OUTPUTS = ("best.pt", "oof.npz")  # what a fold's record vouches for (last.pt may be deleted to save space)


@dataclass
class FoldSplit:
    """Training rows (with per-sample weights) and validation rows of one fold."""

    fold: int
    train: pd.DataFrame  # crop_path (+ ctx<s>_path, full_path), label, weight
    val: pd.DataFrame  # annotation_id, label, the crop paths (+ testlike_path: the same ROIs shrunk to test box sizes)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def evaluate(probs: np.ndarray, labels: np.ndarray, dist: np.ndarray) -> dict[str, float]:
    pred = probs.argmax(1)
    return {"val_distance": score_labels(labels, pred, dist), "val_top1": float((pred == labels).mean())}


def detailed_metrics(probs: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, train_counts: np.ndarray) -> dict[str, float]:
    """Accuracy per rank (among samples whose concept has that rank) and top-1 on head / middle / tail classes.

    Head, middle and tail are thirds of the classes by train count, the long-tail literature's split.
    """
    pred = probs.argmax(1)
    out: dict[str, float] = {}
    for rank in RANKS[1:]:
        idx, _ = taxonomy.rank_labels(rank)
        has = idx[labels] >= 0
        if has.any():
            out[f"val_acc_{rank}"] = float((idx[pred[has]] == idx[labels[has]]).mean())
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    for name, part in zip(("head", "middle", "tail"), np.array_split(order, 3)):
        sel = np.isin(labels, part)
        if sel.any():
            out[f"val_top1_{name}"] = float((pred[sel] == labels[sel]).mean())
    return out


def fit_fold(cfg: Config, split: FoldSplit, taxonomy: Taxonomy, stage: Stage, epochs: int, stop_after: int | None = None,
             fresh: bool = False) -> dict:
    """Train one fold to `epochs`, resuming from `last.pt` when it belongs to this same run (unless `fresh`).

    Every epoch reseeds all randomness from (seed, fold, epoch), so a run resumed from `last.pt`
    ends with the same weights as one never interrupted. `stop_after` ends the run after that
    epoch as a kill would (tests use it). A resumed fold whose `best.pt` or `oof.npz` is missing,
    unreadable or from another epoch than `last.pt` records (files lost after a kill) trains
    again from scratch, with a warning naming the file.
    """
    t, a = cfg.train, cfg.augment
    out = stage.dir
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(t.device)
    seed = cfg.seed * 100 + split.fold
    seed_everything(seed)
    dist = taxonomy.distance_matrix()
    model = build_net(cfg, taxonomy).to(device)
    model = model.to(memory_format=torch.channels_last)  # faster on CUDA and on CPU alike
    world, main = ddp.world_size(), ddp.is_main()
    train_model = model
    if world > 1:  # gradients averaged across torchrun processes; rank 0 validates and writes
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=a.mixing)
    if t.compile:  # the training forward only; validation and checkpoints use the plain module
        train_model = torch.compile(train_model)
    mean, std = mean_std(model)
    counts = np.bincount(split.train["label"].to_numpy(), minlength=taxonomy.n_classes)
    criterion = build_loss(cfg.loss, counts, dist).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, t.lr, t.weight_decay, t.backbone_lr_mult))
    ema = Ema(model, t.ema_decay) if t.ema_decay > 0 else None
    views = cfg.model.context
    train_tf = build_transforms(cfg.model.img_size, train=True, mean=mean, std=std, aug=cfg.augment, n_views=len(views))
    ds = CropDataset(model_inputs(split.train, views), split.train["label"], split.train["weight"], transform=train_tf)
    val_loader = make_loader(model_inputs(split.val, views), cfg.model.img_size, mean, std, t.eval_batch_size, t.num_workers, device)
    labels_val = split.val["label"].to_numpy()
    testlike_loader = None
    if "testlike_path" in split.val and (split.val["testlike_path"].fillna("") != "").all():
        # The test-like view shrinks the ROI only: 00 cuts no test-like context crops, so context views stay as they are.
        testlike_loader = make_loader(model_inputs(split.val, views, roi_column="testlike_path"), cfg.model.img_size, mean, std,
                                      t.eval_batch_size, t.num_workers, device)
    per_rank = len(ds) // world  # each torchrun process sees its share of every epoch
    batches = max(1, per_rank // t.batch_size if per_rank > t.batch_size else 1)
    steps_per_epoch = max(1, math.ceil(batches / t.accumulate))
    total, warmup = steps_per_epoch * epochs, int(t.warmup_epochs * steps_per_epoch)
    restart = max(1, int(round(t.restart_epochs * steps_per_epoch)))

    start_epoch, best, history = 0, {"val_distance": float("inf"), "epoch": -1}, []
    last = out / "last.pt"
    ckpt = _try_resume(last, stage.digest) if last.is_file() and not fresh else None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ema is not None and "ema" in ckpt:
                ema.load_state_dict(ckpt["ema"])
            start_epoch, best, history = int(ckpt["epoch"]) + 1, dict(ckpt["best"]), list(ckpt["history"])
        except Exception as e:  # a checkpoint that loads but does not fit: start over on a clean model
            log.warning("ignoring checkpoint %s (%s: %s); starting the fold afresh", last, type(e).__name__, e)
            return fit_fold(cfg, split, taxonomy, stage, epochs, stop_after, fresh=True)
        lost = _best_files_problem(out, int(best["epoch"])) if start_epoch >= epochs and main else None
        if ddp.broadcast_flag(lost is not None):  # finished, but its best weights are gone: nothing to resume
            if main:
                log.warning("%s; training %s again from scratch", lost, stage.name)
            return fit_fold(cfg, split, taxonomy, stage, epochs, stop_after, fresh=True)
        if start_epoch < epochs:
            log.info("%s: resuming at epoch %d/%d", stage.name, start_epoch + 1, epochs)
        else:
            log.info("%s: last.pt is complete (%d epochs); keeping its best.pt and oof.npz", stage.name, start_epoch)

    for epoch in range(start_epoch, epochs):
        if ddp.broadcast_flag(bool(t.patience and best["epoch"] > 0 and epoch + 1 - best["epoch"] > t.patience)):
            log.info("%s: early stop after epoch %d (no gain for %d epochs)", stage.name, epoch, t.patience)
            break
        t0 = time.time()
        epoch_seed = seed * 1000 + epoch
        seed_everything(epoch_seed)
        criterion.set_epoch(epoch)
        train_tf.set_random_seed(epoch_seed)
        gen = torch.Generator().manual_seed(epoch_seed)
        if world > 1 and t.sampler == "random":
            sampler = DistributedSampler(ds, num_replicas=world, rank=ddp.rank(), shuffle=True, seed=epoch_seed, drop_last=True)
        elif world > 1:  # each rank draws its own share of a weighted sample
            sampler = build_sampler(t.sampler, split.train["label"].to_numpy(), len(ds) // world,
                                    torch.Generator().manual_seed(epoch_seed * world + ddp.rank()))
        else:
            sampler = build_sampler(t.sampler, split.train["label"].to_numpy(), None, gen)
        loader = DataLoader(ds, batch_size=t.batch_size, shuffle=sampler is None, sampler=sampler, generator=gen,
                            drop_last=len(ds) > t.batch_size, num_workers=t.num_workers, pin_memory=device.type == "cuda")
        model.train()
        losses = []
        bar = tqdm(loader, desc=f"{stage.name} epoch {epoch + 1}/{epochs}", leave=False, unit="batch", disable=not main)
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y, w) in enumerate(bar):
            x, y, w = x.to(device, non_blocking=True), y.to(device), w.to(device)
            y_soft = None
            if a.mixing:
                x, y_soft, w = mix_batch(x, y, w, taxonomy.n_classes, a.mixup_alpha, a.cutmix_alpha, a.mix_prob, a.mix_same_leaf, gen)
            x = channels_last(x)
            with autocast(device):
                out_ = train_model(x, full=True)
            # Mixed (soft) targets train the leaf logits with soft cross-entropy; one-hot batches use the head's loss.
            soft = y_soft is not None and not a.mix_same_leaf
            loss = soft_target_loss(out_.logits, y_soft.to(device), w) if soft else model.head_module.loss(out_, y, w, criterion)
            (loss / t.accumulate).backward()
            losses.append(loss.item())
            if (i + 1) % t.accumulate == 0 or i + 1 == len(loader):
                step = epoch * steps_per_epoch + i // t.accumulate
                factor = lr_factor(step, total, warmup, t.schedule, restart, t.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                if t.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            fault_point(f"train_batch {stage.name} epoch {epoch + 1}")
        if main:
            judged = ema.module if ema is not None else model
            probs, feats = predict_with_features(judged, val_loader, device, desc="validate")
            metrics = {**evaluate(probs, labels_val, dist), **detailed_metrics(probs, labels_val, taxonomy, counts)}
            extra = {"embeddings": feats.astype(np.float16)}
            if testlike_loader is not None:
                extra["probs_testlike"] = predict(judged, testlike_loader, device, desc="validate test-like")
                metrics.update({f"{k}_testlike": v for k, v in evaluate(extra["probs_testlike"], labels_val, dist).items()})
            row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"), **metrics,
                   "lr": max(g["lr"] for g in optimizer.param_groups), "seconds": round(time.time() - t0, 2)}
            history.append(row)
            if metrics["val_distance"] < best["val_distance"] - t.min_delta:
                best = {**metrics, "epoch": epoch + 1}
                # torch.save writes a copy: later steps cannot alter the best weights on disk.
                with atomic_path(out / "best.pt") as tmp, open(tmp, "wb") as f:  # via a handle: the same weights, the same bytes
                    torch.save({"model": judged.state_dict(), "epoch": epoch + 1, "val_distance": metrics["val_distance"]}, f)
                with atomic_path(out / "oof.npz") as tmp:
                    np.savez(tmp, annotation_id=split.val["annotation_id"].to_numpy(), label=labels_val, probs=probs,
                             epoch=np.int64(epoch + 1), **extra)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best,
                     "history": history, "digest": stage.digest}
            if ema is not None:
                state["ema"] = ema.state_dict()
            with atomic_path(last) as tmp, open(tmp, "wb") as f:
                torch.save(state, f)
            tl = f", test-like view {metrics['val_distance_testlike']:.3f}" if "val_distance_testlike" in metrics else ""
            log.info("%s epoch %d/%d: loss %.3f, val distance %.3f, top1 %.3f%s (%.1fs)", stage.name, epoch + 1, epochs,
                     row["train_loss"], metrics["val_distance"], metrics["val_top1"], tl, row["seconds"])
        if ddp.broadcast_flag(stop_after is not None and epoch + 1 >= stop_after):
            return {"stopped_after": epoch + 1}
    lost = _best_files_problem(out, int(best["epoch"])) if main else None
    if ddp.broadcast_flag(lost is not None):  # every rank starts over together
        if fresh:
            raise StageError(f"{lost} right after training it; check the disk of {out}.")
        if main:
            log.warning("%s; training %s again from scratch", lost, stage.name)
        return fit_fold(cfg, split, taxonomy, stage, epochs, stop_after, fresh=True)
    if not main:
        return {}
    with atomic_path(out / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    from lib.report.plots import plot_history

    plot_history(pd.DataFrame(history), out / "curves.png", title=stage.name)
    return {"best_epoch": best["epoch"], **{k: v for k, v in best.items() if k.startswith("val_")},
            "n_train": len(ds), "n_val": len(split.val)}


def _best_files_problem(out: Path, best_epoch: int) -> str | None:
    """Why `best.pt` / `oof.npz` do not hold the best epoch the run ended with, or None when they do."""
    if best_epoch < 1:
        return None
    try:
        ckpt = load_checkpoint(out / "best.pt")
        epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    except StageError as e:
        return str(e).split(";")[0]
    if epoch != best_epoch:
        return f"{out / 'best.pt'} holds epoch {epoch}, not the best epoch {best_epoch}"
    try:
        with np.load(out / "oof.npz", allow_pickle=False) as z:
            if "epoch" in z.files and int(z["epoch"]) != best_epoch:
                return f"{out / 'oof.npz'} holds epoch {int(z['epoch'])}, not the best epoch {best_epoch}"
            z["probs"]  # noqa: B018 (reads the array: a truncated file fails here)
    except Exception as e:
        return f"{out / 'oof.npz'} cannot be read ({type(e).__name__})"
    return None


def _try_resume(path: Path, digest: str) -> dict | None:
    """last.pt if it belongs to this run (same fingerprint) and loads; else None, with a warning."""
    try:
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch", "best", "history"} <= set(ckpt):
            raise StageError("not a checkpoint of lib.engine.train")
    except Exception as e:
        log.warning("ignoring unreadable checkpoint %s (%s); starting the fold afresh", path, e)
        return None
    if ckpt.get("digest") != digest:
        log.info("%s belongs to another configuration; starting the fold afresh", path)
        return None
    return ckpt


def fold_splits(rois: pd.DataFrame, folds: list[int], extra: pd.DataFrame | None = None) -> list[FoldSplit]:
    """Per fold: train on the other folds (+ `extra` rows, e.g. pseudo-labels, never validated on)."""
    train = rois[(rois["split"] == "train") & (rois["ok"] == 1)].assign(weight=1.0)
    views = [c for c in train.columns if c.endswith("_path") and c != "testlike_path"]  # the ROI and every context crop
    out = []
    for k in folds:
        tr = train[train["fold"] != k][views + ["label", "weight"]]
        if extra is not None and len(extra):
            tr = pd.concat([tr, extra[[c for c in views if c in extra] + ["label", "weight"]]], ignore_index=True)
        cols = ["annotation_id", "label"] + views + (["testlike_path"] if "testlike_path" in train else [])
        val = train[train["fold"] == k][cols].reset_index(drop=True)
        out.append(FoldSplit(fold=k, train=tr.reset_index(drop=True), val=val))
    return out


def run_folds(cfg: Config, stage: Stage, rois: pd.DataFrame, taxonomy: Taxonomy, epochs: int, only: list[int] | None,
              force: bool, dry_run: bool, extra: pd.DataFrame | None = None) -> dict | None:
    """Train every fold that is not up to date; returns the CV summary once all folds are done."""
    ddp.init(pick_device(cfg.train.device).type)
    n_folds = int(rois.loc[rois["split"] == "train", "fold"].max()) + 1
    wanted = only or cfg.train.folds or list(range(n_folds))
    for split in fold_splits(rois, wanted, extra):
        fold_stage = stage.child(f"{stage.name}/fold_{split.fold}", stage.dir / f"fold_{split.fold}", {"fold": split.fold},
                                 outputs=FOLD_OUTPUTS)
        if not check(fold_stage, force, dry_run):
            continue
        started = time.time()
        ddp.barrier()  # every rank has decided before rank 0 voids the old record
        # Rank 0 holds the fold's lock (a --fold run of the same fold elsewhere refuses) and sweeps temp files.
        with locked(fold_stage.dir, fold_stage.name) if ddp.is_main() else contextlib.nullcontext():
            if ddp.is_main():
                fold_stage.invalidate()
            result = fit_fold(cfg, split, taxonomy, fold_stage, epochs, fresh=force)
            if not ddp.is_main():
                continue
            fold_stage.finish(result, started)
        tl = f", test-like view {result['val_distance_testlike']:.3f}" if "val_distance_testlike" in result else ""
        log.info("%s: val distance %.3f, top1 %.3f%s at epoch %d (%.0fs)", fold_stage.name, result["val_distance"],
                 result["val_top1"], tl, result["best_epoch"], time.time() - started)
    if dry_run or not ddp.is_main():
        return None
    return cv_summary(stage, n_folds, taxonomy)


def cv_summary(stage: Stage, n_folds: int, taxonomy: Taxonomy) -> CVSummary | None:
    """Out-of-fold score over all folds, or None while some fold is missing or stale."""
    oofs = []
    for k in range(n_folds):
        fold_stage = stage.child(f"{stage.name}/fold_{k}", stage.dir / f"fold_{k}", {"fold": k})
        if fold_stage.reasons() or not (fold_stage.dir / "oof.npz").is_file():
            return None
        oofs.append(np.load(fold_stage.dir / "oof.npz"))
    labels = np.concatenate([o["label"] for o in oofs])
    dist = taxonomy.distance_matrix()
    m = evaluate(np.concatenate([o["probs"] for o in oofs]), labels, dist)
    per_fold = [evaluate(o["probs"], o["label"], dist)["val_distance"] for o in oofs]
    t = {}
    if all("probs_testlike" in o for o in oofs):
        t = evaluate(np.concatenate([o["probs_testlike"] for o in oofs]), labels, dist)
    return CVSummary(m["val_distance"], m["val_top1"], n_folds, int(len(labels)), float(np.mean(per_fold)), float(np.std(per_fold)),
                     t.get("val_distance"), t.get("val_top1"))
