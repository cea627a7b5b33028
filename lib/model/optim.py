"""Optimiser parts of the trainer: parameter groups, the learning-rate schedule, an EMA of the weights."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def head_module(model: nn.Module) -> nn.Module | None:
    """The classifier on top of the backbone (timm's get_classifier, or a `head` attribute)."""
    head = getattr(model, "head_module", None)
    if isinstance(head, nn.Module):
        return head
    get = getattr(model, "get_classifier", None)
    return get() if callable(get) else None


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
    """AdamW groups: the pretrained backbone at a fraction of the head's rate; no decay on biases and norms.

    A freshly initialised head needs a larger step than pretrained features, which a large step
    would wreck; decaying biases and normalisation scales only hurts (they set offsets, not capacity).
    """
    head = head_module(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    fusion = getattr(model, "fusion", None)  # context fusion is new too: it learns at the head's rate
    if isinstance(fusion, nn.Module):
        head_ids |= {id(p) for p in fusion.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in head_ids, p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        base = lr if is_head else lr * backbone_lr_mult
        out.append({"params": params, "lr": base, "base_lr": base, "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": f"{'head' if is_head else 'backbone'}{'_no_decay' if no_decay else ''}"})
    return out


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


class Ema:
    """Exponential moving average of the weights (buffers copied), evaluated instead of the raw model when on."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(m.detach(), alpha=1 - self.decay)
            else:
                e.copy_(m)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
