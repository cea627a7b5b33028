"""Frame context (lib.decide.frame_context): the product of experts by hand, sibling rules, leak-freedom, nested scores,
04's caches and options, 02's adjusted pseudo-label probabilities, and a dataset with one ROI per frame."""
import time

import numpy as np
import pandas as pd
import pytest

import lib.decide.frame_context as fc
from lib.config import ConfigError, load_config
from lib.core.errors import StageError
from lib.data.taxonomy import load_taxonomy_csv
from lib.decide.decode import decode
from lib.decide.metric import DEFAULT_TAXONOMY

TAX = load_taxonomy_csv(DEFAULT_TAXONOMY)
D = TAX.distance_matrix()
C = TAX.n_classes


def framed(n_frames: int, size: int, rng: np.random.Generator, noise: float = 3.0, shared: bool = True):
    """(probs, labels, frame): frames of `size` ROIs that share one label when `shared`, noisy classifier-like probabilities."""
    frame = np.repeat(np.arange(n_frames), size)
    labels = np.repeat(rng.integers(0, C, n_frames), size) if shared else rng.integers(0, C, n_frames * size)
    return noisy(labels, rng, noise), labels, frame


def noisy(labels: np.ndarray, rng: np.random.Generator, noise: float = 3.0) -> np.ndarray:
    """softmax(-D[y] + noise): a classifier that confuses near concepts more."""
    z = -1.0 * D[labels] + noise * rng.standard_normal((len(labels), C))
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


# ----------------------------------------------------------------------------- the model by hand


def test_product_of_experts_against_a_hand_computation():
    """log q = log p + b log(eps + siblings' mean), renormalised; a row alone comes back bit for bit."""
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6]])
    sib = fc.siblings(np.array([7, 7, 7, 9]))  # frame 7: three ROIs; frame 9: one
    assert sib.count.tolist() == [2, 2, 2, 0]
    q = fc.adjust(p, sib, fc.FrameParams((2.0,), 0.1))
    # Row 0: siblings' mean (0.2, 0.7, 0.1); q ∝ 0.5 * 0.3^2, 0.3 * 0.8^2, 0.2 * 0.2^2 = 0.045, 0.192, 0.008.
    np.testing.assert_allclose(q[0], np.array([0.045, 0.192, 0.008]) / 0.245, rtol=1e-12)
    assert np.array_equal(q[3], p[3])
    assert np.array_equal(fc.adjust(p, sib, fc.FrameParams((0.0,), 0.1)), p)  # b = 0: unchanged, bit for bit
    # b per sibling-count bucket: edges (1, 3) give rows with 2 siblings the first b.
    q2 = fc.adjust(p, sib, fc.FrameParams((2.0, 5.0), 0.1, (1, 3)))
    np.testing.assert_array_equal(q2, q)


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    p, m = rng.dirichlet(np.full(C, 0.3), 300), rng.dirichlet(np.full(C, 0.3), 300)
    y, k = rng.integers(0, C, 300), rng.integers(0, 3, 300)
    args = (np.log(p).astype(np.float32), m.astype(np.float32), y, k, 3)
    x = np.array([0.7, 1.3, 2.0, np.log(0.05)])
    grad = fc._loss_and_grad(x, *args)[1]
    numeric = [(fc._loss_and_grad(x + h, *args)[0] - fc._loss_and_grad(x - h, *args)[0]) / 2e-3 for h in np.eye(4) * 1e-3]
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=1e-5)


def test_fit_trusts_siblings_that_share_labels_and_ignores_those_that_do_not():
    rng = np.random.default_rng(1)
    p, y, frame = framed(150, 3, rng)
    fitted = fc.fit(p, y, fc.siblings(frame))
    assert fitted.b[0] > 0.5
    before, after = D[y, decode(p, D, "min_risk")].mean(), D[y, decode(fc.adjust(p, fc.siblings(frame), fitted), D, "min_risk")].mean()
    assert after < before - 0.3
    p, y, frame = framed(150, 3, rng, shared=False)
    assert fc.fit(p, y, fc.siblings(frame)).identity  # no frame structure: b = 0, nothing changes


# ----------------------------------------------------------------------------- siblings: bad input


