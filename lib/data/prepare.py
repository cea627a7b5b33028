"""Assemble the ROI table of 00_prepare_data: label space, checked boxes, crops, folds, rejects.

`rois.csv` is the contract with every later stage: one row per annotation of train and test,
with its label, fold, box and crop paths. Train rows that cannot be used go to `rejects.csv` and
are dropped; test rows are never dropped: a test box that cannot be cut keeps a flagged
placeholder crop (`ok = 0`), so 04 still writes a row for it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.config import Config
from lib.core.errors import StageError
from lib.core.io import atomic_path, atomic_write_json
from lib.data import manifest
from lib.data.coco import CocoSet, frame_path, read_coco, safe_file_name
from lib.data.crops import (
    BoxJob,
    CropSpec,
    FrameJob,
    crop_frames,
    placeholder,
    write_png,
)
from lib.data.folds import assign_folds
from lib.data.manifest import CropFile
from lib.data.taxonomy import Taxonomy, TaxonomyError, load_taxonomy_csv

log = logging.getLogger("pipeline")


EXTRA_ROIS = "extra_rois.csv"  # extra training rows (data.extra): train only, never in a validation fold
# frame_w, frame_h: the decoded frame's size (empty where it could not be decoded); lib.data.resample reads them
BASE_COLUMNS = ["split", "annotation_id", "image_id", "label", "concept_name", "fold", "x", "y", "w", "h", "frame_w", "frame_h",
                "crop_path", "ok"]


@dataclass
class Preparation:
    """What `prepare` found, before it is written: the ROIs (crop paths relative to the stage folder), rejects, taxonomy, summary."""

    rois: pd.DataFrame
    rejects: pd.DataFrame
    taxonomy: Taxonomy
    summary: dict
    crops: dict[str, CropFile] = field(default_factory=dict)  # every crop rois.csv names -> size, sha256 (crops_manifest.json)
    extra: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=[*BASE_COLUMNS, "source"]))  # train-only rows

    def write(self, folder: Path) -> None:
        """rois.csv, extra_rois.csv, rejects.csv, taxonomy.json, summary.json and crops_manifest.json, each atomically."""
        self._write(folder)
        with atomic_path(folder / EXTRA_ROIS) as tmp:
            self.extra.to_csv(tmp, index=False)

    def _write(self, folder: Path) -> None:
        atomic_write_json(folder / manifest.MANIFEST, manifest.to_json(self.crops))
        with atomic_path(folder / "rois.csv") as tmp:
            self.rois.to_csv(tmp, index=False)
        with atomic_path(folder / "rejects.csv") as tmp:
            self.rejects.to_csv(tmp, index=False)
        atomic_write_json(folder / "taxonomy.json", self.taxonomy.to_json())
        atomic_write_json(folder / "summary.json", self.summary)

    def to_record(self) -> dict:
        """00's record result: usable train ROIs, test ROIs (with and without a crop), rejects, classes."""
        counts = self.rois.groupby("split")["ok"].agg(["size", "sum"]).to_dict("index")
        test = counts.get("test", {})
        return {
            "train_rois": int(counts.get("train", {}).get("sum", 0)),
            "test_rois": int(test.get("size", 0)),
            "test_rois_without_crop": int(test.get("size", 0) - test.get("sum", 0)),
            "rejects": len(self.rejects),
            "classes": self.taxonomy.n_classes,
            "extra_rois": len(self.extra),
            "crops": manifest.summary(self.crops),  # the record vouches for every crop file (lib.data.manifest)
        }

    def log_summary(self, name: str) -> None:
        """What a user checks first, on the console: usable rows, classes, box sizes, rejects by reason."""
        s = self.summary
        log.info("%s: %s", name, ", ".join(f"{k} {v['usable']}/{v['rows']} usable" for k, v in s["rois"].items()))
        log.info("%s: %d classes, %d..%d train boxes per class; box side quantiles %s: train %s, test %s", name, s["classes"],
                 *s["per_class_min_max"], s["box_side_quantiles"]["q"], s["box_side_quantiles"]["train"], s["box_side_quantiles"]["test"])
        for reason, n in s["rejects"].items():
            log.info("%s: rejected %d x %s", name, n, reason)


