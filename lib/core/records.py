"""Stage records: what decides "up to date" (config values, code digests, input digests) and the outputs a record vouches for.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lib.config import Config, flatten
from lib.core.errors import StageError
from lib.core.fingerprint import code_digests
from lib.core.io import atomic_write_json, file_digest, sha256_bytes, write_error

log = logging.getLogger("pipeline")


RECORD = "record.json"


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
