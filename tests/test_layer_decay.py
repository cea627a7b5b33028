"""Big backbones on small GPUs (issue 28 items 3-4): layer-wise lr decay by timm's own layer grouping, gradient
checkpointing, gradient accumulation to an effective batch. Tiny timm models at random init, no download."""
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pandas as pd
import pytest
import timm
import torch
import torch.distributed as dist
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import TensorDataset

from lib.config import Config, ConfigError, validate
from lib.core.errors import StageError
from lib.model import dist as ddp
from lib.model.net import set_grad_checkpointing
from lib.model.optim import build_optimizer, layer_scales, param_groups


class Wrapped(nn.Module):
    """A Net's layout: a timm backbone (pooled features), context fusion and a fresh head."""

    backbone: Any  # a timm model: its attributes (num_features, blocks) as timm names them

    def __init__(self, backbone: Any):
        super().__init__()
        self.backbone = backbone
        self.fusion = nn.Linear(backbone.num_features, backbone.num_features)
        self.head_module = nn.Linear(backbone.num_features, 5)


def timm_scales(backbone: nn.Module, decay: float, wd: float) -> dict[int, tuple[float, float]]:
    """id(parameter) -> (lr_scale, weight_decay) as timm.optim.param_groups_layer_decay gives them."""
    return {id(p): (g["lr_scale"], g["weight_decay"]) for g in param_groups_layer_decay(backbone, weight_decay=wd, layer_decay=decay)
            for p in g["params"]}


@pytest.mark.parametrize("name, kwargs", [("vit_tiny_patch16_224", {"img_size": 32}), ("tf_efficientnet_lite0", {})])
def test_layer_decay_groups_equal_timms_and_compose_with_head_and_decay(name, kwargs):
    """Every backbone parameter learns at lr x backbone_lr_mult x timm's own lr_scale, with timm's weight decay (none
    on biases and norms); the head and the fusion keep the head's rate, undecayed by depth."""
    net = Wrapped(timm.create_model(name, pretrained=False, num_classes=0, **kwargs))
    lr, mult, wd, decay = 2e-3, 0.1, 0.05, 0.7
    groups = param_groups(net, lr, wd, mult, layer_decay=decay, backbone_name=name)
    expected = timm_scales(net.backbone, decay, wd)
    got = {id(p): g for g in groups for p in g["params"]}
    assert len(got) == sum(1 for _ in net.parameters())
    for p in net.backbone.parameters():
        scale, p_wd = expected[id(p)]
        assert got[id(p)]["lr"] == pytest.approx(lr * mult * scale, rel=1e-12) and got[id(p)]["base_lr"] == got[id(p)]["lr"]
        assert got[id(p)]["weight_decay"] == p_wd
    for p in [*net.head_module.parameters(), *net.fusion.parameters()]:
        assert got[id(p)]["lr"] == lr and got[id(p)]["weight_decay"] == (0.0 if p.ndim <= 1 else wd)
        assert got[id(p)]["name"].startswith("head")
    assert len({id(g["params"][0]) for g in groups}) == len(groups)  # no parameter in two groups


def test_vit_worked_depths():
    """ViT-Tiny's 12 blocks: the patch embedding (stem) is 12 layers below the last block and learns at 0.7 ** 12 of it;
    block k at 0.7 ** (11 - k); the final norm with the last block."""
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    scales = layer_scales(bb, 0.7, "vit_tiny_patch16_224")
    named = dict(bb.named_parameters())
    assert scales[id(named["patch_embed.proj.weight"])] == (0, pytest.approx(0.7 ** 12))
    assert scales[id(named["cls_token"])][1] == pytest.approx(0.7 ** 12)
    for k in (0, 5, 11):
        assert scales[id(named[f"blocks.{k}.attn.qkv.weight"])] == (k + 1, pytest.approx(0.7 ** (11 - k)))
    assert scales[id(named["norm.weight"])][1] == 1.0


def test_layer_decay_off_keeps_the_four_groups():
    net = Wrapped(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32))
    names = [g["name"] for g in param_groups(net, 1e-3, 0.05, 0.1, layer_decay=1.0)]
    assert sorted(names) == ["backbone", "backbone_no_decay", "head", "head_no_decay"]


def test_a_backbone_without_layer_groups_is_one_sentence():
    """timm's csatv2 has no group_matcher (timm would cut its parameter list in chunks of 12, not layers): refused."""
    net = Wrapped(timm.create_model("csatv2", pretrained=False, num_classes=0))
    with pytest.raises(StageError, match=r"backbone 'csatv2' has no layer groups.*set train.layer_decay: 1.0"):
        param_groups(net, 1e-3, 0.05, 0.1, layer_decay=0.7, backbone_name="csatv2")
    assert param_groups(net, 1e-3, 0.05, 0.1, layer_decay=1.0)  # off: no grouping needed


