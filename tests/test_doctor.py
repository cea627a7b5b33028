"""`python -m lib.doctor`: one line per fact on this (CPU) machine, problems counted, the precision rule."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lib.doctor.__main__ import auto_precision, main
from lib.model import device as device_module

LABELS = ["python", "torch", "gpus", "precision", "faiss", "cpu cores", "workers", "loaders", "disk", "data.root", "data.train_json",
          "data.test_json", "data.train_images", "data.test_images", "data.taxonomy_csv", "model.pretrained", "knn.pretrained"]


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


def test_missing_data_and_weights_are_problems(tmp_path, capsys):
    args = ["--config", "configs/fathomnet2025.yaml", f"data.root={tmp_path / 'nowhere'}", f"output_root={tmp_path / 'out'}"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"{'data.train_json':<19} {tmp_path / 'nowhere' / 'dataset_train.json'}: MISSING" in out
    assert "--download fetches the frames" in out
    assert "model.pretrained=file with model.pretrained_file" in out  # hub: how to go offline
    assert f"{'knn.source':<19} phase1: 01's fold models embed, nothing to download" in out
    assert "5 problem(s) above" in out


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
