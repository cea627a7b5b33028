"""`make doctor ARGS=--time`: the config's real training and inference step measured here, scaled to each stage's wall time.

README's wall-time figures were once scaled from another card's benchmark; this measures the
machine at hand instead. For a few seconds each it runs the config's own Net (backbone, views,
head, frame attention; random weights, so nothing is downloaded) at the config's batch size and
precision: forward, loss, backward and optimiser step, then the eval forward of one batch (each
TTA view costs one such forward). The loader's cost is one worker's time to read and augment a
synthetic crop (all views), shared by `train.num_workers` workers. On the CPU, or where the
batch does not fit the GPU, a smaller batch is measured and scaled linearly, and the lines say
so. The stage times are then arithmetic over the data's size (the prepared rois.csv, a flag, or
the real competition's counts): folds x epochs x steps, against the 12 h of a Kaggle session.
They are upper bounds where early stopping (train.patience) ends folds sooner, and leave out 00
(cutting crops: disk and decode bound) and the fitting of 04's options (seconds to minutes).
"""
from __future__ import annotations

import csv
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lib.config import Config

# The real FathomNet 2025 sizes (../shared/fathomnet2025/README.md): train ROIs and test ROIs.
FATHOMNET_TRAIN, FATHOMNET_TEST = 23_699, 788
KAGGLE_HOURS = 12.0
CPU_BATCH = 8  # rows measured on the CPU (the config's batch would take minutes there); scaled linearly


@dataclass(frozen=True)
class Counts:
    """How many ROIs the stages will see, and where the numbers come from."""

    train: int
    test: int
    source: str


@dataclass
class StepTimes:
    """Seconds of one step at the config's batch sizes on `device` (scaled where a smaller batch was measured)."""

    device: str
    precision: str
    train_step: float  # forward + loss + backward + optimiser step of train.batch_size rows
    eval_batch: float  # one eval forward (one TTA view) of train.eval_batch_size rows
    load_item: float  # one loader worker: read and augment one training ROI (all its views)
    load_eval_item: float  # one loader worker: read and resize one eval ROI
    workers: int
    notes: list[str] = field(default_factory=list)

    def train_batch(self, rows: int) -> float:
        """One training step with its loading: the loader's workers run beside the step (in the main process without)."""
        load = rows * self.load_item
        return max(self.train_step, load / self.workers) if self.workers else self.train_step + load

    def eval_pass(self, rows: int, eval_rows: int, views: int) -> float:
        """Predicting `rows` ROIs with `views` TTA views, batches of `eval_rows`."""
        batches = math.ceil(rows / eval_rows)
        load = eval_rows * self.load_eval_item
        per = max(self.eval_batch * views, load / self.workers) if self.workers else self.eval_batch * views + load
        return batches * per


def data_counts(cfg: Config, train_rois: int | None = None, test_rois: int | None = None) -> Counts:
    """The train and test ROI counts: given, else 00's rois.csv of this experiment, else the real competition's."""
    if train_rois is not None:
        return Counts(train_rois, test_rois if test_rois is not None else FATHOMNET_TEST, "--train-rois")
    rois = cfg.out_dir / "00_prepare" / "rois.csv"
    if rois.is_file():
        with rois.open(newline="") as f:
            splits = [row.get("split", "") for row in csv.DictReader(f)]
        return Counts(splits.count("train"), splits.count("test"), str(rois))
    return Counts(FATHOMNET_TRAIN, FATHOMNET_TEST, "the real FathomNet 2025 counts: no rois.csv yet; --train-rois N sets them")


def _timed(fn: Callable[[], None], seconds: float, sync: Callable[[], None], max_reps: int = 50) -> float:
    """Mean seconds of `fn` after one warm-up call, repeated for about `seconds` (at least twice)."""
    fn()
    sync()
    start, reps = time.perf_counter(), 0
    while reps < 2 or (time.perf_counter() - start < seconds and reps < max_reps):
        fn()
        reps += 1
    sync()
    return (time.perf_counter() - start) / reps


def _device(cfg: Config) -> Any:
    """The device the stages would train on; the CPU (said by the doctor) where the config's GPU is not usable."""
    import torch

    from lib.model.device import cuda_problem

    if cfg.train.device != "cpu" and torch.cuda.is_available() and cuda_problem() is None:
        return torch.device("cuda:0")
    return torch.device("cpu")


def batch_shape(cfg: Config, rows: int) -> tuple[int, ...]:
    """The shape of a batch as the config's loader gives it: (rows, V, 3, S, S), or (rows, 3, S, S) for one view."""
    views, size = len(cfg.model.context), cfg.model.input_size
    return (rows, views, 3, size, size) if views > 1 else (rows, 3, size, size)


def _batch(cfg: Config, rows: int, device: Any) -> tuple[Any, Any, Any, Any]:
    """Random inputs shaped as the config's loader gives them: (x, labels, weights, frame ids or None)."""
    import torch

    x = torch.randn(batch_shape(cfg, rows), device=device)
    frames = torch.arange(rows, device=device) // 3 if cfg.model.frame_context == "attention" else None  # ~3 ROIs a frame
    return x, torch.zeros(rows, dtype=torch.long, device=device), torch.ones(rows, device=device), frames


