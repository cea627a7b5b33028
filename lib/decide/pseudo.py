"""Pseudo-label selection from a fold ensemble's test predictions.

Three selectors, each returning rows (annotation_id, label, weight, source), and a merger:

- `select_confident`: the ensemble's mean top probability reaches a threshold.
- `select_vote`: the models' argmax votes agree often enough and the gated marginal
  uncertainty score U (`gmu`) clears a floor; probabilities alone are over-confident on
  shifted test data, agreement between independently trained models is not.
- `select_cluster_core`: UMAP + KMeans on the test embeddings; clusters that are pure in the
  ensemble's predictions lend their majority label to the members nearest their centre, so
  structure in feature space can vouch for rows the classifier alone is unsure of.
- `combine_sources`: one row per annotation, recording which selectors back its label.

`summarize` / `format_summary` count what was selected and, when truth is known (demo data,
or a labelled hold-out), how precise each source was.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

COLUMNS = ["annotation_id", "label", "weight", "source"]


def _frame(annotation_ids: np.ndarray, labels: np.ndarray, weights: np.ndarray, source: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "annotation_id": np.asarray(annotation_ids),
            "label": np.asarray(labels, dtype=np.int64),
            "weight": np.asarray(weights, dtype=float),
            "source": source,
        },
        columns=COLUMNS,
    )


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[0] < 1 or probs.shape[2] < 2:
        raise ValueError(
            f"probs must have shape (models, items, classes) with at least 1 model and 2 classes, got {probs.shape}; "
            "stack the per-model probabilities (folds x heads flattened) along axis 0."
        )
    return probs


# ----------------------------------------------------------------------------- ensemble statistics


def ensemble_stats(probs: np.ndarray, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per item and class, the mean mu and the variance sigma^2 over models (unbiased, ddof=1, by default).

    `probs` is (models, items, classes); models may be folds x heads flattened. ddof=1 is what the
    3rd place's GMU code computes (torch's default `std`); with fewer than ddof + 1 models there
    is no spread to estimate and the variance is 0 rather than NaN.
    """
    probs = _check_probs(probs)
    if probs.shape[0] <= ddof:
        return probs.mean(0), np.zeros(probs.shape[1:])
    return probs.mean(0), probs.var(0, ddof=ddof)


