"""Benchmark of inference: 04's prediction path against a bare `model(x)` loop, and the cost of each TTA view.

    .venv/bin/python benchmarks/bench_infer.py [--quick]

04 predicts each fold model with lib.engine.inference.predict_folds_tta: build the net, load best.pt, a
DataLoader over the cached crops (lib.data.dataset.make_loader: decode, resize, normalise; its batches
kept for the other fold models), then
lib.engine.inference.predict (views on the device batch, channels_last, autocast, softmax). The bare
loop runs `model(x)` under the same autocast on the very tensors that loader produced,
preloaded. Target: 04's path at least 0.9 of the bare loop's images per second. TTA views
(hflip, rot90, rotate10, scale0.9) are timed through predict on preloaded batches, each
against identity (~1.0 means the view costs no more than the forward pass it adds).

CPU: the demo's model (tf_efficientnet_lite0 at 64 px, eval batch 128, workers 0) on 384 crops
(--quick 64), best of 4 interleaved passes (--quick 2). CUDA: configs/fathomnet2025.yaml (convnext_tiny at 224 px, [1, 3] context, eval
batch 256, min(8, cores) workers) on 788 ROIs, the real test size.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

SECTION = "Inference (02/04): the prediction path against a bare model(x) loop"
VIEWS = ["hflip", "rot90", "rotate10", "scale0.9"]
K_FOLDS = 5  # the real recipe's fold count


def setup(work: Path, cuda: bool, quick: bool):
    import os

    from lib.config import load_config
    from lib.data.artifacts import load_prepared

    B.prepared_demo(work, "bench_demo", 4, 2, ["prepare.n_folds=2", "prepare.workers=1"])
    root = work / "bench_demo"
    common = [f"data.root={root / 'data'}", f"output_root={root / 'out'}", "exp=bench_demo"]
    if cuda:
        cfg = load_config(str(B.ROOT / "configs/fathomnet2025.yaml"),
                          common + ["model.pretrained=none", f"train.num_workers={min(8, os.cpu_count() or 1)}"])
        n = 788
    else:
        cfg = load_config(str(B.ROOT / "configs/demo.yaml"), common)
        n = 64 if quick else 384  # a pass of ~1 s: shorter ones were within the timer's noise
    prep = load_prepared(cfg)  # the folder prepared_demo filled: same output_root and exp
    rois, tax = prep.rois, prep.taxonomy
    rois = rois[rois["ok"] == 1].reset_index(drop=True)
    return cfg, rois.iloc[[i % len(rois) for i in range(n)]].reset_index(drop=True), tax


def run(quick: bool = False, work: Path | None = None) -> list[dict]:
    import torch

    from lib.data.context import model_inputs
    from lib.data.dataset import make_loader
    from lib.engine.inference import parse_views, predict, predict_folds_tta
    from lib.model.device import autocast, channels_last, pick_device
    from lib.model.net import build_net, mean_std

    work = Path(work or tempfile.mkdtemp(prefix="bench_infer_"))
    device = pick_device("auto")
    cuda = device.type == "cuda"
    cfg, rows_df, tax = setup(work, cuda, quick)
    inputs = model_inputs(rows_df, cfg.model.context)
    n = len(inputs)
    model = build_net(cfg, tax, pretrained=False).to(device).to(memory_format=torch.channels_last).eval()
    fold = work / "infer_fold_0"
    fold.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 1, "val_distance": 0.0}, fold / "best.pt")
    folds = [fold]
    for k in range(1, K_FOLDS):  # 04 predicts every fold model of a phase: the same checkpoint K times
        (work / f"infer_fold_{k}").mkdir(exist_ok=True)
        (work / f"infer_fold_{k}" / "best.pt").write_bytes((fold / "best.pt").read_bytes())
        folds.append(work / f"infer_fold_{k}")
    mean, std = mean_std(model)
    t = cfg.train
    loader = make_loader(inputs, img_size=cfg.model.img_size, mean=mean, std=std, batch_size=t.eval_batch_size,
                         num_workers=t.num_workers, device=device)
    batches = [(channels_last(x.to(device)), y, w) for x, y, w in loader]  # the same tensors, preloaded

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def bare():
        for x, _, _ in batches:
            with autocast(device):
                model(x)
        sync()

    def path_loader():
        predict(model, loader, device, mode=cfg.tta.mode, features=False)
        sync()

    workers = max(1, t.num_workers)
    loader_w = make_loader(inputs, img_size=cfg.model.img_size, mean=mean, std=std, batch_size=t.eval_batch_size,
                           num_workers=workers, device=device)

    def path_workers():
        predict(model, loader_w, device, mode=cfg.tta.mode, features=False)
        sync()

    def path_04():
        predict_folds_tta([fold], inputs, cfg, tax, device, features=False)
        sync()

    def path_04_folds():
        predict_folds_tta(folds, inputs, cfg, tax, device, features=False)
        sync()

    def preloaded(view: str):
        def f():
            predict(model, batches, device, views=[view], mode=cfg.tta.mode, features=False)
            sync()
        return f

    parse_views(VIEWS)  # fail early on a bad name
    bare()  # warm-up (allocator, cudnn autotuning)
    repeats = 2 if quick else 4
    extra = {"workers": path_workers} if t.num_workers == 0 else {}  # the configured loader already has workers
    times = B.interleaved({"bare": bare, "loader": path_loader, **extra, "04": path_04, "04_folds": path_04_folds,
                           **{v: preloaded(v) for v in ["identity", *VIEWS]}}, repeats)
    rate = {k: n / v for k, v in times.items()}
    what = f"{cfg.model.backbone} @{cfg.model.img_size}px, {n} ROIs, batch {t.eval_batch_size}, {t.num_workers} workers"
    s = lambda v: f"{v:.0f} img/s"
    out = [
        B.row(f"infer: predict [identity] over the crop loader vs bare model(x) on the same tensors ({what})",
              s(rate["loader"]), s(rate["bare"]), rate["loader"] / rate["bare"], ">= 0.9",
              "the loader decodes and resizes each crop in the main process (0 workers) or in workers; its share is what is lost",
              section=SECTION),
        B.row("infer: 04's whole per-model path (build net, load best.pt, loader, predict) vs bare model(x)",
              s(rate["04"]), s(rate["bare"]), rate["04"] / rate["bare"], "report",
              "adds the model build and checkpoint load, once per fold model", section=SECTION),
        B.row(f"infer: 04's whole path over {K_FOLDS} fold models (crops decoded once for all) vs {K_FOLDS} x bare model(x)",
              s(rate["04_folds"] * K_FOLDS), s(rate["bare"]), rate["04_folds"] * K_FOLDS / rate["bare"], "report",
              f"lib.engine.inference.predict_folds_tta decodes the crops once and keeps the batches for the other {K_FOLDS - 1} models "
              f"(one model alone: {rate['04'] / rate['bare']:.2f}); what remains is each model's build and checkpoint load",
              section=SECTION),
        B.row("infer: predict [identity] on preloaded batches vs bare model(x)", s(rate["identity"]), s(rate["bare"]),
              rate["identity"] / rate["bare"], ">= 0.9", "the wrapper alone: channels_last copy, softmax, moving results to the CPU",
              section=SECTION),
    ]
    if extra:
        out.insert(1, B.row(f"infer: the same with {workers} loader worker(s) (train.num_workers={workers}) vs bare model(x)",
                            s(rate["workers"]), s(rate["bare"]), rate["workers"] / rate["bare"], ">= 0.9",
                            "decoding overlaps the forward passes; eval transforms are deterministic, so the probabilities are "
                            "the same; worker start-up (a fork per loader) included", section=SECTION))
    for v in VIEWS:
        out.append(B.row(f"infer: TTA view {v}, time vs identity (predict on preloaded batches)", s(rate[v]), s(rate["identity"]),
                         times[v] / times["identity"], "<= 1.2",
                         "each listed view adds one forward pass; this is its cost on top of one identity pass"
                         + (" (affine grid_sample)" if v.startswith(("rotate", "scale")) else ""), section=SECTION))
    return out


if __name__ == "__main__":
    sys.exit(B.cli(run, __doc__))
