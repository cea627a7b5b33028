"""Greedy ensemble selection (Caruana et al. 2004) on hand-made two-class cases whose selections can be followed by hand."""
import numpy as np
import pytest

from lib.data.taxonomy import load_taxonomy_csv
from lib.decide.decode import decode
from lib.decide.metric import DEFAULT_TAXONOMY, score_labels
from lib.decide.weights import blend, blend_weights, greedy_weights

ZERO_ONE = 1.0 - np.eye(2)  # distance 1 for a wrong class: min-risk is argmax and the distance is the error rate


def two_class(p0) -> np.ndarray:
    """Rows [p, 1 - p] from each row's probability of class 0 (the truth of every row below)."""
    p0 = np.asarray(p0, dtype=np.float64)
    return np.stack([p0, 1 - p0], axis=1)


# Every row's truth is class 0; a blend answers 0 where its summed class-0 probability beats half the count total.
# m0 errs on row 3 (1/4), m1 on rows 0, 1, 3 (3/4), m2 on rows 1, 2 (2/4): m0 starts. m0 + m2 gets all four
# right (1.7, 1.3, 1.35, 1.3 > 1); m0 + m1 still errs on row 3 (0.6) and m0 twice is m0. Then nothing beats 0.
THREE = [two_class([0.9, 0.9, 0.9, 0.4]), two_class([0.45, 0.45, 0.9, 0.2]), two_class([0.8, 0.4, 0.45, 0.9])]
LABELS4 = np.zeros(4, dtype=np.int64)

# Rows a, b, b, c, c. X (m0) errs on b, b (2/5); Y (m1) on a, c, c (3/5): X starts. X + Y errs on a only (1/5;
# X twice stays 2/5). Then X again: 2X + Y gets a right too (2 * 0.3 - 0.4 > 0), while X + 2Y errs on a, c, c.
X = two_class([0.8, 0.4, 0.4, 0.7, 0.7])
Y = two_class([0.1, 0.8, 0.8, 0.35, 0.35])
LABELS5 = np.zeros(5, dtype=np.int64)


@pytest.mark.parametrize("decode_method", ["min_risk", "argmax"])
def test_best_single_then_the_member_that_helps_then_stop(decode_method):
    w = greedy_weights(THREE, LABELS4, ZERO_ONE, decode_method=decode_method)
    assert np.array_equal(w, [0.5, 0.0, 0.5])


def test_rounds_zero_is_the_best_single_member():
    assert np.array_equal(greedy_weights(THREE, LABELS4, ZERO_ONE, rounds=0), [1.0, 0.0, 0.0])
    assert np.array_equal(greedy_weights([X, Y], LABELS5, ZERO_ONE, rounds=0), [1.0, 0.0])


def test_selection_with_replacement():
    assert np.allclose(greedy_weights([X, Y], LABELS5, ZERO_ONE), [2 / 3, 1 / 3])
    assert np.allclose(greedy_weights([X, Y], LABELS5, ZERO_ONE, rounds=1), [0.5, 0.5])  # stops after one addition


def real_case(seed: int, rows: int):
    """The real taxonomy's concept count and distances, a seeded generator and `rows` labels drawn from it."""
    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    rng = np.random.default_rng(seed)
    return tax, tax.distance_matrix(), rng, rng.integers(0, tax.n_classes, rows)


def test_stops_when_no_addition_lowers_the_distance():
    tax, d, rng, labels = real_case(0, 100)
    perfect = np.eye(tax.n_classes)[labels]
    random = rng.dirichlet(np.full(tax.n_classes, 0.3), size=100)
    # perfect alone scores 0; nothing can lower that, so it stays alone however many rounds are allowed.
    assert np.array_equal(greedy_weights([random, perfect, random], labels, d, rounds=50), [0.0, 1.0, 0.0])


def test_the_greedy_blend_scores_what_it_selected_for_on_the_real_taxonomy():
    """The weights decode (through blend and decode, as 04 does) to a distance no worse than the best single member."""
    tax, d, rng, labels = real_case(3, 300)
    truth = np.eye(tax.n_classes)[labels]
    members = [0.1 * truth + 0.9 * rng.dirichlet(np.full(tax.n_classes, 0.2), size=300) for _ in range(4)]
    for method in ("min_risk", "argmax"):
        w = greedy_weights(members, labels, d, decode_method=method)
        singles = [score_labels(labels, decode(p, d, method), d) for p in members]
        blended = score_labels(labels, decode(blend(members, w), d, method), d)
        assert np.isclose(w.sum(), 1) and (w >= 0).all() and np.count_nonzero(w) > 1
        assert blended < min(singles)


def test_bagging_is_deterministic_and_sums_to_one():
    w = greedy_weights(THREE, LABELS4, ZERO_ONE, bags=7, seed=5)
    assert np.array_equal(w, greedy_weights(THREE, LABELS4, ZERO_ONE, bags=7, seed=5))
    assert np.isclose(w.sum(), 1) and (w >= 0).all()
    # Full bags repeat the unbagged selection: the same counts, times the number of bags.
    assert np.allclose(greedy_weights(THREE, LABELS4, ZERO_ONE, bags=3, bag_fraction=1.0), [0.5, 0.0, 0.5])
    # Bags of one member (round(0.1 * 3) -> at least 1) select that member alone: weights are bag counts / bags.
    one = greedy_weights(THREE, LABELS4, ZERO_ONE, bags=10, bag_fraction=0.1, seed=1)
    assert np.allclose(one * 10, np.round(one * 10)) and np.isclose(one.sum(), 1)


def test_blend_weights_greedy_and_errors():
    w = blend_weights("greedy", [X, Y], LABELS5, ZERO_ONE)
    assert np.allclose(w, [2 / 3, 1 / 3])
    assert np.allclose(blend_weights("greedy", [X, Y], LABELS5, ZERO_ONE, rounds=1), [0.5, 0.5])
    with pytest.raises(ValueError, match="choose uniform, cv, fit or greedy"):
        blend_weights("caruana", [X, Y], LABELS5, ZERO_ONE)
    with pytest.raises(ValueError, match="pass oof_probs, labels and dist"):
        blend_weights("greedy", [X, Y], LABELS5)
    with pytest.raises(ValueError, match="choose argmax or min_risk"):
        greedy_weights([X, Y], LABELS5, ZERO_ONE, decode_method="mode")
    with pytest.raises(ValueError, match="one label per row"):
        greedy_weights([X, Y], LABELS4, ZERO_ONE)
    with pytest.raises(ValueError, match="differ in shape"):
        greedy_weights([X, Y[:4]], LABELS5, ZERO_ONE)
    with pytest.raises(ValueError, match=r"integers in \[0, 2\)"):
        greedy_weights([X, Y], LABELS5 + 2, ZERO_ONE)
    with pytest.raises(ValueError, match="bag fraction"):
        greedy_weights([X, Y], LABELS5, ZERO_ONE, bags=2, bag_fraction=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        greedy_weights([X, Y], LABELS5, ZERO_ONE, rounds=-1)
