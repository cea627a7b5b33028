"""Benchmark of 04's blend-only rerun: cached probabilities -> weights -> decoding -> submission, at the real size.

    .venv/bin/python benchmarks/bench_blend.py [--quick]

When only `submit.*` changes, 04 reads every model's cached test probabilities (`probs/<model>.npz`)
and out-of-fold probabilities (`fold_<k>/oof.npz`), computes the blend weights, decodes, writes
submission.csv, fallbacks.csv, options.csv (every single model and blend, argmax and min-risk)
and report.md. This times that sequence with lib.decide.blending / weights / decode / submission
directly on synthetic probabilities of the real shape: 788 test rows, 79 classes, 10 models,
23,699 out-of-fold rows in 5 folds (--quick: 4 models). Target: under 5 s per blend method.
It runs in a fresh process and reports whether torch was imported (it must not be: no model).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

N_OOF, N_TEST, N_CLASSES, N_FOLDS = 23_699, 788, 79, 5
TARGET_S = 5.0


def synthetic(work: Path, n_models: int, seed: int = 0):
    """Per model: 5 folds of oof.npz and a probs npz as 04 caches them; the taxonomy; test ids."""
    import numpy as np

    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.metric import DEFAULT_TAXONOMY

    tax = load_taxonomy_csv(DEFAULT_TAXONOMY)
    rng = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, N_CLASSES + 1) ** 1.1  # long-tailed labels
    labels = rng.choice(N_CLASSES, N_OOF, p=freq / freq.sum())
    test_labels = rng.choice(N_CLASSES, N_TEST, p=freq / freq.sum())
    ids = rng.permutation(N_OOF) + 1
    fold = rng.integers(0, N_FOLDS, N_OOF)

    def probs(y: np.ndarray, quality: float) -> np.ndarray:
        z = rng.standard_normal((len(y), N_CLASSES)).astype(np.float32) * 1.5
        z[np.arange(len(y)), y] += quality * rng.uniform(0.0, 2.0, len(y)).astype(np.float32)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    dirs = []
    for m in range(n_models):
        d = work / f"model_{m}"
        q = 2.0 + 2.0 * m / max(1, n_models - 1)
        oof = probs(labels, q)
        for k in range(N_FOLDS):
            (d / f"fold_{k}").mkdir(parents=True, exist_ok=True)
            sel = fold == k
            np.savez(d / f"fold_{k}" / "oof.npz", annotation_id=ids[sel], label=labels[sel], probs=oof[sel])
        np.savez(d / "probs.npz", annotation_id=np.arange(N_TEST) + 10**6, probs=np.stack([probs(test_labels, q) for _ in range(N_FOLDS)]))
        dirs.append(d)
    return tax, dirs, (np.arange(N_TEST) + 10**6).tolist()


def blend_only(cfg, tax, dirs: list[Path], test_ids: list[int], out: Path) -> dict[str, float]:
    """What 04 does after its probabilities are cached (see 04_infer_submit.py run); seconds per part."""
    import numpy as np
    import pandas as pd

    from lib.core.io import atomic_path, atomic_write_text
    from lib.decide.blending import (
        ModelProbs,
        apply_decoding,
        check_aligned,
        weights_for,
    )
    from lib.decide.decode import prior_answer
    from lib.decide.oof import load_oof
    from lib.decide.options import compare
    from lib.decide.submission import assemble, write_submission
    from lib.decide.weights import blend
    from lib.report.summary import submit_report

    t = {"start": time.perf_counter()}
    models = []
    for i, d in enumerate(dirs):
        folds = sorted(d.glob("fold_*"))
        oof = load_oof(folds)
        with np.load(d / "probs.npz") as z:
            test = z["probs"].mean(0)
        models.append(ModelProbs(f"model_{i}", 1.5 + 0.01 * i, oof.ids, oof.labels, oof.probs, test, oof_fold=oof.folds))
    check_aligned(models)
    t["load"] = time.perf_counter()
    dist = tax.distance_matrix()
    counts = np.bincount(models[0].oof_labels, minlength=tax.n_classes)
    prior = counts / counts.sum()
    cache = out / "probs" / "blend_fit.npz"  # where 04 keeps the fit weights (04_infer_submit.py)
    weights = weights_for(cfg.submit.blend, cfg, models, dist, cache)
    t["weights"] = time.perf_counter()
    labels = apply_decoding(cfg, blend([m.test for m in models], weights), tax, prior, dist)
    sub, fell_back = assemble(test_ids, dict(zip(test_ids, labels.tolist())), tax.names, prior_answer(counts, dist))
    write_submission(sub, out / "submission.csv", test_ids, tax.names)
    with atomic_path(out / "fallbacks.csv") as tmp:
        pd.DataFrame({"annotation_id": fell_back}).to_csv(tmp, index=False)
    t["submission"] = time.perf_counter()
    options = compare(cfg, models, tax, prior, cache).table
    with atomic_path(out / "options.csv") as tmp:
        options.to_csv(tmp, index=False)
    members = [{"member": m.name, "origin": "synthetic", "cv_distance": m.cv, "cv_top1": float("nan"), "cv_distance_testlike": float("nan"),
                "calibrator": "none", "ece_before": float("nan"), "ece_after": float("nan"), "fold_temperature": 1.0, "weight": float(w)}
               for m, w in zip(models, weights)]
    atomic_write_text(out / "report.md", submit_report(cfg, members, options, sub, fell_back))
    t["end"] = time.perf_counter()
    return {"load": t["load"] - t["start"], "weights": t["weights"] - t["load"], "submission": t["submission"] - t["weights"],
            "options": t["end"] - t["submission"], "total": t["end"] - t["start"]}


def measure(quick: bool, work: Path) -> list[dict]:
    from lib.config import Config, load_config

    n_models = 4 if quick else 10
    t0 = time.perf_counter()
    tax, dirs, test_ids = synthetic(work / "blend", n_models)
    made = time.perf_counter() - t0
    rows = []
    size = f"{n_models} models, {N_OOF:,} OOF x {N_CLASSES}, {N_TEST} test rows"
    parts = {}
    out = work / "blend" / "04_submit"
    out.mkdir(parents=True, exist_ok=True)
    # 04's first run (after prediction) fits the `fit` weights for its options table and keeps them in
    # probs/blend_fit.npz; the reruns change only submit.blend, as a user re-blending would.
    for step, method in (("first", "uniform"), ("rerun", "cv"), ("rerun", "fit"), ("rerun", "uniform")):
        cfg: Config = load_config(None, ["submit.decode=min_risk", f"submit.blend={method}"])
        parts[(step, method)] = p = blend_only(cfg, tax, dirs, test_ids, out)
        if step == "first":
            continue
        detail = ", ".join(f"{k} {v:.2f}s" for k, v in p.items() if k != "total")
        rows.append(B.row(f"blend-only rerun, submit.blend={method} ({size})", f"{p['total']:.2f} s", f"target {TARGET_S:g} s",
                          p["total"] / TARGET_S, "< 1.0",
                          f"{detail}; options = every model and blend (uniform, cv, fit, greedy), without and with calibration, argmax and "
                          "min-risk, out of fold and nested, as 04 writes them; fitted weights (blend_<method>*.npz, the nested folds' too) "
                          "and temperatures (temperatures.json) come from probs/, keyed by a hash of the out-of-fold probabilities"))
    first = parts[("first", "uniform")]
    fit = first["options"]
    rows.append(B.row(f"04's first blend (after prediction): fits the `fit` weights once (SLSQP, {n_models} models x {N_OOF:,} OOF rows)",
                      f"{first['total']:.2f} s", f"rerun {parts[('rerun', 'uniform')]['total']:.2f} s",
                      first["total"] / max(parts[("rerun", "uniform")]["total"], 1e-9), "report",
                      f"options {fit:.2f}s of it, mostly SLSQP from {n_models + 1} starts (uniform and each single model) "
                      f"on a soft min-risk loss over {N_OOF:,} x 79 x {n_models}, exact gradients, for both calibrations and "
                      f"every nested fold, with greedy selection and the temperatures; paid once per set of models"))
    loaded = sorted(m for m in ("torch", "timm") if m in sys.modules)
    rows.append(B.row("blend-only rerun loads no model", "torch/timm imported: " + (", ".join(loaded) or "none"),
                      "04 with only submit.* changed", 0.0 if not loaded else 1.0, "<= 0",
                      f"a fresh process ran the first blend and the reruns; synthetic data made in {made:.1f}s (not timed)"))
    return rows


def run(quick: bool = False, work: Path | None = None) -> list[dict]:
    """In a fresh process when torch is already loaded here (run_all), so the no-model check means something."""
    import json
    import tempfile

    work = Path(work or tempfile.mkdtemp(prefix="bench_blend_"))
    if "torch" not in sys.modules:
        return [dict(r, section="Blend (04, probabilities cached)") for r in measure(quick, work)]
    cmd = [sys.executable, __file__, "--json", "--work", str(work)] + (["--quick"] if quick else [])
    res = B.run_child(cmd)
    rows = [json.loads(line[4:]) for line in res["output"].splitlines() if line.startswith("ROW ")]
    if res["rc"] != 0 or not rows:
        raise RuntimeError(f"bench_blend child failed (exit {res['rc']}):\n{res['output'][-3000:]}")
    return [dict(r, section="Blend (04, probabilities cached)") for r in rows]


if __name__ == "__main__":
    sys.exit(B.cli(measure, __doc__))
