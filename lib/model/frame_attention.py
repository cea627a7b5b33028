"""Frame context learned end to end: each ROI's features attend to those of the other ROIs of its frame.

In FathomNet most ROIs share their frame with others, and a frame's animals are often of one
species (a field, a colony), so what the siblings look like says much about each ROI. With
`model.frame_context: attention`, `FrameAttention` runs after the backbone and the context fusion
and before the head: pre-norm transformer blocks (multi-head self-attention with a key padding
mask, then an MLP, each added back as a residual) over the embeddings of the ROIs of one frame.
The blocks work at `model.frame_width` (smaller than the backbone's features: the attention costs
a small fraction of the backbone), projected down and back up; both residual branches end in a
zero-initialised projection, so a fresh layer is the identity and training starts from the plain
ROI model. In training, `model.frame_dropout` hides each sibling from each ROI with that chance
(a fresh draw every batch; the ROI itself is always seen), so a training ROI never meets one fixed
context it could memorise; inference sees every sibling.

A batch holds the ROIs of several frames (rows of one frame together, `frames` their frame ids);
`frame_layout` gathers them into a padded (frames, slots, D) tensor and a mask, so an ROI sees
its own frame's ROIs and nothing else: padded slots are masked out of every softmax (exp(-inf) = 0),
and the attention has no positions, so the order of the siblings changes nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib.core.errors import StageError


def frame_layout(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each row of a batch goes in the padded (G, S) layout: (group, slot) per row and the (G, S) mask of real slots.

    Groups are the distinct values of `frames` (any integer ids), slots follow the rows' order
    within a group; S is the largest group.
    """
    groups, group, counts = torch.unique(frames, return_inverse=True, return_counts=True)
    order = torch.argsort(group, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(group)
    slot[order] = torch.arange(len(group), device=group.device) - starts[group[order]]
    width = int(counts.max().item()) if len(counts) else 0
    real = torch.arange(width, device=group.device)[None, :] < counts[:, None]
    return group, slot, real


def visible(real: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """(G, S, S): which slots each slot attends to: the real slots of its frame; with `dropout` (training) each sibling is
    hidden with that chance, the slot itself never, so an ROI does not learn to rely on one fixed set of siblings."""
    s = real.shape[1]
    seen = real[:, None, :].expand(-1, s, -1)
    if dropout <= 0:
        return seen
    keep = torch.rand(real.shape[0], s, s, device=real.device) >= dropout
    return seen & (keep | torch.eye(s, dtype=torch.bool, device=real.device))


class FrameBlock(nn.Module):
    """One pre-norm transformer block over (G, S, D) sets: x + attn(norm(x)), then + mlp(norm(x)); masked slots are never attended."""

    def __init__(self, dim: int, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise StageError(f"model.frame_width {width} does not split into model.frame_heads {heads} heads; make it a multiple of it.")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * width)
        self.proj = nn.Linear(width, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, width), nn.Linear(width, dim)
        for last in (self.proj, self.fc2):  # residual branches start at zero: the block starts as the identity
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """`seen` (G, S, S): which slots each slot may attend to (True = may)."""
        g, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(g, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (G, H, S, W/H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=seen[:, None])
        x = x + self.proj(a.transpose(1, 2).reshape(g, s, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FrameAttention(nn.Module):
    """(N, D) ROI features and their (N,) frame ids -> (N, D) features that have seen their frame's other ROIs."""

    def __init__(self, dim: int, width: int = 256, heads: int = 4, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.blocks = nn.ModuleList(FrameBlock(dim, width, heads) for _ in range(layers))

    def forward(self, f: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape != f.shape[:1]:
            raise ValueError(f"frame ids of shape {tuple(frames.shape)} for {len(f)} feature rows; give one frame id per row.")
        group, slot, real = frame_layout(frames.to(f.device))
        x = f.new_zeros(real.shape[0], real.shape[1], f.shape[1])
        x[group, slot] = f
        seen = visible(real, self.dropout if self.training else 0.0)
        for block in self.blocks:
            x = block(x, seen)
        return x[group, slot]
