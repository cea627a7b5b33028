"""albumentations pipelines built from the config (train and eval)."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402


def build_transforms(img_size: int, train: bool, mean: tuple[float, ...], std: tuple[float, ...]) -> A.Compose:
    """Train: resize, flips, small affine, colour jitter; eval: resize only. Both normalise."""
    ops: list = [A.Resize(img_size, img_size)]
    if train:
        ops += [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.85, 1.15), translate_percent=(-0.05, 0.05), rotate=(-15, 15), p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]
    ops += [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(ops)
