"""FAISS nearest-neighbour search over L2-normalised embeddings, and taxonomic votes over the neighbours.

Every vote reads the neighbours' similarity-weighted label distribution (`label_distribution`),
so one protocol applies alike to the neighbours of one index and to the mean distribution of
several fold models' indexes. The protocols (`VOTES`), each always answering a concept:

- flat: the label of largest weight.
- hierarchical: walk the taxonomy tree from the root, at each node going to the child of
  largest weight, unless the neighbours whose concept sits at the node itself outweigh it;
  answer the concept where the walk ends.
- strict: the same walk, going on only while the child holds more than half of *all* the
  weight (so the answer's node is supported by a strict majority of the neighbours); answer
  the concept at the deepest node reached, else the nearest ancestor that is a concept, else
  the concept of least expected distance.
- min_risk: the concept of least expected competition distance (lib.decide.decode).

The tree is the metric's: each concept sits at its deepest rank, and an exception concept one
edge below its listed node (Actinopterygii and Tunicata are two children of Chordata, not
Chordata itself), so an exception is never anyone's ancestor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np

from lib.data.taxonomy import RANKS, Taxonomy
from lib.decide.decode import decode, expected_distance

VOTES: tuple[str, ...] = ("flat", "hierarchical", "strict", "min_risk")
MIN_PER_LIST = 39  # FAISS k-means wants >= 39 training points per centroid


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- search


def effective_nlist(nlist: int, n_base: int) -> int:
    """IVF lists capped so each has >= 39 base vectors to train on (never below 1)."""
    return max(1, min(nlist, n_base // MIN_PER_LIST))


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a GPU (faiss-cpu has neither)."""
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


_GPU_RES: list = []  # one StandardGpuResources per process: it holds GPU scratch memory


def _to_gpu(index: faiss.Index) -> faiss.Index:
    if not _GPU_RES:
        _GPU_RES.append(faiss.StandardGpuResources())
    return faiss.index_cpu_to_gpu(_GPU_RES[0], 0, index)


def build_index(base: np.ndarray, index: str = "flat", nlist: int = 100, nprobe: int = 10, use_gpu: bool = True) -> faiss.Index:
    """An inner-product index of the (already normalised) `base`: exact `flat` or `ivf` (trained on base)."""
    d = base.shape[1]
    if index == "flat":
        out: faiss.Index = faiss.IndexFlatIP(d)
    elif index == "ivf":
        lists = effective_nlist(nlist, len(base))
        out = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        out.train(base)
        out.nprobe = min(nprobe, lists)
    else:
        raise ValueError(f"Unknown knn.index '{index}'; choose flat or ivf.")
    if use_gpu and gpu_available():
        out = _to_gpu(out)
        if index == "ivf":
            out.nprobe = min(nprobe, effective_nlist(nlist, len(base)))  # type: ignore[attr-defined]
    out.add(base)
    return out


