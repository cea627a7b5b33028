"""One pseudo-labelling round: the members' fold ensembles on the test ROIs -> selected pseudo-labels.

Shared by 02 (round 1, from `pseudo.members`: the phase-1 folds by default, and any other
experiment's models on the same folds) and 03 (rounds 2.., each from the previous round's folds and
the other experiments' members). Every fold model of every member is one ensemble member for the
vote and GMU; each member predicts its own crops with its own config. With `pseudo.calibrate`,
each member's probabilities are first scaled by a temperature fitted to its out-of-fold rows; with
`pseudo.frame_context: stack` adjusted by the other ROIs of their frames; with `pseudo.test_prior` corrected for label
shift (lib.decide.prior: found on the member's mean, applied to each of its models by the same class weights).
Writes into `out_dir`:
  test_probs.npz     per-model probabilities (M, N, C) with TTA (uncalibrated), `member_of` (M,) and
                     `member_names`, their mean (calibrated; frame-adjusted under pseudo.frame_context: stack, with
                     each member's `frame_params`; prior-corrected under pseudo.test_prior, with each member's
                     `test_prior` and argmax `counts_before` / `counts_after` (M', C)), per-head probabilities of a single
                     multi-head member (M, N, H, C), embeddings (M, N, D; with several members one
                     row: each member's fold mean, L2-normalised, concatenated), GMU and U
  pseudo_labels.csv  annotation_id, label, concept_name, weight, source
  umap.png           the 2-D map of the test embeddings, core samples ringed (cluster_core)
  summary.md         counts per source and class (precision against a known truth: `python -m lib.report`); under
                     pseudo.test_prior each member's assumed test prior and argmax counts per class before and after
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
from lib.decide.frame_context import NOTHING_TO_USE, FrameIndex, FrameParams, FrameRows
from lib.decide.oof import OutOfFold
from lib.decide.prior import PriorShift, check_totals
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


def member_oof(member: Member) -> OutOfFold:
    """The member's out-of-fold rows, each fold's checked against its record."""
    from lib.decide.oof import load_oof
    from lib.pipeline.graph import check_vouched

    for d in member.folds:
        check_vouched(d / "oof.npz")
    return load_oof(member.folds)


def member_temperature(member: Member, oof: OutOfFold | None = None) -> float:
    """A log-loss temperature fitted on the member's out-of-fold rows (never on test rows)."""
    from lib.decide.calibration import fit_temperature

    oof = oof if oof is not None else member_oof(member)
    return fit_temperature(oof.probs, oof.labels, "logloss")


def member_frame_params(member: Member, oof: OutOfFold, t: float, frames: FrameIndex, ids: np.ndarray) -> tuple[FrameParams, FrameRows]:
    """Frame context's b and eps fitted on the member's out-of-fold rows scaled by its temperature (never on test rows),
    and the frames of its rows (folds checked to be grouped by frame)."""
    from lib.decide.calibration import apply_temperature
    from lib.decide.frame_context import fit

    rows = frames.rows(oof.ids, oof.folds, ids)
    return fit(apply_temperature(oof.probs, t), oof.labels, rows.oof), rows


def frame_adjusted(stacks: Sequence[np.ndarray], params: Sequence[FrameParams], rows: FrameRows) -> list[np.ndarray]:
    """Each member's (models, N, C) test probabilities, every model's adjusted by its test frames (placeholders carry
    the train prior) with that member's parameters."""
    from lib.decide.frame_context import adjust

    return [np.stack([adjust(x, rows.test, p, rows.prior) for x in stack]) for stack, p in zip(stacks, params)]


