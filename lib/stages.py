"""Stage records: fingerprints, up-to-date decisions, atomic writes, the common stage CLI.

A stage (or one fold of it) ends by writing `record.json` last and atomically. The record holds
the fingerprint that decides "up to date": the flattened values of the config sections the stage
reads (so a rerun can say `changed: train.epochs 3 -> 4`), a hash per source file of the code it
runs (the script and every `lib` module it imports, found statically so no heavy import is needed
to decide), and a digest of each input (what upstream stages produced, input files). Library
versions and the run time are stored for the reader but do not decide anything.

A record also vouches for the stage's outputs (size and content hash of each file it lists): a
deleted, truncated or replaced output makes the stage (or only that fold) run again, with a
warning naming the file. A running stage holds a lock on its folder (`.lock`, see `acquire_lock`)
so a second run of the same stage refuses at once; a lock left by a killed run is taken over.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lib.config import Config, ConfigError, dump_yaml, flatten, load_config

ROOT = Path(__file__).resolve().parent.parent
RECORD = "record.json"
log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A user-facing failure of a stage (missing upstream, bad input); one sentence with the fix."""


class StageLocked(StageError):
    """Another live run holds the stage's folder."""


# ----------------------------------------------------------------------------- fault injection

FAULT_ENV = "PIPELINE_KILL_AT"
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Tests only: `PIPELINE_KILL_AT=<name>[@<n>]` SIGKILLs this process the n-th time (default the 1st) it gets here.

    Named points: `write:<file name>` (an atomic write whose temp file is complete but not yet
    renamed), `train_batch <stage>/fold_<k> epoch <e>` (after each optimiser step) and
    `download_chunk` (after each chunk a download writes). A kill -9 cannot be caught, so this
    is the real fault, at a deterministic place.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want, _, nth = spec.rpartition("@") if "@" in spec else (spec, "", "1")
    if want != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(nth):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- atomic writes

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


# ----------------------------------------------------------------------------- digests


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


HASH_CACHE_MAX = 5000


_hash_cache: dict[str, str] = {}


