"""The ablation grid: what each ingredient of the pipeline is worth, measured through the stages.

Every variant is a list of config overrides run through the numbered stages into its own
`output/ablate/<variant>/` folder (records make a repeated run free, so an interrupted grid
resumes where it stopped). Variants that only change 02-04 (pseudo-labelling, rounds) run in
the folder of the base variant, so phase 1 is trained once for all of them. Decoding (argmax,
min-risk) and blends (uniform, fit) need no run of their own: 04's options.csv scores them all.

Rules: nothing is chosen on the demo's test labels; the grid is fixed in advance, CV is
reported beside the test score, and the report prints what the numbers say.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from lib.core.paths import ROOT
from lib.pipeline.records import read_record

log = logging.getLogger("pipeline")
HOLDOUT = ["Abyssocucumis abyssorum", "Chorilia longipes", "Heteropolypus ritteri", "Metridium farcimen", "Pandalus platyceros",
           "Psathyrometra fragilis", "Scotoplanes globosa"]
RANK_KEYS = ["val_acc_phylum", "val_acc_class", "val_acc_order", "val_acc_family", "val_acc_genus", "val_acc_species"]


@dataclass
class Variant:
    """One row of the grid: a group, a name, config overrides and the stages it runs."""

    group: str
    name: str
    overrides: list[str]
    stages: tuple[str, ...] = ("00_prepare_data.py", "01_train_folds.py", "04_infer_submit.py")
    seed: int = 42
    folder: str = ""  # the exp folder; default: the variant's own
    dataset: str = "base"

    @property
    def exp(self) -> str:
        return self.folder or f"{self.group}_{self.name}_s{self.seed}".replace(" ", "_").replace("+", "_")


@dataclass
class Setting:
    """The grid's scale: the base overrides for every run and which variants take part."""

    base: list[str]
    seeds: list[int]
    datasets: dict[str, list[str]] = field(default_factory=dict)  # name -> demo data overrides (data.root, demo.*)
    quick: bool = False


def setting(quick: bool) -> Setting:
    """Full: the demo data, 3 folds, 3 epochs, 64 px (about 45 min on 2 free cores). Quick: 8 per class, 2 folds, 3 epochs, 48 px."""
    if quick:
        base = ["demo.per_class=8", "demo.test_per_class=2", "prepare.n_folds=2", "prepare.crop_size=64", "model.img_size=48",
                "knn.img_size=48", "train.epochs=3", "pseudo.threshold=0.5"]
        return Setting(base=base, seeds=[42, 43], quick=True,
                       datasets={"base": ["data.root=input/ablate_quick"],
                                 "long_tail": ["data.root=input/ablate_quick_lt", "demo.long_tail=true", "demo.imbalance_factor=10"]})
    return Setting(base=["train.epochs=3"], seeds=[42, 43, 44],
                   datasets={"base": ["data.root=input/demo"],
                             "long_tail": ["data.root=input/demo_lt", "demo.long_tail=true", "demo.imbalance_factor=100", "demo.per_class=24"]})


