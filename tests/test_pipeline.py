"""A smoke run of every stage on a tiny demo, then the rerun decisions a user relies on."""
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.demo.__main__ import main as demo_main

from conftest import load_script  # tests/conftest.py

pytestmark = pytest.mark.slow  # end-to-end stage runs (make test-fast leaves them out)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["00_prepare_data.py", "01_train_folds.py", "02_pseudo_label.py", "03_retrain.py", "04_infer_submit.py", "knn_baseline.py"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Generate a tiny dataset and run every stage once; yields the overrides and the output folder."""
    tmp = tmp_path_factory.mktemp("tiny")
    overrides = [
        f"data.root={tmp / 'data'}", f"output_root={tmp / 'out'}", "exp=tiny",
        "demo.per_class=3", "demo.test_per_class=1", "demo.frame_width=160", "demo.frame_height=120",
        "prepare.n_folds=2", "prepare.crop_size=32", "prepare.workers=1", "prepare.context_scales=[3]", "prepare.context_full=true",
        "model.img_size=32", "knn.img_size=32", "train.epochs=1", "train.batch_size=64", "pseudo.threshold=0.0",
    ]
    assert demo_main(["--config", "configs/demo.yaml", *overrides]) == 0
    for s in SCRIPTS:
        assert load_script(s).main(["--config", "configs/demo.yaml", *overrides]) == 0, s
    return overrides, tmp / "out" / "tiny", tmp / "data"


def test_prepare_artifacts(tiny):
    _, out, _ = tiny
    rois = pd.read_csv(out / "00_prepare" / "rois.csv")
    train = rois[rois["split"] == "train"]
    assert len(train) == 79 * 3 and set(train["fold"]) == {0, 1}
    # No frame is split across folds.
    assert train.groupby("image_id")["fold"].nunique().max() == 1
    assert (rois[rois["split"] == "test"]["fold"] == -1).all()
    assert all((out / "00_prepare" / p).is_file() for p in rois["crop_path"])
    assert (out / "00_prepare" / "taxonomy.json").is_file() and (out / "00_prepare" / "rejects.csv").is_file()


def test_training_artifacts(tiny):
    _, out, _ = tiny
    for phase in ("01_train", "03_retrain"):
        for k in (0, 1):
            d = out / phase / f"fold_{k}"
            for f in ("best.pt", "last.pt", "oof.npz", "history.csv", "curves.png", "record.json"):
                assert (d / f).is_file(), d / f
            oof = np.load(d / "oof.npz")
            assert oof["probs"].shape == (len(oof["label"]), 79)
            assert oof["embeddings"].shape == (len(oof["label"]), 1280)  # the backbone's pooled features
            hist = pd.read_csv(d / "history.csv")
            assert {"val_acc_phylum", "val_acc_species", "val_top1_head", "val_top1_tail", "lr"} <= set(hist.columns)
            assert np.allclose(oof["probs"].sum(1), 1, atol=1e-4)
    import json

    rec = json.loads((out / "01_train" / "record.json").read_text())
    assert 0 <= rec["result"]["cv_distance"] <= 12 and rec["result"]["oof_rows"] == 79 * 3
    assert rec["result"]["fold_distance_std"] >= 0 and 0 <= rec["result"]["fold_distance_mean"] <= 12


def test_pseudo_labels_and_retrain_use_them(tiny):
    _, out, _ = tiny
    pseudo = pd.read_csv(out / "02_pseudo" / "pseudo_labels.csv")
    assert len(pseudo) == 79  # threshold 0: every test ROI
    assert set(pseudo.columns) >= {"annotation_id", "label", "concept_name", "weight", "source"}
    import json

    rec = json.loads((out / "03_retrain" / "record.json").read_text())
    assert rec["result"]["pseudo_rows"] == 79
    # Pseudo rows join training folds only: the phase-2 OOF covers exactly the train ROIs.
    assert rec["result"]["oof_rows"] == 79 * 3


def _copy_run(tiny, tmp_path):
    """The tiny run's outputs copied aside, with overrides pointing at the copy (tests that change settings)."""
    import shutil

    overrides, out, _ = tiny
    shutil.copytree(out, tmp_path / "out" / "tiny")
    return [*overrides, f"output_root={tmp_path / 'out'}"], tmp_path / "out" / "tiny"


