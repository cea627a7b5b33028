"""Config loading: defaults, YAML, overrides, and one clear error per mistake."""
from pathlib import Path

import pytest

from lib.config import ConfigError, flatten, load_config, parse_override
from lib.core.paths import ROOT


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.exp == "demo" and cfg.model.backbone == "tf_efficientnet_lite0"


def test_override_types():
    cfg = load_config("configs/demo.yaml", ["train.epochs=7", "train.lr=1e-4", "train.folds=[0, 2]", "exp=x"])
    assert cfg.train.epochs == 7 and cfg.train.lr == pytest.approx(1e-4) and cfg.train.folds == [0, 2] and cfg.exp == "x"


def test_int_widens_to_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"Unknown config key 'train.epoch'; did you mean 'train.epochs'\?"):
        load_config(None, ["train.epoch=3"])


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"'trian.epochs'.*'train.epochs'|'trian'"):
        load_config(None, ["trian.epochs=3"])


def test_wrong_type():
    with pytest.raises(ConfigError, match=r"'train.epochs' must be int, got 'three'"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match=r"'train.epochs' must be int"):
        load_config(None, ["train.epochs=2.5"])


def test_unknown_choice_suggests():
    with pytest.raises(ConfigError, match=r"unknown value 'argmx' \(did you mean 'argmax'\?\)"):
        load_config(None, ["submit.decode=argmx"])