def test_a_frame_of_thousands_of_rois_costs_linear_time():
    """Sibling means from frame sums: one frame of 20,000 ROIs (pairs would be 4e8 x 79) in well under a second, equal to
    the pairwise mean on a frame of 300."""
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(C), 300)
    frame = np.zeros(300, dtype=np.int64)
    brute = np.array([np.delete(p, i, axis=0).mean(0) for i in range(300)])
    np.testing.assert_allclose(fc.sibling_mean(p, fc.siblings(frame)), brute, atol=1e-12)
    big = rng.dirichlet(np.ones(C), 20_000)
    t0 = time.perf_counter()
    mean = fc.sibling_mean(big, fc.siblings(np.zeros(20_000, dtype=np.int64)))
    assert time.perf_counter() - t0 < 2.0
    np.testing.assert_allclose(mean[5], (big.sum(0) - big[5]) / 19_999, atol=1e-12)


def rois_table() -> pd.DataFrame:
    """Train frame 1: ROIs 1, 2 usable and 3 rejected (00 drops rejected train rows; here ok 0 to be sure it is no
    sibling either way); train frame 2: ROI 4 alone. Test frame 1 (same image id as a train frame: another frame):
    ROI 1 usable, ROI 2 a placeholder; test frame 5: ROI 3 alone."""
    return pd.DataFrame({
        "split": ["train"] * 4 + ["test"] * 3, "annotation_id": [1, 2, 3, 4, 1, 2, 3], "image_id": [1, 1, 1, 2, 1, 1, 5],
        "label": [0, 1, 1, 2, -1, -1, -1], "fold": [0, 0, 0, 1, -1, -1, -1], "ok": [1, 1, 0, 1, 1, 0, 1]})


def test_rejected_rois_are_no_siblings_and_placeholders_are_siblings_with_the_prior():
    index = fc.FrameIndex.from_rois(rois_table(), 3)
    np.testing.assert_allclose(index.prior, [1 / 3, 1 / 3, 1 / 3])  # usable train labels 0, 1, 2
    rows = index.rows(np.array([1, 2, 4]), np.array([0, 0, 1]), np.array([1, 3]))
    assert rows.oof.count.tolist() == [1, 1, 0]  # ROI 3 was rejected: ROI 1's only sibling is ROI 2
    assert rows.test.count.tolist() == [1, 0] and index.placeholders.tolist() == [1]  # flagged: a sibling, not a row
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = fc.adjust(p, rows.test, fc.FrameParams((1.0,), 0.5), rows.prior)
    expected = p[0] * (0.5 + index.prior)  # the placeholder carries the prior
    np.testing.assert_allclose(q[0], expected / expected.sum())
    assert np.array_equal(q[1], p[1]) and q.shape == (2, 3)  # the placeholder itself is never adjusted (no row)
    with pytest.raises(ValueError, match="prior"):
        fc.sibling_mean(p, rows.test)


def test_frames_straddling_folds_stop_in_one_sentence():
    index = fc.FrameIndex.from_rois(rois_table(), 3)
    with pytest.raises(fc.FoldsNotGrouped) as e:
        index.rows(np.array([1, 2, 4]), np.array([0, 1, 1]), np.array([1, 3]))  # frame 1's two ROIs held out of folds 0 and 1
    msg = str(e.value)
    assert isinstance(e.value, StageError) and "\n" not in msg and msg.count(". ") == 0
    assert "image_id 1 in folds [0, 1]" in msg and "00_prepare_data.py --force" in msg
    # Asked for: the run stops; not asked for: the options leave frame context out, saying why.
    with pytest.raises(fc.FoldsNotGrouped):
        fc.frame_rows(index, np.array([1, 2, 4]), np.array([0, 1, 1]), np.array([1, 3]), required=True)
    rows, note = fc.frame_rows(index, np.array([1, 2, 4]), np.array([0, 1, 1]), np.array([1, 3]), required=False)
    assert rows is None and note.startswith("frame context is left out of the options")
    bad = rois_table()
    bad.loc[1, "fold"] = 1  # a custom fold assignment in rois.csv itself
    with pytest.raises(fc.FoldsNotGrouped):
        fc.FrameIndex.from_rois(bad, 3).rows(np.array([1, 2, 4]), None, np.array([1, 3]))


