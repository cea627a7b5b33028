"""A deterministic synthetic dataset in the exact FathomNet 2025 competition format.

Why: the pipeline must be demoable and testable on 2 CPU cores in minutes, without the real
data. Organisms are drawn so that their look follows their lineage (parameters come from a
stable hash of the NAME at each rank), so a small CNN learns the task and its mistakes tend to
be taxonomically close, which the competition's metric rewards:

- phylum and class pick the body plan (fish, crab/shrimp, sea star, anemone, sponge, ...);
- class sets the colour family (base hue, saturation, brightness);
- order and family set the pattern (stripes, spots, rings) and proportions (aspect, arms);
- genus adds a band and a small hue/size change, species a small dot.

The test split is shifted like the real one: smaller boxes, dimmer and bluer frames.

Output (under `out_dir`): `dataset_train.json`, `dataset_test.json` (COCO, test labels null),
`train/images/<image_id>.png`, `test/images/<image_id>.png`, `solution.csv`.
CLI: `python -m lib.demo --config configs/demo.yaml [--force] [key=value ...]`.
"""
from __future__ import annotations

import argparse
import colorsys
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw

if TYPE_CHECKING:
    from lib.config import DemoCfg

RANKS: tuple[str, ...] = ("phylum", "class", "order", "family", "genus", "species")
MARKER = "Synthetic FathomNet 2025 demo data"
TRAIN_JSON = "dataset_train.json"
TEST_JSON = "dataset_test.json"
SOLUTION_CSV = "solution.csv"
RECORD = "demo_record.json"
TRAIN_IMAGES = "train/images"
TEST_IMAGES = "test/images"
CANVAS = 192  # sprite drawing resolution; sprites are downscaled to their box size
ALPHA_MIN = 24  # sprite pixels at least this opaque belong to the box
_OPAQUE_LUT = [255 if v >= ALPHA_MIN else 0 for v in range(256)]

Point = tuple[float, float]
RGBA = tuple[int, int, int, int]


# ----------------------------------------------------------------------------- taxonomy -> look


@dataclass(frozen=True)
class Taxon:
    """One category: id, name and its 6 ranks phylum..species ('' where it has none)."""

    category_id: int
    name: str
    lineage: tuple[str, ...]


@dataclass(frozen=True)
class Look:
    """Everything about a category's appearance that its lineage fixes."""

    plan: str
    hue: float
    sat: float
    val: float
    pattern: str = "none"
    pat_density: float = 0.5
    pat_shift: float = -0.3
    pat_hue: float = 0.0
    aspect: float = 1.0
    arm_factor: float = 1.0
    arm_len: float = 1.0
    arm_width: float = 1.0
    style: int = 0
    alt: bool = False  # the plan's second shape (crab not shrimp, clam not scallop); fixed per category
    size: float = 1.0
    genus_mark: Optional[tuple[float, float, float]] = None  # (position, value shift, hue shift)
    species_mark: Optional[tuple[float, float]] = None  # (position, hue offset)


# Body plan by class name, then by phylum name when the class has no entry.
CLASS_PLANS: dict[str, str] = {
    "Teleostei": "fish",
    "Actinopterygii": "fish",
    "Thaliacea": "pyrosome",
    "Tunicata": "tunicate",
    "Ascidiacea": "tunicate",
    "Malacostraca": "crustacean",
    "Cephalopoda": "octopus",
    "Bivalvia": "bivalve",
    "Gastropoda": "snail",
    "Asteroidea": "star",
    "Ophiuroidea": "brittle",
    "Crinoidea": "crinoid",
    "Holothuroidea": "cucumber",
    "Echinoidea": "urchin",
    "Hexacorallia": "anemone",
    "Anthozoa": "anemone",
    "Octocorallia": "octocoral",
    "Hydrozoa": "medusa",
    "Scyphozoa": "medusa",
    "Hexactinellida": "vase",
    "Demospongiae": "blob",
    "Polychaeta": "worm",
}
PHYLUM_PLANS: dict[str, str] = {
    "Annelida": "worm",
    "Arthropoda": "crustacean",
    "Chordata": "fish",
    "Cnidaria": "anemone",
    "Echinodermata": "star",
    "Mollusca": "snail",
    "Porifera": "blob",
}
PATTERNS: tuple[str, ...] = ("none", "stripes", "spots", "rings")


def read_taxonomy(path: Path) -> list[Taxon]:
    """The categories of the taxonomy CSV in category-id order.

    A concept named above or beside its deepest listed rank (a subfamily, infraorder,
    subphylum such as 'Tunicata') gets its own name in the next rank slot, so two concepts
    with the same listed lineage still look different.
    """
    taxa = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            lineage = [(row.get(r) or "").strip() for r in RANKS]
            name = row["concept_name"].strip()
            filled = [i for i, v in enumerate(lineage) if v]
            deepest = filled[-1] if filled else -1
            if (deepest < 0 or lineage[deepest] != name) and deepest + 1 < len(RANKS):
                lineage[deepest + 1] = name
            taxa.append(Taxon(int(row["category_id"]), name, tuple(lineage)))
    taxa.sort(key=lambda t: t.category_id)
    return taxa


