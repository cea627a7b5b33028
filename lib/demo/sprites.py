"""One organism instance: its plan drawn, patterned, marked, flipped, rotated and cropped to a sprite."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from lib.demo.looks import RGBA, Look, rgb
from lib.demo.plans import CANVAS, PLANS, TRANSLUCENT, UPRIGHT, Pen, Point

ALPHA_MIN = 24  # sprite pixels at least this opaque belong to the box
_OPAQUE_LUT = [255 if v >= ALPHA_MIN else 0 for v in range(256)]


def _overlay(img: Image.Image, mask: Image.Image, colour: RGBA) -> Image.Image:
    """Paint `colour` where `mask` is set, only inside the sprite's alpha (keeps the alpha)."""
    alpha = img.getchannel("A")
    mask = ImageChops.multiply(mask, alpha)
    solid = Image.new("RGBA", img.size, colour)
    out = Image.composite(solid, img, mask)
    out.putalpha(alpha)
    return out


def _axis_mask(pen: Pen, a: Point, b: Point, kind: str, density: float) -> Image.Image:
    """Stripes across the main axis, rings around its middle, or spots."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    d = ImageDraw.Draw(mask)
    (ax, ay), (bx, by) = pen.p(*a), pen.p(*b)
    ang = math.atan2(by - ay, bx - ax)
    ux, uy = math.cos(ang), math.sin(ang)
    spacing = pen.u * (0.11 + 0.22 * (1.0 - density))
    cx, cy = (ax + bx) / 2, (ay + by) / 2
    if kind == "stripes":
        width = max(2, int(spacing * 0.4))
        k = -float(CANVAS)
        while k < CANVAS:
            px, py = cx + ux * k, cy + uy * k
            d.line([(px - uy * CANVAS, py + ux * CANVAS), (px + uy * CANVAS, py - ux * CANVAS)], fill=255, width=width)
            k += spacing
    elif kind == "rings":
        width = max(2, int(spacing * 0.35))
        r = spacing * 0.8
        while r < CANVAS:
            d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=width)
            r += spacing
    elif kind == "spots":
        rr = spacing * 0.28
        for x, y in pen.rng.uniform(0, CANVAS, size=(int(20 + 60 * density), 2)):
            d.ellipse((x - rr, y - rr, x + rr, y + rr), fill=255)
    return mask


def _band_mask(pen: Pen, a: Point, b: Point, pos: float, width: float) -> Image.Image:
    """A band across the main axis at fraction `pos` from a to b."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    (ax, ay), (bx, by) = pen.p(*a), pen.p(*b)
    px, py = ax + (bx - ax) * pos, ay + (by - ay) * pos
    ang = math.atan2(by - ay, bx - ax)
    ux, uy = math.cos(ang), math.sin(ang)
    ImageDraw.Draw(mask).line([(px - uy * CANVAS, py + ux * CANVAS), (px + uy * CANVAS, py - ux * CANVAS)],
                              fill=255, width=max(2, int(width * pen.u)))
    return mask


def render_sprite(look: Look, rng: np.random.Generator, max_side: int) -> Image.Image:
    """One organism instance as a tight RGBA sprite whose larger side is `max_side` pixels.

    Instance variation (colour jitter, proportions, rotation, flip) keeps the task from being
    trivial; the lineage-fixed look keeps it learnable.
    """
    hue = look.hue + rng.uniform(-0.02, 0.02)
    sat = look.sat * rng.uniform(0.9, 1.1)
    val = look.val * rng.uniform(0.88, 1.08)
    lk = dataclasses.replace(look, aspect=look.aspect * rng.uniform(0.92, 1.08),
                             arm_len=look.arm_len * rng.uniform(0.92, 1.08))
    pen = Pen(rng, lk, hue, sat, val)
    a, b = PLANS[lk.plan](pen, lk)
    img = pen.img
    if lk.pattern != "none":
        colour = rgb(hue + lk.pat_hue, sat, val + lk.pat_shift)
        img = _overlay(img, _axis_mask(pen, a, b, lk.pattern, lk.pat_density), colour)
    if lk.genus_mark is not None:
        pos, dv, dh = lk.genus_mark
        img = _overlay(img, _band_mask(pen, a, b, pos, 0.1), rgb(hue + dh, sat, val + dv))
    if lk.species_mark is not None:
        pos, dh = lk.species_mark
        mask = Image.new("L", (CANVAS, CANVAS), 0)
        (ax, ay), (bx, by) = pen.p(*a), pen.p(*b)
        px, py, r = ax + (bx - ax) * pos, ay + (by - ay) * pos, 0.07 * pen.u
        ImageDraw.Draw(mask).ellipse((px - r, py - r, px + r, py + r), fill=255)
        img = _overlay(img, mask, rgb(hue + dh, 0.9, 0.95))
    if lk.plan in TRANSLUCENT:
        f = TRANSLUCENT[lk.plan]
        img.putalpha(img.getchannel("A").point([int(v * f) for v in range(256)]))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-20, 20) if lk.plan in UPRIGHT else rng.uniform(-30, 30) if lk.plan == "fish" else rng.uniform(0, 360)
    img = fit(img, int(max_side * 1.25) + 2)  # rotate at about the final size: 4x cheaper than at CANVAS
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return fit(img, max_side)


def fit(img: Image.Image, max_side: int) -> Image.Image:
    """Crop to the opaque pixels and scale so the larger side is `max_side` (at least 4x4)."""
    box = img.getchannel("A").point(_OPAQUE_LUT).getbbox()
    if box is None:
        raise RuntimeError("demo sprite came out empty; this is a bug in lib.demo")
    img = img.crop(box)
    k = max_side / max(img.size)
    size = (max(4, int(round(img.width * k))), max(4, int(round(img.height * k))))
    method = Image.Resampling.BOX if k < 1 else Image.Resampling.BILINEAR
    return img.resize(size, method)
