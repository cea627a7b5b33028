"""Frame context measured: nested out-of-fold distance without and with `stack` (lib.decide.frame_context), and fit times.

    python scripts/measure_frame_context.py --config configs/demo.yaml [overrides]     # an experiment's out-of-fold rows
    python scripts/measure_frame_context.py --synthetic [--frames labels_by_frame.csv] [--rows 600] [--seeds 3] [--shuffle]

`--config`: every model of `submit.models` that has out-of-fold rows (01's, 03's folds), scored as 04 scores them
(uncalibrated, one model at a time): none, stack (b, eps), stack with b per sibling-count bucket, and a second pass.
`--synthetic`: classifier-like probabilities (logits -a D[y] + ROI noise + frame-shared noise, so siblings err
alike) on frames drawn from `--frames` (image_id, concept_name: e.g. the real train labels by frame) or, without it,
from a generator with the real frame sizes and siblings that share their label as often as FathomNet's; `--shuffle`
deals the labels across frames at random (no frame structure: stack must do no harm). Folds are grouped by frame.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.data.folds import assign_folds
from lib.data.siblings import sibling_share
from lib.data.taxonomy import Taxonomy, load_taxonomy_csv
from lib.decide import frame_context as fc
from lib.decide.decode import decode

VARIANTS = (("none", None, 1), ("stack", fc.EDGES, 1), ("stack, b per count 1 / 2-3 / 4+", (1, 2, 4), 1),
            ("stack, second pass", fc.EDGES, 2))
SIZES = np.array([5165, 1497, 749, 417, 283, 200, 150, 110, 80, 60, 45, 35, 25, 20, 15])  # real frames of 1..15 ROIs (tail cut)


def distances(probs: np.ndarray, labels: np.ndarray, dist: np.ndarray) -> tuple[float, float]:
    """Mean competition distance of argmax and of min-risk decoding."""
    return (float(dist[labels, decode(probs, dist, "argmax")].mean()), float(dist[labels, decode(probs, dist, "min_risk")].mean()))


def score_variants(probs: np.ndarray, labels: np.ndarray, frame: np.ndarray, fold: np.ndarray, dist: np.ndarray) -> pd.DataFrame:
    """Each variant's nested out-of-fold distance (fit on the other folds, adjust the held-out one), with its time."""
    fc.check_grouped(frame, fold)
    sib = fc.siblings(frame)
    rows = []
    for name, edges, passes in VARIANTS:
        t0 = time.perf_counter()
        q = probs if edges is None else fc.nested(probs, labels, sib, fold, edges, passes)
        took = time.perf_counter() - t0
        whole = fc.fit(probs, labels, sib, edges=edges) if edges is not None and passes == 1 else None
        a, m = distances(q, labels, dist)
        rows.append({"variant": name, "nested_argmax": round(a, 4), "nested_min_risk": round(m, 4), "seconds": round(took, 2),
                     "params (all rows)": whole.describe() if whole else ""})
    return pd.DataFrame(rows)


def synthetic_frames(tax: Taxonomy, rows: int, rng: np.random.Generator, table: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(frame, label) of about `rows` ROIs: whole frames drawn from `table`, or generated with the real frame sizes, each
    frame one species with a few others mixed in (its label among its siblings' for about 80% of ROIs with siblings)."""
    if table is not None:
        df = pd.read_csv(table)
        df = df[df["concept_name"].isin(tax.names)]
        frames = df.groupby("image_id")
        ids = rng.permutation(list(frames.groups))
        pick, n = [], 0
        for i in ids:
            pick.append(i)
            n += len(frames.groups[i])
            if n >= rows:
                break
        sub = df[df["image_id"].isin(pick)]
        return sub["image_id"].to_numpy(), sub["concept_name"].map(tax.index).to_numpy()
    frame: list[int] = []
    label: list[int] = []
    f = 0
    while len(label) < rows:
        size = int(rng.choice(np.arange(1, len(SIZES) + 1), p=SIZES / SIZES.sum()))
        main = int(rng.integers(tax.n_classes))
        for _ in range(size):
            label.append(main if rng.random() < 0.75 else int(rng.integers(tax.n_classes)))
            frame.append(f)
        f += 1
    return np.array(frame), np.array(label)


def synthetic_probs(labels: np.ndarray, frame: np.ndarray, dist: np.ndarray, rng: np.random.Generator, sharp: float = 1.0,
                    noise: float = 3.0, frame_noise: float = 1.0) -> np.ndarray:
    """softmax(-sharp D[y] + noise N(0, 1) + frame_noise N(0, 1) shared by a frame): near concepts are confused more, and
    siblings are wrong together (light, turbidity). The defaults give argmax distances near an EfficientNet-b0's 2.7."""
    _, g = np.unique(frame, return_inverse=True)
    shared = rng.standard_normal((g.max() + 1, dist.shape[0]))
    z = -sharp * dist[labels] + noise * rng.standard_normal((len(labels), dist.shape[0])) + frame_noise * shared[g.reshape(-1)]
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def run_synthetic(args: argparse.Namespace) -> None:
    tax = load_taxonomy_csv(Path(__file__).resolve().parent.parent / "configs/taxonomy/fathomnet2025.csv")
    dist = tax.distance_matrix().astype(np.float64)
    tables = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        frame, labels = synthetic_frames(tax, args.rows, rng, args.frames)
        if args.shuffle:
            labels = rng.permutation(labels)
        probs = synthetic_probs(labels, frame, dist, rng)
        fold = assign_folds(labels, frame, args.folds, seed)
        t = score_variants(probs, labels, frame, fold, dist)
        t.insert(0, "seed", seed)
        tables.append(t)
        print(f"seed {seed}: {len(labels)} ROIs in {len(np.unique(frame))} frames, {sibling_share(frame):.1%} with siblings")
    table = pd.concat(tables)
    print(table.to_string(index=False))
    print("\nmean over seeds:")
    print(table.groupby("variant", sort=False)[["nested_argmax", "nested_min_risk", "seconds"]].mean().round(4).to_string())


def run_experiment(args: argparse.Namespace) -> None:
    """Every model of submit.models with out-of-fold rows, scored without and with frame context."""
    from lib.config import load_config
    from lib.data.artifacts import load_prepared
    from lib.decide.oof import load_oof
    from lib.modelref import ModelRef
    from lib.pipeline import graph

    cfg = load_config(args.config, args.overrides)
    prep = load_prepared(cfg)
    dist = prep.taxonomy.distance_matrix().astype(np.float64)
    index = fc.FrameIndex.from_rois(prep.rois, prep.taxonomy.n_classes)
    for name in cfg.submit.models:
        folds = graph.member_folds(cfg, ModelRef.parse(name))
        if not all((d / "oof.npz").is_file() for d in folds):
            print(f"{name}: no out-of-fold rows yet (train it first)")
            continue
        oof = load_oof(folds)
        frame, _ = index.train_frames(oof.ids)
        print(f"{name}: {len(oof.ids)} out-of-fold rows, {sibling_share(frame):.1%} with siblings")
        print(score_variants(oof.probs, oof.labels, frame, oof.folds, dist).to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="an experiment's config: score its models' out-of-fold rows")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--frames", type=Path, help="a CSV of image_id, concept_name whose frames the synthetic rows copy")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shuffle", action="store_true", help="deal the labels across frames at random (no frame structure)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.config:
        run_experiment(args)
    elif args.synthetic:
        run_synthetic(args)
    else:
        ap.error("give --config or --synthetic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
