"""One pseudo-labelling round: a fold ensemble on the test ROIs -> selected pseudo-labels.

Shared by 02 (round 1, from the phase-1 folds) and 03 (rounds 2.., each from the previous
round's folds). Writes into `out_dir`:
  test_probs.npz     per-model probabilities (M, N, C) with TTA, their mean, per-head
                     probabilities of multi heads (M, N, H, C), embeddings (M, N, D), GMU and U
  pseudo_labels.csv  annotation_id, label, concept_name, weight, source
  umap.png           the 2-D map of the test embeddings, core samples ringed (cluster_core)
  summary.md         counts per source and class (precision against a known truth: `python -m lib.report`)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from lib.config import Config
from lib.core.io import atomic_path, atomic_write_text
from lib.data.taxonomy import Taxonomy
from lib.decide.pseudo import (
    combine_sources,
    format_summary,
    gmu,
    select_cluster_core,
    select_confident,
    select_vote,
    summarize,
)

log = logging.getLogger("pipeline")


def ensemble_members(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The members whose spread GMU and the vote read: every head of every fold for multi heads, else every fold."""
    if "head_probs" in arrays:
        hp = arrays["head_probs"]  # (M, N, H, C)
        return hp.transpose(0, 2, 1, 3).reshape(-1, hp.shape[1], hp.shape[3])
    return arrays["probs"]


def select(cfg: Config, ids: np.ndarray, arrays: dict[str, np.ndarray], n_classes: int) -> tuple[pd.DataFrame, dict, np.ndarray, np.ndarray]:
    """The configured selections, combined into one row per ROI; returns (pseudo, cluster info, GMU, U)."""
    p = cfg.pseudo
    members = ensemble_members(arrays)
    mean = arrays["probs"].mean(0)
    g, u = gmu(members, p.gmu_sigma)
    frames: list[pd.DataFrame] = []
    info: dict[str, Any] = {}
    if "confidence" in p.methods:
        frames.append(select_confident(ids, mean, p.threshold))
    if "vote" in p.methods:
        frames.append(select_vote(ids, members, min(p.min_agree, len(members)), u, p.u_floor))
    if "cluster_core" in p.methods:
        emb = arrays["embeddings"].astype(np.float32).mean(0)  # averaged over folds
        core, info = select_cluster_core(ids, emb, mean, None, p.umap_components, p.umap_neighbors, p.umap_min_dist,
                                         p.umap_metric, p.purity, p.core_fraction, cfg.seed, min_size=p.min_cluster_size)
        if info.get("skipped"):
            log.warning("cluster_core skipped: %s", info["skipped"])
        frames.append(core)
    pseudo = combine_sources(frames) if frames else select_confident(ids, mean, 2.0)
    return pseudo, info, g, u


def run_round(cfg: Config, fold_dirs: Sequence[Path], test: pd.DataFrame, tax: Taxonomy, out_dir: Path, device,
              title: str) -> dict:
    """Predict `test` (usable test ROIs) with every fold model, select pseudo-labels, write the artifacts."""
    from lib.data.context import model_inputs
    from lib.engine.inference import predict_folds_tta
    from lib.report.plots import plot_umap

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = test["annotation_id"].to_numpy()
    arrays = predict_folds_tta(fold_dirs, model_inputs(test, cfg.model.context), cfg, tax, device)
    pseudo, info, g, u = select(cfg, ids, arrays, tax.n_classes)
    with atomic_path(out_dir / "test_probs.npz") as tmp:
        saved: dict[str, Any] = {"annotation_id": ids, "mean": arrays["probs"].mean(0), "gmu": g, "u": u,
                                        **{k: (v.astype(np.float16) if k == "embeddings" else v) for k, v in arrays.items()}}
        np.savez(tmp, **saved)
    pseudo.insert(2, "concept_name", [tax.names[i] for i in pseudo["label"]])
    with atomic_path(out_dir / "pseudo_labels.csv") as tmp:
        pseudo.to_csv(tmp, index=False)
    if info and not info.get("skipped"):
        plot_umap(info["coords"], info["pred"], info["core"], tax.names, out_dir / "umap.png", title)
    summary = summarize(pseudo, len(test), None, tax.names)
    atomic_write_text(out_dir / "summary.md", f"# Pseudo-labels: {title}\n\n" + format_summary(summary))
    log.info("%s: %d of %d test ROIs pseudo-labelled, by source %s", title, len(pseudo), len(test), summary["by_source"])
    return {"test_rois": len(test), "models": len(fold_dirs), "pseudo_labels": len(pseudo), "methods": list(cfg.pseudo.methods),
            "mean_weight": summary["mean_weight"], "by_source": summary["by_source"]}
