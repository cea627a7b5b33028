"""Classifier heads on the backbone's pooled features: `build_head(cfg, in_features, taxonomy)`.

Every head returns a `HeadOutput` whose `logits` are the leaf (concept) logits in the taxonomy's
label order: what the base loss (lib.model.losses), argmax and min-risk decoding read. Heads that
know the taxonomy add auxiliary logits (`aux`) and terms to `loss`:

- linear, mlp: a plain classifier (mlp: the hidden layer many FathomNet 2025 entries used).
- multi: many linear heads on the same features (3rd place, FathomNet 2025: a spread of
  predictions from one model, for gated marginal uncertainty).
- per_rank: one extra classifier per taxonomic rank, its CE averaged into the loss (1st place).
- two_level: a coarse-rank and a fine classifier with novelty thresholds (after two-headed
  novelty detection: flag a sample whose coarse or fine confidence is too low).
- hierarchical_softmax, conditional: per-level classifiers refined top-down so that a leaf's
  probability is its parent's times its share among siblings (hierarchical softmax, Morin &
  Bengio 2005; the WordTree of YOLO9000), with soft, hard or Gumbel routing in `conditional`.
- coherent: one sigmoid per taxonomy node with the max constraint and MCLoss (C-HMCNN,
  Giunchiglia & Lukasiewicz 2020), a softmax over the concepts' own outputs for the answer.

`head.normalized` makes the leaf classifier of the flat and rank-aware heads a cosine one
(`NormedLinear`, the classifier LDAM's margins and scale are defined on).

The shared base lives in lib.model.head_base, the tree-shaped heads in lib.model.tree_heads;
this module holds the flat and rank-aware heads and the factory.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lib.config import HeadCfg
from lib.data.taxonomy import Taxonomy
from lib.model.head_base import Head, HeadOutput, classifier, long_tensor, masked_ce, mean_present, split_ranks
from lib.model.tree_heads import CoherentHead, ConditionalHead, HierarchicalSoftmaxHead


class LinearHead(Head):
    """One Linear: the baseline."""

    def __init__(self, in_features: int, n_classes: int, normalized: bool = False):
        super().__init__()
        self.fc = classifier(in_features, n_classes, normalized)

    def forward(self, feats: torch.Tensor) -> HeadOutput:
        return HeadOutput(self.fc(feats).float())


class MLPHead(Head):
    """Linear, BatchNorm1d, GELU, Dropout, Linear; Xavier-uniform weights and zero biases.

    BatchNorm1d needs more than one sample per batch in training (drop_last the train loader).
    """

    def __init__(self, in_features: int, n_classes: int, hidden: int, dropout: float, normalized: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout),
            classifier(hidden, n_classes, normalized)
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: torch.Tensor) -> HeadOutput:
        return HeadOutput(self.net(feats).float())


class MultiHead(Head):
    """`n_heads` linear heads on the same features (3rd place, FathomNet 2025).

    logits are the mean of the heads' logits; `heads` keeps each so their spread can gate
    uncertain predictions; each head is trained on its own by the base loss.
    """

    def __init__(self, in_features: int, n_classes: int, n_heads: int, normalized: bool = False):
        super().__init__()
        self.fcs = nn.ModuleList(classifier(in_features, n_classes, normalized) for _ in range(n_heads))

    def forward(self, feats: torch.Tensor) -> HeadOutput:
        heads = torch.stack([fc(feats).float() for fc in self.fcs])
        return HeadOutput(heads.mean(0), heads=heads)

    def head_probs(self, out: HeadOutput) -> torch.Tensor:
        """(H, B, C) each head's softmax, for spread or marginal-uncertainty statistics."""
        assert out.heads is not None  # noqa: S101 (MultiHead.forward always sets them)
        return (self.logit_scale * out.heads.float()).softmax(-1)

    def loss(self, out: HeadOutput, target: torch.Tensor, weight: torch.Tensor | None, base: nn.Module) -> torch.Tensor:
        assert out.heads is not None  # noqa: S101 (MultiHead.forward always sets them)
        return torch.stack([base(h, target, weight) for h in out.heads]).mean()


# ----------------------------------------------------------------------------- rank-aware heads


class PerRankHead(Head):
    """The leaf Linear plus one Linear per rank with >= 2 values (1st place, FathomNet 2025).

    aux[rank] are logits over `taxonomy.rank_labels(rank)[1]`; the label of a sample at a rank
    is its target concept's value there, and concepts without one (-1) are left out of that
    rank's CE. Loss = base(leaf) + aux_weight * mean over the ranks present in the batch.
    With `normalized` the leaf classifier is cosine (the rank classifiers stay linear: they
    train by plain CE).
    """

    rank_labels: torch.Tensor

    def __init__(self, in_features: int, taxonomy: Taxonomy, aux_weight: float, normalized: bool = False):
        super().__init__()
        self.ranks = split_ranks(taxonomy)
        self.aux_weight = aux_weight
        self.fc = classifier(in_features, taxonomy.n_classes, normalized)
        tables = [taxonomy.rank_labels(r) for r in self.ranks]
        self.rank_fcs = nn.ModuleDict({r: nn.Linear(in_features, len(values)) for r, (_, values) in zip(self.ranks, tables)})
        self.register_buffer("rank_labels", long_tensor(np.stack([labels for labels, _ in tables])))  # (n_ranks, C)

    def forward(self, feats: torch.Tensor) -> HeadOutput:
        return HeadOutput(self.fc(feats).float(), aux={r: self.rank_fcs[r](feats).float() for r in self.ranks})

    def loss(self, out: HeadOutput, target: torch.Tensor, weight: torch.Tensor | None, base: nn.Module) -> torch.Tensor:
        total = base(out.logits, target, weight)
        if self.aux_weight == 0 or not self.ranks:
            return total
        terms = [masked_ce(out.aux[r], self.rank_labels[i][target], weight) for i, r in enumerate(self.ranks)]
        return total + self.aux_weight * mean_present(terms)