# ----------------------------------------------------------------------------- leak-freedom and nested scores


def test_no_row_s_own_frame_enters_the_fit_that_adjusts_it():
    """Fold 0's frames share their labels, the other folds' do not: fitted on every row, b > 0 would move fold 0's rows;
    nested, fold 0 is adjusted by a fit on folds 1 and 2 only, which finds nothing (b = 0), so fold 0 stays as it is."""
    rng = np.random.default_rng(3)
    p0, y0, f0 = framed(80, 3, rng)
    p1, y1, f1 = framed(160, 3, rng, shared=False)
    p, y, frame = np.vstack([p0, p1]), np.concatenate([y0, y1]), np.concatenate([f0, f1 + 1000])
    fold = np.concatenate([np.zeros(len(y0), dtype=np.int64), 1 + (f1 % 2)])
    sib = fc.siblings(frame)
    assert not fc.fit(p, y, sib).identity  # leaky: fold 0's own frames would make b > 0
    held = fold == 0
    assert fc.fit(p[~held], y[~held], sib.subset(~held)).identity
    out = fc.nested(p, y, sib, fold)
    assert np.array_equal(out[held], p[held])
    leaky = fc.adjust(p, sib, fc.fit(p, y, sib))
    assert not np.array_equal(decode(leaky[held], D, "min_risk"), decode(p[held], D, "min_risk"))  # where it would matter
    # 04's nested options do the same: fold 0's stack labels are its plain labels.
    import lib.decide.blending as blending
    from lib.decide.options import nested_scores

    m = blending.ModelProbs("phase1", 1.0, np.arange(len(y)), y, p, p[:4], oof_fold=fold)
    rows = fc.FrameRows(sib, fc.siblings(np.arange(4)), np.full(C, 1 / C), "k")
    cfg = load_config(None, ["submit.models=[phase1]", "submit.calibrations=[none, temperature]"])
    nested = nested_scores(cfg, [m], TAX, np.full(C, 1 / C), np.ones(len(y)), None, rows)
    for d in ("argmax", "min_risk"):
        assert nested[f"phase1|none|stack {d}"].per_fold[0] == nested[f"phase1|none {d}"].per_fold[0]


def test_nested_scores_fit_on_the_other_folds_and_adjust_the_held_out_one():
    import lib.decide.blending as blending

    rng = np.random.default_rng(4)
    p, y, frame = framed(90, 3, rng)
    fold = frame % 3  # grouped by frame
    sib = fc.siblings(frame)
    from lib.decide.options import nested_scores

    m = blending.ModelProbs("phase1", 1.0, np.arange(len(y)), y, p, p[:6], oof_fold=fold)
    rows = fc.FrameRows(sib, fc.siblings(np.zeros(6)), np.full(C, 1 / C), "k")
    cfg = load_config(None, ["submit.models=[phase1]", "submit.calibrations=[none, temperature]"])
    nested = nested_scores(cfg, [m], TAX, np.full(C, 1 / C), np.ones(len(y)), None, rows)
    manual = fc.nested(p, y, sib, fold)
    for k in range(3):
        te = fold == k
        params = fc.fit(p[~te], y[~te], sib.subset(~te))
        np.testing.assert_array_equal(manual[te], fc.adjust(p[te], sib.subset(te), params))
    for d in ("argmax", "min_risk"):
        assert nested[f"phase1|none|stack {d}"].nested == pytest.approx(D[y, decode(manual, D, d)].mean(), abs=1e-12)
    # Honest and useful here: the nested stack distance is below the plain one.
    assert nested["phase1|none|stack min_risk"].nested < nested["phase1|none min_risk"].nested - 0.2


# ----------------------------------------------------------------------------- 04: options, caches, reruns


def two_models(rng: np.random.Generator, n_frames: int = 60, size: int = 3, n_test: int = 12):
    import lib.decide.blending as blending

    p, y, frame = framed(n_frames, size, rng)
    q = noisy(y, rng, 2.5)
    fold = frame % 3
    test = rng.dirichlet(np.ones(C), n_test)
    ms = [blending.ModelProbs(n, 1.0, np.arange(len(y)), y, x, test, oof_fold=fold) for n, x in (("phase1", p), ("b/phase1", q))]
    return ms, frame


