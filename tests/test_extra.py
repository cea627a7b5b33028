"""Extra rows from the FathomNet Database (lib.data.extra, lib.data.phash) against a stand-in client: no network.

No test here (nor the session that wrote them) reached the real database: the client is a fake
that answers like `fathomnet.api` would, and frames are tiny generated images.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.core.errors import StageError
from lib.data.coco import read_coco
from lib.data.extra import FathomNetClient, concept_map, fetch, load_or_fetch, screen
from lib.data.phash import NEAR, dhash, dhash_file, distances, hamming

CATS = [(1, "Actiniaria"), (2, "Funiculina"), (3, "Sebastes")]


def picture(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A smooth random picture: a 12 x 8 noise field upsampled, so its coarse structure (what dHash sees) is its own."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def box(uuid: str, concept: str, x: int = 4, y: int = 4, w: int = 20, h: int = 16) -> dict:
    return {"uuid": uuid, "concept": concept, "x": x, "y": y, "width": w, "height": h}


class FakeClient:
    """Answers like the live adapter: descendants by name, frames (dicts of AImageDTO fields) by concept."""

    def __init__(self, frames: dict[str, dict], tree: dict[str, list[str]], fail: bool = False) -> None:
        self.frames, self.tree, self.fail, self.calls = frames, tree, fail, 0

    def descendants(self, concept: str) -> list[str]:
        self.calls += 1
        if self.fail:
            raise ConnectionError("Name or service not known")
        if concept not in self.tree:
            raise LookupError(concept)
        return self.tree[concept]

    def images(self, concept: str) -> list[dict]:
        self.calls += 1
        names = {concept, *self.tree.get(concept, [])}
        return [f for f in self.frames.values() if any(b["concept"] in names for b in f["boundingBoxes"])]


def frame(uuid: str, *boxes: dict, w: int = 96, h: int = 64) -> dict:
    return {"uuid": uuid, "url": f"http://127.0.0.1:1/{uuid}.png", "width": w, "height": h,
            "contributorsEmail": "someone@example.org", "boundingBoxes": list(boxes)}


def world() -> FakeClient:
    frames = {
        "u1": frame("u1", box("b1", "Actiniaria"), box("b2", "Funiculina quadrangularis"), box("b3", "Octopus")),
        "u2": frame("u2", box("b4", "Actiniaria"), box("b5", "Actiniaria")),
        "u3": frame("u3", box("b6", "Funiculina")),
    }
    return FakeClient(frames, {"Actiniaria": ["Actiniidae"], "Funiculina": ["Funiculina quadrangularis"]})


# ----------------------------------------------------------------------------- phash


def test_dhash_same_for_resized_and_jpeg_copy_far_for_another_picture(tmp_path: Path) -> None:
    a = picture(1)
    a.save(tmp_path / "a.png")
    a.resize((72, 48), Image.Resampling.BILINEAR).save(tmp_path / "near.jpg", quality=60)
    picture(2).save(tmp_path / "b.png")
    ha, hn, hb = (dhash_file(tmp_path / n) for n in ("a.png", "near.jpg", "b.png"))
    assert hamming(ha, hn) <= NEAR < hamming(ha, hb)
    assert dhash(a) == ha
    assert distances(ha, np.array([ha, hn, hb], dtype=np.uint64)).tolist() == [0, hamming(ha, hn), hamming(ha, hb)]


def test_dhash_bits_follow_the_definition() -> None:
    # 9 x 8 grey, brightness rising to the right: every pixel is darker than its right neighbour -> all 64 bits set
    ramp = Image.fromarray(np.tile(np.arange(9, dtype=np.uint8) * 20, (8, 1)))
    assert dhash(ramp) == 2**64 - 1
    assert dhash(ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) == 0


# ----------------------------------------------------------------------------- fetch


def test_descendants_map_to_their_concept_and_other_concepts_are_left_out() -> None:
    got = fetch(CATS, world(), per_concept=10, total=100)
    anns = {a["uuid"]: a["category_id"] for a in got.coco["annotations"]}
    assert anns == {"b1": 1, "b2": 2, "b4": 1, "b5": 1, "b6": 2}  # the species counts as its genus; Octopus is none of ours
    assert got.outside == 1 and got.unknown == ["Sebastes"]
    assert {im["uuid"] for im in got.coco["images"]} == {"u1", "u2", "u3"}
    assert all(im["contributor"] and im["license"] for im in got.coco["images"])


def test_more_specific_concept_wins_over_its_ancestor() -> None:
    client = FakeClient({}, {"Actiniaria": ["Actiniidae", "Urticina"], "Urticina": []})
    mapping, unknown = concept_map(["Actiniaria", "Urticina"], client)
    assert mapping == {"Actiniaria": "Actiniaria", "Actiniidae": "Actiniaria", "Urticina": "Urticina"} and unknown == []


def test_caps_per_concept_and_total() -> None:
    assert sum(a["category_id"] == 1 for a in fetch(CATS, world(), per_concept=2, total=100).coco["annotations"]) == 2
    assert len(fetch(CATS, world(), per_concept=10, total=3).coco["annotations"]) == 3


def test_second_run_reads_the_cache_without_a_client(tmp_path: Path) -> None:
    cache = tmp_path / "extra" / "extra_fathomnet.json"
    client = world()
    load_or_fetch(cache, CATS, 10, 100, client=lambda: client)
    first = cache.read_bytes()

    def no_client():
        raise AssertionError("offline rerun must not build a client")

    assert load_or_fetch(cache, CATS, 10, 100, client=no_client) == cache
    assert cache.read_bytes() == first
    assert len(read_coco(cache).annotations) == 5  # the cache is a COCO file the competition reader takes


def test_other_caps_fetch_again(tmp_path: Path) -> None:
    cache = tmp_path / "extra_fathomnet.json"
    load_or_fetch(cache, CATS, 10, 100, client=world)
    load_or_fetch(cache, CATS, 1, 100, client=world)
    assert json.loads(cache.read_text())["info"]["per_concept"] == 1


# ----------------------------------------------------------------------------- bad input


def test_network_failure_without_cache_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"could not reach the FathomNet Database for the 3 concepts .*once online.*reuse"):
        load_or_fetch(tmp_path / "x.json", CATS, 10, 100, client=lambda: FakeClient({}, {}, fail=True))
    assert not (tmp_path / "x.json").exists()


def test_missing_package_is_one_sentence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "fathomnet", None)  # import fails as if not installed
    with pytest.raises(StageError, match="fathomnet package is missing; pip install fathomnet"):
        load_or_fetch(tmp_path / "x.json", CATS, 10, 100, client=FathomNetClient)


def test_dataset_the_database_does_not_know_has_nothing_to_fetch() -> None:
    with pytest.raises(StageError, match="knows none of the dataset's 3 concepts.*nothing to fetch"):
        fetch(CATS, FakeClient({}, {}), 10, 100)


def test_broken_cache_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(StageError, match="not valid JSON.*delete it"):
        load_or_fetch(tmp_path / "x.json", CATS, 10, 100, client=world)


# ----------------------------------------------------------------------------- screening against competition frames


def write_coco(path: Path, images: list[dict], anns: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for i, n in CATS]}))
    return path


def test_screen_drops_test_frames_by_uuid_url_and_pixels(tmp_path: Path) -> None:
    comp, extra_dir = tmp_path / "comp", tmp_path / "extra"
    comp.mkdir()
    extra_dir.mkdir()
    picture(10).save(comp / "1.png")  # test frame 1
    picture(11).save(comp / "2.png")  # train frame 2
    test = read_coco(write_coco(tmp_path / "test.json", [{"id": 1, "file_name": "1.png", "coco_url": "http://db/t1.png",
                                                          "uuid": "tu1"}], []))
    train = read_coco(write_coco(tmp_path / "train.json", [{"id": 2, "file_name": "2.png", "coco_url": "http://db/t2.png"}], []))
    picture(10).save(extra_dir / "1.png")  # same pixels as test frame 1, another name
    picture(10).resize((80, 54)).save(extra_dir / "2.png", format="JPEG", quality=55)  # near copy of test frame 1
    picture(11).save(extra_dir / "3.png")  # a train frame again
    picture(12).save(extra_dir / "4.png")  # new
    picture(13).save(extra_dir / "5.png")  # new pixels but the test frame's UUID
    picture(14).save(extra_dir / "6.png")  # new pixels but the test frame's URL
    ims = [{"id": i, "file_name": f"{i}.png", "coco_url": f"http://db/e{i}.png", "uuid": f"e{i}"} for i in range(1, 7)]
    ims[4]["uuid"], ims[5]["coco_url"] = "TU1", "http://db/t1.png"
    anns = [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in range(1, 7)]
    extra = read_coco(write_coco(tmp_path / "extra.json", ims, anns))
    rejects = screen(extra, extra_dir, [("train", train, comp), ("test", test, comp)], tmp_path / "hashes.json")
    why = {r["image_id"]: r["reason"] for r in rejects}
    assert set(why) == {1, 2, 3, 5, 6}
    assert why[1].startswith("looks like competition test frame 1 (dHash 0 of")
    assert why[2].startswith("looks like competition test frame 1")
    assert why[3].startswith("looks like competition train frame 2")
    assert why[5] == "same UUID as competition test frame 1" and why[6] == "same URL as competition test frame 1"
    assert all(r["split"] == "extra" and r["annotation_id"] == 10 + r["image_id"] for r in rejects)
    cached = json.loads((tmp_path / "hashes.json").read_text())
    assert sorted(Path(p).name for p in cached) == ["1.png", "2.png"]  # competition frames hashed once, cached


# ----------------------------------------------------------------------------- 00 end to end, frames from a loopback server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lib.config import load_config
    from lib.demo import dataset as demo_data

    out = tmp_path_factory.mktemp("demo")
    cfg = load_config(None, ["demo.per_class=2", "demo.test_per_class=1", "demo.frame_width=160", "demo.frame_height=120",
                             "demo.max_objects=2"])
    demo_data.generate(out, cfg.demo, ROOT / "configs/taxonomy/fathomnet2025.csv", seed=3)
    return out


def serve():
    """Serves `files` (path -> bytes) on 127.0.0.1; anything else is a 404 (the failing download)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    httpd.shutdown()
    httpd.server_close()


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def database(demo_root: Path, base: str, files: dict[str, bytes]) -> FakeClient:
    """Two concepts of the demo (one through a descendant), a test frame copied, a near copy, a 404, a box outside,
    a frame above the pixel limit."""
    cats = json.loads((demo_root / "dataset_train.json").read_text())["categories"]
    a, b = cats[0]["name"], cats[1]["name"]
    test1 = Image.open(demo_root / "test" / "images" / "1.png").convert("RGB")
    test2 = Image.open(demo_root / "test" / "images" / "2.png").convert("RGB")
    files.update({"/new1.png": encoded(picture(20, (160, 120))), "/new2.png": encoded(picture(21, (160, 120))),
                  "/dup.png": encoded(test1), "/big.png": encoded(picture(22, (400, 300))),
                  "/near.jpg": encoded(test2.resize((140, 105)), "JPEG", quality=70)})

    def fr(name: str, *boxes: dict) -> dict:
        url = f"{base}/{name}"
        return {**frame(name.split(".")[0], *boxes, w=160, h=120), "url": url}

    frames = {"new1": fr("new1.png", box("n1a", a), box("n1b", f"{a} species"), box("n1c", "Not ours")),
              "new2": fr("new2.png", box("n2a", b), box("n2b", b, x=500, y=400)),
              "dup": fr("dup.png", box("d1", a)), "near": fr("near.jpg", box("n1", b)), "gone": fr("gone.png", box("g1", a)),
              "big": fr("big.png", box("b1", a))}
    return FakeClient(frames, {a: [f"{a} species"], b: []})


