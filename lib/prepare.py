"""Assemble the ROI table of 00_prepare_data: label space, checked boxes, crops, folds, rejects.

`rois.csv` is the contract with every later stage: one row per annotation of train and test,
with its label, fold, box and crop path. Train rows that cannot be used go to `rejects.csv` and
are dropped; test rows are never dropped: they stay with `ok = 0` so 04 still answers them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.coco import CocoSet, frame_path, read_coco
from lib.config import Config
from lib.crops import FrameJob, crop_frames
from lib.folds import assign_folds
from lib.stages import StageError
from lib.taxonomy import Taxonomy, TaxonomyError, load_taxonomy_csv

log = logging.getLogger("pipeline")

ROI_COLUMNS = ["split", "annotation_id", "image_id", "label", "concept_name", "fold", "x", "y", "w", "h", "crop_path", "ok"]


@dataclass
class Prepared:
    rois: pd.DataFrame
    rejects: pd.DataFrame
    taxonomy: Taxonomy


def data_paths(cfg: Config) -> dict[str, Path]:
    root = Path(cfg.data.root)
    return {
        "train_json": root / cfg.data.train_json,
        "test_json": root / cfg.data.test_json,
        "train_images": root / cfg.data.train_images,
        "test_images": root / cfg.data.test_images,
        "taxonomy_csv": Path(cfg.data.taxonomy_csv),
    }


def label_space(train: CocoSet, table: Taxonomy) -> Taxonomy:
    """The dataset's concepts in category-id order, with lineages from the taxonomy table."""
    try:
        return table.subset(list(train.categories["name"]))
    except TaxonomyError as e:
        raise StageError(str(e))


def _annotation_rows(split: str, coco: CocoSet, tax: Taxonomy, images_dir: Path, crops_dir: Path) -> tuple[list[dict], list[dict], list[FrameJob]]:
    """Check each annotation; returns candidate rows, rejects and the crop jobs per frame."""
    images = coco.images.drop_duplicates("id").set_index("id")
    cat_name = dict(zip(coco.categories["id"], coco.categories["name"]))
    rows, rejects, by_frame = [], [], {}
    seen: set = set()
    for a in coco.annotations.itertuples(index=False):
        row = {
            "split": split, "annotation_id": a.id, "image_id": a.image_id, "label": -1, "concept_name": "",
            "fold": -1, "x": a.x, "y": a.y, "w": a.w, "h": a.h, "crop_path": "", "ok": 1,
        }
        reason = ""
        if a.id in seen:
            reason = "duplicate annotation id"
        elif a.image_id not in images.index:
            reason = f"image_id {a.image_id} is not in the images list"
        elif not (np.isfinite([a.x, a.y, a.w, a.h]).all() and a.w > 0 and a.h > 0):
            reason = "bbox is not four finite numbers with positive width and height"
        elif split == "train":
            name = cat_name.get(a.category_id)
            if name is None or name not in tax:
                reason = f"category_id {a.category_id} is not a known category"
            else:
                row["concept_name"], row["label"] = name, tax.index(name)
        if not reason:
            im = images.loc[a.image_id]
            path = frame_path(images_dir, int(a.image_id), im["file_name"])
            if path is None:
                reason = f"frame of image {a.image_id} not found in {images_dir}"
            else:
                crop = crops_dir / split / f"{a.id}.png"
                row["crop_path"] = str(crop)
                by_frame.setdefault(path, []).append(len(rows))
        seen.add(a.id)
        if reason:
            rejects.append({"split": split, "annotation_id": a.id, "image_id": a.image_id, "reason": reason})
            row["ok"] = 0
        rows.append(row)
    jobs = [
        FrameJob(frame=p, boxes=[(rows[i]["x"], rows[i]["y"], rows[i]["w"], rows[i]["h"]) for i in idx],
                 out_paths=[Path(rows[i]["crop_path"]) for i in idx], keys=idx)
        for p, idx in by_frame.items()
    ]
    return rows, rejects, jobs


def prepare(cfg: Config, out_dir: Path) -> Prepared:
    """Read both JSON files, crop every usable box, assign folds; nothing is written but crops."""
    paths = data_paths(cfg)
    table = load_taxonomy_csv(paths["taxonomy_csv"])
    train, test = read_coco(paths["train_json"]), read_coco(paths["test_json"])
    tax = label_space(train, table)
    all_rows, all_rejects = [], []
    for split, coco, images_dir in (("train", train, paths["train_images"]), ("test", test, paths["test_images"])):
        if not images_dir.is_dir():
            raise StageError(f"Frames folder '{images_dir}' does not exist; download the frames or set data.{split}_images.")
        rows, rejects, jobs = _annotation_rows(split, coco, tax, images_dir, out_dir / "crops")
        errors = crop_frames(jobs, cfg.prepare.pad, cfg.prepare.square, cfg.prepare.crop_size, cfg.prepare.workers)
        for job, errs in zip(jobs, errors):
            for i, err in zip(job.keys, errs):
                if err:
                    rows[i]["ok"], rows[i]["crop_path"] = 0, ""
                    rejects.append({"split": split, "annotation_id": rows[i]["annotation_id"], "image_id": rows[i]["image_id"], "reason": err})
        all_rows += rows
        all_rejects += rejects
    rois = pd.DataFrame(all_rows, columns=ROI_COLUMNS)
    # Unusable train rows are dropped (they are in rejects.csv); test rows always stay.
    rois = rois[(rois["split"] == "test") | (rois["ok"] == 1)].reset_index(drop=True)
    is_train = (rois["split"] == "train").to_numpy()
    if is_train.sum() == 0:
        raise StageError("No usable training boxes; check rejects.csv and the data paths.")
    rois.loc[is_train, "fold"] = assign_folds(
        rois.loc[is_train, "label"].to_numpy(), rois.loc[is_train, "image_id"].to_numpy(), cfg.prepare.n_folds, cfg.seed
    )
    rois["crop_path"] = [str(Path(p).relative_to(out_dir)) if p else "" for p in rois["crop_path"]]
    rejects = pd.DataFrame(all_rejects, columns=["split", "annotation_id", "image_id", "reason"])
    return Prepared(rois=rois, rejects=rejects, taxonomy=tax)


def load_rois(prepare_dir: Path) -> pd.DataFrame:
    """rois.csv with crop paths made absolute (relative to the stage folder on disk)."""
    rois = pd.read_csv(prepare_dir / "rois.csv", keep_default_na=False)
    rois["crop_path"] = [str(prepare_dir / p) if p else "" for p in rois["crop_path"]]
    return rois