def crop_spec(cfg: Config) -> CropSpec:
    p = cfg.prepare
    return CropSpec(pad=p.pad, square=p.square, size=p.crop_size, context_scales=tuple(p.context_scales or ()),
                    context_full=bool(p.context_full), fill=(p.fill[0], p.fill[1], p.fill[2]),
                    max_frame_pixels=p.max_frame_pixels)


def path_column(kind: str) -> str:
    """rois.csv column of a crop kind: the ROI keeps `crop_path`, others are `<kind>_path`."""
    return "crop_path" if kind == "roi" else f"{kind}_path"


def label_space(train: CocoSet, table: Taxonomy, table_path: str | Path = "the taxonomy table") -> Taxonomy:
    """The dataset's concepts in category-id order, with lineages from the taxonomy table (read from `table_path`)."""
    try:
        return table.subset(list(train.categories["name"]), f"the taxonomy table '{table_path}' (data.taxonomy_csv)")
    except TaxonomyError as e:
        raise StageError(str(e)) from e


def box_sides(coco: CocoSet) -> np.ndarray:
    """sqrt(w * h) of the usable boxes: the size scale the test-like view matches."""
    a = coco.annotations
    ok = np.isfinite(a[["w", "h"]].to_numpy()).all(1) & (a["w"] > 0) & (a["h"] > 0)
    return np.sqrt((a.loc[ok, "w"] * a.loc[ok, "h"]).to_numpy(dtype=float))


