"""ROI crops from frames: each frame decoded once for all its boxes, frames spread over processes.

A crop is the box grown by `pad` (a fraction of the box side), optionally made square around the
box centre, clipped to the frame, and resized to the cache size. Crops are cached as PNG so the
training loader never touches the (large) frames.
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm


@dataclass
class FrameJob:
    """One frame and the boxes to cut from it; `out_paths[i]` receives box i."""

    frame: Path
    boxes: list[tuple[float, float, float, float]]
    out_paths: list[Path]
    keys: list[int] = field(default_factory=list)


def roi_window(bbox: tuple[float, float, float, float], width: int, height: int, pad: float, square: bool) -> tuple[int, int, int, int] | None:
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


def crop_box(frame: np.ndarray, bbox: tuple[float, float, float, float], pad: float, square: bool, size: int) -> np.ndarray | None:
    """The cached crop of one box (RGB or BGR as the frame), `size` x `size`."""
    h, w = frame.shape[:2]
    win = roi_window(bbox, w, h, pad, square)
    if win is None:
        return None
    x0, y0, x1, y1 = win
    patch = frame[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if max(patch.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def _process_frame(args: tuple[FrameJob, float, bool, int]) -> list[tuple[int, str]]:
    """Worker: decode one frame, write its crops; returns (box index, error or '') per box."""
    job, pad, square, size = args
    frame = cv2.imread(str(job.frame), cv2.IMREAD_COLOR)
    if frame is None:
        return [(i, f"frame {job.frame.name} could not be decoded") for i in range(len(job.boxes))]
    out = []
    for i, (bbox, dst) in enumerate(zip(job.boxes, job.out_paths)):
        crop = crop_box(frame, bbox, pad, square, size)
        if crop is None:
            out.append((i, "box lies outside its frame"))
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.stem}.tmp.png")
        if not cv2.imwrite(str(tmp), crop, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            out.append((i, f"could not write {dst}"))
            continue
        tmp.replace(dst)
        out.append((i, ""))
    return out


def crop_frames(jobs: list[FrameJob], pad: float, square: bool, size: int, workers: int) -> list[list[str]]:
    """Crop every job's boxes; returns, per job, an error string per box ('' when written)."""
    results: list[list[str]] = [[""] * len(j.boxes) for j in jobs]
    args = [(j, pad, square, size) for j in jobs]
    bar = tqdm(total=len(jobs), desc="crop frames", unit="frame", leave=False)
    if workers <= 1:
        mapped = map(_process_frame, args)
        for k, res in enumerate(mapped):
            for i, err in res:
                results[k][i] = err
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            for k, res in enumerate(ex.map(_process_frame, args, chunksize=max(1, len(args) // (workers * 8) or 1))):
                for i, err in res:
                    results[k][i] = err
                bar.update()
    bar.close()
    return results
