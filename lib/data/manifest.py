"""00's crop manifest: every crop file rois.csv names, with its size and content digest, so 00's record vouches for its crops.

`crops_manifest.json` maps each crop (path relative to the stage folder) to `{"size", "sha256"}`
of the bytes 00 wrote, hashed in memory where each crop was encoded (no file is read back). 00's
record holds the manifest's digest (`result.crops`). Two checks, at two costs:
- `crop_problems`, 00's up-to-date check: one stat per crop, no read. A crop lost, emptied or
  resized since makes 00 run again alone: the crops cut again are the same bytes, so the record
  and everything downstream stay as they were.
- `verify`, run by a training stage before its first epoch: reads and hashes every crop it will
  read, so a crop replaced by other bytes of the same size is caught too, before hours of training.
A manifest of an older 00 (sizes only) is an outdated output: 00 runs again and writes the digests.
Only the standard library here: the up-to-date check must stay fast.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

MANIFEST = "crops_manifest.json"
SHOWN = 3  # crops named in a reason; the rest are counted


class CropFile(NamedTuple):
    """A crop as 00 wrote it: its byte count and the sha256 of those bytes."""

    size: int
    sha256: str


class BadCrop(NamedTuple):
    """A crop that is not what the manifest lists, and how (path relative to the stage folder)."""

    path: str
    why: str


class ManifestError(ValueError):
    """The manifest cannot be used (missing, unreadable, or sizes only); its message is the reason."""


def entry(data: bytes) -> CropFile:
    """What the manifest records for a crop whose encoded bytes are `data`: hashed while they are in memory."""
    return CropFile(len(data), hashlib.sha256(data).hexdigest())


def build(written: Mapping[str, CropFile], rel_paths: Iterable[str]) -> dict[str, CropFile]:
    """The manifest: every crop rois.csv names (each once, sorted) as its writer recorded it.

    Every such crop was written by this run, so a path missing from `written` is a bug (KeyError).
    """
    return {rel: written[rel] for rel in sorted(set(rel_paths)) if rel}


def to_json(files: Mapping[str, CropFile]) -> dict[str, object]:
    """The manifest as crops_manifest.json holds it."""
    return {"files": {rel: {"size": f.size, "sha256": f.sha256} for rel, f in files.items()}}


def digest(files: Mapping[str, CropFile]) -> str:
    """sha256 over the crops' names, sizes and content digests, in order: what 00's record keeps."""
    h = hashlib.sha256()
    for rel, f in files.items():
        h.update(f"{rel}|{f.size}|{f.sha256}\n".encode())
    return h.hexdigest()


def summary(files: Mapping[str, CropFile]) -> dict[str, object]:
    """The record's `crops` entry: how many, how many bytes, the digest."""
    return {"files": len(files), "bytes": sum(f.size for f in files.values()), "digest": digest(files)}


def _entry(value: object) -> CropFile:
    """One manifest value, checked: a size-only int (an older 00) or anything malformed is a ManifestError."""
    if isinstance(value, int):
        raise ManifestError(f"outdated output: {MANIFEST} (sizes only, no content digests: written by an older 00)")
    if not isinstance(value, dict) or not isinstance(value.get("size"), int) or not isinstance(value.get("sha256"), str):
        raise ManifestError(f"unreadable output: {MANIFEST}")
    return CropFile(value["size"], value["sha256"])


def load(folder: Path) -> dict[str, CropFile]:
    """The manifest in `folder`; a ManifestError naming why it cannot be used."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise ManifestError(f"missing output: {MANIFEST}") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ManifestError(f"unreadable output: {MANIFEST}") from None
    if not isinstance(files, dict):
        raise ManifestError(f"unreadable output: {MANIFEST}")
    return {str(k): _entry(v) for k, v in files.items()}


def crop_problems(folder: Path, result: dict | None) -> list[str]:
    """Why the crops 00's record (its `result`) vouches for cannot be trusted: [] when they all stand. Stat only.

    A record without a `crops` entry vouches for none (an older 00, or no record): nothing to check.
    """
    recorded = (result or {}).get("crops")
    if not isinstance(recorded, dict):
        return []
    try:
        files = load(folder)
    except ManifestError as e:
        return [str(e)]
    if digest(files) != recorded.get("digest"):
        return [f"changed output: {MANIFEST}"]
    bad: list[str] = []
    for rel, f in files.items():
        try:
            now = os.stat(folder / rel).st_size
        except OSError:
            bad.append(f"missing crop: {rel}")
            continue
        if now != f.size:
            bad.append(f"changed crop: {rel} ({now} bytes, recorded {f.size})")
    if len(bad) > SHOWN:
        bad = bad[:SHOWN] + [f"and {len(bad) - SHOWN} more of {len(files)} crops"]
    return bad


def _why(folder: Path, rel: str, want: CropFile | None) -> str:
    """How crop `rel` differs from what 00 wrote; '' when it is those bytes."""
    if want is None:
        return f"not in {MANIFEST}"
    try:
        data = (folder / rel).read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if len(data) != want.size:
        return f"{len(data)} bytes, recorded {want.size}"
    if hashlib.sha256(data).hexdigest() != want.sha256:
        return "other bytes of the recorded size"
    return ""


def verify(folder: Path, files: Mapping[str, CropFile], rel_paths: Iterable[str], workers: int = 8) -> list[BadCrop]:
    """Every crop of `rel_paths` (relative to `folder`) that is missing or not the bytes `files` lists, in path order.

    Reads and hashes each crop in a thread pool (file reads and sha256 release the GIL): a
    training stage calls it once before its first epoch, not per read.
    """
    rels = sorted(set(rel_paths))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        whys = list(ex.map(lambda rel: _why(folder, rel, files.get(rel)), rels))
    return [BadCrop(rel, why) for rel, why in zip(rels, whys) if why]


def describe(bad: list[BadCrop]) -> str:
    """'crops/a.png: missing; crops/b.png: ...; and 4 more': the first few named, the rest counted."""
    shown = "; ".join(f"{b.path}: {b.why}" for b in bad[:SHOWN])
    return shown + (f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
