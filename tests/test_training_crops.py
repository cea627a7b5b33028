"""A training stage and 00's crops: checked against crops_manifest.json before the first epoch; a failed run keeps its folds.

Training is faked (`fit_fold` writes a fold's files at once), so these run in seconds on 00's
output of a tiny generated dataset.
"""
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from lib.config import load_config
from lib.core.errors import StageError
from lib.demo import dataset as demo_data
from lib.engine.results import FoldResult

from conftest import load_script as script

ROOT = Path(__file__).resolve().parent.parent


def overrides(root: Path, out: Path) -> list[str]:
    return ["--config", "configs/demo.yaml", f"data.root={root}", f"output_root={out}", "exp=t", "prepare.n_folds=3",
            "prepare.crop_size=32", "prepare.workers=1", "model.img_size=32", "train.epochs=1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny generated dataset and 00's output for it; each test works on its own copy of the output."""
    tmp = tmp_path_factory.mktemp("crops")
    cfg = load_config(None, ["demo.per_class=3", "demo.test_per_class=1", "demo.frame_width=160", "demo.frame_height=120",
                             "demo.max_objects=2"])
    demo_data.generate(tmp / "data", cfg.demo, ROOT / "configs/taxonomy/fathomnet2025.csv", seed=3)
    assert script("00_prepare_data.py").main(overrides(tmp / "data", tmp / "out")) == 0
    return tmp / "data", tmp / "out"


@pytest.fixture
def run01(prepared, tmp_path, monkeypatch):
    """01 on a copy of 00's output with `fit_fold` faked; returns (run, trained folds, prepare folder)."""
    from lib.engine import folds

    root, out = prepared
    shutil.copytree(out, tmp_path / "out")
    trained: list[int] = []
    fail: set[int] = set()

    def fake_fit_fold(cfg, split, taxonomy, stage, epochs, stop_after=None, fresh=False):
        trained.append(split.fold)
        if split.fold in fail:
            raise StageError(f"fold {split.fold} failed on purpose")
        stage.dir.mkdir(parents=True, exist_ok=True)
        (stage.dir / "best.pt").write_bytes(b"weights")
        labels = split.val["label"].to_numpy()
        np.savez(stage.dir / "oof.npz", probs=np.full((len(labels), taxonomy.n_classes), 1 / taxonomy.n_classes), label=labels)
        return FoldResult(1, {"val_distance": 1.0, "val_top1": 0.5}, len(split.train), len(split.val))

    monkeypatch.setattr(folds, "fit_fold", fake_fit_fold)

    def run(*failing: int) -> int:
        fail.clear()
        fail.update(failing)
        trained.clear()
        return script("01_train_folds.py").main(overrides(root, tmp_path / "out"))

    return run, trained, tmp_path / "out" / "t" / "00_prepare"


def test_failed_run_keeps_the_folds_it_finished(run01, capsys, caplog):
    """Fold 2 fails after folds 0 and 1 finished: the stage record is void, the fold records stand, and the
    next run trains fold 2 alone."""
    run, trained, prep = run01
    assert run(2) == 2
    assert trained == [0, 1, 2] and "fold 2 failed on purpose" in capsys.readouterr().err
    stage = prep.parent / "01_train"
    assert not (stage / "record.json").exists()
    assert (stage / "fold_0" / "record.json").is_file() and (stage / "fold_1" / "record.json").is_file()
    caplog.set_level(logging.INFO, logger="pipeline")
    assert run() == 0
    assert trained == [2]
    assert "01_train/fold_0: up to date" in caplog.text and "01_train/fold_1: up to date" in caplog.text
    assert (stage / "record.json").is_file()


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().split("\n") if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_crop_of_other_bytes_and_the_same_size_stops_before_the_first_epoch(run01, prepared, capsys):
    """00's up-to-date check only stats its crops; the training stage reads and hashes them before training
    anything, names the crop and what to rerun, and that rerun works."""
    run, trained, prep = run01
    rel = "crops/roi/train/" + sorted(p.name for p in (prep / "crops/roi/train").iterdir())[0]
    data = bytearray((prep / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (prep / rel).write_bytes(bytes(data))
    assert run() == 2
    assert trained == []  # stopped before any fold trained
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("error: 1 of the ") and f"({rel}: other bytes of the recorded size)" in err, err
    assert err.endswith("rerun 00_prepare_data.py --force to cut them again, then 01_train_folds.py (folds already finished are kept).")
    root, _ = prepared
    assert script("00_prepare_data.py").main([*overrides(root, prep.parent.parent), "--force"]) == 0
    assert run() == 0 and trained == [0, 1, 2]


def test_missing_crops_stop_before_the_first_epoch_and_finished_folds_stay(run01, capsys):
    """Fold 0 finished in a run that failed later; then ROI and test-like crops of fold 1 go missing: the next run
    names the first three, counts the rest, and trains nothing."""
    import pandas as pd

    run, trained, prep = run01
    assert run(1) == 2 and trained == [0, 1]
    capsys.readouterr()
    rois = pd.read_csv(prep / "rois.csv", keep_default_na=False)
    gone = sorted(rois.loc[rois["fold"] == 1, ["crop_path", "testlike_path"]].head(2).to_numpy().ravel())
    for rel in gone:
        (prep / rel).unlink()
    assert run() == 2 and trained == []
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("error: 4 of the ") and f"({gone[0]}: missing; {gone[1]}: missing; {gone[2]}: missing; and 1 more)" in err
    assert (prep.parent / "01_train" / "fold_0" / "record.json").is_file()


def test_fold_crops_are_the_views_read_pseudo_label_crops_and_test_like_crops():
    """What the check reads: the model's views of training rows (03's pseudo-labelled test rows among them) and
    validation rows, and the validation rows' test-like crops; never a view the model does not read."""
    import pandas as pd

    from lib.engine.folds import fold_crops, fold_splits

    rois = pd.DataFrame({"split": ["train", "train", "test"], "annotation_id": [1, 2, 3], "label": [0, 1, -1], "fold": [0, 1, -1],
                         "ok": [1, 1, 1], "crop_path": ["r1", "r2", "r3"], "ctx3_path": ["c1", "c2", "c3"],
                         "testlike_path": ["t1", "t2", ""]})
    extra = pd.DataFrame({"annotation_id": [3], "label": [0], "weight": [1.0], "crop_path": ["r3"], "ctx3_path": ["c3"]})
    splits = fold_splits(rois, [0], extra)
    assert fold_crops(splits, ["1"]) == {"r1", "r2", "r3", "t1"}
    assert fold_crops(splits, ["1", "3"]) == {"r1", "r2", "r3", "c1", "c2", "c3", "t1"}