@pytest.mark.parametrize(
    "override,msg",
    [("train.lr=0", "train.lr must be positive"), ("model.img_size=0", "model.img_size"),
     ("prepare.n_folds=1", "n_folds must be at least 2"), ("pseudo.threshold=1.5", "pseudo.threshold must lie in"),
     ("loss.beta=1", "loss.beta must lie in"), ("loss.gamma=-1", "loss.gamma"), ("loss.label_smoothing=1", "loss.label_smoothing"),
     ("loss.max_m=0", "loss.max_m"), ("loss.s=0", "loss.s must"), ("loss.seql_gamma=1.5", "loss.seql_gamma"),
     ("loss.alpha=1", "loss.alpha"), ("loss.tau=-1", "loss.tau"), ("loss.ed_lambda=-0.1", "loss.ed_lambda"),
     ("loss.seql_lambda=-1", "loss.seql_lambda")],
)
def test_value_checks(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")


def test_flatten_names_keys():
    cfg = load_config(None)
    flat = flatten(cfg.train, "train")
    assert flat["train.epochs"] == cfg.train.epochs


def test_loss_section():
    cfg = load_config("configs/fathomnet2025.yaml", ["loss.name=ldam", "loss.drw_start_epoch=10", "head.normalized=true"])
    assert cfg.loss.name == "ldam" and cfg.loss.drw_start_epoch == 10 and cfg.loss.label_smoothing == 0.1
    assert cfg.head.normalized and cfg.loss.ts_distance == "lca"  # the default: better out of fold on the demo
    with pytest.raises(ConfigError, match="Unknown config key 'train.label_smoothing'"):
        load_config(None, ["train.label_smoothing=0.1"])


def test_ldam_needs_the_cosine_classifier():
    """LDAM's margins and s = 30 assume NormedLinear's cosine logits (kaidic/LDAM-DRW); raw logits are refused, with the fix."""
    with pytest.raises(ConfigError, match="set head.normalized=true") as e:
        load_config("configs/demo.yaml", ["loss.name=ldam"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="head.normalized=true is for the heads"):
        load_config("configs/demo.yaml", ["head.name=hierarchical_softmax", "head.normalized=true"])
    with pytest.raises(ConfigError, match="only loss.name=ldam scales"):
        load_config("configs/demo.yaml", ["head.normalized=true"])
    assert load_config("configs/demo.yaml", ["loss.name=ldam", "head.normalized=true", "head.name=per_rank"]).head.normalized


@pytest.mark.parametrize(
    "override,msg",
    [("train.lr=-0.001", "train.lr must be positive"), ("model.img_size=-32", "model.img_size must be at least 16"),
     ("prepare.crop_size=0", "prepare.crop_size must be at least 16"), ("knn.img_size=8", "knn.img_size must be at least 16"),
     ("prepare.n_folds=0", "prepare.n_folds must be at least 2"), ("pseudo.threshold=-0.1", "pseudo.threshold must lie in \\[0, 1\\]"),
     ("pseudo.u_floor=2", "pseudo.u_floor must lie in"), ("train.epochs=0", "train.epochs must be at least 1"),
     ("train.batch_size=0", "train.batch_size must be at least 1"), ("train.eval_batch_size=0", "train.eval_batch_size"),
     ("train.weight_decay=-1", "train.weight_decay"), ("train.num_workers=-1", "train.num_workers"),
     ("exp=../elsewhere", "must be a plain folder name"), ("exp=", "must be a plain folder name"),
     ("data.root=", "must not be empty"), ("submit.models=[]", "submit.models must name"),
     ("tta.views=[]", "No TTA view is listed")],
)
def test_more_value_checks_are_one_sentence(override, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load_config("configs/demo.yaml", [override])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,choices", [("loss.name=focall", "did you mean 'focal'"), ("head.name=lineer", "did you mean 'linear'"),
                                             ("train.sampler=balanced", "class_balanced"), ("model.pretrained=imagenet", "pypi_lite0"),
                                             ("knn.vote=majority", "min_risk")])
def test_unknown_names_list_the_choices(override, choices):
    with pytest.raises(ConfigError, match=rf"unknown value .*{choices}"):
        load_config("configs/demo.yaml", [override])


def test_missing_weights_file_is_caught_at_load():
    with pytest.raises(ConfigError, match="model.pretrained_file '/nope.pth' is not a file"):
        load_config(None, ["model.pretrained=file", "model.pretrained_file=/nope.pth"])


def test_unknown_backbone_is_caught_when_the_stage_starts():
    """timm's name list needs torch (seconds to import), so the check runs when a model stage starts, not at load."""
    from lib.pipeline.graph import preflight

    cfg = load_config(None, ["model.backbone=convnext_tinny"])
    with pytest.raises(ConfigError, match=r"model.backbone 'convnext_tinny' is not a timm model \(did you mean 'convnext_tiny'\?\)"):
        preflight(cfg, "01_train")
    preflight(cfg, "04_submit")  # 04 reads only 01's checkpoints, made with a backbone 01 accepted
    preflight(load_config(None, ["knn.backbone=vit_small_patch16_224.augreg_in21k"]), "knn")  # pretrained tags are names too


def test_missing_input_paths_are_caught_when_00_starts(tmp_path):
    from lib.pipeline.graph import preflight

    cfg = load_config(None, [f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"data.train_json '{tmp_path}/dataset_train.json' does not exist; set data.root"):
        preflight(cfg, "00_prepare")
    for name in ("dataset_train.json", "dataset_test.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(ConfigError, match=r"data.train_images .* does not exist; rerun with --download"):
        preflight(cfg, "00_prepare")
    preflight(cfg, "00_prepare", frames=False)  # --download will fetch the frames
    with pytest.raises(ConfigError, match=f"data.taxonomy_csv '{ROOT / 'nope.csv'}' does not exist"):  # relative: to the project
        preflight(load_config(None, [f"data.root={tmp_path}", "data.taxonomy_csv=nope.csv"]), "00_prepare", frames=False)


def test_relative_paths_resolve_against_the_project_not_the_working_directory(tmp_path, monkeypatch):
    """One rule: data.root, data.taxonomy_csv, output_root and weights files against the project root; data files against data.root."""
    from lib.config import project_path

    monkeypatch.chdir(tmp_path)  # a Kaggle notebook's /kaggle/working
    cfg = load_config("configs/demo.yaml", ["output_root=out", "model.pretrained=none"])  # --config: found in the project
    p = cfg.data.paths()
    assert cfg.data.root_dir() == ROOT / "input/demo" and p["train_json"] == ROOT / "input/demo/dataset_train.json"
    assert p["taxonomy_csv"] == ROOT / "configs/taxonomy/fathomnet2025.csv" and p["taxonomy_csv"].is_file()
    assert cfg.out_dir == ROOT / "out" / "demo"
    absolute = load_config(None, [f"data.root={tmp_path / 'd'}", "data.train_images=frames", "data.test_images=frames",
                                  f"output_root={tmp_path / 'o'}"])
    q = absolute.data.paths()
    assert q["train_images"] == q["test_images"] == tmp_path / "d" / "frames" and absolute.out_dir == tmp_path / "o" / "demo"
    assert project_path("/abs/x") == Path("/abs/x") and project_path("~/x") == Path.home() / "x"
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    assert load_config(None, ["model.pretrained=file", f"model.pretrained_file={weights}"]).model.pretrained_file == str(weights)
    with pytest.raises(ConfigError, match="absolute, or relative to the project root"):
        load_config(None, ["model.pretrained=file", "model.pretrained_file=w.pth"])  # w.pth is in the cwd, not the project


def test_context_crops_default_to_what_the_model_reads():
    """00 cuts only the context crops model.context reads, unless prepare lists them; the recorded values are the ones used."""
    cfg = load_config("configs/demo.yaml", ["model.context=[1, 3]"])
    assert cfg.prepare.context_scales == [3.0] and cfg.prepare.context_full is False
    cfg = load_config("configs/demo.yaml", ["model.context=[1, 5, full]"])
    assert cfg.prepare.context_scales == [5.0] and cfg.prepare.context_full is True
    cfg = load_config("configs/demo.yaml", [])
    assert cfg.prepare.context_scales == [] and cfg.prepare.context_full is False  # the ROI alone
    cfg = load_config("configs/demo.yaml", ["model.context=[1, 3]", "prepare.context_scales=[3, 5]", "prepare.context_full=true"])
    assert cfg.prepare.context_scales == [3.0, 5.0] and cfg.prepare.context_full is True  # listed: kept as listed
    assert flatten(cfg.section("prepare"), "prepare")["prepare.context_scales"] == [3.0, 5.0]