def test_build_optimizer_reads_the_train_section():
    net = Wrapped(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32))
    t = Config().train
    t.layer_decay, t.lr, t.backbone_lr_mult = 0.5, 1.0, 0.2
    opt = build_optimizer(net, t, "vit_tiny_patch16_224")
    stem = next(g for g in opt.param_groups if any(p is net.backbone.patch_embed.proj.weight for p in g["params"]))
    assert stem["lr"] == pytest.approx(0.2 * 0.5 ** 12) and stem["name"] == "backbone_layer0"


@pytest.mark.parametrize("key, value, fix", [("layer_decay", 0.0, r"\(0, 1\]"), ("layer_decay", 1.5, r"\(0, 1\]"),
                                             ("accumulate", 0, "at least 1")])
def test_config_checks(key, value, fix):
    cfg = Config()
    setattr(cfg.train, key, value)
    with pytest.raises(ConfigError, match=f"train.{key} must.*{fix}"):
        validate(cfg)


# ----------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("name, size", [("vit_tiny_patch16_224", 32), ("tf_efficientnet_lite0", 64)])
def test_checkpointing_gives_the_same_loss_and_gradients(name, size):
    """Train mode (BatchNorm on batch statistics, run twice when recomputed): the same loss and gradients to float rounding."""
    torch.manual_seed(0)
    kwargs = {"img_size": size} if name.startswith("vit") else {}
    plain = Wrapped(timm.create_model(name, pretrained=False, num_classes=0, **kwargs)).train()
    ckpt = Wrapped(timm.create_model(name, pretrained=False, num_classes=0, **kwargs)).train()
    ckpt.load_state_dict(plain.state_dict())
    set_grad_checkpointing(ckpt, name)
    assert ckpt.backbone.grad_checkpointing and not plain.backbone.grad_checkpointing
    x, y = torch.randn(3, 3, size, size), torch.tensor([0, 3, 4])
    losses, calls = [], []
    for net in (plain, ckpt):
        calls.append(0)
        layer = next(m for m in net.backbone.blocks[1].modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        layer.register_forward_pre_hook(lambda *a: calls.__setitem__(-1, calls[-1] + 1))
        loss = nn.functional.cross_entropy(net.head_module(net.fusion(net.backbone(x))), y)
        loss.backward()
        losses.append(loss.detach())
    assert calls == [1, 2]  # checkpointed: a layer of block 1 ran again in the backward pass instead of keeping its activations
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert a.grad is not None and b.grad is not None, k
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), k