def search(base: np.ndarray, queries: np.ndarray, k: int, index: str = "flat", nlist: int = 100, nprobe: int = 10,
           use_gpu: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices of the min(k, len(base)) nearest `base` rows of each query.

    IVF may find fewer than k in the lists it probes: those slots are -1 (label_distribution skips them).
    """
    base, queries = normalize(base), normalize(queries)
    k = min(k, len(base))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
    return build_index(base, index, nlist, nprobe, use_gpu).search(queries, k)


def label_distribution(neighbor_labels: np.ndarray, sims: np.ndarray, n_classes: int) -> np.ndarray:
    """Similarity-weighted label histogram of the neighbours, normalised to sum to one (-1 neighbours ignored)."""
    w = np.clip(sims, 0, None) + 1e-6
    out = np.zeros((len(neighbor_labels), n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(neighbor_labels)), neighbor_labels.shape[1])
    valid = neighbor_labels.reshape(-1) >= 0
    np.add.at(out, (rows[valid], neighbor_labels.reshape(-1)[valid]), w.reshape(-1)[valid])
    return out / np.maximum(out.sum(1, keepdims=True), 1e-12)


def neighbour_distribution(base: np.ndarray, base_labels: np.ndarray, queries: np.ndarray, *, n_classes: int, k: int,
                           index: str = "flat", nlist: int = 100, nprobe: int = 10) -> np.ndarray:
    """The label distribution of each query's k nearest `base` rows."""
    sims, nn = search(base, queries, k, index, nlist, nprobe)
    return label_distribution(np.where(nn >= 0, np.asarray(base_labels)[np.maximum(nn, 0)], -1), sims, n_classes)


# ----------------------------------------------------------------------------- the taxonomy tree


@dataclass(frozen=True)
class Tree:
    """The metric's tree as node tables. Node 0 is the root.

    subtree[c, v]: concept c lies in v's subtree (v is c's node or an ancestor of it);
    at[c]: c's own node; parent[v]: -1 at the root; concept_above[v]: the nearest node at or
    above v where some concept sits (-1 if none).
    """

    subtree: np.ndarray
    at: np.ndarray
    parent: np.ndarray
    concept_above: np.ndarray
    depth: int


def concept_path(lineage: tuple, name: str, exception: bool) -> tuple:
    """A concept's node keys from the root: its present ranks, then itself if an exception."""
    keys = tuple((r, v) for r, v in zip(RANKS, lineage) if v is not None)
    return keys + ((("exception", name),) if exception else ())


def build_tree(taxonomy: Taxonomy) -> Tree:
    paths = [concept_path(lin, n, n in taxonomy.exceptions) for n, lin in zip(taxonomy.names, taxonomy.lineages)]
    ids: dict[tuple, int] = {(): 0}
    parent = [-1]
    for p in paths:
        for i in range(1, len(p) + 1):
            if p[:i] not in ids:
                ids[p[:i]] = len(parent)
                parent.append(ids[p[: i - 1]])
    n_nodes, n = len(parent), taxonomy.n_classes
    subtree = np.zeros((n, n_nodes), dtype=np.float64)
    for c, p in enumerate(paths):
        subtree[c, [ids[p[:i]] for i in range(len(p) + 1)]] = 1.0
    at = np.array([ids[p] for p in paths], dtype=np.int64)
    par = np.array(parent, dtype=np.int64)
    has = np.zeros(n_nodes, dtype=bool)
    has[at] = True
    above = np.full(n_nodes, -1, dtype=np.int64)
    for v in range(n_nodes):  # parents get lower ids than their children
        above[v] = v if has[v] else (above[par[v]] if par[v] >= 0 else -1)
    return Tree(subtree, at, par, above, max(len(p) for p in paths))


def _tree(taxonomy: Taxonomy) -> Tree:
    cached = taxonomy.__dict__.get("_knn_tree")
    if cached is None:
        cached = build_tree(taxonomy)
        object.__setattr__(taxonomy, "_knn_tree", cached)
    return cached


def walk(probs: np.ndarray, tree: Tree, strict: bool) -> np.ndarray:
    """The node where each row's top-down walk ends (see the module docstring)."""
    p = np.asarray(probs, dtype=np.float64)
    mass = p @ tree.subtree  # (N, V): weight in each node's subtree
    own = p @ np.eye(len(tree.parent))[tree.at]  # (N, V): weight of the concepts sitting at each node
    total, rows = mass[:, 0], np.arange(len(p))
    cur = np.zeros(len(p), dtype=np.int64)
    active = np.ones(len(p), dtype=bool)
    for _ in range(tree.depth):
        child = np.where(tree.parent[None, :] == cur[:, None], mass, -1.0)
        best = child.argmax(1)
        w = child[rows, best]
        go = w > 0.5 * total if strict else (w > 0) & (w > own[rows, cur])
        active &= go
        cur = np.where(active, best, cur)
        if not active.any():
            break
    return cur


def vote(probs: np.ndarray, taxonomy: Taxonomy, protocol: str) -> np.ndarray:
    """Concept labels (0..n_classes-1) from label distributions by one of `VOTES`."""
    dist = taxonomy.distance_matrix()
    if protocol == "flat":
        return np.asarray(probs).argmax(1)
    if protocol == "min_risk":
        return decode(probs, dist, "min_risk")
    if protocol not in ("hierarchical", "strict"):
        raise ValueError(f"Unknown knn vote '{protocol}'; choose one of {', '.join(VOTES)}.")
    tree = _tree(taxonomy)
    target = tree.concept_above[walk(probs, tree, protocol == "strict")]
    risk = expected_distance(probs, dist)
    # Among the concepts at the target node (exact duplicates of a lineage may share one), the least risky;
    # rows without a concept at or above their node fall back to min-risk over every concept.
    allowed = (tree.at[None, :] == target[:, None]) | (target[:, None] < 0)
    return np.where(allowed, risk, np.inf).argmin(1)


# ----------------------------------------------------------------------------- scoring the protocols


def score_votes(probs: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, votes: Sequence[str]) -> dict[str, dict]:
    """CV distance and top-1 of each protocol on out-of-fold label distributions."""
    dist = taxonomy.distance_matrix()
    out = {}
    for v in votes:
        pred = vote(probs, taxonomy, v)
        out[v] = {"cv_distance": float(dist[labels, pred].mean()), "cv_top1": float((pred == labels).mean())}
    return out


def best_vote(scores: dict[str, dict]) -> str:
    """The protocol of lowest CV distance (the first listed among equals)."""
    return min(scores, key=lambda v: scores[v]["cv_distance"])


def votes_table(scores: dict[str, dict], chosen: str) -> str:
    """A markdown table of the protocols' CV scores, the submission's marked."""
    lines = ["| vote | CV distance | top-1 | submission |", "|---|---|---|---|"]
    for v, s in scores.items():
        lines.append(f"| {v} | {s['cv_distance']:.4f} | {s['cv_top1']:.3f} | {'yes' if v == chosen else ''} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class VoteChoice:
    """Every protocol's out-of-fold scores and the one the submission uses."""

    scores: dict[str, dict]
    chosen: str

    @property
    def table(self) -> str:
        return votes_table(self.scores, self.chosen)


def choose_vote(probs: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, votes: Sequence[str], vote: str) -> VoteChoice:
    """Score each protocol of `votes` on out-of-fold distributions; submit `vote`, or with `best` the lowest CV distance."""
    scores = score_votes(probs, labels, taxonomy, votes)
    return VoteChoice(scores, best_vote(scores) if vote == "best" else vote)
