"""00_prepare_data on good and bad input: crops, context, folds, rejects, placeholders, the real test JSON."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from lib.config import load_config
from lib.data.crops import crop_context, crop_full, crop_roi, down_up
from lib.data.folds import assign_folds
from lib.data.prepare import small_box_factors
from lib.demo import dataset as demo_data

from conftest import load_script  # tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
REAL_TEST_JSON = ROOT / "tests" / "data" / "fathomnet2025_dataset_test.json"


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory):
    """A tiny generated dataset, copied fresh into each test that mutates it."""
    out = tmp_path_factory.mktemp("clean")
    cfg = load_config(None, ["demo.per_class=2", "demo.test_per_class=1", "demo.frame_width=160", "demo.frame_height=120",
                                 "demo.max_objects=2"])
    demo_data.generate(out, cfg.demo, ROOT / "configs/taxonomy/fathomnet2025.csv", seed=3)
    return out


def overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "configs/demo.yaml", f"data.root={root}", f"output_root={out}", "exp=t", "prepare.n_folds=2",
            "prepare.crop_size=32", "prepare.workers=1", *extra]


def error_line(err: str) -> str:
    """The last line a user sees on stderr (progress bars end with carriage returns)."""
    return err.strip().split("\n")[-1].split("\r")[-1]


def run00(root: Path, out: Path, *extra: str) -> int:
    return load_script("00_prepare_data.py").main(overrides(root, out, *extra))


# ----------------------------------------------------------------------------- crops


def test_crop_roi_clips_and_rejects_outside():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[40:60, 90:110] = 255
    roi = crop_roi(frame, (90, 40, 20, 20), pad=0.0, square=True, size=20)
    assert roi is not None and roi.shape == (20, 20, 3) and roi.min() == 255
    part = crop_roi(frame, (190, 90, 30, 30), pad=0.0, square=True, size=16)  # partly outside: clipped
    assert part is not None and part.shape == (16, 16, 3)
    assert crop_roi(frame, (300, 300, 10, 10), pad=0.1, square=True, size=16) is None


def test_context_crop_is_centred_and_filled_outside():
    frame = np.full((100, 100, 3), 200, np.uint8)
    # Box at the corner: a 3x context square reaches outside the frame, which must be the fill.
    ctx = crop_context(frame, (0, 0, 10, 10), scale=3, size=30, fill=(7, 8, 9))
    assert ctx.shape == (30, 30, 3)
    assert tuple(ctx[0, 0]) == (7, 8, 9) and tuple(ctx[29, 29]) == (200, 200, 200)
    # Scale 1 of an interior box is the box itself.
    frame[40:50, 40:50] = 50
    assert crop_context(frame, (40, 40, 10, 10), scale=1, size=10, fill=(0, 0, 0)).max() == 50


def test_full_frame_is_letterboxed():
    frame = np.full((50, 100, 3), 100, np.uint8)
    full = crop_full(frame, size=40, fill=(1, 2, 3))
    assert full.shape == (40, 40, 3)
    assert tuple(full[0, 0]) == (1, 2, 3) and tuple(full[20, 20]) == (100, 100, 100)


def test_down_up_keeps_size_and_loses_detail():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = down_up(img, 0.25)
    assert out.shape == img.shape and out.std() < img.std()
    assert down_up(img, 1.0) is img


def test_test_like_factors_match_test_sizes():
    train = np.array([40.0, 60.0, 80.0, 100.0])
    test = np.array([20.0, 30.0, 40.0, 50.0])
    f = small_box_factors(train, test, windows=train * 1.2, size=1000)
    assert np.all(f <= 1) and np.all(f > 0)
    assert np.allclose(f, 0.5, atol=0.05)  # test boxes are half as large at every rank
    # A crop cached below its box's resolution loses less.
    assert np.all(small_box_factors(train, test, windows=train * 1.2, size=32) >= f)


def test_folds_grouped_stratified_and_deterministic():
    labels = np.repeat(np.arange(5), 20)
    groups = np.arange(100) // 2
    a = assign_folds(labels, groups, 4, seed=1)
    assert set(a) == {0, 1, 2, 3}
    assert pd.Series(a).groupby(groups).nunique().max() == 1
    assert np.array_equal(a, assign_folds(labels, groups, 4, seed=1))
    assert not np.array_equal(a, assign_folds(labels, groups, 4, seed=2))


# ----------------------------------------------------------------------------- the stage on good input


def test_stage_writes_roi_context_and_testlike_crops(clean_data, tmp_path):
    assert run00(clean_data, tmp_path, "prepare.context_scales=[3, 5]", "prepare.context_full=true") == 0
    d = tmp_path / "t" / "00_prepare"
    rois = pd.read_csv(d / "rois.csv", keep_default_na=False)
    for col in ("crop_path", "ctx3_path", "ctx5_path", "full_path"):
        assert all((d / p).is_file() for p in rois[col]), col
    train = rois[rois["split"] == "train"]
    assert all((d / p).is_file() for p in train["testlike_path"])
    assert (rois[rois["split"] == "test"]["testlike_path"] == "").all()
    ctx5 = cv2.imread(str(d / rois["ctx5_path"][0]))
    assert ctx5 is not None and ctx5.shape == (32, 32, 3)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["rois"]["train"]["usable"] == 79 * 2 and summary["classes"] == 79
    q_train, q_test = summary["box_side_quantiles"]["train"], summary["box_side_quantiles"]["test"]
    assert q_test[2] < q_train[2]  # the demo's test boxes are smaller


# ----------------------------------------------------------------------------- bad input


def mutate(clean: Path, tmp: Path) -> tuple[Path, dict, dict]:
    root = tmp / "data"
    shutil.copytree(clean, root)
    return root, json.loads((root / "dataset_train.json").read_text()), json.loads((root / "dataset_test.json").read_text())


def save(root: Path, train: dict, test: dict) -> None:
    (root / "dataset_train.json").write_text(json.dumps(train))
    (root / "dataset_test.json").write_text(json.dumps(test))


def frame_of(images: dict, data: dict, ann: dict) -> dict:
    return next(im for im in data["images"] if im["id"] == ann["image_id"])


def test_every_bad_input_case(clean_data, tmp_path):
    root, train, test = mutate(clean_data, tmp_path)
    anns = train["annotations"]
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    # Pick distinct frames holding a single box each, so each case is isolated.
    single = [img for img, a in by_image.items() if len(a) == 1]
    expect = {}
    # 1. missing frame file
    (root / "train/images" / f"{single[0]}.png").unlink()
    expect[by_image[single[0]][0]["id"]] = "not found"
    # 2. corrupt PNG and 3. truncated PNG
    (root / "train/images" / f"{single[1]}.png").write_bytes(b"not a png at all")
    p = root / "train/images" / f"{single[2]}.png"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    expect[by_image[single[1]][0]["id"]] = "could not be decoded"
    expect[by_image[single[2]][0]["id"]] = "could not be decoded"
    # 4. box partly outside (clipped, kept)
    im = next(i for i in train["images"] if i["id"] == single[3])
    partly = by_image[single[3]][0]
    partly["bbox"] = [im["width"] - 10, im["height"] - 10, 30, 30]
    # 5. wholly outside, 6. zero, negative and null sizes
    a5 = by_image[single[4]][0]
    a5["bbox"] = [im["width"] + 50, 5, 10, 10]
    expect[a5["id"]] = "wholly outside"
    for k, bbox in zip(range(5, 8), ([1, 1, 0, 5], [1, 1, 5, -3], [1, 1, None, 5])):
        by_image[single[k]][0]["bbox"] = bbox
        expect[by_image[single[k]][0]["id"]] = "positive width and height"
    # 7. unknown image_id and category_id
    by_image[single[8]][0]["image_id"] = 999999
    expect[by_image[single[8]][0]["id"]] = "not in the images list"
    by_image[single[9]][0]["category_id"] = 4242
    expect[by_image[single[9]][0]["id"]] = "not a known category"
    # 8. duplicate annotation id (the second copy is rejected)
    dup = dict(by_image[single[10]][0])
    dup["bbox"] = list(dup["bbox"])
    anns.append(dup)
    # 9. file_name with path parts, relative and absolute
    for k, name in ((11, "../escape.png"), (12, "/etc/passwd")):
        img = next(i for i in train["images"] if i["id"] == single[k])
        img["file_name"] = name
        (root / "train/images" / f"{single[k]}.png").unlink()
        expect[by_image[single[k]][0]["id"]] = "path parts; refused"
    cv2.imwrite(str(root / "train" / "escape.png"), np.zeros((120, 160, 3), np.uint8))  # bait outside the folder
    # The same on the test side: never dropped.
    t_single = [a for a in test["annotations"]]
    (root / "test/images" / f"{t_single[0]['image_id']}.png").write_bytes(b"garbage")
    t_single[1]["bbox"] = [5000, 5000, 10, 10]
    save(root, train, test)

    assert run00(root, tmp_path / "out", "prepare.max_reject_fraction=0.5") == 0
    d = tmp_path / "out" / "t" / "00_prepare"
    rois = pd.read_csv(d / "rois.csv", keep_default_na=False)
    rejects = pd.read_csv(d / "rejects.csv")
    train_rejects = rejects[rejects["split"] == "train"]
    for ann_id, reason in expect.items():
        got = train_rejects[train_rejects["annotation_id"] == ann_id]["reason"].tolist()
        assert any(reason in g for g in got), (ann_id, reason, got)
        if ann_id != dup["id"]:
            assert ann_id not in set(rois[rois["split"] == "train"]["annotation_id"])
    assert (train_rejects["reason"] == "duplicate annotation id").sum() == 1
    kept = rois[(rois["split"] == "train") & (rois["annotation_id"] == partly["id"])]
    assert len(kept) == 1 and kept["ok"].item() == 1 and (d / kept["crop_path"].item()).is_file()
    # Every test annotation is still there; the broken ones flagged with a placeholder crop.
    t = rois[rois["split"] == "test"]
    assert sorted(t["annotation_id"]) == sorted(a["id"] for a in test["annotations"])
    bad = t[t["ok"] == 0]
    frame0 = [a["id"] for a in test["annotations"] if a["image_id"] == t_single[0]["image_id"]]
    assert set(bad["annotation_id"]) == set(frame0) | {t_single[1]["id"]}
    assert all((d / p).is_file() for p in bad["crop_path"])


def test_too_many_rejects_is_one_sentence(clean_data, tmp_path, capsys):
    root, train, test = mutate(clean_data, tmp_path)
    for a in train["annotations"][:10]:
        a["bbox"] = [0, 0, 0, 0]
    save(root, train, test)
    assert run00(root, tmp_path / "out", "prepare.max_reject_fraction=0.01") == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: 10 of 158") and "prepare.max_reject_fraction=0.01" in err


def test_missing_frames_folder_names_download(clean_data, tmp_path, capsys):
    root, train, test = mutate(clean_data, tmp_path)
    shutil.rmtree(root / "test" / "images")
    assert run00(root, tmp_path / "out") == 2
    assert "--download" in capsys.readouterr().err


def test_many_missing_frames_say_how_many(clean_data, tmp_path, capsys):
    root, train, test = mutate(clean_data, tmp_path)
    frames = sorted((root / "train/images").glob("*.png"))
    for f in frames[: len(frames) // 2]:
        f.unlink()
    assert run00(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{len(frames) // 2} frames are missing" in err and "--download" in err


def test_categories_missing_from_taxonomy_listed(clean_data, tmp_path, capsys):
    root, train, test = mutate(clean_data, tmp_path)
    train["categories"].append({"id": 80, "name": "Nessie"})
    train["categories"].append({"id": 81, "name": "Kraken"})
    save(root, train, test)
    assert run00(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    table = ROOT / "configs/taxonomy/fathomnet2025.csv"
    assert f"2 categories of the train JSON (Nessie, Kraken) are missing from the taxonomy table '{table}' (data.taxonomy_csv); " \
           "set data.taxonomy_csv to a table of your dataset's concepts" in err
    train["categories"] = train["categories"][:-1]
    save(root, train, test)
    assert run00(root, tmp_path / "out") == 2
    assert "error: 1 category of the train JSON (Nessie) is missing from the taxonomy table" in capsys.readouterr().err


def test_download_without_network_is_one_sentence(clean_data, tmp_path, capsys):
    root, train, test = mutate(clean_data, tmp_path)
    for f in sorted((root / "test/images").glob("*.png")):
        f.unlink()
    for im in test["images"]:
        im["coco_url"] = "http://127.0.0.1:9/none.png"  # the discard port: nothing listens
    save(root, train, test)
    assert run00(root, tmp_path / "out", "--download", "prepare.download_retries=0") == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"error: {len(test['images'])} frames are missing") and "--download" in err


# ----------------------------------------------------------------------------- the real test JSON


def test_real_test_json_runs(clean_data, tmp_path):
    """The competition's own test file (325 frames, 788 boxes, null category_id) through the stage."""
    root, train, _ = mutate(clean_data, tmp_path)
    real = json.loads(REAL_TEST_JSON.read_text())
    assert len(real["images"]) == 325 and len(real["annotations"]) == 788
    assert all(a["category_id"] is None for a in real["annotations"])
    shutil.rmtree(root / "test" / "images")
    (root / "test" / "images").mkdir()
    encoded: dict[tuple[int, int], bytes] = {}
    for im in real["images"]:  # frames of the right sizes, flat grey (content is not the point); encoded once per size
        size = (im["height"], im["width"])
        if size not in encoded:
            encoded[size] = cv2.imencode(".png", np.full((*size, 3), 90, np.uint8))[1].tobytes()
        (root / "test/images" / f"{im['id']}.png").write_bytes(encoded[size])
    shutil.copy(REAL_TEST_JSON, root / "dataset_test.json")
    assert run00(root, tmp_path / "out", "prepare.context_scales=[]", "prepare.context_full=false", "prepare.workers=2") == 0
    rois = pd.read_csv(tmp_path / "out" / "t" / "00_prepare" / "rois.csv", keep_default_na=False)
    t = rois[rois["split"] == "test"]
    assert len(t) == 788 and sorted(t["annotation_id"]) == list(range(1, 789))


