"""One pseudo-labelling round: the members' fold ensembles on the test ROIs -> selected pseudo-labels.

Shared by 02 (round 1, from `pseudo.members`: the phase-1 folds by default, and any other
experiment's models on the same folds) and 03 (rounds 2.., each from the previous round's folds and
the other experiments' members). Every fold model of every member is one ensemble member for the
vote and GMU; each member predicts its own crops with its own config. With `pseudo.calibrate`,
each member's probabilities are first scaled by a temperature fitted to its out-of-fold rows.
Writes into `out_dir`:
  test_probs.npz     per-model probabilities (M, N, C) with TTA (uncalibrated), `member_of` (M,) and
                     `member_names`, their (calibrated) mean, per-head probabilities of a single
                     multi-head member (M, N, H, C), embeddings (M, N, D; with several members one
                     row: each member's fold mean, L2-normalised, concatenated), GMU and U
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
from lib.engine.members import Member

log = logging.getLogger("pipeline")


def ensemble_members(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The members whose spread GMU and the vote read: every head of every fold for multi heads, else every fold."""
    if "head_probs" in arrays:
        hp = arrays["head_probs"]  # (M, N, H, C)
        return hp.transpose(0, 2, 1, 3).reshape(-1, hp.shape[1], hp.shape[3])
    return arrays["probs"]


def select(cfg: Config, ids: np.ndarray, arrays: dict[str, np.ndarray], n_classes: int) -> tuple[pd.DataFrame, dict, np.ndarray, np.ndarray]:
    """The configured selections, combined into one row per ROI; returns (pseudo, cluster info, GMU, U).

    `arrays["votes"]`, when given, are the ensemble members of the vote and GMU (else `ensemble_members`).
    """
    p = cfg.pseudo
    members = arrays["votes"] if "votes" in arrays else ensemble_members(arrays)
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


def member_temperature(member: Member) -> float:
    """A log-loss temperature fitted on the member's out-of-fold rows (never on test rows)."""
    from lib.decide.calibration import fit_temperature
    from lib.decide.oof import load_oof
    from lib.pipeline.graph import check_vouched

    for d in member.folds:
        check_vouched(d / "oof.npz")
    oof = load_oof(member.folds)
    return fit_temperature(oof.probs, oof.labels, "logloss")


def predict_members(cfg: Config, members: Sequence[Member], tax: Taxonomy, device) -> dict[str, np.ndarray]:
    """Every fold model of every member on its own crops (its config's TTA): the arrays `select` reads.

    `probs` (M, N, C) uncalibrated, member after member, and `member_of` (M,); `votes`, every
    member's `ensemble_members`, scaled by its temperature under `pseudo.calibrate`; `calibrated`,
    the scaled `probs`; `temperatures` per member; `embeddings` as the module docstring says.
    """
    from lib.data.context import frame_ids, model_inputs
    from lib.decide.calibration import apply_temperature
    from lib.engine.inference import predict_folds_tta

    parts = [predict_folds_tta(m.folds, model_inputs(m.test, m.cfg.model.context), m.cfg, tax, device,
                               frames=frame_ids(m.test) if m.cfg.model.frame_context == "attention" else None) for m in members]
    temps = np.array([member_temperature(m) if cfg.pseudo.calibrate == "temperature" else 1.0 for m in members])
    for m, t in zip(members, temps):
        if t != 1.0:
            log.info("pseudo.calibrate: %s's temperature %.3f (fitted on its out-of-fold rows)", m.name, t)
    out: dict[str, np.ndarray] = {
        "probs": np.concatenate([a["probs"] for a in parts]),
        "member_of": np.repeat(np.arange(len(members)), [len(a["probs"]) for a in parts]),
        "member_names": np.array([m.name for m in members]),
        "temperatures": temps,
        "votes": np.concatenate([apply_temperature(ensemble_members(a), t) for a, t in zip(parts, temps)]),
        "calibrated": np.concatenate([apply_temperature(a["probs"], t) for a, t in zip(parts, temps)]),
    }
    if len(parts) == 1:
        out.update({k: v for k, v in parts[0].items() if k in ("embeddings", "head_probs")})
    else:  # backbones differ in width: each member's fold-mean embedding, unit length, side by side
        embs = [a["embeddings"].astype(np.float32).mean(0) for a in parts]
        out["embeddings"] = np.concatenate([e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12) for e in embs], 1)[None]
    return out


def run_round(cfg: Config, members: Sequence[Member], test: pd.DataFrame, tax: Taxonomy, out_dir: Path, device,
              title: str) -> dict:
    """Predict `test` (usable test ROIs) with every fold model of every member, select pseudo-labels, write the artifacts."""
    from lib.report.plots import plot_umap

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = test["annotation_id"].to_numpy()
    arrays = predict_members(cfg, members, tax, device)
    pseudo, info, g, u = select(cfg, ids, {**arrays, "probs": arrays["calibrated"]}, tax.n_classes)
    with atomic_path(out_dir / "test_probs.npz") as tmp:
        saved: dict[str, Any] = {"annotation_id": ids, "mean": arrays["calibrated"].mean(0), "gmu": g, "u": u,
                                 **{k: (v.astype(np.float16) if k == "embeddings" else v) for k, v in arrays.items()
                                    if k not in ("votes", "calibrated")}}
        np.savez(tmp, **saved)
    pseudo.insert(2, "concept_name", [tax.names[i] for i in pseudo["label"]])
    with atomic_path(out_dir / "pseudo_labels.csv") as tmp:
        pseudo.to_csv(tmp, index=False)
    if info and not info.get("skipped"):
        plot_umap(info["coords"], info["pred"], info["core"], tax.names, out_dir / "umap.png", title)
    summary = summarize(pseudo, len(test), None, tax.names)
    atomic_write_text(out_dir / "summary.md", f"# Pseudo-labels: {title}\n\n" + format_summary(summary))
    log.info("%s: %d of %d test ROIs pseudo-labelled, by source %s", title, len(pseudo), len(test), summary["by_source"])
    result = {"test_rois": len(test), "models": len(arrays["probs"]), "pseudo_labels": len(pseudo), "methods": list(cfg.pseudo.methods),
              "mean_weight": summary["mean_weight"], "by_source": summary["by_source"]}
    if len(members) > 1 or cfg.pseudo.calibrate != "none":
        result["members"] = [m.name for m in members]
        result["temperatures"] = [round(float(t), 4) for t in arrays["temperatures"]]
    return result
