"""The 1st place's (MATANet, `img_downsampling`) whole-frame down-then-up resampling, emulated on 00's stored crops.

MATANet shrank every training frame by f ~ U(0.01, 1) (both sides) and scaled it back before cutting
the ROI and its 3x / 5x / full crops: every view of a sample sees the same f, and the loss of detail is
relative to the frame's own pixels (a 100 px box at f = 0.1 keeps about 10 px of detail, a 1920 px
frame 192 px). Our crops are cut once by 00 and stored at `prepare.crop_size`, so per view we ask how
many frame pixels the stored crop spans along each side (`native_extent`) and resample the crop to
the detail it would keep: round(min(1, f * native / stored) * stored) pixels, down (INTER_AREA) and
back up (INTER_LINEAR), before the albumentations pipeline (`augment.downscale`, per crop, stays as it is).

A crop that already holds less detail than it stores (a box smaller than the crop, upscaled by 00)
is left alone when the frame's f leaves it at least its own detail, so f = 1 changes nothing.
Views whose native extent is unknown (rows without a box, or the full view of a rois.csv cut before
00 recorded frame_w / frame_h: rerun 00_prepare_data.py --force once) fall back to f on the stored
crop itself, as a per-crop downscale would.

The draws come from numpy's global generator, which the training loop (seed_everything) and every
loader worker (lib.data.dataset.seed_worker) reseed each epoch, so a run stays reproducible for a seed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from lib.config import AugmentCfg, PrepareCfg
from lib.data.crops import roi_window

log = logging.getLogger("pipeline")

Extent = tuple[float, float]  # frame pixels (width, height) a stored crop spans
GEOMETRY = ("x", "y", "w", "h", "frame_w", "frame_h")  # the rois.csv columns it reads: training rows carry them along


def native_extent(view: str, box: tuple[float, float, float, float] | None, frame: tuple[float, float] | None,
                  pad: float, square: bool) -> Extent | None:
    """Frame pixels (along the crop's width, along its height) the stored crop of `view` spans, as 00 cut it; None if unknown.

    `view` is a `model.context` name: "1" the ROI (the box grown by `pad`, squared with `square`, clipped to the frame
    when its size is known), "<k>" the square of k x the box's longer side, "full" the letterboxed frame (its longer side
    on both axes). `box` is (x, y, w, h) in frame pixels, `frame` (width, height).
    """
    if view == "full":
        return None if frame is None else (float(max(frame)), float(max(frame)))
    if box is None:
        return None
    x, y, w, h = box
    if view == "1":
        if frame is not None:
            win = roi_window(box, int(frame[0]), int(frame[1]), pad, square)
            return None if win is None else (float(win[2] - win[0]), float(win[3] - win[1]))
        pw, ph = w * (1 + 2 * pad), h * (1 + 2 * pad)
        return (max(pw, ph), max(pw, ph)) if square else (pw, ph)
    side = float(max(1, int(round(float(view) * max(w, h)))))  # crops.crop_context's side
    return side, side


def kept_pixels(stored: int, native: float | None, f: float) -> int:
    """Pixels of detail one side of a stored crop keeps when the frame is resampled by `f`; `stored` means untouched.

    Known native extent: round(min(1, f * native / stored) * stored), at least 1, and `stored` when that is no less than
    the detail the crop already holds (min(native, stored)). Unknown: round(f * stored).
    """
    if native is None or not math.isfinite(native) or native <= 0:
        return min(stored, max(1, round(f * stored)))
    kept = max(1, round(min(1.0, f * native / stored) * stored))
    return stored if kept >= min(round(native), stored) else kept


def resample_crop(img: np.ndarray, native: Extent | None, f: float) -> np.ndarray:
    """`img` down to the detail it keeps at frame factor `f` (INTER_AREA) and back to its size (INTER_LINEAR)."""
    h, w = img.shape[:2]
    nw, nh = (None, None) if native is None else native
    tw, th = kept_pixels(w, nw, f), kept_pixels(h, nh, f)
    if (tw, th) == (w, h):
        return img
    small = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


@dataclass
class FrameResample:
    """`augment.frame_resample` for one dataset: probability, factor range and each row's native extents per view.

    `extents` is (rows, views, 2): frame pixels (width, height) per view, NaN where unknown.
    """

    p: float
    low: float
    high: float
    extents: np.ndarray

    def draw(self) -> float | None:
        """This sample's frame factor, or None (no resampling); draws nothing at p = 0."""
        if self.p <= 0 or np.random.random() >= self.p:
            return None
        return float(np.random.uniform(self.low, self.high))

    def __call__(self, imgs: Sequence[np.ndarray], row: int) -> list[np.ndarray]:
        """Row `row`'s views, every one resampled with the same factor (or unchanged when none is drawn)."""
        f = self.draw()
        if f is None:
            return list(imgs)
        out = []
        for v, img in enumerate(imgs):
            nw, nh = self.extents[row, v]
            out.append(resample_crop(img, None if np.isnan(nw) or np.isnan(nh) else (float(nw), float(nh)), f))
        return out


def native_extents(rows: pd.DataFrame, views: Sequence[str], pad: float, square: bool) -> np.ndarray:
    """(rows, views, 2) native extents of each row's views (`native_extent`), NaN where a box or frame size is missing."""
    def col(name: str) -> np.ndarray:
        return pd.to_numeric(rows[name], errors="coerce").to_numpy(float) if name in rows.columns else np.full(len(rows), np.nan)

    x, y, w, h, fw, fh = (col(c) for c in ("x", "y", "w", "h", "frame_w", "frame_h"))
    out = np.full((len(rows), len(views), 2), np.nan)
    for i in range(len(rows)):
        box = (x[i], y[i], w[i], h[i]) if np.isfinite([x[i], y[i], w[i], h[i]]).all() and w[i] > 0 and h[i] > 0 else None
        frame = (fw[i], fh[i]) if np.isfinite([fw[i], fh[i]]).all() and fw[i] > 0 and fh[i] > 0 else None
        for v, view in enumerate(views):
            got = native_extent(view, box, frame, pad, square)
            if got is not None:
                out[i, v] = got
    return out


def frame_resample(rows: pd.DataFrame, views: Sequence[str], aug: AugmentCfg, prep: PrepareCfg) -> FrameResample | None:
    """The training dataset's resampler (None when `augment.frame_resample` is 0): native extents from rois.csv's
    boxes and frame sizes, 00's `prepare.pad` and `prepare.square`. Says once when some views fall back to f on the crop."""
    if aug.frame_resample <= 0:
        return None
    extents = native_extents(rows, views, prep.pad, prep.square)
    unknown = np.isnan(extents[..., 0]).any(axis=0)
    if unknown.any():
        log.warning("augment.frame_resample: %s of %d training rows have no frame pixel size for view(s) %s (no box, or a "
                    "rois.csv without frame_w / frame_h); those crops are resampled by the factor itself. Rerun "
                    "00_prepare_data.py --force once to record the frame sizes.",
                    ", ".join(str(int(n)) for n in np.isnan(extents[..., 0]).sum(axis=0)[unknown]), len(rows),
                    ", ".join(v for v, u in zip(views, unknown) if u))
    lo, hi = aug.frame_resample_range
    return FrameResample(aug.frame_resample, float(lo), float(hi), extents)
