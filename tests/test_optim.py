"""Parameter groups, the learning-rate schedule and the EMA of the trainer."""
import math

import pytest
import torch
from torch import nn

from lib.model.optim import Ema, lr_factor, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.classifier = nn.Linear(4, 2)

    def get_classifier(self):
        return self.classifier


def test_param_groups_split_head_backbone_and_decay():
    groups = {g["name"]: g for g in param_groups(Tiny(), lr=1.0, weight_decay=0.05, backbone_lr_mult=0.1)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["head"]["lr"] == 1.0 and groups["backbone"]["lr"] == pytest.approx(0.1)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.05
    assert [p.ndim for p in groups["backbone_no_decay"]["params"]] == [1, 1, 1]  # conv bias, bn weight, bn bias
    assert len(groups["head"]["params"]) == 1 and groups["head"]["params"][0].shape == (2, 4)


def test_lr_warmup_then_cosine_to_floor():
    f = [lr_factor(s, total=100, warmup=10, schedule="cosine", restart_steps=0, min_ratio=0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, 100, 10, "cosine", 0, 0.01) == pytest.approx(0.01)
    mid = lr_factor(55, 100, 10, "cosine", 0, 0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_warm_restarts_are_periodic():
    f = [lr_factor(s, total=100, warmup=0, schedule="cosine_restarts", restart_steps=20, min_ratio=0.0) for s in range(60)]
    assert f[0] == pytest.approx(1.0) and f[20] == pytest.approx(1.0) and f[40] == pytest.approx(1.0)
    assert f[19] < 0.01 and f[10] == pytest.approx(0.5)


def test_ema_follows_its_formula():
    model = Tiny()
    ema = Ema(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    w = "classifier.weight"
    assert torch.allclose(ema.state_dict()[w], 0.9 * before[w] + 0.1 * model.state_dict()[w])
    assert not any(p.requires_grad for p in ema.module.parameters())
