"""Body plans: one function per plan draws the organism's shape with a `Pen` in unit coordinates.

Each returns the main axis (tail, head) that sprites.py lays patterns and marks along.
Over 450 lines: one short drawing function per body plan of the taxonomy, side by side so that the plans stay
comparable; the demo's generator is a tool beside the pipeline, and no stage imports it.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from lib.demo.looks import RGBA, Look, rgb

CANVAS = 192  # sprite drawing resolution; sprites are downscaled to their box size

Point = tuple[float, float]


class Pen:
    """Draws in unit coordinates (origin at the canvas centre, +y down, |x|,|y| <~ 1.1)."""

    def __init__(self, rng: np.random.Generator, look: Look, hue: float, sat: float, val: float):
        self.img = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
        self.d = ImageDraw.Draw(self.img)
        self.c = CANVAS / 2
        self.u = CANVAS * 0.43
        self.rng = rng
        self.look = look
        self.hue, self.sat, self.val = hue, sat, val
        self.body = rgb(hue, sat, val)
        self.dark = rgb(hue, sat, val * 0.55)
        self.light = rgb(hue, sat * 0.5, min(1.0, val * 1.25))

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


def _fish(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _crustacean(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _octopus(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _bivalve(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _snail(pen: Pen, lk: Look) -> tuple[Point, Point]:
    pen.ellipse(0.0, 0.62, 0.8, 0.16, pen.light)
    y, r = 0.35, 0.6
    for k in range(5):
        pen.ellipse(0.06 * k, y, r + 0.03, r * 0.55 + 0.03, pen.dark)
        pen.ellipse(0.06 * k, y, r, r * 0.55, pen.body)
        y -= r * 0.55 * lk.aspect
        r *= 0.72
    pen.ellipse(0.38, 0.42, 0.2, 0.15, pen.dark)
    return (0.0, 0.5), (0.2, y)


def _star(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _brittle(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _crinoid(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _cucumber(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _urchin(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _anemone(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _octocoral(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _medusa(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _vase(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _blob(pen: Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    if lk.style == 1:  # stalked, round head
        pen.line([(0.0, 1.0), (0.0, -0.2)], 0.06 * lk.arm_width, pen.body)
        pen.ellipse(0.0, -0.45, 0.35 * lk.aspect, 0.35, pen.body)
        pen.ellipse(0.0, -0.45, 0.08, 0.08, pen.dark)
        return (0.0, 0.9), (0.0, -0.45)
    if lk.style == 3:  # finger sponge
        for _ in range(int(3 + 3 * lk.pat_density)):
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
        for _ in range(4):
            a = rng.uniform(0, 2 * math.pi)
            pen.ellipse(0.45 * math.cos(a), 0.45 * math.sin(a), 0.28, 0.28, pen.body)
    for _ in range(int(2 + 4 * lk.pat_density)):
        pen.ellipse(rng.uniform(-0.35, 0.35), rng.uniform(-0.35, 0.35), 0.07, 0.07, pen.dark)
    return (-0.4, 0.0), (0.4, 0.0)


def _pyrosome(pen: Pen, lk: Look) -> tuple[Point, Point]:
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


def _tunicate(pen: Pen, lk: Look) -> tuple[Point, Point]:
    for s, h in ((-1, 0.35), (1, 0.45)):
        x = s * 0.18
        pen.line([(x, -0.2), (x + s * 0.08, -0.45 - h * 0.3)], 0.16, pen.body)
        pen.ellipse(x + s * 0.08, -0.45 - h * 0.3, 0.09, 0.05, pen.dark)
    pen.ellipse(0.0, 0.25, 0.42 * lk.aspect ** 0.5, 0.65 / lk.aspect ** 0.5, pen.body)
    return (0.0, 0.8), (0.0, -0.3)


def _worm(pen: Pen, lk: Look) -> tuple[Point, Point]:
    rng = pen.rng
    tube = rgb(pen.hue, pen.sat * 0.3, min(1.0, pen.val * 1.1))
    pts = _curve(rng.uniform(-0.15, 0.15), 1.05, -math.pi / 2, 0.95, rng.uniform(-0.5, 0.5), n=8)
    top = pts[-1]
    n = _n_arms(lk, 12, 6, 24)
    if lk.style % 2 == 0:  # feather-duster crown
        for i in range(n):
            a = math.pi * (1.1 + 0.8 * i / (n - 1))
            arm = _curve(top[0], top[1], a, 0.55 * lk.arm_len, rng.uniform(-0.3, 0.3), n=6)
            pen.line(arm, 0.03 * lk.arm_width, pen.body)
            for x, y in arm[1:-1]:
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


PLANS: dict[str, Callable[[Pen, Look], tuple[Point, Point]]] = {
    "fish": _fish, "crustacean": _crustacean, "octopus": _octopus, "bivalve": _bivalve, "snail": _snail,
    "star": _star, "brittle": _brittle, "crinoid": _crinoid, "cucumber": _cucumber, "urchin": _urchin,
    "anemone": _anemone, "octocoral": _octocoral, "medusa": _medusa, "vase": _vase, "blob": _blob,
    "pyrosome": _pyrosome, "tunicate": _tunicate, "worm": _worm,
}
UPRIGHT = {"anemone", "octocoral", "vase", "tunicate", "worm", "crinoid", "medusa", "snail"}
TRANSLUCENT = {"medusa": 0.78, "pyrosome": 0.85, "tunicate": 0.9}
