"""Inference: class probabilities and pooled embeddings of crops, with test-time augmentation (TTA).

One loop, `predict`, serves every caller: the trainer's validation (probabilities and
embeddings, the test-like view), 02 and 04 through `predict_folds_tta`, kNN embeddings (of a
fold model, or of a plain timm backbone: features only), the ablation's novelty scores and the
benchmarks. Views act on the normalised batch tensor already on the device, so each image is
decoded and resized once per loader pass however many views are asked for; the per-view
probabilities are then combined by their mean or their geometric mean. View names follow
lib.views; the default, [identity], is plain inference.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lib.model.device import autocast, channels_last, describe_device, precision_policy, prepare_device
from lib.model.head_base import HeadOutput
from lib.views import Op, check_view_names

Mode = Literal["prob", "log"]
log = logging.getLogger("pipeline")


# ----------------------------------------------------------------------------- views


def _warp(x: torch.Tensor, theta: list[list[float]], padding: str) -> torch.Tensor:
    """grid_sample of x under the 2x3 output->input map `theta` (normalised coordinates).

    Computed in float32/float64 (grid_sample needs a float grid of the input's dtype), then cast
    back so a view keeps the batch's dtype; align_corners=False maps pixel centres to pixel
    centres, so the identity map and quarter turns of square images are exact up to rounding.
    """
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    t = torch.tensor(theta, dtype=xf.dtype, device=x.device).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=False)
    y = F.grid_sample(xf, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    if not x.dtype.is_floating_point:
        y = y.round()
    return y.to(x.dtype)


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Counter-clockwise by `degrees` about the centre, in pixel units (no stretch on non-square
    images); corners borrow the border pixels rather than a black fill the model never saw."""
    h, w = x.shape[-2:]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return _warp(x, [[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], "border")


def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom about the centre keeping the size (> 1 in, < 1 out); zoom-out reflects the image into
    the margin, which keeps its texture where border padding would smear edge pixels."""
    return _warp(x, [[1.0 / factor, 0.0, 0.0], [0.0, 1.0 / factor, 0.0]], "reflection")


def _apply(op: Op, x: torch.Tensor) -> torch.Tensor:
    kind, value = op
    if kind == "hflip":
        return x.flip(-1)
    if kind == "vflip":
        return x.flip(-2)
    if kind == "rot90":
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"TTA quarter turns need square images, got {x.shape[-2]}x{x.shape[-1]}; drop rot90/rot180/rot270 from tta.views.")
        return torch.rot90(x, int(value), dims=(-2, -1))
    if kind == "rotate":
        return _rotate(x, value)
    if kind == "scale":
        return _scale(x, value)
    raise ValueError(f"Unknown TTA op '{kind}'; lib.views and lib.engine.inference disagree.")


@dataclass(frozen=True)
class View:
    """A named chain of transforms; `view(x)` maps a batch (N, C, H, W) to one of the same shape."""

    name: str
    ops: tuple[Op, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W), or (N, V, C, H, W) context views, each view transformed alike."""
        if x.dim() == 5:
            return self(x.flatten(0, 1)).reshape(x.shape)
        for op in self.ops:
            x = _apply(op, x)
        return x


def parse_views(names: Sequence[str]) -> list[View]:
    """Views from config names (`tta.views`); ValueError (one sentence listing the forms) for a bad one."""
    names = list(names)
    return [View(n.strip(), ops) for n, ops in zip(names, check_view_names(names))]


# ----------------------------------------------------------------------------- combining


def combine(per_view: Sequence[np.ndarray] | np.ndarray | torch.Tensor, mode: Mode = "prob") -> np.ndarray | torch.Tensor:
    """Combine per-view probabilities (V, ..., C) over V: "prob" their mean, "log" the geometric
    mean renormalised (softmax of the mean log-probability), which lets a view that is sure a
    class is wrong veto it. A tensor comes back as a tensor, anything else as float32 numpy."""
    if mode not in ("prob", "log"):
        raise ValueError(f"Unknown TTA mode '{mode}'; use prob or log.")
    if isinstance(per_view, torch.Tensor):
        return _combine(per_view.float(), mode)
    return _combine(torch.as_tensor(np.stack([np.asarray(v, dtype=np.float32) for v in per_view])), mode).numpy()


def _combine(p: torch.Tensor, mode: Mode) -> torch.Tensor:
    if p.shape[0] == 0:
        raise ValueError("No view probabilities to combine; list at least one TTA view.")
    if p.shape[0] == 1:
        out = p[0]
    elif mode == "prob":
        out = p.mean(0)
    else:
        out = p.clamp_min(torch.finfo(p.dtype).tiny).log().mean(0).softmax(-1)
    return out


# ----------------------------------------------------------------------------- inference

KEYS = ("probs", "embeddings", "head_probs", "view_probs")  # the order of `predict`'s arrays (then any `scores`)
Scores = Callable[[HeadOutput], dict[str, torch.Tensor]]


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, *, views: Sequence[View | str] = ("identity",),
            mode: Mode = "prob", probs: bool = True, features: bool = True, keep_views: bool = False,
            scores: Scores | None = None, precision: str = "auto", desc: str = "predict") -> dict[str, np.ndarray]:
    """Every view of every batch of `loader` through `model`, in one pass (images decoded once).

    Returns float32 arrays per item: `probs` (N, C) combined over views by `mode`; `embeddings`
    (N, D) with `features`: the pooled features averaged over the views (so a kNN or an
    ensemble downstream sees the same TTA as the probabilities); `head_probs` (N, H, C) when the
    head has several heads (multi): each head's softmax combined over views like `probs`;
    `view_probs` (V, N, C) with `keep_views`, to judge what each view adds for its cost; with
    `scores`, each array it computes from a view's head output (e.g. an energy), averaged over
    the views. With `probs=False` only the embeddings are computed, and `model` may then be a
    plain timm model without a head (its pre-logits features, as knn_baseline's backbone).
    `precision` is a train.precision value (auto, bf16, fp16, fp32), resolved by the one policy
    of lib.model.device, so prediction runs as training did on this device.

    Batches of whole frames (a loader made with frame ids: items (x, label, weight, frame, row))
    reach the model with their frame ids, and the arrays come back in row order.
    """
    parsed = [v if isinstance(v, View) else parse_views([v])[0] for v in views]
    if not parsed:
        raise ValueError("No TTA view is listed; list at least one (e.g. [identity]).")
    amp = precision_policy(device, precision)[0]
    prepare_device(device)
    model.eval()
    head: Any = model.head_module if probs else None  # a lib.model.heads.Head
    parts: dict[str, list[torch.Tensor]] = {}
    rows: list[torch.Tensor] = []
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch"):
        x = batch[0].to(device, non_blocking=True)
        frames = batch[3].to(device) if len(batch) > 3 else None
        if len(batch) > 4:
            rows.append(batch[4])
        per_view: dict[str, list[torch.Tensor]] = {}
        for view in parsed:
            for k, v in _one_view(model, head, channels_last(view(x)), device, amp, features, scores, frames).items():
                per_view.setdefault(k, []).append(v)
        for k, v in _combine_views(per_view, mode, keep_views).items():
            parts.setdefault(k, []).append(v)
    wanted = {"probs": probs, "embeddings": features, "view_probs": probs and keep_views}
    back = torch.argsort(torch.cat(rows)).numpy() if rows else None  # frame batches: back to the loader's row order
    result: dict[str, np.ndarray] = {}
    for k in (*KEYS, *(k for k in parts if k not in KEYS)):
        if k in parts:
            a = _cat(parts[k], 1 if k == "view_probs" else 0)
            result[k] = a if back is None else (a[:, back] if k == "view_probs" else a[back])
        elif wanted.get(k):  # an empty loader
            result[k] = np.zeros((len(parsed), 0, 0) if k == "view_probs" else (0, 0), dtype=np.float32)
    return result


def _features(model: Any, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled features: a `Net`'s (fused over context views, then over its frame with frame attention), or a plain timm
    model's pre-logits."""
    if hasattr(model, "features"):
        return model.features(x) if frames is None else model.features(x, frames)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _one_view(model: Any, head: Any, x: torch.Tensor, device: torch.device, precision: str, features: bool,
              scores: Scores | None, frames: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One forward pass of one view of a batch (autocast to `precision`): float32 probs, embeddings, head_probs (B, H, C), scores."""
    with autocast(device, precision):
        f = _features(model, x, frames)
        out = head(f) if head is not None else None
        p = head.probs(out) if out is not None else None
    got = {"probs": p.float()} if p is not None else {}
    if features:
        got["embeddings"] = f.float()
    if out is not None and out.heads is not None:
        hp = head.head_probs(out) if hasattr(head, "head_probs") else out.heads.float().softmax(-1)
        got["head_probs"] = hp.float().transpose(0, 1)  # (B, H, C)
    if out is not None and scores is not None:
        got.update({k: v.float() for k, v in scores(out).items()})
    return got


def _combine_views(per_view: dict[str, list[torch.Tensor]], mode: Mode, keep_views: bool) -> dict[str, torch.Tensor]:
    """One batch's arrays over its views, on the CPU: probabilities by `mode`, embeddings and scores by their mean."""
    got = {}
    for k, v in per_view.items():
        stacked = torch.stack(v)
        got[k] = _combine(stacked.float(), mode).cpu() if k in ("probs", "head_probs") else stacked.mean(0).cpu()
        if k == "probs" and keep_views:
            got["view_probs"] = stacked.cpu()
    return got


def _cat(parts: list[torch.Tensor], dim: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(parts, dim).numpy().astype(np.float32, copy=False)


DECODED_CAP_BYTES = 2 << 30  # fold models share one decoded copy of the inputs up to this size (the test ROIs: ~0.5 GB at 224 px)


def predict_folds_tta(fold_dirs: Sequence, inputs: Sequence, cfg, taxonomy, device: torch.device,
                      features: bool = True, frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every fold model on the same inputs with `cfg.tta`: arrays stacked over models.

    `probs` (M, N, C); `embeddings` (M, N, D) with `features`; `head_probs` (M, N, H, C) for
    multi heads. 02 and 04 share it so both see the same TTA. The crops are decoded and resized
    once for all fold models (they share the eval transform) when the batches fit in
    `DECODED_CAP_BYTES`; otherwise each model streams them from its own loader. `frames` (one
    frame id per input, lib.data.context.frame_ids) batch whole frames when `cfg.model.frame_context`
    is attention, and are ignored otherwise.
    """
    from lib.data.budget import plan_here
    from lib.data.dataset import make_loader
    from lib.model.checkpoint import load_fold_model
    from lib.model.net import mean_std

    views = parse_views(cfg.tta.views)
    grouped = cfg.model.frame_context == "attention"
    if grouped and frames is None:
        raise ValueError("model.frame_context=attention predicts whole frames; give predict_folds_tta the inputs' frame ids.")
    log.info("predicting with %d fold model(s) on %s", len(fold_dirs), describe_device(device, cfg.train.precision))
    inputs = list(inputs)
    n_views = len(inputs[0]) if inputs and isinstance(inputs[0], (tuple, list)) else 1
    fits = len(fold_dirs) > 1 and len(inputs) * n_views * 3 * cfg.model.input_size ** 2 * 4 <= DECODED_CAP_BYTES
    decoded: tuple[tuple, list] | None = None  # ((mean, std), the loader's batches) once decoded
    loader = plan_here(cfg, on_cpu=device.type != "cuda", testlike=False).get("predict")
    out: dict[str, list[np.ndarray]] = {}
    for d in fold_dirs:
        model = load_fold_model(d, cfg, taxonomy, device)
        mean, std = mean_std(model)
        if decoded is not None and decoded[0] == (tuple(mean), tuple(std)):
            batches: Iterable[Any] = decoded[1]
        else:
            batches = make_loader(inputs, img_size=cfg.model.input_size, mean=mean, std=std, batch_size=loader.batch,
                                  num_workers=loader.workers, prefetch=loader.prefetch, device=device, frames=frames if grouped else None)
            if fits:
                batches = list(batches)
                decoded = ((tuple(mean), tuple(std)), batches)
        for k, v in predict(model, batches, device, views=views, mode=cfg.tta.mode, features=features, precision=cfg.train.precision,
                            desc=f"predict {d.name}").items():
            out.setdefault(k, []).append(v)
    if not out:
        return {"probs": np.zeros((0, len(inputs), taxonomy.n_classes), dtype=np.float32)}
    return {k: np.stack(v) for k, v in out.items()}
