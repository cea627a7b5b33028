"""Issue 28's model ingredients: cross-attention over context tokens (1st place), a backbone per view and the entropy
gate (2nd place), against shapes, stated invariances and hand-computed values."""
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lib.config import ConfigError, load_config
from lib.core.errors import StageError
from lib.data.taxonomy import Taxonomy
from lib.model.fusion import ContextFusion, gate_weights
from lib.model.net import build_net
from lib.model.optim import param_groups
from lib.model.streams import StreamInput, StreamSpec, stream_specs, tokens_of


def taxonomy() -> Taxonomy:
    return Taxonomy(names=tuple(f"S{i}" for i in range(4)),
                    lineages=tuple(("K", "P", "C", "O", f"F{i % 2}", f"G{i}", f"S{i}") for i in range(4)))


def cfg(*overrides: str):
    return load_config("configs/demo.yaml", ["model.pretrained=none", "model.backbone=test_efficientnet", "model.img_size=64",
                                             "head.name=linear", *overrides])


def net(*overrides: str) -> Any:  # a Net; Any so the tests can reach its parts
    torch.manual_seed(0)
    return build_net(cfg(*overrides), taxonomy()).eval()


# ----------------------------------------------------------------------------- cross_attention


def test_tokens_of_a_cnn_map_and_a_vit_sequence():
    import timm

    cnn: Any = timm.create_model("test_efficientnet", num_classes=0).eval()
    fmap = cnn.forward_features(torch.randn(2, 3, 64, 64))
    assert tokens_of(cnn, fmap).shape == (2, fmap.shape[2] * fmap.shape[3], fmap.shape[1])
    assert torch.equal(tokens_of(cnn, fmap)[:, 1], fmap[:, :, 0, 1])  # row-major cells
    vit: Any = timm.create_model("test_vit", num_classes=0, img_size=64).eval()
    seq = vit.forward_features(torch.randn(2, 3, 64, 64))
    assert tokens_of(vit, seq).shape == (2, seq.shape[1] - vit.num_prefix_tokens, seq.shape[2])  # the class token dropped


def test_cross_attention_shapes_and_a_fresh_fusion_is_the_roi_model():
    m = net("model.context=[1, 3, full]", "model.fusion=cross_attention", "model.fusion_blocks=2")
    x = torch.randn(3, 3, 3, 64, 64)
    with torch.no_grad():
        fused = m.features(x)
        roi = m.backbone(x[:, 0])
    assert fused.shape == (3, m.backbone.num_features)
    assert torch.allclose(fused, roi, atol=1e-6)  # zero-initialised output projections: the ROI-only path exactly
    assert m(x).shape == (3, 4)


def test_cross_attention_masks_and_left_out_views_add_nothing():
    torch.manual_seed(0)
    fusion: Any = ContextFusion(16, 3, "cross_attention", blocks=2, heads=4)
    for proj in fusion.cross.out:  # a trained fusion: non-zero projections
        torch.nn.init.normal_(proj.weight)
    f = torch.randn(2, 3, 16)
    tokens = [torch.randn(2, 5, 16), torch.randn(2, 7, 16)]
    with torch.no_grad():
        both = fusion(f, tokens)
        assert not torch.allclose(both, f[:, 0])
        assert torch.equal(fusion(f, [None, None]), f[:, 0])  # every context view left out: the ROI's features
        only_first = fusion(f, [tokens[0], None])
        hidden = fusion(f, tokens, torch.tensor([[True, True, False], [True, True, True]]))
    assert torch.allclose(hidden[0], only_first[0]) and torch.allclose(hidden[1], both[1])  # a row's hidden view, only that row
    with pytest.raises(ValueError, match="one per view"):
        fusion(f, tokens[:1])


def test_attention_weights_are_kept_per_view_and_sum_to_one():
    torch.manual_seed(0)
    fusion: Any = ContextFusion(16, 3, "cross_attention", heads=4)
    fusion.cross.keep_weights = True
    fusion(torch.randn(2, 3, 16), [torch.randn(2, 5, 16), torch.randn(2, 9, 16)])
    w = fusion.cross.last_weights
    assert [t.shape for t in w] == [(2, 5), (2, 9)]
    assert all(torch.allclose(t.sum(-1), torch.ones(2)) for t in w)


def test_cross_attention_learns_from_the_context_tokens():
    m = net("model.context=[1, full]", "model.fusion=cross_attention").train()
    x = torch.randn(4, 2, 3, 64, 64)
    m.fusion.cross.out[0].weight.data.normal_(0, 0.1)
    m(x).sum().backward()
    block = m.fusion.cross.stacks[0][0]
    assert block.attn.in_proj_weight.grad is not None and block.attn.in_proj_weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- entropy gate


