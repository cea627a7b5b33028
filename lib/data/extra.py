"""Extra training rows from the FathomNet Database (`data.extra: [fathomnet]`), fetched once and reused offline.

The competition rules allow training on the FathomNet Database besides the Kaggle data, and the
test frames come from that database, so every extra frame is checked against the competition's
train and test frames (UUID, URL, perceptual hash) before it may train; what is dropped goes to
the rejects with its reason. The fetched boxes are saved as a COCO JSON (`data.extra_dir`, the
frames under its `images/`): a second run, or a Kaggle notebook with that folder attached as a
dataset, reads it without the network. Extra rows only ever train (stage 00 writes them to
`extra_rois.csv`, the training stages add them to every fold's training rows, never to a
validation fold), so the CV of a run with extra data is comparable with one without.

The database is reached only through `ExtraClient`; `FathomNetClient` is its live path over the
official `fathomnet` package (an optional install). The tests use a stand-in client, and the
session that wrote this module never reached the real service: the live path is written to the
package's documented API (worms.get_descendants_names, images.find_by_concept) but unverified.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from lib.config import EXTRA_JSON
from lib.core.errors import StageError
from lib.core.io import atomic_write_json, atomic_write_text
from lib.data.coco import CocoSet, frame_path
from lib.data.phash import NEAR, dhash_file, distances

log = logging.getLogger("pipeline")

SOURCE = "fathomnet_db"
CACHE_JSON = EXTRA_JSON
HASHES_JSON = "frame_hashes.json"  # dHash per competition frame, keyed by path, size and mtime: hashed once


class ExtraClient(Protocol):
    """What the database must answer: a concept's descendants, and the frames with boxes of a concept.

    Raise LookupError for a concept the database does not know; any other exception is taken for a network failure.
    """

    def descendants(self, concept: str) -> list[str]: ...

    def images(self, concept: str) -> list[dict[str, Any]]: ...


class FathomNetClient:
    """The live path over the official client (`pip install fathomnet`); never run against the real service in tests.

    `images(concept)` asks for the concept and each descendant one by one (`find_by_concept` matches a
    concept name exactly), so a genus brings its species' frames too; frames are merged by UUID.
    """

    def __init__(self) -> None:
        try:
            from fathomnet.api import images, worms
        except ImportError:
            raise StageError("data.extra names fathomnet but the fathomnet package is missing; pip install fathomnet "
                             "(online once), or attach a folder an earlier run saved as data.extra_dir.") from None
        self._images, self._worms = images, worms
        self._tree: dict[str, list[str]] = {}

    def descendants(self, concept: str) -> list[str]:
        try:
            names = [str(n) for n in self._worms.get_descendants_names(concept)]
        except Exception as e:  # requests' HTTPError 404: a name WoRMS does not know
            if getattr(getattr(e, "response", None), "status_code", None) == 404:
                raise LookupError(concept) from e
            raise
        self._tree[concept] = names
        return names

    def images(self, concept: str) -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for name in dict.fromkeys([concept, *self._tree.get(concept, [])]):
            for im in self._images.find_by_concept(name):
                d = im.to_dict()
                found.setdefault(str(d.get("uuid") or d.get("url")), d)
        return list(found.values())


@dataclass
class Fetched:
    """The extra data as saved: a COCO dict (competition categories), and what the fetch found."""

    coco: dict[str, Any]
    unknown: list[str] = field(default_factory=list)  # concepts the database does not know
    outside: int = 0  # boxes of the fetched frames whose concept is none of the dataset's (left out)


def concept_map(names: Sequence[str], client: ExtraClient) -> tuple[dict[str, str], list[str]]:
    """Database concept -> dataset concept (itself or its nearest ancestor among `names`), and the unknown names.

    A species under a genus concept counts as that genus; a name that is itself one of the dataset's
    concepts keeps its own (the more specific concept wins: fewer descendants are assigned last).
    """
    trees: dict[str, list[str]] = {}
    unknown = []
    for n in names:
        try:
            trees[n] = [n, *client.descendants(n)]
        except LookupError:
            unknown.append(n)
    mapping: dict[str, str] = {}
    for n in sorted(trees, key=lambda k: -len(trees[k])):
        mapping.update({d: n for d in trees[n]})
    mapping.update({n: n for n in trees})
    return mapping, unknown


def fetch(categories: Sequence[tuple[int, str]], client: ExtraClient, per_concept: int, total: int) -> Fetched:
    """Every box of the dataset's concepts (and their descendants) in the database, capped; deterministic order."""
    names = [n for _, n in categories]
    mapping, unknown = concept_map(names, client)
    if len(unknown) == len(names):
        raise StageError(f"the FathomNet Database knows none of the dataset's {len(names)} concepts (e.g. {names[0]!r}); "
                         "--extra fathomnet has nothing to fetch for this dataset, so leave data.extra empty.")
    cat_id = {n: i for i, n in categories}
    frames: dict[str, dict[str, Any]] = {}
    for n in names:
        if n in unknown:
            continue
        for im in client.images(n):
            key = str(im.get("uuid") or im.get("url") or "")
            if key:
                frames.setdefault(key, im)
    per: dict[str, int] = {}
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    outside = 0
    for i, key in enumerate(sorted(frames), 1):
        im, kept = frames[key], 0
        for b in sorted(im.get("boundingBoxes") or [], key=lambda b: str(b.get("uuid") or b.get("id"))):
            concept = mapping.get(str(b.get("concept") or ""))
            if concept is None:
                outside += 1
                continue
            if per.get(concept, 0) >= per_concept or len(anns) >= total:
                continue
            per[concept] = per.get(concept, 0) + 1
            kept += 1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat_id[concept], "uuid": b.get("uuid"),
                         "concept": b.get("concept"), "bbox": [b.get("x"), b.get("y"), b.get("width"), b.get("height")]})
        if kept:
            images.append({"id": i, "uuid": im.get("uuid"), "coco_url": im.get("url"), "file_name": f"{i}.png",
                           "width": im.get("width"), "height": im.get("height"), "license": "FathomNet (see README)",
                           "contributor": im.get("contributorsEmail") or ""})
    coco = {"info": {"source": SOURCE, "concepts": names, "unknown": unknown, "per_concept": per_concept, "total": total},
            "images": images, "annotations": anns, "categories": [{"id": i, "name": n} for i, n in categories]}
    return Fetched(coco, unknown, outside)


