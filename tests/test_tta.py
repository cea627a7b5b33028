"""Inference and test-time augmentation: view algebra, combination rules, and the one loop (`predict`) against the model called directly."""
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lib.config import Config, ConfigError, HeadCfg, HeadName, ModelCfg, load_config
from lib.data.taxonomy import Taxonomy
from lib.engine.inference import View, combine, parse_views, predict
from lib.model.net import build_model, build_net
from lib.pipeline.graph import SPECS
from lib.views import view_ops

SIZE = 32


def view(name: str) -> View:
    return parse_views([name])[0]


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- views


def test_hflip_twice_is_identity(x):
    assert torch.equal(view("hflip+hflip")(x), x)
    assert torch.equal(view("hflip")(x), x.flip(-1)) and torch.equal(view("vflip")(x), x.flip(-2))


def test_rot90_four_times_is_identity(x):
    assert torch.equal(view("rot90+rot90+rot90+rot90")(x), x)
    assert torch.equal(view("rot90+rot270")(x), x) and torch.equal(view("rot180")(x), view("rot90+rot90")(x))


def test_rot90_matches_torch_rot90_counter_clockwise():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert torch.equal(view("rot90")(m), torch.rot90(m, 1, dims=(2, 3)))
    assert view("rot90")(m).flatten().tolist() == [2.0, 4.0, 1.0, 3.0]  # the top-right corner comes to the top-left


def test_small_rotation_turns_the_same_way_as_rot90(x):
    assert torch.allclose(view("rotate90")(x), view("rot90")(x), atol=1e-5)
    assert torch.allclose(view("rotate-90")(x), view("rot270")(x), atol=1e-5)


def test_rotate_on_non_square_images_keeps_aspect():
    x = torch.randn(2, 3, 6, 10)
    assert torch.allclose(view("rotate180")(x), x.flip(-1).flip(-2), atol=1e-5)


def test_rotate0_and_scale1_are_identity(x):
    assert torch.allclose(view("rotate0")(x), x, atol=1e-5)
    assert torch.allclose(view("scale1.0")(x), x, atol=1e-5)


def test_views_keep_shape_and_dtype(x):
    for name in ("scale0.9", "scale1.1", "rotate10", "rotate-10", "hflip+scale0.8+rotate5"):
        assert view(name)(x).shape == x.shape
    assert not torch.allclose(view("scale1.1")(x), x) and not torch.allclose(view("rotate-10")(x), view("rotate10")(x))
    bf = view("rotate10")(x.bfloat16())
    assert bf.dtype == torch.bfloat16 and bf.shape == x.shape
    u8 = view("scale0.9")((x.abs() * 50).to(torch.uint8))
    assert u8.dtype == torch.uint8 and u8.shape == x.shape


def test_scale_zooms_about_the_centre():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 3:5, 3:5] = 1.0  # a centred square: zoom in grows it, zoom out shrinks it
    zin, zout = view("scale2")(x), view("scale0.5")(x)
    assert torch.equal(zin[..., 3:5, 3:5], x[..., 3:5, 3:5]) and torch.isclose(zin.sum(), 4 * x.sum())  # twice the side
    assert torch.isclose(zout[..., 2:6, 2:6].sum(), x.sum() / 4)  # half the side, still in the middle
    assert zout[..., 0, 0] > 0  # the margin reflects the image rather than going black
    assert torch.allclose(zin, zin.flip(-1)) and torch.allclose(zout, zout.flip(-2))  # centred


def test_composition_applies_left_to_right(x):
    assert torch.equal(view("hflip+rot90")(x), torch.rot90(x.flip(-1), 1, dims=(2, 3)))
    assert not torch.equal(view("hflip+rot90")(x), view("rot90+hflip")(x))
    assert view_ops("hflip+rotate-2.5") == (("hflip", 0.0), ("rotate", -2.5))


