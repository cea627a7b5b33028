"""Ensemble members: this experiment's phases and other experiments' models trained on the same folds.

A member is a fold ensemble (one model per fold) with the config it was trained with: its own
backbone, image size, context views and TTA predict its own crops of the test ROIs. Blending
(04) and pseudo-labelling (02) compare members row by row out of fold, so a member from another
experiment must hold the same train rows in the same folds and predict the same concepts; anything
else is refused before any work, in one sentence naming the member.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from lib.config import Config
from lib.core.errors import StageError
from lib.data.artifacts import Prepared
from lib.modelref import ModelRef
from lib.pipeline.graph import member_config, member_folds, stage_dir


@dataclass(frozen=True, eq=False)
class Member:
    """One fold ensemble: its name (`phase2`, `b/phase1`), its training config, fold folders and test ROIs."""

    name: str
    cfg: Config
    folds: list[Path]
    test: pd.DataFrame  # its usable test ROIs (its own crops), in the order of this experiment's
    train: pd.DataFrame | None = None  # its usable train ROIs (its own crops): what its out-of-fold rows are predicted from again


def check_same_folds(name: str, ours: Prepared, theirs: Prepared) -> None:
    """Refuse a member whose train rows, fold assignment, concepts or test ROIs differ from this experiment's."""
    fix = "train it with this experiment's data, prepare.n_folds and seed, or leave it out"
    if list(theirs.taxonomy.names) != list(ours.taxonomy.names):
        raise StageError(f"Member {name} predicts other concepts ({theirs.taxonomy.n_classes} against this experiment's "
                         f"{ours.taxonomy.n_classes}, another taxonomy); only models of the same taxonomy blend, so leave it out.")
    if theirs.n_folds != ours.n_folds:
        raise StageError(f"Member {name} was trained on {theirs.n_folds} folds and this experiment on {ours.n_folds} folds; "
                         f"its out-of-fold rows cannot be compared, so {fix}.")
    a = ours.train.set_index("annotation_id")["fold"]
    b = theirs.train.set_index("annotation_id")["fold"]
    only_here, only_there = a.index.difference(b.index), b.index.difference(a.index)
    if len(only_here) or len(only_there):
        raise StageError(f"Member {name} was trained on other train rows ({len(only_here)} rows only here, {len(only_there)} "
                         f"only there); {fix}.")
    moved = int((a != b.loc[a.index]).sum())
    if moved:
        raise StageError(f"Member {name} puts {moved} train rows in other folds than this experiment; {fix}.")
    ids_here, ids_there = set(ours.test["annotation_id"]), set(theirs.test["annotation_id"])
    if ids_here != ids_there:
        raise StageError(f"Member {name} has other usable test ROIs ({len(ids_here - ids_there)} only here, "
                         f"{len(ids_there - ids_here)} only there); rerun its 00_prepare_data.py on the same test data.")


def usable(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with a crop (`ok` == 1)."""
    return rows[rows["ok"] == 1] if "ok" in rows.columns else rows


def load_member(cfg: Config, name: str, prep: Prepared) -> Member:
    """A member by name, checked against this experiment's prepared data (`prep`)."""
    ref = ModelRef.parse(name)
    if ref.exp is None:
        return Member(name, cfg, member_folds(cfg, ref), prep.test, usable(prep.train))
    mcfg = member_config(cfg, ref)
    theirs = Prepared.load(stage_dir(cfg, f"{ref.exp}/00_prepare"))
    check_same_folds(name, prep, theirs)
    order = theirs.test.set_index("annotation_id").loc[prep.test["annotation_id"].to_numpy()].reset_index()
    folds = member_folds(cfg, ref)
    missing = [d for d in folds if not d.is_dir()]
    if missing:
        raise StageError(f"Member {name} lacks {missing[0]}; train that round in experiment {ref.exp} first.")
    return Member(name, mcfg, folds, order, usable(theirs.train))


def load_members(cfg: Config, names: Sequence[str], prep: Prepared) -> list[Member]:
    """Every named member, in order (each name once: the config checks it)."""
    return [load_member(cfg, n, prep) for n in names]