def _name_rng(rank: str, name: str) -> np.random.Generator:
    """A generator that depends only on a rank and a name, so relatives share parameters."""
    digest = hashlib.md5(f"{rank}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def look_for(taxon: Taxon) -> Look:
    """Derive a category's look rank by rank; missing ranks keep the neutral defaults."""
    phylum, cls, order, family, genus, species = taxon.lineage
    plan = CLASS_PLANS.get(cls) or PHYLUM_PLANS.get(phylum, "blob")
    r = _name_rng("class", cls or phylum)
    hue, sat, val = r.uniform(), r.uniform(0.45, 0.85), r.uniform(0.62, 0.95)
    if not cls:
        sat *= 0.6
    kw: dict = {}
    if order:
        r = _name_rng("order", order)
        hue += r.uniform(-0.05, 0.05)
        kw["pattern"] = PATTERNS[int(r.integers(len(PATTERNS)))]
        kw["pat_shift"] = float(r.choice([-0.4, -0.3, 0.3]))
        kw["aspect"] = r.uniform(0.75, 1.35)
        kw["arm_factor"] = r.uniform(0.8, 1.8)
    if family:
        r = _name_rng("family", family)
        hue += r.uniform(-0.03, 0.03)
        kw["pat_density"] = r.uniform(0.15, 1.0)
        kw["pat_hue"] = r.uniform(-0.12, 0.12)
        kw["aspect"] = kw.get("aspect", 1.0) * r.uniform(0.85, 1.18)
        kw["arm_len"] = r.uniform(0.8, 1.2)
        kw["arm_width"] = r.uniform(0.7, 1.4)
        kw["style"] = int(r.integers(4))
    size = 1.0
    if genus:
        r = _name_rng("genus", genus)
        hue += r.uniform(-0.02, 0.02)
        size *= r.uniform(0.9, 1.1)
        kw["genus_mark"] = (r.uniform(0.2, 0.8), float(r.choice([-0.45, 0.35])), r.uniform(-0.08, 0.08))
    if species:
        r = _name_rng("species", species)
        hue += r.uniform(-0.015, 0.015)
        size *= r.uniform(0.95, 1.05)
        kw["species_mark"] = (r.uniform(0.1, 0.9), r.uniform(0.35, 0.65))
    kw["alt"] = kw.get("aspect", 1.0) < 0.95
    return Look(plan=plan, hue=float(hue % 1.0), sat=float(sat), val=float(val), size=float(size), **kw)


def _rgb(h: float, s: float, v: float, a: int = 255) -> RGBA:
    """HSV in [0, 1] (clipped) to an RGBA tuple."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5), a)


# ----------------------------------------------------------------------------- sprite drawing


class _Pen:
    """Draws in unit coordinates (origin at the canvas centre, +y down, |x|,|y| <~ 1.1)."""

    def __init__(self, rng: np.random.Generator, look: Look, hue: float, sat: float, val: float):
        self.img = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
        self.d = ImageDraw.Draw(self.img)
        self.c = CANVAS / 2
        self.u = CANVAS * 0.43
        self.rng = rng
        self.look = look
        self.hue, self.sat, self.val = hue, sat, val
        self.body = _rgb(hue, sat, val)
        self.dark = _rgb(hue, sat, val * 0.55)
        self.light = _rgb(hue, sat * 0.5, min(1.0, val * 1.25))

    def p(self, x: float, y: float) -> Point:
        return (self.c + x * self.u, self.c + y * self.u)

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill: RGBA) -> None:
        (x0, y0), (x1, y1) = self.p(x - rx, y - ry), self.p(x + rx, y + ry)
        self.d.ellipse((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), fill=fill)

    def poly(self, pts: list[Point], fill: RGBA) -> None:
        self.d.polygon([self.p(x, y) for x, y in pts], fill=fill)

    def line(self, pts: list[Point], w: float, fill: RGBA) -> None:
        self.d.line([self.p(x, y) for x, y in pts], fill=fill, width=max(1, int(round(w * self.u))), joint="curve")

    def tapered(self, pts: list[Point], w0: float, w1: float, fill: RGBA) -> None:
        """A limb whose width shrinks from w0 to w1 (unit widths) along the path."""
        n = len(pts)
        for i in range(n - 1):
            w = w0 + (w1 - w0) * i / max(1, n - 2)
            self.line([pts[i], pts[i + 1]], w, fill)
            if w * self.u >= 3:
                self.ellipse(pts[i + 1][0], pts[i + 1][1], w / 2, w / 2, fill)


def _curve(x0: float, y0: float, angle: float, length: float, bend: float, n: int = 10,
           wave: float = 0.0, phase: float = 0.0) -> list[Point]:
    """Points along a limb starting at (x0, y0) heading `angle` (radians), curling by `bend`."""
    pts = [(x0, y0)]
    step = length / (n - 1)
    x, y = x0, y0
    for i in range(1, n):
        a = angle + bend * i / (n - 1) + wave * math.sin(phase + 2.2 * math.pi * i / (n - 1))
        x, y = x + step * math.cos(a), y + step * math.sin(a)
        pts.append((x, y))
    return pts


def _n_arms(look: Look, base: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(base * look.arm_factor))))


def _fish(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    hh = min(0.55, max(0.16, 0.3 / lk.aspect))
    fin = pen.dark
    th = max(hh * 0.95, 0.2)
    pen.poly([(-0.6, 0), (-1.0, -th), (-0.88, 0), (-1.0, th)], fin)
    if lk.style in (0, 2):
        pen.poly([(-0.35, -hh * 0.8), (0.0, -hh - 0.22), (0.3, -hh * 0.75)], fin)
    if lk.style == 1:
        pts = [(-0.5 + 0.09 * i, -hh * 0.8 - (0.18 if i % 2 else 0.05)) for i in range(11)]
        pen.poly([(-0.55, -hh * 0.6)] + pts + [(0.45, -hh * 0.6)], fin)
    if lk.style == 2:
        pen.poly([(-0.55, hh * 0.7), (-0.35, hh + 0.14), (-0.2, hh * 0.8)], fin)
    pen.ellipse(0.05, 0.0, 0.78, hh, pen.body)
    if lk.style == 3:
        pen.line([(-0.5, -hh * 0.9), (0.4, -hh * 0.9)], 0.06, fin)
    pen.poly([(0.1, 0.02), (-0.15, hh * 0.6), (0.18, hh * 0.35)], fin)
    pen.ellipse(0.6, -hh * 0.3, 0.08, 0.08, (235, 235, 225, 255))
    pen.ellipse(0.62, -hh * 0.3, 0.045, 0.045, (10, 10, 10, 255))
    return (-0.6, 0.0), (0.7, 0.0)


def _crustacean(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    leg_w = 0.045 * lk.arm_width
    if lk.alt:  # crab: wide carapace, splayed legs, claws
        rx, ry = 0.48, 0.4 * lk.aspect
        for s in (-1, 1):
            for i in range(4):
                y = -0.12 + 0.13 * i
                reach = (0.45 + 0.4 * lk.arm_len) * (1.0 - 0.06 * i)
                pts = [(s * 0.35, y), (s * (0.35 + reach * 0.55), y - 0.28), (s * (0.35 + reach), y + 0.25 + 0.05 * i)]
                pen.tapered(pts, leg_w * 1.3, leg_w * 0.7, pen.dark)
            pen.tapered([(s * 0.25, -0.2), (s * 0.45, -0.5), (s * 0.3, -0.7)], leg_w * 2.2, leg_w * 2.6, pen.body)
            pen.ellipse(s * 0.28, -0.78, 0.09, 0.13, pen.body)
        pen.ellipse(0.0, 0.05, rx, ry, pen.body)
        for s in (-1, 1):
            pen.ellipse(s * 0.12, 0.05 - ry * 0.95, 0.05, 0.05, (15, 15, 15, 255))
        return (0.0, 0.05 + ry * 0.8), (0.0, 0.05 - ry * 0.8)
    # shrimp / isopod / amphipod: head to the right, segmented abdomen curling down to the left
    w = min(0.26, 0.2 / max(lk.aspect, 0.8) + 0.05)
    n_seg = 4 + lk.style
    for i in range(5):
        x = 0.45 - 0.13 * i
        pen.tapered([(x, w * 0.5), (x - 0.05, w + 0.2), (x + 0.05, w + 0.35 * lk.arm_len)], leg_w, leg_w * 0.6, pen.dark)
    for k in (0, 1):
        pts = _curve(0.7, -0.05, -0.35 - 0.2 * k, 0.55 * lk.arm_len + 0.2, 2.2 + 0.4 * k, n=8)
        pen.line(pts, 0.018, pen.dark)
    pen.poly([(0.7, -0.06), (1.05, -0.16), (0.72, 0.02)], pen.body)
    pen.ellipse(0.42, 0.0, 0.3, w, pen.body)
    x, y = 0.15, 0.02
    for i in range(n_seg):
        r = w * (0.95 - 0.5 * i / n_seg)
        pen.ellipse(x, y, 0.13, r, pen.body)
        x -= 0.6 / n_seg + 0.03
        y += 0.04 * i / n_seg + 0.015
    pen.poly([(x + 0.1, y), (x - 0.2, y - 0.15), (x - 0.2, y + 0.15)], pen.dark)
    pen.ellipse(0.62, -w * 0.5, 0.05, 0.05, (10, 10, 10, 255))
    return (x + 0.1, y), (0.6, 0.0)


def _octopus(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    for i in range(8):
        a = math.pi * (0.1 + 0.8 * i / 7)
        pts = _curve(0.3 * math.cos(a) * 0.6, -0.15, a, 0.85 * lk.arm_len, rng.uniform(-1.2, 1.2), n=10,
                     wave=0.25, phase=rng.uniform(0, 6.3))
        pen.tapered(pts, 0.14 * lk.arm_width, 0.03, pen.body)
    pen.ellipse(0.0, -0.5, 0.32 / math.sqrt(lk.aspect), 0.42 * math.sqrt(lk.aspect), pen.body)
    for s in (-1, 1):
        pen.ellipse(s * 0.17, -0.22, 0.07, 0.06, pen.light)
        pen.ellipse(s * 0.17, -0.22, 0.035, 0.03, (10, 10, 10, 255))
    return (0.0, -0.85), (0.0, -0.2)


def _bivalve(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    n_ribs = int(8 + 12 * lk.pat_density)
    if not lk.alt:  # scallop: fan with ears and radial ribs
        x0, y0 = pen.p(-0.85, -0.55)
        x1, y1 = pen.p(0.85, 1.15)
        pen.d.pieslice((x0, y0, x1, y1), 200, 340, fill=pen.body)
        pen.poly([(-0.3, -0.55), (0.3, -0.55), (0.25, -0.35), (-0.25, -0.35)], pen.body)
        for i in range(n_ribs):
            a = math.radians(202 + 136 * i / (n_ribs - 1))
            pen.line([(0, 0.3), (0.8 * math.cos(a), 0.3 + 0.8 * math.sin(a))], 0.02, pen.dark)
        return (0.0, 0.25), (0.0, -0.45)
    rx, ry = 0.8, 0.8 * lk.aspect * 0.65
    pen.ellipse(0.0, 0.0, rx, ry, pen.body)
    for i in range(1, 5):
        f = 1.0 - 0.18 * i
        x0, y0 = pen.p(-rx * f - 0.1 * i, -ry * f + 0.15 * i)
        x1, y1 = pen.p(rx * f - 0.1 * i, ry * f + 0.15 * i)
        pen.d.arc((x0, y0, x1, y1), 200, 340, fill=pen.dark, width=3)
    pen.ellipse(-0.45, -ry * 0.7, 0.1, 0.06, pen.dark)
    return (-0.6, 0.0), (0.6, 0.0)


def _snail(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    pen.ellipse(0.0, 0.62, 0.8, 0.16, pen.light)
    y, r = 0.35, 0.6
    for k in range(5):
        pen.ellipse(0.06 * k, y, r + 0.03, r * 0.55 + 0.03, pen.dark)
        pen.ellipse(0.06 * k, y, r, r * 0.55, pen.body)
        y -= r * 0.55 * lk.aspect
        r *= 0.72
    pen.ellipse(0.38, 0.42, 0.2, 0.15, pen.dark)
    return (0.0, 0.5), (0.2, y)


def _star(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    n = _n_arms(lk, 5, 5, 13)
    disc = 0.15 + 0.12 * lk.arm_width
    length = min(1.05, 0.55 + 0.45 * lk.arm_len * (1.2 if n > 6 else 1.0))
    w0 = min(0.42, 0.28 * lk.arm_width * math.sqrt(5 / n))
    a0 = rng.uniform(0, 2 * math.pi)
    tip = (0.0, 0.0)
    for i in range(n):
        a = a0 + 2 * math.pi * i / n + rng.uniform(-0.12, 0.12)
        pts = _curve(0.0, 0.0, a, length * rng.uniform(0.9, 1.05), rng.uniform(-0.5, 0.5), n=7)
        pen.tapered(pts, w0, 0.04, pen.body)
        if i == 0:
            tip = pts[-2]
    pen.ellipse(0.0, 0.0, disc, disc, pen.body)
    pen.ellipse(0.0, 0.0, disc * 0.25, disc * 0.25, pen.light)
    return (0.0, 0.0), tip


def _brittle(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    a0 = rng.uniform(0, 2 * math.pi)
    tip = (0.0, 0.0)
    for i in range(5):
        a = a0 + 2 * math.pi * i / 5
        pts = _curve(0.0, 0.0, a, 0.95 * lk.arm_len, rng.uniform(-1.0, 1.0), n=12, wave=0.45,
                     phase=rng.uniform(0, 6.3))
        pen.tapered(pts, 0.07 * lk.arm_width, 0.02, pen.body)
        if i == 0:
            tip = pts[5]
    pen.ellipse(0.0, 0.0, 0.2, 0.2, pen.body)
    for i in range(5):
        a = a0 + 2 * math.pi * (i + 0.5) / 5
        pen.ellipse(0.12 * math.cos(a), 0.12 * math.sin(a), 0.05, 0.05, pen.dark)
    return (0.0, 0.0), tip


def _crinoid(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    n = _n_arms(lk, 10, 6, 16)
    base_y = 0.3
    if lk.style % 2:
        pen.line([(0.0, base_y), (rng.uniform(-0.1, 0.1), 1.05)], 0.04, pen.dark)
    for i in range(n):
        a = math.pi * (1.05 + 0.9 * i / (n - 1)) + rng.uniform(-0.08, 0.08)
        pts = _curve(0.0, base_y, a, 0.85 * lk.arm_len, rng.uniform(-0.9, 0.9), n=9)
        pen.line(pts, 0.03 * lk.arm_width, pen.body)
        for j, (x, y) in enumerate(pts[1:-1]):
            s = 1 if j % 2 else -1
            b = a + s * 1.2
            pen.line([(x, y), (x + 0.1 * math.cos(b), y + 0.1 * math.sin(b))], 0.012, pen.body)
    pen.ellipse(0.0, base_y, 0.12, 0.1, pen.dark)
    return (0.0, base_y), (0.0, base_y - 0.6)


def _cucumber(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    r0 = min(0.42, 0.26 / lk.aspect + 0.04)
    bend = rng.uniform(-0.4, 0.4)
    pts = _curve(-0.8, 0.0, -bend / 2, 1.6, bend, n=14)
    n_pap = int(3 + 9 * lk.pat_density)
    if lk.style in (1, 3):  # sea pig: legs underneath
        for i in range(5):
            x, y = pts[2 + 2 * i]
            pen.tapered([(x, y), (x + 0.05, y + r0 + 0.18)], 0.08, 0.04, pen.body)
    for i in range(n_pap):
        x, y = pts[1 + int(i * 11 / max(1, n_pap - 1))]
        pen.tapered([(x, y), (x + 0.03, y - r0 - 0.12 - 0.1 * lk.arm_len)], 0.06, 0.015, pen.body)
    if lk.style == 2:  # dendrochirotid: feeding tentacles at the front
        x, y = pts[-1]
        for k in range(6):
            pen.line(_curve(x, y, -0.9 + 0.35 * k, 0.35, 0.5, n=5), 0.025, pen.light)
    for i, (x, y) in enumerate(pts):
        t = i / (len(pts) - 1)
        r = r0 * (0.7 + 0.3 * math.sin(math.pi * t))
        pen.ellipse(x, y, r, r, pen.body)
    return pts[2], pts[-3]


def _urchin(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    r = 0.42
    pen.ellipse(0.0, 0.0, r, r * 0.92, pen.body)
    n = _n_arms(lk, 26, 16, 44)
    for i in range(n):
        a = 2 * math.pi * i / n + rng.uniform(-0.1, 0.1)
        ln = r + (0.2 + 0.35 * lk.arm_len) * rng.uniform(0.8, 1.1)
        pen.line([(0.6 * r * math.cos(a), 0.6 * r * math.sin(a)), (ln * math.cos(a), ln * math.sin(a))],
                 0.022 * lk.arm_width, pen.dark)
    pen.ellipse(0.0, 0.0, 0.06, 0.06, pen.light)
    return (-0.3, 0.0), (0.3, 0.0)


def _anemone(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    top = 0.1 - 0.2 * (lk.aspect - 1.0)
    wb, wt = 0.3, min(0.45, 0.3 * lk.aspect)
    n = _n_arms(lk, 14, 6, 26)
    long_thin = lk.style == 1
    length = (0.75 if long_thin else 0.5 if lk.style != 2 else 0.3) * lk.arm_len
    width = (0.035 if long_thin else 0.07) * lk.arm_width
    for i in range(n):
        a = math.pi * (1.05 + 0.9 * i / (n - 1))
        x0 = wt * 1.1 * math.cos(a)
        pts = _curve(x0, top + 0.08 * math.sin(a), a, length * rng.uniform(0.85, 1.1), rng.uniform(-0.6, 0.6), n=7)
        pen.tapered(pts, width, width * 0.35, pen.light if lk.style == 3 else pen.body)
    pen.poly([(-wb, 0.95), (wb, 0.95), (wt, top), (-wt, top)], pen.body)
    pen.ellipse(0.0, 0.95, wb, 0.06, pen.body)
    pen.ellipse(0.0, top, wt * 1.15, 0.12, pen.body)
    pen.ellipse(0.0, top, wt * 0.35, 0.05, pen.dark)
    return (0.0, 0.9), (0.0, top + 0.05)


def _octocoral(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    base = (rng.uniform(-0.1, 0.1), 1.05)
    polyp = pen.light
    if lk.style == 0:  # sea pen: stalk with paired leaves
        pen.line([base, (0.0, -1.0)], 0.06 * lk.arm_width, pen.body)
        n = int(6 + 6 * lk.pat_density)
        for i in range(n):
            y = -0.9 + 1.2 * i / (n - 1)
            ln = 0.3 * lk.arm_len * (0.5 + 0.5 * math.sin(math.pi * (i + 1) / (n + 1)))
            for s in (-1, 1):
                pen.tapered([(0.0, y), (s * ln, y - 0.12)], 0.08 * lk.arm_width, 0.03, pen.body)
        return base, (0.0, -0.95)
    if lk.style == 1:  # fan / tree: recursive branches with polyps at the tips
        def branch(x: float, y: float, a: float, ln: float, w: float, depth: int) -> None:
            x1, y1 = x + ln * math.cos(a), y + ln * math.sin(a)
            pen.line([(x, y), (x1, y1)], w, pen.body)
            if depth == 0:
                pen.ellipse(x1, y1, 0.05, 0.05, polyp)
                return
            for s in (-1, 1):
                branch(x1, y1, a + s * rng.uniform(0.25, 0.6), ln * 0.72, w * 0.7, depth - 1)
        branch(base[0], base[1], -math.pi / 2, 0.45 * lk.arm_len, 0.07 * lk.arm_width, 4)
        return base, (base[0], base[1] - 0.45)
    if lk.style == 2:  # whip / bamboo: one tall curve with polyps along it
        pts = _curve(base[0], base[1], -math.pi / 2, 2.0, rng.uniform(-0.7, 0.7), n=14, wave=0.15)
        pen.line(pts, 0.1 * lk.arm_width, pen.body)
        for i, (x, y) in enumerate(pts[2::2]):
            pen.ellipse(x + (0.08 if i % 2 else -0.08), y, 0.08, 0.08, polyp)
        return pts[1], pts[-2]
    # umbrella (Umbellula-like): thin stalk, crown of polyps on top
    top = (base[0] + rng.uniform(-0.2, 0.2), -0.45)
    pen.line([base, top], 0.06, pen.body)
    n = _n_arms(lk, 6, 3, 10)
    for i in range(n):
        a = math.pi * (1.0 + i / (n - 1)) + rng.uniform(-0.2, 0.2)
        pen.tapered(_curve(top[0], top[1], a, 0.5 * lk.arm_len, 0.6, n=6), 0.16, 0.05, pen.body)
    pen.ellipse(top[0], top[1], 0.18, 0.14, pen.body)
    return base, top


def _medusa(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    rx, ry = 0.5 * lk.aspect ** 0.5, 0.45 / lk.aspect ** 0.5
    n = _n_arms(lk, 10, 6, 20)
    for i in range(n):
        x = -rx * 0.9 + 1.8 * rx * i / (n - 1)
        pts = _curve(x, -0.15, math.pi / 2, 0.9 * lk.arm_len, 0.0, n=8, wave=0.3, phase=rng.uniform(0, 6.3))
        pen.line(pts, 0.015, pen.light)
    x0, y0 = pen.p(-rx, -0.15 - ry)
    x1, y1 = pen.p(rx, -0.15 + ry)
    pen.d.pieslice((x0, y0, x1, y1), 180, 360, fill=pen.body)
    pen.ellipse(0.0, -0.15, rx, 0.07, pen.body)
    pen.ellipse(0.0, -0.05, 0.1, 0.18, pen.dark)
    return (0.0, -0.15 - ry * 0.8), (0.0, -0.2)


def _vase(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    wt = min(0.7, 0.45 * lk.aspect)
    shapes = {0: [0.15, 0.35, 0.45, 0.5], 1: [0.3, 0.35, 0.35, 0.35], 2: [0.08, 0.2, 0.45, 0.8], 3: [0.2, 0.4, 0.3, 0.45]}
    prof = [w / 0.5 * wt for w in shapes[lk.style]]
    ys = [0.95, 0.35, -0.3, -0.85]
    left = [(-w + rng.uniform(-0.03, 0.03), y) for w, y in zip(prof, ys)]
    right = [(w + rng.uniform(-0.03, 0.03), y) for w, y in zip(prof, ys)]
    pen.poly(left + right[::-1], pen.body)
    step = 0.1 + 0.12 * (1 - lk.pat_density)
    y = 0.8
    while y > -0.75:
        w = float(np.interp(-y, [-v for v in ys], prof))
        x = -w + step * 0.6
        while x < w - step * 0.4:
            pen.ellipse(x, y, step * 0.25, step * 0.2, pen.dark)
            x += step
        y -= step
    pen.ellipse(0.0, -0.85, prof[-1] * 0.9, 0.1, (20, 15, 15, 255))
    return (0.0, 0.9), (0.0, -0.75)


def _blob(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    if lk.style == 1:  # stalked, round head
        pen.line([(0.0, 1.0), (0.0, -0.2)], 0.06 * lk.arm_width, pen.body)
        pen.ellipse(0.0, -0.45, 0.35 * lk.aspect, 0.35, pen.body)
        pen.ellipse(0.0, -0.45, 0.08, 0.08, pen.dark)
        return (0.0, 0.9), (0.0, -0.45)
    if lk.style == 3:  # finger sponge
        for k in range(int(3 + 3 * lk.pat_density)):
            a = -math.pi / 2 + rng.uniform(-0.8, 0.8)
            pts = _curve(rng.uniform(-0.2, 0.2), 0.9, a, 1.4 * lk.arm_len, rng.uniform(-0.3, 0.3), n=6)
            pen.tapered(pts, 0.2 * lk.arm_width, 0.14 * lk.arm_width, pen.body)
            pen.ellipse(pts[-1][0], pts[-1][1], 0.05, 0.05, pen.dark)
        return (0.0, 0.9), (0.0, -0.3)
    n = 24
    phase = rng.uniform(0, 6.3, size=3)
    pts = []
    for i in range(n):
        a = 2 * math.pi * i / n
        r = 0.62 * (1 + 0.12 * math.sin(2 * a + phase[0]) + 0.08 * math.sin(3 * a + phase[1])
                    + 0.05 * math.sin(5 * a + phase[2]))
        pts.append((r * math.cos(a) * lk.aspect ** 0.5, r * math.sin(a) / lk.aspect ** 0.5))
    pen.poly(pts, pen.body)
    if lk.style == 2:
        for k in range(4):
            a = rng.uniform(0, 2 * math.pi)
            pen.ellipse(0.45 * math.cos(a), 0.45 * math.sin(a), 0.28, 0.28, pen.body)
    for k in range(int(2 + 4 * lk.pat_density)):
        pen.ellipse(rng.uniform(-0.35, 0.35), rng.uniform(-0.35, 0.35), 0.07, 0.07, pen.dark)
    return (-0.4, 0.0), (0.4, 0.0)


def _pyrosome(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    w = min(0.4, 0.24 / lk.aspect + 0.04)
    pen.line([(-0.8, 0.0), (0.8, 0.0)], 2 * w, pen.body)
    pen.ellipse(-0.8, 0.0, w, w, pen.body)
    pen.ellipse(0.8, 0.0, w * 0.6, w, pen.dark)
    step = 0.12 + 0.1 * (1 - lk.pat_density)
    x = -0.85
    row = 0
    while x < 0.7:
        y = -w * 0.7 + (step / 2 if row % 2 else 0.0)
        while y < w * 0.75:
            pen.ellipse(x, y, 0.035, 0.035, pen.light)
            y += step
        x += step
        row += 1
    return (-0.7, 0.0), (0.7, 0.0)


def _tunicate(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    for s, h in ((-1, 0.35), (1, 0.45)):
        x = s * 0.18
        pen.line([(x, -0.2), (x + s * 0.08, -0.45 - h * 0.3)], 0.16, pen.body)
        pen.ellipse(x + s * 0.08, -0.45 - h * 0.3, 0.09, 0.05, pen.dark)
    pen.ellipse(0.0, 0.25, 0.42 * lk.aspect ** 0.5, 0.65 / lk.aspect ** 0.5, pen.body)
    return (0.0, 0.8), (0.0, -0.3)


def _worm(pen: _Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    tube = _rgb(pen.hue, pen.sat * 0.3, min(1.0, pen.val * 1.1))
    pts = _curve(rng.uniform(-0.15, 0.15), 1.05, -math.pi / 2, 0.95, rng.uniform(-0.5, 0.5), n=8)
    top = pts[-1]
    n = _n_arms(lk, 12, 6, 24)
    if lk.style % 2 == 0:  # feather-duster crown
        for i in range(n):
            a = math.pi * (1.1 + 0.8 * i / (n - 1))
            arm = _curve(top[0], top[1], a, 0.55 * lk.arm_len, rng.uniform(-0.3, 0.3), n=6)
            pen.line(arm, 0.03 * lk.arm_width, pen.body)
            for j, (x, y) in enumerate(arm[1:-1]):
                pen.line([(x, y), (x + 0.06 * math.cos(a + 1.4), y + 0.06 * math.sin(a + 1.4))], 0.012, pen.body)
    else:  # spaghetti tentacles spread wide
        for i in range(n):
            a = math.pi * (0.9 + 1.2 * i / (n - 1))
            arm = _curve(top[0], top[1], a, 0.9 * lk.arm_len, rng.uniform(-1.5, 1.5), n=10, wave=0.3,
                         phase=rng.uniform(0, 6.3))
            pen.line(arm, 0.018 * lk.arm_width, pen.body)
    pen.tapered(pts, 0.16, 0.12, tube)
    pen.ellipse(top[0], top[1], 0.1, 0.06, pen.body)
    return pts[1], pts[-2]


PLANS: dict[str, Callable[[_Pen, Look], tuple[Point, Point]]] = {
    "fish": _fish, "crustacean": _crustacean, "octopus": _octopus, "bivalve": _bivalve, "snail": _snail,
    "star": _star, "brittle": _brittle, "crinoid": _crinoid, "cucumber": _cucumber, "urchin": _urchin,
    "anemone": _anemone, "octocoral": _octocoral, "medusa": _medusa, "vase": _vase, "blob": _blob,
    "pyrosome": _pyrosome, "tunicate": _tunicate, "worm": _worm,
}
UPRIGHT = {"anemone", "octocoral", "vase", "tunicate", "worm", "crinoid", "medusa", "snail"}
TRANSLUCENT = {"medusa": 0.78, "pyrosome": 0.85, "tunicate": 0.9}


def _overlay(img: Image.Image, mask: Image.Image, colour: RGBA) -> Image.Image:
    """Paint `colour` where `mask` is set, only inside the sprite's alpha (keeps the alpha)."""
    alpha = img.getchannel("A")
    mask = ImageChops.multiply(mask, alpha)
    solid = Image.new("RGBA", img.size, colour)
    out = Image.composite(solid, img, mask)
    out.putalpha(alpha)
    return out


def _axis_mask(pen: _Pen, a: Point, b: Point, kind: str, density: float) -> Image.Image:
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
        k = -CANVAS
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


def _band_mask(pen: _Pen, a: Point, b: Point, pos: float, width: float) -> Image.Image:
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
    pen = _Pen(rng, lk, hue, sat, val)
    a, b = PLANS[lk.plan](pen, lk)
    img = pen.img
    if lk.pattern != "none":
        colour = _rgb(hue + lk.pat_hue, sat, val + lk.pat_shift)
        img = _overlay(img, _axis_mask(pen, a, b, lk.pattern, lk.pat_density), colour)
    if lk.genus_mark is not None:
        pos, dv, dh = lk.genus_mark
        img = _overlay(img, _band_mask(pen, a, b, pos, 0.1), _rgb(hue + dh, sat, val + dv))
    if lk.species_mark is not None:
        pos, dh = lk.species_mark
        mask = Image.new("L", (CANVAS, CANVAS), 0)
        (ax, ay), (bx, by) = pen.p(*a), pen.p(*b)
        px, py, r = ax + (bx - ax) * pos, ay + (by - ay) * pos, 0.07 * pen.u
        ImageDraw.Draw(mask).ellipse((px - r, py - r, px + r, py + r), fill=255)
        img = _overlay(img, mask, _rgb(hue + dh, 0.9, 0.95))
    if lk.plan in TRANSLUCENT:
        f = TRANSLUCENT[lk.plan]
        img.putalpha(img.getchannel("A").point([int(v * f) for v in range(256)]))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-20, 20) if lk.plan in UPRIGHT else rng.uniform(-30, 30) if lk.plan == "fish" else rng.uniform(0, 360)
    img = _fit(img, int(max_side * 1.25) + 2)  # rotate at about the final size: 4x cheaper than at CANVAS
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return _fit(img, max_side)


