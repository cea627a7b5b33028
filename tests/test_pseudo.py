"""Pseudo-label selection: GMU by hand, vote ties, cluster cores, merging, the report, the plot, the config."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.config import ConfigError, load_config
from lib.decide.pseudo import (
    COLUMNS,
    combine_sources,
    ensemble_stats,
    format_summary,
    gmu,
    select_cluster_core,
    select_confident,
    select_vote,
    summarize,
)
from lib.report.plots import plot_umap

# ----------------------------------------------------------------------------- GMU, by hand
# One item, 3 models x 3 classes; sigma is the unbiased (ddof=1) standard deviation over the models,
# as the 3rd place's GMU code (FathomNet 2025) computes it with torch's default std:
#   class 0: 0.7 0.5 0.6 -> mu 0.6, var (0.01 + 0.01 + 0) / (3 - 1) = 0.01, sigma s = 0.1
#   class 1: 0.3 0.3 0.3 -> mu 0.3, var 0,                              sigma 0
#   class 2: 0.0 0.2 0.1 -> mu 0.1, var 0.01,                           sigma s
# Top-2 by mu: classes 0 and 1, margin 0.6 - 0.3 = 0.3.
#   top2:     sigma_0 + sigma_1 = s   -> GMU = 0.3 / 0.1 = 3, U = 0.6 (1 - e^-3)   = 0.570128
#   largest2: sigma_0 + sigma_2 = 2 s -> GMU = 0.3 / 0.2 = 1.5, U = 0.6 (1 - e^-1.5) = 0.466122
# With the population sigma (ddof=0: var 0.02/3) GMU is sqrt(3/2) times larger.
HAND = np.array([[[0.7, 0.3, 0.0]], [[0.5, 0.3, 0.2]], [[0.6, 0.3, 0.1]]])


def test_ensemble_stats_mean_and_unbiased_variance():
    mu, var = ensemble_stats(HAND)
    assert mu[0] == pytest.approx([0.6, 0.3, 0.1])
    assert var[0] == pytest.approx([0.01, 0.0, 0.01])
    assert ensemble_stats(HAND, ddof=0)[1][0] == pytest.approx([0.02 / 3, 0.0, 0.02 / 3])


@pytest.mark.parametrize("mode,g,u", [("top2", 3.0, 0.570128), ("largest2", 1.5, 0.466122)])
def test_gmu_hand_computed(mode, g, u):
    got_g, got_u = gmu(HAND, mode)
    assert got_g[0] == pytest.approx(g, rel=1e-5) and got_u[0] == pytest.approx(u, rel=1e-5)
    assert got_u[0] == pytest.approx(0.6 * (1 - math.exp(-got_g[0])))  # U = mu_max (1 - exp(-GMU))
    assert gmu(HAND, mode, ddof=0)[0][0] == pytest.approx(g * math.sqrt(3 / 2), rel=1e-5)


def test_gmu_two_members_matches_torch_std():
    """Reference: the 3rd place's GMU (FathomNet 2025) takes torch.std over the members (unbiased);
    with 2 members the population sigma would make GMU sqrt(2) times larger."""
    import torch

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=(2, 7))
    t = torch.as_tensor(probs, dtype=torch.float32)
    mu, sigma = t.mean(0), t.std(0)
    top = mu.topk(2, dim=1).values
    ref_g = (top[:, 0] - top[:, 1]) / (sigma.topk(2, dim=1).values.sum(1) + 1e-12)
    ref_u = top[:, 0] * (1 - torch.exp(-ref_g))
    g, u = gmu(probs, "largest2")
    np.testing.assert_allclose(g, ref_g.numpy(), rtol=1e-5)
    np.testing.assert_allclose(u, ref_u.numpy(), rtol=1e-5)
    np.testing.assert_allclose(gmu(probs, "largest2", ddof=0)[0], g * math.sqrt(2), rtol=1e-6)


def test_gmu_single_model_is_finite():
    one = np.array([[[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]])
    g, u = gmu(one, "largest2")
    assert np.isfinite(g).all() and g[0] > 1e9  # zero spread: eps keeps it finite
    assert u[0] == pytest.approx(0.7)  # U -> mu_max
    assert g[1] == 0 and u[1] == 0  # no margin, no confidence


def test_gmu_rejects_bad_input():
    with pytest.raises(ValueError, match="sigma_mode"):
        gmu(HAND, "top3")  # type: ignore[arg-type]  # an unknown sigma_mode on purpose: gmu must refuse it
    with pytest.raises(ValueError, match=r"\(models, items, classes\)"):
        gmu(HAND[0], "top2")


# ----------------------------------------------------------------------------- vote
# 4 models x 3 items x 3 classes.
#   item 10: votes 0 0 1 1 (tied); mean class 0 = (.6+.55+.1+.2)/4 = .3625, class 1 = .6375 -> label 1 wins
#   item 11: votes 2 2 2 2 -> label 2, mean .8
#   item 12: votes 0 0 0 1 -> label 0 (3 votes), mean .6
VOTES = np.array([
    [[0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [0.7, 0.3, 0.0]],
    [[0.55, 0.45, 0.0], [0.1, 0.1, 0.8], [0.8, 0.2, 0.0]],
    [[0.1, 0.9, 0.0], [0.1, 0.1, 0.8], [0.6, 0.4, 0.0]],
    [[0.2, 0.8, 0.0], [0.1, 0.1, 0.8], [0.3, 0.7, 0.0]],
])
IDS = np.array([10, 11, 12])


def test_vote_tie_goes_to_higher_mean_probability():
    out = select_vote(IDS, VOTES, min_agree=2, u=np.ones(3))
    row = out.set_index("annotation_id").loc[10]
    assert row["label"] == 1 and row["weight"] == pytest.approx(0.6375) and row["source"] == "vote"
    assert list(out.columns) == COLUMNS


@pytest.mark.parametrize("min_agree,kept", [(0, {11}), (4, {11}), (3, {11, 12}), (2, {10, 11, 12}), (1, {10, 11, 12})])
def test_vote_min_agree(min_agree, kept):
    assert set(select_vote(IDS, VOTES, min_agree, u=np.ones(3))["annotation_id"]) == kept


def test_vote_u_floor_and_order_by_u():
    out = select_vote(IDS, VOTES, 2, u=np.array([0.5, 0.2, 0.9]), u_floor=0.4)
    assert out["annotation_id"].tolist() == [12, 10]  # 11 below the floor; highest U first
    assert out["label"].tolist() == [0, 1] and out["weight"].tolist() == pytest.approx([0.6, 0.6375])


def test_vote_errors():
    with pytest.raises(ValueError, match="exceeds the 4 models; lower pseudo.min_agree"):
        select_vote(IDS, VOTES, 5, u=np.ones(3))
    with pytest.raises(ValueError, match="one score per item"):
        select_vote(IDS, VOTES, 2, u=np.ones(2))


def test_confident_unchanged():
    mean = VOTES.mean(0)
    out = select_confident(IDS, mean, 0.7)
    assert out["annotation_id"].tolist() == [11] and out["weight"].tolist() == pytest.approx([0.8])


# ----------------------------------------------------------------------------- cluster cores


def _blob(cx: float, cy: float) -> np.ndarray:
    """10 points: 3 within 0.03 of (cx, cy), 7 evenly on a unit circle (their offsets sum to 0)."""
    inner = [(0.01, 0.0), (0.0, 0.02), (-0.03, 0.0)]
    ring = [(math.cos(2 * math.pi * i / 7), math.sin(2 * math.pi * i / 7)) for i in range(7)]
    return np.array([(cx + dx, cy + dy) for dx, dy in inner + ring])


def _cluster_case():
    """Blob A pure 0; blob B 9 x 1 and one 2 (an inner point, so it gets relabelled); blob C 5/5 mixed; 2 non-candidates."""
    points = np.vstack([_blob(0, 0), _blob(20, 0), _blob(0, 20), [[50, 50], [51, 50]]])
    pred = np.array([0] * 10 + [1, 2] + [1] * 8 + [1, 2] * 5 + [0, 0])
    mean = np.full((len(pred), 3), 0.1)
    mean[np.arange(len(pred)), pred] = 0.8
    mask = np.ones(len(pred), bool)
    mask[-2:] = False
    return np.arange(100, 100 + len(pred)), points, mean, mask


def test_cluster_core_keeps_pure_cores_only():
    ids, points, mean, mask = _cluster_case()
    out, info = select_cluster_core(ids, points, mean, mask, purity=0.9, core_fraction=0.3, seed=0, reducer=lambda x: x)
    assert info["skipped"] is None and info["k"] == 3
    assert sorted(info["purity"]) == pytest.approx([0.5, 0.9, 1.0])  # B's 0.9 passes: purity is >=
    assert len(info["kept_clusters"]) == 2
    # ceil(0.3 * 10) = 3 per kept cluster (not 4: 0.3 * 10 is 3.0000000000000004), the 3 inner points
    assert out["annotation_id"].tolist() == [100, 101, 102, 110, 111, 112]
    assert out["label"].tolist() == [0, 0, 0, 1, 1, 1]  # 111 was predicted 2: the cluster relabels it
    assert out["weight"].tolist() == pytest.approx([0.8, 0.8, 0.8, 0.8, 0.1, 0.8])  # mean prob of the label given
    assert (out["source"] == "cluster_core").all() and list(out.columns) == COLUMNS
    assert info["core"].sum() == 6 and len(info["coords"]) == len(info["rows"]) == 30  # non-candidates left out


def test_cluster_core_purity_and_fraction():
    ids, points, mean, mask = _cluster_case()
    out, _ = select_cluster_core(ids, points, mean, mask, purity=0.95, core_fraction=1.0, seed=0, reducer=lambda x: x)
    assert out["annotation_id"].tolist() == list(range(100, 110))  # only A, all of it


def test_cluster_core_min_size_skips_small_pure_clusters():
    """A lone point far away is a pure cluster of one; min_size keeps it out."""
    ids, points, mean, mask = _cluster_case()
    points, mean = np.vstack([points, [[-40, -40]]]), np.vstack([mean, [[0.1, 0.1, 0.8]]])
    ids, mask = np.append(ids, 999), np.append(mask, True)
    mean[-1] = [0.1, 0.1, 0.8]  # predicted 2, the 4th predicted class -> k = 3 still (classes 0, 1, 2)
    loose, _ = select_cluster_core(ids, points, mean, mask, purity=0.9, core_fraction=1.0, seed=0, reducer=lambda x: x)
    strict, _ = select_cluster_core(ids, points, mean, mask, purity=0.9, core_fraction=1.0, seed=0, reducer=lambda x: x, min_size=2)
    assert 999 in loose["annotation_id"].tolist() and 999 not in strict["annotation_id"].tolist()


def test_cluster_core_tiny_input_is_skipped():
    out, info = select_cluster_core(np.array([1, 2, 3]), np.eye(3), np.eye(3), reducer=lambda x: x)
    assert out.empty and list(out.columns) == COLUMNS
    assert "fewer than the 4" in info["skipped"]


def test_cluster_core_real_umap_smoke():
    rng = np.random.default_rng(0)
    centers = np.zeros((2, 16))
    centers[0, 0], centers[1, 1] = 10.0, 10.0
    emb = np.vstack([c + rng.normal(scale=0.5, size=(20, 16)) for c in centers])
    mean = np.repeat(np.array([[0.9, 0.1], [0.1, 0.9]]), 20, axis=0)
    out, info = select_cluster_core(np.arange(40), emb, mean, n_neighbors=15, metric="euclidean", core_fraction=0.5, seed=0)
    assert info["coords"].shape == (40, 2) and np.isfinite(info["coords"]).all()
    assert len(out) == 20 and (out["label"].to_numpy() == (out["annotation_id"].to_numpy() >= 20)).all()


# ----------------------------------------------------------------------------- merging and the report


def _frames():
    conf = pd.DataFrame({"annotation_id": [1, 2, 3, 6], "label": [0, 1, 2, 0], "weight": [0.97, 0.98, 0.99, 0.97], "source": "confidence"})
    vote = pd.DataFrame({"annotation_id": [1, 2, 4, 6], "label": [0, 2, 1, 1], "weight": [0.9, 0.99, 0.8, 0.99], "source": "vote"})
    core = pd.DataFrame({"annotation_id": [2, 5], "label": [2, 0], "weight": [0.5, 0.6], "source": "cluster_core"})
    return conf, vote, core


def test_combine_sources_agreement_and_disagreement():
    out = combine_sources(_frames())
    assert list(out.columns) == COLUMNS and out["annotation_id"].tolist() == [1, 2, 3, 4, 5, 6]
    rows = out.set_index("annotation_id")
    assert rows.loc[1, "source"] == "confidence+vote" and rows.loc[1, "weight"] == pytest.approx(0.97)  # agree: max weight
    assert rows.loc[2, "label"] == 2 and rows.loc[2, "source"] == "cluster_core+vote"  # 2 sources beat 1
    assert rows.loc[2, "weight"] == pytest.approx(0.99)
    assert rows.loc[6, "label"] == 1 and rows.loc[6, "source"] == "vote"  # 1 vs 1: the larger weight wins
    assert combine_sources([out]).equals(out)  # idempotent
    assert combine_sources([]).empty and list(combine_sources([]).columns) == COLUMNS


def test_summarize_precision():
    pseudo = combine_sources(_frames())
    # labels: 1->0 ok, 2->2 (truth 1) wrong, 3->2 ok, 4->1 ok, 5->0 (truth 3) wrong, 6 unknown
    truth = {1: 0, 2: 1, 3: 2, 4: 1, 5: 3}
    names = ["a", "b", "c", "d"]
    s = summarize(pseudo, n_test=12, truth=truth, names=names)
    assert s["n_pseudo"] == 6 and s["coverage"] == pytest.approx(0.5) and s["n_known"] == 5
    assert s["by_source"] == {"cluster_core": 2, "confidence": 2, "vote": 4}
    assert s["by_combination"] == {"cluster_core": 1, "cluster_core+vote": 1, "confidence": 1, "confidence+vote": 1, "vote": 2}
    assert s["per_class"] == {"a": 2, "b": 2, "c": 2}
    p = s["precision"]
    assert p["overall"] == pytest.approx(3 / 5)
    assert p["by_source"] == pytest.approx({"confidence": 1.0, "vote": 2 / 3, "cluster_core": 0.0})
    assert p["by_combination"]["vote"] == pytest.approx(1.0)  # row 4 right, row 6 unknown
    by_name = summarize(pseudo, 12, pd.Series({k: names[v] for k, v in truth.items()}), names)
    assert by_name["precision"] == p
    text = format_summary(s)
    assert "**6** of 12" in text and "overall precision 60.0%" in text and "| vote | 4 | 66.7% |" in text
    assert "precision" not in format_summary(summarize(pseudo, 12))


def test_plot_umap_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    coords, labels = rng.normal(size=(60, 3)), np.arange(60) % 25  # 25 labels: continuous colours, legend capped
    path = tmp_path / "umap.png"
    plot_umap(coords, labels, labels < 3, [f"c{i}" for i in range(25)], path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["umap.png"]


# ----------------------------------------------------------------------------- config


def test_pseudo_config_defaults_and_example_block(tmp_path):
    p = load_config(None).pseudo
    assert (p.threshold, p.methods, p.min_agree, p.gmu_sigma, p.purity, p.core_fraction, p.rounds) == (
        0.96, ["confidence"], 0, "largest2", 0.9, 0.5, 1)
    text = Path("configs/fathomnet2025.yaml").read_text()
    for key in ("methods", "min_agree", "u_floor", "gmu_sigma", "umap_", "purity", "core_fraction", "rounds"):
        text = text.replace(f"  # {key}", f"  {key}")  # the commented example, switched on
    (tmp_path / "c.yaml").write_text(text)
    p = load_config(tmp_path / "c.yaml").pseudo
    assert p.methods == ["confidence", "vote", "cluster_core"] and p.u_floor == 0.5 and p.umap_metric == "cosine"


@pytest.mark.parametrize(
    "override,msg",
    [("pseudo.methods=[confidence, votes]", r"pseudo.methods must list one or more of confidence, vote, cluster_core \(unknown: 'votes'\)"),
     ("pseudo.methods=[]", "pseudo.methods must list one or more"),
     ("pseudo.methods=[vote, vote]", "must not repeat"),
     ("pseudo.min_agree=-1", "pseudo.min_agree must be 0"),
     ("pseudo.u_floor=1.5", r"pseudo.u_floor must lie in \[0, 1\]"),
     ("pseudo.purity=0", r"pseudo.purity must lie in \(0, 1\]"),
     ("pseudo.core_fraction=1.2", r"pseudo.core_fraction must lie in \(0, 1\]"),
     ("pseudo.rounds=0", "pseudo.rounds must be at least 1"),
     ("pseudo.umap_components=1", "pseudo.umap_components must be at least 2"),
     ("pseudo.umap_neighbors=1", "pseudo.umap_neighbors must be at least 2"),
     ("pseudo.umap_min_dist=2", "pseudo.umap_min_dist must lie in"),
     ("pseudo.weight_power=-1", "pseudo.weight_power must be 0"),
     ("pseudo.gmu_sigma=top", r"unknown value 'top' \(did you mean 'top2'\?\)"),
     ("pseudo.umap_metric=cosin", r"did you mean 'cosine'")],
)
def test_pseudo_config_checks(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])