def prior_shifted(cfg: Config, members: Sequence[Member], votes: list[np.ndarray], calibrated: list[np.ndarray],
                  train_prior: np.ndarray, names: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """Each member's (models, N, C) votes and probabilities corrected for label shift (`pseudo.test_prior`), and what
    `predict_members` reports of it. The correction is found on the member's mean; `PriorShift.apply` gives each of its
    models (and vote members) the same class weights, so they stay comparable (under balanced their mean meets the
    totals nearly, not exactly)."""
    from lib.decide.prior import correct

    shifts: list[PriorShift] = [correct(cfg.pseudo.test_prior, c.mean(0), train_prior, cfg.pseudo.test_totals or None)
                                for c in calibrated]
    for m, sh in zip(members, shifts):
        (log.info if sh.converged else log.warning)("pseudo.test_prior: %s's %s", m.name, sh.describe(names))
    report = {"test_prior": np.stack([sh.prior for sh in shifts]), "counts_before": np.stack([sh.counts_before for sh in shifts]),
              "counts_after": np.stack([sh.counts_after for sh in shifts]), "prior_iterations": np.array([sh.iterations for sh in shifts])}
    return [sh.apply(v) for sh, v in zip(shifts, votes)], [sh.apply(c) for sh, c in zip(shifts, calibrated)], report


def prior_report(cfg: Config, arrays: dict[str, np.ndarray], train_prior: np.ndarray, names: Sequence[str]) -> tuple[str, list[dict]]:
    """summary.md's section (per member and class: the train share, the assumed test share, the argmax counts of the
    member's mean before and after) and the record's `prior_shift` (the same per member)."""
    lines = ["", f"## Label shift (pseudo.test_prior: {cfg.pseudo.test_prior})", ""]
    record: list[dict] = []
    for i, member in enumerate(arrays["member_names"]):
        prior, before, after = arrays["test_prior"][i], arrays["counts_before"][i], arrays["counts_after"][i]
        lines += [f"### {member}", "", "| concept | train share | test share | argmax before | argmax after |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {names[j]} | {train_prior[j]:.4f} | {prior[j]:.4f} | {before[j]:g} | {after[j]:g} |" for j in range(len(names))]
        lines.append("")
        record.append({"member": str(member), "iterations": int(arrays["prior_iterations"][i]),
                       "test_prior": [round(float(x), 6) for x in prior],
                       "counts_before": [int(x) for x in before], "counts_after": [int(x) for x in after]})
    return "\n".join(lines), record


def predict_members(cfg: Config, members: Sequence[Member], tax: Taxonomy, device, frames: FrameIndex | None = None
                    ) -> dict[str, np.ndarray]:
    """Every fold model of every member on its own crops (its config's TTA): the arrays `select` reads.

    `probs` (M, N, C) uncalibrated, member after member, and `member_of` (M,); `votes`, every
    member's `ensemble_members`, scaled by its temperature under `pseudo.calibrate` and adjusted by
    frame context under `pseudo.frame_context: stack` (`frames`: 00's ROIs by frame); `calibrated`,
    `probs` so scaled and adjusted, and corrected for label shift under `pseudo.test_prior` (the train prior:
    `frames.prior`, the usable train ROIs' class counts); `temperatures` per member; `frame_params` (M', b and eps per
    member) under stack; `test_prior` (the assumed test prior), `counts_before`, `counts_after` (argmax counts of the
    member's mean) (M', C) and `prior_iterations` (M',) under a prior correction; `embeddings` as the module docstring says.
    """
    from lib.data.context import frame_ids, model_inputs
    from lib.decide.calibration import apply_temperature
    from lib.engine.inference import predict_folds_tta

    check_totals(cfg.pseudo.test_totals, tax.n_classes, "pseudo.test_totals")
    if cfg.pseudo.test_prior != "none" and frames is None:
        raise ValueError("pseudo.test_prior needs the train prior of 00's ROIs; pass frames.")
    parts = [predict_folds_tta(m.folds, model_inputs(m.test, m.cfg.model.context), m.cfg, tax, device,
                               frames=frame_ids(m.test) if m.cfg.model.frame_context == "attention" else None) for m in members]
    stack = cfg.pseudo.frame_context == "stack"
    if stack and frames is None:
        raise ValueError("pseudo.frame_context=stack needs the frames of 00's ROIs; pass frames.")
    oofs = [member_oof(m) if cfg.pseudo.calibrate == "temperature" or stack else None for m in members]
    temps = np.array([member_temperature(m, o) if cfg.pseudo.calibrate == "temperature" else 1.0 for m, o in zip(members, oofs)])
    for m, t in zip(members, temps):
        if t != 1.0:
            log.info("pseudo.calibrate: %s's temperature %.3f (fitted on its out-of-fold rows)", m.name, t)
    votes = [apply_temperature(ensemble_members(a), t) for a, t in zip(parts, temps)]
    calibrated = [apply_temperature(a["probs"], t) for a, t in zip(parts, temps)]
    extra: dict[str, np.ndarray] = {}
    if stack and frames is not None:
        ids = members[0].test["annotation_id"].to_numpy()
        fitted = [member_frame_params(m, o, t, frames, ids) for m, o, t in zip(members, oofs, temps) if o is not None]
        params, rows = [p for p, _ in fitted], fitted[0][1]
        if rows.nothing_to_use:
            log.info("pseudo.frame_context: %s", NOTHING_TO_USE)
        for m, p in zip(members, params):
            log.info("pseudo.frame_context: %s's %s (fitted on its out-of-fold rows)", m.name, p.describe())
        votes, calibrated = frame_adjusted(votes, params, rows), frame_adjusted(calibrated, params, rows)
        extra["frame_params"] = np.array([[*p.b, p.eps] for p in params])
    if cfg.pseudo.test_prior != "none" and frames is not None:
        votes, calibrated, shifted = prior_shifted(cfg, members, votes, calibrated, frames.prior, tax.names)
        extra.update(shifted)
    out: dict[str, np.ndarray] = {
        "probs": np.concatenate([a["probs"] for a in parts]),
        "member_of": np.repeat(np.arange(len(members)), [len(a["probs"]) for a in parts]),
        "member_names": np.array([m.name for m in members]),
        "temperatures": temps,
        "votes": np.concatenate(votes),
        "calibrated": np.concatenate(calibrated),
        **extra,
    }
    if len(parts) == 1:
        out.update({k: v for k, v in parts[0].items() if k in ("embeddings", "head_probs")})
    else:  # backbones differ in width: each member's fold-mean embedding, unit length, side by side
        embs = [a["embeddings"].astype(np.float32).mean(0) for a in parts]
        out["embeddings"] = np.concatenate([e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12) for e in embs], 1)[None]
    return out


