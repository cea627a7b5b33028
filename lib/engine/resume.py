"""A fold's checkpoints on disk: `best.pt` and `oof.npz` for the best epoch, `last.pt` to resume a killed run.

`last.pt` (model, optimizer, epoch, best, history, digest, ema when on, and the GradScaler's
state under fp16; every random draw is reseeded from the seed, fold and epoch, so no RNG state
is kept) is written atomically every epoch; `best.pt` and `oof.npz` follow the best validation
distance. A run resumes from `last.pt` only when it belongs to the same run (same digest).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.core.errors import StageError
from lib.core.io import atomic_path
from lib.model import dist as ddp
from lib.model.checkpoint import load_checkpoint
from lib.model.optim import Ema
from lib.pipeline.records import Stage

log = logging.getLogger("pipeline")


class Trainable(Protocol):
    """What a checkpoint saves and restores of a fold's training (lib.engine.train.FoldKit has it)."""

    @property
    def model(self) -> nn.Module: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def ema(self) -> Ema | None: ...
    @property
    def scaler(self) -> torch.amp.GradScaler | None: ...
    @property
    def judged(self) -> nn.Module: ...


@dataclass
class Progress:
    """Where a fold stands: the next epoch (0-based), the best validation so far and one history row per epoch."""

    epoch: int = 0
    best: dict = field(default_factory=lambda: {"val_distance": float("inf"), "epoch": -1})
    history: list = field(default_factory=list)


def validates(epoch: int, epochs: int, every: int) -> bool:
    """Whether 0-based `epoch` of `epochs` validates with `train.val_every` (or `testlike_every`) `every`: each
    every-th epoch, and always the last, so a fold never ends on weights it has not scored."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def stale_validations(progress: Progress) -> int:
    """Validated epochs since the best one: what `train.patience` counts (an epoch that did not validate cannot be
    worse than the best, so it does not count)."""
    return sum(1 for row in progress.history if "val_distance" in row and int(row["epoch"]) > int(progress.best["epoch"]))


def resume_or_start(kit: Trainable, stage: Stage, epochs: int, fresh: bool) -> Progress | None:
    """Epoch 0, or where `last.pt` stopped when it belongs to this run (same fingerprint); None to start over.

    None when last.pt loads but does not fit the model, or when it is complete but `best.pt` /
    `oof.npz` no longer hold its best epoch (lost after a kill): nothing is left to resume, so
    the caller starts the fold afresh on a clean model. `fresh` ignores last.pt.
    """
    last = stage.dir / "last.pt"
    ckpt = try_resume(last, stage.digest) if last.is_file() and not fresh else None
    if ckpt is None:
        return Progress()
    try:
        kit.model.load_state_dict(ckpt["model"])
        kit.optimizer.load_state_dict(ckpt["optimizer"])
        if kit.ema is not None and "ema" in ckpt:
            kit.ema.load_state_dict(ckpt["ema"])
        if kit.scaler is not None and "scaler" in ckpt:  # fp16: the loss scale it had reached, so the resumed steps match
            kit.scaler.load_state_dict(ckpt["scaler"])
        progress = Progress(int(ckpt["epoch"]) + 1, dict(ckpt["best"]), list(ckpt["history"]))
    except Exception as e:  # a checkpoint that loads but does not fit: start over on a clean model
        log.warning("ignoring checkpoint %s (%s: %s); starting the fold afresh", last, type(e).__name__, e)
        return None
    main = ddp.is_main()
    lost = best_files_problem(stage.dir, int(progress.best["epoch"])) if progress.epoch >= epochs and main else None
    if ddp.broadcast_flag(lost is not None):  # finished, but its best weights are gone: nothing to resume
        if main:
            log.warning("%s; training %s again from scratch", lost, stage.name)
        return None
    if progress.epoch < epochs:
        log.info("%s: resuming at epoch %d/%d", stage.name, progress.epoch + 1, epochs)
    else:
        log.info("%s: last.pt is complete (%d epochs); keeping its best.pt and oof.npz", stage.name, progress.epoch)
    return progress


def save_best(kit: Trainable, out: Path, val: pd.DataFrame, epoch: int, val_distance: float, arrays: dict[str, np.ndarray]) -> None:
    """A new best epoch (0-based `epoch`): best.pt (the judged weights) and oof.npz (the validation arrays), each atomically."""
    # torch.save writes a copy: later steps cannot alter the best weights on disk.
    with atomic_path(out / "best.pt") as tmp, open(tmp, "wb") as f:  # via a handle: the same weights, the same bytes
        torch.save({"model": kit.judged.state_dict(), "epoch": epoch + 1, "val_distance": val_distance}, f)
    with atomic_path(out / "oof.npz") as tmp:
        saved: dict[str, Any] = {"annotation_id": val["annotation_id"].to_numpy(), "label": val["label"].to_numpy(),
                                 "probs": arrays["probs"], "epoch": np.int64(epoch + 1), **{k: v for k, v in arrays.items() if k != "probs"}}
        np.savez(tmp, **saved)


def save_last(kit: Trainable, stage: Stage, progress: Progress, epoch: int) -> None:
    """last.pt, atomically: model, optimizer, epoch (0-based, the last one done), best, history, digest, ema (when on),
    scaler (fp16 only)."""
    state = {"model": kit.model.state_dict(), "optimizer": kit.optimizer.state_dict(), "epoch": epoch, "best": progress.best,
             "history": progress.history, "digest": stage.digest}
    if kit.ema is not None:
        state["ema"] = kit.ema.state_dict()
    if kit.scaler is not None:
        state["scaler"] = kit.scaler.state_dict()
    with atomic_path(stage.dir / "last.pt") as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def best_files_problem(out: Path, best_epoch: int) -> str | None:
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
            z["probs"]  # reads the array: a truncated file fails here
    except Exception as e:
        return f"{out / 'oof.npz'} cannot be read ({type(e).__name__})"
    return None


def try_resume(path: Path, digest: str) -> dict | None:
    """last.pt if it belongs to this run (same fingerprint) and loads; else None, with a warning."""
    try:
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch", "best", "history"} <= set(ckpt):
            raise StageError("not a fold checkpoint (lib.engine.resume)")
    except Exception as e:
        log.warning("ignoring unreadable checkpoint %s (%s); starting the fold afresh", path, e)
        return None
    if ckpt.get("digest") != digest:
        log.info("%s belongs to another configuration; starting the fold afresh", path)
        return None
    return ckpt
