"""A record whose result holds a value of the wrong type is unreadable: one warning naming the field, the stage runs again.

Hand-edited records (`folds: null`, `cv_distance: "abc"`) used to end in a TypeError or
ValueError wherever the value was used: 02, 04, `--dry-run`, `python -m lib.report`.
"""
import json
import logging
import math
from pathlib import Path

import pytest

from lib.config import load_config
from lib.pipeline.records import read_record, result_problem

from conftest import load_script  # tests/conftest.py


def write_record(folder: Path, result: dict, fingerprint: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "record.json"
    path.write_text(json.dumps({"fingerprint": fingerprint or {}, "result": result, "outputs": {}}))
    return path


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


BAD = [
    ({"folds": None}, "result.folds is null, expected an integer"),
    ({"folds": "x"}, 'result.folds is "x", expected an integer'),
    ({"folds": 2.0}, "result.folds is 2.0, expected an integer"),
    ({"folds": True}, "result.folds is true, expected an integer"),
    ({"best_epoch": "4"}, 'result.best_epoch is "4", expected an integer'),
    ({"cv_distance": "abc"}, 'result.cv_distance is "abc", expected a number'),
    ({"cv_distance": None}, "result.cv_distance is null, expected a number"),
    ({"val_acc_genus": [0.5]}, "result.val_acc_genus is [0.5], expected a number"),
    ({"oof_distance_min_risk": "1.2"}, 'result.oof_distance_min_risk is "1.2", expected a number'),
    ({"fold_root": 5}, "result.fold_root is 5, expected a string"),
    ({"per_round": "x"}, 'result.per_round is "x", expected a list of objects'),
    ({"per_round": [{"cv_distance": 1.0}, {"cv_distance": "x"}]}, 'result.per_round[1].cv_distance is "x", expected a number'),
    ({"votes": {"strict": {"cv_distance": None}}}, "result.votes.strict.cv_distance is null, expected a number"),
    ({"weights": [0.5, "a"]}, 'result.weights is [0.5, "a"], expected a list of numbers'),
    ({"models": 3.5}, "result.models is 3.5, expected an integer or a list of strings"),
    ({"crops": "abc"}, 'result.crops is "abc", expected an object'),
]


@pytest.mark.parametrize("result,problem", BAD, ids=[p for _, p in BAD])
def test_a_wrong_type_makes_the_record_unreadable_with_one_warning_naming_the_field(tmp_path, caplog, result, problem):
    path = write_record(tmp_path / "01_train", {"cv_top1": 0.5, **result})
    assert read_record(path) is None
    assert warnings_of(caplog) == [f"ignoring unreadable record {path} ({problem}); the stage will run again"]


def test_what_the_writers_write_stays_readable(tmp_path):
    """Every stage's result as its writer builds it, NaN and infinity included (json writes them; a fold that never
    improved keeps val_distance inf), reads back whole."""
    from lib.engine.results import CVSummary, FoldResult, RoundResult, SelfTraining

    cv = CVSummary(1.5, 0.5, 2, 10, 1.4, 0.1, 2.5, 0.4)
    results = {
        "00_prepare": {"train_rois": 948, "test_rois": 237, "test_rois_without_crop": 0, "rejects": 0, "classes": 79,
                       "crops": {"files": 2133, "bytes": 21829658, "digest": "c07c"}},
        "fold_0": FoldResult(-1, {"val_distance": math.inf, "val_top1": math.nan, "val_acc_genus": 0.5}, 632, 316).to_record(),
        "01_train": cv.to_record(),
        "02_pseudo": {"test_rois": 237, "models": 3, "pseudo_labels": 0, "methods": ["confidence", "vote"], "mean_weight": None,
                      "by_source": {"confidence": 0}, "members": ["phase1", "b/phase1"], "temperatures": [1.0, 1.2]},
        "03_retrain": SelfTraining((RoundResult(cv, 7), RoundResult(cv, 9)), "round_2").to_record(),
        "04_submit": {"rows": 3, "fallbacks": 0, "models": ["phase1", "phase2"], "weights": [0.3, 0.7], "blend": "cv",
                      "decode": "min_risk", "calibrate": "temperature", "temperatures": [1.0, 1], "blend_temperature": 1.0,
                      "oof_distance_min_risk": 1.2345, "submission": "out/04_submit/submission.csv"},
        "knn": {"cv_distance": 2.0, "cv_top1": 0.3, "votes": {"strict": {"cv_distance": 2.0, "cv_top1": 0.3}}, "vote": "strict",
                "k": 10, "source": "backbone", "index": "flat", "rows": 3, "fallbacks": 0, "a_newer_field": [None]},
    }
    for name, result in results.items():
        assert result_problem(result) is None, name
        rec = read_record(write_record(tmp_path / name, result))
        assert rec is not None and json.dumps(rec["result"]) == json.dumps(result), name


# ----------------------------------------------------------------------------- where the values were used


@pytest.fixture
def run(tmp_path):
    """A miniature output folder: 00 to 03 recorded (no stage ran; 00 up to date), 01 and 03 claiming `folds: null`."""
    from lib.pipeline import graph

    overrides = [f"data.root={tmp_path / 'data'}", f"output_root={tmp_path / 'out'}", "exp=x"]
    out = tmp_path / "out" / "x"
    write_record(out / "00_prepare", {"train_rois": 9}, graph.stage(load_config("configs/demo.yaml", overrides), "00_prepare").fingerprint)
    write_record(out / "01_train", {"folds": None, "cv_distance": 1.5, "cv_top1": 0.4})
    write_record(out / "02_pseudo", {"test_rois": 9, "pseudo_labels": 3, "by_source": {"confidence": 3}})
    write_record(out / "03_retrain", {"folds": None, "fold_root": ".", "cv_distance": 1.25, "cv_top1": 0.5})
    return overrides, out


def test_a_training_stage_with_a_bad_fold_count_must_run_again(run, caplog):
    from lib.pipeline import graph

    overrides, out = run
    cfg = load_config("configs/demo.yaml", overrides)
    assert graph.stage(cfg, "01_train").reasons() == ["no record"]
    with pytest.raises(graph.StageError, match=r"01_train/record.json is missing or incomplete; run 01_train_folds.py first\."):
        graph.fold_dirs(cfg, "01_train")
    assert "result.folds is null, expected an integer" in caplog.text


@pytest.mark.parametrize("script,name", [("02_pseudo_label.py", "02_pseudo"), ("04_infer_submit.py", "04_submit")])
def test_dry_run_says_the_stage_would_run(run, caplog, script, name):
    overrides, _ = run
    caplog.set_level(logging.INFO)
    assert load_script(script).main(["--config", "configs/demo.yaml", *overrides, "--dry-run"]) == 0
    assert any(m.startswith(f"{name}: would run (upstream ") for m in caplog.messages), caplog.text
    assert "result.folds is null, expected an integer" in caplog.text


def test_a_stage_refuses_in_one_sentence_naming_what_to_run(run, capsys):
    overrides, _ = run
    assert load_script("02_pseudo_label.py").main(["--config", "configs/demo.yaml", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "01_train is out of date (no record); run 01_train_folds.py first" in err


def test_report_says_not_run_for_a_score_that_is_not_a_number(run):
    from lib.report.summary import summary

    overrides, out = run
    write_record(out / "01_train", {"folds": 2, "cv_distance": "abc", "cv_top1": 0.4})
    lines = summary(load_config("configs/demo.yaml", overrides))
    assert "phase 1 CV distance : not run" in lines and "phase 2 CV distance : not run" in lines
    assert "pseudo-labels       : 3 of 9 test ROIs; confidence 3" in lines