def run_round(cfg: Config, members: Sequence[Member], test: pd.DataFrame, tax: Taxonomy, out_dir: Path, device,
              title: str, frames: FrameIndex | None = None) -> dict:
    """Predict `test` (usable test ROIs) with every fold model of every member, select pseudo-labels, write the artifacts.

    `frames` (00's ROIs by frame) is what `pseudo.frame_context: stack` and `pseudo.test_prior` read."""
    from lib.report.plots import plot_umap

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = test["annotation_id"].to_numpy()
    arrays = predict_members(cfg, members, tax, device, frames)
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
    shifted, shift_record = prior_report(cfg, arrays, frames.prior, tax.names) if "test_prior" in arrays and frames else ("", [])
    atomic_write_text(out_dir / "summary.md", f"# Pseudo-labels: {title}\n\n" + format_summary(summary) + shifted)
    log.info("%s: %d of %d test ROIs pseudo-labelled, by source %s", title, len(pseudo), len(test), summary["by_source"])
    result = {"test_rois": len(test), "models": len(arrays["probs"]), "pseudo_labels": len(pseudo), "methods": list(cfg.pseudo.methods),
              "mean_weight": summary["mean_weight"], "by_source": summary["by_source"]}
    if len(members) > 1 or cfg.pseudo.calibrate != "none":
        result["members"] = [m.name for m in members]
        result["temperatures"] = [round(float(t), 4) for t in arrays["temperatures"]]
    if "frame_params" in arrays:  # per member: b, eps
        result["frame_params"] = [[round(float(v), 6) for v in row] for row in arrays["frame_params"]]
    if shift_record:  # per member: the assumed test prior, argmax counts of its mean before and after
        result["test_prior"], result["prior_shift"] = cfg.pseudo.test_prior, shift_record
    return result
