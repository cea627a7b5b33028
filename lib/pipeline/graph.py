"""The stage graph: each stage's folder, script, config sections and upstream stages, in one place.

Scripts ask this module for their `Stage` so that a stage can also judge its upstream: a stage
whose upstream is out of date under the current config refuses to run on stale inputs (and
`--dry-run` reports it as "would run" too), so `--dry-run` on the whole chain tells the truth.

`begin` is also where a run claims its stage: it checks the inputs the config names (before any
work), takes the stage's lock (a second run of the same stage refuses at once) and sweeps temp
files a killed run left behind.
"""
from __future__ import annotations

import difflib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lib.config import Config, ConfigError
from lib.core.errors import StageError
from lib.core.io import dir_digest, file_digest, remove_temp_files
from lib.core.locks import acquire_lock, acquire_read_lock, release_lock
from lib.core.paths import ROOT
from lib.modelref import ModelRef
from lib.pipeline.cli import check, save_resolved_config, setup_logging
from lib.pipeline.records import RECORD, Stage, read_record, upstream_digest

log = logging.getLogger("pipeline")


def fold_records(rec: dict, folder: Path) -> list[Path]:
    """The fold records a training stage's record relies on (its last round's folds)."""
    res = rec.get("result", {})
    if "folds" not in res:
        return []
    root = Path(os.path.normpath(folder / str(res.get("fold_root", "."))))
    return [root / f"fold_{k}" / RECORD for k in range(int(res["folds"]))]


@dataclass(frozen=True)
class Spec:
    name: str
    script: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    outputs: tuple[str, ...] = ()  # files the record vouches for: a lost or altered one reruns the stage
    folds: bool = False  # a training stage: its record also relies on its fold records


# Where the data lives never decides a rerun, what it holds does: 00's inputs digest the JSON files and
# the taxonomy table by content and the frame folders by names, sizes and content hashes (the extra data's too, lib.data.extra).
# data.extra_weight is read by the training stages only.
DATA_PATH_KEYS = ("!data.root", "!data.train_json", "!data.test_json", "!data.train_images", "!data.test_images", "!data.taxonomy_csv",
                  "!data.extra_dir", "!data.extra_weight")
# How a run spreads over the GPUs changes no result (each fold trains alone either way, torchrun's global batch aside):
# a fold trained fold-parallel is the fold a plain run would train.
RUN_ONLY_KEYS = ("!train.multi_gpu",)
# How much of the host the loaders may hold (lib.data.budget) decides how a run loads, not what it computes.
HOST_KEYS = ("!train.host_memory_share", "!train.shm_share")

SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("00_prepare", "00_prepare_data.py", ("seed", "data", *DATA_PATH_KEYS, "prepare"), (),
             ("rois.csv", "extra_rois.csv", "taxonomy.json", "crops_manifest.json")),
        Spec("01_train", "01_train_folds.py", ("seed", "model", "head", "train", "data.extra_weight", *RUN_ONLY_KEYS, *HOST_KEYS, "augment", "loss"),
             ("00_prepare",),
             folds=True),
        Spec("02_pseudo", "02_pseudo_label.py", ("seed", "model", "head", "pseudo", "!pseudo.rounds", "!pseudo.weight_power", "tta",
                                                 "train.precision"),
             ("00_prepare", "01_train"),
             ("test_probs.npz", "pseudo_labels.csv")),
        Spec("03_retrain", "03_retrain.py", ("seed", "model", "head", "train", "data.extra_weight", *RUN_ONLY_KEYS, *HOST_KEYS, "augment",
                                             "loss", "retrain", "pseudo", "tta"),
             ("00_prepare", "02_pseudo"),
             folds=True),
        Spec("04_submit", "04_infer_submit.py", ("seed", "model", "head", "submit", "tta", "train.precision"), ("00_prepare",),
             ("submission.csv",)),
        Spec("knn", "knn_baseline.py", ("seed", "knn", "train.precision"), ("00_prepare",), ("submission.csv", "oof.npz")),
    )
}
def stage_dir(cfg: Config, key: str) -> Path:
    """The folder of an upstream key: `<output_root>/<exp>/<stage>`, for `<exp>/<stage>` another experiment's."""
    exp, sep, name = key.rpartition("/")
    return (cfg.out_root / exp if sep else cfg.out_dir) / name


