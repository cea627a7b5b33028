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
from lib.pipeline import track

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


@dataclass(frozen=True)
class _Kind:
    """What one result field must hold: a test, and the words a warning uses for it."""

    expected: str
    ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    """An integer as the writers write one; bool is an int to Python but never a count."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """An int or a float. NaN and infinity pass: json writes them (a fold that never improved keeps val_distance inf)."""
    return _is_int(v) or isinstance(v, float)


def _is_strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


INT = _Kind("an integer", _is_int)
NUMBER = _Kind("a number", _is_number)
TEXT = _Kind("a string", lambda v: isinstance(v, str))
OBJECT = _Kind("an object", lambda v: isinstance(v, dict))
INTS = _Kind("a list of integers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v))
NUMBERS = _Kind("a list of numbers", lambda v: isinstance(v, list) and all(_is_number(x) for x in v))
STRINGS = _Kind("a list of strings", _is_strings)
OBJECTS = _Kind("a list of objects", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v))
NAMED_OBJECTS = _Kind("an object of objects", lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()))

# The result fields later stages, reports and tools read, with what their writers put there (00's
# Preparation, lib/engine/results.py, lib/engine/rounds.run_round, 04 and knn's finish calls).
# Unknown keys pass: a newer writer may add some.
RESULT_FIELDS: dict[str, _Kind] = {
    # 00
    "train_rois": INT, "test_rois": INT, "test_rois_without_crop": INT, "rejects": INT, "classes": INT, "crops": OBJECT,
    "extra_rois": INT,
    # a fold; 01 and 03 (their CV summaries), 03's rounds
    "best_epoch": INT, "n_train": INT, "n_val": INT, "folds": INT, "oof_rows": INT, "fold_distance_mean": NUMBER,
    "fold_distance_std": NUMBER, "pseudo_rows": INT, "rounds": INT, "fold_root": TEXT,
    "per_round": OBJECTS, "validated_epochs": INTS, "loader_workers": INT,
    # 02 (and 03's per-round pseudo-labels): `models` counts the fold models there, names them in 04
    "pseudo_labels": INT, "methods": STRINGS, "mean_weight": _Kind("a number or null", lambda v: v is None or _is_number(v)),
    "by_source": OBJECT, "members": STRINGS, "temperatures": NUMBERS, "test_prior": TEXT, "prior_shift": OBJECTS,
    "models": _Kind("an integer or a list of strings", lambda v: _is_int(v) or _is_strings(v)),
    # 04 and knn
    "rows": INT, "fallbacks": INT, "weights": NUMBERS, "blend": TEXT, "decode": TEXT, "calibrate": TEXT,
    "blend_temperature": NUMBER, "submission": TEXT, "pick": TEXT, "option": TEXT, "frame_context": TEXT,
    "fold_average": TEXT, "fold_temperatures": NUMBERS, "oof_distance": NUMBER, "margin": NUMBER, "spread": NUMBER,
    "votes": NAMED_OBJECTS, "vote": TEXT, "k": INT, "source": TEXT, "index": TEXT,
}
# Score families named per view, rank or decoding: val_distance, val_acc_genus, cv_top1_testlike, oof_distance_min_risk.
RESULT_PREFIXES: tuple[tuple[str, _Kind], ...] = (("val_", NUMBER), ("cv_", NUMBER), ("oof_distance_", NUMBER))


def _kind(key: str) -> _Kind | None:
    """What a result field must hold, or None for a field no reader knows."""
    return RESULT_FIELDS.get(key) or next((k for prefix, k in RESULT_PREFIXES if key.startswith(prefix)), None)


def _nested(key: str, value: Any) -> list[tuple[str, dict]]:
    """The results a field holds in turn (03's per_round entries, knn's votes), each with its name in a warning."""
    if key == "per_round":
        return [(f"[{i}]", x) for i, x in enumerate(value)]
    if key == "votes":
        return [(f".{name}", x) for name, x in value.items()]
    return []


def result_problem(result: dict, where: str = "result") -> str | None:
    """The first result field that does not hold what its writer writes, in words; None when every one does.

    Readers use these values as they are (range(folds), f"{cv_distance:.4f}"), so a hand-edited
    wrong type would otherwise end in a traceback far from the record that holds it.
    """
    for key, value in result.items():
        kind, name = _kind(key), f"{where}.{key}"
        if kind is None:
            continue
        if not kind.ok(value):
            return f"{name} is {_short(value)}, expected {kind.expected}"
        for suffix, sub in _nested(key, value):
            problem = result_problem(sub, name + suffix)
            if problem:
                return problem
    return None


def read_record(path: str | Path) -> dict | None:
    """A record, or None if absent or unreadable (a corrupt record, or one whose result holds a value of the wrong type,
    is treated as absent, with a warning naming the file and the field)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
        if not isinstance(rec, dict) or not isinstance(rec.get("fingerprint"), dict):
            raise ValueError("no fingerprint")
        if not isinstance(rec.get("result", {}), dict) or not isinstance(rec.get("outputs", {}), dict):
            raise ValueError("malformed result or outputs")
        problem = result_problem(rec.get("result", {}))
        if problem:
            raise ValueError(problem)
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
        track.stage_finished(self.name, self.dir, result)  # a listener only: it never fails the stage (lib.pipeline.track)

    def invalidate(self) -> None:
        try:
            self.record_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise write_error(self.record_path, e) from e
