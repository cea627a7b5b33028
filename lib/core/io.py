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
from typing import Any, Callable, Iterator, Sequence

from lib.core.errors import StageError
from lib.core.faults import fault_point

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


def content_key(prefix: str, arrays: Sequence[Any]) -> str:
    """A sha256 of `prefix` and the arrays' dtypes, shapes and bytes (an object array by its values' repr): what a fitted
    quantity depends on, never paths or times."""
    import numpy as np

    h = hashlib.sha256(prefix.encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(repr(a.tolist()).encode() if a.dtype == object else a.data)
    return h.hexdigest()


HASH_CACHE = ".hash_cache.json"
HASH_CACHE_MAX = 200_000  # entries (about 200 bytes each): every frame of a large dataset, the code, the outputs


_hash_cache: dict[str, str] = {}
_cache_file: Path | None = None


def use_hash_cache(folder: str | Path | None) -> None:
    """Keep the digest cache in `folder/.hash_cache.json` (the stages pass the output root); None keeps it in memory.

    It lives beside the outputs, never in the project, which may be read-only (a Kaggle dataset).
    """
    global _cache_file
    _cache_file = Path(folder) / HASH_CACHE if folder is not None else None


def _stat_key(p: Path, kind: str) -> str:
    st = p.stat()
    return f"{kind}:{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _load_cache() -> None:
    """Merge what other processes cached (a missing or unreadable file is an empty cache)."""
    if _cache_file is None:
        return
    try:
        _hash_cache.update(json.loads(_cache_file.read_text()))
    except (OSError, ValueError, TypeError):
        pass


def _save_cache() -> None:
    """Trim the oldest entries (dicts keep insertion order) and write the cache; a failed write is skipped silently."""
    if len(_hash_cache) > HASH_CACHE_MAX:
        for k in list(_hash_cache)[: len(_hash_cache) - HASH_CACHE_MAX]:
            del _hash_cache[k]
    if _cache_file is not None:
        with contextlib.suppress(OSError, StageError):
            atomic_write_json(_cache_file, _hash_cache)


def cached_by_stat_many(paths: Sequence[Path], kind: str, compute: Callable[[Path], str], workers: int = 1,
                        what: str = "") -> list[str]:
    """`compute(path)` for each path, cached by (kind, path, size, mtime): a file is read again only once it changed.

    The cache is kept in memory and, after `use_hash_cache`, in a file shared by processes (last
    writer wins), written once per call. A changed file has a new key: no stale hit. Misses are
    computed by `workers` threads (hashlib releases the GIL); more than 100 of them are announced
    as `what` (a long first hashing of a large folder should not look like a hang).
    """
    keys = [_stat_key(p, kind) for p in paths]
    if any(k not in _hash_cache for k in keys):
        _load_cache()
    todo: dict[str, Path] = {}
    for k, p in zip(keys, paths):
        if k not in _hash_cache:
            todo.setdefault(k, p)
    if todo:
        if what and len(todo) > 100:
            log.info("hashing %d new or changed files in %s (once: each hash is cached by size and mtime)", len(todo), what)
        if workers > 1 and len(todo) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers) as pool:
                values = list(pool.map(compute, todo.values()))
        else:
            values = [compute(p) for p in todo.values()]
        _hash_cache.update(zip(todo, values))
        _save_cache()
    return [_hash_cache[k] for k in keys]


def cached_by_stat(path: str | Path, kind: str, compute: Callable[[Path], str]) -> str:
    """`compute(path)`, cached by (kind, path, size, mtime) so a large input (or a parsed module) is read once."""
    return cached_by_stat_many([Path(path)], kind, compute)[0]


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """Content hash of a file (sha256), cached by size and mtime."""
    return cached_by_stat(path, "sha256", _sha256_file)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith((".part", TEMP_MARK))


def dir_digest(path: str | Path) -> str:
    """Digest of a folder of frames by content: each file's name, size and sha256 (a download's temp files aside).

    Content, not timestamps: the same frames copied to another folder, downloaded again or touched
    change nothing, so no stage reruns; new pixels do. Each file's hash is cached by (path, size,
    mtime), so a folder is read in full once (and a touched file once more), then only listed.
    """
    p = Path(path)
    if not p.is_dir():
        return "missing"
    entries = sorted((e for e in os.scandir(p) if e.is_file() and not _is_temp(e.name)), key=lambda e: e.name)
    digests = cached_by_stat_many([Path(e.path) for e in entries], "sha256", _sha256_file,
                                  workers=min(8, os.cpu_count() or 1), what=str(p))
    h = hashlib.sha256()
    for e, d in zip(entries, digests):
        h.update(f"{e.name}|{e.stat().st_size}|{d}\n".encode())
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


def cached_json(path: Path | None, key: str, compute: Callable[[], Any], max_entries: int = 512) -> tuple[Any, bool]:
    """A JSON value kept in a table (key -> value) in the file at `path`, computed once per key; (value, from the cache).

    For small fitted quantities keyed by the content they were fitted on (04's temperatures, frame-context
    parameters): many keys share one file, the newest `max_entries` kept. An unreadable table is computed again and
    rewritten; None keeps nothing.
    """
    if path is None:
        return compute(), False
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        table = {}  # unreadable: compute again and rewrite it
    if not isinstance(table, dict):
        table = {}
    if key in table:
        return table[key], True
    value = compute()
    table[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dict(list(table.items())[-max_entries:])))
    return value, False


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # the first bytes of a zip archive (the second: an empty one), as numpy tells an npz


def _starts_as_zip(path: Path) -> bool:
    """Whether the file begins as a zip archive, as every npz does. np.load hands anything else (text, random bytes) to
    pickle, so its refusal under allow_pickle=False would call any such file a pickled array."""
    with open(path, "rb") as f:
        return f.read(4) in ZIP_MAGIC


def load_npz(path: str | Path, fix: str = "delete it and rerun the stage that wrote it") -> dict[str, Any]:
    """Every array of an npz, read without pickle; a missing, corrupt, non-npz or pickled file is one sentence naming it."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise StageError(f"'{path}' is missing; {fix.replace('delete it and ', '')}.")
    try:
        if _starts_as_zip(path):
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except ValueError as e:
        why = "it holds a pickled object array, which is never loaded" if "allow_pickle" in str(e) else f"ValueError: {e}"
        raise StageError(f"'{path}' cannot be loaded safely ({why}); {fix}.") from None
    except Exception as e:  # truncated or corrupt: BadZipFile, EOFError, zlib.error, OSError...
        raise StageError(f"'{path}' cannot be read ({type(e).__name__}); {fix}.") from None
    raise StageError(f"'{path}' is not a valid npz file (not a zip archive of arrays: text, another format or random "
                     f"bytes); {fix}.")