def test_a_backbone_without_checkpointing_is_one_sentence():
    net = Wrapped(timm.create_model("inception_v3", pretrained=False, num_classes=0))
    with pytest.raises(StageError, match=r"backbone 'inception_v3' does not support gradient checkpointing; set "
                                         r"train.grad_checkpointing: false"):
        set_grad_checkpointing(net, "inception_v3")
    with pytest.raises(StageError, match="Linear does not support"):
        set_grad_checkpointing(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- gradient accumulation


class TinyHead(nn.Module):
    def loss(self, out, y, w, criterion):
        return nn.functional.cross_entropy(out.logits, y)


class TinyNet(nn.Module):
    """A linear classifier in the Net's calling convention (no batch-dependent layer, so micro-batches add up exactly)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head_module = nn.Linear(6, 3).double(), TinyHead()

    def forward(self, x, full=False, frames=None):
        return SimpleNamespace(logits=self.fc(x))

    def loss(self, out, target, weight, base, soft=None):  # Net.loss without soft targets or a fusion's aux
        return self.head_module.loss(out, target, weight, base)


def fit_epoch(rows: int, batch: int, accumulate: int, epoch: int = 0, lr: float = 0.5):
    """One epoch of lib.engine.train.train_one_epoch on a fake kit (SGD, so the update is lr x the mean gradient):
    the model, the schedule positions it stepped at and the optimiser's step count."""
    import lib.engine.train as train_mod

    torch.manual_seed(0)
    x, y = torch.randn(rows, 6, dtype=torch.float64), torch.randint(0, 3, (rows,))
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for g in opt.param_groups:
        g["base_lr"] = lr
    steps_per_epoch = max(1, math.ceil(max(1, rows // batch) / accumulate))
    world = ddp.world_size()  # under torchrun (the two-rank test's worker): each rank its share, DDP-wrapped
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    kit = SimpleNamespace(seed=1, criterion=SimpleNamespace(set_epoch=lambda e: None), train_tf=SimpleNamespace(set_random_seed=lambda s: None),
                          ds=TensorDataset(x, y, torch.ones(rows)), train_loader=None, batch=ddp.rank_batch(batch, world),
                          device=torch.device("cpu"), model=model, train_model=train_model, optimizer=opt, scaler=None,
                          precision="fp32", ema=None, n_classes=3, steps_per_epoch=steps_per_epoch, total=10 * steps_per_epoch, warmup=0, restart=1)
    t = SimpleNamespace(accumulate=accumulate, sampler="random", schedule="cosine", min_lr_ratio=0.01, clip_grad=0.0)
    cfg = SimpleNamespace(train=t, augment=SimpleNamespace(mixing=False))
    positions = []
    real_step = train_mod._step

    def step(kit_, t_, position):
        positions.append(position)
        real_step(kit_, t_, position)

    train_mod._step = step
    try:
        losses = train_mod.train_one_epoch(cast(Any, kit), cast(Any, cfg), cast(Any, SimpleNamespace(train=pd.DataFrame({"label": y.numpy()}))),
                                           "t", epoch, 10)
    finally:
        train_mod._step = real_step
    return model, positions, losses


def test_two_micro_batches_of_4_step_as_one_batch_of_8():
    """SGD on a linear model (no batch-dependent layer) in float64: accumulate=2 over batches of 4 gives one step whose
    update equals that of one batch of 8 (the mean gradient of the 8 rows) to rounding."""
    acc, pos_acc, losses = fit_epoch(rows=8, batch=4, accumulate=2)
    one, pos_one, _ = fit_epoch(rows=8, batch=8, accumulate=1)
    assert pos_acc == pos_one == [0] and len(losses) == 2
    for a, b in zip(acc.parameters(), one.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    untouched = TinyNet()  # same seed, same init: the step did move the weights
    torch.manual_seed(0)
    assert not torch.allclose(untouched.fc.weight, acc.fc.weight)


@pytest.mark.parametrize("batches, accumulate", [(10, 3), (10, 5), (7, 1), (3, 4)])
def test_the_optimiser_steps_ceil_batches_over_accumulate_times(batches, accumulate):
    """An epoch of `batches` micro-batches steps ceil(batches / accumulate) times, the last partial group too, at
    consecutive schedule positions after the previous epochs' steps (warmup and cosine count optimiser steps)."""
    _, positions, losses = fit_epoch(rows=4 * batches, batch=4, accumulate=accumulate, epoch=2)
    n = math.ceil(batches / accumulate)
    assert len(losses) == batches and positions == list(range(2 * n, 3 * n))


def test_accumulation_groups():
    from lib.engine.train import accumulation

    assert [accumulation(i, 7, 3) for i in range(7)] == [(3, False), (3, False), (3, True), (3, False), (3, False), (3, True),
                                                         (1, True)]
    assert all(accumulation(i, 4, 1) == (1, True) for i in range(4))


ACCUMULATE_WORKER = '''
import sys
import torch
sys.path.insert(0, "tests")
from lib.model import dist as ddp
from test_layer_decay import fit_epoch

ddp.init("cpu")
model, positions, losses = fit_epoch(rows=32, batch=16, accumulate=2)
if ddp.is_main():
    torch.save({"state": model.state_dict(), "positions": positions, "micro": len(losses)}, sys.argv[1])
ddp.close()
'''


@pytest.mark.slow  # torchrun with two gloo ranks: about 15 s
def test_two_ranks_accumulating_step_as_one_process(tmp_path):
    """Global batch 16 on 2 ranks with accumulate 2: each rank 2 micro-batches of 8, the first in no_sync, one step; the
    weights equal one process's single step over the 32 rows (2 micro-batches of 16), so the local gradient kept under
    no_sync reaches the all-reduce."""
    from test_dist import run_two_ranks  # tests/test_dist.py

    run_two_ranks(tmp_path, ACCUMULATE_WORKER)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    one, positions, losses = fit_epoch(rows=32, batch=16, accumulate=2)
    assert got["positions"] == positions == [0] and got["micro"] == len(losses) == 2
    for k, v in one.state_dict().items():
        assert torch.allclose(got["state"][k], v, rtol=0, atol=1e-12), k


def test_ddp_skips_the_all_reduce_on_micro_batches_that_do_not_step(tmp_path):
    """Under DDP a non-stepping micro-batch runs inside no_sync (gradients stay local), a stepping one syncs."""
    from lib.engine.train import _sync_unless

    dist.init_process_group(backend="gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        with _sync_unless(wrapped, steps=False):
            assert not wrapped.require_backward_grad_sync
        with _sync_unless(wrapped, steps=True):
            assert wrapped.require_backward_grad_sync
        with _sync_unless(nn.Linear(3, 2), steps=False):  # a plain model: nothing to skip
            pass
    finally:
        ddp.close()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # the demo's data, 00 and two epochs: about 12 s on one core
def test_a_tiny_fold_trains_with_all_three(tmp_path, monkeypatch):
    """The demo's lite0 (random init, 32 px, 48 rows) through fit_fold with layer_decay 0.7, grad_checkpointing and
    accumulate 2: batches of 8 make 6 micro-batches and 3 optimiser steps an epoch; the optimiser has timm's layers."""
    import lib.engine.train as train_mod
    from lib.config import load_config
    from lib.data.artifacts import load_rois
    from lib.data.taxonomy import load_taxonomy_json
    from lib.demo.__main__ import main as demo_main
    from lib.engine.folds import fold_splits
    from lib.pipeline.records import Stage

    from conftest import load_script  # tests/conftest.py

    overrides = [f"data.root={tmp_path / 'data'}", f"output_root={tmp_path / 'out'}", "exp=tiny", "demo.per_class=3",
                 "demo.test_per_class=1", "demo.frame_width=160", "demo.frame_height=120", "prepare.n_folds=2", "prepare.crop_size=32",
                 "prepare.workers=1", "model.img_size=32", "model.pretrained=none", "train.batch_size=8"]
    assert demo_main(["--config", "configs/demo.yaml", *overrides]) == 0
    assert load_script("00_prepare_data.py").main(["--config", "configs/demo.yaml", *overrides]) == 0
    prep = tmp_path / "out" / "tiny" / "00_prepare"
    cfg = load_config("configs/demo.yaml", [*overrides, "train.layer_decay=0.7", "train.grad_checkpointing=true", "train.accumulate=2"])
    split = fold_splits(load_rois(prep), [0])[0]
    split = split.__class__(split.fold, split.train.iloc[:48], split.val.iloc[:16])
    kits, positions = [], []
    real_kit, real_step = train_mod.build_kit, train_mod._step

    def build_kit(*a):
        kits.append(real_kit(*a))
        return kits[-1]

    def step(kit, t, pos):
        positions.append(pos)
        real_step(kit, t, pos)

    monkeypatch.setattr(train_mod, "build_kit", build_kit)
    monkeypatch.setattr(train_mod, "_step", step)
    root = Path(__file__).resolve().parent.parent
    stage = Stage.create("ld/fold_0", tmp_path / "ld", cfg, ["train"], root / "01_train_folds.py", {})
    result = train_mod.fit_fold(cfg, split, load_taxonomy_json(prep / "taxonomy.json"), stage, epochs=2)
    assert result is not None and math.isfinite(result.val_distance)
    kit = kits[0]
    assert kit.model.backbone.grad_checkpointing and kit.steps_per_epoch == 3 and positions == [0, 1, 2, 3, 4, 5]
    names = {g["name"] for g in kit.optimizer.param_groups}
    assert {"backbone_layer0", "backbone_layer16", "head"} <= names  # stem, conv_head (lite0's 17 groups), the head
    stem = next(g for g in kit.optimizer.param_groups if g["name"] == "backbone_layer0")
    assert stem["base_lr"] == pytest.approx(cfg.train.lr * cfg.train.backbone_lr_mult * 0.7 ** 16)


@pytest.mark.parametrize("backbone, keys, problem, text", [
    ("vit_tiny_patch16_224", {"layer_decay": 0.7, "grad_checkpointing": True}, False,
     "vit_tiny_patch16_224: layer_decay 0.7 over 13 layers (the stem at 0.014 of the top block's rate), gradient checkpointing"),
    ("csatv2", {"layer_decay": 0.7}, True, "The backbone 'csatv2' has no layer groups"),
    ("inception_v3", {"grad_checkpointing": True}, True, "The backbone 'inception_v3' does not support gradient checkpointing"),
])
def test_the_doctor_says_so_before_training(backbone, keys, problem, text):
    """On an empty meta-device copy of the backbone: no weights, no memory."""
    from lib.doctor.__main__ import Report, check_big_backbone

    cfg = Config()
    cfg.model.backbone = backbone
    for k, v in keys.items():
        setattr(cfg.train, k, v)
    r = Report()
    check_big_backbone(r, cfg)
    assert len(r.lines) == 1 and r.lines[0][0] == "backbone options" and r.lines[0][1].startswith(text)
    assert r.problems == int(problem)


def test_the_doctor_is_silent_when_both_are_off():
    from lib.doctor.__main__ import Report, check_big_backbone

    r = Report()
    check_big_backbone(r, Config())
    assert not r.lines and not r.problems