def run00(demo_root: Path, out: Path, extra_dir: Path, *more: str) -> int:
    from conftest import load_script  # tests/conftest.py

    return load_script("00_prepare_data.py").main([
        "--config", "configs/demo.yaml", f"data.root={demo_root}", f"output_root={out}", "exp=t", "prepare.n_folds=2",
        "prepare.crop_size=32", "prepare.workers=1", "prepare.download_retries=0", "prepare.download_workers=2",
        f"data.extra_dir={extra_dir}", "prepare.max_reject_fraction=0.5", "prepare.max_frame_pixels=100000", *more])


@pytest.fixture(scope="module")
def prepared(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One 00 run with --extra fathomnet: the database a stand-in, its frames on a loopback server; then the server stops."""
    import lib.data.extra as extra_mod

    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("extra00")
    srv = serve()
    base, files = next(srv)
    client = database(demo_root, base, files)
    mp.setattr(extra_mod, "FathomNetClient", lambda: client)
    out, extra_dir = tmp / "out", tmp / "fathomnet"
    rc = run00(demo_root, out, extra_dir, "--extra", "fathomnet")
    next(srv, None)
    mp.undo()
    return rc, out / "t" / "00_prepare", out, extra_dir


def test_00_keeps_new_frames_and_drops_test_frames_with_reasons(demo_root: Path, prepared) -> None:
    import pandas as pd

    rc, prep, *_ = prepared
    assert rc == 0
    extra = pd.read_csv(prep / "extra_rois.csv")
    cats = json.loads((demo_root / "dataset_train.json").read_text())["categories"]
    # new1's two boxes (the species as its genus), new2's box inside its frame; nothing else
    assert sorted(extra["concept_name"]) == sorted([cats[0]["name"], cats[0]["name"], cats[1]["name"]])
    assert set(extra["source"]) == {"fathomnet_db"} and set(extra["split"]) == {"extra"} and set(extra["fold"]) == {-1}
    rejects = pd.read_csv(prep / "rejects.csv")
    why = rejects.loc[rejects["split"] == "extra", "reason"].tolist()
    assert sum(r.startswith("looks like competition test frame 1 ") for r in why) == 1  # the copy, by pixels
    assert sum(r.startswith("looks like competition test frame 2 ") for r in why) == 1  # the resized JPEG
    assert sum("not found" in r for r in why) == 2  # the 404 and the frame above prepare.max_frame_pixels
    assert len(why) == 5  # and the box outside new2
    summary = json.loads((prep / "summary.json").read_text())["extra"]
    assert summary["rows"] == 3 and summary["test_frame_boxes"] == 2
    record = json.loads((prep / "record.json").read_text())
    assert record["fingerprint"]["inputs"]["extra_json"] != "missing" and record["result"]["extra_rois"] == 3


def test_extra_rows_train_in_every_fold_and_validate_in_none(prepared) -> None:
    from lib.data.artifacts import load_extra, load_rois
    from lib.engine.folds import fold_splits

    _, prep, *_ = prepared
    rois, rows = load_rois(prep), load_extra(prep, 0.5)
    assert len(rows) == 3
    for with_extra, without in zip(fold_splits(rois, [0, 1], rows), fold_splits(rois, [0, 1])):
        assert len(with_extra.train) == len(without.train) + 3 and with_extra.val.equals(without.val)
        assert (with_extra.train["weight"] == 0.5).sum() == 3 and (with_extra.train["split"] == "extra").sum() == 3
        assert "extra" not in set(with_extra.val["split"])


def test_offline_rerun_reads_the_saved_data(demo_root: Path, prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    import lib.data.extra as extra_mod

    _, prep, out, extra_dir = prepared

    def offline():
        raise AssertionError("an offline rerun must not reach for the database")

    monkeypatch.setattr(extra_mod, "FathomNetClient", offline)
    first = (prep / "extra_rois.csv").read_bytes()
    assert run00(demo_root, out, extra_dir, "--extra", "fathomnet", "--force") == 0
    assert (prep / "extra_rois.csv").read_bytes() == first


def test_00_without_extra_writes_an_empty_extra_table(demo_root: Path, tmp_path: Path) -> None:
    import pandas as pd

    from lib.data.artifacts import load_extra

    assert run00(demo_root, tmp_path / "out", tmp_path / "none") == 0
    prep = tmp_path / "out" / "t" / "00_prepare"
    assert len(pd.read_csv(prep / "extra_rois.csv")) == 0 and len(load_extra(prep, 1.0)) == 0
    record = json.loads((prep / "record.json").read_text())
    assert "extra_json" not in record["fingerprint"]["inputs"] and record["result"]["extra_rois"] == 0
    assert not (tmp_path / "none").exists()  # nothing fetched, nothing written


def test_00_without_the_client_or_a_saved_list_stops_with_one_sentence(demo_root: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "fathomnet", None)  # not installed
    assert run00(demo_root, tmp_path / "out", tmp_path / "fathomnet", "--extra", "fathomnet") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: data.extra names fathomnet but the fathomnet package is missing; pip install fathomnet")
    assert not (tmp_path / "out" / "t" / "00_prepare" / "record.json").exists()


def test_live_adapter_calls_the_packages_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """FathomNetClient over a stand-in `fathomnet.api` (the package is not installed here): the calls it makes and
    how it reads their answers (a 404 is an unknown concept; descendants' frames merged by UUID)."""
    import types

    class Http404(Exception):
        response = types.SimpleNamespace(status_code=404)

    class Dto:
        def __init__(self, d: dict) -> None:
            self.d = d

        def to_dict(self) -> dict:
            return self.d

    calls: list[str] = []

    def get_descendants_names(name: str) -> list[str]:
        calls.append(f"worms {name}")
        if name == "Nope":
            raise Http404()
        return ["Urticina", "Urticina crassicornis"]

    def find_by_concept(name: str) -> list[Dto]:
        calls.append(f"images {name}")
        return [Dto({"uuid": "u1", "boundingBoxes": []}), Dto({"uuid": f"u-{name}", "boundingBoxes": []})]

    api = types.ModuleType("fathomnet.api")
    api.worms = types.SimpleNamespace(get_descendants_names=get_descendants_names)  # type: ignore[attr-defined]
    api.images = types.SimpleNamespace(find_by_concept=find_by_concept)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fathomnet", types.ModuleType("fathomnet"))
    monkeypatch.setitem(sys.modules, "fathomnet.api", api)
    c = FathomNetClient()
    with pytest.raises(LookupError):
        c.descendants("Nope")
    assert c.descendants("Actiniaria") == ["Urticina", "Urticina crassicornis"]
    got = c.images("Actiniaria")
    assert sorted(d["uuid"] for d in got) == ["u-Actiniaria", "u-Urticina", "u-Urticina crassicornis", "u1"]
    assert calls[-3:] == ["images Actiniaria", "images Urticina", "images Urticina crassicornis"]


def test_held_out_concepts_leave_the_extra_rows_too() -> None:
    import pandas as pd

    from lib.data.prepare import _hold_out

    rows = pd.DataFrame({"split": ["extra", "extra", "test"], "annotation_id": [1, 2, 3], "image_id": [1, 1, 2],
                         "concept_name": ["A", "B", "A"]})
    kept, held = _hold_out(rows, ["A"])
    assert kept["annotation_id"].tolist() == [2, 3] and held["annotation_id"].tolist() == [1]
    assert held["reason"].tolist() == ["held out of train (prepare.holdout)"] and held["split"].tolist() == ["extra"]
