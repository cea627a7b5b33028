"""Inference: class probabilities and pooled embeddings of crops, batched, on CPU or CUDA."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lib.augment import build_transforms
from lib.data import CropDataset
from lib.models import build_net, channels_last, mean_std
from lib.stages import StageError


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU, where fp32 is both faster and exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_loader(paths: Sequence, img_size: int, mean, std, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Eval loader over crop paths, or over tuples of view paths (lib.context.model_inputs)."""
    n_views = len(paths[0]) if len(paths) and isinstance(paths[0], (tuple, list)) else 1
    ds = CropDataset(paths, transform=build_transforms(img_size, train=False, mean=mean, std=std, n_views=n_views))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")


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


def load_checkpoint(path: Path) -> dict:
    """A checkpoint saved by lib.train; loaded with weights_only=True (no pickle)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StageError(f"Checkpoint '{path}' is missing; rerun the training stage.")
    except Exception as e:
        raise StageError(f"Checkpoint '{path}' cannot be loaded safely ({type(e).__name__}); delete it and rerun the training stage.")


def load_fold_model(fold_dir: Path, cfg, taxonomy, device: torch.device) -> nn.Module:
    """The best model of one fold, ready for inference (architecture from `cfg.model` and `cfg.head`)."""
    ckpt = load_checkpoint(fold_dir / "best.pt")
    model = build_net(cfg, taxonomy, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise StageError(f"Checkpoint '{fold_dir / 'best.pt'}' does not fit the configured model or head; rerun the training stage.")
    model.to(device)
    model = model.to(memory_format=torch.channels_last)  # faster on CUDA and on CPU alike
    return model.eval()


def predict_folds(fold_dirs: Sequence[Path], paths: Sequence, cfg, taxonomy, device: torch.device) -> np.ndarray:
    """Per-fold probabilities, shape (folds, items, classes)."""
    out = []
    for d in fold_dirs:
        model = load_fold_model(d, cfg, taxonomy, device)
        mean, std = mean_std(model)
        loader = make_loader(paths, cfg.model.img_size, mean, std, cfg.train.eval_batch_size, cfg.train.num_workers, device)
        out.append(predict(model, loader, device, desc=f"predict {d.name}"))
    return np.stack(out) if out else np.zeros((0, len(paths), taxonomy.n_classes), dtype=np.float32)