def measure_steps(cfg: Config, taxonomy: Any, seconds: float = 3.0) -> tuple[float, float, str, str, list[str]]:
    """(seconds per training step, per eval batch, device, precision, notes) at the config's batch sizes."""
    import torch

    from lib.model.device import autocast, channels_last, grad_scaler, precision_policy
    from lib.model.losses import build_loss
    from lib.model.net import build_net, set_grad_checkpointing
    from lib.model.optim import Ema, build_optimizer, optimizer_step

    t, device, notes = cfg.train, _device(cfg), list[str]()
    precision = precision_policy(device, t.precision)[0]
    model = build_net(replace(cfg, model=replace(cfg.model, pretrained="none")), taxonomy, pretrained=False).to(device)
    model = model.to(memory_format=torch.channels_last)
    if t.grad_checkpointing:  # the step timed (and its memory) as training runs it
        set_grad_checkpointing(model, cfg.model.backbone)
    dist = taxonomy.distance_matrix()
    counts = np.full(taxonomy.n_classes, 100)
    criterion = build_loss(cfg.loss, counts, dist, taxonomy.lca_distance_matrix()).to(device)
    optimizer = build_optimizer(model, t, cfg.model.backbone)
    ema, scaler = (Ema(model, t.ema_decay) if t.ema_decay > 0 else None), grad_scaler(device, precision)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step(rows: int) -> Callable[[], None]:
        x, y, w, frames = _batch(cfg, rows, device)

        def step() -> None:
            model.train()
            with autocast(device, precision):
                out = model(channels_last(x), full=True, frames=frames)
            loss = model.head_module.loss(out, y, w, criterion)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            optimizer_step(optimizer, model.parameters(), t.clip_grad, scaler)
            if ema is not None:
                ema.update(model)
        return step

    def eval_step(rows: int) -> Callable[[], None]:
        x, _, _, frames = _batch(cfg, rows, device)

        def step() -> None:
            model.eval()
            with torch.no_grad(), autocast(device, precision):
                model.probs(channels_last(x), frames=frames)
        return step

    train_s = _fitting(train_step, t.batch_size, device, seconds, sync, notes, "training")
    eval_s = _fitting(eval_step, t.eval_batch_size, device, seconds, sync, notes, "eval")
    if t.compile:
        notes.append("train.compile is true but the step was measured uncompiled (compiling takes minutes; make bench measures it)")
    return train_s, eval_s, str(device), precision, notes


