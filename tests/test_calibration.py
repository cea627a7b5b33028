"""Temperature scaling on cached probabilities, its two fitting objectives and the top-label ECE, on hand-made cases;
vector and Dirichlet calibrators against synthetic ground truth; reliability bins and their plot."""
import json

import numpy as np
import pytest

from lib.data.taxonomy import Taxonomy
from lib.decide.calibration import (
    DISTANCE_GRID,
    Calibrator,
    apply_temperature,
    expected_calibration_error,
    fit_calibrator,
    fit_temperature,
    nll,
    reliability,
)

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


def sample(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from its probabilities."""
    return np.minimum((rng.random((len(q), 1)) > q.cumsum(1)).sum(1), q.shape[1] - 1)


def reported_and_true(n: int, w: np.ndarray, b: np.ndarray, seed: int):
    """A model reports p = softmax(z); the labels follow softmax(W log p + b) (W a matrix, or per-class scales w)."""
    rng = np.random.default_rng(seed)
    p = softmax(rng.normal(scale=1.5, size=(n, len(b))))
    logp = np.log(p)
    q = softmax((logp * w if w.ndim == 1 else logp @ w.T) + b)
    return p, sample(q, rng), q


W_SCALE, W_BIAS = np.array([0.4, 0.7, 1.0, 1.6, 2.5]), np.array([0.5, -0.3, 0.0, 0.4, -0.6])


def test_vector_recovers_known_per_class_scales_and_biases():
    p, y, _ = reported_and_true(30_000, W_SCALE, W_BIAS, seed=2)
    cal = fit_calibrator("vector", p, y, l2=0.0)
    w, b = np.array(cal.params[:5]), np.array(cal.params[5:])
    assert np.allclose(w, W_SCALE, rtol=0.1, atol=0.03)  # about twice the spread over seeds 2-7
    assert np.allclose(b - b.mean(), W_BIAS - W_BIAS.mean(), atol=0.1)  # softmax fixes b up to one added number
    held, held_y, held_q = reported_and_true(30_000, W_SCALE, W_BIAS, seed=3)
    assert nll(cal.apply(held), held_y) == pytest.approx(nll(held_q, held_y), abs=0.005)  # as good as the truth
    assert nll(cal.apply(held), held_y) < nll(held, held_y) - 0.05
    # The default pull toward identity shrinks the sharpest class's scale (2.5 to about 2) at little cost.
    pulled = fit_calibrator("vector", p, y)
    assert np.argsort(pulled.params[:5]).tolist() == [0, 1, 2, 3, 4]
    assert nll(pulled.apply(held), held_y) == pytest.approx(nll(held_q, held_y), abs=0.005)


def class_dependent(n: int, seed: int):
    """Over-confident on classes 0-1, under-confident on 4-5, and class 2 mistaken for class 3 a third of the time."""
    w = np.diag([2.0, 2.0, 1.0, 1.0, 0.5, 0.5])
    w[3, 2] = 0.6  # log p of class 2 feeds class 3's logit
    return reported_and_true(n, w, np.zeros(6), seed)


def test_dirichlet_beats_temperature_where_miscalibration_is_class_dependent():
    p, y, _ = class_dependent(8000, seed=4)
    held, held_y, held_q = class_dependent(8000, seed=5)
    cal = fit_calibrator("dirichlet", p, y)
    t = fit_calibrator("temperature", p, y)
    vec = fit_calibrator("vector", p, y)
    fixed = cal.apply(held)
    assert nll(fixed, held_y) < nll(held, held_y) - 0.1
    assert nll(fixed, held_y) < nll(t.apply(held), held_y) - 0.05  # one temperature cannot serve both ends
    assert nll(fixed, held_y) < nll(vec.apply(held), held_y) - 0.002  # nor per-class scales the 2 -> 3 confusion (0.005-0.009, seeds 10-15)
    assert nll(fixed, held_y) == pytest.approx(nll(held_q, held_y), abs=0.01)
    assert expected_calibration_error(fixed, held_y) < 0.035 < 0.1 < expected_calibration_error(held, held_y)
    # The confusion found: W[3, 2] against column 2's other cross weights (only the difference is identified).
    # The default pull shrinks it (0.22 to 0.26 over seeds 2-7); without it, it is the true 0.6.
    w = np.array(cal.params[:36]).reshape(6, 6)
    assert w[3, 2] - np.delete(w[:, 2], [2, 3]).max() > 0.15
    free = np.array(fit_calibrator("dirichlet", p, y, l2=0.0).params[:36]).reshape(6, 6)
    assert free[3, 2] - np.delete(free[:, 2], [2, 3]).mean() == pytest.approx(0.6, abs=0.1)
    assert np.allclose(np.diag(free), [2, 2, 1, 1, 0.5, 0.5], rtol=0.2)


def test_calibrated_rows_change_little_and_a_flat_objective_changes_nothing():
    rng = np.random.default_rng(6)
    p = softmax(rng.normal(scale=1.5, size=(6000, 6)))
    y = sample(p, rng)
    held = softmax(rng.normal(scale=1.5, size=(6000, 6)))
    held_y = sample(held, rng)
    for kind in ("vector", "dirichlet"):
        assert nll(fit_calibrator(kind, p, y).apply(held), held_y) < nll(held, held_y) + 0.005  # fitted noise: 0 to 0.003 over seeds
    # Uniform rows with balanced labels: identity is the exact optimum, so the fit returns it and apply copies.
    flat, labels = np.full((60, 4), 0.25), np.arange(60) % 4
    for kind in ("vector", "dirichlet"):
        cal = fit_calibrator(kind, flat, labels)
        assert cal == Calibrator.identity(kind, 4) and cal.is_identity
        out = cal.apply(flat)
        assert np.array_equal(out, flat) and out is not flat


def test_weights_are_a_weighted_mean():
    # Uniform rows: the best map answers the (weighted) label frequencies, whatever its family.
    flat, labels = np.full((60, 4), 0.25), np.arange(60) % 4
    weights = np.where(labels == 0, 3.0, 1.0)  # class 0 counts 3 times: frequencies 1/2, 1/6, 1/6, 1/6
    for kind in ("vector", "dirichlet"):
        assert np.allclose(fit_calibrator(kind, flat, labels, l2=0.0, weights=weights).apply(flat[:1]), [[0.5, 1 / 6, 1 / 6, 1 / 6]], atol=1e-4)
    # Weight 2 on a row is that row twice, for every family.
    p, y, _ = class_dependent(600, seed=7)
    twice = np.r_[np.arange(600), np.arange(150)]
    w = np.where(np.arange(600) < 150, 2.0, 1.0)
    for kind in ("vector", "dirichlet"):
        assert np.allclose(fit_calibrator(kind, p, y, weights=w).params, fit_calibrator(kind, p[twice], y[twice]).params, atol=1e-4)
        assert not np.allclose(fit_calibrator(kind, p, y).params, fit_calibrator(kind, p[twice], y[twice]).params, atol=1e-3)
    assert fit_temperature(p, y, "logloss", weights=w) == pytest.approx(fit_temperature(p[twice], y[twice], "logloss"), rel=1e-4)
    assert fit_temperature(p, y, "logloss", weights=np.ones(600)) == pytest.approx(fit_temperature(p, y, "logloss"), rel=1e-6)
    with pytest.raises(ValueError, match="one weight per row"):
        fit_calibrator("vector", p, y, weights=-w)


def test_fit_calibrator_families_and_their_checks():
    probs, labels = overconfident(2000)
    assert fit_calibrator("none", probs, labels) == Calibrator("none")
    t = fit_calibrator("temperature", probs, labels)
    assert t == Calibrator("temperature", (fit_temperature(probs, labels, "logloss"),))
    assert np.array_equal(t.apply(probs), apply_temperature(probs, t.params[0]))
    assert fit_calibrator("temperature", SPLIT, np.array([1]), objective="distance", dist=D4).params[0] < 1
    with pytest.raises(ValueError, match="choose one of none, temperature, vector, dirichlet"):
        fit_calibrator("platt", probs, labels)
    with pytest.raises(ValueError, match="choose logloss or distance"):
        fit_calibrator("vector", probs, labels, objective="brier")
    with pytest.raises(ValueError, match="l2 >= 0"):
        fit_calibrator("dirichlet", probs, labels, l2=-1.0)


def test_calibrator_round_trips_and_applies_to_any_leading_shape():
    p, y, _ = class_dependent(2000, seed=8)
    for kind in ("none", "temperature", "vector", "dirichlet"):
        cal = fit_calibrator(kind, p, y)
        back = Calibrator.from_list(json.loads(json.dumps(cal.to_list())))
        assert back == cal and np.array_equal(back.apply(p), cal.apply(p))
        out = cal.apply(p)
        assert out.shape == p.shape and np.allclose(out.sum(1), 1) and (out > 0).all()
        stacked = cal.apply(np.stack([p[:5], p[5:10]]))  # (2, 5, 6): as test_probs.npz holds members
        assert np.allclose(stacked[1], out[5:10])
    assert Calibrator("dirichlet", tuple(np.r_[np.eye(6).ravel(), np.zeros(6)])).n_classes == 6
    zero = np.array([[0.0, 0.5, 0.5, 0, 0, 0]])
    assert np.isfinite(Calibrator("vector", (2.0,) * 6 + (0.0,) * 6).apply(zero)).all()  # zeros clipped before log
    with pytest.raises(ValueError, match="maps 6 classes"):
        fit_calibrator("vector", p, y).apply(np.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="cannot have the 7 parameters"):
        Calibrator("vector", (1.0,) * 7)
    with pytest.raises(ValueError, match="cannot have the 1 parameters"):
        Calibrator("temperature", (0.0,))
    with pytest.raises(ValueError, match="starts with its kind"):
        Calibrator.from_list([1.0, 2.0])


def test_reliability_bins_are_those_of_the_ece():
    p = np.array([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.1, 0.75, 0.15], [0.5, 0.3, 0.2]])
    y = np.array([0, 1, 1, 2])
    conf, acc, count = reliability(p, y, n_bins=5)  # the hand case of test_ece_on_a_hand_case
    assert count.tolist() == [0, 0, 1, 2, 1]
    assert np.isnan(conf[:2]).all() and np.isnan(acc[:2]).all()
    assert np.allclose(conf[2:], [0.5, 0.725, 0.9]) and np.allclose(acc[2:], [0, 0.5, 1])
    probs, labels = overconfident(3000)
    for n_bins in (1, 10, 15):
        conf, acc, count = reliability(probs, labels, n_bins)
        assert count.sum() == 3000
        assert np.nansum(count * np.abs(acc - conf)) / 3000 == pytest.approx(expected_calibration_error(probs, labels, n_bins))
    with pytest.raises(ValueError, match="at least one bin"):
        reliability(p, y, n_bins=0)


def test_plot_reliability_writes_a_png(tmp_path):
    from lib.report.plots import plot_reliability

    probs, labels = overconfident(1000)
    path = tmp_path / "report" / "reliability.png"
    plot_reliability({"out of fold": [("raw", probs, labels), ("temperature", apply_temperature(probs, 3.0), labels)],
                      "test-like views": [], "one": [("raw", probs[:10], labels[:10])]}, path, title="phase 1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [q.name for q in path.parent.iterdir()] == ["reliability.png"]  # written atomically: no temp file left