def test_gate_weights_on_a_hand_case():
    """A sure view (logits 10, 0, 0) against a uniform one (entropy ln 3): weights exp(-H) normalised, at tau 1."""
    logits = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    p = torch.tensor([math.exp(10), 1.0, 1.0]) / (math.exp(10) + 2)
    h0 = float(-(p * p.log()).sum())
    w0 = math.exp(-h0) / (math.exp(-h0) + math.exp(-math.log(3)))
    w = gate_weights(logits, 1.0)
    assert w[0, 0].item() == pytest.approx(w0, rel=1e-5) and w[0].sum().item() == pytest.approx(1.0)
    assert gate_weights(logits, 1.0, torch.tensor([0.0, 100.0]))[0, 1] > 0.99  # a learned bias can overrule confidence
    equal = gate_weights(torch.zeros(1, 2, 3), 0.5)
    assert torch.allclose(equal, torch.full((1, 2), 0.5))  # equally unsure views share equally


def test_entropy_gate_fuses_views_by_their_weights_and_adds_their_loss():
    m = net("model.context=[1, full]", "model.fusion=entropy_gate", "model.gate_aux_weight=0.5")
    x = torch.randn(3, 2, 3, 64, 64)
    y = torch.tensor([0, 1, 2])
    out = m(x, full=True)
    views = out.aux["view_logits"]
    assert views.shape == (3, 2, 4)
    with torch.no_grad():
        f = m.backbone(x.flatten(0, 1)).view(3, 2, -1)
        assert torch.allclose(views, m.head_module(f.flatten(0, 1)).logits.view(3, 2, 4), atol=1e-5)  # the head on each view alone
        w = gate_weights(views, m.fusion.gate.log_tau.exp(), m.fusion.gate.bias)
        assert torch.allclose(m.features(x), (w[..., None] * f).sum(1), atol=1e-5)
        # a linear head: the gated features' logits are the gate's weighted mean of the views' own logits
        assert torch.allclose(out.logits, (w[..., None] * views).sum(1), atol=1e-4)
    ce = torch.nn.CrossEntropyLoss()
    base: Any = lambda logits, t, w: ce(logits, t)
    loss = m.loss(out, y, None, base)
    expected = ce(out.logits, y) + 0.5 * (F.cross_entropy(views[:, 0], y) + F.cross_entropy(views[:, 1], y)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------- a backbone per view


def test_stream_specs_and_input_size():
    c = cfg("model.context=[1, 3, full]", "model.img_size=48",
            "model.view_backbones=[{views: [full], backbone: test_vit, img_size: 64}]")
    assert stream_specs(c.model) == [StreamSpec((0, 1), 48), StreamSpec((2,), 64)]
    assert c.model.input_size == 64


def test_stream_input_resizes_and_renormalises():
    spec = StreamSpec((1,), 16)
    inp = StreamInput(spec, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x = torch.randn(2, 2, 3, 32, 32)
    out = inp(x)
    raw = F.interpolate(x[:, 1], size=(16, 16), mode="bilinear", antialias=True) * 0.25 + 0.5  # the loader's normalisation undone
    assert out.shape == (2, 3, 16, 16) and torch.allclose(out, raw, atol=1e-6)


def test_a_view_backbone_reads_its_view_at_its_size_and_learns_at_its_rate():
    m = net("model.context=[1, full]", "model.img_size=48", "model.fusion=entropy_gate",
            "model.view_backbones=[{views: [full], backbone: test_vit, img_size: 64, lr_mult: 0.3}]")
    x = torch.randn(2, 2, 3, 64, 64)
    assert m(x).shape == (2, 4)
    assert len(m.view_backbones) == 1 and isinstance(m.view_proj[1], torch.nn.Linear)
    assert m(x, full=True).aux["view_logits"].shape == (2, 2, 4)  # test_vit's 64 -> test_efficientnet's
    with torch.no_grad():
        pooled, _ = m._views(x)
        roi = m.backbone(F.interpolate(x[:, 0], size=(48, 48), mode="bilinear", antialias=True))
    assert torch.allclose(pooled[:, 0], roi, atol=1e-5)
    groups = param_groups(m, 1e-3, 0.05, 0.1)
    rates = {g["name"]: g["base_lr"] for g in groups}
    assert rates["view_backbone0"] == pytest.approx(3e-4) and rates["backbone"] == pytest.approx(1e-4) and rates["head"] == 1e-3
    proj_ids = {id(p) for p in m.view_proj.parameters()}
    assert all(g["name"].startswith("head") for g in groups if any(id(p) in proj_ids for p in g["params"]))


def test_cross_attention_over_a_view_backbones_tokens():
    m = net("model.context=[1, 3, full]", "model.fusion=cross_attention",
            "model.view_backbones=[{views: [full], backbone: test_vit, img_size: 64}]")
    _, tokens = m._views(torch.randn(2, 3, 3, 64, 64))
    assert tokens is not None and tokens[0].shape == (2, 4, 256) and tokens[1].shape == (2, 16, 256)  # 2x2 map, 4x4 patches


@pytest.mark.parametrize("override, text", [
    ("model.view_backbones=[{views: ['1'], backbone: test_vit}]", "may not name view 1"),
    ("model.view_backbones=[{views: [5], backbone: test_vit}]", "that model.context does not read"),
    ("model.view_backbones=[{views: [], backbone: test_vit}]", "reads no view"),
    ("model.view_backbones=[{views: [full]}, {views: [full]}]", "names a view twice"),
    ("model.view_backbones=[{views: [full], pretrained: file, pretrained_file: nowhere.pth}]", r"view_backbones\[0\].pretrained_file"),
    ("model.view_backbones=[{views: [full], colour: red}]", r"Unknown config key 'model.view_backbones\[0\].colour'"),
])
def test_view_backbone_config_errors_are_one_sentence(override, text):
    with pytest.raises(ConfigError, match=text):
        cfg("model.context=[1, full]", override)


def test_a_fusion_of_views_needs_views():
    with pytest.raises(ConfigError, match="reads only the ROI"):
        cfg("model.context=[1]", "model.fusion=cross_attention")


def test_an_unknown_view_backbone_names_close_timm_models():
    from lib.model.net import build_model

    with pytest.raises(StageError, match=r"model.view_backbones\[0\].backbone.*close names: .*efficientnet"):
        build_model("tf_efficientnet_lite", 0, "none", section="model.view_backbones[0]")


def test_layer_decay_on_a_view_backbone_without_groups_is_one_sentence():
    m = net("model.context=[1, full]", "model.view_backbones=[{views: [full], backbone: test_vit, img_size: 64}]")
    m.view_backbones[0].group_matcher = None  # as a model without timm's layer groups
    m.view_backbone_names = ["test_vit"]
    with pytest.raises(StageError, match="'test_vit' has no layer groups"):
        param_groups(m, 1e-3, 0.05, 0.1, layer_decay=0.7)


def test_checkpointing_a_two_backbone_cross_attention_net_keeps_loss_and_gradients():
    from lib.model.net import set_grad_checkpointing

    overrides = ("model.context=[1, full]", "model.fusion=cross_attention",
                 "model.view_backbones=[{views: [full], backbone: test_vit, img_size: 64}]")
    x, y = torch.randn(2, 2, 3, 64, 64), torch.tensor([0, 3])
    grads = []
    for checkpointing in (False, True):
        m = net(*overrides).train()
        m.fusion.cross.out[0].weight.data.fill_(0.01)
        if checkpointing:
            set_grad_checkpointing(m)
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        grads.append((loss.item(), m.view_backbones[0].patch_embed.proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


# ----------------------------------------------------------------------------- a tiny fold of each


@pytest.fixture(scope="module")
def tiny_prep(tmp_path_factory):
    """The demo's data and 00 with 3x and full-frame crops (random init, 32 px)."""
    from lib.demo.__main__ import main as demo_main

    from conftest import load_script  # tests/conftest.py

    tmp = tmp_path_factory.mktemp("tiny")
    overrides = [f"data.root={tmp / 'data'}", f"output_root={tmp / 'out'}", "exp=tiny", "demo.per_class=3", "demo.test_per_class=1",
                 "demo.frame_width=160", "demo.frame_height=120", "prepare.n_folds=2", "prepare.crop_size=32", "prepare.workers=1",
                 "model.img_size=32", "model.pretrained=none", "train.batch_size=8", "model.context=[1, 3, full]"]
    assert demo_main(["--config", "configs/demo.yaml", *overrides]) == 0
    assert load_script("00_prepare_data.py").main(["--config", "configs/demo.yaml", *overrides]) == 0
    return tmp, overrides


@pytest.mark.slow  # two epochs of a tiny fold each: about 10 s on one core
@pytest.mark.parametrize("extra, check", [
    (["model.fusion=cross_attention", "model.fusion_blocks=2"], "attention"),
    (["model.fusion=entropy_gate", "model.view_backbones=[{views: [full], backbone: test_vit, img_size: 32, lr_mult: 0.5}]"], "gate"),
    (["model.fusion=attention", "train.layer_decay=0.7"], "layers"),
])
def test_a_tiny_fold_trains_with_each_option(tiny_prep, tmp_path, extra, check):
    from pathlib import Path

    import numpy as np

    import lib.engine.train as train_mod
    from lib.data.artifacts import load_rois
    from lib.data.taxonomy import load_taxonomy_json
    from lib.engine.folds import fold_splits
    from lib.pipeline.records import Stage

    root, overrides = tiny_prep
    prep = root / "out" / "tiny" / "00_prepare"
    c = load_config("configs/demo.yaml", [*overrides, *extra])
    split = fold_splits(load_rois(prep), [0])[0]
    split = split.__class__(split.fold, split.train.iloc[:32], split.val.iloc[:16])
    here = Path(__file__).resolve().parent.parent
    stage = Stage.create("x/fold_0", tmp_path / "x", c, ["train"], here / "01_train_folds.py", {})
    result = train_mod.fit_fold(c, split, load_taxonomy_json(prep / "taxonomy.json"), stage, epochs=2)
    assert result is not None and math.isfinite(result.val_distance)
    if check == "attention":  # where the ROIs looked, per context view, on the 1 x 1 map of 32-px crops
        maps = np.load(stage.dir / "attention.npz")
        assert list(maps["views"]) == ["1", "3", "full"] and maps["view1"].shape[0] == 8
        assert np.allclose(maps["view2"].reshape(8, -1).sum(1), 1.0, atol=1e-5) and (stage.dir / "attention.png").is_file()
    else:
        assert not (stage.dir / "attention.npz").exists()


def test_the_stage_names_a_view_backbone_timm_does_not_know():
    from lib.pipeline.graph import preflight

    c = cfg("model.context=[1, full]", "model.view_backbones=[{views: [full], backbone: tf_efficientnetv2_z}]")
    with pytest.raises(ConfigError, match=r"model.view_backbones\[0\].backbone 'tf_efficientnetv2_z' is not a timm model "
                                          r"\(did you mean 'tf_efficientnetv2_\w'\?\)"):
        preflight(c, "01_train")


def test_entropy_gate_needs_its_views_to_learn():
    with pytest.raises(ConfigError, match="needs model.gate_aux_weight above 0"):
        cfg("model.context=[1, full]", "model.fusion=entropy_gate", "model.gate_aux_weight=0")


def test_a_weights_file_saved_at_another_size_keeps_its_position_embeddings(tmp_path):
    """A ViT file saved at 32 px loaded into the same ViT built for 64 px: timm's filter resamples pos_embed to the grid."""
    import timm

    from lib.model.net import build_model

    small: Any = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    torch.save(small.state_dict(), tmp_path / "w.pth")
    big: Any = build_model("vit_tiny_patch16_224", 0, "file", str(tmp_path / "w.pth"), img_size=64)
    assert big.pos_embed.shape[1] == 1 + 16 and small.pos_embed.shape[1] == 1 + 4
    assert torch.equal(big.pos_embed[:, 0], small.pos_embed[:, 0])  # the class token's position kept
    fresh: Any = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64)
    assert not torch.allclose(big.pos_embed, fresh.pos_embed)  # loaded (resampled), not left at its random init
    assert torch.equal(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)


def test_the_doctor_checks_a_view_backbones_options_too():
    from lib.config import Config, ViewBackboneCfg
    from lib.doctor.__main__ import Report, check_big_backbone

    c = Config()
    c.model.backbone, c.model.context = "vit_tiny_patch16_224", ["1", "full"]
    c.model.view_backbones = [ViewBackboneCfg(views=["full"], backbone="inception_v3")]
    c.train.grad_checkpointing = True
    r = Report()
    check_big_backbone(r, c)
    assert [line[1].split(":")[0] for line in r.lines][0] == "vit_tiny_patch16_224"
    assert "The backbone 'inception_v3' does not support gradient checkpointing" in r.lines[1][1] and r.problems == 1


def test_a_narrow_cross_attention_is_still_the_roi_model_when_fresh():
    m = net("model.context=[1, 3, full]", "model.fusion=cross_attention", "model.fusion_width=32", "model.fusion_heads=4")
    x = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m.features(x), m.backbone(x[:, 0]), atol=1e-6)
    block = m.fusion.cross.stacks[0][0]
    assert block.attn.embed_dim == 32 and block.attn.num_heads == 4 and m.fusion.cross.down.out_features == 32
    assert m.fusion.cross.out[0].in_features == 32 and m.fusion.cross.out[0].out_features == m.backbone.num_features
