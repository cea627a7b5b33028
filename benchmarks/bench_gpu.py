"""Benchmark on a CUDA GPU: each recipe's real training step and inference against timm's benchmark loop, per precision.

    .venv/bin/python benchmarks/bench_gpu.py [--quick] [--recipe base matanet twostream]

The recipes (`--recipe`, default all three):
- base: configs/fathomnet2025.yaml (convnext_tiny at 224 px, the per_rank head, context views
  [1, 3] fused by attention, batch 64, eval batch 256, gradient clipping, EMA);
- matanet: configs/fathomnet2025_matanet.yaml (DINOv2-L at 252, views [1, 3, 5, full] through it,
  cross_attention, per_rank, gradient checkpointing, micro-batch 4 x accumulate 4);
- twostream: configs/fathomnet2025_twostream.yaml (EfficientNetV2-M at 224 on the ROI, a view
  backbone EfficientNetV2-S at 384 on the full frame, entropy_gate, batch 32 x accumulate 2),
each measured under each precision the GPU supports: bf16 where it has native bf16 (compute
capability 8.0 and up), and fp16 with a GradScaler always (what `train.precision: auto` picks on a T4 or P100).
- train: the trainer's optimiser step on preloaded micro-batches: `train.accumulate` micro-batches of
  `train.batch_size` ROIs (lib.model.device.autocast at that precision, the head's and the fusion's
  loss, GradScaler under fp16) and then lib.model.optim.optimizer_step with the recipe's clipping and
  the EMA update, with the recipe's checkpointing; against the loop of timm's benchmark.py
  TrainBenchmarkRunner over the bare main backbone (timm.create_model, randn input, SGD at lr 1e-4,
  CrossEntropyLoss, autocast at the same dtype, zero_grad / forward / backward / step; checkpointed
  when the recipe is) on the images that backbone reads: micro-batch x its views. The ratio is ours
  in ROI/s over timm's ROI/s (its img/s / the main backbone's views): ~1.0 means the fusion, heads,
  loss, scaler, clipping and EMA cost nothing; a view backbone (twostream) costs what it reads.
- inference: lib.engine.inference.predict with [identity] on preloaded batches against timm's
  InferenceBenchmarkRunner loop (eval, no_grad, model(x)) at the same dtype, on the same images.
Beside each train row: lib.doctor.memory's estimate of the recipe's memory (parameters, peak at the
micro-batch; without the CUDA context and fragmentation allowance, as torch.cuda.max_memory_allocated
counts) and, on a GPU of its table, the FLOPs-based step time; on CUDA the measured peak
(max_memory_allocated) beside it, so the first GPU run compares estimate and measurement.
timm's benchmark.py lives in its repository, not in the wheel (`import timm.benchmark` fails),
so its two loops are reproduced here: 10 warm-up steps, 40 timed (--quick 5 and 15), cuda synchronize.
Without CUDA it reports that and measures nothing (`compare` also runs on the CPU as a smoke test on tiny shapes).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

SECTION = "GPU: the recipe's step and inference against timm's benchmark loop"
RECIPES = {"base": "configs/fathomnet2025.yaml", "matanet": "configs/fathomnet2025_matanet.yaml",
           "twostream": "configs/fathomnet2025_twostream.yaml"}
RECIPE = RECIPES["base"]
# Tiny shapes for the CPU smoke run of `compare` (tests/test_bench_results.py): the code a GPU run executes, small models at 32 px
SMOKE = {
    "base": ["model.backbone=tf_efficientnet_lite0", "model.img_size=32", "train.batch_size=4", "train.eval_batch_size=4"],
    "matanet": ["model.backbone=test_vit", "model.img_size=32", "model.fusion_blocks=1", "train.batch_size=2", "train.accumulate=2",
                "train.eval_batch_size=4"],
    "twostream": ["model.backbone=test_efficientnet", "model.img_size=32", "train.batch_size=4", "train.eval_batch_size=4",
                  'model.view_backbones=[{"views": ["full"], "backbone": "test_efficientnet", "img_size": 48}]'],
}
GiB = 2**30


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


def recipe(overrides: Sequence[str] = (), path: str = RECIPE) -> Any:
    """The recipe's config without hub weights, its view backbones' too (random weights time the same)."""
    from lib.config import load_config

    cfg = load_config(str(B.ROOT / path), ["model.pretrained=none", *overrides])
    plain = [replace(v, pretrained="none") for v in cfg.model.view_backbones]
    return replace(cfg, model=replace(cfg.model, view_backbones=plain))


def main_views(cfg) -> int:
    """How many views of each ROI the main backbone reads (the rest go through view backbones)."""
    from lib.model.streams import stream_specs

    return len(stream_specs(cfg.model)[0].views)


def timm_train(name: str, device, batch: int, img: int, precision: str, warmup: int, steps: int, checkpointing: bool = False) -> float:
    """timm benchmark.py's train loop at `precision` (with timm's gradient checkpointing when asked): images per second."""
    import timm
    import torch
    from timm.optim import create_optimizer_v2

    from lib.model.device import autocast
    from lib.model.net import set_grad_checkpointing, sized

    model = timm.create_model(name, num_classes=79, **sized(name, img)).to(device).to(memory_format=torch.channels_last).train()
    if checkpointing:
        set_grad_checkpointing(model, name)
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
    from lib.model.net import sized

    model = timm.create_model(name, num_classes=79, **sized(name, img)).to(device).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.no_grad(), autocast(device, precision):
            model(x)

    return batch / _timed(step, device, warmup, steps)


def _input(cfg, rows: int, device) -> Any:
    """Random views shaped as the recipe's loader gives them: (rows, V, 3, S, S), S the largest size any backbone reads."""
    import torch

    views, size = len(cfg.model.context), cfg.model.input_size
    return torch.randn(*((rows, views, 3, size, size) if views > 1 else (rows, 3, size, size)), device=device)


