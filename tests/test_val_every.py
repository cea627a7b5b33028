"""train.val_every / testlike_every on a tiny CPU fit: which epochs validate, what the best and early stopping count,
resuming after a kill in an epoch that did not validate; and `auto` loader workers as build_kit gets them."""
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.demo.__main__ import main as demo_main

from conftest import load_script  # tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny demo through 00 (a couple of seconds); yields the overrides and 00's folder."""
    tmp = tmp_path_factory.mktemp("val_every")
    overrides = [f"data.root={tmp / 'data'}", f"output_root={tmp / 'out'}", "exp=tiny", "demo.per_class=3", "demo.test_per_class=1",
                 "demo.frame_width=160", "demo.frame_height=120", "prepare.n_folds=2", "prepare.crop_size=32", "prepare.workers=1",
                 "model.img_size=32", "train.batch_size=64"]
    assert demo_main(["--config", "configs/demo.yaml", *overrides]) == 0
    assert load_script("00_prepare_data.py").main(["--config", "configs/demo.yaml", *overrides]) == 0
    return overrides, tmp / "out" / "tiny" / "00_prepare"


def setup(prepared, *extra):
    from lib.config import load_config
    from lib.data.artifacts import load_rois
    from lib.data.taxonomy import load_taxonomy_json
    from lib.engine.folds import fold_splits

    overrides, prep = prepared
    cfg = load_config("configs/demo.yaml", [*overrides, *extra])
    split = fold_splits(load_rois(prep), [0])[0]
    return cfg, split.__class__(split.fold, split.train.iloc[:48], split.val.iloc[:16]), load_taxonomy_json(prep / "taxonomy.json")


def stage(cfg, path: Path):
    from lib.pipeline.records import Stage

    return Stage.create(f"{path.name}/fold_0", path, cfg, ["train"], ROOT / "01_train_folds.py", {})


def scripted(monkeypatch, scores):
    """Epochs that train nothing, val distances in order of validation, and a spy on the test-like view: the epochs
    it was scored in."""
    import lib.engine.train as train_mod

    it, epochs, testlike = iter(scores), [], []

    def one_epoch(kit, cfg, split, name, epoch, n):  # the schedule is what is tested: no step needed
        epochs.append(epoch + 1)
        return [1.0]

    def add_testlike(kit, split, metrics, arrays):
        testlike.append(epochs[-1])
        arrays["probs_testlike"] = arrays["probs"]
        metrics["val_distance_testlike"] = float(epochs[-1])

    monkeypatch.setattr(train_mod, "train_one_epoch", one_epoch)
    monkeypatch.setattr(train_mod, "add_testlike", add_testlike)
    monkeypatch.setattr(train_mod, "evaluate", lambda probs, labels, dist: {"val_distance": next(it), "val_top1": 0.0})
    return testlike


def test_validated_epochs_best_and_the_record(prepared, tmp_path, monkeypatch):
    """val_every 2 over 5 epochs validates 2, 4 and the last; a better score in an unvalidated epoch cannot exist."""
    import lib.engine.train as train_mod

    cfg, split, tax = setup(prepared, "train.val_every=2")
    scripted(monkeypatch, [3.0, 2.0, 2.5])
    result = train_mod.fit_fold(cfg, split, tax, stage(cfg, tmp_path / "a"), epochs=5)
    h = pd.read_csv(tmp_path / "a" / "history.csv")
    assert list(h["epoch"]) == [1, 2, 3, 4, 5]
    assert list(h["epoch"][h["val_distance"].notna()]) == [2, 4, 5] and list(h["val_distance"].dropna()) == [3.0, 2.0, 2.5]
    assert result is not None and result.best_epoch == 4 and result.val_distance == 2.0
    rec = result.to_record()
    assert rec["validated_epochs"] == [2, 4, 5] and rec["loader_workers"] == 0  # the demo loads in the main process
    with np.load(tmp_path / "a" / "oof.npz") as z:
        assert int(z["epoch"]) == 4