def _fit(img: Image.Image, max_side: int) -> Image.Image:
    """Crop to the opaque pixels and scale so the larger side is `max_side` (at least 4x4)."""
    box = img.getchannel("A").point(_OPAQUE_LUT).getbbox()
    if box is None:
        raise RuntimeError("demo sprite came out empty; this is a bug in lib.demo")
    img = img.crop(box)
    k = max_side / max(img.size)
    size = (max(4, int(round(img.width * k))), max(4, int(round(img.height * k))))
    method = Image.Resampling.BOX if k < 1 else Image.Resampling.BILINEAR
    return img.resize(size, method)


# ----------------------------------------------------------------------------- frames


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
            sprite = _fit(sprite, limit)
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


# ----------------------------------------------------------------------------- dataset


def _save_png(img: Image.Image, path: Path) -> None:
    """Fast PNG: OpenCV's RLE strategy is about 1.6x faster than Pillow at similar size."""
    try:
        import cv2
    except ImportError:
        img.save(path, compress_level=1)
        return
    ok, buf = cv2.imencode(".png", np.asarray(img)[:, :, ::-1],
                           [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def class_counts(n_classes: int, cfg: DemoCfg) -> list[int]:
    """Train boxes per class in category-id order.

    Balanced: `per_class` each. Long tail (as CIFAR-100-LT): class i gets
    per_class * imbalance_factor ** (-i / (n - 1)), rounded, at least 1, so the first category
    is the head and the last the tail.
    """
    if not cfg.long_tail or n_classes < 2:
        return [cfg.per_class] * n_classes
    return [max(1, int(math.floor(cfg.per_class * cfg.imbalance_factor ** (-i / (n_classes - 1)) + 0.5)))
            for i in range(n_classes)]


def _seed_seq(seed: int, *keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed % (1 << 63), *keys])


@dataclass(frozen=True)
class _Job:
    """One frame to render: everything a worker process needs, nothing shared."""

    seed: int
    split_code: int
    image_id: int
    labels: tuple[int, ...]
    looks: tuple[Look, ...]
    width: int
    height: int
    path: str


def _render_job(job: _Job) -> tuple[str, list[tuple[int, int, int, int]]]:
    """Render and save one frame; returns its file_name and boxes. Depends only on `job`."""
    rng = np.random.default_rng(_seed_seq(job.seed, job.split_code, job.image_id))
    file_name = f"{uuid.UUID(bytes=rng.bytes(16), version=4)}.png"
    frame, boxes = render_frame(list(job.looks), rng, job.width, job.height, job.split_code == 1)
    _save_png(frame, Path(job.path))
    return file_name, boxes


def _layout(out_dir: Path, split_code: int, taxa: list[Taxon], looks: list[Look], counts: list[int],
            cfg: DemoCfg, seed: int) -> list[_Job]:
    """Shuffle the split's boxes (each class exactly its count) and deal them into frames."""
    rng = np.random.default_rng(_seed_seq(seed, split_code))
    labels = np.repeat(np.arange(len(taxa)), counts)
    labels = labels[rng.permutation(len(labels))]
    img_dir = out_dir / (TEST_IMAGES if split_code else TRAIN_IMAGES)
    jobs, pos = [], 0
    while pos < len(labels):
        k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        chunk = tuple(int(i) for i in labels[pos:pos + k])
        pos += len(chunk)
        image_id = len(jobs) + 1
        jobs.append(_Job(seed, split_code, image_id, chunk, tuple(looks[i] for i in chunk),
                         cfg.frame_width, cfg.frame_height, str(img_dir / f"{image_id}.png")))
    return jobs


def _workers(n_jobs: int) -> int:
    """Processes worth starting: none for small sets (start-up costs more than it saves)."""
    if n_jobs < 64:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _run_jobs(jobs: list[_Job]) -> list[tuple[str, list[tuple[int, int, int, int]]]]:
    """Render all frames, on several processes when it pays; results in job order either way."""
    n = _workers(len(jobs))
    if n > 1:
        try:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=n) as pool:
                return list(pool.map(_render_job, jobs, chunksize=8))
        except (OSError, ImportError, NotImplementedError):
            pass  # no process support here (sandbox, no /dev/shm): same result, one process
    return [_render_job(j) for j in jobs]