def grid(s: Setting) -> list[Variant]:
    """The fixed grid (see the module docstring); `quick` keeps one of each kind."""
    p1 = ("00_prepare_data.py", "01_train_folds.py", "04_infer_submit.py")
    phase1_only = ["submit.models=[phase1]"]
    out: list[Variant] = []
    losses = ["ce", "dwce", "ce_expected_distance"] if s.quick else ["ce", "dwce", "focal", "balanced_softmax", "ce_expected_distance",
                                                                      "taxonomy_smoothing"]
    for loss in losses:
        extra = {"focal": ["loss.focal_class_weights=true", "loss.beta=0.999"],
                 "taxonomy_smoothing": ["loss.ts_distance=metric"]}.get(loss, [])
        for seed in (s.seeds if loss in ("ce", "dwce") or not s.quick else s.seeds[:1]):
            if not s.quick and loss not in ("ce", "dwce") and seed != s.seeds[0]:
                continue  # 3 seeds for ce and dwce, one for the others: the spread of ce says how far a single run can be trusted
            out.append(Variant("loss", loss, [f"loss.name={loss}", *extra, *phase1_only], p1, seed))
    if not s.quick:  # taxonomy smoothing by linnaeus' LCA distance beside the metric's (loss.ts_distance)
        out.append(Variant("loss", "taxonomy_smoothing lca", ["loss.name=taxonomy_smoothing", "loss.ts_distance=lca", *phase1_only], p1))
    for head in ([] if s.quick else ["per_rank", "hierarchical_softmax", "coherent"]):
        out.append(Variant("head", head, [f"head.name={head}", *phase1_only], p1))
    out.append(Variant("context", "roi+3x", ["model.context=[1, 3]", "model.fusion=attention", *phase1_only], p1))
    out += model_ingredients(s, p1, phase1_only)
    # Pseudo-labelling on the base (ce, first seed): 02 -> 03 -> 04 in its folder, 01 reused.
    base_folder = Variant("loss", "ce", [], seed=s.seeds[0]).exp
    post = ("02_pseudo_label.py", "03_retrain.py", "04_infer_submit.py")
    methods = {"confidence": "[confidence]", "vote+gmu": "[vote]", "cluster_core": "[cluster_core]",
               "all three": "[confidence, vote, cluster_core]"}
    for name, m in methods.items():
        if s.quick and name not in ("confidence", "all three"):
            continue
        out.append(Variant("pseudo", name, ["loss.name=ce", f"pseudo.methods={m}"], post, s.seeds[0], base_folder))
    if not s.quick:
        out.append(Variant("pseudo", "all three, 3 rounds", ["loss.name=ce", f"pseudo.methods={methods['all three']}", "pseudo.rounds=3"],
                           post, s.seeds[0], base_folder))
    out.append(Variant("knn", "backbone", ["loss.name=ce"], ("knn_baseline.py",), s.seeds[0], base_folder))
    # Novelty: species held out of train (every 5th species of the taxonomy, fixed in advance), present in test.
    out.append(Variant("novelty", "two_level", [f"prepare.holdout=[{', '.join(HOLDOUT)}]", "head.name=two_level", *phase1_only], p1))
    lt_losses = ["ce", "balanced_softmax"] if s.quick else ["ce", "weighted_ce", "focal", "class_balanced", "balanced_softmax", "ldam", "seql"]
    for loss in lt_losses:
        extra = {"focal": ["loss.focal_class_weights=true", "loss.beta=0.999"], "class_balanced": ["loss.beta=0.999"],
                 "ldam": ["loss.drw_start_epoch=2", "head.normalized=true"]}.get(loss, [])  # LDAM on its cosine classifier
        out.append(Variant("long_tail", loss, [f"loss.name={loss}", *extra, *phase1_only], p1, dataset="long_tail"))
    return out


# ----------------------------------------------------------------------------- running


def model_ingredients(s: Setting, p1: tuple[str, ...], phase1_only: list[str]) -> list[Variant]:
    """Issue 28's rows, every seed, loss ce as the base: layer decay; three views through one backbone pooled (attention) or
    read token by token (cross_attention); the ROI and the frame through two backbones, the frame's at twice the size, gated."""
    ce = ["loss.name=ce", *phase1_only]
    views = ["model.context=[1, 3, full]"]
    two = ["model.context=[1, full]"]
    side = 2 * (48 if s.quick else 64)
    stream = f"model.view_backbones=[{{views: [full], backbone: tf_efficientnet_lite0, pretrained: pypi_lite0, img_size: {side}}}]"
    rows = [("layer_decay 0.7", ["train.layer_decay=0.7"]),
            ("frame_resample 1.0", ["augment.frame_resample=1.0"]),
            ("roi+3x+full attention", [*views, "model.fusion=attention"]),
            ("roi+3x+full cross_attention", [*views, "model.fusion=cross_attention", "model.fusion_blocks=2"]),
            ("roi+3x+full cross_attention w256", [*views, "model.fusion=cross_attention", "model.fusion_blocks=2", "model.fusion_width=256"]),
            ("roi+full attention", [*two, "model.fusion=attention"]),
            ("roi+full entropy_gate", [*two, "model.fusion=entropy_gate"]),
            ("roi+full two-stream entropy_gate", [*two, "model.fusion=entropy_gate", stream])]
    return [Variant("model", name, [*extra, *ce], p1, seed) for name, extra in rows for seed in s.seeds]


