"""Heads shaped by the taxonomy's tree: hierarchical softmax and conditional (top-down refinement), coherent (C-HMCNN).

- hierarchical_softmax, conditional: per-level classifiers refined top-down so that a leaf's
  probability is its parent's times its share among siblings (hierarchical softmax, Morin &
  Bengio 2005; the WordTree of YOLO9000), with soft, hard or Gumbel routing in `conditional`.
- coherent: one sigmoid per taxonomy node with the max constraint and MCLoss (C-HMCNN,
  Giunchiglia & Lukasiewicz 2020), a softmax over the concepts' own outputs for the answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.data.taxonomy import RANKS, Taxonomy
from lib.model.head_base import EPS, Head, HeadOutput, long_tensor, masked_ce, mean_present, split_ranks

# ----------------------------------------------------------------------------- the taxonomy as a tree of levels


@dataclass(frozen=True)
class Level:
    """One level of the tree: a rank with >= 2 values, or "leaf" (the concepts).

    nodes: the rank's values in `rank_labels` order, then pass-through nodes
    "<ancestor> (no <rank>)"; parent: each node's index in the level above (-1 at the top);
    of_concept: the node on each concept's path.
    """

    name: str
    nodes: tuple[str, ...]
    parent: np.ndarray
    of_concept: np.ndarray


def taxonomy_levels(taxonomy: Taxonomy) -> list[Level]:
    """The concepts as a tree with every leaf at the same depth, for top-down refinement.

    Concepts sit at different depths (a genus-level concept has no species, Actinopterygii
    stops at its phylum), so a concept missing rank r gets a pass-through node there, keyed by
    its nearest existing ancestor: "Chordata (no class)" -> "Chordata (no order)" -> ... ->
    Actinopterygii and Tunicata. Each pass-through has that one chain below it, so this is
    exactly "attach to the nearest ancestor that exists": the ancestor's mass is shared
    between its real children and the chain. A real value listed under two different parents
    (inconsistent lineages, absent from the FathomNet table) keeps the first real parent in
    label order; concepts' level labels are read from the tree, so they always agree with it.
    """
    ranks = split_ranks(taxonomy)
    keys: list[list[tuple]] = []  # per concept, its node key at each level
    for c, lineage in enumerate(taxonomy.lineages):
        row: list[tuple] = []
        for rank in ranks:
            r = RANKS.index(rank)
            if lineage[r] is not None:
                row.append(("value", lineage[r]))
            else:
                above = [(RANKS[j], lineage[j]) for j in range(r) if lineage[j] is not None]
                row.append(("pass", above[-1] if above else ("root", "root"), rank))
        row.append(("leaf", c))
        keys.append(row)

    levels: list[Level] = []
    prev_index: dict[tuple, int] = {}
    for li, rank in enumerate([*ranks, "leaf"]):
        if rank == "leaf":
            order = [("leaf", c) for c in range(taxonomy.n_classes)]
            names = list(taxonomy.names)
        else:
            values = taxonomy.rank_labels(rank)[1]
            passes = sorted({row[li] for row in keys if row[li][0] == "pass"}, key=lambda k: (k[1][1], k[1][0]))
            order = [("value", v) for v in values] + passes
            names = list(values) + [f"{k[1][1]} (no {rank})" for k in passes]
        index = {k: i for i, k in enumerate(order)}
        parent = np.full(len(order), -1, dtype=np.int64)
        if li > 0:
            for node in order:  # prefer a real parent, then the first in label order
                cands = [row[li - 1] for row in keys if row[li] == node]
                real = [k for k in cands if k[0] == "value"]
                parent[index[node]] = prev_index[(real or cands)[0]]
        levels.append(Level(rank, tuple(names), parent, np.zeros(0, dtype=np.int64)))
        prev_index = index

    at = np.arange(taxonomy.n_classes)
    for li in range(len(levels) - 1, -1, -1):  # walk each concept up the tree
        levels[li] = Level(levels[li].name, levels[li].nodes, levels[li].parent, at.copy())
        at = levels[li].parent[at]
    return levels


def group_log_softmax(z: torch.Tensor, parent: torch.Tensor, n_parents: int) -> torch.Tensor:
    """log-softmax of z (B, n) within each group of siblings (children of the same parent)."""
    idx = parent.unsqueeze(0).expand_as(z)
    shift = torch.full((z.shape[0], n_parents), -torch.inf, device=z.device, dtype=z.dtype)
    shift = shift.scatter_reduce(1, idx, z.detach(), "amax").detach()  # stability only: the result does not depend on it
    total = torch.zeros_like(shift).scatter_add(1, idx, (z - shift.gather(1, idx)).exp())
    lse = total.log() + shift
    return z - lse.gather(1, idx)


class HierarchicalSoftmaxHead(Head):
    """Per-level linear classifiers refined top-down over `taxonomy_levels` (hierarchical softmax).

    Z[0] = log_softmax(Zb[0]); Z[l+1] = Zb[l+1] + log(route(Z[l]) @ H[l, l+1] + eps), where Zb
    is each level's Linear output log-softmaxed within sibling groups (so softmax(Z[l+1]) is
    P(parent) * P(child | parent): zero weights give the product of uniform choices down the
    tree, not a split by how many children a parent has) and H[l, l+1] the 0/1 parent matrix.
    logits = Z[leaf] (log-probabilities, so probs = their softmax); aux[rank] = Z[rank] over
    `self.levels[i].nodes`. Loss = base(leaf) + aux_weight * mean over upper levels of
    CE(Z[l], the target's node at l); every concept has one (a pass-through where its rank is
    missing), so no sample is left out.
    """

    level_labels: torch.Tensor

    def __init__(self, in_features: int, taxonomy: Taxonomy, aux_weight: float):
        super().__init__()
        self.levels = taxonomy_levels(taxonomy)
        self.level_names = [lv.name for lv in self.levels[:-1]]
        self.aux_weight = aux_weight
        self.classifiers = nn.ModuleList(nn.Linear(in_features, len(lv.nodes)) for lv in self.levels)
        for i, lv in enumerate(self.levels[1:]):
            h = torch.zeros(len(self.levels[i].nodes), len(lv.nodes))
            h[torch.as_tensor(lv.parent), torch.arange(len(lv.nodes))] = 1.0
            self.register_buffer(f"H{i}", h)  # (n_l, n_{l+1})
            self.register_buffer(f"parent{i + 1}", long_tensor(lv.parent))
        self.register_buffer("level_labels", long_tensor(np.stack([lv.of_concept for lv in self.levels[:-1]])))  # (L-1, C)

    def parent_matrix(self, i: int) -> torch.Tensor:
        """H[i, i+1]: rows are level i's nodes, columns level i+1's; one 1 per column."""
        return getattr(self, f"H{i}")

    def route(self, z: torch.Tensor) -> torch.Tensor:
        """The parent level's distribution passed down (conditional overrides it)."""
        return z.softmax(-1)

    def forward(self, feats: torch.Tensor) -> HeadOutput:
        z = self.classifiers[0](feats).float().log_softmax(-1)
        upper = [z]
        for i in range(1, len(self.levels)):
            zb = group_log_softmax(self.classifiers[i](feats).float(), getattr(self, f"parent{i}"), len(self.levels[i - 1].nodes))
            z = zb + torch.log(self.route(z) @ self.parent_matrix(i - 1) + EPS)
            upper.append(z)
        return HeadOutput(z, aux=dict(zip(self.level_names, upper[:-1])))

    def loss(self, out: HeadOutput, target: torch.Tensor, weight: torch.Tensor | None, base: nn.Module) -> torch.Tensor:
        total = base(out.logits, target, weight)
        if self.aux_weight == 0 or not self.level_names:
            return total
        terms = [masked_ce(out.aux[n], self.level_labels[i][target], weight) for i, n in enumerate(self.level_names)]
        return total + self.aux_weight * mean_present(terms)


