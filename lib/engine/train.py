"""Fit one fold: set up, resume or start, then per epoch train, validate in the competition metric (every
`train.val_every` epochs and the last), checkpoint.

`fit_fold` reads top to bottom as one loop over epochs. What it trains with is a `FoldKit`
(model, loss, optimiser, EMA, loaders, schedule), built whole by `build_kit` from the fold's
seed; its checkpoints (`best.pt`, `oof.npz`, `last.pt`) and resuming live in lib.engine.resume,
and the loop over folds with their records in lib.engine.folds.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence, cast

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler
from tqdm import tqdm

from lib.config import Config
from lib.core.errors import StageError
from lib.core.faults import fault_point
from lib.core.io import atomic_path
from lib.data.augment import build_transforms
from lib.data.budget import LoaderPlan, plan_here
from lib.data.context import frame_ids, model_inputs
from lib.data.dataset import CropDataset, EpochBatches, EpochSampler, make_loader, make_train_loader
from lib.data.mix import mix_batch
from lib.data.resample import frame_resample
from lib.data.samplers import FRAME_SAMPLER_NOTE, FrameBatchSampler, build_sampler
from lib.data.taxonomy import RANKS, Taxonomy
from lib.decide.metric import score_labels
from lib.engine.inference import predict
from lib.engine.results import FoldResult
from lib.engine.resume import Progress, best_files_problem, resume_or_start, save_best, save_last, stale_validations, validates
from lib.model import dist as ddp
from lib.model.device import autocast, channels_last, describe_device, grad_scaler, pick_device, precision_policy, prepare_device
from lib.model.losses import WeightedLoss, build_loss
from lib.model.net import Net, build_net, mean_std, set_grad_checkpointing
from lib.model.optim import Ema, build_optimizer, lr_factor, optimizer_step
from lib.pipeline.records import Stage

log = logging.getLogger("pipeline")
LOSS_EVERY = 20  # batch losses stay on the device and are read every this many batches (no sync per step)


@dataclass
class FoldSplit:
    """Training rows (with per-sample weights) and validation rows of one fold."""

    fold: int
    train: pd.DataFrame  # crop_path (+ ctx<s>_path, full_path), label, weight (+ split, image_id: the frame)
    val: pd.DataFrame  # annotation_id, label, the crop paths (+ testlike_path: the same ROIs shrunk to test box sizes; split, image_id)


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
    ends with the same weights as one never interrupted. Only validated epochs (`train.val_every`)
    can become the best, and `train.patience` counts them alone. `stop_after` ends the run after that
    epoch as a kill would (tests use it; the result is then None, as on every rank but 0). A fold whose last.pt does not fit the model, or whose
    `best.pt` or `oof.npz` is missing, unreadable or from another epoch than the best one (files
    lost after a kill), trains again from scratch, with a warning naming the file; lost again
    right after training it from scratch, it is a StageError (a disk that loses what it writes).
    """
    stage.dir.mkdir(parents=True, exist_ok=True)
    t, main = cfg.train, ddp.is_main()
    kit = build_kit(cfg, split, taxonomy, epochs)
    if main:
        log.info("%s: on %s%s", stage.name, describe_device(kit.device, t.precision),
                 f"; {ddp.world_size()} processes of {kit.batch} rows per step (global batch {t.batch_size})" if ddp.world_size() > 1 else "")
    progress = resume_or_start(kit, stage, epochs, fresh)
    if progress is None:  # last.pt does not fit, or its best files are gone: once more on a clean model (fresh ignores last.pt)
        return fit_fold(cfg, split, taxonomy, stage, epochs, stop_after, fresh=True)
    for epoch in range(progress.epoch, epochs):
        # Decisions are broadcast flags so that under torchrun every rank stops, or goes on, together.
        if ddp.broadcast_flag(bool(t.patience and progress.best["epoch"] > 0 and stale_validations(progress) >= t.patience)):
            log.info("%s: early stop after epoch %d (no gain in %d validated epochs)", stage.name, epoch, t.patience)
            break
        t0 = time.time()
        losses = train_one_epoch(kit, cfg, split, stage.name, epoch, epochs)
        if main:  # rank 0 validates and writes
            end_epoch(kit, cfg, split, taxonomy, stage, progress, epoch, epochs, losses, t0)
        if ddp.broadcast_flag(stop_after is not None and epoch + 1 >= stop_after):
            return None
    lost = best_files_problem(stage.dir, int(progress.best["epoch"])) if main else None
    if ddp.broadcast_flag(lost is not None):  # best files lost while training: one fresh run; lost again, a disk fault
        if fresh:
            raise StageError(f"{lost} right after training it; check the disk of {stage.dir}.")
        if main:
            log.warning("%s; training %s again from scratch", lost, stage.name)
        return fit_fold(cfg, split, taxonomy, stage, epochs, stop_after, fresh=True)
    return finish(kit, stage, progress, n_val=len(split.val), views=cfg.model.context) if main else None


