"""albumentations pipelines built from the config (train and eval).

Train = resize, then the ops of `AugmentCfg` whose probability is above 0, in the order
geometry -> resolution -> blur -> colour -> water -> occlusion, then normalise. Eval = resize
and normalise only, so validation and test see the plain crop. Batch-level mixing (mixup,
cutmix) is not here: it needs two samples, see `lib.data.mix`.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from lib.config import AugmentCfg

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")




def _sym(v: float) -> tuple[float, float]:
    return (-v, v)


def _elastic(img_size: int, p: float) -> A.ElasticTransform:
    """A mild warp whose size follows the image: displacements of about 1.3% of the side (std).

    albumentations scales unit noise by alpha after a Gaussian blur of width sigma, which
    shrinks it by roughly 10 * sigma here; alpha = 0.15 * size * sigma keeps it proportional to the side.
    """
    sigma = max(2.0, 0.06 * img_size)
    return A.ElasticTransform(alpha=0.15 * img_size * sigma, sigma=sigma, p=p)


def _train_ops(aug: AugmentCfg, img_size: int) -> list[A.BasicTransform | A.BaseCompose]:
    """The enabled train ops, in application order; an op with probability 0 is left out."""
    down_up = {"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}
    candidates: list[tuple[float, Callable[[float], A.BasicTransform | A.BaseCompose]]] = [
        # geometry
        (aug.hflip, lambda p: A.HorizontalFlip(p=p)),
        (aug.vflip, lambda p: A.VerticalFlip(p=p)),
        (aug.affine, lambda p: A.Affine(scale=tuple(aug.scale), translate_percent=_sym(aug.translate), rotate=_sym(aug.rotate),
                                        shear=_sym(aug.shear), p=p)),
        (aug.grid_distortion, lambda p: A.GridDistortion(num_steps=5, distort_limit=0.3, p=p)),
        (aug.elastic, lambda p: _elastic(img_size, p)),
        # resolution: the test boxes are smaller and blurrier than train's
        (aug.downscale, lambda p: A.Downscale(scale_range=tuple(aug.downscale_range), interpolation_pair=down_up, p=p)),
        (aug.blur, lambda p: A.OneOf([A.MotionBlur(blur_limit=(3, 5)), A.MedianBlur(blur_limit=(3, 5))], p=p)),
        # colour: the test frames' light differs
        (aug.brightness_contrast, lambda p: A.RandomBrightnessContrast(brightness_limit=_sym(aug.brightness),
                                                                       contrast_limit=_sym(aug.contrast),
                                                                       brightness_by_max=False, p=p)),  # relative to the mean: dark stays dark
        (aug.clahe, lambda p: A.CLAHE(clip_limit=(1.0, 3.0), tile_grid_size=(4, 4), p=p)),
        (aug.hue_saturation, lambda p: A.HueSaturationValue(hue_shift_limit=_sym(aug.hue), sat_shift_limit=_sym(aug.saturation),
                                                            val_shift_limit=(0, 0), p=p)),
        (aug.rgb_shift, lambda p: A.RGBShift(r_shift_limit=tuple(aug.r_shift), g_shift_limit=tuple(aug.g_shift),
                                             b_shift_limit=tuple(aug.b_shift), p=p)),
        # water
        (aug.fog, lambda p: A.RandomFog(fog_coef_range=(0.1, 0.4), alpha_coef=0.08, p=p)),
        (aug.rain, lambda p: A.RandomRain(slant_range=(-10, 10), drop_width=1, drop_color=(200, 200, 200), blur_value=1,
                                          brightness_coefficient=0.9, rain_type="drizzle", p=p)),
        # occlusion
        (aug.coarse_dropout, lambda p: A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.25),
                                                       hole_width_range=(0.1, 0.25), fill=0, p=p)),
    ]
    return [make(p) for p, make in candidates if p > 0]


def build_transforms(img_size: int, train: bool, mean: Sequence[float], std: Sequence[float],
                     aug: AugmentCfg | None = None, n_views: int = 1) -> A.Compose:
    """Train: resize + the enabled ops of `aug` (None = AugmentCfg defaults); eval: resize only.

    Both end in Normalize and ToTensorV2, giving a float (3, img_size, img_size) tensor.
    `n_views` > 1 adds targets image1.. so a ROI and its context crops share one random draw.
    """
    ops: list = [A.Resize(img_size, img_size)]
    if train:
        ops += _train_ops(aug if aug is not None else AugmentCfg(), img_size)
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()]
    return A.Compose(ops, additional_targets={f"image{v}": "image" for v in range(1, n_views)})
