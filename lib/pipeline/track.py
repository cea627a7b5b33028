"""Experiment tracking (`track.backend: none | wandb | mlflow | tensorboard`) through each tool's own client.

Kaggle users expect their runs in wandb, MLflow or TensorBoard; the pipeline's own truth stays
in its records. So tracking is a listener, never a participant: the `track` section is in no
stage's fingerprint (lib.pipeline.graph), so it decides no rerun, and every call into a tracker
is guarded, so a missing package, a tracker that cannot start or one that fails midway is one
warning, after which tracking is off for the process and the stage goes on.

One tracker run per stage process (named `<exp>/<stage>`, grouped by exp), started lazily when
the first record is written, so a stage that is `up to date` opens none. When a record is written
(Stage.finish) it logs the config (once), the record's numbers (a fold's best epoch, a stage's
CV), a fold's per-epoch history.csv and 04's options.csv; lib.kaggle.submit logs the uploaded
submission's message. Only rank 0 tracks under torchrun. The clients are optional installs:
`pip install wandb` (offline by default: WANDB_MODE=offline unless set, since Kaggle notebooks
often are; `wandb sync` uploads later), `pip install mlflow` (a file store under track.dir;
`mlflow ui --backend-store-uri <dir>/mlruns`), `pip install tensorboard` (event files;
`tensorboard --logdir <dir>/tensorboard`).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Protocol

from lib.config import Config, flatten, project_path, to_dict

log = logging.getLogger("pipeline")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}


class Backend(Protocol):
    def config(self, values: dict[str, Any]) -> None: ...
    def metrics(self, values: dict[str, float], step: int | None) -> None: ...
    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None: ...
    def text(self, name: str, value: str) -> None: ...
    def close(self) -> None: ...


class Wandb:
    """A wandb run, offline unless WANDB_MODE says otherwise."""

    def __init__(self, project: str, group: str, name: str, folder: Path):
        os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, group=group, name=name, dir=str(folder), job_type=name.rpartition("/")[2])

    def config(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int | None) -> None:
        self.run.log(values)  # wandb's own step only grows; folds restart their epochs, so the epoch is a logged value

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)})

    def text(self, name: str, value: str) -> None:
        self.run.summary[name] = value

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    """An MLflow run in a local file store under track.dir (or wherever MLFLOW_TRACKING_URI points)."""

    def __init__(self, project: str, group: str, name: str, folder: Path):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((folder / "mlruns").as_uri())
        mlflow.set_experiment(project)
        mlflow.start_run(run_name=name, tags={"group": group})

    def config(self, values: dict[str, Any]) -> None:
        self.mlflow.log_params({k: str(v)[:500] for k, v in values.items()})

    def metrics(self, values: dict[str, float], step: int | None) -> None:
        self.mlflow.log_metrics(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.mlflow.log_text(_csv_text(columns, rows), f"{name}.csv")

    def text(self, name: str, value: str) -> None:
        self.mlflow.log_text(value, f"{name}.txt")
        self.mlflow.set_tag(name.replace("/", "."), value[:5000])

    def close(self) -> None:
        self.mlflow.end_run()


class Tensorboard:
    """TensorBoard event files under track.dir/tensorboard/<stage> (torch.utils.tensorboard needs the tensorboard package)."""

    def __init__(self, project: str, group: str, name: str, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard" / name))

    def config(self, values: dict[str, Any]) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in values.items()))

    def metrics(self, values: dict[str, float], step: int | None) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        self.writer.add_text(name, "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]))

    def text(self, name: str, value: str) -> None:
        self.writer.add_text(name, value)

    def close(self) -> None:
        self.writer.close()


BACKENDS: dict[str, Callable[[str, str, str, Path], Backend]] = {"wandb": Wandb, "mlflow": Mlflow, "tensorboard": Tensorboard}


def _csv_text(columns: list[str], rows: list[list[Any]]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if rows else ([], [])


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None  # NaN (an epoch without a value) is left out


def numbers(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """Every number of a record's result, flattened to `prefix/key.sub` (lists and strings left out)."""
    out = {}
    for k, v in flatten(result, "").items():
        x = _number(v) if not isinstance(v, (str, list)) else None
        if x is not None:
            out[f"{prefix}/{k}"] = x
    return out


class Tracker:
    """The process's tracker: started on first use, off for good after its first failure (one warning)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.backend: Backend | None = None
        self.off = cfg.track.backend == "none" or os.environ.get("RANK", "0") != "0"

    def _start(self, stage: str) -> Backend | None:
        if self.off or self.backend is not None:
            return self.backend
        t, name = self.cfg.track, self.cfg.track.backend
        folder = project_path(t.dir) if t.dir else self.cfg.out_dir / "track"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            backend = BACKENDS[name](t.project or self.cfg.exp, self.cfg.exp, f"{self.cfg.exp}/{stage}", folder)
            backend.config(flatten(to_dict(self.cfg), ""))
            self.backend = backend
        except ImportError:
            self._fail(f"track.backend is {name} but its package is not installed; pip install {PACKAGES[name]} "
                       "(or set track.backend=none): tracking is off, the stage goes on.")
        except Exception as e:  # any tracker fault: tracking never fails a stage
            self._fail(f"track.backend {name} could not start ({type(e).__name__}: {e}); tracking is off, the stage goes on.")
        return self.backend

    def _fail(self, message: str) -> None:
        log.warning(message)
        self.off, self.backend = True, None

    def _do(self, stage: str, what: Callable[[Backend], None]) -> None:
        backend = self._start(stage)
        if backend is None:
            return
        try:
            what(backend)
        except Exception as e:  # the same: one warning, tracking off
            self._fail(f"track.backend {self.cfg.track.backend} failed while logging ({type(e).__name__}: {e}); tracking is off, "
                       "the stage goes on.")

    def stage_finished(self, name: str, folder: Path, result: dict[str, Any]) -> None:
        """A record was written: its numbers, a fold's per-epoch history, 04's options table."""
        if self.off:
            return
        top = name.split("/", 1)[0]

        def send(b: Backend) -> None:
            history = folder / "history.csv"
            if history.is_file():
                columns, rows = _read_csv(history)
                for row in rows:
                    values = {f"{name}/{c}": x for c, v in zip(columns, row) if (x := _number(v)) is not None}
                    b.metrics(values, int(float(row[columns.index("epoch")])) if "epoch" in columns else None)
            b.metrics(numbers(result, name), None)
            options = folder / "options.csv"
            if top == "04_submit" and options.is_file():
                b.table(f"{name}/options", *_read_csv(options))
        self._do(top, send)

    def submission(self, message: str, competition: str) -> None:
        self._do("submit", lambda b: b.text("submission", json.dumps({"competition": competition, "message": message})))

    def close(self) -> None:
        if self.backend is not None:
            self._do("", lambda b: b.close())
            self.backend = None


_active: Tracker | None = None


def configure(cfg: Config) -> Tracker:
    """The process's tracker for `cfg` (run_cli calls this once the config is loaded)."""
    global _active
    close()
    _active = Tracker(cfg)
    return _active


def stage_finished(name: str, folder: Path, result: dict[str, Any]) -> None:
    """Called by Stage.finish after the record is written; nothing without a configured tracker."""
    if _active is not None:
        _active.stage_finished(name, folder, result)


def submission(message: str, competition: str) -> None:
    if _active is not None:
        _active.submission(message, competition)


def close() -> None:
    """End the process's tracker run (run_cli's last step)."""
    global _active
    if _active is not None:
        _active.close()
    _active = None