def small_box_factors(train_sides: np.ndarray, test_sides: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """Per train box, how much to downscale its cached ROI so its detail matches a test box of the same size rank.

    Quantile matching: a train box at rank q of the train sizes takes the q-quantile of the test
    sizes. The cached crop holds min(window, size) pixels of detail; a test-sized box would have
    held min(window * target / side, size).
    """
    if len(test_sides) == 0 or len(train_sides) == 0:
        return np.ones(len(train_sides))
    q = (np.argsort(np.argsort(train_sides)) + 0.5) / len(train_sides)
    target = np.quantile(test_sides, q, method="hazen")  # rank r of n maps onto rank r of n exactly
    have = np.minimum(windows, size)
    want = np.minimum(windows * np.minimum(1.0, target / train_sides), size)
    return np.clip(want / have, 0.05, 1.0)


def _check_rows(split: str, coco: CocoSet, tax: Taxonomy, images_dir: Path) -> tuple[list[dict], list[dict], dict[Path, list[int]]]:
    """Check each annotation; returns rows, rejects and the row indices per frame to crop."""
    images = coco.images.drop_duplicates("id").set_index("id")
    cat_name = dict(zip(coco.categories["id"], coco.categories["name"]))
    rows: list[dict] = []
    rejects: list[dict] = []
    by_frame: dict[Path, list[int]] = {}
    seen: set = set()
    for a in coco.annotations.itertuples(index=False):
        row = {"split": split, "annotation_id": a.id, "image_id": a.image_id, "label": -1, "concept_name": "",
               "fold": -1, "x": a.x, "y": a.y, "w": a.w, "h": a.h, "crop_path": "", "ok": 1}
        reason, path = "", None
        if a.id in seen:
            reason = "duplicate annotation id"
        elif a.image_id not in images.index:
            reason = f"image_id {a.image_id} is not in the images list"
        elif not (np.isfinite([a.x, a.y, a.w, a.h]).all() and a.w > 0 and a.h > 0):
            reason = "bbox is not four finite numbers with positive width and height"
        elif split != "test":  # train and extra rows carry a label
            name = cat_name.get(a.category_id)
            if name is None or name not in tax:
                reason = f"category_id {a.category_id} is not a known category"
            else:
                row["concept_name"], row["label"] = name, tax.index(name)
        if not reason:
            file_name = str(images.loc[a.image_id, "file_name"])
            path = frame_path(images_dir, int(a.image_id), file_name)
            if path is None and file_name and safe_file_name(file_name) is None:
                reason = f"file_name '{file_name}' has path parts; refused"
            elif path is None:
                reason = f"frame of image {a.image_id} not found in {images_dir}"
        seen.add(a.id)
        if reason and split == "test" and reason == "duplicate annotation id":
            rejects.append({"split": split, "annotation_id": a.id, "image_id": a.image_id, "reason": reason})
            continue  # the submission holds one row per id: the first one answers for both
        if reason:
            rejects.append({"split": split, "annotation_id": a.id, "image_id": a.image_id, "reason": reason})
            row["ok"] = 0
        elif path is not None:  # no reason: the frame was found
            by_frame.setdefault(path, []).append(len(rows))
        rows.append(row)
    return rows, rejects, by_frame


def _crop_split(split: str, rows: list[dict], by_frame: dict[Path, list[int]], spec: CropSpec, crops_dir: Path,
                factors: dict[int, float], workers: int) -> tuple[list[dict], dict[Path, CropFile]]:
    """Cut the crops of one split; fills the path columns of `rows`; returns new rejects and every crop written
    (its size and digest, for the manifest)."""
    kinds = spec.kinds() + (["testlike"] if factors else [])

    def outputs(i: int) -> dict[str, Path]:
        name = {k: f"{rows[i]['annotation_id']}.png" for k in kinds}
        name["full"] = f"frame_{rows[i]['image_id']}.png"  # one per frame
        return {k: crops_dir / k / split / name[k] for k in kinds if k != "testlike" or i in factors}

    jobs = [FrameJob(frame=p, boxes=[BoxJob(bbox=(rows[i]["x"], rows[i]["y"], rows[i]["w"], rows[i]["h"]),
                                            outputs=outputs(i), testlike=factors.get(i)) for i in idx])
            for p, idx in by_frame.items()]
    results = crop_frames(jobs, spec, workers, desc=f"crop {split} frames")
    written = {p: f for res in results for p, f in res.files.items()}
    rejects = []
    for idx, res in zip(by_frame.values(), results):
        for i, err in zip(idx, res.errors):
            if res.frame_size is not None:
                rows[i]["frame_w"], rows[i]["frame_h"] = res.frame_size
            if err:
                rows[i]["ok"] = 0
                rejects.append({"split": split, "annotation_id": rows[i]["annotation_id"], "image_id": rows[i]["image_id"], "reason": err})
            else:
                for k, p in outputs(i).items():
                    rows[i][path_column(k)] = str(p)
    if split == "test":  # never drop a test row: a flagged placeholder stands in for its crops
        flat = placeholder(spec.size, spec.fill)
        for r in rows:
            if not r["ok"]:
                for k in spec.kinds():
                    p = crops_dir / "placeholder" / k / f"{r['annotation_id']}.png"
                    written[p] = write_png(p, flat)
                    r[path_column(k)] = str(p)
    return rejects, written


def prepare(cfg: Config, out_dir: Path) -> Preparation:
    """Read both JSON files, cut every usable box, assign folds; writes only crops."""
    paths = cfg.data.paths()
    train, test = read_coco(paths["train_json"]), read_coco(paths["test_json"])
    if cfg.data.taxonomy_source == "worms":
        from lib.data.worms import worms_table

        worms_table(list(train.categories["name"]), paths["taxonomy_csv"])
    table = load_taxonomy_csv(paths["taxonomy_csv"])
    tax = label_space(train, table, paths["taxonomy_csv"])
    unknown_test = compare_categories(train, test, paths["test_json"])
    spec = crop_spec(cfg)
    frames = []
    all_rejects: list[dict] = []
    written: dict[Path, CropFile] = {}
    for split, coco in (("train", train), ("test", test)):
        images_dir = paths[f"{split}_images"]
        if not images_dir.is_dir():
            raise StageError(f"Frames folder '{images_dir}' does not exist; rerun with --download or set data.{split}_images.")
        check_frames(cfg, coco, images_dir, split)
        rows, rejects, by_frame = _check_rows(split, coco, tax, images_dir)
        factors: dict[int, float] = {}
        if split == "train" and cfg.prepare.test_like:
            idx = [i for ix in by_frame.values() for i in ix]
            sides = np.array([np.sqrt(rows[i]["w"] * rows[i]["h"]) for i in idx])
            windows = np.array([max(rows[i]["w"], rows[i]["h"]) * (1 + 2 * cfg.prepare.pad) for i in idx])
            factors = dict(zip(idx, small_box_factors(sides, box_sides(test), windows, spec.size)))
        cut, files = _crop_split(split, rows, by_frame, spec, out_dir / "crops", factors, cfg.prepare.workers)
        rejects += cut
        written.update(files)
        frames.append(pd.DataFrame(rows))
        all_rejects += [{"split": split, **r} for r in coco.bad_ids] + rejects
    rois = pd.concat(frames, ignore_index=True)
    extra = pd.DataFrame(columns=BASE_COLUMNS)
    if cfg.data.extra:
        extra, cut, files = _extra_rows(cfg, (train, test), tax, spec, out_dir)
        all_rejects += cut
        written.update(files)
    cols = BASE_COLUMNS + [c for c in rois.columns if c.endswith("_path") and c != "crop_path"]
    rois, extra = _as_table(rois, cols, out_dir), _as_table(extra[extra["ok"] == 1], [*cols, "source"], out_dir)
    n_train = int((rois["split"] == "train").sum())
    rois = rois[(rois["split"] == "test") | (rois["ok"] == 1)].reset_index(drop=True)
    rejects = pd.DataFrame(all_rejects, columns=["split", "annotation_id", "image_id", "reason"])
    _check_reject_fraction(rejects, n_train, cfg.prepare.max_reject_fraction)
    if cfg.prepare.holdout:  # a novelty experiment: these concepts stay in the test set only
        unknown = sorted(set(cfg.prepare.holdout) - set(tax.names))
        if unknown:
            raise StageError(f"prepare.holdout names {unknown}, which are not concepts of the taxonomy; fix the names.")
        (rois, held), (extra, held_extra) = (_hold_out(t, cfg.prepare.holdout) for t in (rois, extra))
        rejects = pd.concat([rejects, held, held_extra], ignore_index=True)
    is_train = (rois["split"] == "train").to_numpy()
    rois.loc[is_train, "fold"] = assign_folds(
        rois.loc[is_train, "label"].to_numpy(), rois.loc[is_train, "image_id"].to_numpy(), cfg.prepare.n_folds, cfg.seed
    )
    summary = summarize(rois, rejects, train, test, tax)
    summary["test_categories_not_in_train"] = unknown_test
    if cfg.data.extra:
        summary["extra"] = extra_summary(extra, rejects)
    crops = manifest.build({str(p.relative_to(out_dir)): f for p, f in written.items()},
                           (p for frame in (rois, extra) for c in cols if c.endswith("_path") for p in frame[c]))
    return Preparation(rois=rois, rejects=rejects, taxonomy=tax, summary=summary, crops=crops, extra=extra)


def _as_table(rows: pd.DataFrame, cols: list[str], out_dir: Path) -> pd.DataFrame:
    """`rows` in the table's columns, crop paths relative to the stage folder ('' where a row has none)."""
    table = rows.reindex(columns=cols).reset_index(drop=True)
    for c in cols:
        if c.endswith("_path"):
            table[c] = [str(Path(p).relative_to(out_dir)) if isinstance(p, str) and p else "" for p in table[c]]
    return table


def _hold_out(rows: pd.DataFrame, holdout: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`rows` without the labelled rows of the held-out concepts, and those rows as rejects (test rows stay)."""
    held = (rows["split"] != "test") & rows["concept_name"].isin(holdout)
    out = rows.loc[held, ["split", "annotation_id", "image_id"]].assign(reason="held out of train (prepare.holdout)")
    return rows[~held].reset_index(drop=True), out


def _extra_rows(cfg: Config, comp: tuple[CocoSet, CocoSet], tax: Taxonomy, spec: CropSpec,
                out_dir: Path) -> tuple[pd.DataFrame, list[dict], dict[Path, CropFile]]:
    """The extra data's rows (fold -1: they only ever train), its rejects and its crops.

    Frames that are competition frames (by UUID, URL or perceptual hash) are dropped first, every
    box of them listed in the rejects; the rest are checked and cut like the competition's train rows.
    """
    from lib.data.extra import HASHES_JSON, SOURCE, screen

    paths = cfg.data.paths()
    js, images_dir = paths["extra_json"], paths["extra_images"]
    if not js.is_file():
        raise StageError(f"data.extra is set but '{js}' does not exist; run 00_prepare_data.py --extra fathomnet once online, "
                         "or set data.extra_dir to the folder an earlier run saved.")
    coco = read_coco(js)
    competition = [("train", comp[0], paths["train_images"]), ("test", comp[1], paths["test_images"])]
    dropped = screen(coco, images_dir, competition, cfg.out_root / HASHES_JSON)
    gone = {r["image_id"] for r in dropped}
    coco.annotations = coco.annotations[~coco.annotations["image_id"].isin(gone)].reset_index(drop=True)
    rows, rejects, by_frame = _check_rows("extra", coco, tax, images_dir)
    cut, files = _crop_split("extra", rows, by_frame, spec, out_dir / "crops", {}, cfg.prepare.workers)
    rejects = [{"split": "extra", **r} for r in coco.bad_ids] + dropped + [{**r, "split": "extra"} for r in rejects + cut]
    frame = pd.DataFrame(rows, columns=BASE_COLUMNS).assign(source=SOURCE)
    return frame, rejects, files


def extra_summary(extra: pd.DataFrame, rejects: pd.DataFrame) -> dict:
    """The extra rows at a glance: usable rows, per class, and the frames dropped as competition test or train frames."""
    why = rejects.loc[rejects["split"] == "extra", "reason"].astype(str)
    return {"rows": len(extra), "per_class": {str(k): int(v) for k, v in extra["concept_name"].value_counts().items()},
            "rejected": int(len(why)), "test_frame_boxes": int(why.str.contains("competition test frame").sum()),
            "train_frame_boxes": int(why.str.contains("competition train frame").sum())}


def compare_categories(train: CocoSet, test: CocoSet, test_json: Path) -> list[str]:
    """Warn when the test JSON's categories are not the train JSON's; returns the test names train lacks.

    Test categories are never used to label anything (test boxes carry no category), and every
    answer is one of the train categories, by name; a test-only category cannot be predicted.
    """
    tr = dict(zip(train.categories["id"], train.categories["name"]))
    te = dict(zip(test.categories["id"], test.categories["name"]))
    if not te or te == tr:
        return []
    unknown = [n for n in te.values() if n not in set(tr.values())]
    renamed = sum(1 for i, n in te.items() if i in tr and tr[i] != n)
    log.warning("%s lists categories that differ from the train JSON's (%d not in train%s, %d ids with another name); "
                "answers are train categories by name, so those cannot be predicted", test_json, len(unknown),
                f": {', '.join(map(str, unknown[:5]))}" if unknown else "", renamed)
    return unknown


def _check_reject_fraction(rejects: pd.DataFrame, n_train: int, limit: float) -> None:
    n_bad = int((rejects["split"] == "train").sum())
    if n_train and n_bad:
        top = rejects[rejects["split"] == "train"]["reason"].value_counts()
        log.warning("%d of %d train annotations rejected (see rejects.csv): %s", n_bad, n_train,
                    "; ".join(f"{n} x {r}" for r, n in top.head(3).items()))
    if n_train == 0 or n_bad / max(1, n_train) > limit:
        raise StageError(
            f"{n_bad} of {n_train} train annotations cannot be used (more than prepare.max_reject_fraction={limit}); "
            f"check the data paths and rejects.csv, or raise prepare.max_reject_fraction."
        )


def summarize(rois: pd.DataFrame, rejects: pd.DataFrame, train: CocoSet, test: CocoSet, tax: Taxonomy) -> dict:
    """Counts per split and class, box-size quantiles, rejects by reason: what a user checks first."""
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    sizes = {s: (np.quantile(box_sides(c), qs).round(1).tolist() if len(box_sides(c)) else []) for s, c in (("train", train), ("test", test))}
    per_class = rois[rois["split"] == "train"]["concept_name"].value_counts()
    return {
        "rois": rois.groupby("split")["ok"].agg(["size", "sum"]).rename(columns={"size": "rows", "sum": "usable"}).to_dict("index"),
        "classes": tax.n_classes,
        "per_class_min_max": [int(per_class.min()), int(per_class.max())] if len(per_class) else [0, 0],
        "per_class": {k: int(v) for k, v in per_class.items()},
        "box_side_quantiles": {"q": qs, **sizes},
        "rejects": {f"{s}: {r}": int(n) for (s, r), n in rejects.groupby(["split", "reason"]).size().items()},
    }


def missing_frames(coco: CocoSet, images_dir: Path) -> list[tuple[int, str]]:
    """(image_id, coco_url) of frames with boxes that are not on disk."""
    used = set(coco.annotations["image_id"])
    return [(int(r.id), r.coco_url) for r in coco.images.itertuples(index=False)
            if r.id in used and frame_path(images_dir, int(r.id), r.file_name) is None]


def fetch_frames(cfg: Config, download: bool) -> None:
    """With `download`, fetch the missing frames of both splits into `<images>/<image_id>.png`, then check them."""
    paths = cfg.data.paths()
    for split in ("train", "test"):
        check_frames(cfg, read_coco(paths[f"{split}_json"]), paths[f"{split}_images"], split, download)


def fetch_extra(cfg: Config) -> None:
    """The extra data (data.extra) before 00's fingerprint: its list (fetched once, then read from data.extra_dir) and
    its missing frames, downloaded like the competition's; a frame that fails is rejected with its boxes later."""
    from lib.data.download import DownloadJob, download, remove_partial
    from lib.data.extra import load_or_fetch

    paths, d, p = cfg.data.paths(), cfg.data, cfg.prepare
    cats = read_coco(paths["train_json"]).categories
    js = load_or_fetch(paths["extra_json"], list(zip(cats["id"].astype(int), cats["name"])), d.extra_per_concept,
                       d.extra_total)
    folder = paths["extra_images"]
    missing = missing_frames(read_coco(js), folder)
    remove_partial(folder)
    if missing:
        log.info("downloading %d missing extra data frames into %s", len(missing), folder)
        report = download([DownloadJob(url, folder / f"{i}.png") for i, url in missing], workers=p.download_workers,
                          retries=p.download_retries, timeout=p.download_timeout, max_pixels=p.max_frame_pixels)
        if report.failed:
            log.warning("%d extra data frames could not be downloaded (e.g. %s: %s); their boxes are rejected, rerun online "
                        "to fetch them", len(report.failed), *report.failed[0])


def check_frames(cfg: Config, coco: CocoSet, folder: Path, split: str, download: bool = False) -> None:
    """Report missing frames (fetching them first with `download`).

    Fails with one sentence when more frames stay missing than prepare.max_reject_fraction allows.
    """
    from lib.data.download import DownloadJob, missing_message, remove_partial
    from lib.data.download import download as fetch

    missing = missing_frames(coco, folder)
    report = None
    if download:
        remove_partial(folder)
    if missing and download:
        folder.mkdir(parents=True, exist_ok=True)
        log.info("downloading %d missing %s frames into %s", len(missing), split, folder)
        p = cfg.prepare
        report = fetch([DownloadJob(url, folder / f"{i}.png") for i, url in missing], workers=p.download_workers,
                       retries=p.download_retries, timeout=p.download_timeout, max_pixels=p.max_frame_pixels)
        missing = missing_frames(coco, folder)
    if not missing:
        return
    n_frames = max(1, coco.annotations["image_id"].nunique())
    message = missing_message(len(missing), folder, report)
    if len(missing) / n_frames > cfg.prepare.max_reject_fraction:
        raise StageError(message)
    log.warning("%s", message)