def file_digest(path: str | Path) -> str:
    """Content hash of a file, cached by (path, size, mtime) so large inputs are hashed once.

    The cache lives in `output/.hash_cache.json` (shared by processes, last writer wins) and in
    memory, so checking many outputs reads it once.
    """
    p = Path(path)
    st = p.stat()
    cache_file = ROOT / "output" / ".hash_cache.json"
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _hash_cache:
        return _hash_cache[key]
    try:
        _hash_cache.update(json.loads(cache_file.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    if key in _hash_cache:
        return _hash_cache[key]
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _hash_cache[key] = digest
    if len(_hash_cache) > HASH_CACHE_MAX:  # oldest first: dicts keep insertion order
        for k in list(_hash_cache)[: len(_hash_cache) - HASH_CACHE_MAX]:
            del _hash_cache[k]
    with contextlib.suppress(OSError, StageError):
        atomic_write_json(cache_file, _hash_cache)
    return digest


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


def upstream_digest(stage_dir: str | Path, hint: str, sub_records: Callable[[dict, Path], list[Path]] | None = None) -> str:
    """Digest of what an upstream stage produced; a missing record is an error saying what to run.

    It covers the record's fingerprint, result and output hashes (and those of the records it
    relies on, a training stage's folds), not its timestamps: an upstream rerun that reproduces
    the same files (a lost fold retrained on CPU) leaves its downstream stages up to date.
    """
    rec_path = Path(stage_dir) / RECORD
    if not rec_path.is_file():
        raise StageError(f"{rec_path} is missing; run {hint} first.")
    rec = read_record(rec_path)
    if rec is None or "outputs" not in rec:  # unreadable (the stage will be reported stale) or older: its bytes
        return sha256_bytes(rec_path.read_bytes())
    content: dict[str, Any] = {"fingerprint": rec["fingerprint"], "result": rec.get("result"), "outputs": rec["outputs"]}
    if sub_records:
        subs = [read_record(p) for p in sub_records(rec, Path(stage_dir))]
        content["sub"] = [r and {"result": r.get("result"), "outputs": r.get("outputs")} for r in subs]
    return sha256_bytes(json.dumps(content, sort_keys=True, default=str).encode())


_IMPORT_RE = re.compile(r"^[ \t]*(?:from[ \t]+(lib(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)|import[ \t]+([^\n#;]*))", re.M)


def _lib_imports(path: Path) -> set[str]:
    """Names of `lib.*` modules imported anywhere in a source file (functions included).

    A line scan, not an AST walk: every stage runs this over the lib modules it reaches before it
    can say "up to date", and parsing them all cost half a second per process. A matching line
    inside a string only adds a file to the fingerprint (a needless rerun, never a missed one).
    """
    found: set[str] = set()
    for m in _IMPORT_RE.finditer(path.read_text()):
        module, names, plain = m.groups()
        if module is not None:
            if module == "lib":
                found.update(f"lib.{n.split()[0]}" for n in names.strip("()").replace("\n", " ").split(",") if n.strip())
            else:
                found.add(module)
        else:
            found.update(n.split()[0] for n in plain.split(",") if n.strip().startswith("lib."))
    return found


def code_digests(script: str | Path) -> dict[str, str]:
    """Hash of the script and of every lib module it reaches, transitively (relative path -> sha)."""
    todo, seen = [Path(script).resolve()], set()
    out: dict[str, str] = {}
    while todo:
        p = todo.pop()
        if p in seen or not p.is_file():
            continue
        seen.add(p)
        try:
            rel = str(p.relative_to(ROOT))
        except ValueError:
            rel = p.name
        out[rel] = sha256_bytes(p.read_bytes())
        for mod in _lib_imports(p):
            todo.append(ROOT / (mod.replace(".", "/") + ".py"))
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- records


def read_record(path: str | Path) -> dict | None:
    """A record, or None if absent or unreadable (a corrupt record is treated as absent, with a warning)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
        if not isinstance(rec, dict) or not isinstance(rec.get("fingerprint"), dict):
            raise ValueError("no fingerprint")
        if not isinstance(rec.get("result", {}), dict) or not isinstance(rec.get("outputs", {}), dict):
            raise ValueError("malformed result or outputs")
        return rec
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable record %s (%s); the stage will run again", p, e)
        return None


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def compare(old: dict | None, new: dict) -> list[str]:
    """Why a stage must run: empty when `old` matches `new`."""
    if old is None:
        return ["no record"]
    reasons: list[str] = []
    oc, nc = old.get("config", {}), new["config"]
    for k in sorted(set(oc) | set(nc)):
        if oc.get(k, "<unset>") != nc.get(k, "<unset>"):
            reasons.append(f"changed: {k} {_short(oc.get(k, '<unset>'))} -> {_short(nc.get(k, '<unset>'))}")
    ocode, ncode = old.get("code", {}), new["code"]
    changed = sorted(k for k in set(ocode) | set(ncode) if ocode.get(k) != ncode.get(k))
    if changed:
        reasons.append("changed code: " + ", ".join(changed))
    oi, ni = old.get("inputs", {}), new["inputs"]
    changed = sorted(k for k in set(oi) | set(ni) if oi.get(k) != ni.get(k))
    if changed:
        reasons.append("changed input: " + ", ".join(changed))
    return reasons


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "timm", "numpy", "albumentations", "faiss-cpu", "scikit-learn"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


_warned: set[str] = set()


def output_problems(folder: Path, rec: dict, sub_records: Callable[[dict, Path], list[Path]] | None = None,
                    prefix: str = "") -> list[str]:
    """Why the outputs a record vouches for cannot be trusted: missing, or not the bytes it recorded.

    `sub_records` names records this one relies on (a training stage's fold records), checked the same way.
    """
    out: list[str] = []
    for rel, meta in (rec.get("outputs") or {}).items():
        p, shown = folder / rel, prefix + rel
        try:
            if not p.is_file():
                out.append(f"missing output: {shown}")
            elif not isinstance(meta, dict) or p.stat().st_size != meta.get("size") or file_digest(p) != meta.get("sha256"):
                out.append(f"changed output: {shown}")
                if str(p) not in _warned:
                    _warned.add(str(p))
                    log.warning("%s is not the file its record vouches for (truncated, corrupted or replaced); "
                                "treating it as absent, so what wrote it runs again", p)
        except OSError as e:
            out.append(f"unreadable output: {shown} ({e.strerror or e})")
    for sub in (sub_records(rec, folder) if sub_records else []):
        rel = os.path.relpath(sub.parent, folder).replace(os.sep, "/")
        subrec = read_record(sub)
        if subrec is None:
            out.append(f"missing output: {prefix}{rel}/{RECORD}")
        else:
            out += output_problems(sub.parent, subrec, None, f"{prefix}{rel}/")
    return out


@dataclass
class Stage:
    """One stage (or fold) folder with its fingerprint; decides, logs and records.

    `outputs` are the files (relative to `dir`) its record vouches for; `sub_records` finds the
    records it relies on (a training stage's folds), so a lost fold artifact reruns that fold.
    """

    name: str
    dir: Path
    fingerprint: dict
    outputs: tuple[str, ...] = ()
    sub_records: Callable[[dict, Path], list[Path]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def create(
        cls,
        name: str,
        dir: str | Path,
        cfg: Config,
        sections: Sequence[str],
        script: str | Path,
        inputs: dict[str, str] | None = None,
        outputs: Sequence[str] = (),
        sub_records: Callable[[dict, Path], list[Path]] | None = None,
    ) -> "Stage":
        config: dict[str, Any] = {}
        for s in sections:  # "!a.b" leaves out a key that a listed section brings in
            if s.startswith("!"):
                config = {k: v for k, v in config.items() if k != s[1:] and not k.startswith(s[1:] + ".")}
            else:
                config.update(flatten(cfg.section(s), s))
        fp = {"config": config, "code": code_digests(script), "inputs": dict(sorted((inputs or {}).items()))}
        return cls(name=name, dir=Path(dir), fingerprint=fp, outputs=tuple(outputs), sub_records=sub_records)

    def child(self, name: str, dir: str | Path, extra: dict[str, Any], outputs: Sequence[str] = ()) -> "Stage":
        """A sub-unit (a fold) whose fingerprint is the stage's plus `extra` config values."""
        fp = {**self.fingerprint, "config": {**self.fingerprint["config"], **extra}}
        return Stage(name=name, dir=Path(dir), fingerprint=fp, outputs=tuple(outputs))

    @property
    def record_path(self) -> Path:
        return self.dir / RECORD

    @property
    def digest(self) -> str:
        return sha256_bytes(json.dumps(self.fingerprint, sort_keys=True).encode())

    def reasons(self) -> list[str]:
        """Why the stage must run: changed config, code or inputs, or outputs its record no longer matches."""
        rec = read_record(self.record_path)
        reasons = compare(rec["fingerprint"] if rec else None, self.fingerprint)
        if rec is not None and not reasons:
            reasons = output_problems(self.dir, rec, self.sub_records)
        return reasons

    def record(self) -> dict | None:
        return read_record(self.record_path)

    def finish(self, result: dict[str, Any], started: float) -> None:
        """Write the record last, atomically: the stage is complete only once this exists."""
        outputs = {}
        for rel in self.outputs:
            p = self.dir / rel
            if p.is_file():
                outputs[rel] = {"size": p.stat().st_size, "sha256": file_digest(p)}
        atomic_write_json(
            self.record_path,
            {
                "stage": self.name,
                "fingerprint": self.fingerprint,
                "result": result,
                "outputs": outputs,
                "versions": versions(),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "seconds": round(time.time() - started, 2),
            },
        )

    def invalidate(self) -> None:
        try:
            self.record_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise write_error(self.record_path, e) from e


# ----------------------------------------------------------------------------- locks

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
                          f"(a killed run releases the lock by itself).")
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


# ----------------------------------------------------------------------------- CLI glue


def stage_parser(description: str, folds: bool = False) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    ap.add_argument("--force", action="store_true", help="redo the stage even if its record is up to date")
    ap.add_argument("--dry-run", action="store_true", help="say what would run and why, then stop")
    if folds:
        ap.add_argument("--fold", type=int, action="append", help="run only this fold (repeatable)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=4")
    return ap


class _Console(logging.StreamHandler):
    """The console: whatever `sys.stdout` is when a message is written (not when logging was set up)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LogFile(logging.FileHandler):
    """`<stage>/log.txt`; on a full disk it says so once and stops, instead of a traceback per message."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        e = sys.exc_info()[1]
        print(f"warning: cannot write {self.baseFilename} ({getattr(e, 'strerror', None) or e}); logging to the console only",
              file=sys.stderr)
        logging.getLogger().removeHandler(self)


def setup_logging(stage_dir: Path | None = None) -> None:
    """Console at INFO plus `<stage>/log.txt`; idempotent across stages run in one process."""
    root = logging.getLogger()
    # Under torchrun only rank 0 speaks; the other ranks report warnings and errors.
    root.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_pipeline", False):
            root.removeHandler(h)
            h.close()
    console = _Console()
    console.setFormatter(logging.Formatter("%(message)s"))
    console._pipeline = True  # type: ignore[attr-defined]
    root.addHandler(console)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX probing is noise
    if stage_dir is not None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        fh = _LogFile(stage_dir / "log.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh._pipeline = True  # type: ignore[attr-defined]
        root.addHandler(fh)


def save_resolved_config(cfg: Config, stage_dir: Path) -> None:
    atomic_write_text(stage_dir / "config.yaml", dump_yaml(cfg))


def run_cli(main: Callable[[argparse.Namespace, Config], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, load the config, run; user-facing errors become one line on stderr and exit code 2."""
    args = parser.parse_intermixed_args(argv)  # flags may follow key=value overrides
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        return main(args, cfg)
    except (ConfigError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read or write the stage did not wrap itself: still one sentence naming the file
        where = f" on '{e.filename}'" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check that path (disk space, permissions), then rerun.", file=sys.stderr)
        return 2
    finally:
        release_locks()


def check(stage: Stage, force: bool, dry_run: bool) -> bool:
    """True when the stage must run; prints the decision the user sees."""
    reasons = stage.reasons()
    if not reasons and not force:
        log.info("%s: up to date (%s)", stage.name, stage.dir)
        return False
    why = "forced" if force and not reasons else "; ".join(reasons)
    log.info("%s: %s (%s)", stage.name, "would run" if dry_run else "running", why)
    return not dry_run


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