def load_or_fetch(cache_json: Path, categories: Sequence[tuple[int, str]], per_concept: int, total: int,
                  client: Callable[[], ExtraClient] | None = None) -> Path:
    """The saved COCO JSON of the extra data when it was fetched for these concepts and caps, else fetch and save it.

    The cache is read first and the client (default: `FathomNetClient`, the live path) built only when
    needed: offline, or on Kaggle with the folder attached, nothing reaches for the network or the package.
    """
    want = {"concepts": [n for _, n in categories], "per_concept": per_concept, "total": total}
    if cache_json.is_file():
        try:
            info = json.loads(cache_json.read_text()).get("info", {})
        except ValueError as e:
            raise StageError(f"'{cache_json}' is not valid JSON ({e}); delete it and rerun online with data.extra.") from e
        if all(info.get(k) == v for k, v in want.items()):
            log.info("extra data: reusing %s (no network)", cache_json)
            return cache_json
        log.info("extra data: %s was fetched for other concepts or caps; fetching again", cache_json)
    c = (client or FathomNetClient)()
    try:
        got = fetch(categories, c, per_concept, total)
    except (StageError, LookupError):
        raise
    except Exception as e:
        raise StageError(f"could not reach the FathomNet Database for the {len(categories)} concepts to fetch "
                         f"({type(e).__name__}: {e}); run 00_prepare_data.py with data.extra once online, then reuse "
                         f"'{cache_json.parent}' offline (attach it as a Kaggle dataset).") from e
    if got.unknown:
        log.warning("extra data: the FathomNet Database does not know %d concept(s): %s", len(got.unknown), ", ".join(got.unknown[:5]))
    log.info("extra data: %d boxes on %d frames (%d boxes of other concepts left out)", len(got.coco["annotations"]),
             len(got.coco["images"]), got.outside)
    cache_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache_json, json.dumps(got.coco, indent=1) + "\n")
    return cache_json