def test_pseudo_sources_gmu_and_umap(tiny, tmp_path):
    """02 with all three selections: per-model probabilities and embeddings, GMU, sources, the map and the precision summary."""
    overrides, out = _copy_run(tiny, tmp_path)
    args = ["--config", "configs/demo.yaml", *overrides, "pseudo.methods=[confidence, vote, cluster_core]", "pseudo.threshold=0.0",
            "pseudo.min_agree=1", "pseudo.u_floor=0.0", "pseudo.purity=0.5", "tta.views=[identity, hflip]"]
    assert load_script("02_pseudo_label.py").main(args) == 0
    z = np.load(out / "02_pseudo" / "test_probs.npz")
    assert z["probs"].shape == (2, 79, 79) and z["embeddings"].shape == (2, 79, 1280)
    assert np.allclose(z["mean"], z["probs"].mean(0)) and z["gmu"].shape == z["u"].shape == (79,)
    assert ((z["u"] >= 0) & (z["u"] <= z["mean"].max(1) + 1e-6)).all()  # U = mu_max (1 - exp(-GMU)) <= mu_max
    pseudo = pd.read_csv(out / "02_pseudo" / "pseudo_labels.csv")
    assert len(pseudo) == 79 and pseudo["annotation_id"].is_unique  # threshold 0 and min_agree 1: every ROI, once
    sources = set("+".join(pseudo["source"]).split("+"))
    assert {"confidence", "vote"} <= sources
    assert (out / "02_pseudo" / "umap.png").is_file()
    summary = (out / "02_pseudo" / "summary.md").read_text()
    assert "confidence" in summary and "precision" not in summary  # the stage never reads the truth
    from lib.config import load_config
    from lib.report.summary import pseudo_precision

    prec = pseudo_precision(load_config("configs/demo.yaml", overrides), out / "02_pseudo")  # the report does
    assert prec is not None and 0.0 <= prec["overall"] <= 1.0 and {"confidence", "vote"} <= set(prec["by_source"])


def test_rounds_reuse_earlier_rounds(tiny, tmp_path, caplog):
    """pseudo.rounds 1 -> 2 trains only round 2, from round 1's ensemble; 04 then blends round 2's folds."""
    import json

    from lib.config import load_config
    from lib.pipeline import graph

    overrides, out = _copy_run(tiny, tmp_path)
    caplog.set_level(logging.INFO)
    assert load_script("03_retrain.py").main(["--config", "configs/demo.yaml", *overrides, "pseudo.rounds=2"]) == 0
    assert "03_retrain/fold_0: up to date" in caplog.text and "03_retrain/round_2/fold_0: running" in caplog.text
    assert (out / "03_retrain" / "round_2" / "pseudo" / "pseudo_labels.csv").is_file()
    rec = json.loads((out / "03_retrain" / "record.json").read_text())["result"]
    assert rec["rounds"] == 2 and rec["fold_root"] == "round_2" and len(rec["per_round"]) == 2
    assert rec["oof_rows"] == 79 * 3  # pseudo rows never reach validation
    cfg = load_config("configs/demo.yaml", [*overrides, "pseudo.rounds=2"])
    assert graph.fold_dirs(cfg, "03_retrain") == [out / "03_retrain" / "round_2" / f"fold_{k}" for k in (0, 1)]
    caplog.clear()
    assert load_script("03_retrain.py").main(["--config", "configs/demo.yaml", *overrides, "pseudo.rounds=2"]) == 0
    assert "03_retrain: up to date" in caplog.text
    # Every round can enter the blend as its own model.
    args = ["--config", "configs/demo.yaml", *overrides, "pseudo.rounds=2", "submit.models=[phase1, round1, round2]", "submit.blend=cv",
            "submit.pick=settings"]
    assert load_script("04_infer_submit.py").main(args) == 0
    options = pd.read_csv(out / "04_submit" / "options.csv")
    alone = options[(options["frame_context"] == "none") & (options["test_prior"] == "none")]  # each ROI alone, as predicted
    assert alone["model"].tolist()[:3] == ["phase1", "round1", "round2"] and "blend cv" in options["model"].tolist()
    assert json.loads((out / "04_submit" / "record.json").read_text())["result"]["option"] == "blend cv"  # the settings' option


def test_pseudo_rows_only_join_training_folds():
    from lib.engine.folds import fold_splits

    rois = pd.DataFrame({"split": ["train"] * 6 + ["test"] * 2, "ok": 1, "annotation_id": range(8), "label": [0, 1, 0, 1, 0, 1, -1, -1],
                         "fold": [0, 0, 1, 1, 2, 2, -1, -1], "crop_path": [f"c{i}" for i in range(8)]})
    extra = pd.DataFrame({"annotation_id": [6, 7], "crop_path": ["c6", "c7"], "label": [1, 0], "weight": [0.9, 0.5]})
    for split in fold_splits(rois, [0, 1, 2], extra):
        assert not set(split.val["crop_path"]) & {"c6", "c7"}
        assert {"c6", "c7"} <= set(split.train["crop_path"])
        assert split.train.loc[split.train["crop_path"] == "c7", "weight"].item() == 0.5


