"""Stage records: fingerprints, up-to-date decisions, atomic writes, the common stage CLI.

A stage (or one fold of it) ends by writing `record.json` last and atomically. The record holds
the fingerprint that decides "up to date": the flattened values of the config sections the stage
reads (so a rerun can say `changed: train.epochs 3 -> 4`), a hash per source file of the code it
runs (the script and every `lib` module it imports, found statically so no heavy import is needed
to decide), and a digest of each input (upstream records, input files). Library versions and the
run time are stored for the reader but do not decide anything.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lib.config import Config, ConfigError, dump_yaml, flatten, load_config

ROOT = Path(__file__).resolve().parent.parent
RECORD = "record.json"
log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A user-facing failure of a stage (missing upstream, bad input); one sentence with the fix."""


# ----------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write with any library (np.savez, torch.save, to_csv); renamed on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- digests


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path) -> str:
    """Content hash of a file, cached by (path, size, mtime) so large inputs are hashed once."""
    p = Path(path)
    st = p.stat()
    cache_file = ROOT / "output" / ".hash_cache.json"
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = digest
    with contextlib.suppress(OSError):
        atomic_write_json(cache_file, cache)
    return digest


def dir_digest(path: str | Path) -> str:
    """Cheap digest of a folder of frames: names, sizes and mtimes, not contents."""
    p = Path(path)
    if not p.is_dir():
        return "missing"
    h = hashlib.sha256()
    for entry in sorted(os.scandir(p), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            h.update(f"{entry.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def upstream_digest(stage_dir: str | Path, hint: str) -> str:
    """Digest of an upstream stage's record; a missing record is an error saying what to run."""
    rec = Path(stage_dir) / RECORD
    if not rec.is_file():
        raise StageError(f"{rec} is missing; run {hint} first.")
    return sha256_bytes(rec.read_bytes())


def _lib_imports(path: Path) -> set[str]:
    """Names of `lib.*` modules imported anywhere in a source file (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lib."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "lib":
                found.update(f"lib.{a.name}" for a in node.names)
            elif node.module.startswith("lib."):
                found.add(node.module)
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
        if not isinstance(rec, dict) or "fingerprint" not in rec:
            raise ValueError("no fingerprint")
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


@dataclass
class Stage:
    """One stage (or fold) folder with its fingerprint; decides, logs and records."""

    name: str
    dir: Path
    fingerprint: dict

    @classmethod
    def create(
        cls,
        name: str,
        dir: str | Path,
        cfg: Config,
        sections: Sequence[str],
        script: str | Path,
        inputs: dict[str, str] | None = None,
    ) -> "Stage":
        config: dict[str, Any] = {}
        for s in sections:  # "!a.b" leaves out a key that a listed section brings in
            if s.startswith("!"):
                config = {k: v for k, v in config.items() if k != s[1:] and not k.startswith(s[1:] + ".")}
            else:
                config.update(flatten(cfg.section(s), s))
        fp = {"config": config, "code": code_digests(script), "inputs": dict(sorted((inputs or {}).items()))}
        return cls(name=name, dir=Path(dir), fingerprint=fp)

    def child(self, name: str, dir: str | Path, extra: dict[str, Any]) -> "Stage":
        """A sub-unit (a fold) whose fingerprint is the stage's plus `extra` config values."""
        fp = {**self.fingerprint, "config": {**self.fingerprint["config"], **extra}}
        return Stage(name=name, dir=Path(dir), fingerprint=fp)

    @property
    def record_path(self) -> Path:
        return self.dir / RECORD

    @property
    def digest(self) -> str:
        return sha256_bytes(json.dumps(self.fingerprint, sort_keys=True).encode())

    def reasons(self) -> list[str]:
        rec = read_record(self.record_path)
        return compare(rec["fingerprint"] if rec else None, self.fingerprint)

    def record(self) -> dict | None:
        return read_record(self.record_path)

    def finish(self, result: dict[str, Any], started: float) -> None:
        """Write the record last, atomically: the stage is complete only once this exists."""
        atomic_write_json(
            self.record_path,
            {
                "stage": self.name,
                "fingerprint": self.fingerprint,
                "result": result,
                "versions": versions(),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "seconds": round(time.time() - started, 2),
            },
        )

    def invalidate(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()


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


def setup_logging(stage_dir: Path | None = None) -> None:
    """Console at INFO plus `<stage>/log.txt`; idempotent across stages run in one process."""
    root = logging.getLogger()
    # Under torchrun only rank 0 speaks; the other ranks report warnings and errors.
    root.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_pipeline", False):
            root.removeHandler(h)
            h.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    console._pipeline = True  # type: ignore[attr-defined]
    root.addHandler(console)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX probing is noise
    if stage_dir is not None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(stage_dir / "log.txt")
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
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable cache %s (%s)", path, e)
    arrays = compute()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, _key=np.array(key), **arrays)
    return arrays, False
