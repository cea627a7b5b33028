"""Context views: how the features of the crops a model reads per ROI are joined (`model.fusion`).

The 1st and 2nd places of FathomNet 2025 read the ROI together with wider crops around it
(the habitat and neighbours tell a sea pen from a soft coral when the ROI alone cannot).
`model.context` names the views ("1" = the ROI, "3" = the 3x context crop, "full" = the
frame); lib.model.streams gives each view's pooled features (N, V, F) and, for cross_attention,
its tokens. `ContextFusion` joins them:
- `concat`: the head sees all views side by side;
- `attention`: the ROI's pooled feature attends to every view's pooled feature (one vector per view);
- `cross_attention`: the 1st place's Multi-Context Environmental Attention Module (MATANet,
  dhlee-project/fathomnet-cvpr2025-ssl src/model.py): per context view, a stack of blocks in which
  the ROI token queries that view's patch tokens (post-norm: q = LN(q + MHA(q, kv)), q = LN(q + MLP(q)),
  the keys and values the view's tokens in every block), at the features' size or at `model.fusion_width`. MATANet concatenates the ROI token with the
  views' outputs and projects the concatenation; here each view's output goes through its own
  projection, zero-initialised, and is added to the ROI token: the same linear span, and a fresh
  fusion returns the ROI's features exactly (the model starts as the ROI-only model, as frame attention does);
- `entropy_gate`: the 2nd place's uncertainty gate: the model's own head reads each view's features
  alone, and the entropy of that prediction (detached: a view cannot win the gate by inflating its
  confidence) weights the view, w = softmax(-H / tau + b) over views with a learned temperature and
  bias; the head then reads sum_v w_v f_v. For a linear head that is exactly the w-weighted mean of
  the views' own logits (the gate over the streams' predictions); every view's prediction also learns
  from its own cross-entropy (`model.gate_aux_weight`, through `view_logits` in the head output's aux),
  which keeps the views' features in the one space the head reads.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib.core.errors import StageError

FUSIONS = ("concat", "attention", "cross_attention", "entropy_gate")


def _n_heads(dim: int, wanted: int = 8) -> int:
    """The most heads up to `wanted` that split `dim` evenly."""
    return next(h for h in range(min(wanted, dim), 0, -1) if dim % h == 0)


class ContextBlock(nn.Module):
    """One MCEAM block: the ROI query attends to one view's tokens, then an MLP; both post-norm residuals, as MATANet's."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (N, 1, D), kv (N, T, D) -> (N, 1, D) and, with `keep`, the head-averaged weights (N, T)."""
        out, weights = self.attn(q, kv, kv, need_weights=keep)
        q = self.norm1(q + out)
        return self.norm2(q + self.mlp(q)), (weights[:, 0] if weights is not None else None)


class CrossAttention(nn.Module):
    """(N, V, D) pooled views and the context views' tokens -> (N, D): the ROI plus what it read in each view's tokens."""

    def __init__(self, dim: int, n_views: int, blocks: int, heads: int, dropout: float, width: int = 0):
        super().__init__()
        width = width or dim
        # width < dim: the ROI token and the tokens are projected down once (shared), the blocks run there: a block costs
        # ~6 width^2 weights, 10 M at lite0's 1280 features, so on small data the fusion need not outweigh the backbone
        self.down = nn.Identity() if width == dim else nn.Linear(dim, width)
        self.view_embed = nn.Parameter(torch.zeros(n_views - 1, width))  # tells the context views' tokens apart
        nn.init.normal_(self.view_embed, std=0.02)
        self.stacks = nn.ModuleList(nn.ModuleList(ContextBlock(width, _n_heads(width, heads), dropout) for _ in range(blocks))
                                    for _ in range(n_views - 1))
        projections = [nn.Linear(width, dim) for _ in range(n_views - 1)]
        for proj in projections:  # zero: a fresh fusion is the ROI-only model
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.out = nn.ModuleList(projections)
        self.keep_weights = False  # set to keep the last block's attention weights per view (lib.report.attention)
        self.last_weights: list[torch.Tensor | None] = []

    def forward(self, f: torch.Tensor, tokens: list[torch.Tensor | None], present: torch.Tensor | None = None) -> torch.Tensor:
        """`tokens[v - 1]` (N, T_v, D) are context view v's tokens (None: that view is left out); `present` (N, V) bool hides
        a row's missing views. A view left out or hidden adds nothing, so with none the result is the ROI's features."""
        if len(tokens) != len(self.stacks):
            raise ValueError(f"{len(tokens)} token sets for {len(self.stacks)} context views; give one per view (None to leave one out).")
        roi = f[:, 0]
        fused, query = roi, self.down(roi)
        self.last_weights = []
        stacks: list[Any] = list(self.stacks)  # ModuleLists of ContextBlocks
        for v, (kv, stack, proj) in enumerate(zip(tokens, stacks, self.out)):
            if kv is None:
                self.last_weights.append(None)
                continue
            kv = self.down(kv) + self.view_embed[v].to(kv.dtype)
            q, weights = query[:, None], None
            for block in stack:
                q, weights = block(q, kv, self.keep_weights)
            self.last_weights.append(weights)
            add = proj(q[:, 0])
            if present is not None:
                add = add * present[:, v + 1, None].to(add.dtype)
            fused = fused + add
        return fused


