"""track.backend: fake wandb and mlflow clients (and TensorBoard's writer) see each record's numbers, a fold's history,
04's options and the submission's message; a tracker that is missing or fails is one warning and never a failed stage."""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
import types
from pathlib import Path

import pytest

from lib.config import load_config
from lib.pipeline import track
from lib.pipeline.graph import SPECS
from lib.pipeline.records import Stage

HISTORY = "epoch,train_loss,val_distance,lr\n1,2.5,3.0,0.001\n2,2.0,2.5,0.0005\n"


def config(tmp_path: Path, backend: str, *more: str):
    return load_config("configs/demo.yaml", [f"output_root={tmp_path / 'out'}", f"track.backend={backend}", *more])


def finish(folder: Path, name: str, result: dict, files: dict[str, str] | None = None) -> Stage:
    """Write a stage's (or fold's) record the way every stage does, with `files` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel, text in (files or {}).items():
        (folder / rel).write_text(text)
    st = Stage(name=name, dir=folder, fingerprint={"config": {}, "code": {}, "inputs": {}})
    st.finish(result, time.time())
    assert st.record() is not None  # the stage completed whatever the tracker did
    return st


@pytest.fixture(autouse=True)
def no_tracker():
    yield
    track.close()


class FakeWandb(types.ModuleType):
    """The calls a wandb run receives."""

    def __init__(self, fail_init: bool = False, fail_log: bool = False):
        super().__init__("wandb")
        self.calls: list[tuple] = []
        self.fail_init, self.fail_log = fail_init, fail_log

    def init(self, **kw):
        if self.fail_init:
            raise RuntimeError("no API key configured")
        self.calls.append(("init", kw))
        fake = self

        class Run:
            config = types.SimpleNamespace(update=lambda values, allow_val_change: fake.calls.append(("config", values)))
            summary: dict = {}

            def log(self, values):
                if fake.fail_log:
                    raise OSError("disk full")
                fake.calls.append(("log", values))

            def finish(self):
                fake.calls.append(("finish",))

        self.run = Run()
        return self.run

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data


def test_wandb_gets_config_fold_history_cv_options_and_message_offline_by_default(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = config(tmp_path, "wandb", "track.project=fn")
    track.configure(cfg)
    assert fake.calls == []  # nothing opens before a record is written (an up-to-date stage opens no run)
    finish(cfg.out_dir / "01_train" / "fold_0", "01_train/fold_0", {"val_distance": 2.5, "epoch": 2}, {"history.csv": HISTORY})
    finish(cfg.out_dir / "01_train", "01_train", {"val_distance": 2.4, "folds": 3, "per_fold": [1, 2], "name": "x"})
    track.submission("demo: phase1, CV 2.4", "fathomnet-2025")
    track.close()
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["init", "config", "log", "log", "log", "log", "finish"]
    init = fake.calls[0][1]
    assert (init["project"], init["group"], init["name"], init["dir"]) == ("fn", "demo", "demo/01_train", str(cfg.out_dir / "track"))
    assert fake.calls[1][1]["train.epochs"] == cfg.train.epochs and fake.calls[1][1]["track.backend"] == "wandb"
    assert fake.calls[2][1] == {"01_train/fold_0/epoch": 1.0, "01_train/fold_0/train_loss": 2.5, "01_train/fold_0/val_distance": 3.0,
                                "01_train/fold_0/lr": 0.001}
    assert fake.calls[3][1]["01_train/fold_0/val_distance"] == 2.5
    assert fake.calls[5][1] == {"01_train/val_distance": 2.4, "01_train/folds": 3.0}  # lists and strings left out
    assert fake.run.summary["submission"] == json.dumps({"competition": "fathomnet-2025", "message": "demo: phase1, CV 2.4"})


def test_a_user_set_wandb_mode_is_kept(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    monkeypatch.setenv("WANDB_MODE", "online")
    track.configure(config(tmp_path, "wandb"))
    finish(tmp_path / "s", "02_pseudo", {"selected": 3})
    import os

    assert os.environ["WANDB_MODE"] == "online"


def test_missing_package_is_one_sentence_naming_the_install_and_the_stage_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    track.configure(config(tmp_path, "mlflow"))
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        finish(tmp_path / "a", "02_pseudo", {"selected": 3})
        finish(tmp_path / "b", "04_submit", {"cv": 1.0})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["track.backend is mlflow but its package is not installed; pip install mlflow (or set track.backend=none): "
                        "tracking is off, the stage goes on."]


@pytest.mark.parametrize("fake, said", [(FakeWandb(fail_init=True), "could not start (RuntimeError: no API key configured)"),
                                        (FakeWandb(fail_log=True), "failed while logging (OSError: disk full)")])
def test_a_tracker_that_fails_is_one_warning_then_off(tmp_path, monkeypatch, caplog, fake, said):
    monkeypatch.setitem(sys.modules, "wandb", fake)
    track.configure(config(tmp_path, "wandb"))
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        for k in range(3):
            finish(tmp_path / f"fold_{k}", f"01_train/fold_{k}", {"val_distance": 2.0}, {"history.csv": HISTORY})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and said in warnings[0] and warnings[0].endswith("tracking is off, the stage goes on.")


def fake_mlflow(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []
    mod = types.ModuleType("mlflow")
    for name in ("set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "log_text", "set_tag", "end_run"):
        setattr(mod, name, lambda *a, _n=name, **kw: calls.append((_n, a, kw)))
    monkeypatch.setitem(sys.modules, "mlflow", mod)
    return calls


def test_mlflow_uses_a_local_file_store_and_logs_04s_options_table(tmp_path, monkeypatch):
    calls = fake_mlflow(monkeypatch)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(tmp_path, "mlflow", f"track.dir={tmp_path / 'runs'}")
    track.configure(cfg)
    options = "option,nested_distance\nuniform/argmax,2.1\nfit/min_risk,1.9\n"
    finish(cfg.out_dir / "04_submit", "04_submit", {"nested_distance": 1.9}, {"options.csv": options})
    track.close()
    names = [c[0] for c in calls]
    assert names == ["set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "log_text", "end_run"]
    assert calls[0][1] == ((tmp_path / "runs" / "mlruns").as_uri(),) and calls[1][1] == ("demo",)
    assert calls[2][2] == {"run_name": "demo/04_submit", "tags": {"group": "demo"}}
    assert calls[4][1] == ({"04_submit/nested_distance": 1.9},) and calls[4][2] == {"step": None}
    assert calls[5][1] == ("option,nested_distance\r\nuniform/argmax,2.1\r\nfit/min_risk,1.9\r\n", "04_submit/options.csv")


def test_tensorboard_writes_scalars_per_epoch(tmp_path, monkeypatch):
    scalars: list[tuple] = []

    class Writer:
        def __init__(self, log_dir):
            scalars.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def add_text(self, tag, text):
            scalars.append(("text", tag))

        def close(self):
            scalars.append(("close",))

    mod = types.ModuleType("torch.utils.tensorboard")
    mod.SummaryWriter = Writer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", mod)
    cfg = config(tmp_path, "tensorboard")
    track.configure(cfg)
    finish(tmp_path / "f", "03_retrain/fold_1", {"val_distance": 2.0}, {"history.csv": HISTORY})
    track.close()
    assert scalars[0] == ("dir", str(cfg.out_dir / "track" / "tensorboard" / "demo" / "03_retrain"))
    assert ("03_retrain/fold_1/val_distance", 3.0, 1) in scalars and ("03_retrain/fold_1/val_distance", 2.5, 2) in scalars
    assert ("03_retrain/fold_1/val_distance", 2.0, None) in scalars and scalars[-1] == ("close",)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tensorboard package is not installed")
def test_tensorboard_event_files_are_real(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, "tensorboard")
    track.configure(cfg)
    finish(tmp_path / "f", "01_train/fold_0", {"val_distance": 2.0}, {"history.csv": HISTORY})
    track.close()
    acc = EventAccumulator(str(cfg.out_dir / "track" / "tensorboard" / "demo" / "01_train"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("01_train/fold_0/val_distance")][:2] == pytest.approx([3.0, 2.5])


def test_tracking_decides_no_rerun_and_none_is_silent(tmp_path, monkeypatch):
    assert not any(s.lstrip("!").split(".")[0] == "track" for spec in SPECS.values() for s in spec.sections)
    prints = [Stage.create(n, tmp_path, config(tmp_path, b, "track.project=p"), SPECS[n].sections, SPECS[n].script).digest
              for n in ("01_train", "04_submit") for b in ("none", "wandb")]
    assert prints[0] == prints[1] and prints[2] == prints[3]
    monkeypatch.setitem(sys.modules, "wandb", None)  # would warn if anything tried to start it
    track.configure(config(tmp_path, "none"))
    finish(tmp_path / "x", "02_pseudo", {"selected": 1})
    assert track._active is not None and track._active.backend is None and track._active.off


def test_only_rank_zero_tracks(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("RANK", "1")
    track.configure(config(tmp_path, "wandb"))
    finish(tmp_path / "x", "01_train/fold_0", {"val_distance": 1.0})
    assert fake.calls == []
