"""Benchmark on a CUDA GPU: our training step and inference against timm's benchmark loop, per backbone.

    .venv/bin/python benchmarks/bench_gpu.py [--quick]

For tf_efficientnet_lite0, convnext_tiny and vit_base_patch16_224 at 224 px, bf16 autocast and
channels_last, in the same run:
- train, batch 64 (the recipe's): the pipeline's step (bench_train.step_rate: build_net with a
  linear head over the 79 concepts, AdamW parameter groups, the configured loss) against the
  loop of timm's benchmark.py TrainBenchmarkRunner (timm.create_model, randn input, SGD from
  timm.optim.create_optimizer_v2 at lr 1e-4, CrossEntropyLoss, zero_grad / forward / backward / step);
- inference, batch 256 (the recipe's eval batch): lib.engine.inference.predict with [identity] on
  preloaded batches against timm's InferenceBenchmarkRunner loop (eval, no_grad, model(x)).
timm's benchmark.py lives in its repository, not in the wheel (`import timm.benchmark` fails),
so its two loops are reproduced here: 10 warm-up steps, 40 timed (--quick 5 and 15), cuda synchronize.
Without CUDA it reports that and measures nothing.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402

SECTION = "GPU: our step and inference against timm's benchmark loop"
MODELS = ["tf_efficientnet_lite0", "convnext_tiny", "vit_base_patch16_224"]
TRAIN_BATCH, INFER_BATCH, IMG = 64, 256, 224


def _autocast(device):
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timm_infer(name: str, device, batch: int, img: int, warmup: int, steps: int) -> float:
    """timm benchmark.py's inference loop: images per second."""
    import timm
    import torch

    model = timm.create_model(name, num_classes=79).to(device).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(warmup):
            with _autocast(device):
                model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            with _autocast(device):
                model(x)
        _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def timm_train(name: str, device, batch: int, img: int, warmup: int, steps: int) -> float:
    """timm benchmark.py's train loop: images per second."""
    import timm
    import torch
    from timm.optim import create_optimizer_v2

    model = timm.create_model(name, num_classes=79).to(device).to(memory_format=torch.channels_last).train()
    opt = create_optimizer_v2(model, opt="sgd", lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss().to(device)
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad()
        with _autocast(device):
            out = model(x)
            target = torch.empty(batch, device=device, dtype=torch.long).random_(79)
            loss_fn(out, target).backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def ours_infer(cfg, tax, device, batch: int, img: int, warmup: int, steps: int) -> float:
    """lib.engine.inference.predict with [identity] on preloaded batches of the pipeline's Net."""
    import torch

    from lib.engine.inference import predict
    from lib.model.net import build_net

    model = build_net(cfg, tax, pretrained=False).to(device).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, img, img, device=device)
    dummy = torch.zeros(batch)
    predict(model, [(x, dummy, dummy)] * warmup, device, features=False)
    _sync(device)
    t0 = time.perf_counter()
    predict(model, [(x, dummy, dummy)] * steps, device, features=False)
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def compare(names, device, quick: bool, train_batch=TRAIN_BATCH, infer_batch=INFER_BATCH, img=IMG) -> list[dict]:
    import gc

    import numpy as np
    import torch
    from bench_train import step_rate

    from lib.config import load_config
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.metric import DEFAULT_TAXONOMY

    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    warmup, steps = (5, 15) if quick else (10, 40)
    labels = np.arange(tax.n_classes)
    rows = []
    for name in names:
        cfg = load_config(str(B.ROOT / "configs/demo.yaml"),
                          [f"model.backbone={name}", "model.pretrained=none", f"model.img_size={img}", "head.name=linear"])
        batch = (torch.randn(train_batch, 3, img, img), torch.randint(0, tax.n_classes, (train_batch,)), torch.ones(train_batch))
        ours_t, _ = step_rate(cfg, tax, labels, batch, device, steps, warmup)
        ref_t = timm_train(name, device, train_batch, img, warmup, steps)
        ours_i = ours_infer(cfg, tax, device, infer_batch, img, warmup, steps)
        ref_i = timm_infer(name, device, infer_batch, img, warmup, steps)
        prec = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32 (no CUDA: a smoke run of the code)"
        rows.append(B.row(f"GPU train step: {name} @{img}px, batch {train_batch}, {prec}: ours vs timm benchmark loop",
                          f"{ours_t:.0f} img/s", f"{ref_t:.0f} img/s", ours_t / ref_t, "report",
                          "ours: AdamW groups + our loss and head; timm's: SGD + CrossEntropy, so ~1.0 means no overhead of ours",
                          section=SECTION))
        rows.append(B.row(f"GPU inference: {name} @{img}px, batch {infer_batch}, {prec}: predict vs timm benchmark loop",
                          f"{ours_i:.0f} img/s", f"{ref_i:.0f} img/s", ours_i / ref_i, ">= 0.9",
                          "same batches preloaded on the device; ours adds channels_last, softmax and the copy to the CPU",
                          section=SECTION))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(quick: bool = False, work: Path | None = None) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return [B.row("GPU: train step and inference of " + ", ".join(MODELS) + " @224 px vs timm's benchmark loop",
                      "no CUDA device in this run", "—", None, "report",
                      "run `make bench` on a CUDA machine for these rows (and the CUDA variants of the train and infer rows)",
                      section=SECTION)]
    return compare(MODELS, torch.device("cuda"), quick)


if __name__ == "__main__":
    work = Path(tempfile.gettempdir())
    sys.exit(B.cli(run, __doc__))