class ConditionalHead(HierarchicalSoftmaxHead):
    """The hierarchical head with a choice of how the parent distribution is routed down.

    soft: softmax(Z / temperature); hard: one-hot of the argmax parent, gradients through the
    soft distribution (straight-through), so only the chosen branch keeps mass, in training as
    in eval (deliberately: training sees the branch inference takes); gumbel:
    F.gumbel_softmax(Z, tau=temperature) in training (a sampled, differentiable branch choice),
    the soft route in eval.
    """

    def __init__(self, in_features: int, taxonomy: Taxonomy, aux_weight: float, routing: str, temperature: float):
        super().__init__(in_features, taxonomy, aux_weight)
        if routing not in ("soft", "hard", "gumbel"):
            raise ValueError(f"Unknown routing '{routing}'; choose soft, hard or gumbel.")
        self.routing, self.temperature = routing, temperature

    def route(self, z: torch.Tensor) -> torch.Tensor:
        if self.routing == "gumbel" and self.training:
            return F.gumbel_softmax(z, tau=self.temperature, hard=False)
        p = (z / self.temperature).softmax(-1)
        if self.routing == "hard":
            hard = F.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)
            return hard + p - p.detach()
        return p


# ----------------------------------------------------------------------------- coherent (C-HMCNN)


