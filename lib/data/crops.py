"""ROI and context crops from frames: each frame decoded once for all its boxes, frames spread over processes.

Per box, cached as PNG at the cache size so the loader never touches the (large) frames:
- `roi`: the box grown by `pad` (a fraction of the box side), optionally square, clipped to the frame;
- `ctx<s>`: a square of s times the box's longer side centred on the box, the part outside the
  frame filled with `fill` (the 1st place read the ROI with 3x, 5x and full-frame context);
- `full`: the whole frame, letterboxed with `fill` (one file per frame, shared by its boxes);
- `testlike`: the ROI downscaled by a per-box factor then upscaled back, so validation can be
  scored on boxes as small as the test set's.
"""
from __future__ import annotations

import contextlib
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from lib.core.io import write_error
from lib.data.frames import oversize_reason
from lib.data.manifest import CropFile, entry

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class CropSpec:
    """How every crop is cut; shared by all jobs of a run."""

    pad: float = 0.1
    square: bool = True
    size: int = 96
    context_scales: tuple[float, ...] = ()
    context_full: bool = False
    fill: tuple[int, int, int] = (0, 0, 0)  # RGB
    max_frame_pixels: int | None = None  # a larger frame (from its header) is refused undecoded; None: no limit

    def kinds(self) -> list[str]:
        return ["roi", *[context_name(s) for s in self.context_scales], *(["full"] if self.context_full else [])]


def context_name(scale: float) -> str:
    return f"ctx{scale:g}"


@dataclass
class BoxJob:
    """One box: where each kind of crop goes; `testlike` is the downscale factor (None: no such crop)."""

    bbox: Box
    outputs: dict[str, Path]
    testlike: float | None = None


@dataclass
class FrameJob:
    """One frame and the boxes to cut from it."""

    frame: Path
    boxes: list[BoxJob] = field(default_factory=list)


@dataclass
class FrameCrops:
    """What one frame's job gave: an error or '' per box, each crop file written with its size and digest
    (carried back from the worker, so 00's manifest never reads a crop again), and the decoded frame's
    (width, height) (None when it could not be decoded): rois.csv's frame_w, frame_h."""

    errors: list[str]
    files: dict[Path, CropFile] = field(default_factory=dict)
    frame_size: tuple[int, int] | None = None


def roi_window(bbox: Box, width: int, height: int, pad: float, square: bool) -> tuple[int, int, int, int] | None:
    """Integer window (x0, y0, x1, y1) of the padded box clipped to the frame, or None if empty."""
    x, y, w, h = bbox
    cx, cy = x + w / 2, y + h / 2
    pw, ph = w * (1 + 2 * pad), h * (1 + 2 * pad)
    if square:
        pw = ph = max(pw, ph)
    x0, y0 = max(0, math.floor(cx - pw / 2)), max(0, math.floor(cy - ph / 2))
    x1, y1 = min(width, math.ceil(cx + pw / 2)), min(height, math.ceil(cy + ph / 2))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return x0, y0, x1, y1


def _resize(patch: np.ndarray, w: int, h: int) -> np.ndarray:
    interp = cv2.INTER_AREA if patch.shape[1] > w or patch.shape[0] > h else cv2.INTER_LINEAR
    return cv2.resize(patch, (w, h), interpolation=interp)


def crop_roi(frame: np.ndarray, bbox: Box, pad: float, square: bool, size: int) -> np.ndarray | None:
    """The ROI crop, `size` x `size`, or None when the box lies wholly outside the frame."""
    h, w = frame.shape[:2]
    win = roi_window(bbox, w, h, pad, square)
    if win is None:
        return None
    x0, y0, x1, y1 = win
    return _resize(frame[y0:y1, x0:x1], size, size)


def crop_context(frame: np.ndarray, bbox: Box, scale: float, size: int, fill: Sequence[int]) -> np.ndarray:
    """A square of `scale` x the box's longer side centred on the box; outside the frame is `fill`.

    Only the part inside the frame is resized (straight into its place on a `size` canvas), so a
    5x context of a large box costs no full-resolution canvas.
    """
    h, w = frame.shape[:2]
    x, y, bw, bh = bbox
    side = max(1, int(round(scale * max(bw, bh))))
    x0, y0 = int(round(x + bw / 2 - side / 2)), int(round(y + bh / 2 - side / 2))
    canvas = np.empty((size, size, 3), dtype=frame.dtype)
    canvas[:] = fill
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        k = size / side
        dx0, dy0 = round((sx0 - x0) * k), round((sy0 - y0) * k)
        dx1, dy1 = max(dx0 + 1, round((sx1 - x0) * k)), max(dy0 + 1, round((sy1 - y0) * k))
        canvas[dy0:dy1, dx0:dx1] = _resize(frame[sy0:sy1, sx0:sx1], dx1 - dx0, dy1 - dy0)
    return canvas


def crop_full(frame: np.ndarray, size: int, fill: Sequence[int]) -> np.ndarray:
    """The whole frame, letterboxed into `size` x `size` (aspect kept)."""
    h, w = frame.shape[:2]
    s = size / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    canvas = np.empty((size, size, 3), dtype=frame.dtype)
    canvas[:] = fill
    ox, oy = (size - nw) // 2, (size - nh) // 2
    canvas[oy:oy + nh, ox:ox + nw] = _resize(frame, nw, nh)
    return canvas