def test_options_hold_rows_without_and_with_frame_context_and_test_rows_never_fit(tmp_path):
    import lib.decide.blending as blending
    from lib.decide.options import compare

    rng = np.random.default_rng(5)
    models, frame = two_models(rng)
    rows = fc.FrameRows(fc.siblings(frame), fc.siblings(np.repeat(np.arange(6), 2)), np.full(C, 1 / C), "frames")
    cfg = load_config(None, ["submit.models=[phase1, b/phase1]", "submit.frame_context=stack", "submit.blend=fit",
                             "submit.calibrations=[none, temperature]"])
    cache = tmp_path / "probs" / "blend_fit.npz"
    counts = np.ones(C)
    opts = compare(cfg, models, TAX, counts / counts.sum(), cache, rows)
    t = opts.table
    assert len(t) == 72 and t["frame_context"].tolist()[:4] == ["none", "none", "none", "stack"]
    t = t[t["test_prior"] == "none"]
    stack = t[t["frame_context"] == "stack"]
    assert stack["frame_params"].str.startswith("b ").all() and (t[t["frame_context"] == "none"]["frame_params"] == "").all()
    assert (stack["nested_min_risk"].to_numpy() < t[t["frame_context"] == "none"]["nested_min_risk"].to_numpy()).all()
    assert {blending.option_key("blend fit", "temperature", "stack"), blending.option_key("phase1", "none")} <= set(opts.test_labels)
    assert (tmp_path / "probs" / "frame_context.json").is_file()
    chosen = blending.blend_models(cfg, models, TAX, counts, cache, rows)
    assert chosen.frame is not None and chosen.frame.describe() == stack[(stack["model"] == "blend fit")
                                                                           & (stack["calibration"] == "temperature")]["frame_params"].item()
    np.testing.assert_array_equal(chosen.labels, opts.test_labels[blending.option_key("blend fit", "temperature", "stack")]["argmax"])
    # Other test rows change no fitted parameter.
    from dataclasses import replace

    other = [replace(m, test=rng.dirichlet(np.ones(C), 12)) for m in models]
    pd.testing.assert_series_equal(compare(cfg, other, TAX, counts / counts.sum(), None, rows).table["frame_params"],
                                   opts.table["frame_params"])


def test_a_rerun_that_changes_only_the_decoding_fits_nothing_again(tmp_path, monkeypatch):
    import lib.decide.blending as blending
    from lib.decide.options import compare

    rng = np.random.default_rng(6)
    models, frame = two_models(rng, n_frames=30)
    rows = fc.FrameRows(fc.siblings(frame), fc.siblings(np.arange(12)), np.full(C, 1 / C), "frames")
    cache = tmp_path / "probs" / "blend_fit.npz"
    counts = np.ones(C)
    base = ["submit.models=[phase1, b/phase1]", "submit.frame_context=stack", "submit.calibrations=[none, temperature]"]
    first = compare(load_config(None, [*base, "submit.decode=argmax"]), models, TAX, counts / counts.sum(), cache, rows)
    calls = []
    real = fc.fit

    def counted_fit(*a, **k):
        calls.append("fit")
        return real(*a, **k)

    monkeypatch.setattr(fc, "fit", counted_fit)
    again = compare(load_config(None, [*base, "submit.decode=min_risk"]), models, TAX, counts / counts.sum(), cache, rows)
    chosen = blending.blend_models(load_config(None, [*base, "submit.decode=min_risk"]), models, TAX, counts, cache, rows)
    assert chosen.frame is not None
    # Only the greedy blend fits again, under each calibration: its selection reads submit.decode, so its weights moved
    # (1 + 3 nested folds each); every other option's parameters come from probs/frame_context.json.
    greedy = first.table["model"] == "blend greedy"
    assert len(calls) <= 8 and (first.table.loc[~greedy, "weights"] == again.table.loc[~greedy, "weights"]).all()
    pd.testing.assert_frame_equal(first.table[~greedy], again.table[~greedy])
    calls.clear()
    compare(load_config(None, [*base, "submit.decode=min_risk", "submit.blend=uniform", "submit.logit_tau=0.5"]),
            models, TAX, counts / counts.sum(), cache, rows)
    blending.blend_models(load_config(None, [*base, "submit.decode=argmax", "submit.blend=fit"]), models, TAX, counts, cache, rows)
    assert calls == []
    # Other frames (another content key) fit again: up to 6 options x 2 calibrations x (1 + 3 nested folds), fewer
    # where two options blend alike (cv and uniform weights of two models with the same CV are one key).
    compare(load_config(None, base), models, TAX, counts / counts.sum(), cache, fc.FrameRows(rows.oof, rows.test, rows.prior, "other"))
    assert 24 <= len(calls) <= 48


