"""Real frame compositions: which concepts share a frame in the FathomNet 2025 train set, and frames dealt from them.

Why: the other ROIs of a frame are the strongest signal in the real data (a field of one species, a crab beside its sea
pen), and a demo that deals its boxes into frames at random cannot show it. The shipped table
(configs/taxonomy/fathomnet2025_train_frame_compositions.csv, written by scripts/frame_compositions.py from
train_labels_by_frame.csv) holds each real train frame's multiset of concept names and nothing else. With
`demo.frames=real` each split's frames are real frames drawn at random until every class has its count.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from lib.core.paths import ROOT

COMPOSITIONS_CSV = ROOT / "configs" / "taxonomy" / "fathomnet2025_train_frame_compositions.csv"
SEP = "|"
HEADER = """\
# The real FathomNet 2025 train frames' compositions: one row per frame (numbered 1.. in image-id order), the
# concept names of its ROIs, sorted and joined by '|' (a name repeats once per ROI). Derived by
# scripts/frame_compositions.py from train_labels_by_frame.csv (image_id, annotation_id, concept_name of all 23,699
# train ROIs, as the official download script names the crops); no ids, boxes or pixels. Read by lib/demo
# (demo.frames=real).
"""
FIT_PER_ASPECT = 6  # train boxes that fit a frame per unit of width/height: 8 at 4:3 (lib/demo/frames.py, measured)


def compositions_from_labels(image_ids: Sequence[int] | np.ndarray, names: Sequence[str]) -> list[tuple[str, ...]]:
    """Each frame's concept names, sorted, frames in image-id order: all the demo needs from a labels table."""
    frames: dict[int, list[str]] = {}
    for img, name in zip(np.asarray(image_ids).tolist(), names):
        frames.setdefault(int(img), []).append(str(name))
    return [tuple(sorted(frames[k])) for k in sorted(frames)]


def compositions_csv_text(comps: Sequence[tuple[str, ...]]) -> str:
    """The table's text: the header comment, then `frame,concepts`."""
    buf = io.StringIO()
    buf.write(HEADER)
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["frame", "concepts"])
    w.writerows((i, SEP.join(c)) for i, c in enumerate(comps, 1))
    return buf.getvalue()


def read_compositions(path: str | Path = COMPOSITIONS_CSV) -> list[tuple[str, ...]]:
    """The frames' concept multisets as written by compositions_csv_text."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError:
        raise ValueError(f"The frame compositions file '{p}' cannot be read; restore it from the repository "
                         "(or rebuild it with scripts/frame_compositions.py), or set demo.frames=random.") from None
    rows = list(csv.reader(line for line in text.splitlines() if not line.startswith("#")))
    if not rows or rows[0] != ["frame", "concepts"]:
        raise ValueError(f"The frame compositions file '{p}' lacks its header 'frame,concepts'; rebuild it with "
                         "scripts/frame_compositions.py.")
    return [tuple(r[1].split(SEP)) for r in rows[1:] if len(r) == 2 and r[1]]


def composition_matrix(comps: Sequence[tuple[str, ...]], names: Sequence[str], needed: np.ndarray | None = None) -> np.ndarray:
    """ROIs per (frame, class) in the taxonomy's label order. Concepts the taxonomy lacks are left out, and frames left
    empty dropped; a class that needs boxes (`needed` > 0) but sits in no frame is one ValueError."""
    idx = {n: i for i, n in enumerate(names)}
    rows = [[idx[n] for n in c if n in idx] for c in comps]
    rows = [r for r in rows if r]
    m = np.zeros((len(rows), len(names)), dtype=np.int32)
    for f, r in enumerate(rows):
        np.add.at(m[f], r, 1)
    if needed is not None:
        absent = [names[int(i)] for i in np.flatnonzero((np.asarray(needed) > 0) & (m.sum(0) == 0))]
        if absent:
            raise ValueError(f"demo.frames=real draws frames from the real FathomNet 2025 compositions, where "
                             f"{len(absent)} concept(s) of this taxonomy never appear (e.g. {', '.join(absent[:3])}); "
                             "use the FathomNet 2025 taxonomy or set demo.frames=random.")
    return m


def frame_capacity(width: int, height: int) -> int:
    """How many train boxes a demo frame holds with little overlap.

    lib/demo/frames.py draws a train box's longer side as 0.18-0.38 of the frame height and tries 30 spots for one
    that overlaps the others by under 10%; at 320x240 (and 160x120) up to 8 boxes find such a spot (under 1% of them
    did not at 8, 6% at 10, 26% at 16), so the capacity is 6 boxes per unit of width/height (at least 1).
    """
    return max(1, int(FIT_PER_ASPECT * width / height))


def deal_real(rng: np.random.Generator, counts: Sequence[int], matrix: np.ndarray, cap: int) -> list[tuple[int, ...]]:
    """Frames' labels drawn from real compositions until each class has exactly its count.

    Repeatedly: one real frame, uniformly among those that still hold a class short of its count; its ROIs of classes
    already complete are left out, a class's ROIs beyond what it still needs too; of the rest, `cap` at most, drawn at
    random (a big real frame keeps its label mix in expectation), in random order. Every class ends with its count.
    """
    remaining = np.asarray(counts, dtype=np.int64).copy()
    present = matrix > 0
    hits = present[:, remaining > 0].sum(1)  # per frame: classes it holds that still need boxes
    frames: list[tuple[int, ...]] = []
    while remaining.sum() > 0:
        eligible = np.flatnonzero(hits > 0)
        if len(eligible) == 0:  # composition_matrix(needed=counts) rules this out
            raise ValueError("a class short of its count sits in no real frame")
        f = int(eligible[rng.integers(len(eligible))])
        take = np.minimum(matrix[f], remaining)
        labels = np.repeat(np.arange(len(take)), take)
        labels = rng.permutation(labels)[:cap]
        frames.append(tuple(int(i) for i in labels))
        before = remaining > 0
        remaining -= np.bincount(labels, minlength=len(remaining))
        done = np.flatnonzero(before & (remaining == 0))
        if len(done):
            hits -= present[:, done].sum(1)
    return frames
