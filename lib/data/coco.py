"""Read and check competition COCO JSON files (train and test alike).

The JSON is parsed into three small tables. Problems with the file as a whole (not JSON, missing
keys) are errors; problems with single rows (a box outside its frame, an unknown image) are left
to the caller, which sends them to `rejects.csv` with a reason.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from lib.core.errors import StageError

TOP_KEYS = ("images", "annotations", "categories")
log = logging.getLogger("pipeline")


@dataclass
class CocoSet:
    """images: id, width, height, file_name, coco_url, uuid ('' when absent);
    annotations: id, image_id, category_id, x, y, w, h; categories: id, name."""

    images: pd.DataFrame
    annotations: pd.DataFrame
    categories: pd.DataFrame
    bad_ids: list[dict] = field(default_factory=list)  # annotations left out: their id is not an integer


def as_id(value) -> int | None:
    """An id from the JSON as an int, or None: ids name files (crops, frames), so only integers pass."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def read_coco(path: str | Path) -> CocoSet:
    """The three tables of a COCO file; images and annotations whose id is not an integer are left out (with a warning).

    Annotation ids name crop files and image ids name frames, so a string id such as
    '../../x' could otherwise write outside its folder.
    """
    p = Path(path)
    if not p.is_file():
        raise StageError(f"COCO file '{p}' does not exist; set data.root / data.train_json / data.test_json to the competition JSON files.")
    try:
        obj = json.loads(p.read_text())
    except ValueError as e:
        raise StageError(f"COCO file '{p}' is not valid JSON ({e}); download it again.") from e
    missing = [k for k in TOP_KEYS if not isinstance(obj.get(k), list)]
    if missing:
        raise StageError(f"COCO file '{p}' lacks the list(s) {', '.join(missing)}; it is not a competition dataset file.")
    good_images = [im for im in obj["images"] if isinstance(im, dict) and as_id(im.get("id")) is not None]
    anns = [a for a in obj["annotations"] if isinstance(a, dict)]
    bad = [a for a in anns if as_id(a.get("id")) is None]
    n_bad_images = len(obj["images"]) - len(good_images)
    if bad or n_bad_images:
        log.warning("%s: left out %d annotation(s) and %d image(s) whose id is not an integer (e.g. %s)", p.name, len(bad),
                    n_bad_images, ", ".join(repr(a.get("id")) for a in bad[:3]) or "an image")
    images = pd.DataFrame(
        [
            {
                "id": as_id(im.get("id")),
                "width": im.get("width"),
                "height": im.get("height"),
                "file_name": str(im.get("file_name") or ""),
                "coco_url": str(im.get("coco_url") or ""),
                "uuid": str(im.get("uuid") or ""),
            }
            for im in good_images
        ],
        columns=["id", "width", "height", "file_name", "coco_url", "uuid"],
    )
    rows = []
    for a in anns:
        if as_id(a.get("id")) is None:
            continue
        bbox = a.get("bbox")
        ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
        x, y, w, h = (float(v) for v in bbox) if ok and bbox is not None else (float("nan"),) * 4
        rows.append({"id": as_id(a.get("id")), "image_id": a.get("image_id"), "category_id": a.get("category_id"), "x": x, "y": y, "w": w, "h": h})
    annotations = pd.DataFrame(rows, columns=["id", "image_id", "category_id", "x", "y", "w", "h"])
    categories = pd.DataFrame(
        [{"id": c.get("id"), "name": str(c.get("name", "")).strip()} for c in obj["categories"]], columns=["id", "name"]
    ).sort_values("id", kind="stable").reset_index(drop=True)
    bad_ids = [{"annotation_id": str(a.get("id")), "image_id": a.get("image_id"), "reason": "annotation id is not an integer"} for a in bad]
    return CocoSet(images=images, annotations=annotations, categories=categories, bad_ids=bad_ids)


def safe_file_name(name: str) -> str | None:
    """The base name of a JSON `file_name`, or None if it tries to leave its folder."""
    pure = PurePosixPath(name.replace("\\", "/"))
    base = pure.name
    if not base or base in (".", "..") or pure.is_absolute() or ".." in pure.parts:
        return None
    return base


def frame_path(images_dir: Path, image_id: int, file_name: str) -> Path | None:
    """The frame on disk: the JSON's file_name, else `<id>.png` (the official download.py layout, and --download's).

    The file_name comes first: in one folder shared by train and test frames, image ids may repeat
    across the two JSON files while file names do not.
    """
    for name in (safe_file_name(file_name), f"{image_id}.png"):
        if name and (images_dir / name).is_file():
            return images_dir / name
    return None