class TwoLevelHead(Head):
    """A coarse classifier over `coarse_rank`'s values beside the fine (leaf) one.

    After two-headed novelty detection: a sample whose coarse confidence is below `tau_coarse`
    is novel; one whose coarse passes but whose fine confidence is below `tau_fine` is known
    only to the coarse rank (answered there, not novel). Loss = base(leaf) + aux_weight * CE(coarse), concepts without a
    value at `coarse_rank` left out of the CE. aux["coarse"] are logits over
    `taxonomy.rank_labels(coarse_rank)[1]` (also in `self.coarse_values`).
    """

    coarse_labels: torch.Tensor

    def __init__(self, in_features: int, taxonomy: Taxonomy, coarse_rank: str, aux_weight: float, tau_coarse: float, tau_fine: float,
                 normalized: bool = False):
        super().__init__()
        labels, values = taxonomy.rank_labels(coarse_rank)
        if not values:
            raise ValueError(f"No concept has a value at rank '{coarse_rank}'; choose another head.coarse_rank.")
        self.coarse_rank, self.coarse_values = coarse_rank, values
        self.aux_weight, self.tau_coarse, self.tau_fine = aux_weight, tau_coarse, tau_fine
        self.fc = classifier(in_features, taxonomy.n_classes, normalized)
        self.coarse_fc = nn.Linear(in_features, len(values))
        self.register_buffer("coarse_labels", long_tensor(labels))  # (C,)

    def forward(self, feats: torch.Tensor) -> HeadOutput:
        return HeadOutput(self.fc(feats).float(), aux={"coarse": self.coarse_fc(feats).float()})

    def loss(self, out: HeadOutput, target: torch.Tensor, weight: torch.Tensor | None, base: nn.Module) -> torch.Tensor:
        total = base(out.logits, target, weight)
        if self.aux_weight == 0:
            return total
        return total + self.aux_weight * masked_ce(out.aux["coarse"], self.coarse_labels[target], weight)[0]

    @torch.no_grad()
    def novelty(self, out: HeadOutput) -> dict:
        """Per sample: coarse_label, coarse_prob, fine_label, fine_prob, novel (bool) and level.

        level is "fine" when both confidences pass, "coarse" when only the coarse one does,
        "novel" when the coarse one fails (whatever the fine one says); `novel` is true exactly
        for level "novel": a row answered at the coarse rank is known to that rank, not novel.
        """
        coarse_prob, coarse_label = out.aux["coarse"].float().softmax(-1).max(-1)
        fine_prob, fine_label = self.probs(out).max(-1)
        coarse_ok, fine_ok = coarse_prob >= self.tau_coarse, fine_prob >= self.tau_fine
        level = ["fine" if c and f else "coarse" if c else "novel" for c, f in zip(coarse_ok.tolist(), fine_ok.tolist())]
        return {"coarse_label": coarse_label, "coarse_prob": coarse_prob, "fine_label": fine_label, "fine_prob": fine_prob,
                "novel": ~coarse_ok, "level": level}


# ----------------------------------------------------------------------------- factory


def build_head(cfg: HeadCfg, in_features: int, taxonomy: Taxonomy, logit_scale: float = 1.0) -> Head:
    """The configured head for `in_features`-wide pooled features and the taxonomy's concepts.

    `logit_scale` (LDAM's `loss.s`) scales a cosine head's logits in its probabilities; other
    heads ignore it.
    """
    head = _build_head(cfg, in_features, taxonomy)
    if cfg.normalized:
        head.logit_scale = float(logit_scale)
    return head


def _build_head(cfg: HeadCfg, in_features: int, taxonomy: Taxonomy) -> Head:
    n = taxonomy.n_classes
    name = cfg.name
    cos = cfg.normalized
    if name == "linear":
        return LinearHead(in_features, n, cos)
    if name == "mlp":
        return MLPHead(in_features, n, cfg.hidden, cfg.dropout, cos)
    if name == "multi":
        return MultiHead(in_features, n, cfg.n_heads, cos)
    if name == "per_rank":
        return PerRankHead(in_features, taxonomy, cfg.aux_weight, cos)
    if name == "two_level":
        return TwoLevelHead(in_features, taxonomy, cfg.coarse_rank, cfg.aux_weight, cfg.tau_coarse, cfg.tau_fine, cos)
    if cos:
        raise ValueError(f"head.normalized=true has no cosine classifier in head '{name}'; set head.normalized=false.")
    if name == "hierarchical_softmax":
        return HierarchicalSoftmaxHead(in_features, taxonomy, cfg.aux_weight)
    if name == "conditional":
        return ConditionalHead(in_features, taxonomy, cfg.aux_weight, cfg.routing, cfg.temperature)
    if name == "coherent":
        return CoherentHead(in_features, taxonomy, cfg.aux_weight)
    raise ValueError(f"Unknown head '{name}'; choose one of the names listed in lib.config.HeadCfg.")