def test_one_roi_per_frame_gives_identical_results_with_frame_context_on_or_off(tmp_path):
    import lib.decide.blending as blending

    rng = np.random.default_rng(7)
    models, _ = two_models(rng)
    n = len(models[0].oof_ids)
    rois = pd.DataFrame({"split": ["train"] * n + ["test"] * 12, "annotation_id": [*range(n), *range(12)],
                         "image_id": [*range(n), *range(100, 112)], "label": [*models[0].oof_labels, *[-1] * 12],
                         "fold": [*models[0].oof_fold, *[-1] * 12], "ok": 1})
    rows, note = fc.frame_rows(fc.FrameIndex.from_rois(rois, C), models[0].oof_ids, models[0].oof_fold, np.arange(12), required=True)
    assert rows is not None and rows.nothing_to_use and note == fc.NOTHING_TO_USE
    counts = np.ones(C)
    for method in ("argmax", "min_risk"):
        on = load_config(None, ["submit.models=[phase1, b/phase1]", "submit.frame_context=stack", f"submit.decode={method}",
                                "submit.calibrations=[none, temperature]"])
        off = load_config(None, ["submit.models=[phase1, b/phase1]", f"submit.decode={method}", "submit.frame_context=none",
                                 "submit.calibrations=[none, temperature]"])
        a = blending.blend_models(on, models, TAX, counts, tmp_path / "blend_fit.npz", rows)
        b = blending.blend_models(off, models, TAX, counts, tmp_path / "blend_fit.npz", rows)
        assert a.frame is not None and a.frame.identity and np.array_equal(a.labels, b.labels)
    from lib.decide.options import compare

    t = compare(on, models, TAX, counts / counts.sum(), None, rows).table
    cols = ["oof_argmax", "oof_min_risk", "nested_argmax", "nested_min_risk"]
    np.testing.assert_array_equal(t[t["frame_context"] == "stack"][cols].to_numpy(), t[t["frame_context"] == "none"][cols].to_numpy())
    p = models[0].oof
    assert np.array_equal(fc.adjust(p, rows.oof, fc.FrameParams((3.0,), 0.01)), p)  # no sibling: bit for bit, whatever b


# ----------------------------------------------------------------------------- 02: pseudo-labels from adjusted probabilities