# ----------------------------------------------------------------------------- WoRMS lineages (offline: a fake lookup)


class Node:
    def __init__(self, name, rank, child=None):
        self.name, self.rank, self.children = name, rank, [child] if child else []


def fake_worms(name):
    chains = {
        "Sebastes diploproa": [("Animalia", "Kingdom"), ("Chordata", "Phylum"), ("Actinopteri", "Class"), ("Perciformes", "Order"),
                               ("Sebastidae", "Family"), ("Sebastes", "Genus"), ("Sebastes diploproa", "Species")],
        "Caridea": [("Animalia", "Kingdom"), ("Arthropoda", "Phylum"), ("Malacostraca", "Class"), ("Decapoda", "Order"),
                    ("Caridea", "Infraorder")],
    }
    if name not in chains:
        raise LookupError(name)
    node = None
    for n, r in reversed(chains[name]):
        node = Node(n, r, node)
    return node


def test_worms_table_builds_and_caches(tmp_path):
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.data.worms import worms_table

    calls = []

    def lookup(name):
        calls.append(name)
        return fake_worms(name)

    csv_path = worms_table(["Sebastes diploproa", "Caridea"], tmp_path / "tax.csv", lookup)
    tax = load_taxonomy_csv(csv_path)
    assert tax.names == ("Sebastes diploproa", "Caridea")
    assert tax.lineages[0] == ("Animalia", "Chordata", "Actinopteri", "Perciformes", "Sebastidae", "Sebastes", "Sebastes diploproa")
    assert tax.lineages[1][:4] == ("Animalia", "Arthropoda", "Malacostraca", "Decapoda") and tax.lineages[1][4] is None
    assert tax.exceptions == {"Caridea"}  # an infraorder is off the 7 ranks
    worms_table(["Sebastes diploproa", "Caridea"], csv_path, lookup)
    assert calls == ["Sebastes diploproa", "Caridea"]  # the second call is served by the cache


