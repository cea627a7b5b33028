"""The ablation grid's shape and the arithmetic of its summary (running it is `make ablate`)."""
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script  # tests/conftest.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import ablation as ab  # scripts/ablation.py


@pytest.mark.parametrize("quick", [False, True])
def test_grid_covers_every_group_and_reuses_the_base(quick):
    s = ab.setting(quick)
    g = ab.grid(s)
    groups = {v.group for v in g}
    assert {"loss", "context", "pseudo", "knn", "long_tail"} <= groups
    base = ab.Variant("loss", "ce", [], seed=s.seeds[0]).exp
    # Pseudo-labelling and kNN variants run in the base's folder: phase 1 is trained once for them.
    assert all(v.exp == base for v in g if v.group in ("pseudo", "knn"))
    assert all(v.stages[0] == "02_pseudo_label.py" for v in g if v.group == "pseudo")
    ce_seeds = [v.seed for v in g if v.group == "loss" and v.name == "ce"]
    assert ce_seeds == s.seeds and len(ce_seeds) >= 2
    assert len({v.exp for v in g if v.group != "pseudo" and v.group != "knn"}) == len([v for v in g if v.group not in ("pseudo", "knn")])
    if not quick:
        assert {"ce", "dwce", "focal", "balanced_softmax", "ce_expected_distance", "taxonomy_smoothing"} <= {v.name for v in g if v.group == "loss"}
        assert {"ce", "weighted_ce", "focal", "class_balanced", "balanced_softmax", "ldam", "seql"} == {v.name for v in g if v.group == "long_tail"}
        assert {"per_rank", "hierarchical_softmax", "coherent"} <= {v.name for v in g if v.group == "head"}
        ldam = next(v for v in g if v.group == "long_tail" and v.name == "ldam")
        assert "head.normalized=true" in ldam.overrides  # LDAM on its cosine classifier (the config refuses it otherwise)
        ts = {v.name: v.overrides for v in g if v.group == "loss" and v.name.startswith("taxonomy_smoothing")}
        assert "loss.ts_distance=metric" in ts["taxonomy_smoothing"] and "loss.ts_distance=lca" in ts["taxonomy_smoothing lca"]
        assert any("pseudo.rounds=3" in v.overrides for v in g)


def test_overrides_put_each_variant_in_its_own_folder():
    s = ab.setting(True)
    v = ab.grid(s)[0]
    args = ab.overrides_of(s, v, "configs/demo.yaml", "output/ablate_quick")
    assert args[:2] == ["--config", "configs/demo.yaml"] and f"exp={v.exp}" in args and f"seed={v.seed}" in args
    assert args.index(f"exp={v.exp}") < args.index(v.overrides[0])  # the variant's own settings come last and win


def test_summarize_means_and_spread_over_seeds():
    rows = [{"group": "loss", "variant": "ce", "seed": s, "cv_distance": d} for s, d in ((1, 2.0), (2, 3.0), (3, 4.0))]
    rows.append({"group": "loss", "variant": "dwce", "seed": 1, "cv_distance": 1.5})
    df = ab.summarize(rows, ["cv_distance"])
    ce = df[df["variant"] == "ce"].iloc[0]
    assert ce["seeds"] == 3 and ce["cv_distance"] == pytest.approx(3.0) and ce["cv_distance_std"] == pytest.approx(np.std([2, 3, 4]))
    assert np.isnan(df[df["variant"] == "dwce"].iloc[0]["cv_distance_std"])  # one seed: no spread claimed


def test_report_rebuilt_from_saved_measures_states_what_the_numbers_say(tmp_path):
    """--report-only rebuilds ablation.md from ablation.json; the findings are read off the rows."""
    script = load_script("scripts/ablate.py")
    rows = [{"group": "loss", "variant": "ce", "seed": s, "cv_distance": d, "oof_argmax": d, "oof_min_risk": d - 0.1,
             "test_min_risk": d + 0.2} for s, d in ((42, 2.0), (43, 2.2))]
    rows += [{"group": "loss", "variant": "dwce", "seed": 42, "cv_distance": 1.8, "test_min_risk": 2.5},
             {"group": "context", "variant": "roi+3x", "seed": 42, "cv_distance": 1.5, "test_min_risk": 1.9},
             {"group": "long_tail", "variant": "ce", "seed": 42, "cv_distance": 3.0, "val_top1_tail": 0.0},
             {"group": "long_tail", "variant": "ldam", "seed": 42, "cv_distance": 2.9, "val_top1_tail": 0.0},
             {"group": "knn", "variant": "kNN min_risk (chosen by CV)", "seed": 42, "cv_distance": 2.6, "test_distance": 2.7}]
    nov = [{"group": "novelty", "variant": "energy", "auroc": 0.75}]
    saved = tmp_path / "report" / "ablation_quick.json"
    saved.parent.mkdir()
    ab.write_json(saved, {"rows": rows, "extra": [], "nov": nov, "minutes": 7.5})
    d = ab.read_json(saved)
    md = script.report(d["rows"], d["extra"], d["nov"], ab.setting(True), d["minutes"], tmp_path / "report")
    assert "Grid run in 7.5 min" in md
    assert "`dwce` (1.800; ce 2.100, whose spread over seeds is ± 0.100)" in md
    assert "Min-risk decoding against argmax (ce, out of fold): 2.000 against 2.100." in md
    assert "no loss classified a single tail-class validation crop right" in md
    assert "the lowest CV distance is `ldam` (2.900; ce 3.000)" in md
    assert "ROI + 3x context against ROI only (ce): CV 1.500 against 2.100." in md
    assert "energy 0.750 (0.5 is chance)" in md
    assert "| kNN min_risk (chosen by CV) | 1 | 2.600 | 2.700 |" in md  # no CV top-1 given: the column is left out
    assert (tmp_path / "report" / "ablation_quick.png").is_file()


def test_single_rows_are_named_group_slash_name(tmp_path):
    """`ablate.py --variants` reruns single rows; an unknown name stops with the list of names."""
    import ablate

    with pytest.raises(SystemExit, match="no grid row head/nope; name rows as group/name"):
        ablate.run_rows(ab.setting(False), "configs/demo.yaml", str(tmp_path), tmp_path, ["head/nope"])
