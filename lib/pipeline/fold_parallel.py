"""Every GPU busy: a training stage (01, 03) spreads its folds over the visible GPUs, one process per GPU.

With `train.multi_gpu: folds` (the default) and more than one CUDA device visible (the count
torch sees, which honours `CUDA_VISIBLE_DEVICES`), a plain run of 01_train_folds.py or
03_retrain.py becomes a parent that starts one child per GPU: the same script with
`CUDA_VISIBLE_DEVICES=<that GPU>` and `--fold a --fold b` for its share of the folds (5 folds on 2
GPUs: 0,1,2 and 3,4). The children are ordinary `--fold` runs: they share the stage's lock, each
fold locks itself and writes its own record, so folds finish in any order and a fold done stays
done. Once every child has exited the parent runs the stage body as a plain run would: every
fold is current, so it only reads the out-of-fold files and writes the stage record with the CV.
03 with several self-training rounds is spread round by round: the parent makes round r's
pseudo-labels (a callback from the script: this module is infrastructure, in no code digest, and
imports no engine code), then children with `pseudo.rounds=r` train round r's folds.

Why not torchrun by default: fold-parallel needs no gradient sync, no rank waits on another's
validation, and each GPU runs the recipe's full batch, so 5 folds on 2 GPUs take about
3 fold-times against torchrun's 5 half-fold-times plus its communication and idle validation.
`train.multi_gpu: torchrun` relaunches the plain run under torchrun instead (one fold spans every
GPU), `none` keeps one process. On the CPU or one GPU nothing changes.

`PIPELINE_FOLD_PROCESSES=N` (environment) asks for N processes whatever the device count: on a
machine without GPUs they all train on the CPU (the tests and the notebook test use it).
Each child's output is relayed to the console with a `[gpu i]` prefix and kept whole in
`<stage>/parallel/gpu<i>.log`; a child that fails is named by its folds and that log.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Protocol, Sequence

from lib.config import Config, ConfigError
from lib.core.errors import StageError
from lib.core.paths import ROOT
from lib.pipeline import graph
from lib.pipeline.cli import save_resolved_config
from lib.pipeline.records import Stage

log = logging.getLogger("pipeline")
ENV_PROCESSES = "PIPELINE_FOLD_PROCESSES"
HOST_PROCESSES = "PIPELINE_HOST_PROCESSES"  # set in each child: the processes sharing this host's cores and memory
LOG_DIR = "parallel"  # not fold_*: tools glob the fold folders


@dataclass(frozen=True)
class Spread:
    """How a run trains: `torchrun` over `processes` GPUs, or `groups[i]` folds on `devices[i]` (a CUDA_VISIBLE_DEVICES
    entry; None on the CPU)."""

    mode: str  # "folds" | "torchrun"
    groups: tuple[tuple[int, ...], ...] = ()
    devices: tuple[str | None, ...] = ()
    processes: int = 0
    overrides: tuple[str, ...] = ()  # added to each child's (03 with several rounds: the round it trains, see `_rounds`)


def split_folds(folds: Sequence[int], n: int) -> list[list[int]]:
    """`folds` in `n` contiguous groups, the larger first (5 over 2: [0, 1, 2], [3, 4]); deterministic, so a rerun
    gives every GPU the same folds."""
    if n < 1:
        raise ValueError(f"cannot split folds over {n} processes")
    q, r = divmod(len(folds), n)
    out, at = [], 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        out.append(list(folds[at:at + size]))
        at += size
    return out


def visible_gpus() -> list[str]:
    """The CUDA_VISIBLE_DEVICES entry of each GPU torch can use (its indices when the variable is unset)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip() in ("", "-1"):
        return []  # hidden on purpose: no need to import torch to know
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if env is None:
        return [str(i) for i in range(count)]
    return [e.strip() for e in env.split(",") if e.strip()][:count]


