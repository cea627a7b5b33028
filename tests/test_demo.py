"""The synthetic FathomNet-format demo data: schema, boxes, counts, shift, determinism, real and random frames, CLI, looks."""
from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.config import DemoCfg
from lib.data.siblings import label_in_siblings, sibling_counts
from lib.data.taxonomy import load_taxonomy_csv
from lib.demo import compositions, dataset
from lib.demo.__main__ import RECORD, STAMPED, code_stamp, main
from lib.demo.compositions import composition_matrix, deal_real, frame_capacity, read_compositions
from lib.demo.looks import Look, look_for, taxa_of
from lib.demo.sprites import render_sprite

ROOT = Path(__file__).resolve().parents[1]
TAXONOMY = ROOT / "configs" / "taxonomy" / "fathomnet2025.csv"
TINY = DemoCfg(per_class=2, test_per_class=1, frame_width=160, frame_height=120)
SEED = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny dataset shared by the read-only tests (generation is the slow part)."""
    out = tmp_path_factory.mktemp("demo")
    return out, dataset.generate(out, TINY, TAXONOMY, SEED)


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def _taxonomy_names() -> dict[int, str]:
    with open(TAXONOMY, newline="") as f:
        return {int(r["category_id"]): r["concept_name"] for r in csv.DictReader(f)}


def test_coco_schema(tiny: tuple[Path, dict]) -> None:
    out, summary = tiny
    names = _taxonomy_names()
    for fname, test in ((dataset.TRAIN_JSON, False), (dataset.TEST_JSON, True)):
        js = _load(out, fname)
        assert list(js) == ["info", "images", "licenses", "annotations", "categories"]
        assert js["licenses"] == [{"id": 0, "name": "synthetic", "url": ""}]
        assert "synthetic" in js["info"]["description"].lower()
        assert [c["id"] for c in js["categories"]] == list(range(1, 80))
        assert all(c["name"] == names[c["id"]] and c["supercategory"] == "" for c in js["categories"])
        assert [im["id"] for im in js["images"]] == list(range(1, len(js["images"]) + 1))
        for im in js["images"]:
            assert set(im) == {"id", "width", "height", "file_name", "license", "flickr_url", "coco_url", "date_captured"}
            assert (im["width"], im["height"]) == (TINY.frame_width, TINY.frame_height)
            assert im["file_name"].endswith(".png") and im["coco_url"].endswith(im["file_name"])
        assert len({im["file_name"] for im in js["images"]}) == len(js["images"])
        assert [a["id"] for a in js["annotations"]] == list(range(1, len(js["annotations"]) + 1))
        image_ids = {im["id"] for im in js["images"]}
        for a in js["annotations"]:
            assert set(a) == {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
            assert a["image_id"] in image_ids and a["segmentation"] == [] and a["iscrowd"] == 0
            assert all(isinstance(v, float) for v in a["bbox"]) and isinstance(a["area"], float)
            assert a["area"] == a["bbox"][2] * a["bbox"][3]
            if test:
                assert a["category_id"] is None
            else:
                assert isinstance(a["category_id"], int) and 1 <= a["category_id"] <= 79
        key = "test" if test else "train"
        assert summary[f"{key}_images"] == len(js["images"]) and summary[f"{key}_boxes"] == len(js["annotations"])


def test_boxes_inside_frames_and_frames_per_image(tiny: tuple[Path, dict]) -> None:
    out, _ = tiny
    for fname in (dataset.TRAIN_JSON, dataset.TEST_JSON):
        js = _load(out, fname)
        for a in js["annotations"]:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w >= 4 and h >= 4
            assert x + w <= TINY.frame_width and y + h <= TINY.frame_height
        per_image = np.bincount([a["image_id"] for a in js["annotations"]])[1:]
        assert per_image.min() >= 1 and per_image.max() <= dataset.real_cap(TINY) == 8


def test_train_counts_and_test_balance(tiny: tuple[Path, dict]) -> None:
    out, _ = tiny
    train = _load(out, dataset.TRAIN_JSON)
    counts = np.bincount([a["category_id"] for a in train["annotations"]], minlength=80)[1:]
    assert counts.tolist() == [TINY.per_class] * 79
    rows = list(csv.reader(open(out / dataset.SOLUTION_CSV, newline="")))
    assert rows[0] == ["annotation_id", "concept_name"]
    test = _load(out, dataset.TEST_JSON)
    assert [int(r[0]) for r in rows[1:]] == [a["id"] for a in test["annotations"]]
    names = list(_taxonomy_names().values())
    assert sorted(r[1] for r in rows[1:]) == sorted(names * TINY.test_per_class)


def test_test_boxes_smaller_and_frames_written(tiny: tuple[Path, dict]) -> None:
    out, _ = tiny
    size = {}
    for split, fname in (("train", dataset.TRAIN_JSON), ("test", dataset.TEST_JSON)):
        js = _load(out, fname)
        size[split] = np.mean([max(a["bbox"][2], a["bbox"][3]) for a in js["annotations"]])
        files = sorted((out / split / "images").iterdir())
        assert len(files) == len(js["images"])
        for im in js["images"][:5]:
            with Image.open(out / split / "images" / f"{im['id']}.png") as img:
                assert img.size == (TINY.frame_width, TINY.frame_height) and img.mode == "RGB"
    assert size["test"] < 0.7 * size["train"]


def test_deterministic(tiny: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = tiny
    monkeypatch.setattr(dataset, "_workers", lambda n_jobs: 1)  # one process must give what the pool gave
    dataset.generate(tmp_path, TINY, TAXONOMY, SEED)
    for name in (dataset.TRAIN_JSON, dataset.TEST_JSON, dataset.SOLUTION_CSV):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "other_seed"
    dataset.generate(other, DemoCfg(per_class=1, test_per_class=1, frame_width=64, frame_height=48), TAXONOMY, SEED + 1)
    assert (other / dataset.TRAIN_JSON).read_bytes() != (out / dataset.TRAIN_JSON).read_bytes()


def test_class_counts_long_tail() -> None:
    assert dataset.class_counts(79, DemoCfg(per_class=5)) == [5] * 79
    counts = dataset.class_counts(79, DemoCfg(per_class=200, long_tail=True, imbalance_factor=10.0))
    assert counts[0] == 200 and counts[-1] == 20
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[0] / counts[-1] == pytest.approx(10.0, rel=0.05)
    small = dataset.class_counts(79, DemoCfg(per_class=12, long_tail=True, imbalance_factor=100.0))
    assert small[0] == 12 and min(small) >= 1 and small[-1] == 1
    assert dataset.class_counts(1, DemoCfg(per_class=3, long_tail=True)) == [3]


def _frames_of(js: dict) -> list[list[int]]:
    """Each frame's labels (category ids) of a train JSON, or annotation ids of a test JSON, by image."""
    by: dict[int, list[int]] = {}
    for a in js["annotations"]:
        by.setdefault(a["image_id"], []).append(a["category_id"] if a["category_id"] is not None else a["id"])
    return list(by.values())


