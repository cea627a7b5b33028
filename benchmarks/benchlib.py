"""Shared helpers of the benchmarks: result rows, timing, the device line, demo workspaces, child processes.

Every `benchmarks/bench_*.py` has `run(quick, work) -> list[dict]` returning rows of ROW_KEYS,
which `run_all.py` collects into `benchmarks/results.md` (`write_results`). A row's `ratio` is
measured side by side in one run (what counts on noisy machines); `target` is a comparison such
as ">= 2.0" or "<= 1.10" against the ratio, or "report" where there is none; `met` (optional)
overrides the automatic judgement, e.g. for targets that only apply on a GPU.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROW_KEYS = ("what", "measured", "reference", "ratio", "target", "note")
TABLE_HEADER = ("what", "measured", "reference", "ratio", "target", "met?", "note")
_TARGET = re.compile(r"^\s*(>=|<=|>|<)\s*([0-9.]+)")


# ----------------------------------------------------------------------------- rows


def row(what: str, measured: str, reference: str, ratio: float | None, target: str = "report", note: str = "",
        met: bool | None = None, section: str = "") -> dict:
    """One result row. `ratio` None only where nothing could be measured (then `measured` says why)."""
    r = {"what": what, "measured": measured, "reference": reference, "ratio": ratio, "target": target, "note": note}
    if met is not None:
        r["met"] = met
    if section:
        r["section"] = section
    return r


def judge(ratio: float | None, target: str) -> bool | None:
    """True / False when `target` is a comparison (">= 0.9") and the ratio is known; None otherwise."""
    m = _TARGET.match(target or "")
    if ratio is None or m is None or ratio != ratio:  # NaN
        return None
    op, v = m.group(1), float(m.group(2))
    return {">=": ratio >= v, "<=": ratio <= v, ">": ratio > v, "<": ratio < v}[op]


def met_of(r: dict) -> bool | None:
    return r["met"] if "met" in r else judge(r.get("ratio"), r.get("target", ""))


def check_row(r: dict) -> None:
    """ValueError unless `r` has every key of ROW_KEYS with the right types."""
    missing = [k for k in ROW_KEYS if k not in r]
    if missing:
        raise ValueError(f"benchmark row {r.get('what', r)!r} lacks {', '.join(missing)}")
    for k in ("what", "measured", "reference", "target", "note"):
        if not isinstance(r[k], str):
            raise ValueError(f"benchmark row {r['what']!r}: {k} must be text, got {type(r[k]).__name__}")
    if r["ratio"] is not None and not isinstance(r["ratio"], (int, float)):
        raise ValueError(f"benchmark row {r['what']!r}: ratio must be a number or None")


def _cell(v: object) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def fmt_ratio(v: float | None) -> str:
    if v is None or v != v:
        return "—"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def markdown_table(rows: Iterable[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for r in rows:
        check_row(r)
        m = met_of(r)
        met = "—" if m is None else ("yes" if m else "**no**")
        lines.append("| " + " | ".join(_cell(x) for x in (r["what"], r["measured"], r["reference"], fmt_ratio(r["ratio"]),
                                                           r["target"], met, r["note"])) + " |")
    return "\n".join(lines)


def write_results(path: Path, rows: Sequence[dict], info: dict, sections: dict[str, str] | None = None,
                  timings: dict[str, float] | None = None, title: str = "Benchmark results") -> str:
    """benchmarks/results.md: the device line, the table, rows that miss their target, then detail sections.

    A row without a ratio (nothing measured on this machine, e.g. the CUDA rows on a CPU) is not put
    in the table, where every row has its measured ratio, but listed under "Not measured in this run".
    """
    unmeasured = [r for r in rows if r["ratio"] is None]
    rows = [r for r in rows if r["ratio"] is not None]
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += ["", "Ratios are measured side by side in one run; absolute figures move with the machine's load.", ""]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("section", ""), []).append(r)
    for name, rs in groups.items():
        if name:
            lines += [f"## {name}", ""]
        lines += [markdown_table(rs), ""]
    short = [r for r in rows if met_of(r) is False]
    lines += ["## Rows that miss their target", ""]
    if short:
        lines += [f"- **{r['what']}** ({fmt_ratio(r['ratio'])} vs {r['target']}): {r['note'] or 'no note'}" for r in short]
    else:
        lines.append("None.")
    lines.append("")
    if unmeasured:
        lines += ["## Not measured in this run", ""]
        lines += [f"- **{r['what']}** ({r['measured']}): {r['note'] or 'no note'}" for r in unmeasured]
        lines.append("")
    for name, text in (sections or {}).items():
        lines += [f"## {name}", "", text.rstrip(), ""]
    if timings:
        lines += ["## Time per benchmark", "", "| benchmark | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
        lines.append("")
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def device_info() -> dict[str, str]:
    """The header of results.md: device, date, library versions, the load on the machine."""
    import timm
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no CUDA device in this run)"
    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "CPU": f"{cpu_model()}, {cpus_available()} cores available, torch threads {torch.get_num_threads()}",
        "GPU": gpu,
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}",
        "load average at start (1/5/15 min)": load_average(),
    }


# ----------------------------------------------------------------------------- timing


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls (seconds): the least disturbed by other jobs on a shared machine."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of timing of several functions taken in turns (A B C A B C ...), so a burst of load hits them alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


# A tiny launcher between the benchmark and each measured command. Linux carries a process's peak
# RSS across exec from the memory it had before (a fork of its parent), so a child forked straight
# from a benchmark that holds torch (1.5 GiB) would report at least that; forked from this
# launcher, it starts from a few MiB. The launcher writes the child's seconds and peak RSS (KiB).
_LAUNCHER = """
import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - t} {ru.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: Sequence[str], cwd: Path = ROOT, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run a command; its wall seconds, its own peak RSS in MiB (and its reaped children's), exit code and output."""
    import signal
    import tempfile

    full_env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        stats, log = Path(tmp) / "stats", Path(tmp) / "log"
        with open(log, "w+b") as out:
            p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(stats), *cmd], cwd=str(cwd), env=full_env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc = p.wait()
            out.seek(0)
            text = out.read().decode(errors="replace")
        seconds, kib = (float(v) for v in stats.read_text().split()) if stats.is_file() else (float("nan"), float("nan"))
    rss = kib / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux
    return {"seconds": seconds, "rss_mb": rss, "rc": rc, "output": text}


# ----------------------------------------------------------------------------- demo workspaces


def demo_overrides(root: Path, exp: str, per_class: int, test_per_class: int, extra: Sequence[str] = ()) -> list[str]:
    """Dotted overrides of configs/demo.yaml for a small demo under `root` (data and output both there)."""
    return [f"data.root={root / 'data'}", f"output_root={root / 'out'}", f"exp={exp}",
            f"demo.per_class={per_class}", f"demo.test_per_class={test_per_class}", *extra]


def prepared_demo(work: Path, name: str, per_class: int, test_per_class: int, extra: Sequence[str] = ()) -> tuple[object, Path]:
    """Generate a demo dataset and run stage 00 on it (in this process), once per `name` in `work`.

    Returns the config and the 00_prepare folder (rois.csv, crops/, taxonomy.json).
    """
    import importlib.util

    from lib.config import load_config
    from lib.demo.__main__ import main as demo_main

    root = work / name
    overrides = demo_overrides(root, name, per_class, test_per_class, extra)
    cfg = load_config(str(ROOT / "configs/demo.yaml"), overrides)
    prep = cfg.out_dir / "00_prepare"
    if not (prep / "record.json").is_file():
        quiet = ["--config", str(ROOT / "configs/demo.yaml"), *overrides]
        if demo_main(quiet) != 0:
            raise RuntimeError(f"demo data for {name} could not be generated")
        spec = importlib.util.spec_from_file_location("stage00", ROOT / "00_prepare_data.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {ROOT / '00_prepare_data.py'} as a module")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if mod.main(quiet) != 0:
            raise RuntimeError(f"00_prepare failed for {name}")
    return cfg, prep


# ----------------------------------------------------------------------------- command line


def print_rows(rows: Sequence[dict]) -> None:
    print("\n" + markdown_table(rows) + "\n")


def cli(run: Callable[..., list[dict]], doc: str, argv: Sequence[str] | None = None) -> int:
    """The command line every bench module shares: --quick, --work DIR (kept), --json (rows as JSON lines)."""
    import argparse
    import shutil
    import tempfile

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--work", default=None, help="folder for generated data (default: a temp folder, removed)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON, one per line, after the table")
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_"))
    try:
        rows = run(quick=args.quick, work=work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_rows(rows)
    if args.json:
        for r in rows:
            print("ROW " + json.dumps(r))
    return 0
