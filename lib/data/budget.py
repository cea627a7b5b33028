"""The host budget of the data loaders: workers from the cores each process may use, and the batches in flight
bounded by a share of RAM and of /dev/shm.

Why: a loader worker hands each batch to the training process through shared memory (/dev/shm, a
tmpfs in RAM), and the pin-memory thread copies it into page-locked RAM; every worker keeps
`prefetch` batches ready, and a fold's training, validation and test-like loaders keep their
workers for the whole fold. Asked for by hand on a small host (8 workers on Kaggle's 4 cores,
256-row evaluation batches of two 224 px views, 294 MiB each), that is gigabytes per process,
doubled when two processes share the machine: out-of-memory kills or shared-memory bus errors
in the middle of a fold. So the plan is computed before anything trains:

- one batch in flight = batch x views x 3 x size^2 x 4 bytes (float32 after Normalize);
- a loader holds batch bytes x prefetch x workers, and the persistent loaders of a fold are
  counted together (an upper bound: the worker processes live all fold long);
- `train.num_workers: auto` is the cores per process (cores this process may use, divided by
  the processes sharing the machine: `LOCAL_WORLD_SIZE` under torchrun, `PIPELINE_HOST_PROCESSES`
  when folds run side by side, one per GPU), less one on the CPU, where the process computes;
- over the share, prefetch drops (4 -> 1) and then the evaluation batch halves (not under frame
  attention, where it decides how large frames are chunked); what still does not fit is one
  sentence naming the batch, the share and the fix.

A number of workers given by hand is kept, or refused when it is more than the cores per
process: the augmentation of a training batch is seeded by the worker that draws it, so a
silent clamp would change results from one machine to the next. Pure computation here;
`host()` reads the machine.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from lib.config import Config, ConfigError

PREFETCH_FACTOR = 4  # batches each loader worker keeps ready (torch's default is 2): a GPU step outruns one batch's decode
PROCESSES_ENV = "PIPELINE_HOST_PROCESSES"  # set by lib.pipeline.fold_parallel in each child (one process per GPU)
GiB = 2**30


@dataclass(frozen=True)
class Host:
    """What the loaders of one process may use: cores (affinity), RAM and /dev/shm in bytes, processes sharing them."""

    cores: int
    ram_bytes: int
    shm_bytes: int
    processes: int = 1

    @property
    def cores_per_process(self) -> int:
        return max(1, self.cores // max(1, self.processes))


@dataclass(frozen=True)
class LoaderBudget:
    """One loader's share: workers, batches each keeps ready, rows per batch, and the bytes it holds in flight."""

    name: str  # train, val, testlike (a fold's persistent loaders) or predict (02, 04, knn: one at a time)
    workers: int
    prefetch: int
    batch: int
    batch_bytes: int  # one batch: batch x views x 3 x size^2 x 4

    @property
    def bytes_in_flight(self) -> int:
        return self.batch_bytes * self.prefetch * self.workers


@dataclass(frozen=True)
class LoaderPlan:
    """The loaders of one process, the host they were planned for and the share of RAM and /dev/shm they may hold."""

    loaders: tuple[LoaderBudget, ...]
    host: Host
    memory_share: float
    shm_share: float

    def get(self, name: str) -> LoaderBudget:
        return next(b for b in self.loaders if b.name == name)

    @property
    def bytes_in_flight(self) -> int:
        """Per process: a fold's persistent loaders together; a prediction loader never runs beside them."""
        fold = sum(b.bytes_in_flight for b in self.loaders if b.name != "predict")
        return max(fold, *(b.bytes_in_flight for b in self.loaders if b.name == "predict"), 0)

    @property
    def limit_bytes(self) -> int:
        """Per process: the smaller of its shares of RAM and of /dev/shm."""
        return int(min(self.memory_share * self.host.ram_bytes, self.shm_share * self.host.shm_bytes) / max(1, self.host.processes))

    def line(self) -> str:
        """The budget in one line (the doctor prints it)."""
        h = self.host
        if not any(b.workers for b in self.loaders):
            return (f"{h.cores} cores / {h.processes} process{'es' if h.processes > 1 else ''}; train.num_workers 0: batches load "
                    f"in the main process, none in flight")
        parts = ", ".join(f"{b.name} {b.workers}w x{b.prefetch} of {b.batch}" for b in self.loaders)
        return (f"{h.cores} cores / {h.processes} process{'es' if h.processes > 1 else ''} = {h.cores_per_process} per process; "
                f"{parts}; {self.bytes_in_flight / GiB:.2f} GiB in flight per process of {self.limit_bytes / GiB:.2f} GiB allowed "
                f"({self.memory_share:g} of {h.ram_bytes / GiB:.1f} GiB RAM, {self.shm_share:g} of {h.shm_bytes / GiB:.1f} GiB /dev/shm)")