def _coco(split_code: int, taxa: list[Taxon], jobs: list[_Job],
          results: list[tuple[str, list[tuple[int, int, int, int]]]]) -> tuple[dict, list[tuple[int, str]]]:
    """The split's COCO dict (test labels null) and its (annotation id, true name) pairs."""
    test = split_code == 1
    images, annotations, truth = [], [], []
    for job, (file_name, boxes) in zip(jobs, results):
        images.append({
            "id": job.image_id, "width": job.width, "height": job.height, "file_name": file_name,
            "license": 0, "flickr_url": "", "coco_url": f"https://example.invalid/demo/{file_name}",
            "date_captured": "2024-01-01 00:00:00",
        })
        for label, (x, y, w, h) in zip(job.labels, boxes):
            ann_id = len(annotations) + 1
            t = taxa[label]
            annotations.append({
                "id": ann_id, "image_id": job.image_id, "category_id": None if test else t.category_id,
                "segmentation": [], "area": float(w * h), "bbox": [float(x), float(y), float(w), float(h)],
                "iscrowd": 0,
            })
            truth.append((ann_id, t.name))
    split = "test" if test else "train"
    coco = {
        "info": {"description": f"{MARKER} ({split}); generated by lib.demo, not real observations",
                 "version": "1.0", "year": 2025, "contributor": "lib.demo", "date_created": "2024-01-01"},
        "images": images,
        "licenses": [{"id": 0, "name": "synthetic", "url": ""}],
        "annotations": annotations,
        "categories": [{"id": t.category_id, "name": t.name, "supercategory": ""} for t in taxa],
    }
    return coco, truth


