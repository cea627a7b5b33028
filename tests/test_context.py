"""Context views: which columns a model reads, consistent augmentation of the views, fusion shapes."""
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from lib.config import ConfigError, load_config
from lib.core.errors import StageError
from lib.data.augment import build_transforms
from lib.data.context import model_inputs, view_column
from lib.data.dataset import CropDataset
from lib.model.fusion import ContextFusion


def test_view_columns():
    assert [view_column(v) for v in ["1", "3", "5", "full", "2.5"]] == ["crop_path", "ctx3_path", "ctx5_path", "full_path",
                                                                        "ctx2.5_path"]


def test_model_inputs_single_tuple_and_testlike():
    rows = pd.DataFrame({"crop_path": ["a", "b"], "ctx3_path": ["a3", "b3"], "full_path": ["af", "bf"], "testlike_path": ["at", "bt"]})
    assert model_inputs(rows, ["1"]) == ["a", "b"]
    assert model_inputs(rows, ["1", "3", "full"]) == [("a", "a3", "af"), ("b", "b3", "bf")]
    assert model_inputs(rows, ["1", "3"], roi_column="testlike_path") == [("at", "a3"), ("bt", "b3")]
    with pytest.raises(StageError, match=r"views \['5'\] that 00_prepare did not cut"):
        model_inputs(rows, ["1", "5"])


def test_config_context_parses_numbers_and_checks_order():
    cfg = load_config("configs/demo.yaml", ["model.context=[1, 3, full]", "model.fusion=attention"])
    assert cfg.model.context == ["1", "3", "full"] and cfg.model.fusion == "attention"
    with pytest.raises(ConfigError, match="must start with 1"):
        load_config("configs/demo.yaml", ["model.context=[3, 1]"])
    with pytest.raises(ConfigError, match="may only hold"):
        load_config("configs/demo.yaml", ["model.context=[1, wide]"])


@pytest.mark.parametrize("mode,out_dim", [("concat", 3 * 16), ("attention", 16)])
def test_fusion_shapes_and_gradients(mode, out_dim):
    torch.manual_seed(0)
    fusion = ContextFusion(16, 3, mode)
    f = torch.randn(4, 3, 16, requires_grad=True)
    y = fusion(f)
    assert fusion.out_dim == out_dim and y.shape == (4, out_dim)
    y.sum().backward()
    assert f.grad is not None and f.grad[:, 1:].abs().sum() > 0  # the context views reach the output


def test_concat_keeps_views_in_order():
    f = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    assert torch.equal(ContextFusion(2, 3, "concat")(f), f.reshape(2, 6))


def test_views_share_one_random_augmentation(tmp_path):
    """With a flip at p=1 the ROI and its context flip together; the item is a (V, 3, H, W) stack."""
    import cv2

    from lib.config import AugmentCfg

    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :4] = 255  # bright left edge
    paths = []
    for name in ("roi", "ctx"):
        p = tmp_path / f"{name}.png"
        cv2.imwrite(str(p), img)
        paths.append(str(p))
    off: dict[str, Any] = {k: 0.0 for k in AugmentCfg().probabilities()}
    aug = AugmentCfg(**{**off, "hflip": 1.0})
    tf = build_transforms(16, train=True, mean=(0, 0, 0), std=(1, 1, 1), aug=aug, n_views=2)
    x, _, _ = CropDataset([tuple(paths)], transform=tf)[0]
    assert x.shape == (2, 3, 16, 16)
    assert torch.equal(x[0], x[1]) and x[0, 0, 0, -1] > x[0, 0, 0, 0]  # both flipped: the bright edge is now on the right


def test_net_reads_view_stacks():
    from lib.config import Config
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.metric import DEFAULT_TAXONOMY
    from lib.model.net import build_net

    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    cfg = Config()
    cfg.model.pretrained, cfg.model.context, cfg.model.fusion = "none", ["1", "3"], "attention"
    net = build_net(cfg, tax, pretrained=False).eval()
    x = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        assert net(x).shape == (2, 79) and net.features(x).shape == (2, net.backbone.num_features)
        # The ROI's features alone differ from the fused ones: the context is read.
        assert not torch.allclose(net.features(x), net.backbone(x[:, 0]))


def test_fusion_learns_at_the_head_rate():
    from lib.config import Config
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.metric import DEFAULT_TAXONOMY
    from lib.model.net import build_net
    from lib.model.optim import param_groups

    cfg = Config()
    cfg.model.pretrained, cfg.model.context = "none", ["1", "full"]
    cfg.model.fusion = "attention"
    net = build_net(cfg, load_taxonomy_csv(DEFAULT_TAXONOMY), pretrained=False)
    groups = param_groups(net, lr=1.0, weight_decay=0.1, backbone_lr_mult=0.1)
    head_params = {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]}
    assert net.fusion is not None
    assert all(id(p) in head_params for p in net.fusion.parameters())
    assert not any(id(p) in head_params for p in net.backbone.parameters())