def batch_bytes(batch: int, views: int, img_size: int) -> int:
    """Bytes of one loader batch: float32 (3, size, size) images, `views` per row."""
    return batch * views * 3 * img_size * img_size * 4


def auto_workers(cores_per_process: int, on_cpu: bool) -> int:
    """Workers per loader: every core of this process's share, less one on the CPU (the process computes there)."""
    return max(0, cores_per_process - 1) if on_cpu else cores_per_process


def plan_loaders(cfg: Config, cores: int, ram_bytes: int, shm_bytes: int, processes: int = 1, *, on_cpu: bool = False,
                 world: int = 1, testlike: bool = True) -> LoaderPlan:
    """The loaders `cfg` asks for on this host, bounded by `train.host_memory_share` of RAM and `train.shm_share` of /dev/shm.

    `world` splits the training batch over torchrun processes (each loads its share); `testlike`
    plans the test-like validation loader too (00 cut those crops). Raises ConfigError for more
    workers than cores per process, or batches that do not fit at one prefetched batch each.
    """
    t, host = cfg.train, Host(cores, ram_bytes, shm_bytes, max(1, processes))
    per = host.cores_per_process
    if t.num_workers == "auto":
        workers = auto_workers(per, on_cpu)
    else:
        workers = int(t.num_workers)
        if workers > per:
            raise ConfigError(f"train.num_workers {workers} asks for more loader workers than the {per} cores this process may use "
                              f"({cores} cores shared by {host.processes} process{'es' if host.processes > 1 else ''}); "
                              f"set train.num_workers: auto or at most {per}.")
    views, size = len(cfg.model.context), cfg.model.input_size
    prefetch = PREFETCH_FACTOR if workers else 0
    train_batch = max(1, t.batch_size // max(1, world))

    def loader(name: str, batch: int) -> LoaderBudget:
        return LoaderBudget(name, workers, prefetch, batch, batch_bytes(batch, views, size))

    evals = ("val", "testlike") if testlike else ("val",)
    plan = LoaderPlan((loader("train", train_batch), *(loader(n, t.eval_batch_size) for n in evals), loader("predict", t.eval_batch_size)),
                      host, t.host_memory_share, t.shm_share)
    return _fit(plan, shrink_eval=cfg.model.frame_context != "attention")


def _fit(plan: LoaderPlan, shrink_eval: bool) -> LoaderPlan:
    """Lower the prefetch of the loader holding the most (4 -> 1), then halve the evaluation batch, until within the limit."""
    while plan.bytes_in_flight > plan.limit_bytes:
        fold = [b for b in plan.loaders if b.name != "predict"]
        binding = fold if sum(b.bytes_in_flight for b in fold) >= plan.get("predict").bytes_in_flight else [plan.get("predict")]
        deep = [b for b in binding if b.prefetch > 1]
        if deep:
            top = max(deep, key=lambda b: b.bytes_in_flight)
            plan = replace(plan, loaders=tuple(replace(b, prefetch=b.prefetch - 1) if b is top else b for b in plan.loaders))
            continue
        evals = [b for b in binding if b.name != "train" and b.batch > 1]
        if not shrink_eval or not evals:
            raise ConfigError(_over(plan, shrink_eval))
        plan = replace(plan, loaders=tuple(replace(b, batch=b.batch // 2, batch_bytes=b.batch_bytes // b.batch * (b.batch // 2))
                                           if b in evals else b for b in plan.loaders))
    return plan


def _over(plan: LoaderPlan, shrink_eval: bool) -> str:
    """The one sentence for batches that do not fit even at one prefetched batch per worker."""
    tr, h = plan.get("train"), plan.host
    why = "" if shrink_eval else " (train.eval_batch_size is kept under model.frame_context: attention)"
    return (f"train.batch_size {tr.batch} ({tr.batch_bytes / 2**20:.0f} MiB a batch) with {tr.workers} loader workers per loader holds "
            f"{plan.bytes_in_flight / GiB:.2f} GiB in flight per process, over train.host_memory_share {plan.memory_share:g} of "
            f"{h.ram_bytes / GiB:.1f} GiB RAM / train.shm_share {plan.shm_share:g} of {h.shm_bytes / GiB:.1f} GiB /dev/shm shared by "
            f"{h.processes} process{'es' if h.processes > 1 else ''}{why}; lower train.batch_size or train.num_workers, "
            f"or raise train.host_memory_share / train.shm_share.")


# ----------------------------------------------------------------------------- this machine


def usable_cores() -> int:
    """Cores this process may run on: its affinity set where the OS has one, within a cgroup v2 CPU quota if any."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def ram_bytes() -> int:
    """Physical RAM, within a cgroup memory limit if any (a container's limit is what kills it)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 8 * GiB
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
            if text != "max":
                total = min(total, int(text))
        except (OSError, ValueError):
            pass
    return int(total)


def shm_bytes(ram: int) -> int:
    """The size of /dev/shm; half the RAM where there is none (tmpfs's default size)."""
    try:
        return int(shutil.disk_usage("/dev/shm").total)  # noqa: S108 (read its size, write nothing)
    except OSError:
        return ram // 2


def sharing_processes() -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE, or PIPELINE_HOST_PROCESSES from the fold-parallel launcher."""
    got = 1
    for name in ("LOCAL_WORLD_SIZE", PROCESSES_ENV):
        try:
            got = max(got, int(os.environ.get(name, "1")))
        except ValueError:
            pass
    return got


def host() -> Host:
    """This machine as the loaders see it."""
    ram = ram_bytes()
    return Host(usable_cores(), ram, shm_bytes(ram), sharing_processes())


def plan_here(cfg: Config, *, on_cpu: bool, world: int = 1, testlike: bool = True) -> LoaderPlan:
    """`plan_loaders` on this machine."""
    h = host()
    return plan_loaders(cfg, h.cores, h.ram_bytes, h.shm_bytes, h.processes, on_cpu=on_cpu, world=world, testlike=testlike)


def doctor_line(cfg: Config) -> tuple[str, str, bool]:
    """(label, text, problem) for the doctor: the budget of a training stage of `cfg` on this machine.

    The processes are those of this run (torchrun, PIPELINE_HOST_PROCESSES) or, when several GPUs are
    visible and the config trains on them, one per GPU (folds run side by side); a plan that
    lowered the config's prefetch or evaluation batch says so, one that cannot fit is the problem.
    """
    import torch

    gpus = torch.cuda.device_count() if cfg.train.device != "cpu" and torch.cuda.is_available() else 0
    h = host()
    h = replace(h, processes=max(h.processes, gpus))
    try:
        plan = plan_loaders(cfg, h.cores, h.ram_bytes, h.shm_bytes, h.processes, on_cpu=gpus == 0)
    except ConfigError as e:
        return "loaders", str(e), True
    asked = cfg.train.eval_batch_size
    lowered = [f"{b.name} prefetch {b.prefetch}" for b in plan.loaders if b.workers and b.prefetch < PREFETCH_FACTOR]
    lowered += [f"eval batch {plan.get('val').batch} (asked {asked})"] if plan.get("val").batch < asked else []
    note = f"; lowered to fit: {', '.join(lowered)}" if lowered else ""
    return "loaders", plan.line() + note, False