def _check(cfg: DemoCfg) -> None:
    """Settings the config's own validation does not cover but drawing needs."""
    if min(cfg.frame_width, cfg.frame_height) < 32:
        raise ValueError("demo.frame_width and demo.frame_height must be at least 32 pixels; raise them in the config.")


def generate(out_dir: Path, cfg: DemoCfg, taxonomy_csv: Path, seed: int) -> dict:
    """Write the whole dataset under `out_dir`; returns image and box counts per split."""
    _check(cfg)
    out_dir = Path(out_dir)
    taxa = read_taxonomy(Path(taxonomy_csv))
    looks = [look_for(t) for t in taxa]
    train_jobs = _layout(out_dir, 0, taxa, looks, class_counts(len(taxa), cfg), cfg, seed)
    test_jobs = _layout(out_dir, 1, taxa, looks, [cfg.test_per_class] * len(taxa), cfg, seed)
    for sub in (TRAIN_IMAGES, TEST_IMAGES):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    results = _run_jobs(train_jobs + test_jobs)
    train, _ = _coco(0, taxa, train_jobs, results[:len(train_jobs)])
    test, truth = _coco(1, taxa, test_jobs, results[len(train_jobs):])
    (out_dir / TRAIN_JSON).write_text(json.dumps(train))
    (out_dir / TEST_JSON).write_text(json.dumps(test))
    with open(out_dir / SOLUTION_CSV, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["annotation_id", "concept_name"])
        w.writerows(truth)
    return {"train_images": len(train["images"]), "train_boxes": len(train["annotations"]),
            "test_images": len(test["images"]), "test_boxes": len(test["annotations"])}


