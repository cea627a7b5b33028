"""flock-based locks on stage folders: a second run of the same stage refuses at once; a stage never
changes under a downstream stage reading it; a dead run never holds a lock.

Three files per stage folder, all flock(2), which the kernel drops when the process dies:
`.lock` is the writers' (a whole-stage run exclusive, `--fold K` runs shared), `.readers.lock`
the readers' (downstream stages, shared), and `.guard.lock` is held for an instant while a run
takes its own lock and tests the other, so a writer and a reader starting together never both
proceed. Writers and readers exclude each other; readers share, and so do fold runs.
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
READERS = ".readers.lock"
GUARD = ".guard.lock"
NOTES = ".readers"  # one owner note per reader: <reader>.<host>.<pid>.json, so a refused writer can name it


try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]


@dataclass
class _Held:
    fd: int
    shared: bool
    note: Path | None = None  # a reader's note, removed on release


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


def _note() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]][:20]}


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_error(path, e) from e


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    """Held for an instant (blocking) around "take mine, test theirs", so that test and take are one step."""
    fd = _open(folder / GUARD)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _probe(fd: int) -> bool:
    """True when someone else holds any lock on `fd`'s file (an instant exclusive try, released at once)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # another node: cannot tell, so assume so
    try:
        os.kill(int(info.get("pid", 0)), 0)
    except PermissionError:
        return True
    except (OSError, ValueError):
        return False
    return True


def _readers(folder: Path) -> list[dict]:
    """The owner notes of the runs reading `folder` (notes of dead readers left out)."""
    out = []
    for p in sorted((folder / NOTES).glob("*.json")) if (folder / NOTES).is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(p.read_text())
            if isinstance(info, dict) and _alive(info):
                out.append(info)
    return out


def _sweep_notes(folder: Path) -> None:
    """No reader holds the folder: every note left is a dead reader's."""
    if (folder / NOTES).is_dir():
        for p in (folder / NOTES).glob("*.json"):
            with contextlib.suppress(OSError):
                p.unlink()


def _refuse_writer(folder: Path, what: str) -> StageLocked:
    readers = _readers(folder)
    who = f"{readers[0].get('reader', 'a downstream stage')} ({_describe(readers[0])})" if readers else "a downstream stage"
    return StageLocked(f"{what} cannot run now: {who} is reading {folder}; wait for that run to end or stop it, then rerun "
                       f"(a killed run releases the lock by itself).")


def _take(folder: Path, what: str, shared: bool) -> int:
    """flock `folder/.lock` (exclusive, or shared for a --fold run) or refuse at once naming its holder."""
    fd = _open(folder / LOCK)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        info = _lock_info(fd)
        os.close(fd)
        who = f"({_describe(info)})" if info else "(--fold runs)"
        raise StageLocked(f"{what} is already running in {folder} {who}; wait for that run to end or stop it, then rerun "
                          f"(a killed run releases the lock by itself).") from None
    return fd


def acquire_lock(folder: str | Path, what: str, shared: bool = False, readers: bool = False) -> None:
    """Hold `folder/.lock` until `release_locks()` (run_cli calls it; so does exit), or refuse at once.

    An exclusive lock is one run of a stage (or a fold); shared locks are `--fold K` runs of a
    training stage, which may run side by side (a SLURM array) but never beside a whole-stage run.
    `readers`: a stage folder, which downstream stages read; refuse while one does (see `acquire_read_lock`).
    The lock is an flock(2): the kernel drops it when its process dies, kill -9 included, so a
    dead run never holds it; its owner note (pid, host, command) is left behind, and the next run
    takes over with a warning. Re-entrant within a process.
    """
    folder = Path(folder)
    key = str((folder / LOCK).absolute())
    if fcntl is None or key in _locks:
        return
    with _guard(folder) if readers else contextlib.nullcontext():
        fd = _take(folder, what, shared)
        if readers:
            rfd = _open(folder / READERS)
            busy = _probe(rfd)
            os.close(rfd)
            if busy:
                os.close(fd)
                raise _refuse_writer(folder, what)
            _sweep_notes(folder)
    info = _lock_info(fd)
    if info:  # an owner note with no owner: that run died without releasing
        log.warning("%s: taking over the lock in %s left by a run that ended without releasing it (%s)", what, folder, _describe(info))
    if not shared or info:
        os.ftruncate(fd, 0)
    if not shared:
        os.pwrite(fd, json.dumps(_note()).encode(), 0)
    _locks[key] = _Held(fd, shared)


def acquire_read_lock(folder: str | Path, what: str, reader: str) -> None:
    """A shared hold on upstream stage `what`'s folder while `reader` reads it, or one sentence if a run of `what` writes there.

    Held until `release_locks()`: no run of `what` (whole stage or `--fold K`) starts meanwhile, so
    everything `reader` loads comes from one version of it. A folder absent or read-only (an
    attached Kaggle output) cannot change under the reader and is not locked.
    """
    folder = Path(folder)
    key = str((folder / READERS).absolute())
    if fcntl is None or key in _locks or str((folder / LOCK).absolute()) in _locks or not folder.is_dir():
        return
    if not os.access(folder, os.W_OK):
        return
    with _guard(folder):
        wfd = _open(folder / LOCK)
        try:
            if _probe(wfd):
                info = _lock_info(wfd)
                who = f"is running ({_describe(info)})" if info else "has --fold runs going"
                raise StageLocked(f"{what} {who} in {folder}; wait for {'it' if info else 'them'} to end, then rerun {reader}.")
        finally:
            os.close(wfd)
        fd = _open(folder / READERS)
        fcntl.flock(fd, fcntl.LOCK_SH)  # never waits: writers only test it, under the guard held here
        note = folder / NOTES / f"{reader}.{socket.gethostname()}.{os.getpid()}.json"
        with contextlib.suppress(OSError):
            note.parent.mkdir(exist_ok=True)
            note.write_text(json.dumps({**_note(), "reader": reader}))
    _locks[key] = _Held(fd, True, note)


def _release(held: _Held) -> None:
    with contextlib.suppress(OSError):
        if not held.shared:
            os.ftruncate(held.fd, 0)
        fcntl.flock(held.fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(held.fd)
    if held.note is not None:
        with contextlib.suppress(OSError):
            held.note.unlink()


def release_lock(folder: str | Path, reader: bool = False) -> None:
    """Release one lock this process holds on `folder` (its read lock with `reader`); nothing if none."""
    held = _locks.pop(str((Path(folder) / (READERS if reader else LOCK)).absolute()), None)
    if held is not None:
        _release(held)


def release_locks() -> None:
    """Release every lock this process holds (owner notes are cleared: a clean end)."""
    while _locks:
        _release(_locks.popitem()[1])


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
        if mine:
            release_lock(folder)


def _forget_locks_in_child() -> None:
    """A forked worker (crop pool, DataLoader) must not keep its parent's locks alive after the parent dies."""
    for held in _locks.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


atexit.register(release_locks)
