"""Blend weights, min-risk decoding, logit adjustment and the coarse back-off, on hand-made cases."""
import numpy as np
import pandas as pd
import pytest

from lib.config import ConfigError, load_config
from lib.data.taxonomy import Taxonomy, load_taxonomy_csv
from lib.decide.decode import at_or_above, backoff_decode, decode, logit_adjust
from lib.decide.metric import DEFAULT_TAXONOMY
from lib.decide.weights import blend, blend_weights, cv_weights, soft_min_risk_distance

TAX = load_taxonomy_csv(DEFAULT_TAXONOMY)
D = TAX.distance_matrix()


def row(**weights: float) -> np.ndarray:
    p = np.zeros((1, TAX.n_classes))
    for name, w in weights.items():
        p[0, TAX.index(name.replace("_", " "))] = w
    return p


def test_min_risk_answers_the_genus_of_a_split_between_sibling_species():
    tax = Taxonomy(names=("G", "S1", "S2", "X"), lineages=(
        ("K", "P", "C", "O", "F", "G", None), ("K", "P", "C", "O", "F", "G", "S1"),
        ("K", "P", "C", "O", "F", "G", "S2"), ("K", "P", "C", "O2", None, None, None)))
    p = np.array([[0.0, 0.46, 0.44, 0.1]])
    # S1: 0.44 * 2 + 0.1 * 5 = 1.38 against G: 0.46 + 0.44 + 0.1 * 4 = 1.30.
    assert np.allclose(p @ tax.distance_matrix(), [[1.3, 1.38, 1.42, 4.5]])
    assert decode(p, tax.distance_matrix(), "argmax")[0] == 1 and decode(p, tax.distance_matrix(), "min_risk")[0] == 0


def test_min_risk_on_the_real_taxonomy():
    p = row(Paragorgia_arborea=0.4, Paragorgia=0.3, Heteropolypus_ritteri=0.3)  # two genera of Coralliidae
    assert TAX.names[decode(p, D, "argmax")[0]] == "Paragorgia arborea"
    assert TAX.names[decode(p, D, "min_risk")[0]] == "Paragorgia"


def test_decode_restricted_to_allowed_concepts():
    p = row(Sebastes_diploproa=1.0)
    allowed = at_or_above(TAX, "genus")
    assert TAX.names[decode(p, D, "min_risk", allowed)[0]] == "Sebastes"
    assert TAX.names[decode(p, D, "argmax", allowed)[0]] != "Sebastes diploproa"
    with pytest.raises(ValueError, match="no allowed concept"):
        decode(p, D, "min_risk", np.zeros(TAX.n_classes, dtype=bool))


def test_cv_weights_formula():
    s = [2.0, 2.1, 2.5]  # CV distances, a list as blending passes them
    w = cv_weights(s, 0.1)
    e = np.exp(-np.array(s) / 0.1)
    assert np.allclose(w, e / e.sum()) and np.isclose(w.sum(), 1)
    assert np.allclose(cv_weights([3.0, 3.0], 0.1), [0.5, 0.5])
    assert cv_weights(s, 1e-4)[0] > 0.999 and np.allclose(cv_weights(s, 1e4), 1 / 3, atol=1e-4)
    assert np.allclose(blend_weights("cv", cv_scores=s, temperature=0.1), w)
    with pytest.raises(ValueError, match="positive"):
        cv_weights(s, 0.0)


def perfect_and_random(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, TAX.n_classes, n)
    perfect = np.eye(TAX.n_classes)[labels]
    random = rng.dirichlet(np.full(TAX.n_classes, 0.3), size=n)
    return labels, perfect, random


@pytest.mark.parametrize("objective", ["distance", "logloss"])
def test_fit_puts_the_weight_on_the_perfect_model(objective):
    labels, perfect, random = perfect_and_random()
    w = blend_weights("fit", [random, perfect], labels, D, objective=objective)
    assert w.shape == (2,) and np.isclose(w.sum(), 1) and w.min() >= 0
    assert w[1] > 0.9, w


def test_uniform_weights_and_blend():
    labels, perfect, random = perfect_and_random(20)
    w = blend_weights("uniform", [perfect, random])
    assert np.allclose(w, 0.5) and np.allclose(blend([perfect, random], w), (perfect + random) / 2)
    with pytest.raises(ValueError, match="Unknown blend method 'best'"):
        blend_weights("best", [perfect])