def gmu(
    probs: np.ndarray, sigma_mode: Literal["top2", "largest2"] = "largest2", eps: float = 1e-12, ddof: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Gated marginal uncertainty: (GMU, U) per item.

    GMU = (mu_max - mu_2nd) / (sigma_a + sigma_b + eps) is the top-2 margin of the ensemble mean in
    units of model disagreement, and U = mu_max * (1 - exp(-GMU)) gates the top probability by it:
    a high mean that the models disagree on is discounted. sigma = sqrt(variance over models) with
    the unbiased ddof=1, as the 3rd place's code (FathomNet 2025) in both modes: with M members the
    population sigma (ddof=0) is sqrt((M - 1) / M) of it, so GMU would be sqrt(M / (M - 1)) times
    larger (sqrt(2) for 2 members) and a given `u_floor` would let more rows through. `ddof=0` is
    kept as an argument only, to measure that difference; no config key picks it. `top2` takes
    sigma of the two classes with the highest mu, `largest2` the two largest sigma over all classes
    (as the 3rd place's code; never smaller than top2, so stricter). With one model sigma is 0:
    eps keeps GMU finite (huge unless the margin is 0), so U -> mu_max.
    """
    if sigma_mode not in ("top2", "largest2"):
        raise ValueError(f"sigma_mode {sigma_mode!r} is unknown; use 'top2' or 'largest2'.")
    mu, var = ensemble_stats(probs, ddof)
    sigma = np.sqrt(var)
    rows = np.arange(mu.shape[0])
    order = np.argsort(-mu, axis=1, kind="stable")
    i1, i2 = order[:, 0], order[:, 1]
    mu_max, mu_2nd = mu[rows, i1], mu[rows, i2]
    if sigma_mode == "top2":
        spread = sigma[rows, i1] + sigma[rows, i2]
    else:
        spread = np.sort(sigma, axis=1)[:, -2:].sum(1)
    g = (mu_max - mu_2nd) / (spread + eps)
    u = mu_max * -np.expm1(-g)  # 1 - exp(-g), exact for small g
    return g, u


# ----------------------------------------------------------------------------- selectors


def select_confident(annotation_ids: np.ndarray, probs: np.ndarray, threshold: float) -> pd.DataFrame:
    """Rows whose ensemble top probability reaches `threshold`; the weight is that probability."""
    top = probs.max(1)
    keep = top >= threshold
    return _frame(np.asarray(annotation_ids)[keep], probs.argmax(1)[keep], top[keep], "confidence")


def vote_counts(probs: np.ndarray) -> np.ndarray:
    """(items, classes) number of models whose argmax is each class."""
    probs = _check_probs(probs)
    n_models, n_items, n_classes = probs.shape
    counts = np.zeros((n_items, n_classes), dtype=np.int64)
    rows = np.arange(n_items)
    for m in range(n_models):
        np.add.at(counts, (rows, probs[m].argmax(1)), 1)
    return counts


def select_vote(
    annotation_ids: np.ndarray, probs: np.ndarray, min_agree: int, u: np.ndarray, u_floor: float = 0.0
) -> pd.DataFrame:
    """Rows where at least `min_agree` models' argmax vote for the same label and U >= `u_floor`.

    `min_agree` <= 0 means every model. The label is the most voted class; a tie in votes goes
    to the tied class with the higher ensemble mean probability (the vote cannot decide, so the
    soft evidence does; a `min_agree` above half the models rules ties out). Weight = the
    ensemble mean probability of that label, on the same scale as `select_confident`'s. Rows
    come out ordered by U, highest first, so a caller that caps the count keeps the least uncertain.
    """
    probs = _check_probs(probs)
    n_models, n_items, _ = probs.shape
    u = np.asarray(u, dtype=float)
    if u.shape != (n_items,):
        raise ValueError(f"u must hold one score per item ({n_items}), got shape {u.shape}; pass gmu(probs)[1].")
    need = n_models if min_agree <= 0 else min_agree
    if need > n_models:
        raise ValueError(
            f"min_agree={min_agree} exceeds the {n_models} models; lower pseudo.min_agree or set it to 0 (all models)."
        )
    counts = vote_counts(probs)
    mean = probs.mean(0)
    top = counts.max(1)
    tied = counts == top[:, None]
    label = np.where(tied, mean, -np.inf).argmax(1)
    keep = (top >= need) & (u >= u_floor)
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(-u[idx], kind="stable")]
    return _frame(np.asarray(annotation_ids)[idx], label[idx], mean[idx, label[idx]], "vote")


def _majority(labels: np.ndarray, mean_probs: np.ndarray) -> tuple[int, int]:
    """(label, count) of the most frequent label; ties go to the label with the larger summed mean probability."""
    values, counts = np.unique(labels, return_counts=True)
    tied = values[counts == counts.max()]
    if len(tied) > 1:
        tied = tied[[np.argmax(mean_probs[:, tied].sum(0))]]
    return int(tied[0]), int(counts.max())


def _umap_reducer(n_components: int, n_neighbors: int, min_dist: float, metric: str, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    def reduce(x: np.ndarray) -> np.ndarray:
        import umap  # lazy: numba compiles on first use (~15 s)

        model = umap.UMAP(n_components=n_components, n_neighbors=min(n_neighbors, len(x) - 1), min_dist=min_dist,
                          metric=metric, random_state=seed, n_jobs=1)
        return model.fit_transform(x)

    return reduce


def _pure_cluster_cores(coords: np.ndarray, pred: np.ndarray, probs: np.ndarray, purity: float, core_fraction: float,
                        seed: int, min_size: int) -> dict[str, Any]:
    """KMeans (k = distinct predictions) on `coords`; in each cluster at least `purity` pure (and `min_size` big), the
    ceil(core_fraction * size) members nearest the centroid get the majority label (`assigned`, -1 elsewhere)."""
    from sklearn.cluster import KMeans

    k = len(np.unique(pred))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(coords)
    cluster = km.labels_
    dist = np.linalg.norm(coords - km.cluster_centers_[cluster], axis=1)
    purities, majorities = np.zeros(k), np.zeros(k, np.int64)
    core = np.zeros(len(coords), bool)
    assigned = np.full(len(coords), -1, np.int64)
    kept = []
    for c in range(k):
        members = np.flatnonzero(cluster == c)
        if len(members) == 0:
            continue
        label, count = _majority(pred[members], probs[members])
        purities[c], majorities[c] = count / len(members), label
        if purities[c] < purity or len(members) < min_size:  # a cluster of one or two is pure by accident
            continue
        kept.append(c)
        n_core = math.ceil(core_fraction * len(members) - 1e-9)  # 0.3 * 10 is 3.0000000000000004 in floats
        nearest = members[np.argsort(dist[members], kind="stable")[:n_core]]
        core[nearest] = True
        assigned[nearest] = label
    return {"cluster": cluster, "purity": purities, "majority": majorities, "kept_clusters": kept, "core": core, "k": k,
            "assigned": assigned}


def _aligned(annotation_ids: np.ndarray, embeddings: np.ndarray, mean_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three inputs as arrays, checked to hold one row per annotation id."""
    ids, emb, probs = np.asarray(annotation_ids), np.asarray(embeddings, dtype=float), np.asarray(mean_probs, dtype=float)
    if emb.ndim != 2 or len(emb) != len(ids) or probs.shape[0] != len(ids):
        raise ValueError(f"embeddings {emb.shape} and mean_probs {probs.shape} must have one row per annotation id ({len(ids)}); "
                         "pass arrays aligned with annotation_ids.")
    return ids, emb, probs


def select_cluster_core(
    annotation_ids: np.ndarray,
    embeddings: np.ndarray,
    mean_probs: np.ndarray,
    candidates_mask: np.ndarray | None = None,
    n_components: int = 2,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    purity: float = 0.9,
    core_fraction: float = 0.5,
    seed: int = 42,
    reducer: Callable[[np.ndarray], np.ndarray] | None = None,
    min_size: int = 1,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Cluster-core pseudo-labels: UMAP -> KMeans -> pure clusters' central members.

    Among candidate rows, embeddings (averaged over folds by the caller) are reduced with UMAP
    (or `reducer`, any X -> low-D callable) and clustered with KMeans, k = the number of distinct
    predicted classes (argmax of `mean_probs`) among candidates. A cluster whose majority
    predicted label has a share >= `purity` hands that label to its ceil(core_fraction * size)
    members nearest the centroid, including members predicted otherwise: the point is that the
    feature-space neighbourhood outvotes a lone prediction. Weight = the ensemble mean
    probability of the assigned label, so a relabelled member the classifier doubts weighs little.

    Returns (rows, info); info holds what `lib.report.plots.plot_umap` needs: `rows` (candidate
    positions in the inputs), `coords`, `pred`, `cluster`, `purity` and `majority` per cluster,
    `kept_clusters`, `core` (bool over candidates) and `skipped` (None, or why nothing was tried).
    Clusters under `min_size` members are never kept: their purity says nothing.
    """
    ids, embeddings, mean_probs = _aligned(annotation_ids, embeddings, mean_probs)
    mask = np.ones(len(ids), bool) if candidates_mask is None else np.asarray(candidates_mask, bool)
    rows = np.flatnonzero(mask)
    pred = mean_probs[rows].argmax(1) if len(rows) else np.zeros(0, np.int64)
    info: dict[str, Any] = {
        "rows": rows, "coords": np.zeros((len(rows), n_components)), "pred": pred,
        "cluster": np.full(len(rows), -1), "purity": np.zeros(0), "majority": np.zeros(0, np.int64),
        "kept_clusters": [], "core": np.zeros(len(rows), bool), "k": 0, "skipped": None,
    }
    min_rows = max(4, n_components + 2)  # UMAP needs >= 2 neighbours and a spectral init with room to spare
    if len(rows) < min_rows:
        info["skipped"] = f"{len(rows)} candidate rows, fewer than the {min_rows} UMAP + KMeans need"
        return _frame(ids[:0], np.zeros(0, np.int64), np.zeros(0), "cluster_core"), info

    reduce = reducer or _umap_reducer(n_components, n_neighbors, min_dist, metric, seed)
    coords = np.asarray(reduce(embeddings[rows]), dtype=float)
    if coords.ndim != 2 or len(coords) != len(rows):
        raise ValueError(f"the reducer returned shape {coords.shape} for {len(rows)} rows; it must return one low-D row per input row.")
    info["coords"] = coords

    found = _pure_cluster_cores(coords, pred, mean_probs[rows], purity, core_fraction, seed, min_size)
    core, assigned = found.pop("core"), found.pop("assigned")
    info.update(found, core=core)
    pick = np.flatnonzero(core)
    labels = assigned[pick]
    return _frame(ids[rows[pick]], labels, mean_probs[rows[pick], labels], "cluster_core"), info


# ----------------------------------------------------------------------------- merging


def combine_sources(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One row per annotation_id from several selections.

    Sources backing the same label are merged: source = their names sorted and '+'-joined
    ("confidence+vote"), weight = the largest of their weights. When sources disagree, the label
    backed by the most sources wins, then the larger weight, then the lower class index; the
    losing sources are dropped from `source`. Already-combined sources ("a+b") are split first,
    so combining is idempotent. Rows come out sorted by annotation_id.
    """
    parts = [f[COLUMNS] for f in frames if len(f)]
    if not parts:
        return _frame(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), "")
    df = pd.concat(parts, ignore_index=True)
    df = df.assign(source=df["source"].str.split("+")).explode("source")
    grouped = (
        df.groupby(["annotation_id", "label"], sort=False)
        .agg(weight=("weight", "max"), source=("source", lambda s: "+".join(sorted(set(s)))))
        .reset_index()
    )
    grouped["n_sources"] = grouped["source"].str.count(r"\+") + 1
    grouped = grouped.sort_values(["annotation_id", "n_sources", "weight", "label"], ascending=[True, False, False, True])
    out = grouped.drop_duplicates("annotation_id", keep="first")[COLUMNS].reset_index(drop=True)
    return out.astype({"label": np.int64, "weight": float})


# ----------------------------------------------------------------------------- reporting


def _truth_lookup(truth: Mapping | pd.Series, names: Sequence[str] | None) -> dict:
    """annotation_id -> class index; truth values may be indices or (with `names`) concept names."""
    index = {n: i for i, n in enumerate(names)} if names is not None else {}
    out = {}
    for aid, value in truth.items():
        if isinstance(value, str):
            if value not in index:
                continue  # a class the taxonomy does not know cannot be matched
            value = index[value]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out[aid] = int(value)
    return out


def summarize(
    pseudo: pd.DataFrame, n_test: int, truth: Mapping | pd.Series | None = None, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Counts per source and class and, when `truth` (annotation_id -> class index or name) is given, precision.

    `by_source` counts every row that includes a source (a "confidence+vote" row counts for
    both); `by_combination` counts the exact source strings. Precision is the fraction correct
    among the rows whose truth is known, per source (rows including it), per combination and
    overall; None where no such row has a known truth. Values are plain ints/floats for JSON.
    """
    sources = pseudo["source"].astype(str).str.split("+") if len(pseudo) else pd.Series([], dtype=object)
    singles = sorted({s for parts in sources for s in parts})

    def name(i: int) -> str:
        return names[i] if names is not None else str(i)

    out: dict[str, Any] = {
        "n_test": int(n_test),
        "n_pseudo": len(pseudo),
        "coverage": float(len(pseudo) / n_test) if n_test else 0.0,
        "mean_weight": float(pseudo["weight"].mean()) if len(pseudo) else None,
        "by_source": {s: int(sum(s in parts for parts in sources)) for s in singles},
        "by_combination": {str(k): int(v) for k, v in pseudo["source"].value_counts().sort_index().items()},
        "per_class": {name(int(k)): int(v) for k, v in pseudo["label"].value_counts().sort_index().items()},
    }
    if truth is None:
        return out
    lookup = _truth_lookup(truth, names)
    known = pseudo["annotation_id"].map(lambda a: a in lookup).to_numpy(bool) if len(pseudo) else np.zeros(0, bool)
    correct = np.array([lookup.get(a, -1) == int(lab) for a, lab in zip(pseudo["annotation_id"], pseudo["label"])], bool)

    def precision(rows: np.ndarray) -> float | None:
        rows = rows & known
        return float(correct[rows].mean()) if rows.any() else None

    src = pseudo["source"].astype(str).to_numpy()
    out["n_known"] = int(known.sum())
    out["precision"] = {
        "overall": precision(np.ones(len(pseudo), bool)),
        "by_source": {s: precision(np.array([s in parts for parts in sources], bool)) for s in singles},
        "by_combination": {c: precision(src == c) for c in out["by_combination"]},
    }
    return out


def format_summary(summary: dict[str, Any], max_classes: int = 20) -> str:
    """A short markdown report of `summarize`'s dict (the most frequent `max_classes` classes)."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"
    prec = summary.get("precision")
    lines = [
        f"**{summary['n_pseudo']}** of {summary['n_test']} test rows pseudo-labelled ({pct(summary['coverage'])})"
        + (f"; truth known for {summary['n_known']}, overall precision {pct(prec['overall'])}." if prec else "."),
        "",
        "| source | rows | precision |" if prec else "| source | rows |",
        "|---|---:|---:|" if prec else "|---|---:|",
    ]
    for kind in ("by_source", "by_combination"):
        for s, n in summary[kind].items():
            label = s if kind == "by_source" else f"= {s}"
            lines.append(f"| {label} | {n} | {pct(prec[kind][s])} |" if prec else f"| {label} | {n} |")
    lines += ["", "| class | rows |", "|---|---:|"]
    top = sorted(summary["per_class"].items(), key=lambda kv: (-kv[1], kv[0]))
    lines += [f"| {c} | {n} |" for c, n in top[:max_classes]]
    if len(top) > max_classes:
        lines.append(f"| ({len(top) - max_classes} more) | {sum(n for _, n in top[max_classes:])} |")
    return "\n".join(lines) + "\n"