def test_worms_failure_is_one_sentence(tmp_path):
    from lib.core.errors import StageError
    from lib.data.worms import worms_table

    with pytest.raises(StageError, match=r"WoRMS lookup failed for 1 of 2 categories \(Nessie \(LookupError\)\)"):
        worms_table(["Caridea", "Nessie"], tmp_path / "tax.csv", fake_worms)


def test_worms_keeps_found_lineages_when_some_fail(tmp_path):
    from lib.core.errors import StageError
    from lib.data.worms import worms_table

    with pytest.raises(StageError):
        worms_table(["Caridea", "Nessie"], tmp_path / "tax.csv", fake_worms)
    assert "Caridea" in (tmp_path / "tax.csv").read_text()


def test_holdout_keeps_concepts_out_of_train_only(clean_data, tmp_path, capsys):
    """A novelty experiment: held-out concepts leave train (listed in rejects.csv), test keeps every row."""
    assert run00(clean_data, tmp_path, "prepare.holdout=[Chorilia longipes, Metridium farcimen]") == 0
    d = tmp_path / "t" / "00_prepare"
    rois = pd.read_csv(d / "rois.csv", keep_default_na=False)
    train = rois[rois["split"] == "train"]
    assert not train["concept_name"].isin(["Chorilia longipes", "Metridium farcimen"]).any() and len(train) == 77 * 2
    assert (rois["split"] == "test").sum() == 79
    rejects = pd.read_csv(d / "rejects.csv")
    assert (rejects["reason"] == "held out of train (prepare.holdout)").sum() == 4
    assert run00(clean_data, tmp_path / "b", "prepare.holdout=[Kraken]") == 2
    assert "not concepts of the taxonomy" in error_line(capsys.readouterr().err)


