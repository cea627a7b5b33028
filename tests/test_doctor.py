"""`python -m lib.doctor`: one line per fact on this (CPU) machine, problems counted, the precision rule."""
from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib.data.taxonomy import load_taxonomy_csv
from lib.doctor.__main__ import auto_precision, main
from lib.model import device as device_module

LABELS = ["python", "torch", "gpus", "precision", "faiss", "cpu cores", "workers", "loaders", "disk", "data.root", "data.train_json",
          "data.test_json", "data.train_images", "data.test_images", "data.taxonomy_csv", "model.pretrained", "knn.pretrained",
          "memory", "memory on T4", "time on T4", "memory on A100", "time on A100"]  # no GPU here: the estimate, for information


def dataset(root: Path) -> Path:
    """The files a config's data section names (the doctor checks that they exist, not what they hold)."""
    for sub in ("train/images", "test/images"):
        (root / sub).mkdir(parents=True)
    (root / "train/images/1.png").write_bytes(b"x")
    for name in ("dataset_train.json", "dataset_test.json"):
        (root / name).write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return root


def test_prints_every_line_and_passes_on_a_complete_config(tmp_path, capsys):
    root = dataset(tmp_path / "data")
    assert main(["--config", "configs/demo.yaml", f"data.root={root}", f"output_root={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line[:19].strip() for line in lines] == LABELS, out
    assert "train/images: 1 files" in out and "GiB free under output_root" in out and "MISSING" not in out
    assert "problem" not in out


def test_missing_data_and_weights_are_problems(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU recipe on a machine without one
    args = ["--config", "configs/fathomnet2025.yaml", f"data.root={tmp_path / 'nowhere'}", f"output_root={tmp_path / 'out'}"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"{'data.train_json':<19} {tmp_path / 'nowhere' / 'dataset_train.json'}: MISSING" in out
    assert "--download fetches the frames" in out
    assert "model.pretrained=file with model.pretrained_file" in out  # hub: how to go offline
    assert f"{'knn.source':<19} phase1: 01's fold models embed, nothing to download" in out
    assert "train.device is cuda, so the training stages would stop" in out  # the recipe on this CPU machine
    assert "6 problem(s) above" in out


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_root_is_a_problem(tmp_path, capsys):
    root = dataset(tmp_path / "data")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main([f"data.root={root}", f"output_root={locked / 'out'}"]) == 1
    finally:
        locked.chmod(0o700)
    assert "NOT WRITABLE: set output_root to a writable folder" in capsys.readouterr().out


def test_bad_config_is_one_sentence(capsys):
    assert main(["train.epoch=2"]) == 2
    assert capsys.readouterr().err.strip() == "error: Unknown config key 'train.epoch'; did you mean 'train.epochs'?"


def test_precision_follows_the_device_policy_or_the_capability_rule(monkeypatch):
    import torch

    monkeypatch.setattr(device_module, "precision_policy", lambda device: ("bf16", f"policy for {device.type}"), raising=False)
    assert auto_precision(torch)[0] == "bf16" and "policy for" in auto_precision(torch)[1]
    monkeypatch.delattr(device_module, "precision_policy", raising=False)
    if not torch.cuda.is_available():
        assert auto_precision(torch) == ("fp32", "no GPU: autocast is off on the CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, name in (((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0, c=capability: c)
        assert auto_precision(torch)[0] == name


def fake_gpu(monkeypatch, capability=(7, 5), arches=("sm_75", "sm_80"), name="Tesla T4"):
    """A CUDA build of torch that sees one GPU of `capability`, with kernels for `arches` (nothing runs on it)."""
    import torch

    props = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=15 * 2**30)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    for attr, value in (("is_available", lambda: True), ("device_count", lambda: 1), ("get_device_properties", lambda i=0: props),
                        ("get_device_capability", lambda i=0: capability), ("get_arch_list", lambda: list(arches)),
                        ("get_device_name", lambda i=0: name), ("is_bf16_supported", lambda including_emulation=True: capability >= (8, 0))):
        monkeypatch.setattr(torch.cuda, attr, value)


def doctor_out(tmp_path, capsys, *overrides: str) -> tuple[int, str]:
    root = tmp_path / "data"
    if not root.exists():
        dataset(root)
    rc = main(["--config", "configs/demo.yaml", f"data.root={root}", f"output_root={tmp_path / 'out'}", *overrides])
    return rc, capsys.readouterr().out


def test_cuda_config_without_a_gpu_is_fatal_and_never_says_the_cpu_runs_it(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out = doctor_out(tmp_path, capsys, "train.device=cuda")
    assert rc == 1 and "the stages run on the CPU" not in out
    assert "train.device is cuda, so the training stages would stop" in out and "1 problem(s) above" in out
    rc, out = doctor_out(tmp_path, capsys, "train.device=auto")
    assert rc == 0 and "the stages run on the CPU (train.device=auto)" in out


def test_a_torch_without_kernels_for_the_gpu_is_fatal_only_for_train_device_cuda(tmp_path, capsys, monkeypatch):
    fake_gpu(monkeypatch, capability=(7, 5), arches=("sm_80", "sm_90"))
    rc, out = doctor_out(tmp_path, capsys, "train.device=cuda")
    assert rc == 1 and f"{'gpu 0':<19} Tesla T4, capability 7.5, 15.0 GiB" in out
    assert "has no kernels for Tesla T4 (compute capability 7.5; it supports sm_80, sm_90)" in out and "training stages would stop" in out
    rc, out = doctor_out(tmp_path, capsys, "train.device=auto")
    assert rc == 0 and "train.device=auto falls back to the CPU" in out
    fake_gpu(monkeypatch, capability=(7, 5), arches=("sm_70", "sm_75"))
    rc, out = doctor_out(tmp_path, capsys, "train.device=cuda")
    assert rc == 0 and "torch's kernels (sm_70, sm_75) run on this GPU" in out


def test_precision_line_reads_the_config_and_names_what_auto_would_pick(tmp_path, capsys, monkeypatch):
    fake_gpu(monkeypatch, capability=(7, 5), arches=("sm_75",))
    _, out = doctor_out(tmp_path, capsys, "train.device=cuda")
    assert "train.precision auto picks fp16 (compute capability 7.5 has no native bf16" in out
    _, out = doctor_out(tmp_path, capsys, "train.device=cuda", "train.precision=bf16")
    assert "train.precision bf16 runs as bf16" in out and "auto would pick fp16" in out
    fake_gpu(monkeypatch, capability=(8, 0), arches=("sm_80",), name="A100")
    _, out = doctor_out(tmp_path, capsys, "train.device=cuda", "train.precision=bf16")
    assert "train.precision bf16 runs as bf16 (train.precision=bf16)" in out and "auto would pick" not in out


def tiny(tmp_path: Path, **train: object):
    """A config small enough to time on the CPU in well under a second per step."""
    from lib.config import load_config

    over = [f"output_root={tmp_path / 'out'}", "train.device=cpu", "model.backbone=tf_efficientnet_lite0", "model.img_size=32",
            "prepare.crop_size=40",
            *(f"train.{k}={v}" for k, v in train.items())]
    return load_config("configs/demo.yaml", over)


def test_stage_times_are_folds_times_epochs_times_steps(tmp_path):
    from lib.doctor.timing import Counts, StepTimes, stage_seconds

    cfg = tiny(tmp_path, batch_size=10, eval_batch_size=20, epochs=2)
    cfg.prepare.n_folds, cfg.prepare.test_like, cfg.tta.views = 5, False, ["identity", "hflip"]
    cfg.submit.models, cfg.submit.oof_tta, cfg.pseudo.members, cfg.knn.source = ["phase1"], False, ["phase1"], "phase1"
    s = StepTimes("cpu", "fp32", train_step=1.0, eval_batch=0.5, load_item=0.0, load_eval_item=0.0, workers=0)
    got = stage_seconds(cfg, s, Counts(train=100, test=10, source="test"))
    # a fold trains on 80 rows (8 steps of 1 s) and validates 20 (one batch of 0.5 s), for 2 epochs; 5 folds
    assert got["01_train"] == pytest.approx(5 * 2 * (8 * 1.0 + 0.5))
    # 03: 80 + 10 pseudo-labels = 9 steps
    assert got["03_retrain"] == pytest.approx(5 * 2 * (9 * 1.0 + 0.5))
    assert got["02_pseudo"] == pytest.approx(5 * 1 * 0.5 * 2) and got["04_submit"] == pytest.approx(5 * 0.5 * 2)
    assert got["knn"] == pytest.approx(5 * 1 * 0.5)  # 110 rows in one batch of knn.batch_size 128
    # four workers at 0.1 s a row: 10 rows take 0.25 s beside a 1 s step; none: 1 s more, in series
    loaded = StepTimes("cpu", "fp32", 1.0, 0.5, load_item=0.1, load_eval_item=0.0, workers=4)
    assert loaded.train_batch(10) == 1.0 and replace(loaded, workers=0).train_batch(10) == pytest.approx(2.0)
    assert replace(loaded, workers=1).train_batch(40) == pytest.approx(4.0)


def test_data_counts_come_from_rois_csv_else_the_competition(tmp_path):
    from lib.doctor.timing import FATHOMNET_TEST, FATHOMNET_TRAIN, data_counts

    cfg = tiny(tmp_path)
    assert (data_counts(cfg).train, data_counts(cfg).test) == (FATHOMNET_TRAIN, FATHOMNET_TEST) == (23_699, 788)
    assert data_counts(cfg, 500).train == 500
    rois = cfg.out_dir / "00_prepare" / "rois.csv"
    rois.parent.mkdir(parents=True)
    rois.write_text("roi_id,split\n1,train\n2,train\n3,test\n4,train\n")
    got = data_counts(cfg)
    assert (got.train, got.test, got.source) == (3, 1, str(rois))


def test_time_measures_the_real_step_on_the_cpu(tmp_path, capsys, monkeypatch):
    from lib.doctor import timing

    cfg = tiny(tmp_path, batch_size=16, eval_batch_size=16)
    s = timing.measure(cfg, load_taxonomy_csv("configs/taxonomy/fathomnet2025.csv"), seconds=0.05)
    assert s.device == "cpu" and s.precision == "fp32" and s.workers == cfg.train.num_workers
    assert s.train_step > 0 and s.eval_batch > 0 and s.load_item > 0 and s.load_eval_item > 0
    assert "training step measured at 8 rows (on the CPU) and scaled linearly to 16" in s.notes
    monkeypatch.setattr(timing, "measure", lambda cfg, taxonomy, seconds: replace(s, notes=["measured above"]))  # once is enough
    rc, out = doctor_out(tmp_path, capsys, "train.device=cpu", "model.img_size=32", "prepare.crop_size=40", "--time", "--seconds", "0.05",
                         "--train-rois", "300")
    assert rc == 0, out
    assert "time 01_train" in out and "300 train and 788 test ROIs (--train-rois)" in out
    assert re.search(r"time phases +phase 1 \(01\+02\) .*% of a 12 h Kaggle session \(fits in\)", out)


def test_a_missing_tracker_is_named_but_not_fatal(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    rc, out = doctor_out(tmp_path, capsys, "track.backend=wandb")
    assert rc == 0 and f"{'track':<19} wandb (wandb): not installed, so the stages run untracked; pip install wandb" in out
    rc, out = doctor_out(tmp_path, capsys)
    assert "track" not in [line[:19].strip() for line in out.splitlines()]
