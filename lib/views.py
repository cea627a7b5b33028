"""The grammar of test-time augmentation view names (`tta.views`), free of torch.

Kept apart from lib.engine.inference so config validation can check the names without importing torch, and
so that every stage's code digest (lib.core.fingerprint follows imports statically, lib.config is reached by
all stages) does not depend on lib.engine.inference's tensor code.

A name is one or more transforms joined by '+', applied left to right:
identity, hflip, vflip, rot90, rot180, rot270 (counter-clockwise), rotate<degrees> (a small
counter-clockwise rotation, negative for clockwise: rotate10, rotate-10, rotate2.5) and
scale<factor> (zoom about the centre, size kept: scale1.1 zooms in, scale0.9 zooms out).
"""
from __future__ import annotations

import math
import re

Op = tuple[str, float]  # ("hflip", 0), ("vflip", 0), ("rot90", k quarter turns), ("rotate", degrees), ("scale", factor)

FORMS = ("identity, hflip, vflip, rot90, rot180, rot270, rotate<degrees> (e.g. rotate10, rotate-10), "
         "scale<factor> (e.g. scale0.9, scale1.1) or several joined by '+' (e.g. hflip+rot90)")

_FIXED: dict[str, tuple[Op, ...]] = {
    "identity": (),
    "hflip": (("hflip", 0.0),),
    "vflip": (("vflip", 0.0),),
    "rot90": (("rot90", 1.0),),
    "rot180": (("rot90", 2.0),),
    "rot270": (("rot90", 3.0),),
}
_NUMBER = r"(-?(?:\d+(?:\.\d*)?|\.\d+))"  # no '+' sign: '+' joins views
_PARAM = re.compile(rf"(rotate|scale){_NUMBER}")


def _part_ops(part: str, name: str) -> tuple[Op, ...]:
    if part in _FIXED:
        return _FIXED[part]
    m = _PARAM.fullmatch(part)
    if not m:
        raise ValueError(f"Unknown TTA view '{name}'; use {FORMS}.")
    kind, value = m.group(1), float(m.group(2))
    if kind == "scale" and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"TTA view '{name}' has a scale factor of {value:g}; use a positive factor (e.g. scale0.9).")
    return ((kind, value),)


def view_ops(name: str) -> tuple[Op, ...]:
    """The transforms of one view name, in the order they are applied (identity: none)."""
    if not isinstance(name, str):
        raise ValueError(f"TTA view {name!r} is not a name; use {FORMS}.")
    ops: tuple[Op, ...] = ()
    for part in name.strip().split("+"):
        ops += _part_ops(part.strip(), name)
    return ops


def check_view_names(names: list[str]) -> list[tuple[Op, ...]]:
    """The ops of every name; ValueError (one sentence) for an empty list or a bad name."""
    if not names:
        raise ValueError("No TTA view is listed; list at least one (e.g. [identity]).")
    return [view_ops(n) for n in names]