def test_default_cuts_only_the_crops_the_model_reads(clean_data, tmp_path):
    assert run00(clean_data, tmp_path, "model.context=[1, 3]") == 0
    rois = pd.read_csv(tmp_path / "t" / "00_prepare" / "rois.csv", keep_default_na=False)
    assert {c for c in rois.columns if c.endswith("_path")} == {"crop_path", "ctx3_path", "testlike_path"}


# ----------------------------------------------------------------------------- decompression bombs


def bomb_png(w: int, h: int) -> bytes:
    """A valid w x h 1-bit grey PNG of zeros, built row by row: ~100 KB on disk, w * h * 3 bytes once decoded to BGR."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + (w + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_frame_is_rejected_undecoded(clean_data, tmp_path):
    """A 30000 x 30000 PNG of 109 KB among the train frames (and one among the test frames): rejected from its header
    with the reason, the test rows kept with a placeholder, and 00's peak memory stays far below the 2.7 GB it decodes to."""
    import subprocess
    import sys
    import time

    root, train, test = mutate(clean_data, tmp_path)
    t0 = time.monotonic()
    bomb = bomb_png(30000, 30000)
    assert len(bomb) < 200_000 and time.monotonic() - t0 < 10
    per_frame: dict = {}
    for a in train["annotations"]:
        per_frame.setdefault(a["image_id"], []).append(a["id"])
    big_train = next(i for i, ids in per_frame.items() if len(ids) == 1)
    big_test = test["annotations"][0]["image_id"]
    (root / "train/images" / f"{big_train}.png").write_bytes(bomb)
    (root / "test/images" / f"{big_test}.png").write_bytes(bomb)
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    args = [sys.executable, str(ROOT / "00_prepare_data.py"), *overrides(root, tmp_path / "out", "prepare.max_reject_fraction=0.5")]
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    rc, peak_kib = map(int, r.stdout.split()[-2:])
    assert rc == 0, r.stderr[-2000:]
    assert peak_kib < 2 * 2**20, f"00 peaked at {peak_kib / 2**20:.2f} GiB"
    print(f"00 peak RSS {peak_kib / 2**10:.0f} MiB")
    d = tmp_path / "out" / "t" / "00_prepare"
    rejects = pd.read_csv(d / "rejects.csv")
    rois = pd.read_csv(d / "rois.csv", keep_default_na=False)
    why = rejects[(rejects["split"] == "train") & (rejects["image_id"] == big_train)]["reason"].tolist()
    assert len(why) == 1 and "30000 x 30000 pixels" in why[0] and "prepare.max_frame_pixels=100000000" in why[0]
    assert big_train not in set(rois[rois["split"] == "train"]["image_id"])
    t = rois[(rois["split"] == "test") & (rois["image_id"] == big_test)]
    assert len(t) == sum(a["image_id"] == big_test for a in test["annotations"]) and (t["ok"] == 0).all()
    assert all((d / p).is_file() for p in t["crop_path"])
    assert (rejects[(rejects["split"] == "test") & (rejects["image_id"] == big_test)]["reason"].str.contains("30000 x 30000")).all()


