"""The grammar of model names (`submit.models`, `pseudo.members`), free of the config and of the stage graph.

A name is `phase1` (01's folds), `phase2` (03's last round) or `round<r>` (03's round r) of this
experiment, or `<exp>/<one of those>` of another experiment under the same output_root. Kept a
leaf, as lib.views is for TTA view names, so the config's checks and the stage graph both read
names through it without importing each other; what a name points at on disk (its folds, its
config, its record) is asked of the stage graph (lib.pipeline.graph.member_folds and friends).
"""
from __future__ import annotations

from dataclasses import dataclass

PHASE_STAGES = {"phase1": "01_train", "phase2": "03_retrain"}
FORMS = "phase1, phase2, round<r>, or <exp>/<one of those>"


@dataclass(frozen=True)
class ModelRef:
    """One parsed model name; `parse` is the one reader of these names."""

    name: str  # as written
    phase: str  # phase1, phase2 or round
    round: int | None = None  # r of round<r>
    exp: str | None = None  # another experiment under output_root; None: this one

    @classmethod
    def parse(cls, name: str) -> "ModelRef":
        """The parts of `name`; a ValueError naming the accepted forms otherwise."""
        exp, sep, local = name.rpartition("/")
        if sep and (not exp or "/" in exp or exp in (".", "..") or exp.startswith(".")):
            raise ValueError(f"'{name}' is not a model name ({FORMS})")
        if local in PHASE_STAGES:
            return cls(name, local, None, exp or None)
        if local.startswith("round") and local[5:].isdigit():
            return cls(name, "round", int(local[5:]), exp or None)
        raise ValueError(f"'{name}' is not a model name ({FORMS})")

    @property
    def stage(self) -> str:
        """The training stage behind it: phase1 -> 01, phase2 and round<r> -> 03."""
        return PHASE_STAGES.get(self.phase, "03_retrain")

    @property
    def key(self) -> str:
        """Its training stage as an upstream key of the stage graph: `01_train`, or `<exp>/01_train` for another experiment."""
        return f"{self.exp}/{self.stage}" if self.exp else self.stage

    @property
    def file_stem(self) -> str:
        """A file name for it (04's probs/<stem>.npz): `b/phase2` -> `b__phase2`."""
        return self.name.replace("/", "__")
