"""The common stage command line: flags, logging to the console and the stage folder, one-sentence errors.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from lib.config import Config, dump_yaml, load_config
from lib.core.errors import UserError
from lib.core.io import atomic_write_text, use_hash_cache
from lib.core.locks import release_locks
from lib.pipeline import track
from lib.pipeline.records import Stage

log = logging.getLogger("pipeline")


def stage_parser(description: str, folds: bool = False) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default="configs/demo.yaml",
                    help="YAML config, found in the current directory or else in the project (default: configs/demo.yaml)")
    ap.add_argument("--force", action="store_true", help="redo the stage even if its record is up to date")
    ap.add_argument("--dry-run", action="store_true", help="say what would run and why, then stop")
    if folds:
        ap.add_argument("--fold", type=int, action="append", help="run only this fold (repeatable)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=4")
    return ap


class _Console(logging.StreamHandler):
    """The console: whatever `sys.stdout` is when a message is written (not when logging was set up)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LogFile(logging.FileHandler):
    """`<stage>/log.txt`; on a full disk it says so once and stops, instead of a traceback per message."""

    def handleError(self, record: logging.LogRecord) -> None:  # logging's name
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


def run_cli(run: Callable[[argparse.Namespace, Config], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """A stage's `main`: parse, load the config, call `run(args, cfg)` (the stage body); user-facing errors become
    one line on stderr and exit code 2."""
    args = parser.parse_intermixed_args(argv)  # flags may follow key=value overrides
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        use_hash_cache(cfg.out_root)  # beside the outputs: the project may be read-only
        track.configure(cfg)  # track.backend's run opens with the first record written (lib.pipeline.track)
        return run(args, cfg)
    except UserError as e:  # ConfigError, StageError, TaxonomyError, MetricError ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read or write the stage did not wrap itself: still one sentence naming the file
        where = f" on '{e.filename}'" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check that path (disk space, permissions), then rerun.", file=sys.stderr)
        return 2
    finally:
        track.close()
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