def base_name(key: str) -> str:
    """The stage name of an upstream key (`b/03_retrain` -> `03_retrain`)."""
    return key.rpartition("/")[2]


def rerun_hint(cfg: Config, key: str) -> str:
    """The command that brings an upstream key up to date: its script, for another experiment with that experiment's config."""
    exp, sep, name = key.rpartition("/")
    if not sep:
        return SPECS[name].script
    return f"{SPECS[name].script} --config {stage_dir(cfg, key) / 'config.yaml'} (member experiment '{exp}')"


@functools.lru_cache(maxsize=64)
def _load_member_config(path: str, stamp: tuple[int, int], output_root: str, exp: str) -> Config:
    from lib.config import load_config

    mcfg = load_config(path)
    mcfg.output_root, mcfg.exp = output_root, exp  # read where it lies, whatever root it was written with
    return mcfg


def resolve(cfg: Config, key: str) -> tuple[Config, str]:
    """(config, stage name) of an upstream key; another experiment's stage is judged by the config it last ran with
    (its saved `config.yaml`), so `b/03_retrain` is out of date exactly when b's own 03 would rerun."""
    exp, sep, name = key.rpartition("/")
    if not sep:
        return cfg, key
    path = stage_dir(cfg, key) / "config.yaml"
    if not path.is_file() or not (path.parent / RECORD).is_file():
        raise StageError(f"Member experiment '{exp}' has no finished {name} ({path.parent} lacks {RECORD}); train it first "
                         f"(python {SPECS[name].script} --config <its config> exp={exp}) or leave it out of the members.")
    st = path.stat()
    try:
        return _load_member_config(str(path), (st.st_size, st.st_mtime_ns), cfg.output_root, exp), name
    except ConfigError as e:
        raise StageError(f"Member experiment '{exp}''s {path} cannot be read ({e}); rerun its stages with this code.") from None


def member_keys(cfg: Config, names: Sequence[str]) -> tuple[str, ...]:
    """The upstream keys of model names (their training stages), in order, each once."""
    return tuple(dict.fromkeys(ModelRef.parse(m).key for m in names))


def _foreign_prepares(names: Sequence[str]) -> tuple[str, ...]:
    """`<exp>/00_prepare` of every other experiment among model names: their test crops are read."""
    return tuple(dict.fromkeys(f"{r.exp}/00_prepare" for r in map(ModelRef.parse, names) if r.exp))


def upstream_of(cfg: Config, name: str) -> tuple[str, ...]:
    """Direct upstream keys: 02 depends on `pseudo.members`' training stages, 04 on `submit.models`', knn on 01 when it
    embeds with 01's models; another experiment's stage (`b/03_retrain`) on that experiment's own upstream."""
    exp, sep, base = name.rpartition("/")
    if sep:
        mcfg, _ = resolve(cfg, name)
        return tuple(f"{exp}/{u}" for u in upstream_of(mcfg, base))
    if name == "02_pseudo":
        return ("00_prepare",) + member_keys(cfg, cfg.pseudo.members)
    if name == "04_submit":
        return SPECS[name].upstream + member_keys(cfg, cfg.submit.models)
    if name == "knn" and cfg.knn.source == "phase1":
        return SPECS[name].upstream + ("01_train",)
    return SPECS[name].upstream


