"""Benchmark of 00's cropping: the stage (each frame decoded once, a process pool) against the naive way.

    .venv/bin/python benchmarks/bench_prepare.py [--frames 40] [--size 1920x1080]

The naive way is what the competition's download.py does: decode the frame again for every box.
Prints crops per second and the ratios; targets: >= 2x naive with 1 worker on frames of 3+ boxes,
>= 1.7x from 1 to 2 workers. Ratios measured side by side in one run are what count.
`run(quick, work)` returns the same as result rows for benchmarks/run_all.py (12 frames; --quick 8).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2

from lib.config import DemoCfg
from lib.data.crops import BoxJob, CropSpec, FrameJob, crop_frames, crop_roi, write_png
from lib.demo.dataset import generate

ROOT = Path(__file__).resolve().parent.parent


def make_frames(out: Path, n_frames: int, width: int, height: int) -> list[FrameJob]:
    """Demo frames at full size with 3 to 6 boxes each (dealt at random: real frames are mostly of one box)."""
    per_class = max(1, round(n_frames * 4.5 / 79))
    cfg = DemoCfg(per_class=per_class, test_per_class=1, frame_width=width, frame_height=height,
                  frames="random", min_objects=3, max_objects=6)
    generate(out, cfg, ROOT / "configs/taxonomy/fathomnet2025.csv", seed=0)
    data = json.loads((out / "dataset_train.json").read_text())
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    jobs = []
    for image_id, anns in sorted(by_image.items())[:n_frames]:
        jobs.append(FrameJob(frame=out / "train/images" / f"{image_id}.png",
                             boxes=[BoxJob(bbox=tuple(a["bbox"]), outputs={}) for a in anns]))
    return jobs


def with_outputs(jobs: list[FrameJob], dst: Path, kinds: list[str]) -> list[FrameJob]:
    def name(k: str, frame: Path, i: int) -> str:
        return f"{frame.stem}.png" if k == "full" else f"{frame.stem}_{i}.png"  # as the stage: one full-frame crop per frame

    return [FrameJob(frame=j.frame, boxes=[BoxJob(bbox=b.bbox, outputs={k: dst / k / name(k, j.frame, i) for k in kinds})
                                          for i, b in enumerate(j.boxes)]) for j in jobs]


def naive(jobs: list[FrameJob], spec: CropSpec, dst: Path) -> None:
    """Decode the frame again for every box (download.py's way), ROI only."""
    for j in jobs:
        for i, b in enumerate(j.boxes):
            frame = cv2.imread(str(j.frame), cv2.IMREAD_COLOR)
            crop = None if frame is None else crop_roi(frame, b.bbox, spec.pad, spec.square, spec.size)
            if crop is None:
                raise ValueError(f"no ROI crop from {j.frame}: the frame cannot be read or the box lies outside it")
            write_png(dst / f"{j.frame.stem}_{i}.png", crop)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hd_frames(work: Path, n_frames: int, width: int = 1920, height: int = 1080) -> list[FrameJob]:
    """`make_frames` once per size in `work` (bench_loader reads the same frames)."""
    out = work / f"frames_{n_frames}_{width}x{height}"
    if not (out / "dataset_train.json").is_file():
        return make_frames(out, n_frames, width, height)
    data = json.loads((out / "dataset_train.json").read_text())
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    return [FrameJob(frame=out / "train/images" / f"{i}.png", boxes=[BoxJob(bbox=tuple(a["bbox"]), outputs={}) for a in anns])
            for i, anns in sorted(by_image.items())[:n_frames]]


def measure(jobs: list[FrameJob], crop_size: int, tmp: Path) -> list[tuple[str, float, int]]:
    """(what, seconds, boxes) of the naive way and the stage with 1 and 2 workers, ROI only and with context."""
    n_boxes = sum(len(j.boxes) for j in jobs)
    roi = CropSpec(size=crop_size)
    ctx = CropSpec(size=crop_size, context_scales=(3.0, 5.0), context_full=True)
    for j in jobs[:2]:  # warm the page cache so the first measurement is not penalised
        cv2.imread(str(j.frame))
    return [
        ("naive: decode per box, ROI", timed(lambda: naive(jobs, roi, tmp / "naive")), n_boxes),
        ("stage, 1 worker, ROI", timed(lambda: crop_frames(with_outputs(jobs, tmp / "s1", ["roi"]), roi, 1)), n_boxes),
        ("stage, 2 workers, ROI", timed(lambda: crop_frames(with_outputs(jobs, tmp / "s2", ["roi"]), roi, 2)), n_boxes),
        ("stage, 1 worker, ROI+3x+5x+full", timed(lambda: crop_frames(with_outputs(jobs, tmp / "c1", ctx.kinds()), ctx, 1)), n_boxes),
        ("stage, 2 workers, ROI+3x+5x+full", timed(lambda: crop_frames(with_outputs(jobs, tmp / "c2", ctx.kinds()), ctx, 2)), n_boxes),
    ]


def run(quick: bool = False, work: Path | None = None) -> list[dict]:
    """Result rows for benchmarks/run_all.py: 12 frames of 1920x1080 (--quick 8), crop size 256."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchlib as B

    work = Path(work or tempfile.mkdtemp(prefix="bench_prepare_"))
    jobs = hd_frames(work, 8 if quick else 12)
    n_boxes = sum(len(j.boxes) for j in jobs)
    tmp = Path(tempfile.mkdtemp(prefix="crops_", dir=work))
    try:
        rate = {name: n / sec for name, sec, n in measure(jobs, 256, tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = f"{len(jobs)} frames 1920x1080, {n_boxes} boxes"
    load = f"{B.cpus_available()} cores, load average {B.load_average()}"
    sec = "Prepare (00): crops per second"
    r = lambda k: f"{rate[k]:.1f} crops/s"
    return [
        B.row(f"00 cropping, 1 worker vs naive decode per box (ROI, {size})", r("stage, 1 worker, ROI"), r("naive: decode per box, ROI"),
              rate["stage, 1 worker, ROI"] / rate["naive: decode per box, ROI"], ">= 2.0",
              "each frame decoded once for all its boxes", section=sec),
        B.row("00 cropping, 2 workers vs 1 (ROI)", r("stage, 2 workers, ROI"), r("stage, 1 worker, ROI"),
              rate["stage, 2 workers, ROI"] / rate["stage, 1 worker, ROI"], ">= 1.7",
              f"PNG decoding per frame is CPU-bound: the gain needs a free core ({load})", section=sec),
        B.row("00 cropping, 2 workers vs 1 (ROI + 3x + 5x + full)", r("stage, 2 workers, ROI+3x+5x+full"), r("stage, 1 worker, ROI+3x+5x+full"),
              rate["stage, 2 workers, ROI+3x+5x+full"] / rate["stage, 1 worker, ROI+3x+5x+full"], ">= 1.7",
              f"as above; four crops (and PNG encodes) per box ({load})", section=sec),
        B.row("00 cropping, ROI + 3x + 5x + full vs ROI only (1 worker)", r("stage, 1 worker, ROI+3x+5x+full"), r("stage, 1 worker, ROI"),
              rate["stage, 1 worker, ROI+3x+5x+full"] / rate["stage, 1 worker, ROI"], "report",
              "what the context crops of the 1st place's recipe cost in 00 (the demo default cuts them)", section=sec),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--crop-size", type=int, default=256)
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        t0 = time.perf_counter()
        jobs = make_frames(tmp / "data", args.frames, width, height)
        n_boxes = sum(len(j.boxes) for j in jobs)
        print(f"{len(jobs)} frames of {width}x{height}, {n_boxes} boxes ({n_boxes / len(jobs):.1f} per frame), "
              f"crop size {args.crop_size}; data made in {time.perf_counter() - t0:.1f}s")
        rows = measure(jobs, args.crop_size, tmp)
        print("\n| what | seconds | boxes/s |\n|---|---|---|")
        rate = {}
        for name, sec, n in rows:
            rate[name] = n / sec
            print(f"| {name} | {sec:.2f} | {n / sec:.1f} |")
        r1 = rate["stage, 1 worker, ROI"] / rate["naive: decode per box, ROI"]
        r2 = rate["stage, 2 workers, ROI"] / rate["stage, 1 worker, ROI"]
        r3 = rate["stage, 2 workers, ROI+3x+5x+full"] / rate["stage, 1 worker, ROI+3x+5x+full"]
        print(f"\nstage 1 worker / naive      : {r1:.2f}x (target >= 2.0) {'ok' if r1 >= 2 else 'BELOW TARGET'}")
        print(f"stage 2 workers / 1 worker  : {r2:.2f}x (target >= 1.7) {'ok' if r2 >= 1.7 else 'BELOW TARGET'}")
        print(f"with context, 2 / 1 workers : {r3:.2f}x  (cpu count {os.cpu_count()})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
