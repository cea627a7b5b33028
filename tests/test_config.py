"""Config loading: defaults, YAML, overrides, and one clear error per mistake."""
import pytest

from lib.config import ConfigError, flatten, load_config, parse_override


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
    cfg = load_config("configs/fathomnet2025.yaml", ["loss.name=ldam", "loss.drw_start_epoch=10"])
    assert cfg.loss.name == "ldam" and cfg.loss.drw_start_epoch == 10 and cfg.loss.label_smoothing == 0.1
    with pytest.raises(ConfigError, match="Unknown config key 'train.label_smoothing'"):
        load_config(None, ["train.label_smoothing=0.1"])
