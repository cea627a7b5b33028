"""Lineages from WoRMS through the `fathomnet` package (optional, online), cached to a taxonomy CSV.

For a dataset of this shape without a taxonomy table: `data.taxonomy_source: worms` looks each
category up once (`fathomnet.api.worms.get_ancestors`) and writes `data.taxonomy_csv` in the same
layout as `configs/taxonomy/fathomnet2025.csv`; later runs read the CSV and need no network.
A concept whose own rank is not one of the 7 (a subfamily, an infraorder) is marked an exception,
as the competition's metric does.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Sequence

from lib.core.errors import StageError
from lib.core.io import atomic_write_text
from lib.data.taxonomy import RANKS, plural


def _lineage_from_node(root: Any, name: str) -> tuple[dict[str, str], bool]:
    """Walk a WoRMS ancestor chain (root first) into rank -> name; exception if `name`'s rank is off the 7."""
    ranks: dict[str, str] = {}
    own_rank = None
    node = root
    while node is not None:
        rank = str(getattr(node, "rank", "") or "").lower()
        if rank in RANKS:
            ranks[rank] = node.name
        if node.name == name:
            own_rank = rank
        children = getattr(node, "children", None) or []
        node = children[0] if children else None
    return ranks, own_rank not in RANKS


def _default_lookup() -> Callable[[str], Any]:
    try:
        from fathomnet.api import worms
    except ImportError:
        raise StageError("data.taxonomy_source is worms but the fathomnet package is missing; pip install fathomnet, "
                         "or give a taxonomy CSV in data.taxonomy_csv.") from None
    return worms.get_ancestors


def worms_table(names: Sequence[str], cache_csv: Path, lookup: Callable[[str], Any] | None = None) -> Path:
    """Ensure `cache_csv` lists every name (looking up only the missing ones); returns its path."""
    rows: dict[str, dict[str, str]] = {}
    if cache_csv.is_file():
        with cache_csv.open(newline="") as f:
            rows = {r["concept_name"]: r for r in csv.DictReader(f)}
    todo = [n for n in names if n not in rows]
    failed: list[str] = []
    if todo:
        lookup = lookup or _default_lookup()
        for name in todo:
            try:
                ranks, exception = _lineage_from_node(lookup(name), name)
            except Exception as e:  # network, HTTP or "not found": collected into one message
                failed.append(f"{name} ({type(e).__name__})")
                continue
            rows[name] = {"concept_name": name, **{r: ranks.get(r, "") for r in RANKS}, "exception": str(int(exception))}
    ordered = [rows[n] for n in names if n in rows] + [r for n, r in rows.items() if n not in set(names)]
    lines = [",".join(["category_id", "concept_name", *RANKS, "exception"])]
    for i, r in enumerate(ordered, 1):
        cells = [str(i), r["concept_name"], *[r.get(k, "") for k in RANKS], r.get("exception", "0")]
        lines.append(",".join(f'"{c}"' if "," in c else c for c in cells))
    if len(todo) > len(failed) or not cache_csv.is_file():
        atomic_write_text(cache_csv, "\n".join(lines) + "\n")  # keep what was found, even when some failed
    if failed:
        raise StageError(f"WoRMS lookup failed for {len(failed)} of {plural(len(todo), 'category', 'categories')} ({', '.join(failed[:5])}); "
                         f"go online, or add their lineage to {cache_csv} by hand.")
    return cache_csv