def test_submissions_have_one_row_per_test_annotation(tiny):
    _, out, data = tiny
    import json

    test_ids = sorted(a["id"] for a in json.loads((data / "dataset_test.json").read_text())["annotations"])
    names = set(pd.read_csv(ROOT / "configs/taxonomy/fathomnet2025.csv")["concept_name"])
    for sub_path in (out / "04_submit" / "submission.csv", out / "knn" / "submission.csv"):
        sub = pd.read_csv(sub_path)
        assert list(sub.columns) == ["annotation_id", "concept_name"]
        assert sorted(sub["annotation_id"]) == test_ids
        assert set(sub["concept_name"]) <= names
    assert (out / "04_submit" / "probs" / "phase1.npz").is_file() and (out / "04_submit" / "report.md").is_file()


def test_rerun_is_up_to_date(tiny, caplog):
    overrides, _, _ = tiny
    caplog.set_level(logging.INFO)
    for s in SCRIPTS:
        assert load_script(s).main(["--config", "configs/demo.yaml", *overrides]) == 0
    ups = [r.getMessage() for r in caplog.records if "up to date" in r.getMessage()]
    assert len(ups) == len(SCRIPTS), caplog.text
    assert "running" not in caplog.text


def test_truth_never_decides_a_rerun(tiny, caplog):
    """Hiding or restoring solution.csv beside the data leaves every stage up to date; only the report changes."""
    import json

    from lib.config import load_config
    from lib.report.summary import summary

    overrides, out, data = tiny
    caplog.set_level(logging.INFO)
    records = {p: p.read_bytes() for p in out.rglob("record.json")}
    solution, hidden = data / "solution.csv", data / "solution.csv.hidden"
    solution.rename(hidden)
    try:
        for s in SCRIPTS:
            assert load_script(s).main(["--config", "configs/demo.yaml", *overrides]) == 0
        assert not any("scored against" in line for line in summary(load_config("configs/demo.yaml", overrides)))
    finally:
        hidden.rename(solution)
    for s in SCRIPTS:
        assert load_script(s).main(["--config", "configs/demo.yaml", *overrides]) == 0
    assert "running" not in caplog.text, caplog.text
    assert len([r for r in caplog.records if "up to date" in r.getMessage()]) == 2 * len(SCRIPTS)
    assert {p: p.read_bytes() for p in out.rglob("record.json")} == records
    assert "precision" not in json.loads((out / "02_pseudo" / "record.json").read_text())["result"]
    lines = summary(load_config("configs/demo.yaml", overrides))
    assert any(f"scored against {solution}" in line for line in lines)


def test_dry_run_names_the_changed_key_and_only_downstream(tiny, caplog):
    overrides, _, _ = tiny
    caplog.set_level(logging.INFO)
    load_script("00_prepare_data.py").main(["--config", "configs/demo.yaml", "--dry-run", *overrides, "train.epochs=2"])
    load_script("01_train_folds.py").main(["--config", "configs/demo.yaml", "--dry-run", *overrides, "train.epochs=2"])
    load_script("knn_baseline.py").main(["--config", "configs/demo.yaml", "--dry-run", *overrides, "train.epochs=2"])
    text = caplog.text
    assert "00_prepare: up to date" in text and "knn: up to date" in text
    assert "01_train: would run (changed: train.epochs 1 -> 2)" in text


def test_blend_only_change_reuses_cached_probs(tiny, caplog):
    overrides, out, _ = tiny
    caplog.set_level(logging.INFO)
    assert load_script("04_infer_submit.py").main(["--config", "configs/demo.yaml", *overrides, "submit.decode=min_risk"]) == 0  # not the default
    assert "phase1 test probabilities from cache" in caplog.text
    assert "phase2 test probabilities from cache" in caplog.text


