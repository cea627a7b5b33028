"""Ensembles of several experiments: the fold check (fast, on synthetic prepared data) and, on a tiny demo,
experiments a and b (another loss) blended by 04, pseudo-labels from both, and the refusals (slow)."""
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core.errors import StageError
from lib.data.artifacts import Prepared
from lib.data.taxonomy import load_taxonomy_csv
from lib.engine.members import check_same_folds

from conftest import load_script  # tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
TAXONOMY = ROOT / "configs" / "taxonomy" / "fathomnet2025.csv"


def prepared(folds: list[int], test_ids=(100, 101), tax=None) -> Prepared:
    train = pd.DataFrame({"annotation_id": np.arange(len(folds)), "split": "train", "fold": folds, "ok": 1, "label": 0})
    test = pd.DataFrame({"annotation_id": list(test_ids), "split": "test", "fold": -1, "ok": 1, "label": -1})
    return Prepared(Path("."), pd.concat([train, test], ignore_index=True), tax or load_taxonomy_csv(TAXONOMY))


def test_same_folds_pass():
    check_same_folds("b/phase1", prepared([0, 1, 0, 1]), prepared([0, 1, 0, 1]))


@pytest.mark.parametrize("theirs, words", [
    (dict(folds=[0, 1, 2, 1]), ["3 folds", "2 folds"]),
    (dict(folds=[0, 1, 0]), ["other train rows", "1 rows only here"]),
    (dict(folds=[1, 1, 0, 1]), ["1 train rows in other folds"]),
    (dict(folds=[0, 1, 0, 1], test_ids=(100, 102)), ["other usable test ROIs"]),
])
def test_other_folds_rows_or_test_rois_are_refused_in_one_sentence(theirs, words):
    with pytest.raises(StageError) as e:
        check_same_folds("b/phase1", prepared([0, 1, 0, 1]), prepared(**theirs))
    msg = str(e.value)
    assert msg.startswith("Member b/phase1 ") and msg.count(". ") == 0 and all(w in msg for w in words), msg


def test_another_taxonomy_is_refused():
    from lib.data.taxonomy import Taxonomy

    tax = load_taxonomy_csv(TAXONOMY)
    other = Taxonomy(tax.names[:-1], tax.lineages[:-1], tax.exceptions)
    with pytest.raises(StageError, match="Member b/phase1 predicts other concepts"):
        check_same_folds("b/phase1", prepared([0, 1]), prepared([0, 1], tax=other))


def test_model_names_with_experiments():
    from lib.modelref import ModelRef

    r = ModelRef.parse("b/round2")
    assert (r.exp, r.phase, r.round, r.stage, r.key, r.file_stem) == ("b", "round", 2, "03_retrain", "b/03_retrain", "b__round2")
    assert ModelRef.parse("convnext/phase1").key == "convnext/01_train"
    for bad in ("/phase1", "a/b/phase1", "../phase1", "b/phase3", "b/"):
        with pytest.raises(ValueError):
            ModelRef.parse(bad)


def test_config_refuses_duplicates_own_prefix_and_later_phases_as_pseudo_members():
    from lib.config import ConfigError, load_config

    for bad, words in ((["submit.models=[phase1, b/phase1, b/phase1]"], "each model once"),
                       (["exp=a", "submit.models=[phase1, a/phase2]"], "without the 'a/' prefix"),
                       (["pseudo.members=[phase1, phase2]"], "pseudo.members may only name phase1"),
                       (["submit.blend=greedy", "submit.greedy_bag_fraction=0"], "greedy_bag_fraction")):
        with pytest.raises(ConfigError, match=words):
            load_config("configs/demo.yaml", bad)
    cfg = load_config("configs/demo.yaml", ["submit.models=[phase1, b/phase2, c/round3]", "pseudo.members=[phase1, b/phase1]"])
    from lib.pipeline.graph import reads_of, upstream_of

    assert upstream_of(cfg, "04_submit") == ("00_prepare", "01_train", "b/03_retrain", "c/03_retrain")
    assert upstream_of(cfg, "02_pseudo") == ("00_prepare", "01_train", "b/01_train")
    assert {"b/00_prepare", "c/00_prepare", "02_pseudo"} <= set(reads_of(cfg, "04_submit"))


# ----------------------------------------------------------------------------- two experiments on a tiny demo


