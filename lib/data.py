"""Dataset over cached crops: image, label and a per-sample loss weight (pseudo-label confidence)."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset


class CropDataset(Dataset):
    """Reads RGB crops from `paths`; labels -1 mean unknown (test)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None = None, weights: Sequence[float] | None = None, transform=None):
        self.paths = list(paths)
        self.labels = np.asarray(labels if labels is not None else [-1] * len(self.paths), dtype=np.int64)
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(self.paths), dtype=np.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, float]:
        img = cv2.imread(self.paths[i], cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"crop {self.paths[i]} could not be read; rerun 00_prepare_data.py --force")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return img, int(self.labels[i]), float(self.weights[i])