def reads_of(cfg: Config, name: str) -> tuple[str, ...]:
    """The upstream folders a run of `name` loads files from: its direct upstream, the 00_prepare of every other
    experiment it predicts with (their test crops), and 02 for 04's phase 1 (its test probabilities are reused from
    02's test_probs.npz when 02 is current)."""
    extra: tuple[str, ...] = ()
    if name == "04_submit":
        extra = (("02_pseudo",) if "phase1" in cfg.submit.models else ()) + _foreign_prepares(cfg.submit.models)
    elif name == "02_pseudo":
        extra = _foreign_prepares(cfg.pseudo.members)
    return tuple(dict.fromkeys(upstream_of(cfg, name) + extra))


def ancestors(cfg: Config, name: str) -> list[str]:
    """Every stage `name` depends on, directly or not (their records decide whether it may run)."""
    out: list[str] = []
    for u in upstream_of(cfg, name):
        out += [a for a in [*ancestors(cfg, u), u] if a not in out]
    return out


def hold_upstream(cfg: Config, name: str) -> None:
    """Read-lock every upstream stage folder before its records are read (under torchrun, rank 0 alone).

    A run of an upstream stage (whole or `--fold K`) refuses while this holds, and this refuses
    while one runs, naming it; so every record, checkpoint and npz this run reads comes from one
    version. Call `release_unread` once the decision is made.
    """
    if os.environ.get("RANK", "0") != "0":
        return
    for u in [*ancestors(cfg, name), *reads_of(cfg, name)]:
        acquire_read_lock(stage_dir(cfg, u), u, name)


def release_unread(cfg: Config, name: str) -> None:
    """Drop the read locks on stages whose records only decided (03 never loads 01's files), so they may rerun meanwhile."""
    for u in set(ancestors(cfg, name)) - set(reads_of(cfg, name)):
        release_lock(stage_dir(cfg, u), reader=True)


def _prepare_inputs(cfg: Config) -> dict[str, str]:
    p = cfg.data.paths()
    out = {}
    for key in ("train_json", "test_json", "taxonomy_csv"):
        out[key] = file_digest(p[key]) if p[key].is_file() else "missing"
    for key in ("train_images", "test_images"):
        out[key] = dir_digest(p[key])
    if cfg.data.extra:  # the extra data by content, like the competition's (lib.data.extra)
        out["extra_json"] = file_digest(p["extra_json"]) if p["extra_json"].is_file() else "missing"
        out["extra_images"] = dir_digest(p["extra_images"])
    return out


def stage(cfg: Config, name: str) -> Stage:
    """The Stage of `name` (an upstream key: another experiment's under its own config) under `cfg`; upstream records
    must exist (else: which script to run)."""
    if "/" in name:
        mcfg, base = resolve(cfg, name)
        return stage(mcfg, base)
    spec = SPECS[name]
    if name == "00_prepare":
        inputs = _prepare_inputs(cfg)
    else:
        inputs = {u: upstream_digest(stage_dir(cfg, u), rerun_hint(cfg, u), fold_records if SPECS[base_name(u)].folds else None)
                  for u in upstream_of(cfg, name)}
    return Stage.create(name, cfg.out_dir / name, cfg, spec.sections, ROOT / spec.script, inputs, spec.outputs,
                        fold_records if spec.folds else None)


def stale_upstream(cfg: Config, name: str) -> list[tuple[str, list[str]]]:
    """Upstream stages (transitively) that would run under `cfg`, with their reasons."""
    out, seen = [], set()

    def visit(n: str) -> None:
        for u in upstream_of(cfg, n):
            if u in seen:
                continue
            seen.add(u)
            visit(u)
            try:
                reasons = stage(cfg, u).reasons()
            except StageError as e:
                reasons = [str(e)]
            if reasons:
                out.append((u, reasons))

    visit(name)
    return out