def _requested_processes() -> int | None:
    raw = os.environ.get(ENV_PROCESSES)
    if raw is None or raw.strip() == "":
        return None
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"{ENV_PROCESSES}='{raw}' is not a positive whole number; set it to the number of fold processes, or unset it.")
    return int(raw)


def _script(name: str) -> str:
    return graph.SPECS[name].script


def fold_record(st: Stage, k: int) -> Stage:
    """Fold k's record as lib.engine.folds.fold_stage makes it (tests/test_fold_parallel.py holds them equal); here so
    that this launcher stays infrastructure: never part of a stage's code digest, so changing it reruns nothing."""
    return st.child(f"{st.name}/fold_{k}", st.dir / f"fold_{k}", {"fold": k}, outputs=("best.pt", "oof.npz"))


def _todo(cfg: Config, name: str, force: bool) -> list[int] | None:
    """The folds a plain run would train (every wanted fold under --force, and for 03 with several rounds, where each
    round decides its own folds in `_rounds`); None when the stage is up to date."""
    st = graph.stage(cfg, name)
    if not force and not st.reasons():
        return None
    wanted = list(cfg.train.folds) or list(range(cfg.prepare.n_folds))
    if force or (name == "03_retrain" and cfg.pseudo.rounds > 1):
        return wanted
    first = graph.round_stage(st, 1) if name == "03_retrain" else st
    return [k for k in wanted if fold_record(first, k).reasons()]


