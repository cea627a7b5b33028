"""Fit one fold, and the fold loop shared by 01 (phase 1) and 03 (phase 2).

`fit_fold` reads top to bottom: set up (model, loss, optimiser, EMA, loaders, schedule), resume
or start, then per epoch train, validate in the competition metric, checkpoint. `last.pt`
(model, optimizer, epoch, best, history, digest, ema when on, and the GradScaler's state under
fp16: every random draw is reseeded from the seed, fold and epoch, so no RNG state is kept) is
written atomically every epoch so a killed run resumes where it stopped; `best.pt` and `oof.npz` follow the best validation
distance. A fold ends by writing its `record.json`, which vouches for `best.pt` and `oof.npz`:
a fold whose files were lost or damaged runs again (alone).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler
from tqdm import tqdm

from lib.config import Config
from lib.core.cli import check
from lib.core.errors import StageError
from lib.core.faults import fault_point
from lib.core.io import atomic_path, load_npz
from lib.core.locks import locked
from lib.core.records import Stage
from lib.data.augment import build_transforms
from lib.data.context import model_inputs
from lib.data.dataset import CropDataset, EpochSampler, make_loader, make_train_loader
from lib.data.mix import mix_batch, soft_target_loss
from lib.data.samplers import build_sampler
from lib.data.taxonomy import RANKS, Taxonomy
from lib.decide.metric import score_labels
from lib.engine.inference import predict
from lib.engine.results import CVSummary, FoldResult
from lib.model import dist as ddp
from lib.model.checkpoint import load_checkpoint
from lib.model.device import autocast, channels_last, describe_device, grad_scaler, pick_device, precision_policy, prepare_device
from lib.model.losses import WeightedLoss, build_loss
from lib.model.net import Net, build_net, mean_std
from lib.model.optim import Ema, lr_factor, optimizer_step, param_groups

log = logging.getLogger("pipeline")
FOLD_OUTPUTS = ("best.pt", "oof.npz")  # what a fold's record vouches for (last.pt may be deleted to save space)
LOSS_EVERY = 20  # batch losses stay on the device and are read every this many batches (no sync per step)


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


# ----------------------------------------------------------------------------- one fold


def fit_fold(cfg: Config, split: FoldSplit, taxonomy: Taxonomy, stage: Stage, epochs: int, stop_after: int | None = None,
             fresh: bool = False) -> FoldResult | None:
    """Train one fold to `epochs`, resuming from `last.pt` when it belongs to this same run (unless `fresh`).

    Every epoch reseeds all randomness from (seed, fold, epoch), so a run resumed from `last.pt`
    ends with the same weights as one never interrupted. `stop_after` ends the run after that
    epoch as a kill would (tests use it; the result is then None, as on every rank but 0). A fold whose last.pt does not fit the model, or whose
    `best.pt` or `oof.npz` is missing, unreadable or from another epoch than the best one (files
    lost after a kill), trains again from scratch, with a warning naming the file; lost again
    right after training it from scratch, it is a StageError (a disk that loses what it writes).
    """
    stage.dir.mkdir(parents=True, exist_ok=True)
    t, main = cfg.train, ddp.is_main()
    while True:  # twice at most: the second pass is fresh, and a fresh pass ends or raises
        run = set_up(cfg, split, taxonomy, epochs)
        if main:
            log.info("%s: on %s%s", stage.name, describe_device(run.device, t.precision),
                     f"; {ddp.world_size()} processes of {run.batch} rows per step (global batch {t.batch_size})"
                     if ddp.world_size() > 1 else "")
        progress = resume_or_start(run, stage, epochs, fresh)
        if progress is None:
            fresh = True
            continue
        for epoch in range(progress.epoch, epochs):
            if ddp.broadcast_flag(bool(t.patience and progress.best["epoch"] > 0 and epoch + 1 - progress.best["epoch"] > t.patience)):
                log.info("%s: early stop after epoch %d (no gain for %d epochs)", stage.name, epoch, t.patience)
                break
            t0 = time.time()
            losses = train_one_epoch(run, cfg, split, stage.name, epoch, epochs)
            if main:  # rank 0 validates and writes
                metrics, arrays = validate(run, split, taxonomy)
                row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"), **metrics,
                       "lr": max(g["lr"] for g in run.optimizer.param_groups), "seconds": round(time.time() - t0, 2)}
                progress.history.append(row)
                if metrics["val_distance"] < progress.best["val_distance"] - t.min_delta:
                    progress.best = {**metrics, "epoch": epoch + 1}
                    save_best(run, stage.dir, split, epoch, metrics["val_distance"], arrays)
                save_last(run, stage, progress, epoch)
                tl = f", test-like view {metrics['val_distance_testlike']:.3f}" if "val_distance_testlike" in metrics else ""
                log.info("%s epoch %d/%d: loss %.3f, val distance %.3f, top1 %.3f%s (%.1fs)", stage.name, epoch + 1, epochs,
                         row["train_loss"], metrics["val_distance"], metrics["val_top1"], tl, row["seconds"])
            if ddp.broadcast_flag(stop_after is not None and epoch + 1 >= stop_after):
                return None
        lost = _best_files_problem(stage.dir, int(progress.best["epoch"])) if main else None
        if not ddp.broadcast_flag(lost is not None):  # every rank starts over together, or none does
            break
        if fresh:
            raise StageError(f"{lost} right after training it; check the disk of {stage.dir}.")
        if main:
            log.warning("%s; training %s again from scratch", lost, stage.name)
        fresh = True
    return finish(run, stage, progress, n_val=len(split.val)) if main else None


# ----------------------------------------------------------------------------- set up


@dataclass
class Setup:
    """Everything one fold trains with, built by `set_up`; built again whole when the fold starts afresh."""

    model: Net  # validated and checkpointed; `train_model` is what the training forward runs
    train_model: Any  # the model, or its DDP / torch.compile wrapper (a callable module)
    criterion: WeightedLoss
    optimizer: torch.optim.Optimizer
    ema: Ema | None
    train_tf: Any  # the training transform, reseeded every epoch
    ds: CropDataset
    val_loader: DataLoader
    testlike_loader: DataLoader | None  # the same validation ROIs shrunk to test box sizes, when 00 cut them
    device: torch.device
    precision: str  # bf16, fp16 or fp32: lib.model.device.precision_policy's answer for train.precision here
    scaler: torch.amp.GradScaler | None  # fp16 only: scales the loss so small gradients do not underflow
    train_loader: DataLoader | None  # with loader workers: one persistent loader for every epoch (else one per epoch)
    batch: int  # rows per process in one step (train.batch_size split over the torchrun processes)
    seed: int  # the fold's seed; epoch e reseeds everything from seed * 1000 + e
    n_classes: int
    counts: np.ndarray  # training rows per class
    dist: np.ndarray  # the taxonomic distance matrix
    steps_per_epoch: int
    total: int  # schedule: optimiser steps in all, warmup steps, steps per warm restart
    warmup: int
    restart: int

    @property
    def judged(self) -> nn.Module:
        """The weights validation scores and best.pt keeps: the EMA's when on, else the model's."""
        return self.ema.module if self.ema is not None else self.model


def set_up(cfg: Config, split: FoldSplit, taxonomy: Taxonomy, epochs: int) -> Setup:
    """Model, loss, optimiser, EMA, loaders and schedule of one fold, from the fold's seed."""
    t, device = cfg.train, pick_device(cfg.train.device)
    prepare_device(device)
    precision = precision_policy(device, t.precision)[0]
    seed = cfg.seed * 100 + split.fold
    seed_everything(seed)
    dist = taxonomy.distance_matrix()
    model = build_net(cfg, taxonomy).to(device)
    model = model.to(memory_format=torch.channels_last)  # faster on CUDA and on CPU alike
    train_model: Any = model
    world = ddp.world_size()
    if world > 1:  # gradients averaged across torchrun processes; rank 0 validates and writes
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=cfg.augment.mixing)
    if t.compile:  # the training forward only; validation and checkpoints use the plain module
        train_model = torch.compile(train_model)
    mean, std = mean_std(model)
    counts = np.bincount(split.train["label"].to_numpy(), minlength=taxonomy.n_classes)
    criterion = build_loss(cfg.loss, counts, dist, taxonomy.lca_distance_matrix() if cfg.loss.ts_distance == "lca" else None).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, t.lr, t.weight_decay, t.backbone_lr_mult))
    ema = Ema(model, t.ema_decay) if t.ema_decay > 0 else None
    views = cfg.model.context
    train_tf = build_transforms(cfg.model.img_size, train=True, mean=mean, std=std, aug=cfg.augment, n_views=len(views))
    ds = CropDataset(model_inputs(split.train, views), split.train["label"], split.train["weight"], transform=train_tf)
    eval_loader = functools.partial(make_loader, img_size=cfg.model.img_size, mean=mean, std=std, batch_size=t.eval_batch_size,
                                    num_workers=t.num_workers, device=device, persistent=True)
    val_loader, testlike_loader = eval_loader(model_inputs(split.val, views)), None
    if "testlike_path" in split.val and (split.val["testlike_path"].fillna("") != "").all():
        # The test-like view shrinks the ROI only: 00 cuts no test-like context crops, so context views stay as they are.
        testlike_loader = eval_loader(model_inputs(split.val, views, roi_column="testlike_path"))
    per_rank, batch = len(ds) // world, ddp.rank_batch(t.batch_size, world)  # each process: its share of every epoch and batch
    batches = max(1, per_rank // batch if per_rank > batch else 1)
    train_loader = make_train_loader(ds, batch_size=batch, drop_last=per_rank > batch, num_workers=t.num_workers,
                                     pin_memory=device.type == "cuda") if t.num_workers > 0 else None
    steps_per_epoch = max(1, math.ceil(batches / t.accumulate))
    return Setup(model, train_model, criterion, optimizer, ema, train_tf, ds, val_loader, testlike_loader, device, precision,
                 grad_scaler(device, precision), train_loader, batch, seed, taxonomy.n_classes, counts, dist, steps_per_epoch,
                 total=steps_per_epoch * epochs, warmup=int(t.warmup_epochs * steps_per_epoch),
                 restart=max(1, int(round(t.restart_epochs * steps_per_epoch))))


@dataclass
class Progress:
    """Where a fold stands: the next epoch (0-based), the best validation so far and one history row per epoch."""

    epoch: int = 0
    best: dict = field(default_factory=lambda: {"val_distance": float("inf"), "epoch": -1})
    history: list = field(default_factory=list)


# ----------------------------------------------------------------------------- resume or start


def resume_or_start(run: Setup, stage: Stage, epochs: int, fresh: bool) -> Progress | None:
    """Epoch 0, or where `last.pt` stopped when it belongs to this run (same fingerprint); None to start over.

    None when last.pt loads but does not fit the model, or when it is complete but `best.pt` /
    `oof.npz` no longer hold its best epoch (lost after a kill): nothing is left to resume, so
    the caller starts the fold afresh on a clean model. `fresh` ignores last.pt.
    """
    last = stage.dir / "last.pt"
    ckpt = _try_resume(last, stage.digest) if last.is_file() and not fresh else None
    if ckpt is None:
        return Progress()
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.ema is not None and "ema" in ckpt:
            run.ema.load_state_dict(ckpt["ema"])
        if run.scaler is not None and "scaler" in ckpt:  # fp16: the loss scale it had reached, so the resumed steps match
            run.scaler.load_state_dict(ckpt["scaler"])
        progress = Progress(int(ckpt["epoch"]) + 1, dict(ckpt["best"]), list(ckpt["history"]))
    except Exception as e:  # a checkpoint that loads but does not fit: start over on a clean model
        log.warning("ignoring checkpoint %s (%s: %s); starting the fold afresh", last, type(e).__name__, e)
        return None
    main = ddp.is_main()
    lost = _best_files_problem(stage.dir, int(progress.best["epoch"])) if progress.epoch >= epochs and main else None
    if ddp.broadcast_flag(lost is not None):  # finished, but its best weights are gone: nothing to resume
        if main:
            log.warning("%s; training %s again from scratch", lost, stage.name)
        return None
    if progress.epoch < epochs:
        log.info("%s: resuming at epoch %d/%d", stage.name, progress.epoch + 1, epochs)
    else:
        log.info("%s: last.pt is complete (%d epochs); keeping its best.pt and oof.npz", stage.name, progress.epoch)
    return progress


# ----------------------------------------------------------------------------- train one epoch


def train_one_epoch(run: Setup, cfg: Config, split: FoldSplit, name: str, epoch: int, epochs: int) -> list[float]:
    """One pass over this rank's share of the training rows, every draw seeded from (seed, fold, epoch); the batch losses.

    The losses stay on the device and are read every LOSS_EVERY batches (and at the end), so
    the GPU is not made to wait for each one; they are the same numbers `loss.item()` would give.
    """
    t, a = cfg.train, cfg.augment
    epoch_seed = run.seed * 1000 + epoch
    seed_everything(epoch_seed)
    run.criterion.set_epoch(epoch)
    run.train_tf.set_random_seed(epoch_seed)
    gen = torch.Generator().manual_seed(epoch_seed)
    loader = _epoch_loader(run, t, split.train["label"].to_numpy(), epoch_seed, gen)
    run.model.train()
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    bar = tqdm(loader, desc=f"{name} epoch {epoch + 1}/{epochs}", leave=False, unit="batch", disable=not ddp.is_main())
    run.optimizer.zero_grad(set_to_none=True)
    for i, (x, y, w) in enumerate(bar):
        x, y, w = x.to(run.device, non_blocking=True), y.to(run.device), w.to(run.device)
        y_soft = None
        if a.mixing:
            x, y_soft, w = mix_batch(x, y, w, n_classes=run.n_classes, mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
                                     prob=a.mix_prob, same_leaf=a.mix_same_leaf, generator=gen)
        with autocast(run.device, run.precision):
            out = run.train_model(channels_last(x), full=True)
        # Mixed (soft) targets train the leaf logits with soft cross-entropy; one-hot batches use the head's loss.
        soft = y_soft is not None and not a.mix_same_leaf
        loss = soft_target_loss(out.logits, y_soft.to(run.device), w) if soft and y_soft is not None else \
            run.model.head_module.loss(out, y, w, run.criterion)
        scaled = loss / t.accumulate
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        pending.append(loss.detach())
        last = i + 1 == len(loader)
        if (i + 1) % t.accumulate == 0 or last:
            _step(run, t, epoch * run.steps_per_epoch + i // t.accumulate)
        if len(pending) == LOSS_EVERY or last:
            losses += torch.stack(pending).float().tolist()
            pending.clear()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        fault_point(f"train_batch {name} epoch {epoch + 1}")
    return losses


def _epoch_loader(run: Setup, t, labels: np.ndarray, epoch_seed: int, gen: torch.Generator) -> DataLoader:
    """The epoch's batches: shuffled, or drawn by `train.sampler`; under torchrun each rank its own share.

    Without workers a fresh loader per epoch; with workers the fold's persistent loader, told
    the epoch's order and seed (its workers reseed their augmentation from it).
    """
    world, ds = ddp.world_size(), run.ds
    sampler: Sampler | None
    if world > 1 and t.sampler == "random":
        sampler = DistributedSampler(ds, num_replicas=world, rank=ddp.rank(), shuffle=True, seed=epoch_seed, drop_last=True)
    elif world > 1:  # each rank draws its own share of a weighted sample
        sampler = build_sampler(t.sampler, labels, len(ds) // world, torch.Generator().manual_seed(epoch_seed * world + ddp.rank()))
    else:
        sampler = build_sampler(t.sampler, labels, None, gen)
    if run.train_loader is not None:
        cast(EpochSampler, run.train_loader.sampler).set_epoch(epoch_seed, sampler if sampler is not None else RandomSampler(ds, generator=gen))
        return run.train_loader
    return DataLoader(ds, batch_size=run.batch, shuffle=sampler is None, sampler=sampler, generator=gen,
                      drop_last=len(ds) // world > run.batch, num_workers=0, pin_memory=run.device.type == "cuda")


def _step(run: Setup, t, step: int) -> None:
    """One optimiser step at position `step` of the schedule: learning rates, gradient clipping (fp16: on the
    unscaled gradients, and a step with inf or NaN gradients is skipped), EMA."""
    factor = lr_factor(step, run.total, run.warmup, t.schedule, run.restart, t.min_lr_ratio)
    for g in run.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    optimizer_step(run.optimizer, run.model.parameters(), t.clip_grad, run.scaler)
    if run.ema is not None:
        run.ema.update(run.model)


# ----------------------------------------------------------------------------- validate


def validate(run: Setup, split: FoldSplit, taxonomy: Taxonomy) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The judged model on the fold's validation rows (and their test-like view): metrics, and oof.npz's arrays."""
    labels = split.val["label"].to_numpy()
    got = predict(run.judged, run.val_loader, run.device, precision=run.precision, desc="validate")
    metrics = {**evaluate(got["probs"], labels, run.dist), **detailed_metrics(got["probs"], labels, taxonomy, run.counts)}
    arrays = {"probs": got["probs"], "embeddings": got["embeddings"].astype(np.float16)}
    if run.testlike_loader is not None:
        arrays["probs_testlike"] = predict(run.judged, run.testlike_loader, run.device, features=False, precision=run.precision,
                                           desc="validate test-like")["probs"]
        metrics.update({f"{k}_testlike": v for k, v in evaluate(arrays["probs_testlike"], labels, run.dist).items()})
    return metrics, arrays


# ----------------------------------------------------------------------------- checkpoints


def save_best(run: Setup, out: Path, split: FoldSplit, epoch: int, val_distance: float, arrays: dict[str, np.ndarray]) -> None:
    """A new best epoch (0-based `epoch`): best.pt (the judged weights) and oof.npz (the validation arrays), each atomically."""
    # torch.save writes a copy: later steps cannot alter the best weights on disk.
    with atomic_path(out / "best.pt") as tmp, open(tmp, "wb") as f:  # via a handle: the same weights, the same bytes
        torch.save({"model": run.judged.state_dict(), "epoch": epoch + 1, "val_distance": val_distance}, f)
    with atomic_path(out / "oof.npz") as tmp:
        saved: dict[str, Any] = {"annotation_id": split.val["annotation_id"].to_numpy(), "label": split.val["label"].to_numpy(),
                                 "probs": arrays["probs"], "epoch": np.int64(epoch + 1), **{k: v for k, v in arrays.items() if k != "probs"}}
        np.savez(tmp, **saved)


def save_last(run: Setup, stage: Stage, progress: Progress, epoch: int) -> None:
    """last.pt, atomically: model, optimizer, epoch (0-based, the last one done), best, history, digest, ema (when on),
    scaler (fp16 only)."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "epoch": epoch, "best": progress.best,
             "history": progress.history, "digest": stage.digest}
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    with atomic_path(stage.dir / "last.pt") as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def finish(run: Setup, stage: Stage, progress: Progress, n_val: int) -> FoldResult:
    """history.csv and curves.png of a finished fold; the result its record.json keeps."""
    with atomic_path(stage.dir / "history.csv") as tmp:
        pd.DataFrame(progress.history).to_csv(tmp, index=False)
    from lib.report.plots import plot_history

    plot_history(pd.DataFrame(progress.history), stage.dir / "curves.png", title=stage.name)
    best = progress.best
    return FoldResult(best["epoch"], {k: v for k, v in best.items() if k.startswith("val_")}, len(run.ds), n_val)


# ----------------------------------------------------------------------------- resume helpers


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


def run_folds(cfg: Config, stage: Stage, *, rois: pd.DataFrame, taxonomy: Taxonomy, epochs: int, only: list[int] | None = None,
              force: bool = False, dry_run: bool = False, extra: pd.DataFrame | None = None) -> CVSummary | None:
    """Train every fold that is not up to date (`only` these folds, else `train.folds` or all), adding `extra`
    training rows (phase 2's pseudo-labels); returns the CV summary once all folds are done (None on a dry run)."""
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
            if result is None:  # a rank other than 0
                continue
            fold_stage.finish(result.to_record(), started)
        s = result.scores
        tl = f", test-like view {s['val_distance_testlike']:.3f}" if "val_distance_testlike" in s else ""
        log.info("%s: val distance %.3f, top1 %.3f%s at epoch %d (%.0fs)", fold_stage.name, s["val_distance"],
                 s["val_top1"], tl, result.best_epoch, time.time() - started)
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
        oofs.append(load_npz(fold_stage.dir / "oof.npz", "delete it and rerun the training stage (its fold runs again)"))
    labels = np.concatenate([o["label"] for o in oofs])
    dist = taxonomy.distance_matrix()
    m = evaluate(np.concatenate([o["probs"] for o in oofs]), labels, dist)
    per_fold = [evaluate(o["probs"], o["label"], dist)["val_distance"] for o in oofs]
    t = {}
    if all("probs_testlike" in o for o in oofs):
        t = evaluate(np.concatenate([o["probs_testlike"] for o in oofs]), labels, dist)
    return CVSummary(m["val_distance"], m["val_top1"], n_folds, int(len(labels)), float(np.mean(per_fold)), float(np.std(per_fold)),
                     t.get("val_distance"), t.get("val_top1"))
