"""kNN search (flat, IVF, small bases) and the voting protocols on random and hand-made neighbours."""
import numpy as np
import pytest

from lib.config import ConfigError, load_config
from lib.data.taxonomy import Taxonomy, load_taxonomy_csv
from lib.decide.knn import (
    VOTES,
    best_vote,
    build_tree,
    effective_nlist,
    label_distribution,
    neighbour_distribution,
    score_votes,
    search,
    vote,
    votes_table,
)
from lib.decide.metric import DEFAULT_TAXONOMY

TAX = load_taxonomy_csv(DEFAULT_TAXONOMY)


def small() -> Taxonomy:
    """Order O with family F (a concept) holding genera G1 (and its species S1) and G2; order O2 beside it."""
    k, p, c = "K", "P", "C"
    return Taxonomy(
        names=("F", "G1", "S1", "G2", "O2"),
        lineages=(
            (k, p, c, "O", "F", None, None),
            (k, p, c, "O", "F", "G1", None),
            (k, p, c, "O", "F", "G1", "S1"),
            (k, p, c, "O", "F", "G2", None),
            (k, p, c, "O2", None, None, None),
        ),
    )


def dist_of(tax: Taxonomy, weights: dict[str, float]) -> np.ndarray:
    p = np.zeros((1, tax.n_classes))
    for name, w in weights.items():
        p[0, tax.index(name)] = w
    return p / p.sum()


def answer(tax: Taxonomy, weights: dict[str, float], protocol: str) -> str:
    return tax.names[int(vote(dist_of(tax, weights), tax, protocol)[0])]


# ----------------------------------------------------------------------------- search