def ours_train(cfg, tax, device, precision: str, warmup: int, steps: int) -> float:
    """The trainer's optimiser step on preloaded micro-batches of the recipe (V views per ROI): `train.accumulate`
    micro-batches of `train.batch_size` forward and backward, then clip, step and EMA. ROIs per second."""
    import numpy as np
    import torch

    from lib.model.device import autocast, channels_last, grad_scaler
    from lib.model.losses import build_loss
    from lib.model.net import build_net, set_grad_checkpointing
    from lib.model.optim import Ema, build_optimizer, optimizer_step

    t = cfg.train
    model = build_net(cfg, tax).to(device).to(memory_format=torch.channels_last).train()
    if t.grad_checkpointing:
        set_grad_checkpointing(model, cfg.model.backbone)
    criterion = build_loss(cfg.loss, np.ones(tax.n_classes), tax.distance_matrix(), tax.lca_distance_matrix()).to(device)
    optimizer = build_optimizer(model, t, cfg.model.backbone)
    ema = Ema(model, t.ema_decay) if t.ema_decay > 0 else None
    scaler = grad_scaler(device, precision)
    x = channels_last(_input(cfg, t.batch_size, device))
    y, w = torch.randint(0, tax.n_classes, (t.batch_size,), device=device), torch.ones(t.batch_size, device=device)

    def step():
        for _ in range(t.accumulate):
            with autocast(device, precision):
                out = model(x, full=True)
            loss = model.loss(out, y, w, criterion) / t.accumulate
            (scaler.scale(loss) if scaler is not None else loss).backward()
        optimizer_step(optimizer, model.parameters(), t.clip_grad, scaler)
        if ema is not None:
            ema.update(model)

    return t.batch_size * t.accumulate / _timed(step, device, warmup, steps)


def ours_infer(cfg, tax, device, precision: str, warmup: int, steps: int) -> float:
    """lib.engine.inference.predict with [identity] on preloaded batches of the recipe's Net: ROIs per second."""
    import torch

    from lib.engine.inference import predict
    from lib.model.net import build_net

    t = cfg.train
    model = build_net(cfg, tax, pretrained=False).to(device).to(memory_format=torch.channels_last).eval()
    x, dummy = _input(cfg, t.eval_batch_size, device), torch.zeros(t.eval_batch_size)
    predict(model, [(x, dummy, dummy)] * warmup, device, features=False, precision=precision)
    _sync(device)
    t0 = time.perf_counter()
    predict(model, [(x, dummy, dummy)] * steps, device, features=False, precision=precision)
    _sync(device)
    return steps * t.eval_batch_size / (time.perf_counter() - t0)


def estimate_note(cfg, precision: str, device, measured_peak: float | None) -> str:
    """lib.doctor.memory's estimate of the recipe at `precision` beside what was measured (CUDA: the peak allocated)."""
    from lib.doctor import memory

    est = memory.estimate(replace(cfg, train=replace(cfg.train, precision=precision)))
    raw = est.peak_bytes() - memory.CUDA_CONTEXT  # as max_memory_allocated counts: no context ...
    raw /= 1 + memory.FRAGMENTATION  # ... and no fragmentation
    text = (f"estimate (lib.doctor.memory): {est.params / 1e6:.1f} M params, {raw / GiB:.2f} GiB allocated at micro-batch "
            f"{est.micro_batch} ({est.act_per_roi / GiB:.3f} GiB activations per ROI)")
    if measured_peak is not None:
        text += f"; measured peak {measured_peak / GiB:.2f} GiB (torch.cuda.max_memory_allocated)"
    gpu = memory.gpu_of(__import__("torch").cuda.get_device_name(device)) if device.type == "cuda" else None
    if gpu is not None:
        rois = cfg.train.batch_size / est.step_seconds(gpu, cfg.train.batch_size)
        text += f"; FLOPs-based estimate {rois:.0f} ROI/s on a {gpu.name} at {memory.UTILISATION} utilisation"
    return text