def test_real_frames_are_drawn_from_real_compositions(tiny: tuple[Path, dict]) -> None:
    """demo.frames=real (the default): every frame's label multiset lies inside one real train frame's, and train
    frames carry the real structure (siblings often share a label; dealt at random they almost never do)."""
    out, _ = tiny
    names = list(_taxonomy_names().values())
    real = composition_matrix(read_compositions(), names)
    truth = {int(r["annotation_id"]): names.index(r["concept_name"]) for r in csv.DictReader(open(out / dataset.SOLUTION_CSV))}
    for fname in (dataset.TRAIN_JSON, dataset.TEST_JSON):
        frames = _frames_of(_load(out, fname))
        if fname == dataset.TEST_JSON:
            frames = [[truth[i] + 1 for i in f] for f in frames]
        for f in frames:
            v = np.bincount(np.asarray(f) - 1, minlength=len(names))
            assert (real >= v).all(1).any(), f
    train = _load(out, dataset.TRAIN_JSON)["annotations"]
    ids, labels = np.array([a["image_id"] for a in train]), np.array([a["category_id"] for a in train])
    assert label_in_siblings(ids, labels)[sibling_counts(ids) > 0].mean() > 0.4  # about 0.7 here, 0.83 on the real data


def test_deal_real_counts_cap_and_seed() -> None:
    names = list(_taxonomy_names().values())
    counts = dataset.class_counts(79, DemoCfg(per_class=12, long_tail=True))
    real = composition_matrix(read_compositions(), names, np.asarray(counts))
    frames = deal_real(np.random.default_rng(3), counts, real, cap=3)
    assert np.bincount(np.concatenate(frames), minlength=79).tolist() == counts  # exact counts
    assert max(map(len, frames)) == 3 and min(map(len, frames)) >= 1
    assert frames == deal_real(np.random.default_rng(3), counts, real, cap=3)
    assert frames != deal_real(np.random.default_rng(4), counts, real, cap=3)
    # One big real frame of two species: capped, it keeps both (in expectation its mix), and every count is met.
    one = np.zeros((1, 2), dtype=np.int32)
    one[0] = [10, 10]
    dealt = deal_real(np.random.default_rng(0), [7, 5], one, cap=4)
    assert max(map(len, dealt)) <= 4 and np.bincount(np.concatenate(dealt)).tolist() == [7, 5]
    assert sum(len(set(f)) == 2 for f in dealt) >= 1
    assert frame_capacity(320, 240) == 8 and frame_capacity(160, 120) == 8 and frame_capacity(1920, 1080) == 10
    with pytest.raises(ValueError, match="demo.frames=random"):
        composition_matrix([("Sebastes",)], ["Sebastes", "Nessie"], np.array([1, 1]))