def test_quarter_turns_refuse_non_square():
    with pytest.raises(ValueError, match="square"):
        view("rot90")(torch.zeros(1, 3, 4, 6))


@pytest.mark.parametrize("name", ["flip", "rotate", "rot45", "scale", "hflip+", "rotate+10", "scalex"])
def test_unknown_view_lists_the_forms(name):
    with pytest.raises(ValueError, match=rf"Unknown TTA view '{re.escape(name)}'.*rotate<degrees>.*scale<factor>.*hflip\+rot90"):
        parse_views(["identity", name])


def test_bad_scale_and_empty_list():
    with pytest.raises(ValueError, match="positive factor"):
        parse_views(["scale0"])
    with pytest.raises(ValueError, match="at least one"):
        parse_views([])


# ----------------------------------------------------------------------------- combine


def test_combine_prob_and_log_by_hand():
    per_view = [np.array([[0.9, 0.1]]), np.array([[0.5, 0.5]])]
    assert np.allclose(combine(per_view, "prob"), [[0.7, 0.3]])
    geo = np.sqrt([0.9 * 0.5, 0.1 * 0.5])  # sqrt products, renormalised: 3:1
    assert np.allclose(combine(per_view, "log"), [geo / geo.sum()]) and np.allclose(combine(per_view, "log"), [[0.75, 0.25]])
    t = combine(torch.tensor(np.stack(per_view)), "log")
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.tensor([[0.75, 0.25]]))


def test_combine_survives_zeros_and_rejects_unknown_mode():
    out = combine([np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])], "log")
    assert np.isfinite(out).all() and np.allclose(out, [[1.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="prob or log"):
        combine([np.array([[1.0, 0.0]])], "geo")  # type: ignore[arg-type]  # an unknown mode on purpose: combine must refuse it


# ----------------------------------------------------------------------------- predict


def toy() -> Taxonomy:
    k = "K"
    return Taxonomy(
        names=("L1", "L2", "L3", "L4", "L5"),
        lineages=(
            (k, "P1", "C1", "O1", None, None, None),
            (k, "P1", "C1", "O2", None, None, None),
            (k, "P1", "C2", None, None, None, None),
            (k, "P2", "C3", "O3", None, None, None),
            (k, "P2", None, None, None, None, None),
        ),
    )


def net(head: HeadName = "linear", **kw):
    torch.manual_seed(0)
    cfg = Config(model=ModelCfg(backbone="resnet10t", pretrained="none", img_size=SIZE), head=HeadCfg(name=head, **kw))
    return build_net(cfg, toy(), pretrained=False).to(memory_format=torch.channels_last).eval()


@pytest.fixture(scope="module")
def linear():
    return net()


@pytest.fixture(scope="module")
def multi():
    return net("multi", n_heads=3)


def loader(x: torch.Tensor) -> DataLoader:
    z = torch.zeros(len(x))
    return DataLoader(TensorDataset(x, z, z), batch_size=4, shuffle=False)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))  # 6: the last batch is partial


CPU = torch.device("cpu")


