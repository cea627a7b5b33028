"""A frame's size from its header alone, so a decompression bomb is refused before any pixel is decoded.

A 30000 x 30000 1-bit PNG is about 100 KB on disk and 2.7 GB once decoded to BGR; PNG and JPEG
keep their dimensions in the first bytes, which Pillow reads without decoding the image.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator

from PIL import Image

_LOCK = threading.Lock()  # Pillow's bomb limit is a module global: lifted for one header read at a time


@contextlib.contextmanager
def pillow_bomb_limit_lifted() -> Iterator[None]:
    """Pillow without its own decompression-bomb limit, for header reads and verify() (which decode no pixel)."""
    with _LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def frame_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the image's header; raises (OSError, ValueError, ...) for a file that is not an image."""
    with pillow_bomb_limit_lifted(), Image.open(path) as im:
        return im.size


def too_large(w: int, h: int, max_pixels: int | None) -> str | None:
    """Why a w x h frame is refused, or None."""
    if max_pixels is None or w * h <= max_pixels:
        return None
    return f"{w} x {h} pixels ({w * h / 1e6:.0f} megapixels), above prepare.max_frame_pixels={max_pixels}; refused undecoded"


def oversize_reason(path: str | Path, max_pixels: int | None) -> str | None:
    """Why a frame is refused for its size (or cannot be read at all), or None when it may be decoded."""
    try:
        w, h = frame_size(path)
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError... for bad files
        return f"frame {Path(path).name} could not be decoded (missing, corrupt or truncated: {type(e).__name__})"
    why = too_large(w, h, max_pixels)
    return None if why is None else f"frame {Path(path).name} is {why}"
