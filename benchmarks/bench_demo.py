"""Benchmark of the demo end to end: a first run, a rerun with nothing changed, a rerun after changing only `submit.blend`.

    .venv/bin/python benchmarks/bench_demo.py [--quick]

Every step of `make demo` (lib.demo, 00 .. 04, knn_baseline, lib.report) runs as its own
process on a small demo (demo.per_class=4, 1 test box per class, 2 folds, 1 epoch, 32 px; the
rest of configs/demo.yaml) in a temp output folder, on one thread (OMP_NUM_THREADS=1: on a busy
2-core machine a second torch thread mostly waits, see the train rows); each process's wall time
and peak RSS (os.wait4) are recorded. The rerun should find every stage up to date without loading torch;
the blend-only rerun should rerun 04 alone, from its cached probabilities (no model loaded).
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

SECTION = "Demo end to end (make demo on a small config)"
STEPS = [("demo data", ["-m", "lib.demo"]), ("00_prepare", ["00_prepare_data.py"]), ("01_train", ["01_train_folds.py"]),
         ("02_pseudo", ["02_pseudo_label.py"]), ("03_retrain", ["03_retrain.py"]), ("04_submit", ["04_infer_submit.py"]),
         ("knn", ["knn_baseline.py"]), ("report", ["-m", "lib.report"])]
details: dict[str, str] = {}  # filled by run(): the per-stage table, for run_all's results.md


def overrides(root: Path, quick: bool) -> list[str]:
    return B.demo_overrides(root, "e2e", 3 if quick else 4, 1, [
        "prepare.n_folds=2", "prepare.crop_size=40", "model.img_size=32", "knn.img_size=32", "train.epochs=1", "train.batch_size=64"])


def did(step: str, output: str) -> str:
    """'ran', 'up to date' or 'ran (from cache)' from a step's log."""
    if step == "report":
        return "printed"
    name = "demo data" if step == "demo data" else step
    if re.search(rf"^{re.escape(name)}: up to date", output, re.M):
        return "up to date"
    if step == "04_submit" and len(re.findall(r"test probabilities from cache", output)) >= 1 and "stored in probs" not in output:
        return "ran (probabilities from cache)"
    return "ran"


def run_all_steps(ov: list[str]) -> dict[str, dict]:
    out = {}
    for step, args in STEPS:
        res = B.run_child([sys.executable, *args, "--config", str(B.ROOT / "configs/demo.yaml"), *ov], env={"OMP_NUM_THREADS": "1"})
        if res["rc"] != 0:
            raise RuntimeError(f"demo step {step} failed (exit {res['rc']}):\n{res['output'][-3000:]}")
        res["did"] = did(step, res["output"])
        out[step] = res
    return out


def import_floor() -> dict:
    """A process that only imports torch and timm: the memory every model-loading stage starts from."""
    return B.run_child([sys.executable, "-c", "import torch, timm"])


def run(quick: bool = False, work: Path | None = None) -> list[dict]:
    work = Path(work or tempfile.mkdtemp(prefix="bench_demo_"))
    root = work / "e2e"
    ov = overrides(root, quick)
    first = run_all_steps(ov)
    again = run_all_steps(ov)
    blend = run_all_steps(ov + ["submit.blend=cv"])
    floor = import_floor()
    total = lambda r: sum(v["seconds"] for v in r.values())
    t1, t2, t3 = total(first), total(again), total(blend)
    lines = ["| step | first run s | peak RSS MiB | rerun, nothing changed: s / what it did "
             "| rerun, submit.blend=cv: s / what it did | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for step, _ in STEPS:
        a, b, c = first[step], again[step], blend[step]
        lines.append(f"| {step} | {a['seconds']:.1f} | {a['rss_mb']:.0f} | {b['seconds']:.1f} / {b['did']} | "
                     f"{c['seconds']:.1f} / {c['did']} | {c['rss_mb']:.0f} |")
    lines.append(f"| **total** | {t1:.1f} | max {max(v['rss_mb'] for v in first.values()):.0f} | {t2:.1f} | {t3:.1f} | |")
    details[SECTION + ": per step"] = (
        f"Config: configs/demo.yaml with `{' '.join(o for o in ov if not o.startswith(('data.root', 'output_root')))}`, "
        "every step on one thread (OMP_NUM_THREADS=1).\n"
        f"A process that only imports torch and timm peaks at {floor['rss_mb']:.0f} MiB (this torch build).\n\n" + "\n".join(lines))

    stale = [s for s, r in again.items() if r["did"] not in ("up to date", "printed")]
    ran_blend = [s for s, r in blend.items() if r["did"] not in ("up to date", "printed")]
    heavy = max((s for s, _ in STEPS), key=lambda s: first[s]["rss_mb"])
    sub_first, sub_blend = first["04_submit"], blend["04_submit"]
    return [
        B.row("demo: rerun with nothing changed vs the first run", f"{t2:.1f} s", f"{t1:.1f} s", t2 / t1, "<= 0.05",
              "every stage up to date: " + ("yes" if not stale else f"no, ran {', '.join(stale)}")
              + f"; the stages decide from their records without importing torch ({len(STEPS)} processes)",
              met=not stale and t2 / t1 <= 0.05, section=SECTION),
        B.row("demo: rerun after changing only submit.blend vs the first run", f"{t3:.1f} s", f"{t1:.1f} s", t3 / t1, "<= 0.1",
              f"reran: {', '.join(ran_blend) or 'nothing'}; 04 took {sub_blend['seconds']:.1f}s "
              f"(first run {sub_first['seconds']:.1f}s), {sub_blend['did']}",
              met=ran_blend == ["04_submit"] and "cache" in sub_blend["did"] and t3 / t1 <= 0.1, section=SECTION),
        B.row("demo: 04's peak RSS, blend-only rerun vs first run", f"{sub_blend['rss_mb']:.0f} MiB", f"{sub_first['rss_mb']:.0f} MiB",
              sub_blend["rss_mb"] / sub_first["rss_mb"], "<= 0.5",
              f"no model loaded: below the {floor['rss_mb']:.0f} MiB of a process that only imports torch and timm", section=SECTION),
        B.row(f"demo: peak RSS of the heaviest step ({heavy}) vs a process importing torch + timm",
              f"{first[heavy]['rss_mb']:.0f} MiB", f"{floor['rss_mb']:.0f} MiB", first[heavy]["rss_mb"] / floor["rss_mb"], "report",
              "what the stage holds beyond the libraries: model, optimiser, batches, the crops' table", section=SECTION),
    ]


if __name__ == "__main__":
    rc = B.cli(run, __doc__)
    for title, text in details.items():
        print(f"\n## {title}\n\n{text}")
    sys.exit(rc)
