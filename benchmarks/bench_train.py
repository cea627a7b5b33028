"""Benchmark of the training step: images per second of the model step alone against the whole fit loop.

    .venv/bin/python benchmarks/bench_train.py [--quick]

"Alone": the model lib.engine.train builds (build_net, channels_last, AdamW groups, the configured loss)
stepping on one preloaded augmented batch: forward under lib.model.device.autocast at the precision
the policy picks (bf16 on GPUs with native bf16, fp16 with a GradScaler on older ones, fp32 on CPU),
the head's loss, backward, optimiser step. "Whole": lib.engine.train.fit_fold on the same model and
settings with an EMA of the weights: a fresh DataLoader per epoch, augmentation, the step,
EMA update, tqdm and loss logging, validation (32 rows) and the last.pt / best.pt / oof.npz
writes; its rate is that of the second epoch (log line to log line), so model building and
first-time set-up do not count. Ratio = whole's time per image / alone's (target on a GPU:
<= 1.10 with enough workers; on CPU it is reported). Also the parts that explain the gap: the
loader's own rate, one EMA update, one checkpoint write, and torch's 2 threads against 1.

CPU: the demo's settings (tf_efficientnet_lite0 at 64 px, batch 32, fp32, workers 0). CUDA: the recipe of configs/fathomnet2025.yaml (convnext_tiny
at 224 px, batch 64, per_rank head, [1, 3] context views, the policy's precision, channels_last) with
min(8, cores) workers, and `train.compile` as an option with its measured gain.
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

SECTION = "Training step (01/03): the step alone against the whole fit loop"


def setup(work: Path, cuda: bool, quick: bool):
    """(cfg, split, taxonomy) on a small prepared demo: train rows cycled to a few batches, 32 validation rows."""
    from lib.config import load_config
    from lib.data.artifacts import load_prepared
    from lib.engine.train import FoldSplit

    B.prepared_demo(work, "bench_demo", 4, 2, ["prepare.n_folds=2", "prepare.workers=1"])
    root = work / "bench_demo"
    common = [f"data.root={root / 'data'}", f"output_root={root / 'out'}", "exp=bench_demo", "train.ema_decay=0.999"]
    if cuda:
        import os

        cfg = load_config(str(B.ROOT / "configs/fathomnet2025.yaml"),
                          common + ["model.pretrained=none", f"train.num_workers={min(8, os.cpu_count() or 1)}"])
        n_batches = 8 if quick else 16
    else:
        cfg = load_config(str(B.ROOT / "configs/demo.yaml"), common)
        n_batches = 3 if quick else 4
    prep = load_prepared(cfg)  # the folder prepared_demo filled: same output_root and exp
    rois, tax = prep.rois, prep.taxonomy
    train = rois[(rois["split"] == "train") & (rois["ok"] == 1)].reset_index(drop=True)
    n = n_batches * cfg.train.batch_size
    rows = train.iloc[[i % len(train) for i in range(n)]].reset_index(drop=True).assign(weight=1.0)
    views = [c for c in train.columns if c.endswith("_path") and c != "testlike_path"]
    split = FoldSplit(fold=0, train=rows[views + ["label", "weight"]],
                      val=train.iloc[:32][["annotation_id", "label"] + views].reset_index(drop=True))
    return cfg, split, tax


def parts(cfg, tax, labels, device, compile_: bool = False):
    """Model, the module to step (compiled or not), optimiser and loss, as lib.engine.train.fit_fold builds them (`labels`: the training labels)."""
    import numpy as np
    import torch

    from lib.model.losses import build_loss
    from lib.model.net import build_net, set_grad_checkpointing
    from lib.model.optim import build_optimizer

    t = cfg.train
    model = build_net(cfg, tax).to(device).to(memory_format=torch.channels_last)
    if t.grad_checkpointing:
        set_grad_checkpointing(model, cfg.model.backbone)
    counts = np.bincount(np.asarray(labels), minlength=tax.n_classes)
    criterion = build_loss(cfg.loss, counts, tax.distance_matrix(), tax.lca_distance_matrix()).to(device)
    optimizer = build_optimizer(model, t, cfg.model.backbone)
    return model, (torch.compile(model) if compile_ else model), optimizer, criterion


def one_batch(cfg, split, batch_size: int | None = None):
    """One augmented training batch from the fit loop's own dataset and transform."""
    from torch.utils.data import DataLoader

    from lib.data.augment import build_transforms
    from lib.data.context import model_inputs
    from lib.data.dataset import CropDataset
    from lib.model.net import build_model, mean_std

    views = cfg.model.context
    mean, std = mean_std(build_model(cfg.model.backbone, 0, "none"))  # what fit_fold reads from its model
    tf = build_transforms(cfg.model.img_size, train=True, mean=mean, std=std, aug=cfg.augment, n_views=len(views))
    ds = CropDataset(model_inputs(split.train, views), split.train["label"], split.train["weight"], transform=tf)
    return next(iter(DataLoader(ds, batch_size=batch_size or cfg.train.batch_size, shuffle=False))), ds


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(cfg, tax, labels, batch, device, steps: int, warmup: int, compile_: bool = False) -> tuple[float, float]:
    """Images per second of the bare training step on a preloaded batch; and the warm-up seconds (compile time)."""
    from lib.model.device import autocast, channels_last, grad_scaler, precision_policy
    from lib.model.optim import optimizer_step

    model, train_model, optimizer, criterion = parts(cfg, tax, labels, device, compile_)
    precision = precision_policy(device, cfg.train.precision)[0]
    scaler = grad_scaler(device, precision)
    x, y, w = (v.to(device) for v in batch)
    x = channels_last(x)
    model.train()

    def step():
        with autocast(device, precision):
            out = train_model(x, full=True)
        loss = model.head_module.loss(out, y, w, criterion)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        optimizer_step(optimizer, model.parameters(), 0.0, scaler)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * len(x) / (time.perf_counter() - t0), warm


