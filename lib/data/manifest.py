"""00's crop manifest: every crop file rois.csv names, with its size, so 00's record vouches for its crops.

`crops_manifest.json` lists each crop (path relative to the stage folder) and its size; 00's
record holds the manifest's digest (`result.crops`). A crop lost, emptied or replaced by another
size since is found by `crop_problems` (one stat per crop, no read) and makes 00 run again alone:
the crops cut again are the same bytes, so the record and everything downstream stay as they were.
Only the standard library here: the up-to-date check must stay fast.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

MANIFEST = "crops_manifest.json"
SHOWN = 3  # crops named in a reason; the rest are counted


def build(folder: Path, rel_paths: Iterable[str]) -> dict[str, int]:
    """{relative path: size} of the crops (each listed once, sorted)."""
    return {rel: (folder / rel).stat().st_size for rel in sorted(set(rel_paths)) if rel}


def digest(files: dict[str, int]) -> str:
    """sha256 over the crops' names and sizes, in order: what 00's record keeps."""
    h = hashlib.sha256()
    for rel, size in files.items():
        h.update(f"{rel}|{size}\n".encode())
    return h.hexdigest()


def summary(files: dict[str, int]) -> dict[str, object]:
    """The record's `crops` entry: how many, how many bytes, the digest."""
    return {"files": len(files), "bytes": sum(files.values()), "digest": digest(files)}


def _read(folder: Path) -> dict[str, int] | None:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def crop_problems(folder: Path, result: dict | None) -> list[str]:
    """Why the crops 00's record (its `result`) vouches for cannot be trusted: [] when they all stand.

    A record without a `crops` entry vouches for none (an older 00, or no record): nothing to check.
    """
    recorded = (result or {}).get("crops")
    if not isinstance(recorded, dict):
        return []
    files = _read(folder)
    if files is None:
        return [f"missing output: {MANIFEST}"]
    if digest(files) != recorded.get("digest"):
        return [f"changed output: {MANIFEST}"]
    bad: list[str] = []
    for rel, size in files.items():
        try:
            now = os.stat(folder / rel).st_size
        except OSError:
            bad.append(f"missing crop: {rel}")
            continue
        if now != size:
            bad.append(f"changed crop: {rel} ({now} bytes, recorded {size})")
    if len(bad) > SHOWN:
        bad = bad[:SHOWN] + [f"and {len(bad) - SHOWN} more of {len(files)} crops"]
    return bad