@dataclass(frozen=True)
class TaxonomyNodes:
    """Every node of the concepts' lineages, for one sigmoid output each.

    names: "<rank>:<value>" for each (rank, value) on some lineage, in rank then label order, then
    "concept:<name>" for concepts that need a node of their own (below); descendants[i, j] is
    True when node j is node i or lies below it (C-HMCNN's R, a DAG if a value has two parents);
    of_concept: each concept's own node; on_path[c, i]: node i is the concept's node or above it.
    A concept is the node of its deepest rank (a genus-level concept is that genus, species below
    it or not), except an exception concept or one sharing its deepest node with another concept
    (Actinopterygii and Tunicata both stop at Chordata): it hangs one node below, as the metric
    counts it.
    """

    names: tuple[str, ...]
    descendants: np.ndarray
    of_concept: np.ndarray
    on_path: np.ndarray


def taxonomy_nodes(taxonomy: Taxonomy) -> TaxonomyNodes:
    """The taxonomy as C-HMCNN's node set and descendant matrix (see `TaxonomyNodes`)."""
    paths = [[(r, v) for r, v in zip(RANKS, lin) if v is not None] for lin in taxonomy.lineages]
    deepest = [p[-1] if p else ("kingdom", "(none)") for p in paths]
    shared = {k for k in deepest if deepest.count(k) > 1}
    own = [name in taxonomy.exceptions or k in shared for name, k in zip(taxonomy.names, deepest)]
    ranked = sorted({k for p in paths for k in p}, key=lambda k: (RANKS.index(k[0]), k[1]))
    keys = ranked + [("concept", name) for name, o in zip(taxonomy.names, own) if o]
    index = {k: i for i, k in enumerate(keys)}
    n, c = len(keys), taxonomy.n_classes
    descendants = np.eye(n, dtype=bool)
    on_path = np.zeros((c, n), dtype=bool)
    of_concept = np.zeros(c, dtype=np.int64)
    for ci, (name, p, o) in enumerate(zip(taxonomy.names, paths, own)):
        chain = [index[k] for k in p] + ([index[("concept", name)]] if o else [])
        if not chain:
            raise ValueError(f"Concept '{name}' has an empty lineage; give it at least its kingdom in the taxonomy table.")
        for i, a in enumerate(chain):
            descendants[a, chain[i + 1:]] = True
        on_path[ci, chain] = True
        of_concept[ci] = chain[-1]
    return TaxonomyNodes(tuple(f"{r}:{v}" for r, v in keys), descendants, of_concept, on_path)


def max_constraint(scores: torch.Tensor, descendants: torch.Tensor) -> torch.Tensor:
    """C-HMCNN's max-constraint module: each node's score becomes the max over itself and its descendants.

    scores (B, n) in [0, 1]; descendants (n, n) 0/1. So a parent's score is never below a
    child's (Giunchiglia & Lukasiewicz 2020, `get_constr_out` of EGiunchiglia/C-HMCNN).
    """
    return (scores.unsqueeze(1) * descendants.unsqueeze(0)).amax(dim=2)


