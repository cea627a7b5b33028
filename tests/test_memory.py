"""lib.doctor.memory: the training's memory and FLOPs from the config's Net on the meta device, against hand formulas."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lib.config import load_config
from lib.doctor import memory as M
from lib.doctor.__main__ import Report, check_memory
from lib.model.net import build_net

SMALL = ["model.pretrained=none", "model.img_size=64", "train.precision=fp32", "train.ema_decay=0"]


def cfg_of(*overrides: str):
    return load_config("configs/demo.yaml", [*SMALL, *overrides])


def test_parameter_count_is_the_real_models():
    """Every backbone (a view backbone too), the cross-attention fusion and the head, counted on meta as built for real."""
    for extra in (["model.backbone=test_vit", "model.context=[1,3]", "model.fusion=cross_attention"],
                  ["model.backbone=test_efficientnet", "model.context=[1,full]", "model.fusion=entropy_gate",
                   'model.view_backbones=[{"views": ["full"], "backbone": "test_vit", "img_size": 96}]']):
        cfg = cfg_of(*extra)
        tax = M.meta_taxonomy(cfg)
        real = build_net(cfg, tax, pretrained=False)
        assert M.estimate(cfg, tax).params == sum(p.numel() for p in real.parameters())


def test_static_bytes_and_peak_follow_the_stated_formula():
    """1,000 params with EMA: 4 + 4 + 8 + 4 = 20 bytes each; half: + 2 bytes each; peak = (static + half + act x rows)
    x 1.1 + 0.5 GiB."""
    cfg = cfg_of("model.backbone=test_vit", "train.ema_decay=0.999", "train.precision=bf16", "train.batch_size=4")
    est = M.estimate(cfg)
    assert est.static_bytes == est.params * 20 and est.half_weight_bytes == est.params * 2 and est.micro_batch == 4
    hand = M.MemoryEstimate(1000, 20_000, 2_000, 500, 8, True, False, 1e9)
    assert hand.peak_bytes() == pytest.approx((20_000 + 2_000 + 500 * 8) * 1.1 + 0.5 * 2**30)
    assert hand.peak_bytes(2) == pytest.approx((20_000 + 2_000 + 500 * 2) * 1.1 + 0.5 * 2**30)
    room = hand.peak_bytes(7)  # exactly 7 ROIs fit in their own peak
    assert hand.largest_micro_batch(room) == 7 and hand.largest_micro_batch(room - 1) == 6
    assert M.estimate(cfg, processes=2).micro_batch == 2  # torchrun: train.batch_size is split over the processes


def test_checkpointing_lowers_the_saved_bytes_the_hook_sees():
    """timm's checkpointing keeps the blocks' inputs only: the hook sees fewer saved bytes, on a bare ViT and through the
    estimate (which adds the inputs and one block's recompute back)."""
    with torch.device("meta"):
        vit = __import__("timm").create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    x = torch.empty(2, 3, 224, 224, device="meta")

    def seen(checkpointing: bool) -> float:
        vit.set_grad_checkpointing(checkpointing)
        saved = M._Saved({p.untyped_storage()._cdata for p in vit.parameters()})
        with M._counting(saved):
            vit(x)
        return saved.bytes(False)

    plain, ckpt = seen(False), seen(True)
    assert ckpt < plain / 5
    on = M.estimate(cfg_of("model.backbone=test_vit", "train.grad_checkpointing=true"))
    off = M.estimate(cfg_of("model.backbone=test_vit", "train.grad_checkpointing=false"))
    assert on.act_per_roi < off.act_per_roi and on.params == off.params
    assert on.train_flops_per_roi == pytest.approx(off.train_flops_per_roi * 4 / 3)


def test_activations_grow_linearly_with_the_views_and_halve_at_half_precision():
    act = {v: M.estimate(cfg_of("model.backbone=test_vit", f"model.context=[{','.join(['1', '3', '5', 'full'][:v])}]",
                                "model.fusion=concat")).act_per_roi for v in (1, 2, 4)}
    assert act[2] == pytest.approx(2 * act[1], rel=0.02) and act[4] == pytest.approx(4 * act[1], rel=0.02)
    half = M.estimate(cfg_of("model.backbone=test_vit", "train.precision=bf16")).act_per_roi
    assert half == pytest.approx(act[1] / 2, rel=0.02)


class _Wrap(nn.Module):
    """A layer called as the Net is (`net(x, full=True)`)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, full: bool = False) -> torch.Tensor:
        return self.layer(x)


def test_flops_of_a_linear_and_a_convolution_match_the_hand_formula():
    with torch.device("meta"):
        linear, conv = _Wrap(nn.Linear(16, 8)), _Wrap(nn.Conv2d(3, 4, 3, padding=1))
    assert M.forward_flops_per_roi(linear, torch.empty(2, 16, device="meta")) == 2 * 16 * 8
    assert M.forward_flops_per_roi(conv, torch.empty(2, 3, 8, 8, device="meta")) == 2 * 3 * 4 * 9 * 8 * 8
    est = M.MemoryEstimate(1, 0, 0, 1, 1, True, False, 1e12)  # 1 TFLOP forward, 3 a training ROI
    assert est.step_seconds(M.GPUS["T4"], 10) == pytest.approx(30e12 / (65e12 * M.UTILISATION))
    assert M.gpu_of("Tesla T4") is M.GPUS["T4"] and M.gpu_of("NVIDIA A100-SXM4-80GB") is M.GPUS["A100"]
    assert M.gpu_of("NVIDIA GeForce RTX 4090") is None


def _gpu_here(monkeypatch, total: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="Tesla T4", total_memory=total))


def test_the_doctor_flags_a_config_over_the_gpus_memory_with_the_fix(monkeypatch):
    cfg = cfg_of("model.backbone=test_vit", "train.batch_size=64", "train.accumulate=1")
    est = M.estimate(cfg)
    _gpu_here(monkeypatch, int(est.peak_bytes(16)))  # room for 16 ROIs, not 64
    r = Report()
    check_memory(r, torch, cfg)
    text = r.text()
    assert r.problems == 1 and "memory vs gpu 0" in text and "does NOT fit, largest micro-batch 16" in text
    assert "lower train.batch_size to 16 and raise train.accumulate to 4 (the same effective batch), or set " \
           "train.grad_checkpointing: true" in text
    assert "time on T4" in text  # a tabled GPU: its FLOPs-based time too

    r = Report()
    check_memory(r, torch, cfg_of("model.backbone=test_vit", "train.batch_size=64", "train.device=cpu"))
    assert r.problems == 0 and "memory on T4" in r.text()  # training on the CPU: the GPU's memory is no limit

    _gpu_here(monkeypatch, int(est.peak_bytes(64)) + 1)
    r = Report()
    check_memory(r, torch, cfg)
    assert r.problems == 0 and "fits (" in r.text()


def test_without_a_gpu_the_doctor_informs_and_never_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = Report()
    check_memory(r, torch, cfg_of("model.backbone=test_vit", "train.batch_size=100000"))
    labels = [label for label, _ in r.lines]
    assert r.problems == 0 and labels == ["memory", "memory on T4", "time on T4", "memory on A100", "time on A100"]
    assert "does NOT fit" in r.text() and "40 GB" in r.text() and "80 GB" in r.text()
    r = Report()
    check_memory(r, torch, cfg_of("model.backbone=no_such_net"))  # reported by the backbone lines: quiet here
    assert r.lines == [] and r.problems == 0