def test_frame_context_in_04_and_02(tiny, tmp_path, monkeypatch):
    """submit.frame_context=stack: options.csv holds every option without and with it (test columns too), report.md its
    section, the record its parameters; a rerun changing only submit.decode refits only the greedy blend's (its weights
    read the decoding); pseudo.frame_context=stack: 02 records each member's parameters."""
    import json

    import lib.decide.frame_context as fc

    overrides, out = _copy_run(tiny, tmp_path)
    args = ["--config", "configs/demo.yaml", *overrides, "submit.frame_context=stack", "submit.pick=settings"]
    assert load_script("04_infer_submit.py").main(args) == 0
    options = pd.read_csv(out / "04_submit" / "options.csv")
    assert set(options["frame_context"]) == {"none", "stack"} and options["test_min_risk"].notna().all()
    report = (out / "04_submit" / "report.md").read_text()
    assert "## Frame context" in report and "Label-only oracle" in report and "| stack (b " in report
    result = json.loads((out / "04_submit" / "record.json").read_text())["result"]
    assert result["frame_context"] == "stack" and set(result["frame_params"]) == {"b", "eps", "buckets"}
    calls = []
    real = fc.fit

    def counted_fit(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fc, "fit", counted_fit)
    assert load_script("04_infer_submit.py").main([*args, "submit.decode=min_risk"]) == 0
    assert len(calls) <= 4 * (1 + 2)  # the greedy blend under each calibration, whole and per nested fold
    assert load_script("02_pseudo_label.py").main(["--config", "configs/demo.yaml", *overrides, "pseudo.frame_context=stack"]) == 0
    pseudo = json.loads((out / "02_pseudo" / "record.json").read_text())["result"]
    assert len(pseudo["frame_params"]) == 1 and len(pseudo["frame_params"][0]) == 2


def _fold_setup(tiny, tmp_path, *extra):
    overrides, out, _ = tiny
    from lib.config import load_config
    from lib.data.artifacts import load_rois
    from lib.data.taxonomy import load_taxonomy_json
    from lib.engine.folds import fold_splits

    cfg = load_config("configs/demo.yaml", [*overrides, *extra])
    prep = out / "00_prepare"
    rois, tax = load_rois(prep), load_taxonomy_json(prep / "taxonomy.json")
    return cfg, fold_splits(rois, [0])[0], tax


def test_resume_after_a_kill_gives_the_same_weights(tiny, tmp_path, caplog):
    """A fold killed after epoch 1 of 2 resumes from last.pt and ends with the uninterrupted run's weights."""
    import torch

    from lib.engine.train import fit_fold
    from lib.pipeline.records import Stage

    cfg, split, tax = _fold_setup(tiny, tmp_path, "train.ema_decay=0.5")
    whole = Stage.create("a/fold_0", tmp_path / "a", cfg, ["train"], ROOT / "01_train_folds.py", {})
    fit_fold(cfg, split, tax, whole, epochs=2)
    killed = Stage.create("b/fold_0", tmp_path / "b", cfg, ["train"], ROOT / "01_train_folds.py", {})
    assert fit_fold(cfg, split, tax, killed, epochs=2, stop_after=1) is None  # stopped as a kill would
    caplog.set_level(logging.INFO)
    fit_fold(cfg, split, tax, killed, epochs=2)
    assert "resuming at epoch 2/2" in caplog.text
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert set(a) == {"model", "optimizer", "epoch", "best", "history", "digest", "ema"}  # fp32 on the CPU: no scaler
    assert a["history"][0]["val_distance"] == b["history"][0]["val_distance"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    h = pd.read_csv(tmp_path / "b" / "history.csv")
    assert list(h["epoch"]) == [1, 2]


def test_fp16_with_a_grad_scaler_resumes_exactly(tiny, tmp_path, monkeypatch, caplog):
    """fp16 as a T4 gets it (autocast + GradScaler, clipping on unscaled gradients), simulated with the CPU's fp16
    autocast: last.pt keeps the scaler's state, and a run killed after epoch 1 resumes to the uninterrupted run's weights."""
    import torch

    import lib.engine.inference as inference_mod
    import lib.engine.train as train_mod
    from lib.pipeline.records import Stage

    for mod in (train_mod, inference_mod):  # the policy a compute capability 7.5 GPU gets, here on the CPU
        monkeypatch.setattr(mod, "precision_policy", lambda device, requested="auto": ("fp16", "simulated T4"))
    cfg, split, tax = _fold_setup(tiny, tmp_path, "train.precision=fp16", "train.clip_grad=1.0", "train.ema_decay=0.5",
                                  "train.batch_size=8")
    split = split.__class__(split.fold, split.train.iloc[:24], split.val.iloc[:8])  # the CPU's fp16 kernels are slow
    whole = Stage.create("f/fold_0", tmp_path / "f", cfg, ["train"], ROOT / "01_train_folds.py", {})
    train_mod.fit_fold(cfg, split, tax, whole, epochs=2)
    killed = Stage.create("g/fold_0", tmp_path / "g", cfg, ["train"], ROOT / "01_train_folds.py", {})
    assert train_mod.fit_fold(cfg, split, tax, killed, epochs=2, stop_after=1) is None
    caplog.set_level(logging.INFO)
    train_mod.fit_fold(cfg, split, tax, killed, epochs=2)
    assert "resuming at epoch 2/2" in caplog.text
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (tmp_path / "f", tmp_path / "g"))
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    steps = [int(v["step"]) for v in a["optimizer"]["state"].values()]
    assert steps and max(steps) >= 1  # not every step was skipped for inf gradients
    assert np.isfinite([h["train_loss"] for h in a["history"]]).all()
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_early_stopping_keeps_the_best_epoch(tiny, tmp_path, monkeypatch, caplog):
    """With patience 1, a run whose val distance only worsens stops after 2 epochs and keeps epoch 1."""
    import lib.engine.train as train_mod
    from lib.pipeline.records import Stage

    cfg, split, tax = _fold_setup(tiny, tmp_path, "train.patience=1")
    scores = iter([3.0, 4.0, 5.0, 6.0])

    def fake_evaluate(probs, labels, dist):
        return {"val_distance": next(scores), "val_top1": 0.0}

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    caplog.set_level(logging.INFO)
    st = Stage.create("c/fold_0", tmp_path / "c", cfg, ["train"], ROOT / "01_train_folds.py", {})
    result = train_mod.fit_fold(cfg, split.__class__(split.fold, split.train, split.val.drop(columns="testlike_path")), tax, st, epochs=4)
    assert result is not None  # None only for a stop_after run or a rank but 0
    assert result.best_epoch == 1 and result.val_distance == 3.0
    assert "early stop after epoch 2" in caplog.text
    assert len(pd.read_csv(tmp_path / "c" / "history.csv")) == 2


