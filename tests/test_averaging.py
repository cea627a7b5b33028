"""The fold average (lib.decide.averaging): calibrated members whose mean is underconfident, and the matched correction."""
from __future__ import annotations

import numpy as np
import pytest

from lib.decide.averaging import average_folds, geometric_mean, match_temperature, mean_confidence
from lib.decide.calibration import expected_calibration_error


def calibrated_members(seed: int = 0, n: int = 6000, c: int = 8, m: int = 5, shared: float = 0.5, a: float = 1.6):
    """M members whose probabilities are each calibrated by construction, with noise partly shared between them.

    Truth y uniform; member j sees z_j = a * onehot(y) + sqrt(shared) * e + sqrt(1 - shared) * e_j (unit-variance Gaussian
    noise). Given z_j alone, P(y = c | z_j) = softmax(a * z_j)_c exactly, so each member's softmax(a z_j) is calibrated;
    the members disagree through e_j, and their arithmetic mean is then underconfident."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    e = rng.standard_normal((n, c))
    members = []
    for _ in range(m):
        z = a * np.eye(c)[y] + np.sqrt(shared) * e + np.sqrt(1 - shared) * rng.standard_normal((n, c))
        zz = a * z
        p = np.exp(zz - zz.max(1, keepdims=True))
        members.append(p / p.sum(1, keepdims=True))
    return np.stack(members), y


def test_members_are_calibrated_but_their_mean_is_underconfident():
    members, y = calibrated_members()
    for p in members:
        assert expected_calibration_error(p, y) < 0.02
    mean = members.mean(0)
    acc = float((mean.argmax(1) == y).mean())
    assert mean_confidence(mean) < acc - 0.05  # underconfident: accuracy above the claimed confidence


@pytest.mark.parametrize("shared", [0.5, 0.8])
def test_matched_average_closes_part_of_the_gap_without_overshooting(shared: float):
    members, y = calibrated_members(shared=shared)
    mean, _ = average_folds(members, "mean")
    log, _ = average_folds(members, "log")
    matched, t = average_folds(members, "matched")
    assert t < 1.0  # it sharpens
    acc = float((matched.argmax(1) == y).mean())
    # measured here: ECE 0.226 (mean) -> 0.166 (log) -> 0.148 (matched) at shared 0.5; 0.090 -> 0.061 -> 0.052 at 0.8
    assert expected_calibration_error(matched, y) < 0.7 * expected_calibration_error(mean, y)
    assert expected_calibration_error(matched, y) < expected_calibration_error(log, y)
    assert mean_confidence(matched) <= acc + 0.01  # never more confident than it is right (the members' claim is a floor)
    assert mean_confidence(matched) == pytest.approx(mean_confidence(members), abs=1e-6)


def test_log_average_is_the_renormalised_geometric_mean():
    members, _ = calibrated_members(n=50, m=3)
    g, t = average_folds(members, "log")
    want = np.exp(np.log(members).mean(0))
    np.testing.assert_allclose(g, want / want.sum(1, keepdims=True), rtol=1e-9)
    assert t == 1.0
    np.testing.assert_allclose(geometric_mean(members), g)


def test_agreeing_members_and_a_single_member_are_left_alone():
    members, _ = calibrated_members(n=200, m=1)
    same = np.repeat(members, 4, axis=0)
    for how in ("mean", "log", "matched"):
        got, t = average_folds(same, how)
        np.testing.assert_allclose(got, members[0], atol=1e-9)
        assert t == pytest.approx(1.0)
        np.testing.assert_allclose(average_folds(members, how)[0], members[0])


def test_match_temperature_meets_its_target_and_clamps():
    members, _ = calibrated_members(n=300, m=3)
    g = geometric_mean(members)
    for target in (0.3, 0.6, 0.9):
        t = match_temperature(g, target)
        z = np.log(g) / t
        q = np.exp(z - z.max(1, keepdims=True))
        assert mean_confidence(q / q.sum(1, keepdims=True)) == pytest.approx(target, abs=1e-6)
    assert match_temperature(g, 1.5) == pytest.approx(0.02)  # beyond reach: the bracket's end
    with pytest.raises(ValueError, match="choose one of"):
        average_folds(members, "median")


def test_out_of_fold_rows_are_predicted_again_by_their_own_fold_model_with_the_tta_views(tmp_path, monkeypatch):
    """submit.oof_tta: each fold's held-out rows go to that fold's model, with the member's tta views; the result is
    cached in probs/<model>.oof.npz; with tta.views [identity] (or oof_tta false) the stored rows come back as they are."""
    import pandas as pd

    import lib.engine.inference as inference
    from lib.config import load_config
    from lib.decide.oof import OutOfFold
    from lib.engine.members import Member
    from lib.engine.probs import tta_oof

    calls = []

    def fake_predict(folds, inputs, cfg, tax, device, features=False, frames=None):
        calls.append((folds[0].name, list(inputs), list(cfg.tta.views)))
        k = int(folds[0].name.split("_")[1])
        return {"probs": np.full((1, len(inputs), 3), float(k))}

    monkeypatch.setattr(inference, "predict_folds_tta", fake_predict)
    ids = np.array([10, 11, 12, 13, 14])
    folds = np.array([1, 0, 1, 0, 1])
    stored = OutOfFold(ids, np.zeros(5, dtype=np.int64), np.full((5, 3), 1 / 3), folds)
    train = pd.DataFrame({"annotation_id": ids[::-1], "crop_path": [f"c{i}.png" for i in ids[::-1]], "ok": 1})
    cfg = load_config(None, ["tta.views=[identity, hflip]"])
    member = Member("phase1", cfg, [tmp_path / "fold_0", tmp_path / "fold_1"], train.iloc[:0], train)

    class FakeStage:
        dir = tmp_path / "04_submit"
        name = "04_submit"
        fingerprint = {"inputs": {"01_train": "abc"}}

    got = tta_oof(cfg, FakeStage(), member, None, stored)  # type: ignore[arg-type]
    assert [c[0] for c in calls] == ["fold_0", "fold_1"]
    assert calls[0][1] == ["c11.png", "c13.png"] and calls[1][1] == ["c10.png", "c12.png", "c14.png"]
    assert all(c[2] == ["identity", "hflip"] for c in calls)
    np.testing.assert_array_equal(got.probs[:, 0], folds.astype(float))  # each row from the model that held it out
    assert np.array_equal(got.ids, ids) and (tmp_path / "04_submit" / "probs" / "phase1.oof.npz").is_file()
    tta_oof(cfg, FakeStage(), member, None, stored)  # type: ignore[arg-type]
    assert len(calls) == 2  # cached
    plain = load_config(None, [])
    assert tta_oof(plain, FakeStage(), Member("phase1", plain, member.folds, train.iloc[:0], train), None, stored) is stored  # type: ignore[arg-type]
    off = load_config(None, ["tta.views=[identity, hflip]", "submit.oof_tta=false"])
    assert tta_oof(off, FakeStage(), member, None, stored) is stored  # type: ignore[arg-type]


def test_calibrate_models_calibrates_each_fold_model_then_averages():
    """04: the calibrator fitted on the out-of-fold rows maps every fold model's test rows, then submit.fold_average
    combines them; `mean` without calibration is the plain mean of the fold models."""
    from lib.config import load_config
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.blending import ModelProbs, calibrate_models
    from lib.decide.metric import DEFAULT_TAXONOMY

    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    rng = np.random.default_rng(4)
    members = rng.dirichlet(np.full(tax.n_classes, 0.3), size=(3, 10))
    labels = rng.integers(0, tax.n_classes, 60)
    oof = rng.dirichlet(np.full(tax.n_classes, 0.3), 60)
    m = ModelProbs("phase1", 1.0, np.arange(60), labels, oof, members.mean(0), oof_fold=np.arange(60) % 3, fold_test=members)
    dist = tax.distance_matrix()
    plain = calibrate_models(load_config(None, ["submit.fold_average=mean"]), [m], dist, "none")[0]
    np.testing.assert_allclose(plain.test, members.mean(0))
    cal = calibrate_models(load_config(None, ["submit.fold_average=matched"]), [m], dist, "temperature")[0]
    from lib.decide.calibration import apply_temperature

    want, t = average_folds(np.stack([apply_temperature(f, cal.temperature) for f in members]), "matched")
    np.testing.assert_allclose(cal.test, want)
    assert cal.fold_temperature == pytest.approx(t) and cal.fold_test is None
    np.testing.assert_allclose(cal.oof, apply_temperature(oof, cal.temperature))
