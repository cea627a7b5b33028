"""Device choice, memory format and mixed precision: one policy for training, prediction, TTA and embeddings.

`precision_policy` decides what `train.precision` means on the device at hand: `auto` is bf16
where the GPU has native bf16 (compute capability 8.0 and up), fp16 with a GradScaler on older
GPUs (T4 is sm_75, P100 sm_60: bf16 convolutions there fail or run far slower, and
torch.compile with bf16 fails), and fp32 on the CPU, where autocast only slows things down and
changes results. `describe_device` says which device and precision a stage runs on. Both import
torch only when called, so a tool such as a doctor command can import this module cheaply.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, ContextManager

from lib.core.errors import StageError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train.precision's values (lib.config checks them)
log = logging.getLogger("pipeline")
_warned: set[str] = set()  # problems already reported by this process


def choose_precision(requested: str, device_type: str, capability: tuple[int, int] | None = None,
                     bf16_native: bool = False) -> tuple[str, str]:
    """The policy without torch: (bf16 | fp16 | fp32, the reason in words) for a device of `device_type`.

    `capability` is the GPU's compute capability, `bf16_native` whether it computes bf16 in
    hardware. An explicit bf16 on a GPU without it is honoured, with the reason saying what it costs.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision '{requested}' is not one of {', '.join(PRECISIONS)}")
    cc = f"compute capability {capability[0]}.{capability[1]}" if capability else "this GPU"
    if device_type != "cuda":
        if requested in ("auto", "fp32"):
            return "fp32", f"{device_type}: fp32 (autocast on the CPU is slower and changes results)"
        return "fp32", f"{device_type}: fp32 (train.precision={requested} applies to CUDA GPUs only)"
    if requested == "auto":
        if bf16_native:
            return "bf16", f"{cc} has native bf16 (no loss scaling needed)"
        return "fp16", f"{cc} has no native bf16 (its bf16 convolutions fail or crawl), so fp16 with a GradScaler"
    if requested == "bf16" and not bf16_native:
        return "bf16", f"train.precision=bf16, though {cc} has no native bf16: expect it slow, and torch.compile to fail; auto picks fp16"
    return requested, f"train.precision={requested}" + (" with a GradScaler" if requested == "fp16" else "")


def _capability(device: "torch.device") -> tuple[tuple[int, int], bool]:
    """The GPU's compute capability and whether it has native bf16 (torch's own answer, or capability >= 8.0)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    try:
        native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no including_emulation
        native = False
    return (int(major), int(minor)), native or int(major) >= 8


def precision_policy(device: "torch.device | str", requested: str = "auto") -> tuple[str, str]:
    """(bf16 | fp16 | fp32, why) for `train.precision` = `requested` on `device`; the one policy of every stage."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return choose_precision(requested, device.type)
    capability, native = _capability(device)
    return choose_precision(requested, "cuda", capability, native)


def autocast(device: "torch.device", precision: str | None = None) -> ContextManager:
    """Autocast to the policy's dtype (`precision` = bf16, fp16 or fp32; None = the auto policy); fp32 is a no-op."""
    import torch

    name = precision if precision in ("bf16", "fp16", "fp32") else precision_policy(device, precision or "auto")[0]
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if name == "bf16" else torch.float16)


def grad_scaler(device: "torch.device", precision: str) -> "torch.amp.GradScaler | None":
    """A GradScaler for fp16 (its small range underflows gradients without one); None for bf16 and fp32."""
    import torch

    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def channels_last(x: "torch.Tensor") -> "torch.Tensor":
    """NHWC memory layout for 4-D image batches (faster convolutions); view stacks stay as they are."""
    import torch

    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def prepare_device(device: "torch.device") -> None:
    """cudnn.benchmark on CUDA: fixed-size batches let cuDNN pick its fastest kernels once; the CPU is left as it is."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def cuda_problem() -> str | None:
    """Why no usable CUDA GPU is there (one clause naming torch's build), or None when there is one."""
    import torch

    build = f"torch {torch.__version__}" + (f" (built for CUDA {torch.version.cuda})" if torch.version.cuda else " (a CPU-only build)")
    if not torch.version.cuda:
        return f"{build} cannot use a GPU; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return (f"{build} sees no CUDA GPU; switch on the notebook's GPU accelerator, or check with nvidia-smi that the "
                f"NVIDIA driver supports CUDA {torch.version.cuda}")
    major, minor = torch.cuda.get_device_capability(0)
    arches = torch.cuda.get_arch_list()
    if arches and not _runs_on(arches, major, minor):
        return (f"{build} has no kernels for {torch.cuda.get_device_name(0)} (compute capability {major}.{minor}; it supports "
                f"{', '.join(arches)}); install a torch build for that GPU")
    return None


def _runs_on(arches: list[str], major: int, minor: int) -> bool:
    """Whether a build for `arches` runs on compute capability major.minor (a binary of sm_Xy runs on X.y and
    up within X; PTX compute_XY is compiled for any later GPU)."""
    for a in arches:
        kind, _, num = a.partition("_")
        digits = "".join(c for c in num if c.isdigit())
        if len(digits) < 2:
            continue
        m, n = int(digits[:-1]), int(digits[-1])
        if (kind == "sm" and m == major and n <= minor) or (kind == "compute" and (m, n) <= (major, minor)):
            return True
    return False


def pick_device(name: str) -> "torch.device":
    """The device `train.device` names: auto = a usable CUDA GPU, else the CPU; cuda without one is a StageError
    (one sentence: what to switch on or check, naming torch's version and CUDA build). Under torchrun each process
    gets its own GPU (LOCAL_RANK)."""
    import torch

    from lib.model import dist

    problem = cuda_problem() if name in ("cuda", "auto") else None
    if name == "cuda" and problem:
        raise StageError(f"train.device is cuda but {problem}, or set train.device=auto to run on the CPU.")
    if problem and torch.cuda.is_available() and problem not in _warned:  # a GPU is there but cannot run: say so once
        _warned.add(problem)
        log.warning("train.device=auto runs on the CPU: %s", problem)
    kind = ("cpu" if problem else "cuda") if name == "auto" else name
    if kind == "cuda" and dist.world_size() > 1:
        return torch.device(f"cuda:{dist.local_rank()}")  # one GPU per torchrun process
    return torch.device(kind)


def describe_device(device: "torch.device | str", requested: str | None = None) -> str:
    """One line on the device (a GPU's name, memory and compute capability; the CPU's threads) and, with
    `requested` (train.precision), the precision the policy picks there and why."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{device} {props.name} ({props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor})"
    else:
        what = f"{device} ({torch.get_num_threads()} threads)"
    if requested is None:
        return what
    name, reason = precision_policy(device, requested)
    return f"{what}, {name}: {reason}"