def test_frame_size_limit_and_decode_errors_are_reasons(tmp_path, monkeypatch):
    """The limit is the config's; a frame cv2 throws on is a rejected frame, never a traceback."""
    from lib.data import crops
    from lib.data.crops import decode_frame

    p = tmp_path / "f.png"
    cv2.imwrite(str(p), np.zeros((100, 200, 3), np.uint8))
    assert isinstance(decode_frame(p, 20_000), np.ndarray)
    reason = decode_frame(p, 19_999)
    assert isinstance(reason, str) and "200 x 100 pixels" in reason and "max_frame_pixels=19999" in reason

    def boom(*a, **k):
        raise cv2.error("OpenCV(4.x) imgcodecs: image too large")

    monkeypatch.setattr(crops.cv2, "imread", boom)
    reason = decode_frame(p, None)
    assert isinstance(reason, str) and "could not be decoded (error)" in reason
    with pytest.raises(Exception, match="max_frame_pixels"):
        load_config(None, ["prepare.max_frame_pixels=0"])


# ----------------------------------------------------------------------------- crop writes and the crop manifest


@pytest.mark.parametrize("how,workers", [("empty", 1), ("enospc", 1), ("empty", 2)])
def test_crop_write_that_fails_or_comes_up_empty_is_one_sentence(clean_data, tmp_path, capsys, monkeypatch, how, workers):
    """A full disk where the encoder still reports success leaves an empty file: caught, never renamed into place."""
    import errno

    from lib.data import crops

    def empty(path, data):
        Path(path).write_bytes(b"")

    def enospc(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(crops, "_write_file", empty if how == "empty" else enospc)
    root, _, _ = mutate(clean_data, tmp_path)
    assert run00(root, tmp_path / "out", f"prepare.workers={workers}") == 2  # 2: the sentence crosses the process pool
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: Could not write '") and "/crops/" in err and err.endswith("(earlier outputs are untouched).")
    assert ("stopped short" in err) if how == "empty" else ("errno 28" in err)
    d = tmp_path / "out" / "t" / "00_prepare"
    assert not (d / "record.json").exists()
    assert not [p for p in (d / "crops").rglob("*.png") if p.stat().st_size == 0]  # nothing empty under a final name


def test_lost_or_emptied_crop_reruns_00_alone(clean_data, tmp_path, caplog):
    """00's record vouches for every crop (names and sizes, via crops_manifest.json): a lost or empty crop reruns 00,
    which cuts the same bytes, so its record (what later stages key on) is unchanged."""
    import logging

    from lib.data.manifest import MANIFEST, crop_problems
    from lib.pipeline.records import read_record

    root, _, _ = mutate(clean_data, tmp_path)
    assert run00(root, tmp_path / "out") == 0
    d = tmp_path / "out" / "t" / "00_prepare"
    rec = read_record(d / "record.json")
    assert rec is not None
    files = json.loads((d / MANIFEST).read_text())["files"]
    rois = pd.read_csv(d / "rois.csv", keep_default_na=False)
    assert set(files) == {p for c in rois.columns if c.endswith("_path") for p in rois[c] if p}
    assert rec["result"]["crops"]["files"] == len(files) and crop_problems(d, rec["result"]) == []
    lost, emptied = d / sorted(files)[0], d / sorted(files)[-1]
    for damage in (lost.unlink, lambda: emptied.write_bytes(b"")):
        damage()
        assert crop_problems(d, rec["result"])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline"):
            assert run00(root, tmp_path / "out") == 0
        assert any("cutting them again" in m for m in caplog.messages), caplog.messages
        assert lost.stat().st_size > 0 and emptied.stat().st_size > 0
        again = read_record(d / "record.json")
        assert again is not None and again["result"] == rec["result"] and again["outputs"] == rec["outputs"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert run00(root, tmp_path / "out") == 0
    assert any("00_prepare: up to date" in m for m in caplog.messages)
    (d / MANIFEST).write_text(json.dumps({"files": {**files, "crops/roi/train/x.png": {"size": 5, "sha256": "0" * 64}}}))
    assert crop_problems(d, rec["result"]) == [f"changed output: {MANIFEST}"]
    (d / MANIFEST).write_text(json.dumps({"files": {rel: f["size"] for rel, f in files.items()}}))  # an older 00's: sizes only
    assert crop_problems(d, rec["result"]) == [f"outdated output: {MANIFEST} (sizes only, no content digests: written by an older 00)"]
    (d / MANIFEST).unlink()
    assert crop_problems(d, rec["result"]) == [f"missing output: {MANIFEST}"]
    assert crop_problems(d, {"train_rois": 3}) == []  # a record of an older 00 vouches for no crop


def test_manifest_holds_the_size_and_sha256_of_every_crop_00_wrote(clean_data, tmp_path):
    """The digests are taken from the bytes in memory as each crop is written (through the process pool too):
    they are those of the files on disk, placeholders and full frames included, and 00's record covers them."""
    import hashlib

    from lib.data.manifest import MANIFEST, digest, load
    from lib.pipeline.records import read_record

    root, train, test = mutate(clean_data, tmp_path)
    test["annotations"][0]["bbox"] = [5000, 5000, 10, 10]  # wholly outside its frame: a placeholder crop
    save(root, train, test)
    assert run00(root, tmp_path / "out", "prepare.workers=2", "prepare.context_full=true") == 0
    d = tmp_path / "out" / "t" / "00_prepare"
    files = load(d)
    assert all(any(f"/{kind}/" in rel for rel in files) for kind in ("roi", "full", "testlike", "placeholder"))
    for rel, f in files.items():
        data = (d / rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f.size, f.sha256), rel
    rec = read_record(d / "record.json")
    assert rec is not None and rec["result"]["crops"]["digest"] == digest(files)
    raw = json.loads((d / MANIFEST).read_text())["files"]
    assert set(next(iter(raw.values()))) == {"size", "sha256"}
