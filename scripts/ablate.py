"""The ablation runner: a fixed grid of configs through the stages -> output/<exp>/report/ablation.md.

    .venv/bin/python scripts/ablate.py [--quick] [--config configs/demo.yaml]   (or: make ablate / make ablate-quick)

Each variant runs in output/ablate[_quick]/<variant>/; records make finished variants free, so
a rerun (or a resumed, interrupted grid) only does what is missing. See scripts/ablation.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ablation as ab  # beside this script
import numpy as np
import pandas as pd

from lib.config import load_config
from lib.core.io import atomic_write_text
from lib.pipeline.cli import setup_logging

KEYS = ["cv_distance", "cv_distance_testlike", "cv_top1", "oof_argmax", "oof_min_risk", "test_argmax", "test_min_risk", "test_distance",
        "pseudo_labels", "pseudo_precision", *ab.RANK_KEYS, "val_top1_head", "val_top1_middle", "val_top1_tail"]


def fmt(r: pd.Series, k: str, digits: int = 3) -> str:
    v = r.get(k)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if k == "pseudo_labels":
        digits = 0  # a count
    sd = r.get(f"{k}_std")
    return f"{v:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None and not np.isnan(sd) else "")


def table(df: pd.DataFrame, cols: list[tuple[str, str]]) -> list[str]:
    cols = [(k, h) for k, h in cols if k in df and df[k].notna().any()]
    lines = ["| variant | seeds | " + " | ".join(h for _, h in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append(f"| {r['variant']} | {r.get('seeds', 1) if not pd.isna(r.get('seeds', 1)) else 1} | "
                     + " | ".join(fmt(r, k) for k, _ in cols) + " |")
    return lines


def plot(df: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = df[df["test_min_risk"].notna()] if "test_min_risk" in df else df.iloc[:0]
    if d.empty:
        return
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(d) + 1.5))
    y = np.arange(len(d))
    ax.barh(y - 0.2, d["cv_distance"].fillna(0), 0.4, xerr=d.get("cv_distance_std", pd.Series(0, index=d.index)).fillna(0),
            label="CV distance (argmax)")
    ax.barh(y + 0.2, d["test_min_risk"], 0.4, xerr=d.get("test_min_risk_std", pd.Series(0, index=d.index)).fillna(0),
            label="demo test distance (min-risk)")
    ax.set_yticks(y, [f"{g}: {v}" for g, v in zip(d["group"], d["variant"])])
    ax.invert_yaxis()
    ax.set_xlabel("mean taxonomic distance (lower is better)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict], extra: list[dict], nov: list[dict], s: ab.Setting, minutes: float, out: Path) -> str:
    df = ab.summarize(rows, KEYS)
    title = "Ablation" + (" (quick grid)" if s.quick else "")
    lines = [f"# {title}", "",
             f"Grid run in {minutes:.1f} min on this machine; base overrides `{' '.join(s.base)}`; seeds {s.seeds}. "
             "Distances are the competition metric (lower is better); ± is the spread (std) over seeds. Every setting was "
             "fixed before the run: nothing is chosen on the demo's test labels (CV is the yardstick, the test score is "
             "reported beside it).", ""]
    main_cols = [("cv_distance", "CV dist."), ("cv_distance_testlike", "CV test-like"), ("cv_top1", "CV top-1"),
                 ("oof_min_risk", "OOF min-risk"), ("test_argmax", "test argmax"), ("test_min_risk", "test min-risk")]
    sections = [("loss", "Losses (phase 1, linear head, ROI only)"), ("head", "Heads (loss ce)"),
                ("context", "ROI only against ROI + context (loss ce)"),
                ("model", "Model ingredients of the top solutions (issue 28; loss ce, ROI only as the base)"),
                ("pseudo", "Pseudo-labelling (phase 2 retrained from the ce base of the first seed)"),
                ("knn", "kNN baseline (CV per vote; the test score of the vote chosen by CV)")]
    base0 = first_seed_base(rows, s)
    for g, head in sections:
        part = df[df["group"] == g]
        if part.empty:
            continue
        base = df[(df["group"] == "loss") & (df["variant"] == "ce")]
        if g in ("head", "context", "model"):
            part = pd.concat([base, part])
        elif g == "pseudo":  # phase 2 starts from the first seed's phase 1: compare with that run, not the mean over seeds
            part = pd.concat([base0.assign(variant=f"off (phase 1, loss ce, seed {s.seeds[0]})"), part])
        cols = main_cols + ([("pseudo_labels", "pseudo rows"), ("pseudo_precision", "pseudo precision")] if g == "pseudo" else [])
        if g == "knn":
            cols = [("cv_distance", "CV dist."), ("cv_top1", "CV top-1"), ("test_distance", "test distance")]
        lines += [f"## {head}", "", *table(part, cols), ""]
    ranks = df[df["group"].isin(["loss", "head", "context"])]
    if not ranks.empty:
        lines += ["## Accuracy per rank (validation, mean over folds)", "",
                  *table(ranks, [(k, k.replace("val_acc_", "")) for k in ab.RANK_KEYS]), ""]
    blends = [r for r in rows if r.get("group") == "pseudo" and r.get("blends")]
    if blends:
        lines += ["## Decoding and blends (04's options on the pseudo-label variants)", "",
                  "| variant | model | OOF min-risk | test min-risk |", "|---|---|---|---|"]
        for r in blends:
            for m, v in r["blends"].items():
                t = v.get("test_min_risk")
                lines.append(f"| {r['variant']} | {m} | {v['oof_min_risk']:.3f} | {'' if t is None else f'{t:.3f}'} |")
        lines.append("")
    if extra:
        lines += ["## A single fold model against the fold ensemble (base ce, demo test, min-risk)", "",
                  "| model | test distance |", "|---|---|", *[f"| {r['variant']} | {r['test_min_risk']:.3f} |" for r in extra], ""]
    lt = df[df["group"] == "long_tail"]
    if not lt.empty:
        lines += ["## Long tail (the generator's long-tailed mode; head / middle / tail = thirds of the classes by train count)", "",
                  *table(lt, [("cv_distance", "CV dist."), ("cv_top1", "CV top-1"), ("val_top1_head", "head top-1"),
                              ("val_top1_middle", "middle top-1"), ("val_top1_tail", "tail top-1"), ("test_min_risk", "test min-risk")]), ""]
    png = "ablation_quick.png" if s.quick else "ablation.png"
    if nov:
        lines += ["## Novelty (species held out of train, present in test; two-level head)", "",
                  f"Held out: {', '.join(ab.HOLDOUT)}.", "", "| score | AUROC (novel vs known test ROIs) |", "|---|---|"]
        lines += [f"| {r['variant']} | {r['auroc']:.3f} |" for r in nov if "auroc" in r]
        for r in nov:
            if "novel_flagged" in r:
                lines += ["", f"Two-level head at its thresholds (tau_coarse, tau_fine): {r['novel_flagged']:.1%} of novel ROIs flagged novel, "
                          f"{r['known_kept']:.1%} of known ROIs kept as known."]
            if "novel_rows" in r:
                lines += ["", f"Test ROIs: {r['novel_rows']} novel, {r['known_rows']} known."]
        nv = df[df["group"] == "novelty"]
        if not nv.empty:
            lines += ["", *table(nv, main_cols)]
        lines.append("")
    lines += ["## What it found", "", *findings(df, extra, nov, base0), "", f"![ablation]({png})", ""]
    plot(df[df["group"] != "knn"], out / ("ablation_quick.png" if s.quick else "ablation.png"), title)
    return "\n".join(lines)


def first_seed_base(rows: list[dict], s: ab.Setting) -> pd.DataFrame:
    """The base (loss ce) of the first seed alone: the phase 1 that the pseudo-label variants retrain from."""
    return ab.summarize([r for r in rows if r.get("group") == "loss" and r.get("variant") == "ce" and r.get("seed") == s.seeds[0]], KEYS)


def findings(df: pd.DataFrame, extra: list[dict], nov: list[dict], base0: pd.DataFrame) -> list[str]:
    """Plain statements read off the table (computed, not written by hand)."""
    out = []

    def get(g: str, v: str, k: str) -> float | None:
        r = df[(df["group"] == g) & (df["variant"] == v)]
        return None if r.empty or k not in r or pd.isna(r.iloc[0].get(k)) else float(r.iloc[0][k])

    losses = df[(df["group"] == "loss") & df["cv_distance"].notna()]
    if not losses.empty:
        best = losses.loc[losses["cv_distance"].idxmin()]
        ce_sd = get("loss", "ce", "cv_distance_std")
        out.append(f"- Lowest CV distance among the losses: `{best['variant']}` ({best['cv_distance']:.3f}; ce {get('loss', 'ce', 'cv_distance'):.3f}"
                   + (f", whose spread over seeds is ± {ce_sd:.3f}" if ce_sd is not None else "") + ").")
    a, m = get("loss", "ce", "oof_argmax"), get("loss", "ce", "oof_min_risk")
    if a is not None and m is not None:
        out.append(f"- Min-risk decoding against argmax (ce, out of fold): {m:.3f} against {a:.3f}.")
    pseudo = df[(df["group"] == "pseudo") & df["test_min_risk"].notna()]
    if not base0.empty and not pseudo.empty:
        off = base0.iloc[0]
        best = pseudo.loc[pseudo["cv_distance"].idxmin()]
        better = int((pseudo["cv_distance"] < off["cv_distance"]).sum())
        out.append(f"- Pseudo-labels: the phase-2 variant with the lowest CV is `{best['variant']}` (CV {best['cv_distance']:.3f}, "
                   f"demo test {best['test_min_risk']:.3f}) against its phase 1 without pseudo-labels (CV {off['cv_distance']:.3f}, "
                   f"test {off['test_min_risk']:.3f}); {better} of {len(pseudo)} variants lower the CV distance.")
    if extra:
        single = np.mean([r["test_min_risk"] for r in extra[:-1]])
        out.append(f"- The fold ensemble scores {extra[-1]['test_min_risk']:.3f} on the demo test against {single:.3f} "
                   "for a single fold model on average.")
    lt = df[(df["group"] == "long_tail") & df["val_top1_tail"].notna()] if "val_top1_tail" in df else df.iloc[:0]
    if not lt.empty:
        best = lt.loc[lt["val_top1_tail"].idxmax()]
        ce_tail = get("long_tail", "ce", "val_top1_tail")
        if best["val_top1_tail"] <= 0:
            out.append("- Long tail: no loss classified a single tail-class validation crop right at this scale.")
        else:
            out.append(f"- Long tail: the best tail-class top-1 is `{best['variant']}` ({best['val_top1_tail']:.3f}"
                       + (f"; ce {ce_tail:.3f})." if ce_tail is not None else ")."))
        best_cv = lt.loc[lt["cv_distance"].idxmin()]
        out.append(f"- Long tail: the lowest CV distance is `{best_cv['variant']}` ({best_cv['cv_distance']:.3f}"
                   + (f"; ce {get('long_tail', 'ce', 'cv_distance'):.3f})." if get("long_tail", "ce", "cv_distance") is not None else ")."))
    c, r = get("context", "roi+3x", "cv_distance"), get("loss", "ce", "cv_distance")
    if c is not None and r is not None:
        out.append(f"- ROI + 3x context against ROI only (ce): CV {c:.3f} against {r:.3f}.")
    model = df[(df["group"] == "model") & df["cv_distance"].notna()]
    if not model.empty and r is not None:
        sd = get("loss", "ce", "cv_distance_std")
        out.append("- Model ingredients against ROI only (ce, CV " + f"{r:.3f}" + (f" ± {sd:.3f}" if sd is not None else "") + "): "
                   + ", ".join(f"`{m['variant']}` {m['cv_distance']:.3f}" + (f" ± {m['cv_distance_std']:.3f}" if not pd.isna(m.get("cv_distance_std"))
                                                                              else "") for _, m in model.iterrows()) + ".")
    heads = df[(df["group"] == "head") & df["cv_distance"].notna()]
    if not heads.empty and r is not None:
        out.append("- Heads against the linear head (ce, CV " + f"{r:.3f}): "
                   + ", ".join(f"`{h['variant']}` {h['cv_distance']:.3f}" for _, h in heads.iterrows()) + ".")
    aurocs = [n for n in nov if "auroc" in n]
    if aurocs:
        out.append("- Novelty AUROC (held-out species against known ones): "
                   + ", ".join(f"{n['variant']} {n['auroc']:.3f}" for n in aurocs) + " (0.5 is chance).")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--quick", action="store_true", help="the small grid (about 10 minutes on 2 cores)")
    ap.add_argument("--only", default="", help="run only these groups or rows (comma-separated: loss,head,context,model,pseudo,knn,"
                    "long_tail, or group/name such as loss/ce)")
    ap.add_argument("--seeds", default="", help="the seeds instead of the setting's (comma-separated, e.g. 42,43,44)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the saved measures (ablation[_quick].json)")
    ap.add_argument("--variants", default="", help="run only these rows (comma-separated group/name, e.g. head/coherent); their "
                    "measures go to report/ablation_variants.json, the saved grid and its report stay as they are")
    args = ap.parse_args(argv)
    setup_logging()
    s = ab.setting(args.quick)
    cfg = load_config(args.config, [])
    out_root = str(cfg.out_root / f"ablate{'_quick' if s.quick else ''}")
    report_dir = cfg.out_dir / "report"
    saved = report_dir / ("ablation_quick.json" if s.quick else "ablation.json")
    name = "ablation_quick.md" if s.quick else "ablation.md"
    if args.report_only:  # the report again from the saved measures (after a change to this file's tables)
        if not saved.is_file():
            raise SystemExit(f"No saved measures at {saved}; run the grid first (without --report-only).")
        d = ab.read_json(saved)
        atomic_write_text(report_dir / name, report(d["rows"], d["extra"], d["nov"], s, d["minutes"], report_dir))
        print(f"wrote {report_dir / name} from {saved}")
        return 0
    if args.variants:
        return run_rows(s, args.config, out_root, report_dir, args.variants.split(","))
    started = time.time()
    ab.ensure_data(s, args.config)
    rows: list[dict] = []
    extra: list[dict] = []
    nov: list[dict] = []
    if args.seeds:
        s.seeds = [int(x) for x in args.seeds.split(",")]
    only = set(args.only.split(",")) if args.only else set()
    variants = [v for v in ab.grid(s) if not only or v.group in only or f"{v.group}/{v.name}" in only]
    for i, v in enumerate(variants, 1):
        print(f"[ablate {i}/{len(variants)}] {v.group}: {v.name} (seed {v.seed})", flush=True)
        seconds = ab.run_variant(s, v, args.config, out_root)
        rows += ab.collect(s, v, out_root, seconds)
        if v.group == "novelty":
            nov = ab.novelty(s, v, args.config, out_root, truth_and_dist(s, args.config)[0])
        if v.group == "pseudo" and not extra:
            extra = ab.single_fold_vs_ensemble(Path(out_root) / v.exp, *truth_and_dist(s, args.config))
        ab.write_json(saved, {"rows": rows, "extra": extra, "nov": nov, "minutes": (time.time() - started) / 60})
    minutes = (time.time() - started) / 60
    atomic_write_text(report_dir / name, report(rows, extra, nov, s, minutes, report_dir))
    print(f"wrote {report_dir / name} ({minutes:.1f} min)")
    return 0


def run_rows(s: ab.Setting, config: str, out_root: str, report_dir: Path, names: list[str]) -> int:
    """Rerun single rows of the grid (same base overrides and seed as in the full grid) and save their measures."""
    grid: dict[str, ab.Variant] = {}
    for v in ab.grid(s):
        grid.setdefault(f"{v.group}/{v.name}", v)  # the first seed of a row run with several
    unknown = [n for n in names if n not in grid]
    if unknown:
        raise SystemExit(f"error: no grid row {', '.join(unknown)}; name rows as group/name, one of: {', '.join(grid)}.")
    ab.ensure_data(s, config)
    path = report_dir / "ablation_variants.json"
    saved = ab.read_json(path) if path.is_file() else {"rows": []}
    for n in names:
        v = grid[n]
        print(f"[ablate] {n} (seed {v.seed})", flush=True)
        rows = ab.collect(s, v, out_root, ab.run_variant(s, v, config, out_root))
        saved["rows"] = [r for r in saved["rows"] if (r["group"], r["variant"], r["seed"]) != (v.group, v.name, v.seed)] + rows
        if v.group == "novelty":  # the AUROCs and the two-level head's flags, as the full grid reports them
            saved["nov"] = ab.novelty(s, v, config, out_root, truth_and_dist(s, config)[0])
            print(json.dumps(saved["nov"], default=float))
        ab.write_json(path, saved)
        for r in rows:
            print(json.dumps({k: r.get(k) for k in ["group", "variant", "seed", "seconds", *KEYS] if r.get(k) is not None}, default=float))
    print(f"wrote {path}")
    return 0


def truth_and_dist(s: ab.Setting, config: str):
    """The demo's test labels (report only) and the distance matrix."""
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.metric import DEFAULT_TAXONOMY
    from lib.report.truth import find_truth

    cfg = load_config(config, [*s.base, *s.datasets["base"]])
    tax = load_taxonomy_csv(cfg.data.paths()["taxonomy_csv"] if cfg.data.taxonomy_csv else DEFAULT_TAXONOMY)
    known = find_truth(cfg)
    if known is None:
        raise SystemExit(f"error: {cfg.data.root_dir()}/solution.csv is missing; the ablation scores the demo's test rows, run make demo first.")

    def truth(ids: np.ndarray) -> np.ndarray:
        return known.labels(ids, tax.names)

    return truth, tax.distance_matrix()


if __name__ == "__main__":
    sys.exit(main())