def down_up(img: np.ndarray, factor: float) -> np.ndarray:
    """Downscale by `factor` (<= 1) and back: the detail a box that small would have had."""
    if factor >= 1:
        return img
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


class ShortWrite(Exception):
    """A crop file on disk holds fewer bytes than were written (a full disk that reported success)."""


def _write_file(path: Path, data: bytes) -> None:
    """Plain write (no fsync: a crop is cheap to cut again, and 00's record vouches for every crop's size)."""
    with open(path, "wb") as f:
        f.write(data)


def write_png(path: Path, img_bgr: np.ndarray) -> CropFile:
    """Encode in memory, write via a temp name, check the file holds every byte, then rename; returns the
    size and sha256 of the bytes written (hashed here, in memory: the manifest never reads a crop back).

    A write that fails or comes up short (a full disk where the encoder still reports success) is
    one sentence naming the file (`write_error`), never a crop vouched for; a killed run never
    leaves half a crop under its final name.
    """
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        ok, buf = cv2.imencode(".png", img_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok or buf.size == 0:
            raise ValueError(f"the PNG encoder gave no bytes for a {img_bgr.shape} crop")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = buf.tobytes()
        _write_file(tmp, data)
        if tmp.stat().st_size != len(data):
            raise ShortWrite(f"{tmp.stat().st_size} of {len(data)} bytes written")
        tmp.replace(path)
        return entry(data)
    except (OSError, ShortWrite) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, e) from None


def placeholder(size: int, fill: Sequence[int]) -> np.ndarray:
    """A flat crop for a test box that could not be cut: later stages still see a file."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = fill[::-1]  # BGR
    return img


def crop_one_frame(frame: np.ndarray, jobs: Sequence[BoxJob], spec: CropSpec) -> FrameCrops:
    """Cut every crop of every box of a decoded (BGR) frame; returns an error or '' per box and the files written."""
    fill_bgr = tuple(int(v) for v in spec.fill[::-1])
    full = crop_full(frame, spec.size, fill_bgr) if spec.context_full else None
    written: dict[Path, CropFile] = {}  # the full-frame crop is one file per frame, shared by its boxes
    errors = []
    for job in jobs:
        roi = crop_roi(frame, job.bbox, spec.pad, spec.square, spec.size)
        if roi is None:
            errors.append("box lies wholly outside its frame")
            continue
        crops = {"roi": roi}
        for s in spec.context_scales:
            crops[context_name(s)] = crop_context(frame, job.bbox, s, spec.size, fill_bgr)
        if full is not None:
            crops["full"] = full
        if job.testlike is not None:
            crops["testlike"] = down_up(roi, job.testlike)
        for k, img in crops.items():
            dst = job.outputs.get(k)
            if dst is None or dst in written:
                continue
            written[dst] = write_png(dst, img)  # a failed write stops the stage (one sentence): the disk's fault, not the box's
        errors.append("")
    return FrameCrops(errors, written, (int(frame.shape[1]), int(frame.shape[0])))


def decode_frame(path: Path, max_pixels: int | None) -> np.ndarray | str:
    """The frame as BGR, or why not: its header is read first, so a decompression bomb is refused undecoded,
    and any decode error (cv2.error, MemoryError...) is a reason, never a traceback."""
    reason = oversize_reason(path, max_pixels)
    if reason is not None:
        return reason
    try:
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except (cv2.error, MemoryError, ValueError, OverflowError) as e:
        return f"frame {path.name} could not be decoded ({type(e).__name__})"
    if frame is None:
        return f"frame {path.name} could not be decoded (missing, corrupt or truncated)"
    return frame


def _process_frame(args: tuple[FrameJob, CropSpec]) -> FrameCrops:
    """Worker: decode one frame once, cut all its boxes."""
    job, spec = args
    frame = decode_frame(job.frame, spec.max_frame_pixels)
    if isinstance(frame, str):
        return FrameCrops([frame] * len(job.boxes))
    return crop_one_frame(frame, job.boxes, spec)


def crop_frames(jobs: list[FrameJob], spec: CropSpec, workers: int, desc: str = "crop frames") -> list[FrameCrops]:
    """Crop every job's boxes; returns, per job, an error string per box ('' when written) and the files written."""
    args = [(j, spec) for j in jobs]
    results: list[FrameCrops] = []
    with tqdm(total=len(jobs), desc=desc, unit="frame", leave=False) as bar:  # closed (cleared) on an error too
        if workers <= 1 or len(jobs) < 2:
            for a in args:
                results.append(_process_frame(a))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=workers) as ex:
            try:
                for res in ex.map(_process_frame, args, chunksize=max(1, len(args) // (workers * 16))):
                    results.append(res)
                    bar.update()
            except BaseException:  # a write error (disk full) stops the stage: the frames not started are not cut
                ex.shutdown(wait=True, cancel_futures=True)
                raise
    return results