def _fitting(make: Callable[[int], Callable[[], None]], rows: int, device: Any, seconds: float, sync: Callable[[], None],
             notes: list[str], what: str) -> float:
    """Seconds of one step of `rows` rows: measured at `rows`, or at fewer (the CPU; a GPU out of memory) and scaled."""
    import torch

    tried = min(rows, CPU_BATCH) if device.type == "cpu" else rows
    while True:
        try:
            got = _timed(make(tried), seconds, sync)
            break
        except torch.cuda.OutOfMemoryError:
            if tried == 1:
                raise
            torch.cuda.empty_cache()
            tried = max(1, tried // 2)
    if tried != rows:
        why = "on the CPU" if device.type == "cpu" else "the full batch ran out of GPU memory"
        notes.append(f"{what} step measured at {tried} rows ({why}) and scaled linearly to {rows}")
    return got * rows / tried


def measure_loading(cfg: Config, seconds: float = 1.0) -> tuple[float, float]:
    """Seconds one loader worker spends on one training ROI (read + augment, all views) and one eval ROI (read + resize),
    on synthetic PNG crops of prepare.crop_size written to a temporary folder."""
    import cv2

    from lib.data.augment import build_transforms
    from lib.data.dataset import CropDataset
    from lib.data.resample import FrameResample

    views, side = len(cfg.model.context), cfg.prepare.crop_size
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(8):
            names = [str(Path(tmp) / f"{i}_{v}.png") for v in range(views)]
            for n in names:
                cv2.imwrite(n, rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
            paths.append(tuple(names) if views > 1 else names[0])
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        out = []
        for train in (True, False):
            tf = build_transforms(cfg.model.input_size, train=train, mean=mean, std=std, aug=cfg.augment, n_views=views)
            resample = None  # augment.frame_resample, native sizes unknown here (the crop's own factor: the same work)
            if train and cfg.augment.frame_resample > 0:
                lo, hi = cfg.augment.frame_resample_range
                resample = FrameResample(cfg.augment.frame_resample, lo, hi, np.full((len(paths), views, 2), np.nan))
            ds = CropDataset(paths, transform=tf, resample=resample)
            out.append(_timed(_reader(ds), seconds, lambda: None, max_reps=400))
    return out[0], out[1]


def _reader(ds: Any) -> Callable[[], None]:
    """Reads the dataset's items in turn, one per call."""
    i = iter(range(10**9))

    def read() -> None:
        ds[next(i) % len(ds)]
    return read


def measure(cfg: Config, taxonomy: Any, seconds: float = 3.0) -> StepTimes:
    """Every step time of the config on this machine (about 2 x `seconds` of GPU or CPU work, plus building the model)."""
    train_s, eval_s, device, precision, notes = measure_steps(cfg, taxonomy, seconds)
    load, load_eval = measure_loading(cfg, min(seconds, 1.0))
    workers = cfg.train.num_workers
    if workers == "auto":
        from lib.data.budget import auto_workers, host

        h = host()
        workers = auto_workers(max(1, h.cores // max(1, h.processes)), on_cpu=device == "cpu")
    return StepTimes(device, precision, train_s, eval_s, load, load_eval, int(workers), notes)


def _fold(cfg: Config, s: StepTimes, train_rows: int, val_rows: int, epochs: int) -> float:
    """One fold: `epochs` passes over `train_rows` plus validating `val_rows` each epoch (and their test-like view)."""
    t = cfg.train
    steps = max(1, math.ceil(train_rows / t.batch_size))
    val = s.eval_pass(val_rows, t.eval_batch_size, 1) * (2 if cfg.prepare.test_like else 1)
    return epochs * (steps * s.train_batch(t.batch_size) + val)


def stage_seconds(cfg: Config, s: StepTimes, n: Counts) -> dict[str, float]:
    """Expected seconds of 01, 02, 03, 04 and knn for this config, from the measured steps (upper bounds: no early stop)."""
    k = cfg.prepare.n_folds
    folds = len(cfg.train.folds) or k
    val = n.train / k
    views, ebs = len(cfg.tta.views), cfg.train.eval_batch_size
    epochs3 = cfg.retrain.epochs or cfg.train.epochs
    out = {"01_train": folds * _fold(cfg, s, n.train - round(val), round(val), cfg.train.epochs)}
    out["02_pseudo"] = len(cfg.pseudo.members) * folds * s.eval_pass(n.test, ebs, views)
    # 03 adds at most every test ROI as a pseudo-label, each round
    out["03_retrain"] = cfg.pseudo.rounds * folds * _fold(cfg, s, n.train - round(val) + n.test, round(val), epochs3)
    oof = n.train if cfg.submit.oof_tta else 0  # out-of-fold rows predicted again with the TTA views
    out["04_submit"] = len(cfg.submit.models) * (folds * s.eval_pass(n.test, ebs, views) + s.eval_pass(oof, ebs, views))
    embeds = folds if cfg.knn.source == "phase1" else 1
    out["knn"] = embeds * s.eval_pass(n.train + n.test, cfg.knn.batch_size, 1)
    return out


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def _loader_text(cfg: Config, s: StepTimes) -> str:
    bound = "the loader" if s.train_batch(cfg.train.batch_size) > s.train_step else "the model"
    return (f"{s.load_item * 1e3:.1f} ms per training ROI on one worker, {s.load_eval_item * 1e3:.1f} ms per eval ROI; with "
            f"{s.workers} worker(s) {bound} sets the pace of a training step")


def time_lines(cfg: Config, s: StepTimes, n: Counts) -> list[tuple[str, str]]:
    """The doctor's `--time` lines: what was measured, each stage, both phases against a Kaggle session's 12 h."""
    t = cfg.train
    lines = [("time device", f"{s.device}, {s.precision}; {cfg.model.backbone} at {cfg.model.img_size} px, "
                             f"{len(cfg.model.context)} view(s), random weights"),
             ("time train step", f"{s.train_step:.3f} s per step of {t.batch_size} rows (forward, backward, optimiser)"),
             ("time eval batch", f"{s.eval_batch:.3f} s per batch of {t.eval_batch_size} rows and view; "
                                 f"{len(cfg.tta.views)} TTA view(s)"),
             ("time loader", _loader_text(cfg, s)),
             ("time data", f"{n.train} train and {n.test} test ROIs ({n.source})")]
    lines += [("time note", note) for note in s.notes]
    stages = stage_seconds(cfg, s, n)
    for name, sec in stages.items():
        lines.append((f"time {name}", hours(sec)))
    phase1, phase2 = stages["01_train"] + stages["02_pseudo"], stages["03_retrain"] + stages["04_submit"] + stages["knn"]
    total = phase1 + phase2
    fits = "fits in" if total <= KAGGLE_HOURS * 3600 else "is OVER"
    lines.append(("time phases", f"phase 1 (01+02) {hours(phase1)}, phase 2 (03+04+knn) {hours(phase2)}: {hours(total)} in all, "
                                 f"{100 * total / (KAGGLE_HOURS * 3600):.0f}% of a {KAGGLE_HOURS:.0f} h Kaggle session ({fits}); "
                                 "00 not measured, epochs counted in full (early stopping ends sooner)"))
    return lines
