"""Benchmark on a CUDA GPU: the recipe's real training step and inference against timm's benchmark loop, per precision.

    .venv/bin/python benchmarks/bench_gpu.py [--quick]

The recipe is configs/fathomnet2025.yaml (convnext_tiny at 224 px, the per_rank head, context
views [1, 3] fused by attention, batch 64, eval batch 256, gradient clipping, EMA), measured
under each precision the GPU supports: bf16 where it has native bf16 (compute capability 8.0
and up), and fp16 with a GradScaler always (what `train.precision: auto` picks on a T4 or P100).
- train: the trainer's step on a preloaded batch (lib.model.device.autocast at that precision,
  the head's loss, GradScaler under fp16, lib.model.optim.optimizer_step with the recipe's
  clipping, the EMA update), against the loop of timm's benchmark.py TrainBenchmarkRunner
  (timm.create_model, randn input, SGD at lr 1e-4, CrossEntropyLoss, autocast at the same dtype,
  zero_grad / forward / backward / step). Each ROI passes its V context views through the
  backbone, so timm's loop runs batch x V images: the ratio is then ours per backbone image
  over timm's, and ~1.0 means the fusion, heads, loss, scaler, clipping and EMA cost nothing.
- inference: lib.engine.inference.predict with [identity] on preloaded batches against timm's
  InferenceBenchmarkRunner loop (eval, no_grad, model(x)) at the same dtype and batch x V images.
timm's benchmark.py lives in its repository, not in the wheel (`import timm.benchmark` fails),
so its two loops are reproduced here: 10 warm-up steps, 40 timed (--quick 5 and 15), cuda synchronize.
Without CUDA it reports that and measures nothing (`compare` also runs on the CPU as a smoke test).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

SECTION = "GPU: the recipe's step and inference against timm's benchmark loop"
RECIPE = "configs/fathomnet2025.yaml"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def precisions(device) -> list[str]:
    """bf16 where the GPU has it natively, fp16 (with a GradScaler) always; fp32 on the CPU (a smoke run)."""
    from lib.model.device import precision_policy

    if device.type != "cuda":
        return ["fp32"]
    return (["bf16"] if precision_policy(device, "auto")[0] == "bf16" else []) + ["fp16"]


def recipe(overrides: Sequence[str] = ()) -> Any:
    """The recipe's config without hub weights (random weights time the same)."""
    from lib.config import load_config

    return load_config(str(B.ROOT / RECIPE), ["model.pretrained=none", *overrides])


