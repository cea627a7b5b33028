"""Rebuild configs/taxonomy/fathomnet2025_train_frame_compositions.csv from the real train labels with their frames.

    .venv/bin/python scripts/frame_compositions.py [LABELS_CSV] [--out CSV]

LABELS_CSV (default ../shared/fathomnet2025/train_labels_by_frame.csv beside the project) has the columns
image_id, annotation_id, concept_name, one row per train ROI. The output keeps only what the demo generator needs
(lib/demo/compositions.py): each frame's multiset of concept names, frames numbered 1.. in image-id order; no
annotation ids, image ids, boxes or pixels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd

from lib.core.io import atomic_write_text
from lib.core.paths import ROOT
from lib.demo.compositions import COMPOSITIONS_CSV, compositions_csv_text, compositions_from_labels

DEFAULT_LABELS = ROOT.parent / "shared" / "fathomnet2025" / "train_labels_by_frame.csv"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("labels", nargs="?", default=str(DEFAULT_LABELS), help="image_id,annotation_id,concept_name CSV")
    ap.add_argument("--out", default=str(COMPOSITIONS_CSV), help="where to write the compositions")
    args = ap.parse_args(argv)
    src = Path(args.labels)
    if not src.is_file():
        print(f"Labels file '{src}' does not exist; pass the path of train_labels_by_frame.csv "
              "(image_id,annotation_id,concept_name).", file=sys.stderr)
        return 2
    df = pd.read_csv(src, dtype={"concept_name": str}, keep_default_na=False)
    missing = {"image_id", "concept_name"} - set(df.columns)
    if missing:
        print(f"'{src}' lacks the column(s) {', '.join(sorted(missing))}; it needs image_id and concept_name.", file=sys.stderr)
        return 2
    comps = compositions_from_labels(df["image_id"].to_numpy(), df["concept_name"].tolist())
    atomic_write_text(Path(args.out), compositions_csv_text(comps))
    print(f"{args.out}: {len(comps)} frames, {sum(map(len, comps))} ROIs (from {src.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
