"""flock-based locks on stage folders: a second run of the same stage refuses at once; a dead run never holds one.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lib.core.errors import StageLocked
from lib.core.io import remove_temp_files, write_error

log = logging.getLogger("pipeline")


LOCK = ".lock"


try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]


@dataclass
class _Held:
    fd: int
    shared: bool


_locks: dict[str, _Held] = {}


def _lock_info(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?"}


def _describe(info: dict) -> str:
    cmd = " ".join(str(a) for a in info.get("argv", []))[:100]
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}" + (f": {cmd}" if cmd else "")


def acquire_lock(folder: str | Path, what: str, shared: bool = False) -> None:
    """Hold `folder/.lock` until `release_locks()` (run_cli calls it; so does exit), or refuse at once.

    An exclusive lock is one run of a stage (or a fold); shared locks are `--fold K` runs of a
    training stage, which may run side by side (a SLURM array) but never beside a whole-stage run.
    The lock is an flock(2): the kernel drops it when its process dies, kill -9 included, so a
    dead run never holds it; its owner note (pid, host, command) is left behind, and the next run
    takes over with a warning. Re-entrant within a process.
    """
    folder = Path(folder)
    path = folder / LOCK
    key = str(path.absolute())
    if fcntl is None or key in _locks:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        info = _lock_info(fd)
        os.close(fd)
        who = f"({_describe(info)})" if info else "(--fold runs)"
        raise StageLocked(f"{what} is already running in {folder} {who}; wait for that run to end or stop it, then rerun "
                          f"(a killed run releases the lock by itself).") from None
    info = _lock_info(fd)
    if info:  # an owner note with no owner: that run died without releasing
        log.warning("%s: taking over the lock in %s left by a run that ended without releasing it (%s)", what, folder, _describe(info))
    if not shared or info:
        os.ftruncate(fd, 0)
    if not shared:
        note = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]][:20]}
        os.pwrite(fd, json.dumps(note).encode(), 0)
    _locks[key] = _Held(fd, shared)


def release_locks() -> None:
    """Release every lock this process holds (the owner note is cleared: a clean end)."""
    while _locks:
        _, held = _locks.popitem()
        with contextlib.suppress(OSError):
            if not held.shared:
                os.ftruncate(held.fd, 0)
            fcntl.flock(held.fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(held.fd)


@contextlib.contextmanager
def locked(folder: str | Path, what: str) -> Iterator[None]:
    """An exclusive lock for a block (one fold); temp files left in `folder` by a killed run are swept."""
    key = str((Path(folder) / LOCK).absolute())
    mine = key not in _locks
    acquire_lock(folder, what)
    try:
        if mine:
            remove_temp_files(folder)
        yield
    finally:
        if mine and key in _locks:
            held = _locks.pop(key)
            with contextlib.suppress(OSError):
                os.ftruncate(held.fd, 0)
                fcntl.flock(held.fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(held.fd)


def _forget_locks_in_child() -> None:
    """A forked worker (crop pool, DataLoader) must not keep its parent's locks alive after the parent dies."""
    for held in _locks.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


atexit.register(release_locks)
