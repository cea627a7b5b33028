"""Offline notebooks: the GPU recipe downloads nothing after the backbone, and a download that fails says which key to set."""
from __future__ import annotations

import pytest

from lib.config import load_config
from lib.core.errors import StageError
from lib.pipeline.graph import upstream_of


def offline_hub(monkeypatch) -> None:
    """timm's hub branch fails as it does without network (huggingface_hub raises an OSError subclass)."""
    import timm

    real = timm.create_model

    def create(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cache.")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", create)


@pytest.mark.parametrize("section,extra", [("model", ""), ("knn", " or knn.source=phase1 (01's fold models)")])
def test_hub_weights_offline_is_one_sentence_naming_the_local_file_key(monkeypatch, section, extra):
    from lib.model.net import build_model

    offline_hub(monkeypatch)
    with pytest.raises(StageError) as e:
        build_model("resnet18", 0, "hub", section=section)
    msg = str(e.value)
    assert msg.startswith(f"Could not get the pretrained weights of 'resnet18' for {section}.pretrained=hub, which downloads them (OSError")
    assert msg.endswith(f"set {section}.pretrained=file and {section}.pretrained_file to a local weights file{extra}.")
    assert msg.count(";") == 1


def test_local_weights_file_resolves_against_the_project(tmp_path, monkeypatch):
    """model.pretrained_file relative to the project root, from any working directory; a missing one names its key."""
    import torch

    from lib.core.paths import ROOT
    from lib.model.net import build_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=rf"Weights file '{ROOT / 'nope.pth'}' does not exist; fix knn.pretrained_file."):
        build_model("resnet18", 0, "file", "nope.pth", section="knn")
    weights = tmp_path / "r18.pth"
    torch.save(build_model("resnet18", 0, "none").state_dict(), weights)
    assert build_model("resnet18", 0, "file", str(weights)).num_features == 512


def test_the_gpu_recipe_embeds_its_knn_with_the_fold_models():
    """knn.source=phase1: knn_baseline.py reads 01's fold models and asks the hub for nothing, so `make stages` reaches the report."""
    cfg = load_config("configs/fathomnet2025.yaml")
    assert cfg.knn.source == "phase1" and "01_train" in upstream_of(cfg, "knn")
