"""Dataset over cached crops: image(s), label and a per-sample loss weight (pseudo-label confidence)."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lib.data.augment import build_transforms


def read_rgb(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"crop {path} could not be read; rerun 00_prepare_data.py --force")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class CropDataset(Dataset):
    """Reads RGB crops from `paths`; labels -1 mean unknown (test).

    An item of `paths` may be a tuple of view paths (ROI first, then its context crops): the
    views then get the same random augmentation (albumentations additional targets, built by
    `build_transforms(..., n_views=V)`) and come back stacked as one (V, 3, H, W) tensor.
    """

    def __init__(self, paths: Sequence, labels: Sequence[int] | None = None, weights: Sequence[float] | None = None, transform=None):
        self.paths = list(paths)
        self.labels = np.asarray(labels if labels is not None else [-1] * len(self.paths), dtype=np.int64)
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(self.paths), dtype=np.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | np.ndarray, int, float]:
        item = self.paths[i]
        if isinstance(item, (tuple, list)):
            imgs = [read_rgb(p) for p in item]
            h, w = imgs[0].shape[:2]
            imgs = [im if im.shape[:2] == (h, w) else cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in imgs]
            if self.transform is None:
                return torch.stack([torch.from_numpy(im) for im in imgs]), int(self.labels[i]), float(self.weights[i])
            out = self.transform(image=imgs[0], **{f"image{v}": im for v, im in enumerate(imgs[1:], 1)})
            return torch.stack([out["image"], *(out[f"image{v}"] for v in range(1, len(imgs)))]), int(self.labels[i]), float(self.weights[i])
        img = read_rgb(item)
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return img, int(self.labels[i]), float(self.weights[i])



def make_loader(paths: Sequence, *, img_size: int, mean, std, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Eval loader over crop paths, or over tuples of view paths (lib.context.model_inputs)."""
    n_views = len(paths[0]) if len(paths) and isinstance(paths[0], (tuple, list)) else 1
    ds = CropDataset(paths, transform=build_transforms(img_size, train=False, mean=mean, std=std, n_views=n_views))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
