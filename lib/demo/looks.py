"""Per-class appearance: a category's lineage fixes its body plan, colours, pattern and proportions.

Parameters come from a stable hash of the NAME at each rank, so relatives share them:

- phylum and class pick the body plan (fish, crab/shrimp, sea star, anemone, sponge, ...);
- class sets the colour family (base hue, saturation, brightness);
- order and family set the pattern (stripes, spots, rings) and proportions (aspect, arms);
- genus adds a band and a small hue/size change, species a small dot.
"""
from __future__ import annotations

import colorsys
import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from lib.data.taxonomy import RANKS as TAXONOMY_RANKS
from lib.data.taxonomy import Taxonomy

RANKS: tuple[str, ...] = ("phylum", "class", "order", "family", "genus", "species")
RGBA = tuple[int, int, int, int]


@dataclass(frozen=True)
class Taxon:
    """One category: id, name and its 6 ranks phylum..species ('' where it has none)."""

    category_id: int
    name: str
    lineage: tuple[str, ...]


@dataclass(frozen=True)
class Look:
    """Everything about a category's appearance that its lineage fixes."""

    plan: str
    hue: float
    sat: float
    val: float
    pattern: str = "none"
    pat_density: float = 0.5
    pat_shift: float = -0.3
    pat_hue: float = 0.0
    aspect: float = 1.0
    arm_factor: float = 1.0
    arm_len: float = 1.0
    arm_width: float = 1.0
    style: int = 0
    alt: bool = False  # the plan's second shape (crab not shrimp, clam not scallop); fixed per category
    size: float = 1.0
    genus_mark: Optional[tuple[float, float, float]] = None  # (position, value shift, hue shift)
    species_mark: Optional[tuple[float, float]] = None  # (position, hue offset)


# Body plan by class name, then by phylum name when the class has no entry.
CLASS_PLANS: dict[str, str] = {
    "Teleostei": "fish",
    "Actinopterygii": "fish",
    "Thaliacea": "pyrosome",
    "Tunicata": "tunicate",
    "Ascidiacea": "tunicate",
    "Malacostraca": "crustacean",
    "Cephalopoda": "octopus",
    "Bivalvia": "bivalve",
    "Gastropoda": "snail",
    "Asteroidea": "star",
    "Ophiuroidea": "brittle",
    "Crinoidea": "crinoid",
    "Holothuroidea": "cucumber",
    "Echinoidea": "urchin",
    "Hexacorallia": "anemone",
    "Anthozoa": "anemone",
    "Octocorallia": "octocoral",
    "Hydrozoa": "medusa",
    "Scyphozoa": "medusa",
    "Hexactinellida": "vase",
    "Demospongiae": "blob",
    "Polychaeta": "worm",
}
PHYLUM_PLANS: dict[str, str] = {
    "Annelida": "worm",
    "Arthropoda": "crustacean",
    "Chordata": "fish",
    "Cnidaria": "anemone",
    "Echinodermata": "star",
    "Mollusca": "snail",
    "Porifera": "blob",
}
PATTERNS: tuple[str, ...] = ("none", "stripes", "spots", "rings")


def taxa_of(taxonomy: Taxonomy) -> list[Taxon]:
    """The taxonomy's concepts in label order, as the generator sees them.

    Category ids are 1..N in that order (load_taxonomy_csv sorts by the table's category_id),
    the competition's numbering and the one lib/data/worms.py writes. Ranks are phylum..species
    with '' where a concept has none. A concept named above or beside its deepest listed rank
    (a subfamily, infraorder, subphylum such as 'Tunicata') gets its own name in the next rank
    slot, so two concepts with the same listed lineage still look different.
    """
    cols = [TAXONOMY_RANKS.index(r) for r in RANKS]
    taxa = []
    for i, (name, full) in enumerate(zip(taxonomy.names, taxonomy.lineages)):
        lineage = [full[c] or "" for c in cols]
        filled = [k for k, v in enumerate(lineage) if v]
        deepest = filled[-1] if filled else -1
        if (deepest < 0 or lineage[deepest] != name) and deepest + 1 < len(RANKS):
            lineage[deepest + 1] = name
        taxa.append(Taxon(i + 1, name, tuple(lineage)))
    return taxa


def _name_rng(rank: str, name: str) -> np.random.Generator:
    """A generator that depends only on a rank and a name, so relatives share parameters."""
    digest = hashlib.md5(f"{rank}:{name}".encode(), usedforsecurity=False).digest()  # a seed, not a secret
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def look_for(taxon: Taxon) -> Look:
    """Derive a category's look rank by rank; missing ranks keep the neutral defaults."""
    phylum, cls, order, family, genus, species = taxon.lineage
    plan = CLASS_PLANS.get(cls) or PHYLUM_PLANS.get(phylum, "blob")
    r = _name_rng("class", cls or phylum)
    hue, sat, val = r.uniform(), r.uniform(0.45, 0.85), r.uniform(0.62, 0.95)
    if not cls:
        sat *= 0.6
    kw: dict = {}
    if order:
        r = _name_rng("order", order)
        hue += r.uniform(-0.05, 0.05)
        kw["pattern"] = PATTERNS[int(r.integers(len(PATTERNS)))]
        kw["pat_shift"] = float(r.choice([-0.4, -0.3, 0.3]))
        kw["aspect"] = r.uniform(0.75, 1.35)
        kw["arm_factor"] = r.uniform(0.8, 1.8)
    if family:
        r = _name_rng("family", family)
        hue += r.uniform(-0.03, 0.03)
        kw["pat_density"] = r.uniform(0.15, 1.0)
        kw["pat_hue"] = r.uniform(-0.12, 0.12)
        kw["aspect"] = kw.get("aspect", 1.0) * r.uniform(0.85, 1.18)
        kw["arm_len"] = r.uniform(0.8, 1.2)
        kw["arm_width"] = r.uniform(0.7, 1.4)
        kw["style"] = int(r.integers(4))
    size = 1.0
    if genus:
        r = _name_rng("genus", genus)
        hue += r.uniform(-0.02, 0.02)
        size *= r.uniform(0.9, 1.1)
        kw["genus_mark"] = (r.uniform(0.2, 0.8), float(r.choice([-0.45, 0.35])), r.uniform(-0.08, 0.08))
    if species:
        r = _name_rng("species", species)
        hue += r.uniform(-0.015, 0.015)
        size *= r.uniform(0.95, 1.05)
        kw["species_mark"] = (r.uniform(0.1, 0.9), r.uniform(0.35, 0.65))
    kw["alt"] = kw.get("aspect", 1.0) < 0.95
    return Look(plan=plan, hue=float(hue % 1.0), sat=float(sat), val=float(val), size=float(size), **kw)


def rgb(h: float, s: float, v: float, a: int = 255) -> RGBA:
    """HSV in [0, 1] (clipped) to an RGBA tuple."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5), a)