def plan(cfg: Config, name: str, folds: Sequence[int] | None, force: bool, dry_run: bool) -> Spread | None:
    """How this run of training stage `name` uses the GPUs; None: train in this process, as on one GPU.

    The bad combinations stop here, each in one sentence, before anything is locked or trained. An
    up-to-date stage returns None before torch is imported (its check stays fast).
    """
    mode, script = cfg.train.multi_gpu, _script(name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if mode != "torchrun":
            raise ConfigError(f"{script} was started by torchrun but train.multi_gpu is '{mode}' (fold-parallel and torchrun do not "
                              "mix); add train.multi_gpu=torchrun to span each fold over the GPUs, or run it without torchrun.")
        return None
    if mode == "none" or dry_run:
        return None
    requested = _requested_processes()
    if folds:
        n = requested or len(visible_gpus())
        if n >= 2 and mode == "folds":
            which = " ".join(f"--fold {k}" for k in folds)
            raise ConfigError(f"{n} GPUs are visible and train.multi_gpu is 'folds', so {script} spreads the folds itself and takes "
                              f"no {which}; to train one fold on one GPU run CUDA_VISIBLE_DEVICES=1 python {script} ... "
                              f"--fold {folds[0]}, or drop --fold.")
        return Spread("torchrun", processes=n) if n >= 2 and requested is None else None
    wanted = list(cfg.train.folds) or list(range(cfg.prepare.n_folds))
    if requested is not None and requested > len(wanted):
        raise ConfigError(f"{ENV_PROCESSES}={requested} asks for more processes than the {len(wanted)} folds {script} trains; "
                          f"set it to at most {len(wanted)}.")
    try:
        todo = _todo(cfg, name, force)
    except StageError:
        return None  # a missing or locked upstream: the plain run says which, in its own words
    if todo is None:
        return None  # up to date
    gpus = visible_gpus()
    n = requested or len(gpus)
    if mode == "torchrun":
        return Spread("torchrun", processes=n) if n >= 2 and requested is None else None
    if n > len(todo) >= 2:
        log.info("%s: %d GPUs for %d folds to train: %d idle (train.multi_gpu=torchrun spans each fold over all of them)",
                 name, n, len(todo), n - len(todo))
    n = min(n, len(todo))
    if n < 2:
        return None  # one GPU, or one fold left: this process trains it
    groups = tuple(tuple(g) for g in split_folds(todo, n))
    devices = tuple(gpus[i % len(gpus)] if gpus else None for i in range(n))
    return Spread("folds", groups, devices, n)


def fold_argv(args: argparse.Namespace, folds: Sequence[int] = (), extra: Sequence[str] = ()) -> list[str]:
    """The stage's own arguments for a child: the config, its overrides (then `extra`), --force, and `--fold k` for each
    of `folds`."""
    out = ["--config", str(args.config), *args.overrides, *extra]
    if getattr(args, "force", False):
        out.append("--force")
    for k in folds:
        out += ["--fold", str(k)]
    return out


def child_env(device: str | None, processes: int) -> dict[str, str]:
    """A child's environment: its one GPU, no further spreading, a share of the cores for its threads (unless
    OMP_NUM_THREADS is set), and `PIPELINE_HOST_PROCESSES` = how many train side by side on this host, so that
    whatever sizes loader workers and memory from the host can divide it."""
    env = {k: v for k, v in os.environ.items() if k != ENV_PROCESSES}
    env.update(PYTHONUNBUFFERED="1", NO_ALBUMENTATIONS_UPDATE="1", **{HOST_PROCESSES: str(processes)})
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


class Child(Protocol):
    def wait(self) -> int: ...

    def stop(self) -> None: ...


Launcher = Callable[[list[str], dict[str, str], Path, str], Child]


class _Relayed:
    """A child process whose output goes whole to its log and, line by line with a prefix, to the console."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, prefix: str) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "wb")  # closed in wait
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.thread = threading.Thread(target=self._pump, args=(self.proc.stdout, prefix), daemon=True)
        self.thread.start()

    def _pump(self, stream: IO[bytes] | None, prefix: str) -> None:
        if stream is None:
            return
        for raw in iter(stream.readline, b""):
            self.log.write(raw)
            self.log.flush()
            line = raw.decode("utf-8", "replace").rstrip("\n").rsplit("\r", 1)[-1]  # a progress bar: its last state
            if line.strip():
                sys.stdout.write(f"{prefix} {line}\n")
                sys.stdout.flush()

    def wait(self) -> int:
        try:
            rc = self.proc.wait()
        finally:
            self.stop()
        return rc

    def stop(self) -> None:
        """Stop the child as a Ctrl-C would (its fold resumes from last.pt next time), then close its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.thread.join(timeout=5)
        self.log.close()


def _relayed(cmd: list[str], env: dict[str, str], log_path: Path, prefix: str) -> Child:
    return _Relayed(cmd, env, log_path, prefix)


def last_error(log_path: Path) -> str:
    """A failed child's one sentence: its last `error: ...` line, else its last line (a traceback's exception)."""
    try:
        lines = [ln.rsplit("\r", 1)[-1].strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return "no output"
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return (errors[-1][len("error: "):] if errors else lines[-1] if lines else "no output").rstrip(".")


def _where(device: str | None) -> str:
    return f"GPU {device}" if device is not None else "the CPU"


def run_children(spread: Spread, name: str, args: argparse.Namespace, log_dir: Path, launch: Launcher = _relayed) -> None:
    """Start one child per group of folds, wait for all (a failed one never stops the others), then raise one sentence
    naming each failed child's folds and log."""
    script = _script(name)
    children = []
    for i, (folds, device) in enumerate(zip(spread.groups, spread.devices)):
        log.info("%s: fold%s %s on %s (log %s)", name, "s" if len(folds) > 1 else "", ",".join(map(str, folds)), _where(device),
                 log_dir / f"gpu{i}.log")
        cmd = [sys.executable, str(ROOT / script), *fold_argv(args, folds, spread.overrides)]
        children.append((folds, device, log_dir / f"gpu{i}.log",
                         launch(cmd, child_env(device, spread.processes), log_dir / f"gpu{i}.log", f"[gpu {i}]")))
    failed, codes = [], []
    try:
        codes = [child.wait() for *_, child in children]
    finally:
        if len(codes) < len(children):  # interrupted (the notebook's stop button signals the parent only): stop them all
            for *_, child in children:
                child.stop()
    for (folds, device, log_path, _), rc in zip(children, codes):
        if rc != 0:
            failed.append(f"fold{'s' if len(folds) > 1 else ''} {','.join(map(str, folds))} on {_where(device)} stopped "
                          f"(exit {rc}: {last_error(log_path)}; log {log_path})")
    if failed:
        raise StageError(f"{name}: {'; '.join(failed)}; the folds that finished are kept, so rerunning {script} redoes only "
                         "the others.")


def train_spread(cfg: Config, name: str, spread: Spread, args: argparse.Namespace, launch: Launcher = _relayed,
                 pseudo_label: Callable[[Stage, int], None] | None = None) -> Stage | None:
    """The parent of a fold-parallel run: claim the stage as `--fold` runs do (a shared lock, upstream read-locked), train
    the folds in the children (03 with several rounds: round by round, `pseudo_label(stage, r)` making round r's
    pseudo-labels in between), and return the stage for the plain body to finish (every fold then current)."""
    st = graph.begin(cfg, name, args.force, False, folds_only=True)
    if st is None:
        return None
    log.info("%s: %d folds over %d processes, one per %s (train.multi_gpu=folds)", name, sum(map(len, spread.groups)),
             spread.processes, "GPU" if spread.devices[0] is not None else "share of the CPU")
    try:
        if name == "03_retrain" and cfg.pseudo.rounds > 1:
            if pseudo_label is None:
                raise ValueError("03 with several rounds needs pseudo_label to make each round's pseudo-labels")
            _rounds(cfg, st, spread, args, launch, pseudo_label)
        else:
            run_children(spread, name, args, st.dir / LOG_DIR, launch)
    finally:
        save_resolved_config(cfg, st.dir)  # the children saved theirs (03's with their pseudo.rounds): the stage's is this one
    return st


def _rounds(cfg: Config, st: Stage, spread: Spread, args: argparse.Namespace, launch: Launcher,
            pseudo_label: Callable[[Stage, int], None]) -> None:
    """03's rounds 1..R, each spread in turn: for r > 1 this process makes round r's pseudo-labels from round r-1's folds
    (one process must, and every child needs them), then children with `pseudo.rounds=r` train round r's folds not yet
    current (the rounds before it are current for them). The children are never forced (they would redo the earlier
    rounds): under --force round r's fold records and last.pt go here, so its folds start afresh."""
    plain = argparse.Namespace(**{**vars(args), "force": False})
    wanted = list(cfg.train.folds) or list(range(cfg.prepare.n_folds))
    for r in range(1, cfg.pseudo.rounds + 1):
        if r > 1:
            pseudo_label(st, r)
            _free_gpu_memory()  # the children train on this GPU too
        rs = graph.round_stage(st, r)
        todo = [k for k in wanted if args.force or fold_record(rs, k).reasons()]
        if args.force:
            for k in todo:
                fs = fold_record(rs, k)
                fs.invalidate()
                (fs.dir / "last.pt").unlink(missing_ok=True)
        n = min(spread.processes, len(todo))
        if n < 2:
            continue  # one fold: the plain body trains it
        groups = tuple(tuple(g) for g in split_folds(todo, n))
        run_children(Spread("folds", groups, spread.devices[:n], n, (f"pseudo.rounds={r}",)), st.name, plain,
                     st.dir / LOG_DIR / f"round_{r}", launch)


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def relaunch_torchrun(spread: Spread, name: str, args: argparse.Namespace) -> int:
    """train.multi_gpu=torchrun with several GPUs and no torchrun around: the same run under torchrun, one rank per GPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spread.processes}",
           str(ROOT / _script(name)), *fold_argv(args, args.fold or ())]
    log.info("%s: train.multi_gpu=torchrun: %s", name, " ".join(cmd[1:]))
    return subprocess.call(cmd)
