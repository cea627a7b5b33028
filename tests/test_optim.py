"""Parameter groups, the learning-rate schedule, the EMA of the trainer and its optimiser step (with an fp16 GradScaler)."""
import math

import pytest
import torch
from torch import nn

from lib.model.optim import Ema, lr_factor, optimizer_step, param_groups


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


def _old_ema_update(ema: Ema, model: nn.Module) -> None:
    """The EMA update before it became one fused _foreach_lerp_: a multiply and an add per tensor."""
    with torch.no_grad():
        for e, m in zip(ema.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(ema.decay).add_(m.detach(), alpha=1 - ema.decay)
            else:
                e.copy_(m)


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_fused_ema_matches_the_old_formula(decay):
    """Ten steps of the fused update give bitwise the per-tensor formula's EMA on the CPU, buffers included."""
    torch.manual_seed(0)
    model = Tiny()
    fused, old = Ema(model, decay), Ema(model, decay)
    for _ in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.bn(torch.randn(4, 4, 5, 5))  # moves the running statistics and num_batches_tracked
        fused.update(model)
        _old_ema_update(old, model)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, old.state_dict()[k]), k
    assert fused.state_dict()["bn.num_batches_tracked"] == 10


def test_fused_ema_survives_a_resume():
    """After load_state_dict (a resume) the fused update still moves the EMA's own tensors."""
    model = Tiny()
    ema = Ema(model, 0.5)
    ema.update(model)
    ema.load_state_dict({k: torch.zeros_like(v) for k, v in ema.state_dict().items()})
    ema.update(model)
    w = "classifier.weight"
    assert torch.allclose(ema.state_dict()[w], 0.5 * model.state_dict()[w])


def _grads(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(6, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt


def _loss(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (model(torch.randn(8, 6, generator=g)) ** 2).mean() * 50  # gradients large enough to clip


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_scaled_step_equals_the_plain_step(clip):
    """fp16's GradScaler on CPU: the loss scaled by 2^16, unscaled before clipping, steps exactly as the plain path."""
    a, opt_a = _grads()
    _loss(a).backward()
    optimizer_step(opt_a, a.parameters(), clip)
    b, opt_b = _grads()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(_loss(b)).backward()
    optimizer_step(opt_b, b.parameters(), clip, scaler)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # a power-of-two scale is undone exactly
        assert pb.grad is None  # gradients cleared for the next accumulation
    assert scaler.get_scale() == 2.0**16


def test_a_step_with_inf_gradients_is_skipped_and_the_scale_backs_off():
    model, opt = _grads()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(_loss(model)).backward()
    grad = next(model.parameters()).grad
    assert grad is not None
    grad[0, 0] = float("inf")
    optimizer_step(opt, model.parameters(), 1.0, scaler)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() == 512.0
    assert not opt.state  # AdamW never stepped: no moments were started
    state = scaler.state_dict()  # what last.pt keeps under fp16
    again = torch.amp.GradScaler("cpu")
    again.load_state_dict(state)
    assert again.get_scale() == 512.0 and again.state_dict() == state
