"""Augmentation: the config section, the albumentations pipelines, and batch mixing (lib.data.mix)."""
import dataclasses
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2

from lib.config import AugmentCfg, ConfigError, load_config
from lib.data.augment import build_transforms
from lib.data.mix import mix_batch, soft_target_loss

S = 48
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# config key -> the albumentations type it adds to the train pipeline
OP_TYPES = {
    "hflip": A.HorizontalFlip, "vflip": A.VerticalFlip, "affine": A.Affine, "grid_distortion": A.GridDistortion,
    "elastic": A.ElasticTransform, "downscale": A.Downscale, "blur": A.OneOf,
    "brightness_contrast": A.RandomBrightnessContrast, "clahe": A.CLAHE, "hue_saturation": A.HueSaturationValue,
    "rgb_shift": A.RGBShift, "fog": A.RandomFog, "rain": A.RandomRain, "coarse_dropout": A.CoarseDropout,
}
FRAME = [A.Resize, A.Normalize, ToTensorV2]


def only(**probs: Any) -> AugmentCfg:
    """A config with every op off except `probs` (which may also set an op's parameters, such as downscale_range)."""
    return dataclasses.replace(AugmentCfg(), **{**{k: 0.0 for k in OP_TYPES}, **probs})


def types(compose: A.Compose) -> list[type]:
    return [type(t) for t in compose.transforms]


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- config


def test_defaults_load_and_keep_the_demo_pipeline():
    cfg = load_config("configs/demo.yaml")
    a = cfg.augment
    assert a == AugmentCfg() and cfg.train.sampler == "random"
    assert a.hflip > 0 and a.affine > 0 and a.downscale > 0 and a.rgb_shift > 0 and not a.mixing
    assert a.r_shift[1] <= 10 and a.b_shift[1] >= 30  # bluer, dimmer test light


def test_overrides_reach_augment():
    a = load_config(None, ["augment.fog=0.2", "augment.scale=[0.9, 1.1]", "augment.mixup_alpha=0.4"]).augment
    assert a.fog == 0.2 and a.scale == [0.9, 1.1] and a.mixing


def test_probability_out_of_range_is_one_sentence():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["augment.hflip=1.5"])
    msg = str(e.value)
    assert msg == "augment.hflip is a probability and must lie in [0, 1], got 1.5; fix it in the config or on the command line."


