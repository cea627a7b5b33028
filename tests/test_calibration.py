"""Temperature scaling on cached probabilities, its two fitting objectives and the top-label ECE, on hand-made cases."""
import numpy as np
import pytest

from lib.data.taxonomy import Taxonomy
from lib.decide.calibration import DISTANCE_GRID, apply_temperature, expected_calibration_error, fit_temperature, nll

# G is a genus, S1 and S2 its species, X a concept in another order (as in test_ensemble).
TINY = Taxonomy(names=("G", "S1", "S2", "X"), lineages=(
    ("K", "P", "C", "O", "F", "G", None), ("K", "P", "C", "O", "F", "G", "S1"),
    ("K", "P", "C", "O", "F", "G", "S2"), ("K", "P", "C", "O2", None, None, None)))
D4 = TINY.distance_matrix()
SPLIT = np.array([[0.0, 0.46, 0.44, 0.1]])  # min-risk answers G at t = 1 (1.30 against S1's 1.38)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def overconfident(n: int = 4000, c: int = 10, seed: int = 0):
    """Labels drawn from softmax(z), but the model reports softmax(3 z): a true temperature of 3."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c))
    true_p = softmax(z)
    labels = (rng.random((n, 1)) > true_p.cumsum(1)).sum(1)
    return softmax(3 * z), labels


def test_apply_temperature_identity_sharpens_and_flattens():
    p = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    same = apply_temperature(p, 1.0)
    assert np.array_equal(same, p) and same is not p
    sharp, flat = apply_temperature(p, 0.5), apply_temperature(p, 2.0)
    # t = 0.5 squares and renormalises: 0.49, 0.04, 0.01 over 0.54; t = 2 takes square roots.
    assert np.allclose(sharp[0], np.array([0.49, 0.04, 0.01]) / 0.54)
    assert np.allclose(flat[0], np.sqrt(p[0]) / np.sqrt(p[0]).sum())
    assert np.allclose(sharp.sum(1), 1) and np.allclose(flat.sum(1), 1)
    assert (sharp.max(1) > p.max(1)).all() and (flat.max(1) < p.max(1)).all()
    assert np.allclose(apply_temperature(p, 1e-3), [[1, 0, 0], [0, 0, 1]])  # stable at tiny t: no overflow
    assert np.allclose(apply_temperature(p, 1e6), 1 / 3, atol=1e-5)
    p3 = np.stack([p, p[::-1]])  # (2, 2, 3): any leading shape
    assert np.allclose(apply_temperature(p3, 0.5)[1], sharp[::-1])
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(p, 0.0)


def test_apply_temperature_keeps_zeros_near_zero():
    p = np.array([[0.0, 0.5, 0.5]])
    assert apply_temperature(p, 2.0)[0, 0] == pytest.approx(np.sqrt(1e-12) / (np.sqrt(1e-12) + 2 * np.sqrt(0.5)))


def test_logloss_fit_recovers_the_overconfidence():
    probs, labels = overconfident()
    t = fit_temperature(probs, labels, "logloss")
    assert t == pytest.approx(3.0, rel=0.15)
    fixed = apply_temperature(probs, t)
    assert nll(fixed, labels) < nll(probs, labels) - 0.5
    assert expected_calibration_error(fixed, labels) < 0.05 < 0.3 < expected_calibration_error(probs, labels)


def test_logloss_fit_keeps_calibrated_probabilities_near_one():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4000, 10))
    p = softmax(z)
    labels = (rng.random((4000, 1)) > p.cumsum(1)).sum(1)
    assert fit_temperature(p, labels, "logloss") == pytest.approx(1.0, rel=0.1)


def test_distance_fit_sharpens_when_that_turns_the_answer_right():
    # Truth S1. At t = 0.5 the row becomes (0, .2116, .1936, .01) / .4152: risk of G
    # (.2116 + .1936 + 4 * .01) / .4152 = 1.072 against S1's (2 * .1936 + 5 * .01) / .4152 = 1.053,
    # so S1 (distance 0) replaces G (distance 1). t = 2 flattens and keeps G.
    assert (apply_temperature(SPLIT, 1.0) @ D4).argmin() == 0
    assert fit_temperature(SPLIT, np.array([1]), "distance", D4, grid=(0.5, 2.0)) == 0.5
    # On the default grid: the sharpening nearest 1 that answers S1.
    t = fit_temperature(SPLIT, np.array([1]), "distance", D4)
    assert (apply_temperature(SPLIT, t) @ D4).argmin() == 1
    above = min(g for g in DISTANCE_GRID if g > t)
    assert t < 1 and (apply_temperature(SPLIT, above) @ D4).argmin() == 0


def test_distance_fit_ties_keep_t_one():
    # Truth G: t = 1 already scores 0 and so do all flatter t; the tie goes to 1 (no change).
    assert fit_temperature(SPLIT, np.array([0]), "distance", D4) == 1.0
    assert fit_temperature(SPLIT, np.array([0]), "distance", D4, grid=(0.5, 2.0)) == 1.0  # 1 is always tried
    with pytest.raises(ValueError, match="pass dist"):
        fit_temperature(SPLIT, np.array([0]), "distance")
    with pytest.raises(ValueError, match="choose logloss or distance"):
        fit_temperature(SPLIT, np.array([0]), "brier", D4)


def test_ece_on_a_hand_case():
    p = np.array([[0.9, 0.05, 0.05],   # conf .9, right   -> bin (.8, 1]
                  [0.7, 0.2, 0.1],     # conf .7, wrong   -> bin (.6, .8]
                  [0.1, 0.75, 0.15],   # conf .75, right  -> bin (.6, .8]
                  [0.5, 0.3, 0.2]])    # conf .5, wrong   -> bin (.4, .6]
    y = np.array([0, 1, 1, 2])
    # (|1 - .9| * 1 + |1 - 1.45| (two rows: acc 1/2, conf .725) + |0 - .5| * 1) / 4 = 1.05 / 4
    assert expected_calibration_error(p, y, n_bins=5) == pytest.approx(0.2625)
    assert expected_calibration_error(p, y, n_bins=1) == pytest.approx(abs(2 - 2.85) / 4)  # one bin: |acc - mean conf|
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0
    with pytest.raises(ValueError, match="one label per row"):
        expected_calibration_error(p, y[:3])


def test_the_fit_sees_only_the_rows_it_is_given():
    """The caller slices out-of-fold rows; the fit reads nothing else and leaves its inputs as they were."""
    probs, labels = overconfident(2000)
    oof, oof_y = probs[:1000], labels[:1000]
    before = oof.copy()
    t = fit_temperature(oof, oof_y, "logloss")
    assert np.array_equal(oof, before)
    # Other rows (here "test" rows whose labels would pull t to sharpen) change nothing unless passed.
    test, test_y = probs[1000:], probs[1000:].argmax(1)
    assert fit_temperature(oof, oof_y, "logloss") == t
    assert fit_temperature(oof[::-1], oof_y[::-1], "logloss") == pytest.approx(t, rel=1e-4)  # rows, not their order
    leaked = fit_temperature(np.concatenate([oof, test]), np.concatenate([oof_y, test_y]), "logloss")
    assert leaked < t / 1.5  # passing them would have moved it: why 04 must pass out-of-fold rows only