def test_starting_over_is_a_bounded_loop(tiny, tmp_path, monkeypatch, caplog):
    """A last.pt that does not fit the model: the fold trains afresh. Best files lost after a complete run: one
    fresh run, and lost again right after it: a StageError, never a third pass."""
    import torch

    import lib.engine.train as train_mod
    from lib.core.errors import StageError
    from lib.pipeline.records import Stage

    cfg, split, tax = _fold_setup(tiny, tmp_path)
    st = Stage.create("r/fold_0", tmp_path / "r", cfg, ["train"], ROOT / "01_train_folds.py", {})
    st.dir.mkdir(parents=True)
    torch.save({"model": {"nope": torch.zeros(1)}, "optimizer": {}, "epoch": 0, "best": {}, "history": [], "digest": st.digest},
               st.dir / "last.pt")
    caplog.set_level(logging.INFO)
    first = train_mod.fit_fold(cfg, split, tax, st, epochs=1)
    assert first is not None and first.best_epoch == 1
    assert f"ignoring checkpoint {st.dir / 'last.pt'}" in caplog.text
    set_ups: list[int] = []
    real = train_mod.build_kit

    def counted_build_kit(*a):
        set_ups.append(1)
        return real(*a)

    monkeypatch.setattr(train_mod, "build_kit", counted_build_kit)
    monkeypatch.setattr(train_mod, "best_files_problem", lambda out, epoch: f"{out / 'best.pt'} vanished")
    with pytest.raises(StageError, match="vanished right after training it"):
        train_mod.fit_fold(cfg, split, tax, st, epochs=1)
    assert "vanished; training r/fold_0 again from scratch" in caplog.text and len(set_ups) == 2


