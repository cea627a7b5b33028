"""A config's training memory and step time on a GPU, estimated on the CPU before an hour of GPU time is spent.

A ViT-L over four views either fits a 16 GB T4 at its micro-batch or dies at the first step with
CUDA out of memory; this says which in a second, on a machine without a GPU. The config's Net is
built on the meta device (shapes and dtypes, no weights, no download) and:
- parameters: every backbone, the fusion and the head;
- static memory: params x (fp32 weights 4 + grads 4 + AdamW's two moments 8) bytes, + 4 per param
  for the EMA copy when train.ema_decay > 0; under bf16/fp16 autocast also keeps a half copy of
  each weight it casts (2 bytes per param), saved for the backward pass;
- activations per ROI: one training-mode forward of 2 ROIs (a BatchNorm needs 2 rows) shaped as the
  loader gives them, with `torch.autograd.graph.saved_tensors_hooks` recording every tensor saved for
  backward; counted once per storage (views of one tensor share it) and without the parameters;
  attention runs as the GPU's fused kernel saves it (q, k, v, output, log-sum-exp; not the meta path's T x T matrix).
  Autocast does not run on meta tensors, so the float32 bytes are halved for bf16/fp16: ops that
  autocast keeps in float32 (LayerNorm, softmax, a ViT's residual stream) are then under-counted.
  Storages are told apart by their storage object (every data_ptr is 0 on meta): two tensors that
  share memory on a GPU without being views of one storage (an in-place op's result) count twice, an
  over-count. With train.grad_checkpointing the backbone's blocks run under timm's checkpoint: the
  hook no longer sees what they save (torch's own hooks take it), so each checkpointed block's inputs
  are added, and the largest block's own saved tensors, recomputed in the backward pass;
- the peak: static + half weights + activations x micro-batch (train.batch_size / processes), plus
  10% for the allocator's fragmentation and 0.5 GiB for the CUDA context (both assumptions);
- step FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the same forward (matmuls, convolutions,
  attention; elementwise ops are not counted); a training step is taken as 3 forwards (backward =
  2 x forward), 4 with checkpointing (the blocks' forward again). Time = FLOPs / (the GPU's
  published dense peak x an assumed utilisation): a planning figure, not a measurement
  (benchmarks/bench_gpu.py measures the step).
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator
from unittest import mock

from lib.config import Config, project_path

GiB = 2**30
GB = 10**9
CUDA_CONTEXT = 0.5 * GiB  # what the CUDA context and cuDNN/cuBLAS workspaces take before the first tensor (assumed)
FRAGMENTATION = 0.10  # the caching allocator's blocks never fully packed (assumed)
UTILISATION = 0.35  # share of the dense peak a training step reaches (an assumption, not a measurement: ViTs at large
# batch reach more, small CNN batches less; bench_gpu.py measures the real figure)
ADAMW_BYTES = 4 + 4 + 8  # fp32 weights, their gradients, AdamW's exp_avg and exp_avg_sq
EMA_BYTES = 4
HALF_WEIGHT_BYTES = 2  # autocast's half copy of each weight it casts, kept for backward


@dataclass(frozen=True)
class Gpu:
    """A GPU's memory (the datasheet's GB, 10^9 bytes) and dense tensor-core peaks in TFLOPS."""

    name: str
    memory_gb: tuple[float, ...]  # its memory variants
    half_tflops: float  # fp16/bf16 dense, the precision `auto` picks on it
    half: str  # which half precision `auto` picks there
    fp32_tflops: float


# Published peaks, from the vendors' datasheets: NVIDIA T4 Tensor Core GPU datasheet (65 TFLOPS fp16 mixed precision,
# 8.1 fp32); Tesla P100 PCIe datasheet (18.7 fp16, 9.3 fp32); A100 Tensor Core GPU datasheet (312 bf16 dense, 19.5 fp32);
# H100 Tensor Core GPU datasheet, SXM (989 bf16 dense, 67 fp32); L4 Tensor Core GPU datasheet (121 fp16/bf16 dense,
# 30.3 fp32).
GPUS = {
    "T4": Gpu("T4", (16,), 65.0, "fp16", 8.1),
    "P100": Gpu("P100", (16,), 18.7, "fp16", 9.3),
    "A100": Gpu("A100", (40, 80), 312.0, "bf16", 19.5),
    "H100": Gpu("H100 SXM", (80,), 989.0, "bf16", 67.0),
    "L4": Gpu("L4", (24,), 121.0, "bf16", 30.3),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """What one training process of a config needs (bytes), and the FLOPs of its step per ROI."""

    params: int
    static_bytes: int  # weights, grads, AdamW moments, EMA
    half_weight_bytes: int  # autocast's half copies (0 at fp32)
    act_per_roi: int  # bytes saved for backward per ROI (all its views), at the estimate's precision
    micro_batch: int  # ROIs per process and micro-batch: train.batch_size / processes
    half: bool  # bf16/fp16 autocast assumed (train.precision auto, bf16, fp16)
    checkpointing: bool
    fwd_flops_per_roi: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def train_flops_per_roi(self) -> float:
        """Forward + backward (2 x forward) + the checkpointed blocks' forward again."""
        return self.fwd_flops_per_roi * (4 if self.checkpointing else 3)

    def peak_bytes(self, micro_batch: int | None = None) -> float:
        """The peak one process reaches at `micro_batch` ROIs (default the config's), allowances included."""
        rows = self.micro_batch if micro_batch is None else micro_batch
        return (self.static_bytes + self.half_weight_bytes + self.act_per_roi * rows) * (1 + FRAGMENTATION) + CUDA_CONTEXT

    def largest_micro_batch(self, memory_bytes: float) -> int:
        """The most ROIs per micro-batch whose estimated peak fits `memory_bytes` (0: not even one)."""
        if self.act_per_roi <= 0:
            return 10**6
        room = (memory_bytes - CUDA_CONTEXT) / (1 + FRAGMENTATION) - self.static_bytes - self.half_weight_bytes
        most = max(0, int(room // self.act_per_roi))
        return most + 1 if self.peak_bytes(most + 1) <= memory_bytes else most  # the division's rounding

    def step_seconds(self, gpu: Gpu, rows: int, train: bool = True, utilisation: float = UTILISATION) -> float:
        """Seconds for `rows` ROIs on `gpu` (a training step, or an eval forward) at its dense peak x `utilisation`."""
        flops = self.train_flops_per_roi if train else self.fwd_flops_per_roi
        tflops = gpu.half_tflops if self.half else gpu.fp32_tflops
        return flops * rows / (tflops * 1e12 * utilisation)


class _Saved:
    """Bytes of the tensors saved for backward, once per storage, parameters left out; float32 and other dtypes apart."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.storages: dict[int, tuple[int, bool]] = {}
        self.keep: list[Any] = []  # holds the tensors so no storage address is reused while counting

    def pack(self, t: Any) -> Any:
        import torch

        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.exclude:
            self.storages[key] = (storage.nbytes(), t.dtype == torch.float32)
            self.keep.append(t)
        return t

    def add(self, other: "_Saved") -> None:
        self.storages.update(other.storages)
        self.keep.extend(other.keep)

    def bytes(self, half: bool) -> float:
        """Their bytes, float32 ones halved when autocast would have made them bf16/fp16."""
        return sum(n * (0.5 if half and f32 else 1.0) for n, f32 in self.storages.values())


@contextlib.contextmanager
def _counting(saved: _Saved) -> Iterator[None]:
    import torch

    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        yield


@contextlib.contextmanager
def _watch_checkpoints(exclude: set[int], inputs: _Saved, largest: list[_Saved]) -> Iterator[None]:
    """While active, each torch.utils.checkpoint.checkpoint call (timm's blocks) records its tensor inputs, which the
    checkpoint keeps, into `inputs`, and runs the block once more under a fresh count to find the largest block's saved
    tensors (`largest[0]`), which the backward pass recomputes one block at a time. The real checkpoint still runs."""
    import torch.utils.checkpoint as ckpt

    original = ckpt.checkpoint

    def watched(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        for a in args:
            if hasattr(a, "untyped_storage"):
                inputs.pack(a)
        block = _Saved(exclude)
        with _counting(block):
            function(*args, **{k: v for k, v in kwargs.items() if k not in ("use_reentrant", "preserve_rng_state")})
        if not largest or block.bytes(False) > largest[0].bytes(False):
            largest[:] = [block]
        return original(function, *args, **kwargs)

    with mock.patch.object(ckpt, "checkpoint", watched):
        yield


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """On meta tensors scaled_dot_product_attention takes the math path, which saves the (T x T) attention matrix; a GPU
    runs a fused kernel (flash or memory-efficient) that saves q, k, v, the output and the log-sum-exp. While active,
    calls without a mask run the memory-efficient kernel's op, whose meta implementation saves what the GPU's does."""
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def fused(q: Any, k: Any, v: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: float | None = None, **kwargs: Any) -> Any:
        if attn_mask is not None or kwargs:
            return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, dropout_p, is_causal, scale=scale)[0]

    with mock.patch.object(F, "scaled_dot_product_attention", fused):
        yield


def loader_batch(cfg: Config, rows: int) -> Any:
    """Meta tensors shaped as the loader gives them (lib.doctor.timing.batch_shape)."""
    import torch

    from lib.doctor.timing import batch_shape

    return torch.empty(batch_shape(cfg, rows), device="meta")


def saved_bytes_per_roi(net: Any, x: Any, half: bool, checkpointing: bool) -> float:
    """Bytes saved for backward per ROI by one training forward of `x` (meta) through `net` (meta, training mode)."""
    import torch

    exclude = {p.untyped_storage()._cdata for p in net.parameters()}
    outer, inputs, largest = _Saved(exclude), _Saved(exclude), list[_Saved]()
    net.train()
    watch = _watch_checkpoints(exclude, inputs, largest) if checkpointing else contextlib.nullcontext()
    with torch.enable_grad(), _fused_attention(), watch:
        with _counting(outer):
            out = net(x, full=True)
    outer.add(inputs)
    total = outer.bytes(half) + (largest[0].bytes(half) if largest else 0.0)
    del out
    return total / len(x)


def forward_flops_per_roi(net: Any, x: Any) -> float:
    """FLOPs of one training-mode forward of `x` per ROI (torch's FlopCounterMode: matmuls, convolutions, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net.train()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, full=True)
    return float(counter.get_total_flops()) / len(x)


def meta_taxonomy(cfg: Config) -> Any:
    """The config's taxonomy (the head's size), else the repository's FathomNet 2025 table (79 concepts)."""
    from lib.core.paths import ROOT
    from lib.data.taxonomy import load_taxonomy_csv

    path = project_path(cfg.data.taxonomy_csv)
    return load_taxonomy_csv(path if path.is_file() else ROOT / "configs" / "taxonomy" / "fathomnet2025.csv")


def meta_net(cfg: Config, taxonomy: Any) -> Any:
    """The config's Net on the meta device: every shape, no weights, nothing downloaded; checkpointing as training sets it."""
    import torch

    from lib.model.net import build_net, set_grad_checkpointing

    plain = replace(cfg, model=replace(cfg.model, pretrained="none",
                                       view_backbones=[replace(v, pretrained="none") for v in cfg.model.view_backbones]))
    with torch.device("meta"):
        net = build_net(plain, taxonomy, pretrained=False)
    if cfg.train.grad_checkpointing:
        set_grad_checkpointing(net, cfg.model.backbone)
    return net


def estimate(cfg: Config, taxonomy: Any | None = None, processes: int = 1) -> MemoryEstimate:
    """The memory and FLOPs estimate of `cfg`'s training on one of `processes` (torchrun) GPUs. Raises StageError for a
    backbone timm does not know (the doctor and the stages say that elsewhere)."""
    t = cfg.train
    net = meta_net(cfg, taxonomy if taxonomy is not None else meta_taxonomy(cfg))
    params = sum(p.numel() for p in net.parameters())
    half = t.precision != "fp32"
    static = params * (ADAMW_BYTES + (EMA_BYTES if t.ema_decay > 0 else 0))
    x = loader_batch(cfg, 2)
    act = saved_bytes_per_roi(net, x, half, t.grad_checkpointing)
    flops = forward_flops_per_roi(net, x)
    notes = ["activations: float32 saved tensors halved for bf16/fp16 (autocast does not run on meta tensors)"] if half else []
    return MemoryEstimate(params, static, params * HALF_WEIGHT_BYTES if half else 0, math.ceil(act),
                          max(1, t.batch_size // max(1, processes)), half, t.grad_checkpointing, flops, tuple(notes))


def fit_text(est: MemoryEstimate, memory_bytes: float) -> str:
    """`fits (71%)` or `does NOT fit`, with the largest micro-batch that would."""
    peak, most = est.peak_bytes(), est.largest_micro_batch(memory_bytes)
    verdict = f"fits ({100 * peak / memory_bytes:.0f}%)" if peak <= memory_bytes else "does NOT fit"
    return f"{verdict}, largest micro-batch {most}" if most < 10**6 else verdict


def fix_text(cfg: Config, est: MemoryEstimate, memory_bytes: float) -> str:
    """The one sentence of what to change when the estimate does not fit `memory_bytes`."""
    t, most = cfg.train, est.largest_micro_batch(memory_bytes)
    ckpt = "" if t.grad_checkpointing else ", or set train.grad_checkpointing: true"
    if most < 1:
        return (f"not even one ROI per micro-batch fits{'' if t.grad_checkpointing else ' without checkpointing'}: set "
                f"train.grad_checkpointing: true, or pick a smaller model.backbone or model.img_size" if ckpt else
                "not even one ROI per micro-batch fits: pick a smaller model.backbone or model.img_size")
    fits = max(d for d in range(1, most + 1) if t.batch_size % d == 0)  # keeps batch_size x accumulate whole
    return (f"lower train.batch_size to {fits} and raise train.accumulate to {t.accumulate * t.batch_size // fits} "
            f"(the same effective batch){ckpt}")


def summary(cfg: Config, est: MemoryEstimate) -> str:
    """The doctor's memory line: parameters, static, activations per ROI, the peak at the config's micro-batch."""
    prec = "bf16/fp16" if est.half else "fp32"
    ckpt = ", checkpointed" if est.checkpointing else ""
    half = f" + {est.half_weight_bytes / GiB:.2f} GiB half weights" if est.half_weight_bytes else ""
    return (f"{est.params / 1e6:.1f} M parameters; static {est.static_bytes / GiB:.2f} GiB (weights, grads, AdamW"
            f"{', EMA' if cfg.train.ema_decay > 0 else ''}){half}; activations {est.act_per_roi / GiB:.3f} GiB per ROI "
            f"({prec}{ckpt}); peak ~{est.peak_bytes() / GiB:.1f} GiB at micro-batch {est.micro_batch} "
            f"(x accumulate {cfg.train.accumulate}; +10% fragmentation, +0.5 GiB CUDA context, both assumed)")


def gpu_lines(cfg: Config, est: MemoryEstimate, names: tuple[str, ...] = ("T4", "A100"),
              memory: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """Lines against named GPUs: the memory fit of each variant (`memory`: the bytes of the one here instead), and the
    stages' time from the FLOPs (lib.doctor.timing's arithmetic over a step timed at the GPU's peak x UTILISATION)."""
    from lib.doctor.timing import StepTimes, data_counts, hours, stage_seconds

    t, counts = cfg.train, data_counts(cfg)
    rows = round(counts.train * (1 - 1 / cfg.prepare.n_folds))
    lines = []
    for name in names:
        gpu = GPUS[name]
        sizes = {f"{gb} GB": gb * GB for gb in gpu.memory_gb} if memory is None else memory
        fits = "; ".join(f"{label} {fit_text(est, b)}" for label, b in sizes.items())
        prec = gpu.half if est.half else "fp32"
        steps = StepTimes(name, prec, est.step_seconds(gpu, t.batch_size), est.step_seconds(gpu, t.eval_batch_size, False),
                          0.0, 0.0, 1)
        stages = stage_seconds(cfg, steps, counts)
        lines.append((f"memory on {name}", f"{fits} (estimated)"))
        lines.append((f"time on {name}", f"an epoch of {rows:,} rows ~{hours(est.step_seconds(gpu, rows))}, 01_train "
                                         f"~{hours(stages['01_train'])}, all stages ~{hours(sum(stages.values()))}: "
                                         f"{est.train_flops_per_roi / 1e9:.0f} GFLOPs per training ROI at "
                                         f"{gpu.half_tflops if est.half else gpu.fp32_tflops:g} TFLOPS {prec} x {UTILISATION} "
                                         f"utilisation (assumed; the loader and early stopping not counted)"))
    return lines


def gpu_of(name: str) -> Gpu | None:
    """The table's entry for a device name torch reports ("Tesla T4", "NVIDIA A100-SXM4-80GB"), None if not tabled."""
    words = re.split(r"[\s_-]+", name.upper())
    return next((g for key, g in GPUS.items() if key in words), None)
