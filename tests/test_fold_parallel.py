"""Fold-parallel training (lib.engine.fold_parallel): two GPUs simulated on the CPU (a faked device count, a fake child
launcher recording what it would start), the split of the folds, the bad-input sentences, a failed child."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.config import ConfigError, load_config
from lib.core.errors import StageError
from lib.pipeline import fold_parallel as fp
from lib.pipeline import graph
from lib.pipeline.records import Stage

from conftest import load_script  # tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpus(monkeypatch):
    """`n` fake CUDA devices (torch.cuda as the plan sees it), CUDA_VISIBLE_DEVICES unset, no torchrun, no override."""
    for var in ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE", fp.ENV_PROCESSES):
        monkeypatch.delenv(var, raising=False)

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def cfg(*overrides):
    return load_config("configs/demo.yaml", ["prepare.n_folds=5", *overrides])


@pytest.fixture
def all_todo(monkeypatch):
    """Every wanted fold needs training (the stage's records are judged elsewhere: tests/test_pipeline.py)."""
    monkeypatch.setattr(fp, "_todo", lambda c, name, force: list(c.train.folds) or list(range(c.prepare.n_folds)))


def planned(c, name: str) -> fp.Spread:
    s = fp.plan(c, name, None, False, False)
    assert s is not None
    return s


def test_five_folds_over_two_gpus_are_three_then_two():
    assert fp.split_folds([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert fp.split_folds([0, 1, 2, 3], 3) == [[0, 1], [2], [3]]
    assert fp.split_folds([1, 4], 2) == [[1], [4]]
    assert sum(fp.split_folds(list(range(7)), 3), []) == list(range(7))


def test_two_gpus_spread_the_folds_one_process_each(gpus, all_todo):
    gpus(2)
    s = planned(cfg(), "01_train")
    assert s == fp.Spread("folds", ((0, 1, 2), (3, 4)), ("0", "1"), 2)
    assert fp.plan(cfg(), "01_train", None, False, False) == s  # deterministic


def test_cuda_visible_devices_names_the_gpus(gpus, all_todo, monkeypatch):
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert planned(cfg(), "03_retrain").devices == ("2", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert fp.plan(cfg(), "01_train", None, False, False) is None  # every GPU hidden: the CPU, nothing changes


@pytest.mark.parametrize("count", [0, 1])
def test_cpu_or_one_gpu_changes_nothing(gpus, all_todo, count):
    gpus(count)
    assert fp.plan(cfg(), "01_train", None, False, False) is None
    assert fp.plan(cfg(), "01_train", [3], False, False) is None  # --fold as ever


def test_off_a_dry_run_and_an_up_to_date_stage_stay_in_one_process(gpus, all_todo, monkeypatch):
    gpus(2)
    assert fp.plan(cfg("train.multi_gpu=none"), "01_train", None, False, False) is None
    assert fp.plan(cfg(), "01_train", None, False, True) is None
    monkeypatch.setattr(fp, "_todo", lambda c, name, force: None)
    assert fp.plan(cfg(), "01_train", None, False, False) is None
    monkeypatch.setattr(fp, "_todo", lambda c, name, force: [4])  # one fold left: no children for it
    assert fp.plan(cfg(), "01_train", None, False, False) is None
    monkeypatch.setattr(fp, "_todo", lambda c, name, force: [1, 4])
    assert planned(cfg(), "01_train").groups == ((1,), (4,))  # only the folds not yet current


def test_more_gpus_than_folds_use_as_many_gpus_as_folds(gpus, all_todo):
    gpus(4)
    s = planned(cfg("train.folds=[0,2]"), "01_train")
    assert s.groups == ((0,), (2,)) and s.devices == ("0", "1")


def test_torchrun_mode_relaunches_under_torchrun(gpus, all_todo):
    gpus(2)
    assert fp.plan(cfg("train.multi_gpu=torchrun"), "01_train", None, False, False) == fp.Spread("torchrun", processes=2)
    assert fp.plan(cfg("train.multi_gpu=torchrun"), "01_train", [3], False, False) == fp.Spread("torchrun", processes=2)


def test_fold_by_hand_with_two_gpus_is_one_sentence(gpus, all_todo):
    gpus(2)
    msg = ("2 GPUs are visible and train.multi_gpu is 'folds', so 01_train_folds.py spreads the folds itself and takes no --fold 3; "
           "to train one fold on one GPU run CUDA_VISIBLE_DEVICES=1 python 01_train_folds.py ... --fold 3, or drop --fold.")
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        fp.plan(cfg(), "01_train", [3], False, False)


def test_more_processes_than_folds_is_one_sentence(gpus, all_todo, monkeypatch):
    gpus(0)
    monkeypatch.setenv(fp.ENV_PROCESSES, "3")
    msg = ("PIPELINE_FOLD_PROCESSES=3 asks for more processes than the 2 folds 03_retrain.py trains; set it to at most 2.")
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        fp.plan(cfg("train.folds=[0,1]"), "03_retrain", None, False, False)
    monkeypatch.setenv(fp.ENV_PROCESSES, "two")
    with pytest.raises(ConfigError, match="PIPELINE_FOLD_PROCESSES='two' is not a positive whole number"):
        fp.plan(cfg(), "01_train", None, False, False)


def test_torchrun_and_fold_parallel_at_once_is_one_sentence(gpus, all_todo, monkeypatch):
    gpus(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    msg = ("01_train_folds.py was started by torchrun but train.multi_gpu is 'folds' (fold-parallel and torchrun do not mix); "
           "add train.multi_gpu=torchrun to span each fold over the GPUs, or run it without torchrun.")
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        fp.plan(cfg(), "01_train", None, False, False)
    assert fp.plan(cfg("train.multi_gpu=torchrun"), "01_train", None, False, False) is None  # a rank trains as before


def test_processes_on_the_cpu_share_the_cores(gpus, all_todo, monkeypatch):
    gpus(0)
    monkeypatch.setenv(fp.ENV_PROCESSES, "2")
    s = planned(cfg(), "01_train")
    assert s.groups == ((0, 1, 2), (3, 4)) and s.devices == (None, None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = fp.child_env(None, 2)
    assert fp.ENV_PROCESSES not in env and "CUDA_VISIBLE_DEVICES" not in env  # a child never spreads again
    assert env["OMP_NUM_THREADS"] == str(max(1, (__import__("os").cpu_count() or 1) // 2))
    assert env[fp.HOST_PROCESSES] == "2"
    assert fp.child_env("1", 2)["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert fp.child_env("1", 2)["OMP_NUM_THREADS"] == "3"  # the user's choice stands


def test_the_launcher_knows_a_fold_record_as_the_fold_loop_makes_it(tmp_path):
    """fold_record mirrors lib.engine.folds.fold_stage (imported from there, the launcher would be part of 01's code digest)."""
    from lib.engine.folds import fold_stage

    spec = graph.SPECS["03_retrain"]
    st = graph.round_stage(Stage.create("03_retrain", tmp_path, cfg(), spec.sections, ROOT / spec.script), 2)
    assert fp.fold_record(st, 3) == fold_stage(st, 3)
    from lib.core.fingerprint import code_digests

    assert not any("fold_parallel" in f for f in code_digests(ROOT / "01_train_folds.py"))  # infrastructure: reruns nothing


class FakeChild:
    def __init__(self, rc: int | None, log: Path, text: str) -> None:
        self.rc, self.waited, self.stopped = rc, False, False
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)

    def wait(self) -> int:
        if self.rc is None:
            raise KeyboardInterrupt
        self.waited = True
        return self.rc

    def stop(self) -> None:
        self.stopped = True


def test_children_get_their_gpu_and_folds_and_a_failure_names_its_folds_and_log(tmp_path):
    args = argparse.Namespace(config="configs/demo.yaml", overrides=["exp=x"], force=True, fold=None)
    spread = fp.Spread("folds", ((0, 1, 2), (3, 4)), ("0", "1"), 2)
    launched, children = [], []

    def launch(cmd, env, log, prefix):
        launched.append((cmd, env["CUDA_VISIBLE_DEVICES"], log, prefix))
        rc, text = (2, "01_train/fold_3: epoch 1\nerror: fold 3 ran out of GPU memory; lower train.batch_size.\n") if "3" in cmd else (0, "ok\n")
        children.append(FakeChild(rc, log, text))
        return children[-1]

    with pytest.raises(StageError) as e:
        fp.run_children(spread, "01_train", args, tmp_path, launch)
    script = str(ROOT / "01_train_folds.py")
    assert [c[0] for c in launched] == [
        [sys.executable, script, "--config", "configs/demo.yaml", "exp=x", "--force", "--fold", "0", "--fold", "1", "--fold", "2"],
        [sys.executable, script, "--config", "configs/demo.yaml", "exp=x", "--force", "--fold", "3", "--fold", "4"]]
    assert [c[1:] for c in launched] == [("0", tmp_path / "gpu0.log", "[gpu 0]"), ("1", tmp_path / "gpu1.log", "[gpu 1]")]
    assert all(c.waited for c in children)  # the other child finished its folds
    assert str(e.value) == (f"01_train: folds 3,4 on GPU 1 stopped (exit 2: fold 3 ran out of GPU memory; lower train.batch_size; "
                            f"log {tmp_path / 'gpu1.log'}); the folds that finished are kept, so rerunning 01_train_folds.py "
                            "redoes only the others.")


def test_an_interrupted_parent_stops_every_child(tmp_path):
    args = argparse.Namespace(config="c.yaml", overrides=[], force=False, fold=None)
    children: list[FakeChild] = []

    def launch(cmd, env, log, prefix):
        children.append(FakeChild(None if not children else 0, log, ""))  # the first wait is interrupted
        return children[-1]

    with pytest.raises(KeyboardInterrupt):
        fp.run_children(fp.Spread("folds", ((0,), (1,)), (None, None), 2), "03_retrain", args, tmp_path, launch)
    assert [c.stopped for c in children] == [True, True]


def test_a_crash_without_a_sentence_reports_its_last_line(tmp_path):
    log = tmp_path / "gpu0.log"
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: device-side assert triggered\n\n")
    assert fp.last_error(log) == "RuntimeError: CUDA error: device-side assert triggered"
    assert fp.last_error(tmp_path / "missing.log") == "no output"


def test_the_real_launcher_relays_and_keeps_the_log(tmp_path, capsys):
    code = "import sys; print('a\\rb'); print('error: bad.', file=sys.stderr); sys.exit(3)"
    child = fp._relayed([sys.executable, "-c", code], {"PYTHONUNBUFFERED": "1"}, tmp_path / "l" / "gpu0.log", "[gpu 0]")
    assert child.wait() == 3
    out = capsys.readouterr().out
    assert "[gpu 0] b\n" in out and "[gpu 0] error: bad.\n" in out  # a progress bar's last state, with its prefix
    assert (tmp_path / "l" / "gpu0.log").read_bytes() == b"a\rb\nerror: bad.\n"


def test_the_choice_never_decides_a_rerun(tmp_path):
    """train.multi_gpu changes no result, so the training stages' fingerprints leave it out (train.epochs stays in)."""
    def fp_of(*o):
        c = cfg(*o)
        spec = graph.SPECS["01_train"]
        return Stage.create("01_train", tmp_path, c, spec.sections, ROOT / spec.script).fingerprint["config"]

    assert "train.multi_gpu" not in fp_of() and "train.epochs" in fp_of()
    assert fp_of("train.multi_gpu=none") == fp_of("train.multi_gpu=torchrun") == fp_of()
    assert "!train.multi_gpu" in graph.SPECS["03_retrain"].sections


@pytest.mark.slow
def test_fold_parallel_with_two_cpu_processes(tmp_path, gpus, monkeypatch, capsys):
    """Two GPUs faked in this process (the parent), real children on the CPU with CUDA_VISIBLE_DEVICES=0 and =1: one child
    per fold; a child killed mid-fold fails the run naming its fold and log while the other's fold is kept, and no stage
    record is written until a rerun (PIPELINE_FOLD_PROCESSES=2, no fake) trains the missing fold; the folds are those one
    process trains."""
    from lib.demo.__main__ import main as demo_main

    tiny = [f"data.root={tmp_path / 'data'}", f"output_root={tmp_path / 'out'}", "demo.per_class=3", "demo.test_per_class=1",
            "demo.frame_width=160", "demo.frame_height=120", "prepare.n_folds=2", "prepare.crop_size=32", "prepare.workers=1",
            "model.img_size=32", "train.epochs=1", "train.batch_size=64", "train.device=cpu"]
    assert demo_main(["--config", "configs/demo.yaml", *tiny]) == 0
    for exp in ("one", "par"):
        assert load_script("00_prepare_data.py").main(["--config", "configs/demo.yaml", *tiny, f"exp={exp}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "01_train_folds.py", "--config", "configs/demo.yaml", *tiny]
    r = subprocess.run([*cmd, "exp=one"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "[gpu" not in r.stdout, r.stderr[-3000:]  # no GPUs, no override: one process as ever

    gpus(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PIPELINE_KILL_AT", "train_batch 01_train/fold_1 epoch 1")
    capsys.readouterr()
    assert load_script("01_train_folds.py").main(["--config", "configs/demo.yaml", *tiny, "exp=par"]) == 2
    out, err = capsys.readouterr()
    d = tmp_path / "out" / "par" / "01_train"
    assert err.startswith("error: 01_train: fold 1 on GPU 1 stopped (exit -9: ") and f"log {d / 'parallel' / 'gpu1.log'})" in err
    assert "[gpu 0] 01_train/fold_0: val distance" in out  # the other child finished its fold
    assert (d / "fold_0" / "record.json").is_file() and not (d / "record.json").exists()

    env["PIPELINE_FOLD_PROCESSES"] = "2"
    r = subprocess.run([*cmd, "exp=par"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "01_train/fold_0: up to date" in r.stdout and "[gpu" not in r.stdout  # one fold left: trained in this process
    assert json.loads((d / "record.json").read_text())["result"]["folds"] == 2
    for k in range(2):  # a fold trained in a child is the fold one process trains
        a, b = (np.load(tmp_path / "out" / e / "01_train" / f"fold_{k}" / "oof.npz") for e in ("par", "one"))
        assert np.allclose(a["probs"], b["probs"], atol=1e-5)


def test_torchrun_mode_relaunches_the_same_run(monkeypatch):
    calls: list[list[str]] = []

    def call(cmd: list[str]) -> int:
        calls.append(cmd)
        return 0

    monkeypatch.setattr(fp.subprocess, "call", call)
    args = argparse.Namespace(config="configs/fathomnet2025.yaml", overrides=["train.multi_gpu=torchrun"], force=False, fold=[2])
    assert fp.relaunch_torchrun(fp.Spread("torchrun", processes=2), "03_retrain", args) == 0
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "03_retrain.py"),
                      "--config", "configs/fathomnet2025.yaml", "train.multi_gpu=torchrun", "--fold", "2"]]