def end_epoch(kit: FoldKit, cfg: Config, split: FoldSplit, taxonomy: Taxonomy, stage: Stage, progress: Progress, epoch: int,
              epochs: int, losses: list[float], t0: float) -> None:
    """Rank 0 after training epoch `epoch` (0-based): validate when `train.val_every` says so, keep a new best, write last.pt.

    An epoch that does not validate gets a history row without scores and cannot become the
    best; last.pt is written every epoch, so a kill in any epoch resumes after it.
    """
    t = cfg.train
    row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan")}
    metrics: dict[str, float] = {}
    if validates(epoch, epochs, t.val_every):
        metrics, arrays = validate(kit, split, taxonomy, testlike=validates(epoch, epochs, t.testlike_every))
        if metrics["val_distance"] < progress.best["val_distance"] - t.min_delta:
            if kit.testlike_loader is not None and "probs_testlike" not in arrays:  # the best epoch's oof.npz keeps the view
                add_testlike(kit, split, metrics, arrays)
            progress.best = {**metrics, "epoch": epoch + 1}
            save_best(kit, stage.dir, split.val, epoch, metrics["val_distance"], arrays)
    row.update({**metrics, "lr": max(g["lr"] for g in kit.optimizer.param_groups), "seconds": round(time.time() - t0, 2)})
    progress.history.append(row)
    save_last(kit, stage, progress, epoch)
    if not metrics:
        log.info("%s epoch %d/%d: loss %.3f, not validated (train.val_every %d) (%.1fs)", stage.name, epoch + 1, epochs,
                 row["train_loss"], t.val_every, row["seconds"])
        return
    tl = f", test-like view {metrics['val_distance_testlike']:.3f}" if "val_distance_testlike" in metrics else ""
    log.info("%s epoch %d/%d: loss %.3f, val distance %.3f, top1 %.3f%s (%.1fs)", stage.name, epoch + 1, epochs,
             row["train_loss"], metrics["val_distance"], metrics["val_top1"], tl, row["seconds"])


# ----------------------------------------------------------------------------- set up


@dataclass
class FoldKit:
    """Everything one fold trains with, built by `build_kit`; built again whole when the fold starts afresh."""

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
    loaders: LoaderPlan  # workers, prefetch and batch of each loader on this host (lib.data.budget)

    @property
    def judged(self) -> nn.Module:
        """The weights validation scores and best.pt keeps: the EMA's when on, else the model's."""
        return self.ema.module if self.ema is not None else self.model