def _old_layout_labels(counts: list[int], cfg: DemoCfg, seed: int, split_code: int) -> list[tuple[int, ...]]:
    """The dealing of the demo before demo.frames existed, verbatim (lib/demo/dataset.py _layout at 6203a7a)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % (1 << 63), split_code]))
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = labels[rng.permutation(len(labels))]
    out, pos = [], 0
    while pos < len(labels):
        k = int(rng.integers(cfg.min_objects, cfg.random_max_objects() + 1))  # was cfg.max_objects, 4 by default
        chunk = tuple(int(i) for i in labels[pos:pos + k])
        pos += len(chunk)
        out.append(chunk)
    return out


def test_random_frames_deal_as_before(tmp_path: Path) -> None:
    """demo.frames=random keeps the old dealing draw for draw (the whole old demo, JSONs and PNGs, was checked
    byte-identical against the old code when the switch came in)."""
    looks = [look_for(t) for t in taxa_of(load_taxonomy_csv(TAXONOMY))]
    for cfg in (DemoCfg(frames="random"), DemoCfg(frames="random", per_class=30, long_tail=True, min_objects=2, max_objects=6)):
        for split, counts in ((0, dataset.class_counts(79, cfg)), (1, [cfg.test_per_class] * 79)):
            jobs = dataset._layout(tmp_path, split, looks, counts, cfg, SEED, None)
            assert [j.labels for j in jobs] == _old_layout_labels(counts, cfg, SEED, split)
            assert [j.image_id for j in jobs] == list(range(1, len(jobs) + 1))


def test_cli_real_frames_regenerate(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record holds demo.frames and the compositions' digest: changing either regenerates; a missing table or a
    concept it lacks stops with one sentence before anything is removed."""
    table = tmp_path / "compositions.csv"
    table.write_text(compositions.COMPOSITIONS_CSV.read_text())
    monkeypatch.setattr(compositions, "COMPOSITIONS_CSV", table)
    root = tmp_path / "data"
    tax = _tiny_taxonomy(tmp_path)
    args = [f"data.root={root}", f"data.taxonomy_csv={tax}", "demo.per_class=3", "demo.test_per_class=1",
            "demo.frame_width=96", "demo.frame_height=72"]
    assert main(args) == 0 and "train frames" in capsys.readouterr().out
    record = json.loads((root / RECORD).read_text())
    assert record["demo"]["frames"] == "real" and len(record["compositions"]) == 64
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    table.write_text(table.read_text() + "8981,Merluccius productus|Merluccius productus\n")
    assert main(args) == 0 and "up to date" not in capsys.readouterr().out
    assert main(args + ["demo.frames=random"]) == 0 and "up to date" not in capsys.readouterr().out
    assert json.loads((root / RECORD).read_text())["compositions"] is None
    table.unlink()
    assert main(args + ["demo.frames=random"]) == 0 and "up to date" in capsys.readouterr().out  # random needs no table
    assert main(args) == 2
    assert "cannot be read" in capsys.readouterr().err and (root / dataset.TRAIN_JSON).exists()
    table.write_text(compositions.compositions_csv_text([("Sebastes",), ("Merluccius productus",)]))
    assert main(args + ["--force"]) == 2
    assert "never appear" in capsys.readouterr().err and (root / dataset.TRAIN_JSON).exists()


