"""Concept lineages over the 7 ranks and the competition's taxonomic distance.

The distance is the FathomNet 2025 metric exactly (see `distance`): a path length in the rank
tree where every concept sits at its deepest rank and each exception concept hangs one edge
below its listed node. Everything that needs "how wrong is this prediction" (the metric, the
losses, min-risk decoding, kNN voting) reads the matrix built here.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lib.core.errors import UserError

RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
MAX_DISTANCE = 12

Lineage = tuple[Optional[str], ...]


class TaxonomyError(UserError, ValueError):
    """A taxonomy table or category list that the pipeline cannot use."""


def distance(solution: Lineage, prediction: Lineage, solution_exc: bool, prediction_exc: bool, same_concept: bool) -> int:
    """The competition's per-annotation distance (0..12).

    Equality is by concept, not lineage: Actinopterygii and Tunicata are two exception concepts
    listed with the same lineage (Animalia, Chordata) and are 2 apart.
    """
    if same_concept:
        return 0
    d = int(prediction_exc) + int(solution_exc)
    for s, p in zip(solution, prediction):
        if p is None:
            d += 1 if s is not None else 0
        elif p != s:
            d += 2 if s is not None else 1
    return d


@dataclass(frozen=True)
class Taxonomy:
    """The label space: concept names in label order, their lineages and exception flags."""

    names: tuple[str, ...]
    lineages: tuple[Lineage, ...]
    exceptions: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.lineages):
            raise TaxonomyError("Taxonomy has a different number of names and lineages.")
        if len(set(self.names)) != len(self.names):
            raise TaxonomyError("Taxonomy lists a concept name twice; names must be unique.")

    @property
    def n_classes(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self._index()[name]

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_idx")
        if cached is None:
            cached = {n: i for i, n in enumerate(self.names)}
            object.__setattr__(self, "_idx", cached)
        return cached

    def __contains__(self, name: object) -> bool:
        return name in self._index()

    def distance_matrix(self) -> np.ndarray:
        """D[i, j] = distance(solution=i, prediction=j); symmetric for this metric."""
        cached = self.__dict__.get("_dist")
        if cached is None:
            n = self.n_classes
            cached = np.zeros((n, n), dtype=np.float32)
            exc = [name in self.exceptions for name in self.names]
            for i in range(n):
                for j in range(n):
                    cached[i, j] = distance(self.lineages[i], self.lineages[j], exc[i], exc[j], i == j)
            cached.setflags(write=False)
            object.__setattr__(self, "_dist", cached)
        return cached

    def lca_distance_matrix(self) -> np.ndarray:
        """L[i, j] = 2 x (ranks below the lowest common ancestor of i and j), 0 on the diagonal.

        The distance of linnaeus' taxonomy smoothing: every concept a leaf at the same depth below
        the 7 ranks, two concepts meeting at the deepest rank where both lineages have the same
        value (up to 12 apart, like the metric). Unlike the metric it ignores where a concept stops:
        a genus-level concept and a species of that genus are 2 apart (the metric: 1), two
        concepts listed with one lineage (Actinopterygii, Tunicata) 10 (the metric: 2).
        """
        n = self.n_classes
        out = np.zeros((n, n), dtype=np.float32)
        for i in range(n):
            for j in range(n):
                if i != j:
                    shared = 0
                    for a, b in zip(self.lineages[i], self.lineages[j]):
                        if a is None or a != b:
                            break
                        shared += 1
                    out[i, j] = 2 * (len(RANKS) - shared)
        out.setflags(write=False)
        return out

    def rank_labels(self, rank: str) -> tuple[np.ndarray, list[str]]:
        """Per-concept index of its value at `rank` (-1 where absent), and the rank's values."""
        r = RANKS.index(rank)
        values: list[str] = sorted({v for lin in self.lineages if (v := lin[r]) is not None})
        pos: dict[str | None, int] = {v: i for i, v in enumerate(values)}
        return np.array([pos.get(lin[r], -1) for lin in self.lineages]), values

    def subset(self, names: Sequence[str], table: str | Path = "the taxonomy table") -> "Taxonomy":
        """The taxonomy restricted to `names`, in that order (the dataset's label order).

        `table` (where this taxonomy was read) is named in the error, with the key that picks another
        table: a dataset of other species needs its own table, not edits to the shipped FathomNet one.
        """
        missing = [n for n in names if n not in self]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise TaxonomyError(
                f"{plural(len(missing), 'category', 'categories')} of the train JSON ({shown}) {'is' if len(missing) == 1 else 'are'} "
                f"missing from {table}; set data.taxonomy_csv to a table of your dataset's concepts "
                f"(concept_name and the 7 rank columns), or data.taxonomy_source=worms to look them up online."
            )
        return Taxonomy(
            names=tuple(names),
            lineages=tuple(self.lineages[self.index(n)] for n in names),
            exceptions=frozenset(n for n in names if n in self.exceptions),
        )

    def to_json(self) -> dict:
        return {
            "ranks": list(RANKS),
            "concepts": [
                {"label": i, "name": n, "lineage": list(lin), "exception": n in self.exceptions}
                for i, (n, lin) in enumerate(zip(self.names, self.lineages))
            ],
        }

    @staticmethod
    def from_json(obj: dict) -> "Taxonomy":
        concepts = sorted(obj["concepts"], key=lambda c: c["label"])
        return Taxonomy(
            names=tuple(c["name"] for c in concepts),
            lineages=tuple(tuple(c["lineage"]) for c in concepts),
            exceptions=frozenset(c["name"] for c in concepts if c["exception"]),
        )


def plural(n: int, one: str, many: str) -> str:
    """`1 category`, `2 categories`: counts in messages read as English."""
    return f"{n} {one if n == 1 else many}"


def load_taxonomy_csv(path: str | Path) -> Taxonomy:
    """Read a taxonomy table: `concept_name`, the 7 rank columns (empty = none), `exception`."""
    p = Path(path)
    if not p.is_file():
        raise TaxonomyError(f"Taxonomy table '{p}' does not exist; set data.taxonomy_csv to a CSV with rank columns.")
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"concept_name", *RANKS}
    if not rows or not need.issubset(rows[0].keys()):
        raise TaxonomyError(
            f"Taxonomy table '{p}' must have the columns concept_name, {', '.join(RANKS)} (and optionally exception)."
        )
    if "category_id" in rows[0]:
        rows.sort(key=lambda r: int(r["category_id"]))
    names = tuple(r["concept_name"].strip() for r in rows)
    lineages = tuple(tuple((r[k].strip() or None) for k in RANKS) for r in rows)
    exceptions = frozenset(r["concept_name"].strip() for r in rows if str(r.get("exception", "0")).strip() in ("1", "True", "true"))
    return Taxonomy(names=names, lineages=lineages, exceptions=exceptions)


def load_taxonomy_json(path: str | Path) -> Taxonomy:
    return Taxonomy.from_json(json.loads(Path(path).read_text()))
