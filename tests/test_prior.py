"""Label-shift correction (lib.decide.prior): EM recovers a known shifted prior from calibrated posteriors, balanced
scaling meets its totals, weights count as repeated rows, and the edge cases (a class without train rows or mass,
all-zero rows) give numbers, never NaN."""
import numpy as np
import pytest

from lib.config import ConfigError
from lib.decide import prior as pr

C = 6
PI_TRAIN = np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
PI_TEST = np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
MU = np.random.default_rng(42).normal(0.0, 1.5, (C, 8))  # class means of unit-variance Gaussians in 8 dimensions


def posterior(x: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """The exact posteriors p(y|x) under prior pi: calibrated by construction."""
    z = -0.5 * ((x[:, None, :] - MU[None]) ** 2).sum(-1) + np.log(pi)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def draw(pi: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(C, n, p=pi)
    return MU[y] + rng.standard_normal((n, MU.shape[1])), y


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def test_em_recovers_a_known_shifted_prior_and_improves_the_probabilities():
    """Posteriors calibrated under the train prior, test rows drawn at another prior: the estimate lands within 0.02 of
    it, accuracy and log loss improve, and the log loss comes within 0.01 of the posteriors under the true test prior."""
    x, y = draw(PI_TEST, 6000, 0)
    p = posterior(x, PI_TRAIN)
    est, q, it = pr.em_prior(p, PI_TRAIN)
    assert np.abs(est - PI_TEST).max() < 0.02 and 1 < it < 1000
    assert (q.argmax(1) == y).mean() > (p.argmax(1) == y).mean() + 0.03
    assert log_loss(q, y) < log_loss(p, y) - 0.05
    assert log_loss(q, y) < log_loss(posterior(x, PI_TEST), y) + 0.01
    np.testing.assert_allclose(est, q.mean(0), atol=1e-5)  # the fixed point: the prior is the mean of what it implies
    np.testing.assert_allclose(q.sum(1), 1.0)


def test_em_recovers_the_prior_from_train_counts_on_rows_resampled_by_weights():
    """The callers' use: out-of-fold rows drawn at the train prior, weighted by pi_test / pi_train to look shifted."""
    x, y = draw(PI_TRAIN, 8000, 1)
    p = posterior(x, PI_TRAIN)
    counts = np.bincount(y, minlength=C)  # the train rows' class counts, not shares
    shift = pr.correct("em", p, counts, weights=(PI_TEST / PI_TRAIN)[y])
    assert shift.converged and np.abs(shift.prior - PI_TEST).max() < 0.03
    np.testing.assert_allclose(shift.class_weights, shift.prior / shift.train_prior)


def test_em_with_the_train_prior_leaves_the_probabilities_nearly_unchanged():
    x, y = draw(PI_TRAIN, 6000, 2)
    p = posterior(x, PI_TRAIN)
    est, q, _ = pr.em_prior(p, PI_TRAIN)
    assert np.abs(est - PI_TRAIN).max() < 0.02
    assert np.abs(q - p).max() < 0.1 and np.abs(q - p).mean() < 0.01
    assert (q.argmax(1) == p.argmax(1)).mean() > 0.97


def test_em_by_hand_one_step():
    """Two rows, two classes: from pi_train = (0.5, 0.5) the first M step is the mean of p, the fixed point its own mean."""
    p = np.array([[0.9, 0.1], [0.6, 0.4]])
    est, q, it = pr.em_prior(p, [0.5, 0.5], max_iter=1)
    np.testing.assert_allclose(est, [0.75, 0.25])
    est, q, it = pr.em_prior(p, [1, 1], tol=1e-12, max_iter=10_000)
    w = est / 0.5
    np.testing.assert_allclose(q, p * w / (p * w).sum(1, keepdims=True))
    np.testing.assert_allclose(est, q.mean(0), atol=1e-10)


def test_balanced_meets_equal_and_given_totals():
    x, _ = draw(PI_TRAIN, 3000, 3)
    p = posterior(x, PI_TRAIN)
    q = pr.balanced(p)
    np.testing.assert_allclose(q.sum(0), np.full(C, 500.0), atol=1e-6)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
    totals = [10, 20, 30, 40, 50, 150]  # shares: rescaled to the 3000 rows
    shift = pr.correct("balanced", p, PI_TRAIN, totals=totals)
    assert shift.converged and shift.unmet == ()
    np.testing.assert_allclose(shift.probs.sum(0), np.array(totals) * 10.0, atol=1e-6)
    np.testing.assert_allclose(shift.probs.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(shift.prior, np.array(totals) / 300)
    np.testing.assert_allclose(shift.apply(p), shift.probs)  # the class weights are the whole correction


def test_balanced_is_sinkhorn_knopp_s_fixed_point():
    """Plain alternating row and column scaling, run long, lands where the Newton steps do (in far fewer steps)."""
    rng = np.random.default_rng(10)
    p = rng.dirichlet(np.full(C, 0.3), 200)
    totals = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    q = p.copy()
    for _ in range(20_000):
        q = q * (totals / totals.sum() * 200 / q.sum(0))
        q /= q.sum(1, keepdims=True)
    shift = pr.correct("balanced", p, PI_TRAIN, totals=totals)
    np.testing.assert_allclose(shift.probs, q, atol=1e-7)
    assert shift.converged and shift.iterations < 30


def test_balanced_is_the_em_correction_at_the_prior_of_its_totals():
    """Balanced's q ∝ p * c is the label-shift posterior whose mean is the target prior: EM at its own
    estimate is such a point, so balancing to EM's estimated counts gives EM's probabilities back."""
    x, _ = draw(PI_TEST, 3000, 4)
    p = posterior(x, PI_TRAIN)
    est, q_em, _ = pr.em_prior(p, PI_TRAIN, tol=1e-12, max_iter=10_000)
    np.testing.assert_allclose(pr.balanced(p, totals=est), q_em, atol=1e-6)


def test_weights_count_as_repeated_rows():
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(C), 40)
    reps = rng.integers(0, 4, 40)
    dup = np.repeat(p, reps, axis=0)
    for kind in ("em", "balanced"):
        a = pr.correct(kind, p, PI_TRAIN, totals=[1, 2, 3, 1, 2, 3], weights=reps.astype(float))
        b = pr.correct(kind, dup, PI_TRAIN, totals=[1, 2, 3, 1, 2, 3])
        np.testing.assert_allclose(a.prior, b.prior, atol=1e-10)
        np.testing.assert_allclose(np.repeat(a.probs, reps, axis=0), b.probs, atol=1e-8)
        np.testing.assert_allclose(a.counts_before, b.counts_before)
        np.testing.assert_allclose(a.counts_after, b.counts_after)


def test_none_is_the_identity():
    p = np.random.default_rng(6).dirichlet(np.ones(C), 20).astype(np.float32)
    shift = pr.correct("none", p, PI_TRAIN)
    assert shift.probs is p and np.array_equal(shift.apply(p), p)
    assert np.array_equal(shift.counts_before, shift.counts_after) and shift.counts_before.sum() == 20
    np.testing.assert_allclose(shift.prior, PI_TRAIN)
    assert shift.describe(list("abcdef")).startswith("none")


def test_a_class_without_train_rows_or_mass_gives_no_nan():
    rng = np.random.default_rng(7)
    p = rng.dirichlet(np.ones(C), 200)
    p[:, 5] = 0.0  # never predicted
    p /= p.sum(1, keepdims=True)
    prior0 = PI_TRAIN.copy()
    prior0[5] = 0.0  # and no train rows
    shift = pr.correct("em", p, prior0)
    assert np.isfinite(shift.probs).all() and np.isfinite(shift.prior).all() and shift.prior[5] == 0.0
    assert (shift.probs[:, 5] == 0).all()
    # a class with no train rows that the model does give mass is weighed like the rarest seen class: no 0/0
    p2 = rng.dirichlet(np.ones(C), 200)
    shift2 = pr.correct("em", p2, prior0)
    assert np.isfinite(shift2.probs).all() and 0 < shift2.prior[5] < 1
    # balanced cannot give a class without mass its total: the rest meet theirs, and it is reported
    b = pr.correct("balanced", p, prior0)
    assert b.unmet == (5,) and b.converged and np.isfinite(b.probs).all()
    np.testing.assert_allclose(b.probs.sum(0)[:5], 40.0, atol=1e-6)
    assert b.probs[:, 5].sum() == 0 and "cannot meet" in b.describe(list("abcdef"))


def test_all_zero_rows_stay_zero_and_count_nowhere():
    rng = np.random.default_rng(8)
    p = rng.dirichlet(np.ones(C), 30)
    with_zero = np.vstack([p, np.zeros((3, C))])
    for kind in ("em", "balanced"):
        a, b = pr.correct(kind, with_zero, PI_TRAIN), pr.correct(kind, p, PI_TRAIN)
        assert (a.probs[30:] == 0).all() and np.isfinite(a.probs).all()
        np.testing.assert_allclose(a.probs[:30], b.probs, atol=1e-9)
        assert a.counts_before.sum() == 30 and a.counts_after.sum() == 30
    est, q, it = pr.em_prior(np.zeros((4, C)), PI_TRAIN)  # nothing to learn from: the train prior
    np.testing.assert_allclose(est, PI_TRAIN)
    assert it == 0


def test_impossible_totals_stop_unconverged():
    """Class 1 needs 1.5 of 3 rows but only one row gives it any mass: no scaling meets that, and the shift says so."""
    p = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    shift = pr.correct("balanced", p, [0.5, 0.5], max_iter=200)
    assert not shift.converged and shift.iterations <= 200 and np.isfinite(shift.probs).all()
    assert "not converged" in shift.describe(["a", "b"])


def test_reweight_keeps_a_row_that_every_weight_zeroes():
    p = np.array([[0.0, 1.0], [0.5, 0.5]])
    np.testing.assert_allclose(pr.reweight(p, np.array([1.0, 0.0])), [[0.0, 1.0], [1.0, 0.0]])
    stack = np.stack([p, p[::-1]])  # (models, rows, classes)
    assert pr.reweight(stack, np.array([2.0, 1.0])).shape == (2, 2, 2)


def test_bad_input_is_one_sentence():
    p = np.full((3, C), 1 / C)
    with pytest.raises(ValueError, match="unknown"):
        pr.correct("bbse", p, PI_TRAIN)
    with pytest.raises(ValueError, match="train_prior"):
        pr.correct("em", p, PI_TRAIN[:3])
    with pytest.raises(ValueError, match="totals"):
        pr.correct("balanced", p, PI_TRAIN, totals=[1, 2])
    with pytest.raises(ValueError, match="weights"):
        pr.correct("em", p, PI_TRAIN, weights=np.ones(2))
    with pytest.raises(ValueError, match="finite"):
        pr.correct("em", np.full((3, C), np.nan), PI_TRAIN)
    pr.check_totals([], C, "pseudo.test_totals")
    pr.check_totals([1.0] * C, C, "pseudo.test_totals")
    with pytest.raises(ConfigError, match=r"pseudo.test_totals lists 2 totals but the taxonomy has 6 concepts"):
        pr.check_totals([1.0, 2.0], C, "pseudo.test_totals")


# ----------------------------------------------------------------------------- 02: pseudo-labels from corrected probabilities


def test_pseudo_labels_read_the_probabilities_corrected_for_label_shift(monkeypatch, tmp_path):
    """02's round: each member's test probabilities, corrected on its mean with the train rows' class counts as the train
    prior, are what the selection reads; summary.md, test_probs.npz and the record keep the counts before and after."""
    import pandas as pd

    import lib.data.context as context
    import lib.engine.inference as inference
    import lib.engine.rounds as rounds
    from lib.config import load_config
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.frame_context import FrameIndex
    from lib.decide.metric import DEFAULT_TAXONOMY
    from lib.engine.members import Member
    from lib.pipeline.records import result_problem

    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    n = tax.n_classes
    labels = np.array([0] * 90 + [1] * 10 + list(range(2, n)))  # class 0 dominates the train rows
    rng = np.random.default_rng(9)
    base = np.full(n, 0.1 / (n - 2))
    base[:2] = 0.5, 0.4  # every test row: class 0 first, class 1 close behind
    test_probs = np.stack([rng.dirichlet(base * 2000, 6) for _ in range(2)])  # two fold models, six test ROIs
    assert (test_probs.mean(0).argmax(1) == 0).all()
    rois = pd.DataFrame({"split": ["train"] * len(labels) + ["test"] * 6, "annotation_id": [*range(len(labels)), *range(6)],
                         "image_id": [*range(len(labels)), *range(100, 106)], "label": [*labels, *[-1] * 6],
                         "fold": [*(np.arange(len(labels)) % 2), *[-1] * 6], "ok": 1})
    index = FrameIndex.from_rois(rois, n)
    test = rois[rois["split"] == "test"]
    monkeypatch.setattr(context, "model_inputs", lambda *a: None)
    monkeypatch.setattr(inference, "predict_folds_tta", lambda *a, **k: {"probs": test_probs, "embeddings": np.zeros((2, 6, 4))})
    member = Member("phase1", load_config(None, []), [], test)

    cfg = load_config(None, ["pseudo.test_prior=em", "pseudo.threshold=0.0"])
    result = rounds.run_round(cfg, [member], test, tax, tmp_path, None, "test", index)
    shift = pr.correct("em", test_probs.mean(0), np.bincount(labels, minlength=n))
    z = np.load(tmp_path / "test_probs.npz")
    np.testing.assert_allclose(z["mean"], shift.apply(test_probs).mean(0))
    assert np.array_equal(z["probs"], test_probs)  # kept as predicted
    np.testing.assert_allclose(z["test_prior"][0], shift.prior)
    assert z["counts_before"][0][0] == 6 and z["counts_after"][0][1] == 6
    chosen = pd.read_csv(tmp_path / "pseudo_labels.csv")
    assert (chosen["label"] == 1).all() and len(chosen) == 6  # the train prior divided out: class 1 wins every row
    assert result["test_prior"] == "em" and result["prior_shift"][0]["counts_after"][1] == 6 and result_problem(result) is None
    assert "Label shift (pseudo.test_prior: em)" in (tmp_path / "summary.md").read_text()

    plain = rounds.run_round(load_config(None, ["pseudo.threshold=0.0"]), [member], test, tax, tmp_path / "plain", None, "test", index)
    assert (pd.read_csv(tmp_path / "plain" / "pseudo_labels.csv")["label"] == 0).all() and "prior_shift" not in plain

    balanced = load_config(None, ["pseudo.test_prior=balanced"])
    arrays = rounds.predict_members(balanced, [member], tax, None, index)
    fix = pr.correct("balanced", test_probs.mean(0), index.prior)
    np.testing.assert_allclose(arrays["calibrated"], fix.apply(test_probs))
    np.testing.assert_allclose(arrays["votes"], fix.apply(test_probs))

    monkeypatch.setattr(inference, "predict_folds_tta", lambda *a, **k: pytest.fail("predicted before checking the totals"))
    with pytest.raises(ConfigError, match=f"pseudo.test_totals lists 3 totals but the taxonomy has {n} concepts"):
        rounds.predict_members(load_config(None, ["pseudo.test_prior=balanced", "pseudo.test_totals=[1, 2, 3]"]), [member], tax, None, index)
