"""FAISS nearest-neighbour search over L2-normalised embeddings, and voting over neighbours."""
from __future__ import annotations

import faiss
import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices of the k nearest `base` rows for each query (IndexFlatIP)."""
    base, queries = normalize(base), normalize(queries)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    sims, idx = index.search(queries, min(k, len(base)))
    return sims, idx


def vote_flat(neighbor_labels: np.ndarray, sims: np.ndarray, n_classes: int) -> np.ndarray:
    """Per query, the label with the largest summed (non-negative) similarity; -1 neighbours ignored."""
    scores = label_distribution(neighbor_labels, sims, n_classes)
    return scores.argmax(1)


def label_distribution(neighbor_labels: np.ndarray, sims: np.ndarray, n_classes: int) -> np.ndarray:
    """Similarity-weighted label histogram of the neighbours, normalised to sum to one."""
    w = np.clip(sims, 0, None) + 1e-6
    out = np.zeros((len(neighbor_labels), n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(neighbor_labels)), neighbor_labels.shape[1])
    valid = neighbor_labels.reshape(-1) >= 0
    np.add.at(out, (rows[valid], neighbor_labels.reshape(-1)[valid]), w.reshape(-1)[valid])
    return out / np.maximum(out.sum(1, keepdims=True), 1e-12)