def timm_train(name: str, device, batch: int, img: int, precision: str, warmup: int, steps: int) -> float:
    """timm benchmark.py's train loop at `precision`: images per second."""
    import timm
    import torch
    from timm.optim import create_optimizer_v2

    from lib.model.device import autocast

    model = timm.create_model(name, num_classes=79).to(device).to(memory_format=torch.channels_last).train()
    opt = create_optimizer_v2(model, opt="sgd", lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss().to(device)
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad()
        with autocast(device, precision):
            out = model(x)
            target = torch.empty(batch, device=device, dtype=torch.long).random_(79)
            loss_fn(out, target).backward()
        opt.step()

    return batch / _timed(step, device, warmup, steps)


def timm_infer(name: str, device, batch: int, img: int, precision: str, warmup: int, steps: int) -> float:
    """timm benchmark.py's inference loop at `precision`: images per second."""
    import timm
    import torch

    from lib.model.device import autocast

    model = timm.create_model(name, num_classes=79).to(device).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.no_grad(), autocast(device, precision):
            model(x)

    return batch / _timed(step, device, warmup, steps)


def ours_train(cfg, tax, device, precision: str, warmup: int, steps: int) -> float:
    """The trainer's step on one preloaded batch of the recipe (V context views per ROI): ROIs per second."""
    import numpy as np
    import torch

    from lib.model.device import autocast, channels_last, grad_scaler
    from lib.model.losses import build_loss
    from lib.model.net import build_net, set_grad_checkpointing
    from lib.model.optim import Ema, build_optimizer, optimizer_step

    t, m = cfg.train, cfg.model
    model = build_net(cfg, tax).to(device).to(memory_format=torch.channels_last).train()
    if t.grad_checkpointing:
        set_grad_checkpointing(model, cfg.model.backbone)
    criterion = build_loss(cfg.loss, np.ones(tax.n_classes), tax.distance_matrix(), tax.lca_distance_matrix()).to(device)
    optimizer = build_optimizer(model, t, cfg.model.backbone)
    ema = Ema(model, t.ema_decay) if t.ema_decay > 0 else None
    scaler = grad_scaler(device, precision)
    views = len(m.context)
    shape = (t.batch_size, views, 3, m.img_size, m.img_size) if views > 1 else (t.batch_size, 3, m.img_size, m.img_size)
    x = channels_last(torch.randn(*shape, device=device))
    y, w = torch.randint(0, tax.n_classes, (t.batch_size,), device=device), torch.ones(t.batch_size, device=device)

    def step():
        with autocast(device, precision):
            out = model(x, full=True)
        loss = model.head_module.loss(out, y, w, criterion)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        optimizer_step(optimizer, model.parameters(), t.clip_grad, scaler)
        if ema is not None:
            ema.update(model)

    return t.batch_size / _timed(step, device, warmup, steps)


def ours_infer(cfg, tax, device, precision: str, warmup: int, steps: int) -> float:
    """lib.engine.inference.predict with [identity] on preloaded batches of the recipe's Net: ROIs per second."""
    import torch

    from lib.engine.inference import predict
    from lib.model.net import build_net

    t, m = cfg.train, cfg.model
    model = build_net(cfg, tax, pretrained=False).to(device).to(memory_format=torch.channels_last).eval()
    views = len(m.context)
    shape = (t.eval_batch_size, views, 3, m.img_size, m.img_size) if views > 1 else (t.eval_batch_size, 3, m.img_size, m.img_size)
    x, dummy = torch.randn(*shape, device=device), torch.zeros(t.eval_batch_size)
    predict(model, [(x, dummy, dummy)] * warmup, device, features=False, precision=precision)
    _sync(device)
    t0 = time.perf_counter()
    predict(model, [(x, dummy, dummy)] * steps, device, features=False, precision=precision)
    _sync(device)
    return steps * t.eval_batch_size / (time.perf_counter() - t0)


def compare(device, quick: bool, overrides: Sequence[str] = (), precision_list: list[str] | None = None,
            timing: tuple[int, int] | None = None) -> list[dict]:
    """Rows for each precision: the recipe's train step and inference against timm's loops on as many backbone images
    (`timing`: warm-up and timed steps, instead of the defaults)."""
    import gc

    import torch

    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.metric import DEFAULT_TAXONOMY

    tax, cfg = load_taxonomy_csv(DEFAULT_TAXONOMY), recipe(list(overrides))
    t, m = cfg.train, cfg.model
    warmup, steps = timing or ((5, 15) if quick else (10, 40))
    views = len(m.context)
    what = (f"{m.backbone} @{m.img_size}px, head {cfg.head.name}, context {list(m.context)} ({m.fusion}), "
            f"clip {t.clip_grad}, EMA {t.ema_decay}")
    rows = []
    for precision in precision_list or precisions(device):
        ours_t = ours_train(cfg, tax, device, precision, warmup, steps)
        ref_t = timm_train(m.backbone, device, t.batch_size * views, m.img_size, precision, warmup, steps)
        ours_i = ours_infer(cfg, tax, device, precision, warmup, steps)
        ref_i = timm_infer(m.backbone, device, t.eval_batch_size * views, m.img_size, precision, warmup, steps)
        scaler = " + GradScaler" if precision == "fp16" else ""
        rows.append(B.row(f"GPU train step, {precision}{scaler}: {what}, batch {t.batch_size}: ours vs timm benchmark loop",
                          f"{ours_t:.0f} ROI/s ({ours_t * views:.0f} img/s)", f"{ref_t:.0f} img/s", ours_t * views / ref_t, "report",
                          f"timm's loop: SGD + CrossEntropy on batch {t.batch_size * views} (the same backbone images); ours adds "
                          "fusion, the per-rank heads and loss, AdamW groups, clipping, EMA" + (", loss scaling" if scaler else ""),
                          section=SECTION))
        rows.append(B.row(f"GPU inference, {precision}: {what}, batch {t.eval_batch_size}: predict vs timm benchmark loop",
                          f"{ours_i:.0f} ROI/s ({ours_i * views:.0f} img/s)", f"{ref_i:.0f} img/s", ours_i * views / ref_i, ">= 0.9",
                          "same batches preloaded on the device; ours adds channels_last, fusion, softmax and the copy to the CPU",
                          section=SECTION))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(quick: bool = False, work: Path | None = None) -> list[dict]:
    import torch

    from lib.model.device import cuda_problem, describe_device

    problem = cuda_problem()
    if problem:
        return [B.row("GPU: the recipe's train step and inference (convnext_tiny @224 px, context [1, 3]) vs timm's benchmark loop",
                      "no CUDA device in this run", "—", None, "report",
                      f"{problem}; run `make bench` on a CUDA machine for these rows (and the CUDA variants of the train and "
                      "infer rows)", section=SECTION)]
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True  # as the trainer sets it (lib.model.device.prepare_device)
    print(f"bench_gpu: {describe_device(device, 'auto')}", file=sys.stderr)
    return compare(device, quick)


if __name__ == "__main__":
    work = Path(tempfile.gettempdir())
    sys.exit(B.cli(run, __doc__))
