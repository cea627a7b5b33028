"""Atomic writes (temp file + os.replace), content digests of files and folders, npz caches keyed by what made them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from lib.core.errors import StageError
from lib.core.faults import fault_point
from lib.core.paths import ROOT

log = logging.getLogger("pipeline")


TEMP_MARK = ".tmp"  # temp files are hidden (leading dot) and carry this mark; a locked stage sweeps leftovers


def write_error(path: str | Path, e: BaseException) -> StageError:
    """A failed write as one sentence naming the file (disk full, no permission, read-only, file too large)."""
    path = Path(path)
    if isinstance(e, OSError):
        why = f"{e.strerror or e} [errno {e.errno}]" if e.errno else str(e)
    else:  # torch.save reports a short write as a RuntimeError of its zip writer ("unexpected pos ...")
        why = "the write stopped short, as on a full disk"
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(next(p for p in (path.parent, *path.parents) if p.exists())).free
        why += f"; {free / 2**20:.0f} MiB free there"
    return StageError(f"Could not write '{path}' ({why}); free disk space or fix the folder's permissions and rerun "
                      f"(earlier outputs are untouched).")


def _is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(
        k in str(e) for k in ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos")))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace: readers see the old or the new file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_MARK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write with any library (np.savez, torch.save, to_csv); renamed on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The suffix stays last: np.savez appends .npz to a name without it.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{TEMP_MARK}-", suffix=path.suffix)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        yield Path(tmp)
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_write_failure(e) and not isinstance(e, StageError):
            raise write_error(path, e) from e
        raise


def remove_temp_files(folder: str | Path) -> int:
    """Delete temp files that killed runs left under `folder` (call only while holding its lock)."""
    n = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.startswith(".") and TEMP_MARK in f:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
    if n:
        log.info("removed %d temp file(s) an interrupted run left in %s", n, folder)
    return n


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


HASH_CACHE_MAX = 5000


_hash_cache: dict[str, str] = {}


def cached_by_stat(path: str | Path, kind: str, compute: Callable[[Path], str]) -> str:
    """`compute(path)`, cached by (kind, path, size, mtime) so a large input (or a parsed module) is read once.

    The cache lives in `output/.hash_cache.json` (shared by processes, last writer wins) and in
    memory, so checking many outputs reads it once. A changed file has a new key: no stale hit.
    """
    p = Path(path)
    st = p.stat()
    cache_file = ROOT / "output" / ".hash_cache.json"
    key = f"{kind}:{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _hash_cache:
        return _hash_cache[key]
    try:
        _hash_cache.update(json.loads(cache_file.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    if key in _hash_cache:
        return _hash_cache[key]
    value = compute(p)
    _hash_cache[key] = value
    if len(_hash_cache) > HASH_CACHE_MAX:  # oldest first: dicts keep insertion order
        for k in list(_hash_cache)[: len(_hash_cache) - HASH_CACHE_MAX]:
            del _hash_cache[k]
    with contextlib.suppress(OSError, StageError):
        atomic_write_json(cache_file, _hash_cache)
    return value


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """Content hash of a file (sha256), cached by size and mtime."""
    return cached_by_stat(path, "sha256", _sha256_file)



def dir_digest(path: str | Path) -> str:
    """Cheap digest of a folder of frames: names, sizes and mtimes, not contents (a download's temp files aside)."""
    p = Path(path)
    if not p.is_dir():
        return "missing"
    h = hashlib.sha256()
    for entry in sorted(os.scandir(p), key=lambda e: e.name):
        if entry.is_file() and not (entry.name.startswith(".") and entry.name.endswith((".part", TEMP_MARK))):
            st = entry.stat()
            h.update(f"{entry.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_npz(path: Path, key: str, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """Arrays stored at `path` under `key`; recomputed (and written atomically) when the key differs.

    Returns the arrays and whether they came from the cache. This is what makes re-blending cheap:
    per-model predictions are keyed by the model's record, not by the blend settings.
    """
    import numpy as np

    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["_key"]) == key:
                    return {k: z[k] for k in z.files if k != "_key"}, True
        except Exception as e:  # truncated or corrupt: BadZipFile, EOFError, zlib.error, ValueError, KeyError...
            log.warning("ignoring unreadable cache %s (%s: %s); computing it again", path, type(e).__name__, e)
    arrays = compute()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, _key=np.array(key), **arrays)
    return arrays, False