def test_soft_min_risk_distance_tends_to_the_decoded_distance():
    labels, perfect, random = perfect_and_random(50)
    mix = 0.5 * perfect + 0.5 * random
    hard = D[labels, decode(mix, D, "min_risk")].mean()
    assert soft_min_risk_distance(mix, labels, D, beta=1e-6) == pytest.approx(hard, abs=1e-6)
    assert soft_min_risk_distance(perfect, labels, D) < soft_min_risk_distance(random, labels, D)


def test_logit_adjust_identities():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(6), size=4)
    prior = np.array([50, 20, 10, 5, 0, 1], dtype=float)
    assert np.allclose(logit_adjust(p, prior, 0.0), p)
    assert np.allclose(logit_adjust(p, np.full(6, 7.0), 1.0), p)
    out = logit_adjust(np.array([[0.5, 0.5]]), np.array([0.9, 0.1]), 1.0)
    assert np.allclose(out, [[0.1, 0.9]])
    assert np.all(np.isfinite(logit_adjust(p, prior, 2.0))) and np.allclose(logit_adjust(p, prior, 2.0).sum(1), 1)


def test_at_or_above_counts_exceptions_one_rank_deeper():
    order = at_or_above(TAX, "order")
    assert order[TAX.index("Actiniaria")] and order[TAX.index("Porifera")] and order[TAX.index("Actinopterygii")]
    assert not order[TAX.index("Sebastes")] and not order[TAX.index("Caridea")]  # Caridea hangs below Decapoda
    assert at_or_above(TAX, "family")[TAX.index("Caridea")]
    assert at_or_above(TAX, "species").all()


def test_backoff_decodes_unsure_rows_at_the_coarse_rank():
    unsure = row(Sebastes_diploproa=0.3, Sebastolobus=0.3, Pyrosoma_atlanticum=0.4)
    sure = row(Sebastes_diploproa=0.9, Sebastolobus=0.1)
    p = np.vstack([unsure, sure])
    plain = decode(p, D, "min_risk")
    out = backoff_decode(p, D, TAX, "order", tau=0.5)
    assert out[1] == plain[1] == TAX.index("Sebastes diploproa")
    assert at_or_above(TAX, "order")[out[0]] and out[0] != plain[0]
    assert np.array_equal(backoff_decode(p, D, TAX, "order", tau=0.0), plain)  # tau 0: nothing backs off
    forced = backoff_decode(p, D, TAX, "order", tau=0.0, uncertain=np.array([False, True]))
    assert forced[0] == plain[0] and at_or_above(TAX, "order")[forced[1]]


def test_submit_config_keys():
    cfg = load_config(None)
    s = cfg.submit
    assert (s.blend, s.cv_temperature, s.fit_objective, s.logit_tau, s.backoff_rank) == ("uniform", 0.1, "distance", 0.0, "")
    cfg = load_config(None, ["submit.blend=fit", "submit.fit_objective=logloss", "submit.backoff_rank=order", "submit.backoff_tau=0.3"])
    assert cfg.submit.blend == "fit" and cfg.submit.backoff_rank == "order"
    for bad, msg in [("submit.cv_temperature=0", "submit.cv_temperature must be positive"),
                     ("submit.logit_tau=-1", "submit.logit_tau must be 0"),
                     ("submit.backoff_tau=2", "submit.backoff_tau must lie in"),
                     ("submit.models=[]", "submit.models must name at least one"),
                     ("submit.blend=cvv", r"did you mean 'cv'\?"),
                     ("submit.backoff_rank=famly", r"did you mean 'family'\?")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])


@pytest.mark.parametrize("objective", ["distance", "logloss"])
def test_fit_gradient_matches_finite_differences(objective, monkeypatch):
    import scipy.optimize

    labels, perfect, random = perfect_and_random(40, seed=3)
    seen = {}

    def spy(fun, x0, jac=None, **kw):
        seen["fun"] = fun
        return scipy.optimize.OptimizeResult(x=x0)

    monkeypatch.setattr(scipy.optimize, "minimize", spy)
    blend_weights("fit", [random, 0.5 * perfect + 0.5 * random, perfect], labels, D, objective=objective)
    w = np.array([0.2, 0.5, 0.3])
    f, g = seen["fun"](w)
    num = [(seen["fun"](w + h)[0] - seen["fun"](w - h)[0]) / 2e-6 for h in np.eye(3) * 1e-6]
    assert np.allclose(g, num, rtol=1e-4, atol=1e-6)
    assert f == pytest.approx(soft_min_risk_distance(blend([random, 0.5 * perfect + 0.5 * random, perfect], w), labels, D)
                              if objective == "distance" else -np.log(blend([random, 0.5 * perfect + 0.5 * random, perfect], w)
                                                                      [np.arange(40), labels]).mean())