@torch.no_grad()
def direct(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and pooled features of the whole tensor at once, from the model's own methods (no loader, no views)."""
    f = model.features(x)
    return model.head_module.probs(model.head_module(f)).numpy(), f.numpy()


def test_identity_equals_the_model_called_directly(images, linear):
    model = linear
    probs, feats = direct(model, images)
    with torch.no_grad():
        assert np.allclose(model.probs(images).numpy(), probs, atol=1e-6)  # Net.probs: the same thing by another route
    for views in (None, ["identity"]):  # the default is [identity]
        given: dict[str, Any] = {"views": views} if views else {}  # none: predict's default
        out = predict(model, loader(images), CPU, keep_views=True, **given)
        assert list(out) == ["probs", "embeddings", "view_probs"]
        assert out["probs"].shape == (6, 5) and out["embeddings"].shape == feats.shape and out["view_probs"].shape == (1, 6, 5)
        assert all(v.dtype == np.float32 for v in out.values())
        assert np.allclose(out["probs"], probs, atol=1e-6) and np.allclose(out["embeddings"], feats, atol=1e-6)
        assert np.array_equal(out["view_probs"][0], out["probs"])
    assert list(predict(model, loader(images), CPU, features=False)) == ["probs"]
    assert list(predict(model, loader(images), CPU, probs=False)) == ["embeddings"]


def test_features_only_of_a_plain_timm_model(images):
    """knn_baseline embeds with a bare timm backbone (no head): `probs=False` gives its pooled pre-logits features."""
    torch.manual_seed(0)
    backbone = build_model("resnet10t", 0, "none").eval()
    out = predict(backbone, loader(images), CPU, probs=False)
    with torch.no_grad():
        expected = backbone(images).numpy()  # num_classes=0: timm's forward is forward_head(pre_logits)
    assert list(out) == ["embeddings"] and out["embeddings"].shape == expected.shape
    assert np.allclose(out["embeddings"], expected, atol=1e-6)


def test_empty_loader_gives_empty_arrays(linear):
    out = predict(linear, [], CPU, views=["identity", "hflip"], keep_views=True)
    assert {k: v.shape for k, v in out.items()} == {"probs": (0, 0), "embeddings": (0, 0), "view_probs": (2, 0, 0)}


def test_scores_from_the_head_output(images, linear):
    """`scores` (the ablation's energy) is computed from each view's head output and averaged over views."""
    def energy(out):
        return {"energy": -torch.logsumexp(out.logits.float(), dim=1)}

    with torch.no_grad():
        logits = linear.head_module(linear.features(images)).logits
        flipped = linear.head_module(linear.features(images.flip(-1))).logits
    out = predict(linear, loader(images), CPU, features=False, scores=energy)
    assert list(out) == ["probs", "energy"] and out["energy"].shape == (6,)
    assert np.allclose(out["energy"], -torch.logsumexp(logits, 1).numpy(), atol=1e-5)
    two = predict(linear, loader(images), CPU, views=["identity", "hflip"], features=False, scores=energy)
    assert np.allclose(two["energy"], -(torch.logsumexp(logits, 1) + torch.logsumexp(flipped, 1)).numpy() / 2, atol=1e-5)


def test_hflip_of_symmetric_images_changes_nothing(images, linear):
    model = linear
    sym = (images + images.flip(-1)) / 2
    one = predict(model, loader(sym), CPU, views=["identity"])
    two = predict(model, loader(sym), CPU, views=parse_views(["identity", "hflip"]))
    assert np.allclose(one["probs"], two["probs"], atol=1e-5) and np.allclose(one["embeddings"], two["embeddings"], atol=1e-5)


@pytest.mark.parametrize("mode", ["prob", "log"])
def test_two_views_combine_the_separate_predictions(images, linear, mode):
    model = linear
    p0, f0 = direct(model, images)
    p1, f1 = direct(model, images.flip(-1))
    out = predict(model, loader(images), CPU, views=["identity", "hflip"], mode=mode, keep_views=True)
    assert np.allclose(out["view_probs"], np.stack([p0, p1]), atol=1e-5)
    assert np.allclose(out["probs"], combine([p0, p1], mode), atol=1e-5)
    assert np.allclose(out["embeddings"], (f0 + f1) / 2, atol=1e-5)  # embeddings: the mean over views
    assert not np.allclose(out["probs"], p0, atol=1e-4)


def test_multi_head_probs_per_head(images, multi):
    model = multi
    one = predict(model, loader(images), CPU)
    hp = one["head_probs"]
    assert hp.shape == (6, 3, 5) and np.allclose(hp.sum(-1), 1.0, atol=1e-5)
    assert not np.allclose(hp[:, 0], hp[:, 1])
    # the multi head's logits are the mean of its heads' logits, so its probs are the heads' renormalised geometric mean
    assert np.allclose(combine(hp.transpose(1, 0, 2), "log"), one["probs"], atol=1e-5)
    two = predict(model, loader(images), CPU, views=["identity", "rotate10"], mode="log")
    assert two["head_probs"].shape == (6, 3, 5)
    assert np.allclose(combine(two["head_probs"].transpose(1, 0, 2), "log"), two["probs"], atol=1e-5)


# ----------------------------------------------------------------------------- config


def test_config_section_and_validation():
    cfg = load_config(None)
    assert cfg.tta.views == ["identity"] and cfg.tta.mode == "prob"
    cfg = load_config("configs/fathomnet2025.yaml", ["tta.views=[identity, hflip+rot90, rotate-10, scale0.9]", "tta.mode=log"])
    assert len(parse_views(cfg.tta.views)) == 4 and cfg.tta.mode == "log"
    with pytest.raises(ConfigError, match=r"tta.views: Unknown TTA view 'flip'; use identity"):
        load_config(None, ["tta.views=[identity, flip]"])
    with pytest.raises(ConfigError, match="tta.views: No TTA view"):
        load_config(None, ["tta.views=[]"])
    with pytest.raises(ConfigError, match="tta.mode"):
        load_config(None, ["tta.mode=geo"])


def test_tta_reruns_pseudo_and_submit_only():
    assert "tta" in SPECS["02_pseudo"].sections and "tta" in SPECS["04_submit"].sections
    assert all("tta" not in s.sections for n, s in SPECS.items() if n not in ("02_pseudo", "03_retrain", "04_submit"))  # 03: rounds 2.. pseudo-label


def test_views_apply_to_each_context_view_alike():
    """A (N, V, C, H, W) stack of context views: every view gets the same transform."""
    x = torch.randn(2, 3, 3, 8, 8)
    for name in ("hflip", "rot90", "rotate10", "scale0.9"):
        (view,) = parse_views([name])
        y = view(x)
        assert y.shape == x.shape
        assert torch.allclose(y[:, 1], view(x[:, 1]), atol=1e-6)


@pytest.mark.parametrize("cap", [None, 0])
def test_fold_models_share_one_decode_of_the_inputs(images, monkeypatch, cap):
    """predict_folds_tta decodes the crops once for every fold model (same eval transform), and
    streams them per model when they would not fit; the probabilities are the same either way."""
    import lib.data.dataset
    import lib.engine.inference
    import lib.model.checkpoint

    models = {"fold_0": net(), "fold_1": net("linear")}
    with torch.no_grad():
        for p in models["fold_1"].parameters():
            p.add_(0.05)  # a different model on the same inputs
    decodes: list[int] = []

    def counted_make_loader(*a, **k):
        decodes.append(1)
        return loader(images)

    monkeypatch.setattr(lib.model.checkpoint, "load_fold_model", lambda d, cfg, tax, device: models[d.name])
    monkeypatch.setattr(lib.data.dataset, "make_loader", counted_make_loader)
    if cap is not None:
        monkeypatch.setattr(lib.engine.inference, "DECODED_CAP_BYTES", cap)
    from pathlib import Path

    cfg = load_config(None, [f"model.img_size={SIZE}", "tta.views=[identity, hflip]"])
    out = lib.engine.inference.predict_folds_tta([Path("fold_0"), Path("fold_1")], [f"c{i}.png" for i in range(len(images))], cfg, toy(),
                                                 CPU)
    assert len(decodes) == (1 if cap is None else 2)
    assert out["probs"].shape == (2, len(images), 5) and out["embeddings"].shape[:2] == (2, len(images))
    for i, name in enumerate(models):
        alone = predict(models[name], loader(images), CPU, views=[view("identity"), view("hflip")])
        np.testing.assert_allclose(out["probs"][i], alone["probs"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out["probs"][0], out["probs"][1])
