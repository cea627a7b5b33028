"""The steps of notebooks/kaggle_fathomnet2025.ipynb: install, resume, doctor (stops on a fatal problem), stages, the submission copy.

Standard library only: the notebook imports this from the attached repository before anything is
installed. Every command runs with the repository as its working directory (the config's relative
paths, such as the taxonomy table, are the project's) whatever the notebook's own directory is, and
with the notebook's Python, so what `install` put there is what the stages import.
"""
from __future__ import annotations

import codecs
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Test and lint tools in requirements.txt: a run needs none of them, so a wheels dataset need not carry them.
DEV_TOOLS = frozenset({"pytest", "ruff", "mypy", "nbclient", "nbformat", "ipykernel", "jupytext"})
WHEELS_HINT = ("on a machine with internet and Kaggle's Python version, `pip download -r requirements.txt -d wheels` "
               "(torch and torchvision may be left out: Kaggle brings them), then upload the folder as a dataset")


class NotebookError(RuntimeError):
    """A step failed; the message names it and the fix (the command's own output is printed above it)."""


def relay(cmd: Sequence[str], cwd: Path) -> int:
    """Run `cmd` in `cwd`, copying its output into the cell as it comes, so progress bars move (tqdm redraws with \\r).

    Interrupting the cell interrupts the command too (SIGINT, as Ctrl-C would), so no stage runs on unseen.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        fd = proc.stdout.fileno() if proc.stdout is not None else -1
        while chunk := os.read(fd, 1 << 16):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True))
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()


def runtime_requirements(text: str) -> list[str]:
    """requirements.txt's lines without comments and the test and lint tools: what the stages import."""
    out = []
    for line in text.splitlines():
        req = line.split("#", 1)[0].strip()
        name = re.split(r"[\s<>=!~\[;@]", req, maxsplit=1)[0].lower().replace("_", "-")
        if req and name not in DEV_TOOLS:
            out.append(req)
    return out


def pip_command(requirements: Path, wheels_dir: str | None) -> list[str]:
    """pip install -r with the notebook's Python; offline (`wheels_dir`) --no-index --find-links, so pip never
    reaches for the network and what is already installed (Kaggle's torch) is kept."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)]
    return cmd + (["--no-index", "--find-links", wheels_dir] if wheels_dir else [])


def install(repo: Path, offline: bool, wheels_dir: str) -> None:
    """Install what the stages need from requirements.txt: from PyPI, or offline from an attached wheels dataset."""
    if offline and not Path(wheels_dir).is_dir():
        raise NotebookError(f"OFFLINE is set but WHEELS_DIR '{wheels_dir}' is not a folder; attach a wheels dataset "
                            f"({WHEELS_HINT}) or set OFFLINE = False with the notebook's internet on.")
    reqs = runtime_requirements((repo / "requirements.txt").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        listed = Path(tmp) / "requirements-run.txt"
        listed.write_text("\n".join(reqs) + "\n")
        rc = relay(pip_command(listed, wheels_dir if offline else None), cwd=repo)
    if rc != 0:
        fix = f"add the wheels pip names above to WHEELS_DIR ({WHEELS_HINT})" if offline else "turn the notebook's internet on"
        raise NotebookError(f"pip could not install requirements.txt (exit {rc}, its message is above); {fix}, then run this cell again.")
    print(f"installed {len(reqs)} requirement(s)" + (f" from {wheels_dir}" if offline else ""))


def data_root(given: Path, download: bool, writable: Path) -> Path:
    """Where the stages read the data: `given`, or, when frames are to be downloaded and `given` is read-only (an
    attached dataset), a writable folder holding a copy of its JSON files, into which 00 downloads the frames."""
    if not download or os.access(given, os.W_OK):
        return given
    writable.mkdir(parents=True, exist_ok=True)
    for f in given.glob("*.json"):
        if not (writable / f.name).is_file():
            shutil.copyfile(f, writable / f.name)
    print(f"{given} is read-only: frames will be downloaded into {writable} (with a copy of its JSON files)")
    return writable


def resume(previous: Path, output_root: Path, exp: str) -> int:
    """Copy an earlier session's output/<exp> (an attached dataset, read-only) into the writable output_root.

    Files already there are kept (this session's work is newer); the records then tell each stage
    what is done, and a fold killed mid-run resumes from its last.pt. Returns the number of files copied.
    """
    src = next((c for c in (previous / exp, previous / "output" / exp) if c.is_dir()), None)
    if src is None:
        raise NotebookError(f"RESUME_FROM '{previous}' holds no folder '{exp}' (nor output/{exp}); point it at the attached "
                            "copy of the earlier session's output_root.")
    dst, copied = output_root / exp, 0
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)  # not copy2: the attached copy is read-only, and the stages append to logs
            copied += 1
    print(f"resumed from {src}: copied {copied} file(s) into {dst}")
    return copied


@dataclass(frozen=True)
class Run:
    """One experiment as the notebook runs it: the repository, its config and the overrides every command gets."""

    repo: Path
    config: str
    overrides: tuple[str, ...]

    @property
    def config_path(self) -> Path:
        return self.repo / self.config  # an absolute CONFIG stays as it is

    @property
    def args(self) -> list[str]:
        return ["--config", str(self.config_path), *self.overrides]

    def stage(self, script: str, *flags: str) -> None:
        """Run a stage script; it prints `up to date` when nothing it reads changed, so rerunning a cell is cheap."""
        self._check(script, relay([sys.executable, str(self.repo / script), *self.args, *flags], cwd=self.repo))

    def module(self, name: str, *flags: str) -> None:
        """Run `python -m <name>` (lib.demo, lib.report, lib.kaggle.submit) on this experiment."""
        self._check(f"python -m {name}", relay([sys.executable, "-m", name, *self.args, *flags], cwd=self.repo))

    def doctor(self, *flags: str) -> bool:
        """`python -m lib.doctor` where this checkout has it; a fatal problem it finds (a missing path, train.device cuda
        without a usable GPU) stops the notebook here, before an hour goes into a run that cannot finish."""
        lib = self.repo / "lib"
        if not ((lib / "doctor.py").is_file() or (lib / "doctor" / "__main__.py").is_file()):
            print("note: this checkout has no lib.doctor (a newer one checks the environment first); going on.")
            return False
        try:
            rc = relay([sys.executable, "-m", "lib.doctor", *self.args, *flags], cwd=self.repo)
        except OSError as e:
            print(f"note: could not start lib.doctor ({e}); going on.")
            return False
        if rc:
            raise NotebookError(f"lib.doctor found a fatal problem (exit {rc}, each one named above); fix it in the parameters "
                                "cell or the notebook's settings (accelerator, inputs), then run the cells again.")
        return True

    def _check(self, what: str, rc: int) -> None:
        if rc != 0:
            raise NotebookError(f"{what} stopped (exit {rc}, its message is above); fix what it names and run this cell "
                                "again: finished stages and folds are kept.")


def copy_submission(exp_dir: Path, dest: Path) -> Path:
    """04's submission.csv to where Kaggle picks it up (/kaggle/working/submission.csv); says how many rows it has."""
    src = exp_dir / "04_submit" / "submission.csv"
    if not src.is_file():
        raise NotebookError(f"{src} is missing; run the 04_infer_submit.py cell first.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    rows = max(len(src.read_text().splitlines()) - 1, 0)
    print(f"copied {src} -> {dest} ({rows} rows)")
    return dest