def test_fit_weights_are_kept_across_blend_only_reruns(tmp_path, monkeypatch):
    """04 keeps the fit weights in probs/blend_fit.npz: changing submit.blend never fits again;
    new out-of-fold probabilities (or another objective) do."""
    import lib.decide.blending as blending

    rng = np.random.default_rng(0)
    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    dist = tax.distance_matrix()
    labels = rng.integers(0, tax.n_classes, 60)

    def model(name, sharp):
        z = rng.standard_normal((60, tax.n_classes))
        z[np.arange(60), labels] += sharp
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        return blending.ModelProbs(name, 1.0, np.arange(60), labels, p, p[:5])

    models = [model("a", 3.0), model("b", 1.0)]
    calls: list[str] = []
    real = blending.blend_weights

    def counted_blend_weights(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(blending, "blend_weights", counted_blend_weights)
    cache = tmp_path / "probs" / "blend_fit.npz"
    fitted = blending.weights_for("fit", load_config(None, ["submit.blend=fit"]), models, dist, cache)
    assert calls == ["fit"] and cache.is_file()
    again = blending.weights_for("fit", load_config(None, ["submit.blend=uniform", "submit.decode=argmax"]), models, dist, cache)
    assert calls == ["fit"] and np.array_equal(fitted, again)  # a blend-only change: read back, bitwise
    np.testing.assert_allclose(blending.weights_for("uniform", load_config(None, []), models, dist, cache), [0.5, 0.5])
    blending.weights_for("fit", load_config(None, ["submit.fit_objective=logloss"]), models, dist, cache)
    assert calls == ["fit", "uniform", "fit"]  # another objective fits again
    models[1] = model("b", 2.0)
    blending.weights_for("fit", load_config(None, []), models, dist, cache)
    assert calls[-1] == "fit" and len(calls) == 4  # new out-of-fold probabilities fit again


def test_load_oof_refuses_a_pickled_npz_in_one_sentence(tmp_path):
    import pytest

    from lib.core.errors import StageError
    from lib.decide.oof import load_oof

    good, bad = tmp_path / "fold_0", tmp_path / "fold_1"
    for d in (good, bad):
        d.mkdir()
    np.savez(good / "oof.npz", annotation_id=np.arange(3), label=np.zeros(3, int), probs=np.ones((3, 2)))
    np.savez(bad / "oof.npz", annotation_id=np.array([{"x": 1}], dtype=object), label=np.zeros(1, int), probs=np.ones((1, 2)))
    with pytest.raises(StageError) as e:
        load_oof([good, bad])
    msg = str(e.value)
    assert str(bad / "oof.npz") in msg and "pickled object array" in msg and msg.count(".") >= 1 and "\n" not in msg
    (bad / "oof.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(StageError, match="cannot be read"):
        load_oof([good, bad])
    (bad / "oof.npz").unlink()
    with pytest.raises(StageError, match="is missing"):
        load_oof([good, bad])
    np.savez(bad / "oof.npz", annotation_id=np.arange(3))
    with pytest.raises(StageError, match="lacks the array"):
        load_oof([good, bad])
    oof = load_oof([good])
    assert oof.ids.tolist() == [0, 1, 2] and oof.probs.shape == (3, 2) and oof.folds.tolist() == [0, 0, 0]


def _npy_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.arange(3))
    return buf.getvalue()


@pytest.mark.parametrize("content", [b"annotation_id,label\n1,2\n", bytes(range(256)) * 4, b"", _npy_bytes()],
                         ids=["text", "random bytes", "empty", "a bare npy"])
def test_a_file_that_is_no_npz_is_named_so_not_called_pickled(tmp_path, content):
    """Text, random bytes, an empty file or a bare .npy under the name oof.npz: np.load would try to unpickle them."""
    from lib.core.errors import StageError
    from lib.core.io import load_npz
    from lib.decide.oof import load_oof

    (tmp_path / "fold_0").mkdir()
    path = tmp_path / "fold_0" / "oof.npz"
    path.write_bytes(content)
    for load in (lambda: load_npz(path), lambda: load_oof([tmp_path / "fold_0"])):
        with pytest.raises(StageError) as e:
            load()
        msg = str(e.value)
        assert msg.startswith(f"'{path}' is not a valid npz file (not a zip archive") and "pickled" not in msg and "\n" not in msg


def test_calibrated_options_fit_on_out_of_fold_rows_only(tmp_path):
    """Every option under every calibrator and prior correction; calibrators come from out-of-fold rows (new test rows
    change none), the submission uses the same fits, and each calibration keeps its own fit cache."""
    from dataclasses import replace

    import lib.decide.blending as blending
    from lib.decide.options import compare

    rng = np.random.default_rng(1)
    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    labels = rng.integers(0, tax.n_classes, 200)

    def model(name, sharp):  # overconfident: logits scaled by 3 after the labels were drawn
        z = rng.standard_normal((200, tax.n_classes))
        z[np.arange(200), labels] += sharp
        z *= 3
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return blending.ModelProbs(name, 1.0, np.arange(200), labels, p, p[:20], oof_fold=np.arange(200) % 3)

    models = [model("phase1", 1.0), model("b/phase1", 0.7)]
    cfg = load_config(None, ["submit.calibrate=temperature", "submit.calibrate_objective=logloss", "submit.blend=fit",
                             "submit.models=[phase1, b/phase1]", "submit.frame_context=none",  # rows without frames
                             "submit.calibrations=[none, temperature, vector]"])  # dirichlet's own tests: test_calibration.py
    cache = tmp_path / "probs" / "blend_fit.npz"
    counts = np.ones(tax.n_classes)
    opts = compare(cfg, models, tax, counts / counts.sum(), cache)
    t = opts.table
    assert len(t) == 6 * 3 * 3 and set(t["calibration"]) == {"none", "temperature", "vector"}
    assert set(t["test_prior"]) == {"none", "em", "balanced"}
    assert set(t["model"]) == {"phase1", "b/phase1", "blend uniform", "blend cv", "blend fit", "blend greedy"}
    single = t[(t["calibration"] == "temperature") & t["model"].isin(["phase1", "b/phase1"]) & (t["test_prior"] == "none")]
    assert (single["temperature"] > 1.5).all() and (t[t["calibration"] == "none"]["temperature"] == 1.0).all()  # overconfident: T > 1
    assert cache.is_file() and cache.with_name("blend_fit_temperature.npz").is_file() and cache.with_name("calibrators.json").is_file()
    chosen = blending.blend_models(cfg, models, tax, counts, cache, choice=blending.Choice("blend fit", "temperature", "none", "none",
                                                                                          "argmax"))
    np.testing.assert_allclose(chosen.temperatures, single["temperature"], atol=1e-4)
    np.testing.assert_array_equal(chosen.labels, opts.test_labels[blending.option_key("blend fit", "temperature")]["argmax"])
    other_test = [replace(m, test=rng.dirichlet(np.ones(tax.n_classes), 20)) for m in models]
    again = compare(cfg, other_test, tax, counts / counts.sum(), cache).table
    np.testing.assert_array_equal(again["temperature"], t["temperature"])
    # Test rows enter no fit: the nested scores without a prior correction are unchanged. (The prior corrections' nested
    # rows and the shifted columns read the test prior EM estimates from the test rows, without labels, by design.)
    none = t["test_prior"] == "none"
    np.testing.assert_array_equal(again.loc[none, "nested_min_risk"], t.loc[none, "nested_min_risk"])
    # Nested scores: what nothing fits equals its plain out-of-fold score; what is fitted is scored on rows it never saw.
    plain = t[(t["calibration"] == "none") & t["model"].isin(["phase1", "b/phase1", "blend uniform", "blend cv"])
              & (t["test_prior"] == "none")]
    np.testing.assert_allclose(plain["nested_min_risk"], plain["oof_min_risk"], atol=1e-12)
    np.testing.assert_allclose(plain["nested_argmax"], plain["oof_argmax"], atol=1e-12)
    fitted = t[t["calibration"] == "temperature"]
    assert (fitted["nested_min_risk"] != fitted["oof_min_risk"]).any() and t["nested_min_risk"].notna().all()


def test_nested_scores_refit_on_the_other_folds_only():
    """For fold k, a temperature fitted on the other folds: the nested score is the mean over folds of fold k's distances
    decoded after that temperature, and with balanced train and test priors `shifted` equals `nested`."""
    import lib.decide.blending as blending
    from lib.decide.calibration import apply_temperature, fit_temperature
    from lib.decide.decode import decode
    from lib.decide.options import nested_scores

    rng = np.random.default_rng(2)
    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    labels = rng.integers(0, tax.n_classes, 90)
    p = rng.dirichlet(np.full(tax.n_classes, 0.2), 90)
    folds = np.arange(90) % 3
    m = blending.ModelProbs("phase1", 1.0, np.arange(90), labels, p, p[:5], oof_fold=folds)
    cfg = load_config(None, ["submit.models=[phase1]", "submit.calibrate_objective=logloss", "submit.calibrations=[none, temperature]"])
    prior = np.full(tax.n_classes, 1 / tax.n_classes)
    scores = nested_scores(cfg, [m], tax, prior, np.ones(90))
    got = scores[f"{blending.option_key('phase1', 'temperature')} min_risk"]
    dist = tax.distance_matrix()
    want = np.empty(90)
    for k in range(3):
        t = fit_temperature(p[folds != k], labels[folds != k], "logloss")
        want[folds == k] = dist[labels[folds == k], decode(apply_temperature(p[folds == k], t), dist, "min_risk")]
    assert got.nested == pytest.approx(want.mean(), abs=1e-12)
    assert got.shifted == pytest.approx(want.mean(), abs=1e-12)
    np.testing.assert_allclose(got.per_fold, [want[folds == k].mean() for k in range(3)], atol=1e-12)


def test_the_rule_picks_the_least_shifted_distance_reproducibly_and_warns_on_a_thin_margin(tmp_path):
    """The pick is the option and decoding of least `shifted` distance, the same on a rerun, with its margin over the
    runner-up; two options whose per-fold difference swings more than their margin are flagged as close."""
    import lib.decide.blending as blending
    from lib.decide.options import FoldScores, chosen, compare, pick_option

    rng = np.random.default_rng(9)
    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    labels = rng.integers(0, tax.n_classes, 150)
    z = rng.standard_normal((150, tax.n_classes))
    z[np.arange(150), labels] += 2.0
    p = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    m = blending.ModelProbs("phase1", 1.0, np.arange(150), labels, p, p[:9], oof_fold=np.arange(150) % 3)
    cfg = load_config(None, ["submit.models=[phase1]", "submit.frame_context=none", "submit.calibrations=[none, temperature]"])
    prior = np.full(tax.n_classes, 1 / tax.n_classes)
    a = compare(cfg, [m], tax, prior, tmp_path / "blend_fit.npz")
    b = compare(cfg, [m], tax, prior, tmp_path / "blend_fit.npz")
    assert a.pick is not None and b.pick is not None and a.pick == b.pick
    best = min(min(r["shifted_argmax"], r["shifted_min_risk"]) for _, r in a.table.iterrows())
    assert a.pick.score == pytest.approx(best) and a.pick.margin >= 0
    assert chosen(cfg, [m], a) == a.pick.choice
    settings = load_config(None, ["submit.models=[phase1]", "submit.frame_context=none", "submit.pick=settings", "submit.decode=argmax",
                                  "submit.calibrations=[none, temperature]"])
    assert chosen(settings, [m], a) == blending.Choice("phase1", "temperature", "none", "none", "argmax")
    # The margin against the spread, on hand-made fold scores.
    table = pd.DataFrame([{"model": "x", "calibration": "none", "frame_context": "none", "test_prior": "none",
                           "shifted_argmax": 1.00, "shifted_min_risk": 1.02}])
    steady = {"x|none argmax": FoldScores(np.zeros(3), np.array([1.0, 1.0, 1.0]), np.ones(3), np.ones(3)),
              "x|none min_risk": FoldScores(np.zeros(3), np.array([1.02, 1.02, 1.02]), np.ones(3), np.ones(3))}
    calm = pick_option(table, steady)
    assert calm is not None and not calm.close
    swinging = {"x|none argmax": FoldScores(np.zeros(3), np.array([1.0, 1.0, 1.0]), np.ones(3), np.ones(3)),
                "x|none min_risk": FoldScores(np.zeros(3), np.array([0.9, 1.1, 1.06]), np.ones(3), np.ones(3))}
    picked = pick_option(table, swinging)
    assert picked is not None and picked.choice.decode == "argmax" and picked.close and any(line.startswith("warning") for line in picked.lines())


def test_shifted_scores_weight_rows_to_the_estimated_test_prior():
    """row_weights make the out-of-fold rows a sample of the test's class mix: weighted class shares equal the target."""
    from lib.decide.options import row_weights

    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    train = np.bincount(labels) / len(labels)
    target = np.array([0.2, 0.3, 0.5])
    w = row_weights(labels, target, train)
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(np.bincount(labels, weights=w) / w.sum(), target)


def test_blend_only_rerun_fits_nothing_again(tmp_path, monkeypatch):
    """Calibrators, temperatures, fit and greedy weights (the nested folds' too) are kept in probs/ by content: a rerun that
    changes only submit.blend calls no calibrator fit, SLSQP nor the greedy selection, and gives the same table."""
    import lib.decide.blending as blending
    import lib.decide.calibration as calibration
    import lib.decide.weights as weights
    from lib.decide.options import compare

    rng = np.random.default_rng(3)
    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    labels = rng.integers(0, tax.n_classes, 120)
    models = [blending.ModelProbs(n, 1.0, np.arange(120), labels, rng.dirichlet(np.full(tax.n_classes, 0.3), 120),
                                  rng.dirichlet(np.ones(tax.n_classes), 7), oof_fold=np.arange(120) % 3) for n in ("phase1", "b/phase1")]
    cache = tmp_path / "probs" / "blend_fit.npz"
    counts = np.ones(tax.n_classes)
    two = ["submit.frame_context=none", "submit.calibrations=[none, temperature]"]
    first = compare(load_config(None, ["submit.blend=fit", *two]), models, tax, counts / counts.sum(), cache).table
    assert (tmp_path / "probs" / "calibrators.json").is_file() and (tmp_path / "probs" / "blend_greedy_temperature_fold2.npz").is_file()
    calls: list[str] = []
    monkeypatch.setattr(calibration, "fit_temperature", lambda *a, **k: calls.append("T"))
    monkeypatch.setattr(blending, "fit_calibrator", lambda *a, **k: calls.append("calibrator"))
    real = blending.blend_weights

    def counted_blend_weights(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(blending, "blend_weights", counted_blend_weights)
    monkeypatch.setattr(weights, "greedy_weights", lambda *a, **k: calls.append("greedy"))
    fresh = [blending.ModelProbs(m.name, m.cv, m.oof_ids, m.oof_labels, m.oof.copy(), m.test, oof_fold=m.oof_fold) for m in models]
    again = compare(load_config(None, ["submit.blend=greedy", *two]), fresh, tax, counts / counts.sum(), cache).table
    assert set(calls) <= {"uniform", "cv"}  # the closed-form weights only
    pd.testing.assert_frame_equal(first, again)


def test_the_rules_class_mix_is_the_train_prior_given_totals_or_a_shrunk_estimate():
    """submit.pick_prior: train returns the train prior (weights 1), totals the user's (or equal) totals, estimated EM's
    estimate on the test rows pulled toward the train prior by n_test / C pseudo-rows per class."""
    import lib.decide.blending as blending
    from lib.decide.options import evaluation_prior
    from lib.decide.prior import em_prior

    tax = Taxonomy(names=("a", "b", "c"), lineages=(("K", "P", "C", "O", "F", "G", "a"), ("K", "P", "C", "O", "F", "G", "b"),
                                                  ("K", "P", "C", "O", "F", "G", "c")))
    rng = np.random.default_rng(3)
    train_prior = np.array([0.6, 0.3, 0.1])
    test = rng.dirichlet([0.3, 0.3, 3.0], 30)  # mostly class c
    labels = rng.integers(0, 3, 60)
    m = blending.ModelProbs("phase1", 1.0, np.arange(60), labels, rng.dirichlet(np.ones(3), 60), test, oof_fold=np.arange(60) % 3)
    models = [m]
    np.testing.assert_allclose(evaluation_prior(load_config(None, []), models, tax, train_prior), train_prior)
    np.testing.assert_allclose(evaluation_prior(load_config(None, ["submit.pick_prior=totals"]), models, tax, train_prior), [1 / 3] * 3)
    given = evaluation_prior(load_config(None, ["submit.pick_prior=totals", "submit.test_totals=[1, 1, 2]"]), models, tax, train_prior)
    np.testing.assert_allclose(given, [0.25, 0.25, 0.5])
    cfg = load_config(None, ["submit.pick_prior=estimated", "submit.calibrations=[none, temperature]"])
    est = evaluation_prior(cfg, models, tax, train_prior)
    t = blending.calibrate_models(cfg, models, tax.distance_matrix(), "temperature")[0].test
    raw = em_prior(t, train_prior)[0]
    np.testing.assert_allclose(est, (raw * 30 + 30 * train_prior) / 60)  # 10 rows per class: 10 pseudo-rows per class
    assert est[2] > train_prior[2] and est.sum() == pytest.approx(1.0)