def test_testlike_every_and_the_best_epoch_keeps_the_view(prepared, tmp_path, monkeypatch):
    """testlike_every 3 over 6 validated epochs: scored at 3 and 6 as scheduled, and at 1 and 4 because they became the best."""
    import lib.engine.train as train_mod

    cfg, split, tax = setup(prepared, "train.testlike_every=3")
    testlike = scripted(monkeypatch, [3.0, 4.0, 5.0, 2.0, 6.0, 7.0])
    result = train_mod.fit_fold(cfg, split, tax, stage(cfg, tmp_path / "t"), epochs=6)
    assert testlike == [1, 3, 4, 6]
    assert result is not None and result.best_epoch == 4 and result.scores["val_distance_testlike"] == 4.0
    with np.load(tmp_path / "t" / "oof.npz") as z:
        assert "probs_testlike" in z.files and int(z["epoch"]) == 4


def test_early_stopping_counts_validated_epochs_only(prepared, tmp_path, monkeypatch, caplog):
    """patience 2 with val_every 2: worse at 4 and 6 (two validations, four epochs after the best at 2) stops before 7."""
    import lib.engine.train as train_mod

    cfg, split, tax = setup(prepared, "train.val_every=2", "train.patience=2", "train.epochs=8")
    scripted(monkeypatch, [3.0, 4.0, 5.0, 6.0])
    caplog.set_level(logging.INFO)
    result = train_mod.fit_fold(cfg, split, tax, stage(cfg, tmp_path / "e"), epochs=8)
    assert result is not None and result.best_epoch == 2 and list(result.validated_epochs) == [2, 4, 6]
    assert "early stop after epoch 6 (no gain in 2 validated epochs)" in caplog.text
    assert len(pd.read_csv(tmp_path / "e" / "history.csv")) == 6


@pytest.mark.slow  # three real epochs twice (about 10 s)
def test_resume_after_a_kill_in_an_epoch_that_did_not_validate(prepared, tmp_path, caplog):
    """Killed after epoch 1 of 3 (val_every 2: epoch 1 did not validate), the fold resumes at 2 and ends with the
    uninterrupted run's weights, validations and best."""
    import torch

    from lib.engine.train import fit_fold

    cfg, split, tax = setup(prepared, "train.val_every=2")
    fit_fold(cfg, split, tax, stage(cfg, tmp_path / "w"), epochs=3)
    killed = stage(cfg, tmp_path / "k")
    assert fit_fold(cfg, split, tax, killed, epochs=3, stop_after=1) is None
    assert not (tmp_path / "k" / "best.pt").exists()  # nothing validated yet: no best
    caplog.set_level(logging.INFO)
    result = fit_fold(cfg, split, tax, killed, epochs=3)
    assert "resuming at epoch 2/3" in caplog.text
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (tmp_path / "w", tmp_path / "k"))
    assert [("val_distance" in r) for r in b["history"]] == [False, True, True]
    assert [r.get("val_distance") for r in a["history"]] == [r.get("val_distance") for r in b["history"]]
    assert a["best"] == b["best"] and result is not None and list(result.validated_epochs) == [2, 3]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_auto_workers_reach_the_loaders(prepared, monkeypatch):
    """`auto` on a simulated 4-core host shared by two fold processes: 2 workers per loader; prefetch from the plan."""
    import lib.data.budget as budget
    from lib.engine.train import build_kit

    monkeypatch.setattr(budget, "host", lambda: budget.Host(cores=4, ram_bytes=64 * budget.GiB, shm_bytes=32 * budget.GiB, processes=2))
    cfg, split, tax = setup(prepared, "train.num_workers=auto", "train.device=cpu")
    kit = build_kit(cfg, split, tax, epochs=1)
    assert kit.loaders.get("train").workers == 1  # on the CPU one of the process's 2 cores computes
    assert kit.train_loader is not None and kit.train_loader.num_workers == 1 and kit.train_loader.prefetch_factor == 4
    assert kit.val_loader.num_workers == 1 and kit.testlike_loader is not None and kit.testlike_loader.num_workers == 1
    monkeypatch.setattr(budget, "host", lambda: budget.Host(cores=4, ram_bytes=64 * budget.GiB, shm_bytes=8 * 2**20, processes=2))
    small = build_kit(cfg, split, tax, epochs=1)  # 8 MiB of /dev/shm, 2 MiB per process: prefetch 1, eval batch 128 -> 32
    assert small.val_loader.prefetch_factor == 1 and small.val_loader.batch_size == 32
    assert small.train_loader is not None and small.train_loader.batch_size == 64
    assert small.loaders.bytes_in_flight <= small.loaders.limit_bytes == 2 * 2**20
