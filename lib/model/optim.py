"""Optimiser parts of the trainer: parameter groups, the learning-rate schedule, an EMA of the weights."""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
from timm.models import group_parameters
from torch import nn

from lib.core.errors import StageError


def head_module(model: nn.Module) -> nn.Module | None:
    """The classifier on top of the backbone (timm's get_classifier, or a `head` attribute)."""
    head = getattr(model, "head_module", None)
    if isinstance(head, nn.Module):
        return head
    get = getattr(model, "get_classifier", None)
    return get() if callable(get) else None


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float, layer_decay: float = 1.0,
                 backbone_name: str = "") -> list[dict]:
    """AdamW groups: the pretrained backbone at a fraction of the head's rate; no decay on biases and norms;
    with `layer_decay` < 1 each backbone layer at a further decay ** (its depth below the top) (`layer_scales`).

    A freshly initialised head needs a larger step than pretrained features, which a large step
    would wreck; decaying biases and normalisation scales only hurts (they set offsets, not capacity).
    Layer decay carries that further inside the backbone: early layers hold the most general features.
    A Net's view backbones (model.view_backbones) are backbones too: each at its own `lr_mult`
    (Net.view_lr_mults; None = `backbone_lr_mult`), layer-decayed by its own layer groups.
    """
    head = head_module(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    for name in ("fusion", "frame_attention", "view_proj"):  # fusion, frame attention, projections are new: the head's rate
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            head_ids |= {id(p) for p in part.parameters()}
    backbones = [(getattr(model, "backbone", model), backbone_lr_mult, backbone_name)]
    names = getattr(model, "view_backbone_names", [])
    for i, (vb, mult) in enumerate(zip(getattr(model, "view_backbones", []), getattr(model, "view_lr_mults", []))):
        backbones.append((vb, backbone_lr_mult if mult is None else mult, names[i] if i < len(names) else ""))
    rate: dict[int, tuple[int, int, float]] = {}  # id(p) -> (stream, layer or -1, lr multiplier)
    for stream, (module, mult, name) in enumerate(backbones):
        scales = layer_scales(module, layer_decay, name) if layer_decay < 1.0 else {}
        top = max(scales.values(), default=(-1, 1.0))  # a parameter outside the groups learns as the top layer
        for p in module.parameters():
            layer, scale = scales.get(id(p), top)
            rate.setdefault(id(p), (stream, layer, mult * scale))
    groups: dict[tuple[bool, int, int, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_head = id(p) in head_ids
        stream, layer, _ = (-1, -1, 1.0) if is_head else rate.get(id(p), (0, -1, backbone_lr_mult))
        groups.setdefault((is_head, stream, layer, p.ndim <= 1), []).append(p)
    out = []
    for (is_head, stream, layer, no_decay), params in sorted(groups.items()):
        base = lr if is_head else lr * rate.get(id(params[0]), (0, -1, backbone_lr_mult))[2]
        part = "head" if is_head else ("backbone" if stream == 0 else f"view_backbone{stream - 1}")
        out.append({"params": params, "lr": base, "base_lr": base, "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": f"{part}{f'_layer{layer}' if layer >= 0 else ''}{'_no_decay' if no_decay else ''}"})
    return out


def layer_scales(backbone: nn.Module, decay: float, name: str = "") -> dict[int, tuple[int, float]]:
    """id(parameter) -> (layer, decay ** (top layer - layer)) by timm's own layer grouping (the backbone's `group_matcher`,
    as timm.optim.param_groups_layer_decay reads it): the stem deepest, the last block (and final norm) at 1.

    timm falls back to cutting the parameter list into chunks of 12 for a model without a group_matcher;
    such chunks are not layers, so a backbone without one is refused instead.
    """
    matcher = getattr(backbone, "group_matcher", None)
    label = f"'{name}'" if name else type(backbone).__name__
    if not callable(matcher):
        raise StageError(f"The backbone {label} has no layer groups (timm's group_matcher), so train.layer_decay cannot apply; "
                         f"set train.layer_decay: 1.0 or pick a backbone that has them (ViT, ConvNeXt, EfficientNet, EVA).")
    layer_of = group_parameters(backbone, matcher(coarse=False), reverse=True)
    top = max(layer_of.values(), default=0)
    if top == 0:
        raise StageError(f"The backbone {label} puts all its parameters in one layer group, so train.layer_decay has no effect; "
                         f"set train.layer_decay: 1.0.")
    return {id(p): (layer_of.get(n, top), decay ** (top - layer_of.get(n, top))) for n, p in backbone.named_parameters()}


def build_optimizer(model: nn.Module, train: Any, backbone_name: str = "") -> torch.optim.AdamW:
    """The trainer's AdamW over `param_groups` with `train` (a TrainCfg): lr, weight decay, backbone_lr_mult, layer_decay."""
    return torch.optim.AdamW(param_groups(model, train.lr, train.weight_decay, train.backbone_lr_mult, train.layer_decay, backbone_name))


def lr_factor(step: int, total: int, warmup: int, schedule: str, restart_steps: int, min_ratio: float) -> float:
    """Multiplier of each group's base rate: linear warmup, then cosine (once, or with warm restarts every `restart_steps`)."""
    if step < warmup:
        return (step + 1) / warmup
    t = step - warmup
    if schedule == "cosine_restarts":
        period = max(1, restart_steps)
        frac = (t % period) / period
    else:
        frac = min(1.0, t / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def optimizer_step(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], clip_grad: float,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Clip and step, then clear the gradients. With an fp16 GradScaler the gradients are unscaled before
    clipping (the clip must see their true norm) and a step whose gradients hold inf or NaN is skipped
    (the scaler then halves its scale); without one this is the plain clip and step."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Ema:
    """Exponential moving average of the weights (buffers copied), evaluated instead of the raw model when on.

    One update is a fused multiply and a fused add over all floating tensors at once (`torch._foreach_mul_`,
    `torch._foreach_add_`: e = decay e + (1 - decay) m), not a multiply and an add per tensor: hundreds of
    small kernels (and Python calls) per step become a few. A single `_foreach_lerp_` would round
    differently; these two keep the EMA bitwise what the per-tensor formula gave.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs: tuple[int, list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def _tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The EMA's and the model's floating tensors, and the other (integer) pairs; built once per model."""
        if self._pairs is None or self._pairs[0] != id(model):
            ema_f, model_f, other = [], [], []
            for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
                if e.dtype.is_floating_point:
                    ema_f.append(e)
                    model_f.append(m.detach())
                else:
                    other.append((e, m))
            self._pairs = (id(model), ema_f, model_f, other)
        return self._pairs[1], self._pairs[2], self._pairs[3]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_f, model_f, other = self._tensors(model)
        if ema_f:
            torch._foreach_mul_(ema_f, self.decay)
            torch._foreach_add_(ema_f, model_f, alpha=1 - self.decay)
        for e, m in other:
            e.copy_(m)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
