"""Run every benchmark and write benchmarks/results.md (`make bench`).

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--out FILE] [--work DIR]

The table has one row per measurement: what, the measured figure, the reference it is compared
with (measured side by side in the same run), their ratio, the target and whether it is met;
the device (CPU model, GPU name), the date and the torch/timm versions head the file. A benchmark
that fails becomes a failed row and the others still run; the file is rewritten after each one.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

# (name, module): the items 1..8, then the GPU comparison.
BENCHES = [("prepare", "bench_prepare"), ("loader", "bench_loader"), ("train", "bench_train"), ("infer", "bench_infer"),
           ("blend", "bench_blend"), ("knn", "bench_knn"), ("demo", "bench_demo"), ("scaling", "bench_scaling"), ("gpu", "bench_gpu")]

BUSY = """\
- **This machine was busy** (load average at the start at or above its cores; see the row "step
  alone with torch's 2 threads vs 1 thread"): torch's intra-op parallel regions wait for a
  descheduled second thread, so many small ops (batch norm, the EMA's per-tensor updates, AdamW's
  per-tensor steps on CPU, collating a batch) cost far more than on an idle machine. Absolute CPU
  figures are therefore low and noisy; the ratios are taken side by side, interleaved where cheap.
"""
CORES = """\
- **2 workers vs 1** (00 cropping, the loader) on {cores} cores: the two workers share the cores with
  the parent process (which gathers the crops and writes the table, or runs the training loop) and
  with this benchmark, so their gain tops out well under 2x here; on the 8 or more cores of a GPU
  machine each worker has a core of its own.
- **1 loader worker vs 0**: a worker hands each batch to the main process through shared memory
  (a copy of the tensor and a pickled message), which the main process does not pay with 0 workers;
  alone, one worker can only lose a little. Its use is to overlap decoding with the step in 01/03.
- **Inference over the crop loader with 0 workers**: decoding and resizing a crop in the main
  process costs about a seventh of this small model's forward pass at 64 px on a CPU, and nothing
  overlaps it; with a 224 px model on a GPU and loader workers (`train.num_workers`) it is hidden.
- **Inference with 1 loader worker** on a few hundred crops: the fork of the worker costs more than
  decoding them all; at the real test size (788 ROIs at 224 px, 5 fold models sharing one decode,
  see lib.engine.inference.predict_folds_tta) the start-up is paid once.
- **Rotation and scale TTA views** resample the batch with `grid_sample`, which on a CPU has cost
  from nothing to a fifth of this small model's forward pass at 64 px from run to run (1.00 to 1.23
  of identity); flips and quarter turns are plain copies.
- **Targets for the GPU** (whole loop within 1.10 of the step, bf16, `train.compile`, the timm
  comparison) are only judged on a CUDA run; on CPU those rows say so.
"""


def limits() -> str:
    """What limits the CPU rows, as this run's load says: the busy-machine paragraph only when it was busy."""
    cores = B.cpus_available()
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:
        busy = False
    return (BUSY if busy else "") + CORES.format(cores=cores)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats in every benchmark")
    ap.add_argument("--only", action="append", choices=[n for n, _ in BENCHES], help="run only these (repeatable)")
    ap.add_argument("--out", default=str(B.ROOT / "benchmarks" / "results.md"))
    ap.add_argument("--work", default=None, help="folder for generated data, kept (default: a temp folder, removed)")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_all_"))
    info = B.device_info()
    what_limits = limits()  # judged on the load at the start, as the rows are
    info["mode"] = ("--quick" if args.quick else "full") + (f", only {', '.join(args.only)}" if args.only else "")
    rows: list[dict] = []
    details: dict[str, str] = {}
    timings: dict[str, float] = {}
    out = Path(args.out)

    def write(final: bool = False) -> None:
        head = dict(info)
        head["total time"] = f"{time.perf_counter() - started:.0f} s" + ("" if final else " so far (running)")
        head["load average at the end"] = B.load_average()
        B.write_results(out, rows, head, {"What limits the CPU rows": what_limits, **details}, timings)

    try:
        for name, module in BENCHES:
            if args.only and name not in args.only:
                continue
            print(f"\n=== {name} ({module}) ===", flush=True)
            t0 = time.perf_counter()
            try:
                mod = importlib.import_module(module)
                got = mod.run(quick=args.quick, work=work / name)
                for r in got:
                    B.check_row(r)
                rows.extend(got)
                details.update(getattr(mod, "details", {}) or {})
                B.print_rows(got)
            except Exception as e:  # one broken benchmark must not hide the others
                traceback.print_exc()
                rows.append(B.row(f"{name}: benchmark failed", f"failed: {type(e).__name__}: {e}"[:300], "—", None, "runs",
                                  "see the console output of make bench", met=False, section="Failures"))
            timings[name] = time.perf_counter() - t0
            write()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    write(final=True)
    print(f"\nwrote {out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