def mc_loss(node_logits: torch.Tensor, node_target: torch.Tensor, descendants: torch.Tensor,
            weight: torch.Tensor | None) -> torch.Tensor:
    """MCLoss (C-HMCNN): binary CE of the max-constrained outputs, weighted mean over samples.

    A node on the label's lineage (target 1) is scored by the max over its descendants of
    sigmoid * target, so only the true branch can raise it; a node off the lineage by the
    max-constrained sigmoid, so any descendant's false positive is charged to it. The sigmoid is
    monotone, so each of those maxima is the sigmoid of the largest logit over the same nodes:
    BCE is taken on that logit, the value and gradient of the authors' BCELoss on probabilities
    wherever those are finite, and without its 1 / (p (1 - p)) blow-up (NaN or 1e12 steps) once a
    float32 sigmoid rounds to 0 or 1. Averaged over nodes; samples weighted as `masked_ce`.
    """
    z = node_logits.float()
    y = node_target.to(z.dtype)
    # allowed[b, i, j]: node j counts for node i: j is i or below it, and on the lineage when i is
    allowed = descendants.unsqueeze(0) * torch.where(y.unsqueeze(2) > 0, y.unsqueeze(1), torch.ones_like(y).unsqueeze(1))
    m = z.unsqueeze(1).expand(-1, z.shape[1], -1).masked_fill(allowed == 0, float("-inf")).amax(dim=2)
    bce = F.binary_cross_entropy_with_logits(m, y, reduction="none").mean(1)
    if weight is None:
        return bce.mean()
    w = weight.float()
    return (bce * w).sum() / w.sum().clamp_min(1e-12)


class CoherentHead(Head):
    """Coherent hierarchical classification (C-HMCNN, Giunchiglia & Lukasiewicz 2020, NeurIPS).

    One Linear gives a logit per taxonomy node (`taxonomy_nodes`: every rank of every lineage);
    sigmoid and the max constraint (`coherent`) make the node scores consistent with the tree,
    and MCLoss (`mc_loss`) trains them with the label's lineage as the multi-label target.
    ROIs carry one concept, so the answer over the concepts is, as the 3rd place (FathomNet
    2025) did, a softmax over the concepts' own node logits: logits = those (B, C), trained by
    the base loss, probs = their softmax for every later stage (pseudo-labels, blends, min-risk).
    A concept that is an inner node (a genus with species below) uses its own output, not the
    max over its subtree. aux["nodes"] are the raw node logits. Loss = base(concept logits) +
    aux_weight * MCLoss.
    """

    descendants: torch.Tensor
    on_path: torch.Tensor
    of_concept: torch.Tensor

    def __init__(self, in_features: int, taxonomy: Taxonomy, aux_weight: float):
        super().__init__()
        self.nodes = taxonomy_nodes(taxonomy)
        self.aux_weight = aux_weight
        self.fc = nn.Linear(in_features, len(self.nodes.names))
        self.register_buffer("descendants", torch.as_tensor(self.nodes.descendants, dtype=torch.float32))
        self.register_buffer("on_path", torch.as_tensor(self.nodes.on_path, dtype=torch.float32))
        self.register_buffer("of_concept", long_tensor(self.nodes.of_concept))

    def forward(self, feats: torch.Tensor) -> HeadOutput:
        z = self.fc(feats).float()
        return HeadOutput(z[:, self.of_concept], aux={"nodes": z})

    def coherent(self, out: HeadOutput) -> torch.Tensor:
        """(B, n) the max-constrained node probabilities: a parent's is never below a child's."""
        return max_constraint(out.aux["nodes"].float().sigmoid(), self.descendants)

    def loss(self, out: HeadOutput, target: torch.Tensor, weight: torch.Tensor | None, base: nn.Module) -> torch.Tensor:
        total = base(out.logits, target, weight)
        if self.aux_weight == 0:
            return total
        return total + self.aux_weight * mc_loss(out.aux["nodes"], self.on_path[target], self.descendants, weight)