def test_user_errors_are_one_line(tiny, capsys):
    overrides, _, _ = tiny
    assert load_script("01_train_folds.py").main(["--config", "configs/demo.yaml", *overrides, "train.epoch=2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: Unknown config key 'train.epoch'; did you mean 'train.epochs'?"
    assert load_script("02_pseudo_label.py").main(["--config", "configs/demo.yaml", *overrides, "exp=never_run"]) == 2
    assert "00_prepare/record.json is missing; run 00_prepare_data.py first." in capsys.readouterr().err.replace("\\", "/")
    # A downstream stage refuses to run on an upstream that is stale under the current config.
    assert load_script("02_pseudo_label.py").main(["--config", "configs/demo.yaml", *overrides, "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "01_train is out of date (changed: train.epochs 1 -> 2); run 01_train_folds.py first" in err


@pytest.mark.parametrize("head", ["linear", "mlp", "multi", "per_rank", "two_level", "hierarchical_softmax", "conditional"])
def test_every_head_trains_and_predicts(tiny, tmp_path, head):
    """One epoch of each head through the trainer, then its checkpoint back through inference."""
    import torch

    from lib.engine.folds import FOLD_OUTPUTS
    from lib.engine.inference import predict_folds_tta
    from lib.engine.train import fit_fold
    from lib.pipeline.records import Stage

    cfg, split, tax = _fold_setup(tiny, tmp_path, f"head.name={head}", "head.hidden=32", "head.n_heads=3")
    st = Stage.create("h/fold_0", tmp_path / "fold_0", cfg, ["head"], ROOT / "01_train_folds.py", {}, FOLD_OUTPUTS)
    result = fit_fold(cfg, split, tax, st, epochs=1)
    assert result is not None
    st.finish(result.to_record(), 0.0)  # its record vouches for best.pt, which inference checks at load
    assert 0 <= result.val_distance <= 12
    probs = predict_folds_tta([tmp_path / "fold_0"], split.val["crop_path"].tolist()[:5], cfg, tax, torch.device("cpu"))["probs"]
    assert probs.shape == (1, 5, 79) and np.allclose(probs.sum(-1), 1, atol=1e-4)


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_context_views_train_and_predict(tiny, tmp_path, fusion):
    """A model reading the ROI, its 3x context and the frame trains, validates (test-like view too) and predicts."""
    import torch

    from lib.data.context import model_inputs
    from lib.engine.folds import FOLD_OUTPUTS
    from lib.engine.inference import predict_folds_tta
    from lib.engine.train import fit_fold
    from lib.pipeline.records import Stage

    cfg, split, tax = _fold_setup(tiny, tmp_path, "model.context=[1, 3, full]", f"model.fusion={fusion}")
    st = Stage.create("c/fold_0", tmp_path / "fold_0", cfg, ["model"], ROOT / "01_train_folds.py", {}, FOLD_OUTPUTS)
    result = fit_fold(cfg, split, tax, st, epochs=1)
    assert result is not None
    st.finish(result.to_record(), 0.0)  # its record vouches for best.pt, which inference checks at load
    assert 0 <= result.val_distance <= 12 and 0 <= result.scores["val_distance_testlike"] <= 12
    probs = predict_folds_tta([tmp_path / "fold_0"], model_inputs(split.val.head(5), cfg.model.context), cfg, tax,
                              torch.device("cpu"))["probs"]
    assert probs.shape == (1, 5, 79) and np.allclose(probs.sum(-1), 1, atol=1e-4)


@pytest.mark.parametrize("extra", [
    ("augment.mixup_alpha=0.4", "augment.mix_prob=1.0"),
    ("augment.cutmix_alpha=1.0", "train.sampler=class_balanced", "loss.name=dwce"),
    ("augment.mixup_alpha=0.4", "augment.mix_same_leaf=true", "head.name=per_rank", "train.sampler=sqrt"),
])
def test_mixing_and_samplers_train(tiny, tmp_path, extra):
    from lib.engine.train import fit_fold
    from lib.pipeline.records import Stage

    cfg, split, tax = _fold_setup(tiny, tmp_path, *extra)
    st = Stage.create("m/fold_0", tmp_path / "fold_0", cfg, ["augment"], ROOT / "01_train_folds.py", {})
    result = fit_fold(cfg, split, tax, st, epochs=1)
    assert result is not None
    assert 0 <= result.val_distance <= 12 and np.isfinite(pd.read_csv(tmp_path / "fold_0" / "history.csv")["train_loss"]).all()


@pytest.mark.parametrize("extra", [
    ("head.name=linear",),
    ("head.name=per_rank", "augment.mixup_alpha=0.4", "augment.mix_prob=1.0", "train.sampler=class_balanced", "train.num_workers=1"),
])
def test_frame_attention_trains_validates_and_predicts_whole_frames(tiny, tmp_path, extra, caplog):
    """model.frame_context=attention: one epoch of whole-frame batches (mixing within frames, frames drawn by class weight,
    loader workers), validation over whole frames, and the checkpoint (frame attention included) back through inference."""
    import logging

    import torch

    from lib.data.context import frame_ids, model_inputs
    from lib.engine.folds import FOLD_OUTPUTS
    from lib.engine.inference import predict_folds_tta
    from lib.engine.train import fit_fold
    from lib.model.checkpoint import load_checkpoint
    from lib.pipeline.records import Stage

    cfg, split, tax = _fold_setup(tiny, tmp_path, "model.frame_context=attention", "train.batch_size=16", *extra)
    st = Stage.create("f/fold_0", tmp_path / "fold_0", cfg, ["model"], ROOT / "01_train_folds.py", {}, FOLD_OUTPUTS)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result = fit_fold(cfg, split, tax, st, epochs=1)
    assert result is not None
    st.finish(result.to_record(), 0.0)
    assert 0 <= result.val_distance <= 12 and "frame attention: " in caplog.text
    assert ("draws whole frames, each with the mean of its rows' weights" in caplog.text) == ("train.sampler=class_balanced" in extra)
    state = load_checkpoint(tmp_path / "fold_0" / "best.pt")["model"]
    assert any(k.startswith("frame_attention.blocks.0.") for k in state)
    assert state["frame_attention.blocks.0.proj.weight"].abs().sum() > 0  # it learned from zero
    val = split.val.head(12)
    got = predict_folds_tta([tmp_path / "fold_0"], model_inputs(val, cfg.model.context), cfg, tax, torch.device("cpu"),
                            frames=frame_ids(val))["probs"]
    assert got.shape == (1, 12, 79) and np.allclose(got.sum(-1), 1, atol=1e-4)
    with pytest.raises(ValueError, match="give predict_folds_tta the inputs' frame ids"):
        predict_folds_tta([tmp_path / "fold_0"], model_inputs(val, cfg.model.context), cfg, tax, torch.device("cpu"))


def test_detailed_metrics_against_hand_counts():
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.metric import DEFAULT_TAXONOMY
    from lib.engine.train import detailed_metrics

    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    i = tax.index
    labels = np.array([i("Sebastes diploproa"), i("Sebastes diploproa"), i("Caridea"), i("Octopus rubescens")])
    preds = [i("Sebastes diploproa"), i("Sebastes"), i("Heterocarpus"), i("Sebastes diploproa")]
    probs = np.eye(79)[preds]
    counts = np.full(79, 50)
    counts[i("Sebastes diploproa")] = 100  # a head class
    counts[[i("Caridea"), i("Octopus rubescens")]] = 1  # tail classes
    m = detailed_metrics(probs, labels, tax, counts)
    assert m["val_acc_phylum"] == 0.75  # the octopus answered as a fish is the one phylum error
    assert m["val_acc_genus"] == pytest.approx(2 / 3)  # Caridea has no genus: only the 3 others count; the octopus misses
    assert m["val_acc_species"] == pytest.approx(1 / 3)  # species known for 3 samples (2 Sebastes d., 1 octopus); 1 right
    assert m["val_top1_head"] == 0.5 and m["val_top1_tail"] == 0.0


def test_two_process_ddp_with_gloo(tiny, tmp_path):
    """torchrun with 2 CPU processes (gloo): one fold trains with DDP, rank 0 alone writes the records."""
    import json
    import os
    import subprocess
    import sys

    overrides, out, _ = tiny
    ddp_over = [o for o in overrides if not o.startswith("exp=")] + ["exp=ddp", "prepare.n_folds=2", "train.multi_gpu=torchrun"]
    assert load_script("00_prepare_data.py").main(["--config", "configs/demo.yaml", *ddp_over]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "01_train_folds.py", "--config", "configs/demo.yaml", *ddp_over],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out.parent / "ddp" / "01_train" / "record.json").read_text())
    assert rec["result"]["folds"] == 2 and 0 <= rec["result"]["cv_distance"] <= 12
    assert r.stdout.count("01_train: CV distance") == 1  # only rank 0 reports
    assert "2 processes of 32 rows per step (global batch 64)" in r.stdout  # train.batch_size is the global batch
    # 03 with two self-training rounds: rank 0 pseudo-labels round 2 while rank 1 waits, then both train it.
    assert load_script("02_pseudo_label.py").main(["--config", "configs/demo.yaml", *ddp_over]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "03_retrain.py", "--config", "configs/demo.yaml", *ddp_over, "pseudo.rounds=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out.parent / "ddp" / "03_retrain" / "record.json").read_text())
    assert len(rec["result"]["per_round"]) == 2 and (out.parent / "ddp" / "03_retrain" / "round_2" / "pseudo" / "record.json").is_file()


def test_knn_scores_every_vote_and_embeds_with_fold_models(tiny):
    """The default kNN run scores the four votes and submits the best; knn.source=phase1 reads 01's fold models."""
    import json

    overrides, out, _ = tiny
    res = json.loads((out / "knn" / "record.json").read_text())["result"]
    assert set(res["votes"]) == {"flat", "hierarchical", "strict", "min_risk"}
    assert res["vote"] == min(res["votes"], key=lambda v: res["votes"][v]["cv_distance"])
    assert "| min_risk |" in (out / "knn" / "table.md").read_text()
    phase1 = [*overrides, "knn.source=phase1", "knn.index=ivf", "knn.nlist=4", "knn.vote=strict"]
    try:
        assert load_script("knn_baseline.py").main(["--config", "configs/demo.yaml", *phase1]) == 0
        res = json.loads((out / "knn" / "record.json").read_text())["result"]
        assert res["source"] == "phase1" and res["vote"] == "strict" and 0 <= res["cv_distance"] <= 12
        for k in (0, 1):
            emb = np.load(out / "knn" / f"embeddings_fold_{k}.npz")["embeddings"]
            assert emb.shape[1] == 1280 and np.isfinite(emb).all()
        assert len(pd.read_csv(out / "knn" / "submission.csv")) == 79
    finally:  # leave the default run's record for whoever reads the fixture next
        assert load_script("knn_baseline.py").main(["--config", "configs/demo.yaml", *overrides]) == 0


def _decisions(caplog) -> dict[str, str]:
    """Stage name -> its logged decision ('up to date', 'running (...)', 'would run (...)')."""
    out = {}
    for r in caplog.records:
        msg = r.getMessage()
        name, _, rest = msg.partition(": ")
        if name in {"00_prepare", "01_train", "02_pseudo", "03_retrain", "04_submit", "knn"} and \
                rest.startswith(("up to date", "running", "would run")):
            out[name] = "up to date" if rest.startswith("up to date") else rest  # its folder aside
    return out


def test_data_moved_or_touched_reruns_nothing_new_pixels_rerun_00_and_what_follows(tiny, tmp_path, caplog):
    """Inputs are digested by content: the frames copied to another folder (new mtimes, data.root elsewhere) or touched in
    place leave every stage up to date; one frame's new pixels rerun 00, and 00's new fingerprint reruns every later stage."""
    import os
    import shutil

    from PIL import Image

    overrides, out = _copy_run(tiny, tmp_path)
    for s in SCRIPTS:  # settle the copy: an earlier test may have left a stage on other settings (04 on argmax)
        assert load_script(s).main(["--config", "configs/demo.yaml", *overrides]) == 0
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(tiny[2], moved, copy_function=shutil.copy)  # shutil.copy: new mtimes, as a re-download would give
    args = ["--config", "configs/demo.yaml", *overrides, f"data.root={moved}"]
    records = {p: p.read_bytes() for p in out.rglob("record.json")}
    caplog.set_level(logging.INFO)
    for s in SCRIPTS:
        assert load_script(s).main(args) == 0
    assert set(_decisions(caplog).values()) == {"up to date"} and len(_decisions(caplog)) == len(SCRIPTS), caplog.text
    frames = sorted(moved.rglob("*.png"))
    later = frames[0].stat().st_mtime + 3600
    for f in frames:  # touched in place: new mtimes, the same bytes
        os.utime(f, (later, later))
    caplog.clear()
    for s in SCRIPTS:
        assert load_script(s).main(args) == 0
    assert set(_decisions(caplog).values()) == {"up to date"}, caplog.text
    assert {p: p.read_bytes() for p in out.rglob("record.json")} == records
    frame = sorted((moved / "train" / "images").glob("*.png"))[0]
    with Image.open(frame) as im:
        changed = im.convert("RGB")
    changed.paste((255, 0, 255), (0, 0, changed.width, changed.height // 2))
    changed.save(frame)
    caplog.clear()
    assert load_script("00_prepare_data.py").main(args) == 0
    assert _decisions(caplog)["00_prepare"] == "running (changed input: train_images)"
    caplog.clear()
    for s in SCRIPTS[1:]:
        assert load_script(s).main([*args, "--dry-run"]) == 0
    decided = _decisions(caplog)
    assert len(decided) == len(SCRIPTS) - 1 and all(d.startswith("would run") for d in decided.values()), decided
    assert decided["01_train"] == "would run (changed input: 00_prepare)"


def test_read_only_project_run_from_another_directory(tiny, tmp_path):
    """The whole pipeline (demo data, every stage, the report) from a read-only copy of the project, the working directory
    and output_root in a temp folder: relative paths resolve against the project, and nothing is written into it
    (the digest cache goes under output_root)."""
    import os
    import shutil
    import stat
    import subprocess
    import sys

    repo, work = tmp_path / "repo", tmp_path / "work"
    shutil.copytree(ROOT / "lib", repo / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", repo / "configs")
    for s in SCRIPTS:
        shutil.copy2(ROOT / s, repo / s)
    for p in [repo, *repo.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    work.mkdir()

    def tree() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns) for p in repo.rglob("*")}

    before = tree()
    overrides = [o for o in tiny[0] if not o.startswith(("data.root=", "output_root="))]
    overrides += [f"data.root={work / 'data'}", f"output_root={work / 'out'}",  # absolute: relative ones mean the project
                  "pseudo.methods=[confidence]", "tta.views=[identity]"]  # paths are the point here, not UMAP's compile time
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(repo)}
    commands = [["-m", "lib.demo"], *[[str(repo / s)] for s in SCRIPTS], ["-m", "lib.report"]]
    try:
        for cmd in commands:
            r = subprocess.run([sys.executable, *cmd, "--config", "configs/demo.yaml", *overrides], cwd=work, env=env,
                               capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
        assert "kNN baseline CV" in r.stdout
        assert len(pd.read_csv(work / "out" / "tiny" / "04_submit" / "submission.csv")) == 79
        assert (work / "out" / ".hash_cache.json").is_file()
        assert tree() == before
    finally:
        for p in [repo, *repo.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