def test_pseudo_labels_read_probabilities_adjusted_by_frame_context(monkeypatch):
    import lib.data.context as context
    import lib.engine.inference as inference
    import lib.engine.rounds as rounds
    from lib.decide.oof import OutOfFold
    from lib.engine.members import Member

    rng = np.random.default_rng(8)
    p, y, frame = framed(60, 3, rng)
    fold = frame % 2
    test_probs = np.stack([rng.dirichlet(np.ones(C), 6) for _ in range(2)])  # two fold models, six test ROIs
    rois = pd.DataFrame({"split": ["train"] * len(y) + ["test"] * 7, "annotation_id": [*range(len(y)), *range(7)],
                         "image_id": [*frame, 1, 1, 1, 2, 2, 3, 3], "label": [*y, *[-1] * 7], "fold": [*fold, *[-1] * 7],
                         "ok": [1] * len(y) + [1, 1, 1, 1, 1, 1, 0]})  # test ROI 6: a placeholder beside ROI 5
    index = fc.FrameIndex.from_rois(rois, C)
    test = rois[(rois["split"] == "test") & (rois["ok"] == 1)]
    monkeypatch.setattr(context, "model_inputs", lambda *a: None)
    monkeypatch.setattr(inference, "predict_folds_tta", lambda *a, **k: {"probs": test_probs, "embeddings": np.zeros((2, 6, 4))})
    monkeypatch.setattr(rounds, "member_oof", lambda m: OutOfFold(np.arange(len(y)), y, p, fold))
    member = Member("phase1", load_config(None, []), [], test)
    cfg = load_config(None, ["pseudo.frame_context=stack"])
    arrays = rounds.predict_members(cfg, [member], TAX, None, index)
    params = fc.fit(p, y, fc.siblings(frame, None))
    assert not params.identity and arrays["frame_params"].tolist() == [[*params.b, params.eps]]
    sib = fc.siblings(test["image_id"].to_numpy(), index.placeholders)
    expected = np.stack([fc.adjust(x, sib, params, index.prior) for x in test_probs])
    np.testing.assert_allclose(arrays["calibrated"], expected)
    assert np.array_equal(arrays["probs"], test_probs)  # kept as predicted (04 reuses them)
    plain = rounds.predict_members(load_config(None, []), [member], TAX, None, index)
    assert np.array_equal(plain["calibrated"], test_probs) and "frame_params" not in plain


# ----------------------------------------------------------------------------- config, digests, report


def test_config_keys_and_checks():
    cfg = load_config(None, ["submit.frame_context=stack", "pseudo.frame_context=stack", "submit.frame_context_buckets=[1, 2, 4]"])
    assert cfg.submit.frame_context == cfg.pseudo.frame_context == "stack" and cfg.submit.frame_context_buckets == [1, 2, 4]
    # stack is the default of 04 (chosen by nested out-of-fold results on the demo, see README), 02's stays off
    assert load_config(None, []).submit.frame_context == "stack" and load_config(None, []).pseudo.frame_context == "none"
    for bad in ("submit.frame_context=graph", "submit.frame_context_buckets=[2, 4]", "submit.frame_context_buckets=[1, 1]"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_frame_context_stays_out_of_04_s_blend_code():
    """02 and 03 import frame context, but frame context imports no blending: re-blending never retrains phase 2."""
    from lib.core.fingerprint import code_digests
    from lib.core.paths import ROOT

    for script in ("02_pseudo_label.py", "03_retrain.py"):
        digests = set(code_digests(ROOT / script))
        assert "lib/decide/frame_context.py" in digests and not {"lib/decide/blending.py", "lib/decide/weights.py"} & digests


def test_report_gives_sibling_shares_and_the_label_only_oracle():
    from lib.data.siblings import sibling_majority
    from lib.report.siblings import frame_facts

    # Frames: A = (0, 0, 1), B = (2, 2), C = (3). Oracle: A's ROIs answer 0, 0 (the 1's siblings), and 0 for the 1;
    # B's answer 2, 2; C has no siblings.
    rois = pd.DataFrame({"split": ["train"] * 6 + ["test"] * 3, "image_id": [1, 1, 1, 2, 2, 3, 1, 9, 1],
                         "label": [0, 0, 1, 2, 2, 3, -1, -1, -1], "ok": [1] * 8 + [0]})  # the last: a placeholder beside test ROI 1
    guess = sibling_majority(rois["image_id"][:6].to_numpy(), rois["label"][:6].to_numpy())
    assert guess.tolist() == [0, 0, 0, 2, 2, -1]
    facts = frame_facts(rois, D)
    t = facts.train
    assert t.with_siblings == pytest.approx(5 / 6) and facts.test_share == pytest.approx(2 / 3) and facts.placeholder_siblings == 1
    assert t.oracle_rows == 5 and t.majority_right == pytest.approx(4 / 5) and t.majority_distance == pytest.approx(D[1, 0] / 5)
    assert t.label_in_siblings == pytest.approx(4 / 5)
    assert "83.3% of train, 66.7% of test" in facts.lines()[0] and "top-1 80.0%" in facts.lines()[1]
    assert facts.lines()[2].startswith("1 test ROI(s) without a crop")