class _EpochTimes(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if " epoch " in record.getMessage() and "val distance" in record.getMessage():
            self.times.append(record.created)


def whole_rate(cfg, split, tax, out: Path, workers: int) -> tuple[float, float]:
    """Images per second of fit_fold's second epoch (log line to log line) and the whole call's seconds."""
    import dataclasses

    from lib.engine.train import fit_fold
    from lib.pipeline.records import Stage

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=workers))
    stage = Stage.create(f"bench/fold_w{workers}", out / f"fold_w{workers}", cfg, ["train"], B.ROOT / "01_train_folds.py", {})
    logger = logging.getLogger("pipeline")
    handler, level = _EpochTimes(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        t0 = time.perf_counter()
        fit_fold(cfg, split, tax, stage, epochs=2)
        total = time.perf_counter() - t0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    per_epoch = (len(split.train) // cfg.train.batch_size) * cfg.train.batch_size
    return per_epoch / (handler.times[1] - handler.times[0]), total


def run(quick: bool = False, work: Path | None = None) -> list[dict]:
    import torch

    from lib.model.device import pick_device, precision_policy
    from lib.model.optim import Ema

    work = Path(work or tempfile.mkdtemp(prefix="bench_train_"))
    device = pick_device("auto")
    cuda = device.type == "cuda"
    cfg, split, tax = setup(work, cuda, quick)
    batch, ds = one_batch(cfg, split)
    labels = split.train["label"].to_numpy()
    t, m = cfg.train, cfg.model
    precision = precision_policy(device, t.precision)[0]
    what = (f"{m.backbone} @{m.img_size}px, batch {t.batch_size}, head {cfg.head.name}, context {list(m.context)}, "
            + (f"{precision} autocast + channels_last" if cuda else "fp32 + channels_last, CPU"))
    steps, warmup = (30, 10) if cuda else (3 if quick else 4, 2)
    workers = [min(8, B.cpus_available())] if cuda else [0]  # the demo's; 2 workers on 2 busy cores only compete with torch
    first, _ = step_rate(cfg, tax, labels, batch, device, steps, warmup)
    wholes = {w: whole_rate(cfg, split, tax, work / "fit", w) for w in workers}
    again, _ = step_rate(cfg, tax, labels, batch, device, steps, warmup)
    alone = max(first, again)  # before and after the loop; the less disturbed of the two
    rows = []
    s = lambda v: f"{v:.1f} img/s"
    for w, (whole, total) in wholes.items():
        rows.append(B.row(f"train: whole fit loop vs step alone, {w} workers ({what})", s(whole), s(alone) + " alone", alone / whole,
                          "<= 1.10" if cuda else "report (1.10 on a GPU)",
                          f"epoch 2 of 2 ({len(split.train)} rows): loader, step, EMA, logging, validation of 32 rows, "
                          f"last.pt/oof.npz writes; fit_fold took {total:.1f}s in all; step alone {first:.1f} img/s before, "
                          f"{again:.1f} after", met=None if not cuda else (alone / whole <= 1.10), section=SECTION))

    # What the gap is made of.
    from torch.utils.data import DataLoader

    def load_all():
        for _ in DataLoader(ds, batch_size=t.batch_size, num_workers=0):
            pass

    loader_rate = len(ds) / B.best_of(load_all, 1)
    rows.append(B.row("train: the loader alone (this config's augmentation, main process) vs step alone",
                      f"{loader_rate:.1f} img/s", s(alone), alone / loader_rate, "report",
                      "time per image of the loader / of the step: with 0 workers the loop pays both in turn", section=SECTION))
    model, _, optimizer, _ = parts(cfg, tax, labels, device)
    ema = Ema(model, 0.999)
    ema.update(model)
    sync(device)

    def ema_step() -> None:
        ema.update(model)
        sync(device)

    ema_s = B.best_of(ema_step, 5)
    step_s = t.batch_size / alone
    note = "lib.model.optim.Ema: a multiply-add per tensor of the state dict"
    if not cuda:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ema_1 = B.best_of(lambda: ema.update(model), 5)
        finally:
            torch.set_num_threads(threads)
        note += (f"; {ema_1 * 1000:.1f} ms on one thread: with {threads} threads each of its ~500 small ops opens a parallel "
                 "region, and on busy cores each waits for a descheduled thread")
    rows.append(B.row("train: one EMA update vs one step", f"{ema_s * 1000:.1f} ms", f"{step_s * 1000:.0f} ms", ema_s / step_s, "<= 0.05",
                      note, section=SECTION))
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}
    ckpt_s = B.best_of(lambda: torch.save(state, work / "ckpt.pt"), 2)
    epoch_s = len(split.train) / alone
    rows.append(B.row("train: writing last.pt (model, optimiser, EMA) vs one epoch's steps", f"{ckpt_s:.2f} s",
                      f"{epoch_s:.1f} s ({len(split.train)} rows)", ckpt_s / epoch_s, "report",
                      "once per epoch; on the real data an epoch is ~19k rows, so its share is ~100x smaller", section=SECTION))
    if not cuda:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_thread, _ = step_rate(cfg, tax, labels, batch, device, steps, warmup)
        finally:
            torch.set_num_threads(threads)
        rows.append(B.row(f"train: step alone with torch's {threads} threads vs 1 thread", s(alone), s(one_thread), alone / one_thread,
                          ">= 1.0", f"below 1 the cores are busy with other jobs (load average {B.load_average()}): every "
                          "parallel region waits for a descheduled thread, which slows all CPU rows here", section=SECTION))
        rows.append(B.row("train: train.compile gain", "not measured on CPU", "eager step", None, "report",
                          "CPU inductor compilation takes minutes per model, longer than the whole benchmark; measured on CUDA runs",
                          section=SECTION))
    else:
        compiled, warm = step_rate(cfg, tax, labels, batch, device, steps, warmup, compile_=True)
        rows.append(B.row("train: train.compile (torch.compile of the training forward) vs eager, step alone", s(compiled), s(alone),
                          compiled / alone, "report", f"first {warmup} steps incl. compilation took {warm:.0f}s", section=SECTION))
    return rows


if __name__ == "__main__":
    sys.exit(B.cli(run, __doc__))
