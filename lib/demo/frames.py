"""ROV frames: a seafloor or open-water background, organisms placed with little overlap, their boxes.

The test split is shifted like the real one: smaller boxes, dimmer and bluer frames.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from lib.demo.looks import Look
from lib.demo.sprites import fit, render_sprite


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled smoothly."""
    gw = max(2, cells)
    gh = max(2, int(round(cells * h / w)))
    grid = Image.fromarray(((rng.random((gh, gw)) * 255)).astype(np.uint8), "L")
    up = np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return up / 127.5 - 1.0


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Seafloor (sediment texture, optional horizon) or open water, float32 HxWx3 in 0..255."""
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    if rng.random() < 0.65:
        sed = np.array([rng.uniform(70, 120), rng.uniform(62, 105), rng.uniform(50, 90)], np.float32)
        grey = rng.uniform(0, 0.6)
        sed = sed * (1 - grey) + sed.mean() * grey
        img = sed * (0.65 + 0.5 * yy)
        tex = _smooth_noise(rng, h, w, 6) * 14 + _smooth_noise(rng, h, w, 24) * 9 + _smooth_noise(rng, h, w, 48) * 6
        img = img + tex[:, :, None]
        horizon = rng.uniform(-0.3, 0.45)
        if horizon > 0:
            water = np.array([rng.uniform(5, 20), rng.uniform(25, 50), rng.uniform(40, 70)], np.float32)
            hy = int(horizon * h)
            fade = np.clip((np.arange(h, dtype=np.float32) - hy) / max(2.0, 0.08 * h), 0, 1)[:, None, None]
            img = img * fade + water * (0.6 + 0.4 * yy) * (1 - fade)
    else:
        top = np.array([rng.uniform(10, 40), rng.uniform(50, 95), rng.uniform(70, 120)], np.float32)
        img = np.broadcast_to(top * (1.1 - 0.6 * yy), (h, w, 3)) + (_smooth_noise(rng, h, w, 4) * 8)[:, :, None]
    xx = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    yc = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    vignette = 1.0 - rng.uniform(0.15, 0.35) * (xx ** 2 + yc ** 2) / 2
    return np.ascontiguousarray(img * vignette[:, :, None], dtype=np.float32)


_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _noise_bank(h: int, w: int) -> np.ndarray:
    """Standard-normal sensor noise, drawn once per frame size (fixed seed) and cropped at random
    offsets per frame: about as good as fresh noise and much cheaper."""
    bank = _NOISE.get((h, w))
    if bank is None:
        bank = np.random.default_rng(12345).standard_normal((h + 32, w + 32, 3), dtype=np.float32)
        _NOISE[(h, w)] = bank
    return bank


def _place(rng: np.random.Generator, size: tuple[int, int], frame: tuple[int, int],
           boxes: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """A top-left corner inside the frame that overlaps the boxes already placed little."""
    (sw, sh), (w, h) = size, frame
    best, best_ov = (0, 0), 2.0
    for _ in range(30):
        x, y = int(rng.integers(0, w - sw + 1)), int(rng.integers(0, h - sh + 1))
        ov = 0.0
        for bx, by, bw, bh in boxes:
            iw = min(x + sw, bx + bw) - max(x, bx)
            ih = min(y + sh, by + bh) - max(y, by)
            if iw > 0 and ih > 0:
                ov = max(ov, iw * ih / min(sw * sh, bw * bh))
        if ov < 0.1:
            return x, y
        if ov < best_ov:
            best, best_ov = (x, y), ov
    return best


def render_frame(looks: list[Look], rng: np.random.Generator, width: int, height: int,
                 test: bool) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """One RGB frame with the given organisms and their boxes [x, y, w, h] in the same order."""
    bg = _background(rng, max(8, (width + 1) // 2), max(8, (height + 1) // 2))  # smooth: half resolution
    frame = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB").resize((width, height), Image.Resampling.BILINEAR)
    lo, hi = (0.09, 0.20) if test else (0.18, 0.38)
    limit = min(width, height) - 2
    boxes: list[tuple[int, int, int, int]] = []
    for look in looks:
        side = int(round(min(limit, rng.uniform(lo, hi) * height * look.size)))
        sprite = render_sprite(look, rng, max(6, side))
        if sprite.width > width or sprite.height > height:
            sprite = fit(sprite, limit)
        x, y = _place(rng, sprite.size, (width, height), boxes)
        frame.paste(sprite, (x, y), sprite)
        boxes.append((x, y, sprite.width, sprite.height))
    img = np.asarray(frame, dtype=np.float32)
    if test:  # the real test set is deeper: dimmer, bluer
        gain = np.array([rng.uniform(0.6, 0.8), rng.uniform(0.85, 0.95), 1.0], np.float32) * np.float32(rng.uniform(0.7, 0.9))
        img *= gain
    oy, ox = int(rng.integers(0, 33)), int(rng.integers(0, 33))
    img += _noise_bank(height, width)[oy:oy + height, ox:ox + width] * np.float32(rng.uniform(2.0, 6.0))
    n_snow = int(rng.integers(10, 60) * width * height / (320 * 240))
    if n_snow:
        xs = rng.integers(0, width - 1, n_snow)
        ys = rng.integers(0, height - 1, n_snow)
        big = rng.random(n_snow) < 0.3
        level = rng.uniform(0.5, 0.9, n_snow)[:, None].astype(np.float32)
        img[ys, xs] = img[ys, xs] * (1 - level) + 235 * level
        bx, by, bl = xs[big], ys[big], level[big] * 0.6
        for dx, dy in ((1, 0), (0, 1), (1, 1)):
            img[by + dy, bx + dx] = img[by + dy, bx + dx] * (1 - bl) + 235 * bl
    img += 0.5
    np.clip(img, 0, 255, out=img)
    return Image.fromarray(img.astype(np.uint8), "RGB"), boxes