STAGES = ["00_prepare_data.py", "01_train_folds.py", "02_pseudo_label.py", "03_retrain.py"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A tiny dataset; experiment a (ce) and b (focal loss) through 03 on the same 2 folds."""
    from lib.demo.__main__ import main as demo_main

    tmp = tmp_path_factory.mktemp("two")
    base = [f"data.root={tmp / 'data'}", f"output_root={tmp / 'out'}",
            "demo.per_class=3", "demo.test_per_class=1", "demo.frame_width=160", "demo.frame_height=120",
            "prepare.n_folds=2", "prepare.crop_size=32", "prepare.workers=1", "model.img_size=32", "knn.img_size=32",
            "train.epochs=1", "train.batch_size=64", "pseudo.threshold=0.0", "tta.views=[identity]"]
    assert demo_main(["--config", "configs/demo.yaml", *base]) == 0
    for exp, extra in (("a", []), ("b", ["loss.name=focal"])):
        for s in STAGES:
            assert load_script(s).main(["--config", "configs/demo.yaml", *base, f"exp={exp}", *extra]) == 0, (exp, s)
    return base, tmp / "out"


def submit(base, *extra):
    """04 of experiment a under the submit.* settings, comparing two calibrations (the cheap ones)."""
    return load_script("04_infer_submit.py").main(["--config", "configs/demo.yaml", *base, "exp=a", "submit.pick=settings",
                                                   "submit.calibrations=[none, temperature]", *extra])


MODELS = "submit.models=[phase1, phase2, b/phase1, b/phase2]"


@pytest.mark.slow
def test_two_experiments_blend_and_rerun_when_a_member_retrains(two, caplog, capsys):
    base, out = two
    assert submit(base, MODELS, "submit.blend=fit", "submit.calibrate=temperature") == 0
    folder = out / "a" / "04_submit"
    sub = pd.read_csv(folder / "submission.csv")
    assert len(sub) == 79 and list(sub.columns) == ["annotation_id", "concept_name"]
    report = (folder / "report.md").read_text()
    assert "| b/phase2 | experiment b (" in report and "error_correlation.png" in report
    assert (folder / "error_correlation.png").is_file() and (folder / "probs" / "b__phase2.npz").is_file()
    options = pd.read_csv(folder / "options.csv")
    assert {"blend uniform", "blend cv", "blend fit", "blend greedy", "b/phase2"} <= set(options["model"])
    assert set(options["calibration"]) == {"none", "temperature"}
    rec = json.loads((folder / "record.json").read_text())
    assert "b/03_retrain" in rec["fingerprint"]["inputs"] and len(rec["result"]["temperatures"]) == 4
    assert rec["result"]["temperatures"] == [round(t, 4) for t in options.loc[
        (options["calibration"] == "temperature") & (options["frame_context"] == "none") & (options["test_prior"] == "none")
        & options["model"].isin(["phase1", "phase2", "b/phase1", "b/phase2"]), "temperature"]]
    # Only the blend changes: the members' probabilities come from the cache.
    caplog.set_level(logging.INFO)
    assert submit(base, MODELS, "submit.blend=greedy") == 0
    assert "b/phase2 test probabilities from cache" in caplog.text
    # b retrains: a's 04 would run, naming b's stage.
    b = ["--config", "configs/demo.yaml", *base, "exp=b", "loss.name=focal"]
    assert load_script("03_retrain.py").main([*b, "retrain.epochs=2"]) == 0
    caplog.clear()
    assert submit(base, MODELS, "submit.blend=greedy", "--dry-run") == 0
    assert "04_submit: would run (changed input: b/03_retrain)" in caplog.text
    # b's pseudo-labels change: its 03 is out of date, and a's 04 refuses in one sentence naming b's stage and its config.
    assert load_script("02_pseudo_label.py").main([*b, "pseudo.threshold=0.5"]) == 0
    capsys.readouterr()
    assert submit(base, MODELS) == 2
    err = capsys.readouterr().err
    assert "b/03_retrain is out of date (changed input: 02_pseudo)" in err and "member experiment 'b'" in err, err
    assert str(out / "b" / "03_retrain" / "config.yaml") in err and err.count("\n") == 1
    # A member that does not exist: one sentence naming it, before any work.
    capsys.readouterr()
    assert submit(base, "submit.models=[phase1, zzz/phase1]") == 2
    err = capsys.readouterr().err
    assert "Member experiment 'zzz' has no finished 01_train" in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_member_on_other_folds_is_refused(two, capsys):
    base, out = two
    c = ["--config", "configs/demo.yaml", *base, "exp=c", "prepare.n_folds=3"]
    for s in STAGES[:2]:
        assert load_script(s).main(c) == 0
    capsys.readouterr()
    assert submit(base, "submit.models=[phase1, c/phase1]") == 2
    err = capsys.readouterr().err
    assert "Member c/phase1 was trained on 3 folds and this experiment on 2 folds" in err, err


@pytest.mark.slow
def test_pseudo_labels_from_two_experiments(two, tmp_path):
    import shutil

    base, out = two
    shutil.copytree(out, tmp_path / "out")
    base = [*base, f"output_root={tmp_path / 'out'}"]
    args = ["--config", "configs/demo.yaml", *base, "exp=a", "pseudo.members=[phase1, b/phase1]", "pseudo.calibrate=temperature",
            "pseudo.methods=[confidence, vote, cluster_core]", "pseudo.min_agree=1", "pseudo.purity=0.5"]
    assert load_script("02_pseudo_label.py").main(args) == 0
    folder = tmp_path / "out" / "a" / "02_pseudo"
    z = np.load(folder / "test_probs.npz")
    assert z["probs"].shape == (4, 79, 79) and z["member_of"].tolist() == [0, 0, 1, 1]
    assert [str(n) for n in z["member_names"]] == ["phase1", "b/phase1"] and z["embeddings"].shape == (1, 79, 2 * 1280)
    rec = json.loads((folder / "record.json").read_text())
    assert rec["result"]["members"] == ["phase1", "b/phase1"] and rec["result"]["models"] == 4
    assert "b/01_train" in rec["fingerprint"]["inputs"] and all(t > 0 for t in rec["result"]["temperatures"])
    # 04's phase 1 reuses 02's phase-1 rows only.
    assert load_script("04_infer_submit.py").main(["--config", "configs/demo.yaml", *base, "exp=a", "submit.models=[phase1]"]) == 0
    p1 = np.load(tmp_path / "out" / "a" / "04_submit" / "probs" / "phase1.npz")
    assert np.allclose(p1["probs"], z["probs"][:2])


def test_config_base_is_merged_under_the_file(tmp_path):
    from lib.config import ConfigError, load_config

    (tmp_path / "parent.yaml").write_text("exp: p\ntrain:\n  epochs: 7\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nexp: c\ntrain:\n  lr: 0.1\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.exp, cfg.train.epochs, cfg.train.lr) == ("c", 7, 0.1)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="names itself as a base"):
        load_config(tmp_path / "loop.yaml")
    member = load_config("configs/demo_member.yaml")
    assert (member.exp, member.loss.name, member.data.root, member.prepare.n_folds) == ("demo_focal", "focal", "input/demo", 3)


def test_make_ensemble_plans_the_stages_each_member_needs():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import train_ensemble as ensemble

    from lib.config import ConfigError, load_config

    cfg = load_config("configs/demo_ensemble.yaml")
    full = ["00_prepare_data.py", "01_train_folds.py", "02_pseudo_label.py", "03_retrain.py"]
    assert ensemble.plan(cfg) == [("configs/demo.yaml", full), ("configs/demo_member.yaml", full)]
    assert ensemble.own_stages(cfg) == ["00_prepare_data.py", "04_infer_submit.py"]
    cfg = load_config("configs/demo_ensemble.yaml", ["submit.models=[phase2, demo_focal/phase1]", "ensemble.recipes=[configs/demo_member.yaml]"])
    assert ensemble.plan(cfg) == [("configs/demo_member.yaml", full[:2])]
    assert ensemble.own_stages(cfg) == [*full, "04_infer_submit.py"]
    big = load_config("configs/fathomnet2025_ensemble.yaml")
    assert [stages for _, stages in ensemble.plan(big)] == [full, full[:2], full[:2], full[:2], full[:2]]
    with pytest.raises(ConfigError, match="which no model of submit.models"):
        ensemble.plan(load_config("configs/demo_ensemble.yaml", ["submit.models=[demo/phase1]"]))


def test_make_ensemble_passes_overrides_to_every_recipe_but_refuses_exp(capsys):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import train_ensemble

    assert train_ensemble.main(["--config", "configs/demo_ensemble.yaml", "exp=x"]) == 2
    assert "takes no exp= override" in capsys.readouterr().err