def build_kit(cfg: Config, split: FoldSplit, taxonomy: Taxonomy, epochs: int) -> FoldKit:
    """Model, loss, optimiser, EMA, loaders and schedule of one fold, from the fold's seed."""
    t, device = cfg.train, pick_device(cfg.train.device)
    prepare_device(device)
    precision = precision_policy(device, t.precision)[0]
    seed = cfg.seed * 100 + split.fold
    seed_everything(seed)
    dist = taxonomy.distance_matrix()
    model = build_net(cfg, taxonomy).to(device)
    model = model.to(memory_format=torch.channels_last)  # faster on CUDA and on CPU alike
    if t.grad_checkpointing:
        set_grad_checkpointing(model, cfg.model.backbone)
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
    optimizer = build_optimizer(model, t, cfg.model.backbone)
    ema = Ema(model, t.ema_decay) if t.ema_decay > 0 else None
    views, by_frame = cfg.model.context, cfg.model.frame_context == "attention"
    train_tf = build_transforms(cfg.model.input_size, train=True, mean=mean, std=std, aug=cfg.augment, n_views=len(views))
    ds = CropDataset(model_inputs(split.train, views), split.train["label"], split.train["weight"], transform=train_tf,
                     frames=frame_ids(split.train) if by_frame else None,
                     resample=frame_resample(split.train, views, cfg.augment, cfg.prepare))  # training only: eval never resamples
    has_testlike = "testlike_path" in split.val and bool((split.val["testlike_path"].fillna("") != "").all())
    plan = plan_here(cfg, on_cpu=device.type != "cuda", world=world, testlike=has_testlike)
    if ddp.is_main():
        log.info("loaders: %s", plan.line())
    val = plan.get("val")
    eval_loader = functools.partial(make_loader, img_size=cfg.model.input_size, mean=mean, std=std, batch_size=val.batch,
                                    num_workers=val.workers, device=device, persistent=True, prefetch=val.prefetch,
                                    frames=frame_ids(split.val) if by_frame else None)
    val_loader, testlike_loader = eval_loader(model_inputs(split.val, views)), None
    if has_testlike:
        # The test-like view shrinks the ROI only: 00 cuts no test-like context crops, so context views stay as they are.
        testlike_loader = eval_loader(model_inputs(split.val, views, roi_column="testlike_path"))
    per_rank, batch = len(ds) // world, ddp.rank_batch(t.batch_size, world)  # each process: its share of every epoch and batch
    batches = max(1, per_rank // batch if per_rank > batch else 1)
    if ds.frames is not None:  # whole frames per batch: the schedule counts the first epoch's batches (later ones differ by a few)
        batches = max(1, len(frame_batches(ds.frames, ds.labels, t.sampler, batch, torch.Generator().manual_seed(seed * 1000))))
        describe_frames(ds.frames, t.sampler, batches)
    tr = plan.get("train")
    train_loader = make_train_loader(ds, batch_size=batch, drop_last=per_rank > batch, num_workers=tr.workers, prefetch=tr.prefetch,
                                     pin_memory=device.type == "cuda", frames=ds.frames is not None) if tr.workers > 0 else None
    steps_per_epoch = max(1, math.ceil(batches / t.accumulate))
    return FoldKit(model=model, train_model=train_model, criterion=criterion, optimizer=optimizer, ema=ema, train_tf=train_tf, ds=ds,
                   val_loader=val_loader, testlike_loader=testlike_loader, device=device, precision=precision,
                   scaler=grad_scaler(device, precision), train_loader=train_loader, batch=batch, seed=seed, n_classes=taxonomy.n_classes,
                   counts=counts, dist=dist, steps_per_epoch=steps_per_epoch, total=steps_per_epoch * epochs,
                   warmup=int(t.warmup_epochs * steps_per_epoch), restart=max(1, int(round(t.restart_epochs * steps_per_epoch))),
                   loaders=plan)


# ----------------------------------------------------------------------------- train one epoch


def train_one_epoch(kit: FoldKit, cfg: Config, split: FoldSplit, name: str, epoch: int, epochs: int) -> list[float]:
    """One pass over this rank's share of the training rows, every draw seeded from (seed, fold, epoch); the batch losses.

    The losses stay on the device and are read every LOSS_EVERY batches (and at the end), so
    the GPU is not made to wait for each one; they are the same numbers `loss.item()` would give.
    """
    t, a = cfg.train, cfg.augment
    epoch_seed = kit.seed * 1000 + epoch
    seed_everything(epoch_seed)
    kit.criterion.set_epoch(epoch)
    kit.train_tf.set_random_seed(epoch_seed)
    gen = torch.Generator().manual_seed(epoch_seed)
    loader = _epoch_loader(kit, t, split.train["label"].to_numpy(), epoch_seed, gen)
    kit.model.train()
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    bar = tqdm(loader, desc=f"{name} epoch {epoch + 1}/{epochs}", leave=False, unit="batch", disable=not ddp.is_main())
    kit.optimizer.zero_grad(set_to_none=True)
    n = len(loader)
    for i, batch in enumerate(bar):
        x, y, w = batch[0].to(kit.device, non_blocking=True), batch[1].to(kit.device), batch[2].to(kit.device)
        frames = batch[3].to(kit.device) if len(batch) > 3 else None  # whole frames (model.frame_context=attention)
        y_soft = None
        if a.mixing:
            x, y_soft, w = mix_batch(x, y, w, n_classes=kit.n_classes, mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
                                     prob=a.mix_prob, same_leaf=a.mix_same_leaf, generator=gen, frames=frames)
        group, steps = accumulation(i, n, t.accumulate)
        with _sync_unless(kit.train_model, steps):  # DDP: gradients are all-reduced on the stepping micro-batch only
            with autocast(kit.device, kit.precision):
                out = kit.train_model(channels_last(x), full=True, frames=frames)
            # Mixed (soft) targets train the leaf logits with soft cross-entropy; one-hot batches use the head's loss.
            soft = y_soft.to(kit.device) if y_soft is not None and not a.mix_same_leaf else None
            loss = kit.model.loss(out, y, w, kit.criterion, soft)
            scaled = loss / group  # the group's gradient is the mean of its micro-batches'
            (kit.scaler.scale(scaled) if kit.scaler is not None else scaled).backward()
        pending.append(loss.detach())
        last = i + 1 == n
        if steps:
            _step(kit, t, epoch * kit.steps_per_epoch + i // t.accumulate)
        if len(pending) == LOSS_EVERY or last:
            losses += torch.stack(pending).float().tolist()
            pending.clear()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        fault_point(f"train_batch {name} epoch {epoch + 1}")
    return losses


def accumulation(i: int, n: int, accumulate: int) -> tuple[int, bool]:
    """(micro-batches in the group of batch `i` of `n`, whether batch `i` ends it, so the optimiser steps): groups of
    `accumulate` batches, the epoch's last one cut short, so an epoch makes ceil(n / accumulate) steps."""
    start = i - i % accumulate
    size = min(accumulate, n - start)
    return size, i + 1 == start + size


def _sync_unless(train_model: Any, steps: bool) -> contextlib.AbstractContextManager:
    """DDP's `no_sync` on a micro-batch that does not step (its gradients stay local until the group's last one);
    a plain (or compiled plain) model, or a stepping micro-batch, syncs as usual."""
    ddp_model = getattr(train_model, "_orig_mod", train_model)  # torch.compile wraps the DDP module
    if steps or not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp_model.no_sync()


def _epoch_loader(kit: FoldKit, t, labels: np.ndarray, epoch_seed: int, gen: torch.Generator) -> DataLoader:
    """The epoch's batches: shuffled, or drawn by `train.sampler`; under torchrun each rank its own share.

    Without workers a fresh loader per epoch; with workers the fold's persistent loader, told
    the epoch's order and seed (its workers reseed their augmentation from it). A dataset with
    frame ids gets batches of whole frames (`frame_batches`).
    """
    world, ds = ddp.world_size(), kit.ds
    if getattr(ds, "frames", None) is not None:
        frames = frame_batches(cast(np.ndarray, ds.frames), labels, t.sampler, kit.batch, gen)
        if kit.train_loader is not None:
            cast(EpochBatches, kit.train_loader.batch_sampler).set_epoch(epoch_seed, frames.batches)
            return kit.train_loader
        return DataLoader(ds, batch_sampler=frames, num_workers=0, pin_memory=kit.device.type == "cuda")
    sampler: Sampler | None
    if world > 1 and t.sampler == "random":
        sampler = DistributedSampler(ds, num_replicas=world, rank=ddp.rank(), shuffle=True, seed=epoch_seed, drop_last=True)
    elif world > 1:  # each rank draws its own share of a weighted sample
        sampler = build_sampler(t.sampler, labels, len(ds) // world, torch.Generator().manual_seed(epoch_seed * world + ddp.rank()))
    else:
        sampler = build_sampler(t.sampler, labels, None, gen)
    if kit.train_loader is not None:
        cast(EpochSampler, kit.train_loader.sampler).set_epoch(epoch_seed, sampler if sampler is not None else RandomSampler(ds, generator=gen))
        return kit.train_loader
    return DataLoader(ds, batch_size=kit.batch, shuffle=sampler is None, sampler=sampler, generator=gen,
                      drop_last=len(ds) // world > kit.batch, num_workers=0, pin_memory=kit.device.type == "cuda")


def frame_batches(frames: np.ndarray, labels: np.ndarray, sampler: str, batch: int, gen: torch.Generator) -> FrameBatchSampler:
    """The epoch's batches of whole frames drawn by `train.sampler`; under torchrun every rank packs the same batches
    from the same seed and takes its own share of them (frames, not rows, are split across ranks)."""
    got = FrameBatchSampler(frames, batch, name=sampler, labels=labels, generator=gen, rank=ddp.rank(), world=ddp.world_size())
    if not len(got):
        raise StageError(f"The training frames fill fewer batches than the {ddp.world_size()} torchrun processes; start fewer "
                         f"processes or lower train.batch_size.")
    return got


def describe_frames(frames: np.ndarray, sampler: str, batches: int) -> None:
    """One log line on what the frame attention will see (on rank 0), and where the sampler cannot compose with frames."""
    if not ddp.is_main():
        return
    sizes = np.bincount(np.unique(frames, return_inverse=True)[1])
    log.info("frame attention: %d training rows in %d frames (%.0f%% share their frame, the largest holds %d), %d batches per epoch%s",
             len(frames), len(sizes), 100.0 * sizes[sizes > 1].sum() / max(1, len(frames)), sizes.max(initial=0), batches,
             "" if sampler == "random" else f"; {FRAME_SAMPLER_NOTE.format(name=sampler)}")


def _step(kit: FoldKit, t, step: int) -> None:
    """One optimiser step at position `step` of the schedule: learning rates, gradient clipping (fp16: on the
    unscaled gradients, and a step with inf or NaN gradients is skipped), EMA."""
    factor = lr_factor(step, kit.total, kit.warmup, t.schedule, kit.restart, t.min_lr_ratio)
    for g in kit.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    optimizer_step(kit.optimizer, kit.model.parameters(), t.clip_grad, kit.scaler)
    if kit.ema is not None:
        kit.ema.update(kit.model)


# ----------------------------------------------------------------------------- validate


def validate(kit: FoldKit, split: FoldSplit, taxonomy: Taxonomy, testlike: bool = True) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The judged model on the fold's validation rows (and, with `testlike`, their test-like view): metrics, and oof.npz's arrays."""
    labels = split.val["label"].to_numpy()
    got = predict(kit.judged, kit.val_loader, kit.device, precision=kit.precision, desc="validate")
    metrics = {**evaluate(got["probs"], labels, kit.dist), **detailed_metrics(got["probs"], labels, taxonomy, kit.counts)}
    arrays = {"probs": got["probs"], "embeddings": got["embeddings"].astype(np.float16)}
    if testlike and kit.testlike_loader is not None:
        add_testlike(kit, split, metrics, arrays)
    return metrics, arrays


def add_testlike(kit: FoldKit, split: FoldSplit, metrics: dict[str, float], arrays: dict[str, np.ndarray]) -> None:
    """The test-like view of the validation rows, added to `metrics` and `arrays` (the fold must have that loader)."""
    loader = cast(DataLoader, kit.testlike_loader)
    arrays["probs_testlike"] = predict(kit.judged, loader, kit.device, features=False, precision=kit.precision,
                                       desc="validate test-like")["probs"]
    metrics.update({f"{k}_testlike": v for k, v in evaluate(arrays["probs_testlike"], split.val["label"].to_numpy(), kit.dist).items()})


# ----------------------------------------------------------------------------- end of a fold


def finish(kit: FoldKit, stage: Stage, progress: Progress, n_val: int, views: Sequence[str] = ("1",)) -> FoldResult:
    """history.csv and curves.png of a finished fold (and attention.npz/png under cross_attention); the result its record.json keeps."""
    with atomic_path(stage.dir / "history.csv") as tmp:
        pd.DataFrame(progress.history).to_csv(tmp, index=False)
    from lib.report.plots import plot_history

    plot_history(pd.DataFrame(progress.history), stage.dir / "curves.png", title=stage.name)
    if getattr(kit.model.fusion, "needs_tokens", False):  # cross_attention: where the ROIs of one validation batch looked
        from lib.report.attention import write_attention

        batch = next(iter(kit.val_loader))
        write_attention(kit.judged, batch[0][:8].to(kit.device), views, stage.dir)
    best = progress.best
    return FoldResult(best["epoch"], {k: v for k, v in best.items() if k.startswith("val_")}, len(kit.ds), n_val,
                      validated_epochs=tuple(int(r["epoch"]) for r in progress.history if "val_distance" in r),
                      loader_workers=kit.loaders.get("train").workers)
