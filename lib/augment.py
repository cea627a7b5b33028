"""albumentations pipelines built from the config (train and eval)."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402


def build_transforms(img_size: int, train: bool, mean: tuple[float, ...], std: tuple[float, ...]) -> A.Compose:
    """Train: resize, flips, small affine, down-then-up resampling, colour shifts; eval: resize only.

    The down-then-up resampling makes small, blurry test ROIs look familiar (1st place's trick);
    the colour shifts cover the test frames' different light.
    """
    ops: list = [A.Resize(img_size, img_size)]
    if train:
        ops += [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.85, 1.15), translate_percent=(-0.05, 0.05), rotate=(-15, 15), p=0.5),
            A.Downscale(scale_range=(0.3, 0.9), interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}, p=0.4),
            A.ColorJitter(brightness=0.3, contrast=0.2, saturation=0.2, hue=0.03, p=0.6),
            A.RGBShift(r_shift_limit=(-40, 10), g_shift_limit=(-15, 15), b_shift_limit=(-10, 30), p=0.3),
        ]
    ops += [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(ops)