def _load(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(script[:-3].replace(".", "_"), ROOT / script)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {ROOT / script} as a module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def overrides_of(s: Setting, v: Variant, config: str, out_root: str) -> list[str]:
    return ["--config", config, *s.base, *s.datasets[v.dataset], f"output_root={out_root}", f"exp={v.exp}", f"seed={v.seed}",
            *v.overrides]


def ensure_data(s: Setting, config: str) -> None:
    from lib.demo.__main__ import main as demo_main

    for name, ds in s.datasets.items():
        if demo_main(["--config", config, *s.base, *ds]) != 0:
            raise RuntimeError(f"could not generate the {name} demo data")


def run_variant(s: Setting, v: Variant, config: str, out_root: str, runner: Callable[[str, list[str]], int] | None = None) -> float:
    """Run the variant's stages (each skips itself when up to date); returns the seconds taken."""
    runner = runner or (lambda script, args: _load(script).main(args))
    t0 = time.time()
    for script in v.stages:
        rc = runner(script, overrides_of(s, v, config, out_root))
        if rc != 0:
            raise RuntimeError(f"{script} failed for variant {v.group}/{v.name} (exit {rc}); see its log under {out_root}/{v.exp}")
    return time.time() - t0


# ----------------------------------------------------------------------------- collecting


def _result(out: Path, stage: str) -> dict:
    return (read_record(out / stage / "record.json") or {}).get("result", {})


def fold_means(out: Path, stage: str = "01_train") -> dict[str, float]:
    """Per-rank and head/middle/tail accuracy, averaged over the folds' records."""
    recs = [(read_record(d / "record.json") or {}).get("result", {}) for d in sorted((out / stage).glob("fold_*"))]
    keys = RANK_KEYS + ["val_top1_head", "val_top1_middle", "val_top1_tail"]
    return {k: float(np.mean([r[k] for r in recs if k in r])) for k in keys if any(k in r for r in recs)}


def collect(s: Setting, v: Variant, out_root: str, seconds: float) -> list[dict[str, Any]]:
    """The measures of one variant as rows (a pseudo variant gives its phase-2 row)."""
    out = Path(out_root) / v.exp
    row: dict[str, Any] = {"group": v.group, "variant": v.name, "seed": v.seed, "seconds": round(seconds, 1)}
    if v.group == "knn":
        r = _result(out, "knn")
        rows = []
        for vote, m in r.get("votes", {}).items():
            rows.append({**row, "variant": f"kNN {vote}", "cv_distance": m["cv_distance"], "cv_top1": m["cv_top1"]})
        from lib.config import load_config
        from lib.report.summary import test_score

        cfg = load_config("configs/demo.yaml", [*s.base, *s.datasets[v.dataset]])
        best = f"kNN {r.get('vote')}"
        for x in rows:
            if x["variant"] == best:
                x["test_distance"] = test_score(cfg, out / "knn" / "submission.csv")
                x["variant"] += " (chosen by CV)"
        return rows
    stage = "03_retrain" if v.group == "pseudo" else "01_train"
    r = _result(out, stage)
    row.update(cv_distance=r.get("cv_distance"), cv_distance_testlike=r.get("cv_distance_testlike"), cv_top1=r.get("cv_top1"))
    row.update(fold_means(out, stage))
    opts = out / "04_submit" / "options.csv"
    if opts.is_file():
        o = pd.read_csv(opts)
        model = "phase2" if v.group == "pseudo" else "phase1"
        for _, x in o.iterrows():
            if (x["model"] == model and x.get("frame_context", "none") == "none" and x.get("test_prior", "none") == "none"
                    and x["calibration"] == "temperature"):  # each ROI alone, temperature-calibrated, as predicted
                row.update(oof_argmax=x["oof_argmax"], oof_min_risk=x["oof_min_risk"], test_argmax=x.get("test_argmax"),
                           test_min_risk=x.get("test_min_risk"))
        if v.group == "pseudo":
            rounds = int(_result(out, "03_retrain").get("rounds", 1))
            # The last round's selection: 02's for round 1, 03's round_<r>/pseudo for later rounds.
            from lib.config import load_config
            from lib.report.summary import pseudo_precision

            folder = out / "02_pseudo" if rounds == 1 else out / "03_retrain" / f"round_{rounds}" / "pseudo"
            p = _result(folder.parent, folder.name)
            row["pseudo_labels"] = p.get("pseudo_labels", _result(out, "03_retrain").get("pseudo_rows"))
            cfg = load_config("configs/demo.yaml", [*s.base, *s.datasets[v.dataset], f"output_root={out_root}", f"exp={v.exp}"])
            row["pseudo_precision"] = (pseudo_precision(cfg, folder) or {}).get("overall")
            plain = o[(o["calibration"] == "temperature") & (o.get("test_prior", "none") == "none")
                      & (o.get("frame_context", "none") == "none")]
            row["blends"] = {x["model"]: {"oof_min_risk": x["oof_min_risk"], "test_min_risk": x.get("test_min_risk")}
                             for _, x in plain.iterrows()}
        else:
            row["blends"] = {}
    return [row]


def single_fold_vs_ensemble(out: Path, truth_of: Callable[[np.ndarray], np.ndarray], dist: np.ndarray) -> list[dict[str, Any]]:
    """Test distance (min-risk) of each phase-1 fold model alone and of their mean (02's per-model probabilities)."""
    from lib.decide.decode import decode
    from lib.decide.metric import score_labels

    path = out / "02_pseudo" / "test_probs.npz"
    if not path.is_file():
        return []
    from lib.core.io import load_npz

    z = load_npz(path, "delete it and rerun 02_pseudo_label.py")
    probs, ids = z["probs"], z["annotation_id"]
    truth = truth_of(ids)
    known = truth >= 0
    rows = [{"group": "ensemble", "variant": f"fold {k} alone",
             "test_min_risk": score_labels(truth[known], decode(p[known], dist, "min_risk"), dist)} for k, p in enumerate(probs)]
    rows.append({"group": "ensemble", "variant": f"{len(probs)}-fold ensemble",
                 "test_min_risk": score_labels(truth[known], decode(probs.mean(0)[known], dist, "min_risk"), dist)})
    return rows


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> pd.DataFrame:
    """Mean and spread (std over seeds) per (group, variant), with the seed count."""
    df = pd.DataFrame(rows)
    if df.empty:  # no row of that kind in this run (e.g. --only without the base)
        return pd.DataFrame(columns=["group", "variant", "seeds"])
    out = []
    for (g, v), part in df.groupby(["group", "variant"], sort=False):
        r: dict[str, Any] = {"group": g, "variant": v, "seeds": int(part["seed"].nunique()) if "seed" in part else 1}
        for k in keys:
            if k in part and part[k].notna().any():
                vals = part[k].dropna().astype(float)
                r[k] = vals.mean()
                r[f"{k}_std"] = vals.std(ddof=0) if len(vals) > 1 else np.nan
        out.append(r)
    return pd.DataFrame(out)


def write_json(path: Path, saved: dict[str, Any]) -> None:
    """The grid's measures so far (rows, the single-fold comparison, novelty, minutes): the report can be rebuilt from them."""
    from lib.core.io import atomic_write_text

    atomic_write_text(path, json.dumps(saved, indent=1, default=float))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def novelty_scores(head, out) -> dict:
    """Per ROI of one head output: its energy (Liu et al. 2020: higher = less familiar) and, for a two-level head, its novel flag."""
    import torch

    scores = {"energy": -torch.logsumexp(out.logits.float(), dim=1)}
    if hasattr(head, "novelty"):
        scores["novel"] = head.novelty(out)["novel"]
    return scores


def novelty(s: Setting, v: Variant, config: str, out_root: str, truth_of: Callable[[np.ndarray], np.ndarray]) -> list[dict[str, Any]]:
    """AUROC of max-probability, energy and GMU's U as scores of 'novel' (a held-out species) on the test ROIs,
    and the two-level head's novel / known accuracy at its thresholds (a majority over the fold models)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from lib.config import load_config
    from lib.data.artifacts import load_prepared
    from lib.data.context import model_inputs
    from lib.data.dataset import make_loader
    from lib.decide.pseudo import gmu
    from lib.engine.inference import predict
    from lib.model.checkpoint import load_fold_model
    from lib.model.net import mean_std
    from lib.pipeline import graph

    cfg = load_config(config, overrides_of(s, v, config, out_root)[2:])
    prep = load_prepared(cfg)
    tax, test = prep.taxonomy, prep.test
    truth = truth_of(test["annotation_id"].to_numpy())
    known = truth >= 0
    is_novel = np.isin(truth, [tax.index(n) for n in cfg.prepare.holdout])
    fold_probs, energy, flags = [], [], []
    device = torch.device("cpu")
    for d in graph.fold_dirs(cfg, "01_train"):
        model = load_fold_model(d, cfg, tax, device)
        mean, std = mean_std(model)
        loader = make_loader(model_inputs(test, cfg.model.context), img_size=cfg.model.img_size, mean=mean, std=std,
                             batch_size=cfg.train.eval_batch_size, num_workers=0, device=device)
        got = predict(model, loader, device, features=False, scores=functools.partial(novelty_scores, model.head_module), desc=d.name)
        fold_probs.append(got["probs"])
        energy.append(got["energy"])
        if "novel" in got:
            flags.append(got["novel"] > 0.5)
    probs = np.stack(fold_probs)
    _, u = gmu(probs, cfg.pseudo.gmu_sigma)
    scores = {"1 - max probability": 1 - probs.mean(0).max(1), "energy": np.mean(energy, 0), "1 - U (GMU)": 1 - u}
    y = is_novel[known]
    rows = [{"group": "novelty", "variant": name, "auroc": float(roc_auc_score(y, sc[known]))} for name, sc in scores.items()]
    if flags:
        flag = np.mean(flags, 0) > 0.5
        rows.append({"group": "novelty", "variant": "two-level head at its thresholds",
                     "novel_flagged": float(flag[known][y].mean()), "known_kept": float((~flag[known][~y]).mean())})
    rows.append({"group": "novelty", "variant": "test ROIs", "novel_rows": int(y.sum()), "known_rows": int((~y).sum())})
    return rows