def test_search_is_exact_cosine():
    rng = np.random.default_rng(0)
    base, q = rng.normal(size=(300, 16)), rng.normal(size=(20, 16))
    sims, idx = search(base, q, 5)
    bn, qn = base / np.linalg.norm(base, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    ref = np.argsort(-(qn @ bn.T), axis=1)[:, :5]
    assert np.array_equal(idx, ref) and np.allclose(sims, np.take_along_axis(qn @ bn.T, ref, 1), atol=1e-5)


def test_ivf_probing_every_list_matches_flat():
    rng = np.random.default_rng(1)
    base, q = rng.normal(size=(2000, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    assert effective_nlist(10, len(base)) == 10
    s_flat, i_flat = search(base, q, 10, "flat")
    s_ivf, i_ivf = search(base, q, 10, "ivf", nlist=10, nprobe=10)
    assert np.array_equal(i_flat, i_ivf) and np.allclose(s_flat, s_ivf, atol=1e-5)


def test_nlist_is_capped_by_the_base_size():
    assert effective_nlist(100, 23699) == 100
    assert effective_nlist(1000, 23699) == 23699 // 39
    assert effective_nlist(100, 50) == 1 and effective_nlist(100, 0) == 1


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_k_larger_than_the_base(index):
    rng = np.random.default_rng(2)
    base, q = rng.normal(size=(5, 8)), rng.normal(size=(3, 8))
    sims, idx = search(base, q, 10, index, nlist=100, nprobe=10)
    assert idx.shape == (3, 5) and all(sorted(r) == list(range(5)) for r in idx.tolist())
    p = neighbour_distribution(base, np.array([0, 1, 1, 2, 2]), q, n_classes=4, k=10, index=index)
    assert p.shape == (3, 4) and np.allclose(p.sum(1), 1) and np.all(p[:, 3] == 0)


def test_label_distribution_skips_missing_neighbours():
    p = label_distribution(np.array([[1, -1, 1, 0]]), np.array([[0.5, 0.9, 0.5, 0.0]]), 3)
    assert p[0, 1] > 0.99 and p[0, 2] == 0 and np.isclose(p.sum(), 1)


# ----------------------------------------------------------------------------- votes


@pytest.mark.parametrize("protocol", VOTES)
def test_every_protocol_answers_a_valid_concept(protocol):
    rng = np.random.default_rng(3)
    nn = rng.integers(0, TAX.n_classes, size=(200, 10))
    nn[:5] = -1  # rows with no neighbour at all still get an answer
    nn[5:50, 3:] = nn[5:50, :1]  # and rows with a clear majority
    p = label_distribution(nn, rng.uniform(0, 1, size=nn.shape), TAX.n_classes)
    pred = vote(p, TAX, protocol)
    assert pred.shape == (200,) and pred.dtype.kind == "i" and pred.min() >= 0 and pred.max() < TAX.n_classes


def test_hierarchical_and_strict_differ_on_a_split_family():
    tax = small()
    split = {"G1": 0.45, "G2": 0.4, "O2": 0.15}  # one family, two genera, no strict majority below the family
    assert answer(tax, split, "flat") == "G1" and answer(tax, split, "hierarchical") == "G1"
    assert answer(tax, split, "strict") == "F"
    assert answer(tax, {"G1": 0.3, "S1": 0.3, "G2": 0.4}, "strict") == "G1"  # G1's subtree holds 0.6
    assert answer(tax, {"G1": 0.3, "S1": 0.3, "G2": 0.4}, "flat") == "G2"


def test_hierarchical_stops_where_the_node_itself_outweighs_its_children():
    tax = small()
    assert answer(tax, {"F": 0.4, "G1": 0.35, "G2": 0.25}, "hierarchical") == "F"
    assert answer(tax, {"F": 0.3, "G1": 0.45, "G2": 0.25}, "hierarchical") == "G1"
    assert answer(tax, {"F": 0.3, "G1": 0.45, "G2": 0.25}, "strict") == "F"


def test_strict_backs_off_to_the_nearest_concept_above_else_min_risk():
    no_family = Taxonomy(names=("O", "G1", "G2", "X"), lineages=(
        ("K", "P", "C", "O", None, None, None), ("K", "P", "C", "O", "F", "G1", None),
        ("K", "P", "C", "O", "F", "G2", None), ("K", "P", "C", "O2", None, None, None)))
    assert answer(no_family, {"G1": 0.5, "G2": 0.5}, "strict") == "O"  # F is no concept: its parent O is
    # No concept at or above the split: min-risk over all (the real Sebastes / Sebastolobus split).
    assert answer(TAX, {"Sebastes": 0.5, "Sebastolobus": 0.5}, "strict") == "Sebastes"


def test_exceptions_are_children_of_their_node_not_ancestors():
    # Actinopterygii is listed at Chordata: it competes with Teleostei as a child, and wins by weight.
    assert answer(TAX, {"Actinopterygii": 0.6, "Sebastes": 0.4}, "hierarchical") == "Actinopterygii"
    assert answer(TAX, {"Actinopterygii": 0.4, "Sebastes": 0.6}, "hierarchical") == "Sebastes"
    assert answer(TAX, {"Actinopterygii": 0.5, "Tunicata": 0.3, "Sebastes": 0.2}, "hierarchical") == "Actinopterygii"
    tree = build_tree(TAX)
    assert tree.at[TAX.index("Actinopterygii")] != tree.at[TAX.index("Tunicata")]


def test_min_risk_prefers_the_common_genus():
    tax = Taxonomy(names=("G", "S1", "S2", "S3"), lineages=(
        ("K", "P", "C", "O", "F", "G", None), ("K", "P", "C", "O", "F", "G", "S1"),
        ("K", "P", "C", "O", "F", "G", "S2"), ("K", "P", "C", "O", "F", "G", "S3")))
    w = {"S1": 0.4, "S2": 0.35, "S3": 0.25}
    assert answer(tax, w, "min_risk") == "G" and answer(tax, w, "flat") == "S1"
    assert answer(tax, {"S1": 0.8, "S2": 0.2}, "min_risk") == "S1"


def test_unknown_protocol():
    with pytest.raises(ValueError, match="Unknown knn vote 'majority'"):
        vote(np.ones((1, 5)) / 5, small(), "majority")


def test_scores_table_and_best():
    tax = small()
    labels = np.array([0, 1, 3])
    p = np.eye(tax.n_classes)[[0, 1, 1]]
    scores = score_votes(p, labels, tax, ["flat", "min_risk"])
    assert scores["flat"]["cv_top1"] == pytest.approx(2 / 3)
    assert best_vote({"a": {"cv_distance": 2.0}, "b": {"cv_distance": 1.0}}) == "b"
    table = votes_table(scores, "flat")
    assert table.startswith("| vote | CV distance |") and "| flat |" in table and "| yes |" in table


# ----------------------------------------------------------------------------- config and the stage graph


def test_knn_config_checks():
    cfg = load_config(None)
    assert cfg.knn.votes == list(VOTES) and cfg.knn.vote == "best" and cfg.knn.index == "flat"
    with pytest.raises(ConfigError, match="knn.vote 'strict' must be best or one of knn.votes"):
        load_config(None, ["knn.votes=[flat, min_risk]", "knn.vote=strict"])
    with pytest.raises(ConfigError, match="knn.votes must list at least one protocol"):
        load_config(None, ["knn.votes=[flat, flat]"])
    with pytest.raises(ConfigError, match=r"'knn.votes\[0\]' has unknown value 'minrisk' \(did you mean 'min_risk'\?\)"):
        load_config(None, ["knn.votes=[minrisk]"])
    with pytest.raises(ConfigError, match="knn.nlist and knn.nprobe"):
        load_config(None, ["knn.index=ivf", "knn.nprobe=0"])


def test_phase1_source_makes_01_an_upstream():
    from lib.pipeline.graph import upstream_of

    assert upstream_of(load_config(None), "knn") == ("00_prepare",)
    assert upstream_of(load_config(None, ["knn.source=phase1"]), "knn") == ("00_prepare", "01_train")
