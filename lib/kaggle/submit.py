"""Upload an experiment's submission.csv with the official kaggle CLI, and keep a log of every upload.

    python -m lib.kaggle.submit --config configs/fathomnet2025.yaml [--competition fathomnet-2025] [--message TEXT] [--dry-run]

(`make submit CONFIG=... ARGS=--dry-run`). Before anything leaves the machine the file is checked
again: it must be the very file 04's record vouches for (so the scores in the message describe it)
and answer every annotation id of data.test_json once with a known concept (lib.decide.submission).
The message names the experiment, its models with their CV, the blend, the decoding and the blend's
CV distance, read from the 01/03/04 records, so Kaggle's list of submissions says what each one was.
Each upload is appended to output/<exp>/submissions.csv (time, competition, sha256, file, message).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from lib.config import Config
from lib.core.errors import StageError, UserError
from lib.core.io import atomic_write_text, sha256_bytes
from lib.data.coco import read_coco
from lib.decide.submission import validate_submission
from lib.modelref import ModelRef
from lib.pipeline import track
from lib.pipeline.cli import run_cli
from lib.pipeline.graph import member_result
from lib.pipeline.records import RECORD, read_record

COMPETITION = "fathomnet-2025"
LOG_NAME = "submissions.csv"
LOG_COLUMNS = ("time", "competition", "sha256", "file", "message")
SETUP = ("install the Kaggle CLI (pip install kaggle) and either save your API token as ~/.kaggle/kaggle.json "
         "(kaggle.com > Settings > API > Create New Token, then chmod 600 it) or set KAGGLE_USERNAME and KAGGLE_KEY")


class UploadError(UserError):
    """Why nothing was uploaded, with the fix."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lib.kaggle.submit", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    ap.add_argument("--competition", default=COMPETITION, help=f"Kaggle competition slug (default: {COMPETITION})")
    ap.add_argument("--message", default="", help="a note appended to the generated message")
    ap.add_argument("--dry-run", action="store_true", help="check the file and print the upload command; upload nothing")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as the stages took them (exp=..., output_root=...)")
    return ap