def decide(cfg: Config, st: Stage, force: bool, dry_run: bool, folds_only: bool = False) -> bool:
    """True when `st` must run now. Prints the decision; refuses to run on stale upstream.

    `folds_only` (a `--fold K` run) checks the upstream only: the folds decide for themselves.
    """
    stale = stale_upstream(cfg, st.name)
    if stale:
        first, reasons = stale[0]
        if dry_run:
            log.info("%s: would run (upstream %s would run)", st.name, ", ".join(u for u, _ in stale))
            return False
        raise StageError(f"{first} is out of date ({'; '.join(reasons)}); run {rerun_hint(cfg, first)} first (or make stages).")
    return True if folds_only else check(st, force, dry_run)



MODEL_STAGES = {"01_train": "model", "02_pseudo": "model", "03_retrain": "model", "knn": "knn"}


def preflight(cfg: Config, name: str, frames: bool = True) -> None:
    """Checks that need the file system or timm, run before a stage does any work; each failure is one sentence.

    00: the input files the config names exist (the frame folders too, unless a download is
    about to fill them). Stages that build a model: the backbone is a timm model name (importing
    timm takes seconds, so this is not done at config time, where up-to-date decisions must stay fast).
    """
    if name == "00_prepare":
        p, d = cfg.data.paths(), cfg.data
        for key in ("train_json", "test_json") + (("train_images", "test_images") if frames else ()):
            ok = p[key].is_file() if key.endswith("json") else p[key].is_dir()
            if not ok:
                hint = "; rerun with --download or set data." + key if key.endswith("images") else f"; set data.root (now '{d.root}') or data.{key}"
                raise ConfigError(f"data.{key} '{p[key]}' does not exist{hint}.")
        if d.taxonomy_source == "csv" and not p["taxonomy_csv"].is_file():
            raise ConfigError(f"data.taxonomy_csv '{p['taxonomy_csv']}' does not exist; point it at a taxonomy table "
                              "or set data.taxonomy_source=worms.")
    section = MODEL_STAGES.get(name)
    if section == "knn" and cfg.knn.source == "phase1":
        section = "model"
    if section:
        import timm

        named = [(f"{section}.backbone", getattr(cfg, section).backbone)]
        if section == "model":
            named += [(f"model.view_backbones[{i}].backbone", vb.backbone) for i, vb in enumerate(cfg.model.view_backbones)]
        for key, backbone in named:
            if not timm.is_model(backbone):
                near = difflib.get_close_matches(backbone, timm.list_models(), n=1, cutoff=0.6)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise ConfigError(f"{key} '{backbone}' is not a timm model{hint}; pick a name from timm.list_models().")


def lock(cfg: Config, name: str, shared: bool = False) -> None:
    """Claim the stage's folder for this run (under torchrun, rank 0 claims it for all ranks).

    An exclusive claim also sweeps the temp files an interrupted run left there. Either claim
    refuses while a downstream stage reads the folder (`hold_upstream`).
    """
    if os.environ.get("RANK", "0") != "0":
        return
    folder = cfg.out_dir / name
    acquire_lock(folder, name, shared=shared, readers=True)
    if not shared:
        remove_temp_files(folder)


def begin(cfg: Config, name: str, force: bool, dry_run: bool, folds_only: bool = False) -> Stage | None:
    """The common prologue of a stage script: decide; if it runs, check its inputs, lock its folder,
    void its old record, log to its folder, save the config.

    The old record goes first so that a run killed halfway is never mistaken for a finished one.
    `--fold K` runs (`folds_only`) share the stage's lock with each other; each fold is locked alone.
    The upstream folders are read-locked first, so the records decided on are the ones loaded.
    """
    if not dry_run:
        hold_upstream(cfg, name)
    st = stage(cfg, name)
    if not decide(cfg, st, force, dry_run, folds_only):
        return None
    if not dry_run:
        release_unread(cfg, name)
    if dry_run:
        return st  # folds_only dry runs still list what each fold would do
    preflight(cfg, name)
    lock(cfg, name, shared=folds_only)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 alone voids the record and writes config.yaml
    if main:
        st.invalidate()
    setup_logging(st.dir)
    if main:
        save_resolved_config(cfg, st.dir)
    return st


