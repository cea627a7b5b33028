"""The steps of notebooks/kaggle_fathomnet2025.ipynb: install, resume, doctor (stops on a fatal problem), stages, the submission copy.

Standard library only: the notebook imports this from the attached repository before anything is
installed. Every command runs with the repository as its working directory (the config's relative
paths, such as the taxonomy table, are the project's) whatever the notebook's own directory is, and
with the notebook's Python, so what `install` put there is what the stages import.
"""
from __future__ import annotations

import codecs
import importlib.metadata
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
WHEELS_HINT = ("on a machine with internet and Kaggle's Python version, `pip download -r requirements-kaggle.txt -d wheels` "
               "(torch, torchvision, numpy and OpenCV wheels may be deleted: the image's are kept), then upload the folder as a dataset")


# The image's own packages: requirements-kaggle.txt never names them, and the install pins them to the installed versions.
IMAGE_KEEPS = ("torch", "torchvision", "torchaudio", "numpy", "opencv-python", "opencv-python-headless", "opencv-contrib-python")
KAGGLE_REQUIREMENTS = "requirements-kaggle.txt"


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
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if requirement_name(line) not in DEV_TOOLS | {""}]


def pip_command(requirements: Path, wheels_dir: str | None, constraints: Path | None = None) -> list[str]:
    """pip install -r with the notebook's Python; with `constraints` (-c) pip may not change the packages it pins; offline
    (`wheels_dir`) --no-index --find-links, so pip never reaches for the network and what is already installed is kept."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)]
    cmd += ["-c", str(constraints)] if constraints is not None else []
    return cmd + (["--no-index", "--find-links", wheels_dir] if wheels_dir else [])


def requirement_name(line: str) -> str:
    """The normalised project name of a requirement line (`Foo_Bar[x]>=1` -> foo-bar); "" for a comment or blank."""
    req = line.split("#", 1)[0].strip()
    return re.split(r"[\s<>=!~\[;@]", req, maxsplit=1)[0].lower().replace("_", "-") if req else ""


def installed_versions(names: Sequence[str]) -> dict[str, str]:
    """The installed version of each of `names` that is installed (importlib.metadata: no import of the package)."""
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def image_constraints(installed: dict[str, str]) -> list[str]:
    """`name==version` for each of the image's own packages that is installed: pip's constraints keep them as they are."""
    return [f"{n}=={installed[n]}" for n in IMAGE_KEEPS if n in installed]


def _release(version: str) -> tuple[int, ...]:
    """1.26.4 -> (1, 26, 4); a local or pre-release tail (2.3.0+cu121, 2.0rc1) is cut at the first non-digit."""
    parts = []
    for p in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", p)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != p:
            break
    return tuple(parts)


def satisfies(version: str, spec: str) -> bool:
    """Whether `version` meets a comma-separated specifier such as `>=1.0,<2` (release numbers only; standard library)."""
    v = _release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, want = re.match(r"(==|!=|>=|<=|~=|>|<)?\s*(.*)", clause).groups()  # type: ignore[union-attr]
        w = _release(want)
        n = max(len(v), len(w))
        a, b = v + (0,) * (n - len(v)), w + (0,) * (n - len(w))
        head = max(1, len(w) - 1)
        ok = {"==": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b, None: a == b,
              "~=": a >= b and v[:head] == w[:head]}[op]
        if not ok:
            return False
    return True


def image_problems(requirements_txt: str, installed: dict[str, str]) -> list[str]:
    """One sentence for each of the image's own packages (torch, numpy, ...) that requirements.txt needs newer than the
    image has: the Kaggle route never upgrades them, so such an image cannot run the stages."""
    out = []
    for line in runtime_requirements(requirements_txt):
        name = requirement_name(line)
        spec = line.split("#", 1)[0].strip()[len(name):].strip()
        if name in IMAGE_KEEPS and name in installed and spec and not satisfies(installed[name], spec):
            out.append(f"The image's {name} {installed[name]} does not meet requirements.txt's {spec}; pick a newer Kaggle "
                       "environment (Settings > Environment > Always use latest) rather than upgrading it in the notebook.")
    return out


def install(repo: Path, offline: bool, wheels_dir: str, keep_image: bool = True) -> None:
    """Install what the stages need: from PyPI, or offline from an attached wheels dataset.

    `keep_image` (Kaggle's route): requirements-kaggle.txt, with a constraints file pinning the image's own torch,
    torchvision, numpy and OpenCV to their installed versions (read here, at runtime), so pip resolves the rest's
    dependencies as usual but can never replace those (`--no-deps` would skip the dependencies the image lacks, such as
    albumentations' albucore). Otherwise requirements.txt without the test tools.
    """
    if offline and not Path(wheels_dir).is_dir():
        raise NotebookError(f"OFFLINE is set but WHEELS_DIR '{wheels_dir}' is not a folder; attach a wheels dataset "
                            f"({WHEELS_HINT}) or set OFFLINE = False with the notebook's internet on.")
    source = KAGGLE_REQUIREMENTS if keep_image else "requirements.txt"
    reqs = runtime_requirements((repo / source).read_text())
    installed = installed_versions(IMAGE_KEEPS) if keep_image else {}
    problems = image_problems((repo / "requirements.txt").read_text(), installed)
    if problems:
        raise NotebookError(problems[0])
    pins = image_constraints(installed)
    with tempfile.TemporaryDirectory() as tmp:
        listed, constraints = Path(tmp) / "requirements-run.txt", Path(tmp) / "image-constraints.txt"
        listed.write_text("\n".join(reqs) + "\n")
        constraints.write_text("\n".join(pins) + "\n")
        rc = relay(pip_command(listed, wheels_dir if offline else None, constraints if keep_image else None), cwd=repo)
    if rc != 0:
        fix = f"add the wheels pip names above to WHEELS_DIR ({WHEELS_HINT})" if offline else "turn the notebook's internet on"
        kept = f" (it may not change the image's {', '.join(pins)}: a conflict with them is named above)" if pins else ""
        raise NotebookError(f"pip could not install {source} (exit {rc}, its message is above){kept}; {fix}, then run this cell again.")
    kept = f"; the image's {', '.join(pins)} kept" if pins else ""
    print(f"installed {len(reqs)} requirement(s) of {source}" + (f" from {wheels_dir}" if offline else "") + kept)


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