# ----------------------------------------------------------------------------- CLI


def _code_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _is_ours(root: Path) -> bool:
    """False when root holds competition JSONs that this module did not write (real data)."""
    for name in (TRAIN_JSON, TEST_JSON):
        p = root / name
        if p.exists():
            try:
                with open(p) as f:
                    head = f.read(400)
            except OSError:
                return False
            if MARKER not in head:
                return False
    return True


def _up_to_date(root: Path, want: dict) -> bool:
    try:
        rec = json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if not all((root / n).is_file() for n in (TRAIN_JSON, TEST_JSON, SOLUTION_CSV)):
        return False
    return all(rec.get(k) == v for k, v in want.items())


def _clean(root: Path) -> None:
    """Remove only what this module writes."""
    for name in (RECORD, TRAIN_JSON, TEST_JSON, SOLUTION_CSV):
        (root / name).unlink(missing_ok=True)
    for sub in (TRAIN_IMAGES, TEST_IMAGES):
        shutil.rmtree(root / sub, ignore_errors=True)
        parent = (root / sub).parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def main(argv: list[str] | None = None) -> int:
    """CLI: generate the demo data unless the recorded settings and code are unchanged."""
    from lib.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m lib.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML config (defaults when omitted)")
    ap.add_argument("--force", action="store_true", help="regenerate even when up to date")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. demo.per_class=4")
    args = ap.parse_intermixed_args(argv)  # allows --force after key=value overrides
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    root = Path(cfg.data.root)
    taxonomy = Path(cfg.data.taxonomy_csv)
    tax_hash = hashlib.sha256(taxonomy.read_bytes()).hexdigest() if taxonomy.is_file() else None
    want = {"demo": dataclasses.asdict(cfg.demo), "seed": cfg.seed, "code": _code_hash(), "taxonomy": tax_hash}
    if not args.force and _up_to_date(root, want):
        print(f"demo data: up to date ({root})")
        return 0
    if not _is_ours(root):
        print(f"{root} holds competition files that lib.demo did not write; "
              f"set data.root to another folder for the demo data.", file=sys.stderr)
        return 2
    if tax_hash is None:
        print(f"Taxonomy file '{taxonomy}' does not exist; set data.taxonomy_csv.", file=sys.stderr)
        return 2
    try:
        _check(cfg.demo)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    _clean(root)
    summary = generate(root, cfg.demo, taxonomy, cfg.seed)
    record = dict(want, summary=summary)
    tmp = root / f".{RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, root / RECORD)
    print(f"demo data: {summary['train_images']} train frames ({summary['train_boxes']} boxes), "
          f"{summary['test_images']} test frames ({summary['test_boxes']} boxes) in {root} "
          f"[{time.perf_counter() - t0:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