def member_config(cfg: Config, ref: ModelRef) -> Config:
    """The config a model was trained with: `cfg` for this experiment's phases, the other experiment's saved one otherwise."""
    return resolve(cfg, ref.key)[0]


def member_folds(cfg: Config, ref: ModelRef) -> list[Path]:
    """A model's fold folders; round1 is 03's own folds, round<r> for r > 1 those in 03's round_<r>/."""
    if ref.round is None:
        return fold_dirs(cfg, ref.key)
    root = stage_dir(cfg, ref.key) / ("." if ref.round == 1 else f"round_{ref.round}")
    return [root / d.name for d in fold_dirs(cfg, ref.key)]


def member_result(cfg: Config, ref: ModelRef) -> dict:
    """A model's training record's result (CV figures); for round<r>, round r's entry of 03's `per_round`."""
    res = (read_record(stage_dir(cfg, ref.key) / RECORD) or {}).get("result", {})
    if ref.round is None:
        return res
    rounds = res.get("per_round", [])
    return rounds[ref.round - 1] if 0 < ref.round <= len(rounds) else {}


def fold_dirs(cfg: Config, name: str) -> list[Path]:
    """The fold folders a training stage's record vouches for (never stale leftovers of another n_folds).

    For 03 with several self-training rounds these are the last round's (`result.fold_root`).
    """
    folder = stage_dir(cfg, name)
    rec = read_record(folder / "record.json")
    if rec is None or "folds" not in rec.get("result", {}):
        raise StageError(f"{folder / 'record.json'} is missing or incomplete; run {rerun_hint(cfg, name)} first.")
    root = folder / rec["result"].get("fold_root", ".")
    return [root / f"fold_{k}" for k in range(int(rec["result"]["folds"]))]


def round_stage(stage: Stage, r: int) -> Stage:
    """Self-training round `r` of 03: round 1 in the stage folder, round r > 1 in `round_<r>/`.

    Its fingerprint is the stage's without `pseudo.rounds`, plus the round: raising the number
    of rounds keeps the rounds already trained.
    """
    config = {k: v for k, v in stage.fingerprint["config"].items() if k != "pseudo.rounds"}
    name, folder = (stage.name, stage.dir) if r == 1 else (f"{stage.name}/round_{r}", stage.dir / f"round_{r}")
    return Stage(name=name, dir=folder, fingerprint={**stage.fingerprint, "config": {**config, "round": r}})


def _owner(path: Path) -> tuple[str, str]:
    """The stage folder name and script that wrote `path` (from the stage name in its path)."""
    for part in reversed(path.parts):
        if part in SPECS:
            return part, SPECS[part].script
    return path.parent.name, "the stage that wrote it"


def check_vouched(path: Path) -> None:
    """Refuse to load `path` unless it is the file the record beside it vouches for (size and sha256).

    Called at load time on every checkpoint and npz a stage reads from an upstream stage: a file
    replaced since its record was written (another run, a copy, a truncation) is one sentence,
    never a silent mix of two versions. Cheap: the digest is cached by size and mtime.
    """
    rec = read_record(path.parent / RECORD)
    meta = (rec or {}).get("outputs", {}).get(path.name)
    name, script = _owner(path)
    if rec is None:
        why = f"no {RECORD} beside it: the run that wrote it did not finish, or one is rewriting it"
    elif not isinstance(meta, dict):
        why = f"its {RECORD} does not vouch for it"
    elif not path.is_file():
        why = "it is missing"
    elif path.stat().st_size != meta.get("size") or file_digest(path) != meta.get("sha256"):
        why = f"it is not the file its {RECORD} vouches for ({path.stat().st_size} bytes, recorded {meta.get('size')})"
    else:
        return
    raise StageError(f"{path} cannot be loaded ({why}); rerun {script} (it redoes only what {name} lacks).")
