"""Inference: class probabilities and pooled embeddings of crops, batched, on CPU or CUDA.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lib.data.dataset import make_loader
from lib.model.checkpoint import load_fold_model
from lib.model.device import autocast, channels_last
from lib.model.net import mean_std


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, features: bool = False, desc: str = "predict") -> np.ndarray:
    """Softmax probabilities (or pooled features when `features`) for every item of `loader`."""
    model.eval()
    out = []
    for x, _, _ in tqdm(loader, desc=desc, leave=False, unit="batch"):
        x = channels_last(x.to(device, non_blocking=True))
        with autocast(device):
            if features:
                y = model.features(x) if hasattr(model, "features") else model.forward_head(model.forward_features(x), pre_logits=True)
            else:
                y = model.probs(x) if hasattr(model, "probs") else torch.softmax(model(x).float(), dim=1)
        out.append(y.float().cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def predict_with_features(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "predict") -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and the pooled (penultimate) features of a `Net`, in one pass."""
    model.eval()
    probs, feats = [], []
    for x, _, _ in tqdm(loader, desc=desc, leave=False, unit="batch"):
        x = channels_last(x.to(device, non_blocking=True))
        with autocast(device):
            f = model.features(x)
            p = model.head_module.probs(model.head_module(f))
        probs.append(p.float().cpu())
        feats.append(f.float().cpu())
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


def predict_folds(fold_dirs: Sequence[Path], paths: Sequence, cfg, taxonomy, device: torch.device) -> np.ndarray:
    """Per-fold probabilities, shape (folds, items, classes)."""
    out = []
    for d in fold_dirs:
        model = load_fold_model(d, cfg, taxonomy, device)
        mean, std = mean_std(model)
        loader = make_loader(paths, img_size=cfg.model.img_size, mean=mean, std=std, batch_size=cfg.train.eval_batch_size,
                             num_workers=cfg.train.num_workers, device=device)
        out.append(predict(model, loader, device, desc=f"predict {d.name}"))
    return np.stack(out) if out else np.zeros((0, len(paths), taxonomy.n_classes), dtype=np.float32)