@pytest.mark.parametrize("override,msg", [
    ("augment.mix_prob=-0.1", "augment.mix_prob is a probability"), ("augment.scale=[1.2, 0.8]", "augment.scale"),
    ("augment.scale=[0, 1]", "augment.scale"), ("augment.downscale_range=[0.5, 1.5]", "augment.downscale_range"),
    ("augment.downscale_range=[0.9, 0.3]", "augment.downscale_range"), ("augment.r_shift=[10, -10]", "r_shift"),
    ("augment.mixup_alpha=-1", "mixup_alpha"), ("augment.rotate=-5", "augment.rotate"), ("augment.translate=1", "augment.translate"),
])
def test_range_checks(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_unknown_augment_key_suggests():
    with pytest.raises(ConfigError, match=r"did you mean 'augment.hflip'\?"):
        load_config(None, ["augment.hflp=0.5"])


# ----------------------------------------------------------------------------- pipelines


def test_eval_is_resize_and_normalise(rgb):
    tf = build_transforms(S, train=False, mean=MEAN, std=STD)
    assert types(tf) == FRAME
    out = tf(image=rgb)["image"]
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    const = tf(image=np.full((30, 40, 3), 128, np.uint8))["image"]
    assert torch.allclose(const, torch.full_like(const, (128 / 255 - 0.5) / 0.5), atol=1e-5)  # ~0.0039


def test_old_call_signature_uses_defaults():
    tf = build_transforms(S, True, MEAN, STD)
    expected = {OP_TYPES[k] for k, p in AugmentCfg().probabilities().items() if k in OP_TYPES and p > 0}
    assert set(types(tf)) - set(FRAME) == expected
    assert {A.HorizontalFlip, A.Affine, A.Downscale, A.RGBShift} <= expected


def test_train_pipeline_has_exactly_the_enabled_ops():
    assert types(build_transforms(S, True, MEAN, STD, only())) == FRAME
    for key, tp in OP_TYPES.items():
        assert types(build_transforms(S, True, MEAN, STD, only(**{key: 0.3}))) == [A.Resize, tp, A.Normalize, ToTensorV2], key
    every = build_transforms(S, True, MEAN, STD, only(**{k: 0.5 for k in OP_TYPES}))
    assert sorted(t.__name__ for t in types(every)[1:-2]) == sorted(t.__name__ for t in OP_TYPES.values())
    assert all(t.p == 0.5 for t in every.transforms[1:-2])


@pytest.mark.parametrize("key", sorted(OP_TYPES))
def test_each_op_runs_at_p1(key, rgb):
    for size in (S, 16):
        tf = build_transforms(size, True, MEAN, STD, only(**{key: 1.0}))
        tf.set_random_seed(1)
        out = tf(image=rgb)["image"]
        assert out.shape == (3, size, size) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_all_ops_together(rgb):
    tf = build_transforms(S, True, MEAN, STD, only(**{k: 1.0 for k in OP_TYPES}))
    assert tf(image=rgb)["image"].shape == (3, S, S)


def test_seeded_reproducible(rgb):
    tf = build_transforms(S, True, MEAN, STD, only(**{k: 0.5 for k in OP_TYPES}))

    def run(seed: int) -> torch.Tensor:
        tf.set_random_seed(seed)
        return torch.stack([tf(image=rgb)["image"] for _ in range(4)])

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_downscale_removes_high_frequencies():
    noise = np.random.default_rng(3).integers(0, 256, (S, S, 3), dtype=np.uint8)
    aug = only(downscale=1.0, downscale_range=[0.3, 0.5])

    def lap_std(img: np.ndarray) -> float:
        return float(cv2.Laplacian(img.astype(np.float32), cv2.CV_32F).std())

    plain = build_transforms(S, True, (0, 0, 0), (1, 1, 1), only())(image=noise)["image"].permute(1, 2, 0).numpy()
    down = build_transforms(S, True, (0, 0, 0), (1, 1, 1), aug)(image=noise)["image"].permute(1, 2, 0).numpy()
    assert lap_std(down) < 0.5 * lap_std(plain)


# ----------------------------------------------------------------------------- batch mixing


def batch(n: int = 8, c: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 16, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    w = torch.rand(n, generator=g) + 0.5
    return x, y, w, c


def test_mixup_is_a_convex_combination():
    x, y, w, c = batch()
    xm, ys, wm, info = mix_batch(x, y, w, n_classes=c, mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0,
                                 generator=torch.Generator().manual_seed(1), return_info=True)
    assert info.kind == "mixup" and 0.0 <= info.lam <= 1.0
    assert sorted(info.partner.tolist()) == list(range(len(y)))  # a permutation
    p, lam = info.partner, info.lam
    assert torch.allclose(xm, lam * x + (1 - lam) * x[p], atol=1e-6)
    assert ys.dtype == torch.float32 and ys.shape == (len(y), c) and (ys >= 0).all()
    assert torch.allclose(ys.sum(1), torch.ones(len(y)))
    assert torch.allclose(ys, lam * F.one_hot(y, c).float() + (1 - lam) * F.one_hot(y[p], c).float())
    assert torch.allclose(wm, lam * w + (1 - lam) * w[p])


def test_cutmix_pastes_the_partner_and_weights_by_area():
    x, y, w, c = batch(seed=2)
    for seed in range(5):
        xm, ys, _, info = mix_batch(x, y, w, n_classes=c, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0,
                                    generator=torch.Generator().manual_seed(seed), return_info=True)
        assert info.kind == "cutmix"
        y1, y2, x1, x2 = info.box
        inside = torch.zeros(x.shape[-2:], dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        p = info.partner
        assert torch.equal(xm[..., inside], x[p][..., inside]) and torch.equal(xm[..., ~inside], x[..., ~inside])
        unpasted = 1 - inside.float().mean().item()
        assert info.lam == pytest.approx(unpasted)
        expected = unpasted * F.one_hot(y, c).float() + (1 - unpasted) * F.one_hot(y[p], c).float()
        assert torch.allclose(ys, expected, atol=1e-6)


def test_both_alphas_pick_both_methods():
    x, y, w, c = batch()
    kinds = {mix_batch(x, y, w, n_classes=c, mixup_alpha=0.4, cutmix_alpha=1.0, prob=1.0, generator=torch.Generator().manual_seed(s),
                       return_info=True)[3].kind for s in range(20)}
    assert kinds == {"mixup", "cutmix"}


def test_prob_zero_returns_the_batch_one_hot():
    x, y, w, c = batch()
    xm, ys, wm = mix_batch(x, y, w, n_classes=c, mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.0,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(xm, x) and torch.equal(wm, w) and torch.equal(ys, F.one_hot(y, c).float())
    xm, ys, _ = mix_batch(x, y, w, n_classes=c, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0)  # both alphas off
    assert torch.equal(xm, x) and torch.equal(ys, F.one_hot(y, c).float())


def test_mix_prob_is_the_chance_of_mixing():
    x, y, w, c = batch()
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would dominate the loop
    try:
        mixed = sum(mix_batch(x, y, w, n_classes=c, mixup_alpha=0.4, cutmix_alpha=0.0, prob=0.3, generator=g, return_info=True)[3].kind
                    != "none" for _ in range(2000))
    finally:
        torch.set_num_threads(threads)
    assert abs(mixed / 2000 - 0.3) < 0.04


def test_same_leaf_keeps_targets_one_hot():
    y = torch.tensor([0, 2, 0, 1, 2, 2, 0, 1, 3])  # class 3 is alone
    x = torch.randn(len(y), 3, 12, 16, generator=torch.Generator().manual_seed(0))
    w = torch.ones(len(y))
    for alphas in ((0.4, 0.0), (0.0, 1.0)):
        for seed in range(3):
            _, ys, _, info = mix_batch(x, y, w, n_classes=4, mixup_alpha=alphas[0], cutmix_alpha=alphas[1], prob=1.0, same_leaf=True,
                                       generator=torch.Generator().manual_seed(seed), return_info=True)
            assert info.kind != "none" and torch.equal(y[info.partner], y)
            assert torch.equal(ys, F.one_hot(y, 4).float())
            assert info.partner[-1] == len(y) - 1  # alone: its own partner
            assert (info.partner[:-1] != torch.arange(len(y) - 1)).all()  # others get another sample


def test_mix_is_deterministic_given_the_generator():
    x, y, w, c = batch()
    a = mix_batch(x, y, w, n_classes=c, mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.7, generator=torch.Generator().manual_seed(5))
    b = mix_batch(x, y, w, n_classes=c, mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.7, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_soft_target_loss_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, generator=g)
    y = torch.randint(0, 7, (10,), generator=g)
    w = torch.rand(10, generator=g)
    onehot = F.one_hot(y, 7).float()
    assert torch.allclose(soft_target_loss(logits, onehot), F.cross_entropy(logits, y), atol=1e-6)
    per = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(soft_target_loss(logits, onehot, w), (per * w).sum() / w.sum(), atol=1e-6)
    soft = torch.softmax(torch.randn(10, 7, generator=g), 1)
    assert torch.allclose(soft_target_loss(logits, soft), -(soft * logits.log_softmax(1)).sum(1).mean())
