"""Write the synthetic FathomNet-format demo dataset unless the record says it is up to date.

`python -m lib.demo --config configs/demo.yaml [--force] [key=value ...]`. The record
(`demo_record.json`, written last) holds the demo settings (demo.frames among them), seed, taxonomy digest,
the digest of the real frame compositions (with demo.frames=real) and a stamp of the generator's code; any change to
one of them regenerates.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

from lib.core.errors import StageError
from lib.core.fingerprint import meaning_digest
from lib.core.io import atomic_write_json, sha256_bytes
from lib.data.taxonomy import load_taxonomy_csv
from lib.demo import compositions, dataset, frames, looks, plans, sprites
from lib.demo.dataset import MARKER, SOLUTION_CSV, TEST_IMAGES, TEST_JSON, TRAIN_IMAGES, TRAIN_JSON, check_settings, generate

RECORD = "demo_record.json"
STAMPED = (looks, plans, sprites, frames, compositions, dataset)  # the modules whose code decides the data's bytes


def code_stamp(paths: Iterable[Path]) -> str:
    """A digest of the modules' code by meaning (lib.core.fingerprint: their AST without docstrings, comments or layout).

    A new Python version may dump ASTs differently: that regenerates once, which is harmless.
    """
    return sha256_bytes("".join(f"{p.name}\n{meaning_digest(p.read_text())}\n" for p in paths).encode())


def _code_hash() -> str:
    return code_stamp(Path(str(m.__file__)) for m in STAMPED)


def _compositions_hash(frames_mode: str) -> str | None:
    """The digest of the real frame compositions when the demo draws from them (demo.frames=real), else None; a
    missing file is None too, and the generator then stops with the sentence that says so."""
    path = compositions.COMPOSITIONS_CSV
    if frames_mode != "real" or not path.is_file():
        return None
    return sha256_bytes(path.read_bytes())


def _is_ours(root: Path) -> bool:
    """False when root holds competition JSONs that lib.demo did not write (real data)."""
    for name in (TRAIN_JSON, TEST_JSON):
        p = root / name
        if p.exists():
            try:
                with open(p) as f:
                    head = f.read(400)
            except OSError:
                return False
            if MARKER not in head:
                return False
    return True


def _up_to_date(root: Path, want: dict) -> bool:
    try:
        rec = json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if not all((root / n).is_file() for n in (TRAIN_JSON, TEST_JSON, SOLUTION_CSV)):
        return False
    return all(rec.get(k) == v for k, v in want.items())


def _clean(root: Path) -> None:
    """Remove only what lib.demo writes."""
    for name in (RECORD, TRAIN_JSON, TEST_JSON, SOLUTION_CSV):
        (root / name).unlink(missing_ok=True)
    for sub in (TRAIN_IMAGES, TEST_IMAGES):
        shutil.rmtree(root / sub, ignore_errors=True)
        parent = (root / sub).parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def main(argv: list[str] | None = None) -> int:
    """CLI: generate the demo data unless the recorded settings and code are unchanged."""
    from lib.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m lib.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML config (defaults when omitted)")
    ap.add_argument("--force", action="store_true", help="regenerate even when up to date")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. demo.per_class=4")
    args = ap.parse_intermixed_args(argv)  # allows --force after key=value overrides
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    root = cfg.data.root_dir()
    tax_csv = cfg.data.paths()["taxonomy_csv"]
    tax_hash = sha256_bytes(tax_csv.read_bytes()) if tax_csv.is_file() else None
    want = {"demo": dataclasses.asdict(cfg.demo), "seed": cfg.seed, "code": _code_hash(), "taxonomy": tax_hash,
            "compositions": _compositions_hash(cfg.demo.frames)}
    if not args.force and _up_to_date(root, want):
        print(f"demo data: up to date ({root})")
        return 0
    if not _is_ours(root):
        print(f"{root} holds competition files that lib.demo did not write; "
              f"set data.root to another folder for the demo data.", file=sys.stderr)
        return 2
    if tax_hash is None:
        print(f"Taxonomy file '{tax_csv}' does not exist; set data.taxonomy_csv.", file=sys.stderr)
        return 2
    try:
        taxonomy = load_taxonomy_csv(tax_csv)  # a malformed table stops here, before anything is removed
        check_settings(cfg.demo, taxonomy)  # so does a demo.frames=real that lacks its compositions
    except ValueError as e:  # TaxonomyError is a ValueError
        print(str(e), file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    _clean(root)
    try:
        summary = generate(root, cfg.demo, taxonomy, cfg.seed)
        atomic_write_json(root / RECORD, dict(want, summary=summary))  # last: it marks the data complete
    except StageError as e:  # a failed write (full disk, permissions), as one sentence
        print(str(e), file=sys.stderr)
        return 2
    print(f"demo data: {summary['train_images']} train frames ({summary['train_boxes']} boxes), "
          f"{summary['test_images']} test frames ({summary['test_boxes']} boxes) in {root} "
          f"[{time.perf_counter() - t0:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