def _uuid(file_name: str, url: str) -> str:
    """A competition frame's UUID where its name carries one (`<uuid>.png` or the URL's last part)."""
    for s in (file_name, url.rsplit("/", 1)[-1]):
        stem = s.rsplit(".", 1)[0]
        if len(stem) == 36 and stem.count("-") == 4:
            return stem.lower()
    return ""


def frame_hashes(frames: Sequence[Path], cache: Path) -> dict[str, int]:
    """dHash per frame path, cached in `cache` by path, size and mtime (the competition frames are hashed once)."""
    try:
        old = json.loads(cache.read_text()) if cache.is_file() else {}
    except ValueError:
        old = {}
    out: dict[str, list] = {}
    for p in frames:
        st = p.stat()
        hit = old.get(str(p))
        out[str(p)] = hit if hit and hit[:2] == [st.st_size, st.st_mtime_ns] else [st.st_size, st.st_mtime_ns, dhash_file(p)]
    if out != old:
        atomic_write_json(cache, out)
    return {k: int(v[2]) for k, v in out.items()}


def screen(extra: CocoSet, extra_dir: Path, competition: Sequence[tuple[str, CocoSet, Path]], hash_cache: Path,
           near: int = NEAR) -> list[dict]:
    """Rejects for the extra frames that are competition frames: same UUID, same URL, or a dHash within `near` bits.

    `competition` is (split, CocoSet, frames folder) of train and test; a test frame is a leak, a
    train frame a duplicate (it would train twice). Every annotation of a rejected frame is listed.
    """
    known: dict[str, str] = {}
    on_disk = []
    for split, coco, folder in competition:
        for r in coco.images.itertuples(index=False):
            for k in (r.uuid.lower() or _uuid(r.file_name, r.coco_url), r.coco_url):
                if k:
                    known.setdefault(k, f"{split} frame {r.id}")
            p = frame_path(folder, int(r.id), r.file_name)
            if p is not None:
                on_disk.append((split, int(r.id), p))
    digests = frame_hashes([p for *_, p in on_disk], hash_cache)
    by_split = {s: ([f"{s} frame {i}" for s2, i, _ in on_disk if s2 == s],
                    np.array([digests[str(p)] for s2, _, p in on_disk if s2 == s], dtype=np.uint64)) for s in ("test", "train")}
    reasons: dict[int, str] = {}
    for r in extra.images.itertuples(index=False):
        uuid, url = r.uuid.lower(), r.coco_url
        if uuid and uuid in known:
            reasons[int(r.id)] = f"same UUID as competition {known[uuid]}"
        elif url and url in known:
            reasons[int(r.id)] = f"same URL as competition {known[url]}"
        elif (p := frame_path(extra_dir, int(r.id), r.file_name)) is not None:  # no frame: 00's row check rejects it
            h = dhash_file(p)
            for names, arr in by_split.values():
                d = distances(h, arr)
                if len(d) and d.min() <= near:
                    reasons[int(r.id)] = f"looks like competition {names[int(d.argmin())]} (dHash {int(d.min())} of 64 bits apart)"
                    break
    a = extra.annotations
    return [{"split": "extra", "annotation_id": int(x.id), "image_id": int(x.image_id), "reason": reasons[int(x.image_id)]}
            for x in a.itertuples(index=False) if int(x.image_id) in reasons]
