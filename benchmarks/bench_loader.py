"""Benchmark of the training loader: samples per second through the full train augmentation, per worker count.

    .venv/bin/python benchmarks/bench_loader.py [--quick]

Crops of 1920x1080 demo frames cached at 00's size for the real recipe (256 px), read by
lib.data.dataset.CropDataset through the `augment` section of configs/fathomnet2025.yaml at its
`model.img_size` (224), batches of 32 from a torch DataLoader with 0 (main process), 1 and 2
workers; against the eval transform (resize + normalise only), and against cutting each crop
from its frame at load time (decode the 1920x1080 PNG per sample), which is what caching saves.
Each DataLoader is built afresh per pass, as lib.engine.train does per epoch, so worker start-up counts.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BATCH = 32


class FrameCrops:
    """The same ROI crops as 00 writes, cut from the frame at load time (decode the frame per sample)."""

    def __init__(self, items: list[tuple[str, tuple]], size: int, transform):
        self.items, self.size, self.transform = items, size, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import cv2

        from lib.data.crops import crop_roi

        frame, bbox = self.items[i]
        bgr = cv2.imread(frame, cv2.IMREAD_COLOR)
        crop = None if bgr is None else crop_roi(bgr, bbox, 0.1, True, self.size)
        if crop is None:
            raise ValueError(f"no ROI crop from {frame}: the frame cannot be read or the box lies outside it")
        img = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
        return self.transform(image=img)["image"], 0, 1.0


def passes(ds, workers: int, repeats: int) -> float:
    """Best samples/s over `repeats` passes of a fresh DataLoader (worker start-up included, as per epoch in lib.engine.train)."""
    from torch.utils.data import DataLoader

    def one():
        for _ in DataLoader(ds, batch_size=BATCH, shuffle=False, num_workers=workers):
            pass

    return len(ds) / B.best_of(one, repeats)


def run(quick: bool = False, work: Path | None = None) -> list[dict]:
    import cv2
    from bench_prepare import hd_frames, with_outputs

    from lib.config import load_config
    from lib.data.augment import build_transforms
    from lib.data.crops import CropSpec, crop_frames
    from lib.data.dataset import CropDataset

    cv2.setNumThreads(1)  # as in DataLoader workers; the main process would otherwise spread cv2 over the cores torch uses
    work = Path(work or tempfile.mkdtemp(prefix="bench_loader_"))
    jobs = hd_frames(work, 8 if quick else 12)
    cache = work / "loader_crops"
    spec = CropSpec(size=256)
    jobs_out = with_outputs(jobs, cache, ["roi"])
    if not cache.is_dir():
        crop_frames(jobs_out, spec, 1, desc="cache crops")
    paths = [str(b.outputs["roi"]) for j in jobs_out for b in j.boxes]
    items = [(str(j.frame), b.bbox) for j in jobs for b in j.boxes]
    cfg = load_config(str(B.ROOT / "configs/fathomnet2025.yaml"))
    img = cfg.model.img_size
    train_tf = build_transforms(img, train=True, mean=IMAGENET[0], std=IMAGENET[1], aug=cfg.augment)
    eval_tf = build_transforms(img, train=False, mean=IMAGENET[0], std=IMAGENET[1])
    n, n_frames, repeats = (96, 24, 1) if quick else (128, 32, 2)
    cycle = lambda xs, k: [xs[i % len(xs)] for i in range(k)]
    cached = CropDataset(cycle(paths, n), [0] * n, transform=train_tf)
    plain = CropDataset(cycle(paths, n), [0] * n, transform=eval_tf)
    from_frames = FrameCrops(cycle(items, n_frames), 256, train_tf)

    rate = {w: passes(cached, w, repeats) for w in (0, 1, 2)}
    rate_eval = passes(plain, 0, repeats)
    rate_frames = passes(from_frames, 0, 1)
    ops = [type(t).__name__ for t in train_tf.transforms]
    sec = "Loader: samples per second through the train augmentation"
    load = f"{B.cpus_available()} cores, load average {B.load_average()}"
    s = lambda v: f"{v:.0f} samples/s"
    return [
        B.row(f"loader, cached 256 px crops -> train aug @{img} (configs/fathomnet2025.yaml), 0 workers, vs eval transform",
              s(rate[0]), s(rate_eval) + " (resize + normalise)", rate[0] / rate_eval, "report",
              "what the augmentation costs per sample: " + ", ".join(ops), section=sec),
        B.row("loader, 1 worker vs 0 (main process)", s(rate[1]), s(rate[0]), rate[1] / rate[0], ">= 0.9",
              f"{rate[1]:.0f} samples/s is the per-worker rate; a worker hands each batch over through shared memory, "
              "which 0 workers do not pay (see below)",
              section=sec),
        B.row("loader, 2 workers vs 1", s(rate[2]), s(rate[1]), rate[2] / rate[1], ">= 1.7",
              f"scales with free cores ({load}); the real recipe asks 8 workers (train.num_workers)", section=sec),
        B.row("loader, cached crops vs cutting each crop from its 1920x1080 frame (0 workers)", s(rate[0]), s(rate_frames),
              rate[0] / rate_frames, ">= 2.0", "why 00 caches crops: a frame PNG decode per sample dominates", section=sec),
    ]


if __name__ == "__main__":
    sys.exit(B.cli(run, __doc__))