class EntropyGate(nn.Module):
    """(N, V, D) views and the head -> (N, D): each view weighted by the confidence of the head's prediction on it alone."""

    def __init__(self, n_views: int):
        super().__init__()
        self.log_tau = nn.Parameter(torch.zeros(()))  # gate temperature, learned (starts at 1)
        self.bias = nn.Parameter(torch.zeros(n_views))  # a prior preference per view, learned

    def forward(self, f: torch.Tensor, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused (N, D), the views' own leaf logits (N, V, C) and the gate's weights (N, V)."""
        n, v = f.shape[:2]
        logits = head(f.flatten(0, 1)).logits.float().view(n, v, -1)
        weights = gate_weights(logits.detach(), self.log_tau.exp(), self.bias)
        return (weights.to(f.dtype)[..., None] * f).sum(1), logits, weights


def gate_weights(logits: torch.Tensor, tau: torch.Tensor | float, bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """softmax over views of (-H_v / tau + b_v), H_v the entropy (nats) of view v's softmax: the surer view counts more."""
    logp = F.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.softmax(-entropy / tau + bias, dim=1)


class ContextFusion(nn.Module):
    """(N, V, F) view features (and the context views' tokens for cross_attention) -> (N, out_dim)."""

    def __init__(self, dim: int, n_views: int, mode: str, blocks: int = 1, heads: int = 8, dropout: float = 0.0, width: int = 0):
        super().__init__()
        self.mode, self.n_views = mode, n_views
        self.needs_tokens = mode == "cross_attention"
        self.out_dim = dim * n_views if mode == "concat" else dim
        if mode == "attention":
            self.view_embed = nn.Parameter(torch.zeros(n_views, dim))  # tells the views apart
            nn.init.normal_(self.view_embed, std=0.02)
            self.attn = nn.MultiheadAttention(dim, _n_heads(dim), batch_first=True)
            self.norm = nn.LayerNorm(dim)
        elif mode == "cross_attention":
            self.cross = CrossAttention(dim, n_views, blocks, heads, dropout, width)
        elif mode == "entropy_gate":
            self.gate = EntropyGate(n_views)
        elif mode != "concat":
            raise StageError(f"Unknown model.fusion '{mode}'; choose one of {', '.join(FUSIONS)}.")

    def fuse(self, f: torch.Tensor, tokens: list[torch.Tensor | None] | None = None, present: torch.Tensor | None = None,
             head: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The fused features and what training adds to the head's aux (entropy_gate: `view_logits` (N, V, C), the head's
        prediction on each view alone; the gate needs the `head`)."""
        if self.mode == "concat":
            return f.flatten(1), {}
        if self.mode == "cross_attention":
            if tokens is None:
                raise ValueError("cross_attention needs the context views' tokens; give tokens (lib.model.streams.encode).")
            return self.cross(f, tokens, present), {}
        if self.mode == "entropy_gate":
            if head is None:
                raise ValueError("entropy_gate weighs the views by the head's prediction on each; give the head.")
            fused, logits, _ = self.gate(f, head)
            return fused, {"view_logits": logits}
        kv = f + self.view_embed.to(f.dtype)
        out, _ = self.attn(kv[:, :1], kv, kv, need_weights=False)
        return self.norm(f[:, 0] + out[:, 0]), {}  # residual on the ROI: with no useful context it stays the ROI

    def forward(self, f: torch.Tensor, tokens: list[torch.Tensor | None] | None = None, present: torch.Tensor | None = None,
                head: nn.Module | None = None) -> torch.Tensor:
        return self.fuse(f, tokens, present, head)[0]