def _tiny_taxonomy(tmp_path: Path) -> Path:
    """Five categories from three phyla so the CLI tests run in well under a second."""
    lines = TAXONOMY.read_text().splitlines()
    keep = [lines[0]] + [lines[i] for i in (7, 41, 51, 52, 55)]
    p = tmp_path / "tax.csv"
    p.write_text("\n".join(keep) + "\n")
    return p


def test_cli_up_to_date_and_regenerates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "data"
    args = [f"data.root={root}", f"data.taxonomy_csv={_tiny_taxonomy(tmp_path)}", "demo.per_class=2",
            "demo.test_per_class=1", "demo.frame_width=96", "demo.frame_height=72", "demo.frames=random"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "train frames" in first and "up to date" not in first
    record = json.loads((root / RECORD).read_text())
    assert record["demo"]["per_class"] == 2 and record["summary"]["train_boxes"] == 10
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps

    tax = Path(args[1].split("=", 1)[1])
    tax.write_text(tax.read_text().replace("Merluccius productus", "Merluccius sp"))  # taxonomy edits count too
    assert main(args) == 0
    assert "up to date" not in capsys.readouterr().out
    assert "Merluccius sp" in (root / dataset.TRAIN_JSON).read_text()

    (root / "keep.txt").write_text("not ours")
    assert main(args + ["demo.per_class=3"]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert json.loads((root / RECORD).read_text())["summary"]["train_boxes"] == 15
    assert (root / "keep.txt").exists()

    assert main([args[0], "--force", *args[1:], "demo.per_class=3"]) == 0  # options may sit between overrides
    assert "up to date" not in capsys.readouterr().out


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([f"data.root={tmp_path}", "demo.per_clas=3"]) == 2
    assert "demo.per_class" in capsys.readouterr().err
    tax = _tiny_taxonomy(tmp_path)
    assert main([f"data.root={tmp_path / 'small'}", f"data.taxonomy_csv={tax}", "demo.frame_height=8"]) == 2
    assert "frame_height" in capsys.readouterr().err
    assert main([f"data.root={tmp_path / 'small'}", f"data.taxonomy_csv={tax}", "demo.frames=dealt"]) == 2
    assert "demo.frames" in capsys.readouterr().err
    assert main([f"data.root={tmp_path / 'small'}", f"data.taxonomy_csv={tax}", "demo.min_objects=5"]) == 2
    assert "at most demo.max_objects (4)" in capsys.readouterr().err
    bad = tmp_path / "bad_tax.csv"
    bad.write_text("category_id,concept_name,phylum\n1,Asteroidea,Echinodermata\n")  # no kingdom..species columns
    assert main([f"data.root={tmp_path / 'small'}", f"data.taxonomy_csv={bad}"]) == 2
    assert "must have the columns" in capsys.readouterr().err
    (tmp_path / dataset.TRAIN_JSON).write_text('{"info": {"description": "real FathomNet data"}}')
    assert main([f"data.root={tmp_path}", f"data.taxonomy_csv={tax}"]) == 2
    assert "did not write" in capsys.readouterr().err and (tmp_path / dataset.TRAIN_JSON).exists()


def _mean_colour(look: Look, n: int = 8) -> np.ndarray:
    """Alpha-weighted mean RGB of n rendered instances."""
    cols = []
    for k in range(n):
        sp = np.asarray(render_sprite(look, np.random.default_rng(k), 64), dtype=np.float64)
        a = sp[..., 3:4] / 255.0
        cols.append((sp[..., :3] * a).sum((0, 1)) / a.sum())
    return np.mean(cols, axis=0)


def test_relatives_look_alike() -> None:
    taxa = {t.name: t for t in taxa_of(load_taxonomy_csv(TAXONOMY))}
    same_genus = [("Pandalus amplus", "Pandalus platyceros"), ("Scotoplanes", "Scotoplanes globosa"),
                  ("Sebastes", "Sebastes diploproa"), ("Paragorgia", "Paragorgia arborea"),
                  ("Asbestopluma", "Asbestopluma monticola")]
    names = sorted({n for pair in same_genus for n in pair})
    looks = {n: look_for(taxa[n]) for n in names}
    colour = {n: _mean_colour(looks[n]) for n in names}
    for a, b in same_genus:
        assert looks[a].plan == looks[b].plan
    near = [np.linalg.norm(colour[a] - colour[b]) for a, b in same_genus]
    far = [np.linalg.norm(colour[a] - colour[b]) for i, a in enumerate(names) for b in names[i + 1:]
           if taxa[a].lineage[0] != taxa[b].lineage[0]]
    assert max(near) < min(far)


def test_lineage_fills_unranked_concepts() -> None:
    taxa = {t.name: t for t in taxa_of(load_taxonomy_csv(TAXONOMY))}
    assert taxa["Tunicata"].lineage[:2] == ("Chordata", "Tunicata")
    assert taxa["Caridea"].lineage[3] == "Caridea"
    assert look_for(taxa["Tunicata"]) != look_for(taxa["Actinopterygii"])
    assert len({look_for(t) for t in taxa.values()}) == len(taxa)


def test_code_stamp_ignores_comments_and_docstrings(tmp_path: Path) -> None:
    src = (ROOT / "lib" / "demo" / "looks.py").read_text()
    old_doc = '"""A generator that depends only on a rank and a name, so relatives share parameters."""'
    assert old_doc in src and "r.uniform(0.62, 0.95)" in src
    variants = {
        "same": src,
        "prose": "# a new comment\n" + src.replace(old_doc, '"""Reworded.\n\n    Longer."""').replace(
            "    kw: dict = {}\n", "    kw: dict = {}  # a comment\n\n"),
        "code": src.replace("r.uniform(0.62, 0.95)", "r.uniform(0.62, 0.96)"),
    }
    stamps = {}
    for name, text in variants.items():
        p = tmp_path / name / "looks.py"
        p.parent.mkdir()
        p.write_text(text)
        stamps[name] = code_stamp([p])
    assert stamps["prose"] == stamps["same"] and stamps["code"] != stamps["same"]


def test_code_stamp_covers_every_generator_module() -> None:
    demo = ROOT / "lib" / "demo"
    assert {Path(inspect.getfile(m)).name for m in STAMPED} == {p.name for p in demo.glob("*.py")} - {"__init__.py", "__main__.py"}