def has_credentials(env: Mapping[str, str]) -> bool:
    """Whether the kaggle CLI will find an API token: in the environment or as a file where it looks."""
    if (env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY")) or env.get("KAGGLE_API_TOKEN"):
        return True
    home = Path(env.get("HOME") or Path.home())
    folders = [Path(env["KAGGLE_CONFIG_DIR"])] if env.get("KAGGLE_CONFIG_DIR") else []
    folders += [home / ".kaggle", Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"]
    return any((d / name).is_file() for d in folders for name in ("kaggle.json", "access_token"))


def setup_problem(env: Mapping[str, str]) -> str | None:
    """What keeps the kaggle CLI from uploading from here (no executable, no token), or None."""
    if shutil.which("kaggle", path=env.get("PATH")) is None:
        return "the kaggle command is not on PATH"
    if not has_credentials(env):
        return "no Kaggle API token was found"
    return None


def expected_rows(cfg: Config) -> tuple[list[int], list[str]]:
    """The test JSON's annotation ids and the concept names an answer may use (its categories, else the train JSON's)."""
    paths = cfg.data.paths()
    test = read_coco(paths["test_json"])
    names = list(test.categories["name"])
    if not names and paths["train_json"].is_file():
        names = list(read_coco(paths["train_json"]).categories["name"])
    return test.annotations["id"].astype(int).tolist(), names


def check_against_test_json(cfg: Config, path: Path) -> None:
    """The file answers every test annotation id once with a known concept (lib.decide.submission's check, run again)."""
    ids, names = expected_rows(cfg)
    try:
        sub = pd.read_csv(path)
    except (ValueError, OSError) as e:
        raise UploadError(f"{path} is not a readable CSV ({e}); rerun 04_infer_submit.py to write it again.") from e
    try:
        validate_submission(sub, ids, names)
    except StageError as e:
        what = str(e).split("; this is a bug")[0].rstrip(".")
        raise UploadError(f"{path} does not fit {cfg.data.paths()['test_json']}: {what}; rerun 04_infer_submit.py "
                          f"with this data.test_json before uploading.") from e


def checked_submission(cfg: Config) -> tuple[Path, dict[str, Any], str]:
    """04's submission.csv, its record's result and the file's sha256, once the file is 04's own and fits the test JSON."""
    folder = cfg.out_dir / "04_submit"
    rec = read_record(folder / RECORD)
    if rec is None:
        raise UploadError(f"{folder / RECORD} is missing or unreadable; run 04_infer_submit.py (make stages) first.")
    path = folder / "submission.csv"
    if not path.is_file():
        raise UploadError(f"{path} is missing; run 04_infer_submit.py again to write it.")
    digest = sha256_bytes(path.read_bytes())
    vouched = (rec.get("outputs") or {}).get("submission.csv")
    if isinstance(vouched, dict) and vouched.get("sha256") not in (None, digest):
        raise UploadError(f"{path} is not the file 04's record vouches for (it changed after 04 wrote it); "
                          "rerun 04_infer_submit.py so that the file and the scores in the message agree.")
    check_against_test_json(cfg, path)
    return path, dict(rec.get("result") or {}), digest


def model_cv(cfg: Config, name: str) -> float | None:
    """A blended model's CV distance from its training record (01 for phase1, 03 for phase2 and round<r>), if known."""
    try:
        value = member_result(cfg, ModelRef.parse(name)).get("cv_distance")
    except (ValueError, IndexError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def describe(cfg: Config, result: Mapping[str, Any], note: str = "") -> str:
    """The upload's message, e.g. `demo: phase1 + phase2, uniform blend (0.50/0.50), min_risk decoding; CV distance 1.7679
    (phase1 1.7627, phase2 1.6055)`: what the leaderboard entry was, without opening any file."""
    models = [str(m) for m in (result.get("models") or cfg.submit.models)]
    decode = result.get("decode", cfg.submit.decode)
    option = str(result.get("option") or (f"blend {result['blend']}" if "blend" in result else f"blend {cfg.submit.blend}"))
    weights = result.get("weights") or []
    text = f"{cfg.exp}: {' + '.join(models)}, " + (f"{option.removeprefix('blend ')} blend" if option.startswith("blend ") else option)
    if len(weights) > 1:
        text += f" ({'/'.join(f'{float(w):.2f}' for w in weights)})"
    for key, what in (("calibrate", "calibration"), ("test_prior", "test prior")):
        if result.get(key) not in (None, "none"):
            text += f", {result[key]} {what}"
    text += f", {decode} decoding"
    cv = result.get("oof_distance", result.get(f"oof_distance_{decode}"))
    if isinstance(cv, (int, float)) and cv == cv:
        text += f"; CV distance {cv:.4f}" + (" (nested out of fold)" if "oof_distance" in result else
                                            " (weights fitted on these rows)" if option == "blend fit" else "")
    per_model = [(m, model_cv(cfg, m)) for m in models]
    known = [f"{m} {v:.4f}" for m, v in per_model if v is not None]
    if known:
        text += f" ({', '.join(known)})"
    return f"{text} | {note}" if note else text


def log_upload(cfg: Config, path: Path, digest: str, competition: str, message: str) -> Path:
    """Append the upload to output/<exp>/submissions.csv (written whole, atomically: never half a line)."""
    log_path = cfg.out_dir / LOG_NAME
    old = log_path.read_text() if log_path.is_file() else ""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if not old:
        writer.writerow(LOG_COLUMNS)
    elif not old.endswith("\n"):
        buf.write("\n")
    writer.writerow([time.strftime("%Y-%m-%dT%H:%M:%S%z"), competition, digest, str(path), message])
    atomic_write_text(log_path, old + buf.getvalue())
    return log_path


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Check, describe, then upload (or, with --dry-run, print the command); log what was uploaded."""
    path, result, digest = checked_submission(cfg)
    message = describe(cfg, result, args.message)
    problem = setup_problem(os.environ)
    command = ["kaggle", "competitions", "submit", "-c", args.competition, "-f", str(path), "-m", message]
    if args.dry_run:
        print(shlex.join(command))
        print("dry run: nothing uploaded" + (f" (and {problem}: {SETUP})" if problem else ""))
        return 0
    if problem:
        raise UploadError(f"Nothing was uploaded because {problem}; {SETUP}.")
    print(f"uploading {path} ({digest[:12]}) to {args.competition}: {message}", flush=True)
    rc = subprocess.run([shutil.which("kaggle") or "kaggle", *command[1:]], check=False).returncode
    if rc != 0:
        raise UploadError(f"kaggle competitions submit failed (exit {rc}, its message is above), so nothing was logged; "
                          "check that you joined the competition and accepted its rules, then rerun.")
    print(f"uploaded; logged in {log_upload(cfg, path, digest, args.competition, message)}")
    track.submission(message, args.competition)  # track.backend: the uploaded submission's message
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit code 2 with one sentence when nothing could be uploaded."""
    return run_cli(run, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