def compare(device, quick: bool, overrides: Sequence[str] = (), precision_list: list[str] | None = None,
            timing: tuple[int, int] | None = None, path: str = RECIPE) -> list[dict]:
    """Rows for each precision: the recipe's (`path`) train step and inference against timm's loops over its main backbone
    on as many images (`timing`: warm-up and timed steps, instead of the defaults)."""
    import gc

    import torch

    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.metric import DEFAULT_TAXONOMY

    tax, cfg = load_taxonomy_csv(DEFAULT_TAXONOMY), recipe(list(overrides), path)
    t, m = cfg.train, cfg.model
    warmup, steps = timing or ((5, 15) if quick else (10, 40))
    views, main = len(m.context), main_views(cfg)
    extra = "".join(f" + {vb.backbone} @{vb.img_size}px on {vb.views}" for vb in m.view_backbones)
    what = (f"{Path(path).name}: {m.backbone} @{m.img_size}px{extra}, head {cfg.head.name}, context {list(m.context)} ({m.fusion}), "
            f"clip {t.clip_grad}, EMA {t.ema_decay}" + (", checkpointing" if t.grad_checkpointing else ""))
    rows = []
    for precision in precision_list or precisions(device):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ours_t = ours_train(cfg, tax, device, precision, warmup, steps)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        gc.collect()
        ref_t = timm_train(m.backbone, device, t.batch_size * main, m.img_size, precision, warmup, steps, t.grad_checkpointing)
        ours_i = ours_infer(cfg, tax, device, precision, warmup, steps)
        ref_i = timm_infer(m.backbone, device, t.eval_batch_size * main, m.img_size, precision, warmup, steps)
        scaler = " + GradScaler" if precision == "fp16" else ""
        rows.append(B.row(f"GPU train step, {precision}{scaler}: {what}, micro-batch {t.batch_size} x accumulate {t.accumulate}: "
                          "ours vs timm benchmark loop on the main backbone",
                          f"{ours_t:.0f} ROI/s ({ours_t * views:.0f} img/s)", f"{ref_t / main:.0f} ROI/s ({ref_t:.0f} img/s)",
                          ours_t * main / ref_t, "report",
                          f"timm's loop: SGD + CrossEntropy on batch {t.batch_size * main} (the main backbone's images); ours adds "
                          "fusion, view backbones, the heads and loss, AdamW groups, clipping, EMA" + (", loss scaling" if scaler else "")
                          + "; " + estimate_note(cfg, precision, device, peak), section=SECTION))
        rows.append(B.row(f"GPU inference, {precision}: {what}, batch {t.eval_batch_size}: predict vs timm benchmark loop",
                          f"{ours_i:.0f} ROI/s ({ours_i * views:.0f} img/s)", f"{ref_i / main:.0f} ROI/s ({ref_i:.0f} img/s)",
                          ours_i * main / ref_i, ">= 0.9" if not m.view_backbones else "report",
                          "same batches preloaded on the device; ours adds channels_last, fusion, softmax and the copy to the CPU"
                          + (", and the view backbones" if m.view_backbones else ""), section=SECTION))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(quick: bool = False, work: Path | None = None, recipes: Sequence[str] = tuple(RECIPES)) -> list[dict]:
    import torch

    from lib.model.device import cuda_problem, describe_device

    problem = cuda_problem()
    if problem:
        return [B.row(f"GPU: the recipes' train step and inference ({', '.join(recipes)}) vs timm's benchmark loop",
                      "no CUDA device in this run", "—", None, "report",
                      f"{problem}; run `make bench` on a CUDA machine for these rows (and the CUDA variants of the train and "
                      "infer rows)", section=SECTION)]
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True  # as the trainer sets it (lib.model.device.prepare_device)
    print(f"bench_gpu: {describe_device(device, 'auto')}", file=sys.stderr)
    rows = []
    for name in recipes:
        try:
            rows += compare(device, quick, path=RECIPES[name])
        except torch.cuda.OutOfMemoryError as e:  # say it, and go on with the next recipe
            rows.append(B.row(f"GPU: recipe {name} ({RECIPES[name]})", "out of GPU memory", "—", None, "report",
                              f"{str(e).splitlines()[0]}; compare with make doctor CONFIG={RECIPES[name]}", section=SECTION))
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--recipe", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    known, rest = ap.parse_known_args()
    sys.exit(B.cli(functools.partial(run, recipes=known.recipe), __doc__, rest))
