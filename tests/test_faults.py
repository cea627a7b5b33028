"""Faults a long run meets, injected for real, and what each costs to recover (issue 8).

`ref` runs the chain 00 -> 04 once, uninterrupted and in-process, on a tiny demo whose JSON files
hold every bad-input case (and a test JSON whose categories differ from the train ones). `faulted`
runs the same chain again in subprocesses, killed with SIGKILL at named points
(`PIPELINE_KILL_AT`, see lib.core.faults.fault_point) and rerun. The reruns finish, redo only what
was lost, never expose a half-written file, and on CPU end with the uninterrupted submission.
The remaining tests damage copies of `ref` (deleted or truncated files, a full disk, a held lock,
bad config) and check that each costs one fold or one stage, never the run.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lib.demo.__main__ import main as demo_main

from conftest import load_script  # tests/conftest.py

pytestmark = pytest.mark.slow  # real kills and resumes of the stages (make test-fast leaves them out)

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["00_prepare_data.py", "01_train_folds.py", "02_pseudo_label.py", "03_retrain.py", "04_infer_submit.py"]
FAST = [  # a tiny, fast, deterministic chain: 2 folds, 2 epochs (1 in 03), 32 px, timm's test backbone
    "demo.per_class=2", "demo.test_per_class=1", "demo.frame_width=160", "demo.frame_height=120",
    "prepare.n_folds=2", "prepare.crop_size=32", "prepare.workers=1", "prepare.max_reject_fraction=0.1",
    "model.backbone=test_efficientnet", "model.pretrained=none", "model.img_size=32",
    "train.epochs=2", "retrain.epochs=1", "train.batch_size=32", "train.lr=0.01",
    "pseudo.methods=[confidence]", "pseudo.threshold=0.0", "tta.views=[identity]", "submit.decode=argmax",
]
COSTS: dict[str, float] = {}  # seconds per step, printed at the end of the module (pytest -s)


def args_for(run, exp: str | None = None, output_root: Path | None = None, *extra: str) -> list[str]:
    over = [o for o in run.overrides if not o.startswith(("exp=", "output_root="))]
    return ["--config", "configs/demo.yaml", *over, f"exp={exp or run.exp}", f"output_root={output_root or run.output_root}", *extra]


def stage_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update({"NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONDONTWRITEBYTECODE": "1", "no_proxy": "127.0.0.1,localhost"})
    env.pop("PIPELINE_KILL_AT", None)
    env.pop("PIPELINE_PAUSE_AT", None)
    return env


def sub(script: str, args: list[str], kill_at: str | None = None, preexec=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a stage in a fresh process (optionally to be killed with SIGKILL at a named point)."""
    env = stage_env()
    if kill_at:
        env["PIPELINE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def timed(name: str, fn):
    t0 = time.time()
    out = fn()
    COSTS[name] = round(time.time() - t0, 1)
    return out


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.is_file() and ".tmp" in p.name]


def assert_whole(folder: Path) -> None:
    """Every file under its final name is whole: it loads (a half-written one would not)."""
    for p in folder.rglob("*"):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix == ".pt":
            torch.load(p, map_location="cpu", weights_only=True)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                [z[k] for k in z.files]
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            pd.read_csv(p)


def same_npz(a: Path, b: Path) -> bool:
    """The same arrays (a cache's `_key` names its upstream records, which differ by their timestamps)."""
    with np.load(a) as x, np.load(b) as y:
        keys = set(x.files) - {"_key"}
        return keys == set(y.files) - {"_key"} and all(np.array_equal(x[k], y[k]) for k in keys)


def same_weights(a: Path, b: Path) -> bool:
    x, y = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------- bad input, seeded into the demo


def seed_bad_input(data: Path) -> dict:
    """Every bad-input case of 00 in the train and the test JSON; returns what 00 must make of them."""
    train, test = (json.loads((data / f"dataset_{s}.json").read_text()) for s in ("train", "test"))
    expect: dict = {"train": {}, "test_ids": []}

    def singles(coco):
        by_image: dict = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        return [(img, boxes[0]) for img, boxes in sorted(by_image.items()) if len(boxes) == 1], by_image

    one, _ = singles(train)
    images = {im["id"]: im for im in train["images"]}
    tr = data / "train" / "images"
    (tr / f"{one[0][0]}.png").unlink()
    expect["train"][one[0][1]["id"]] = "not found"
    (tr / f"{one[1][0]}.png").write_bytes(b"not a png at all")
    expect["train"][one[1][1]["id"]] = "could not be decoded"
    p = tr / f"{one[2][0]}.png"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    expect["train"][one[2][1]["id"]] = "could not be decoded"
    im = images[one[3][0]]
    one[3][1]["bbox"] = [im["width"] - 10, im["height"] - 10, 30, 30]  # partly outside: clipped, kept
    expect["kept"] = one[3][1]["id"]
    one[4][1]["bbox"] = [im["width"] + 50, 5, 10, 10]
    expect["train"][one[4][1]["id"]] = "wholly outside"
    for (_, a), bbox in zip(one[5:8], ([1, 1, 0, 5], [1, 1, 5, -3], [1, 1, None, 5])):
        a["bbox"] = bbox
        expect["train"][a["id"]] = "positive width and height"
    one[8][1]["image_id"] = 999999
    expect["train"][one[8][1]["id"]] = "not in the images list"
    one[9][1]["category_id"] = 4242
    expect["train"][one[9][1]["id"]] = "not a known category"
    train["annotations"].append(dict(one[10][1]))  # a duplicate id: the copy is rejected
    images[one[11][0]]["file_name"] = "../escape.png"
    (tr / f"{one[11][0]}.png").unlink()
    expect["train"][one[11][1]["id"]] = "path parts; refused"
    shutil.copy(tr / f"{one[12][0]}.png", data / "train" / "escape.png")  # bait one folder up

    t_one, t_by_image = singles(test)
    t_images = {im["id"]: im for im in test["images"]}
    te = data / "test" / "images"
    (te / f"{t_one[0][0]}.png").write_bytes(b"garbage")
    p = te / f"{t_one[1][0]}.png"
    p.write_bytes(p.read_bytes()[:200])
    t_one[2][1]["bbox"] = [5000, 5000, 10, 10]
    t_one[3][1]["bbox"] = [1, 1, None, None]
    t_one[4][1]["image_id"] = 888888
    t_images[t_one[5][0]]["file_name"] = "/etc/passwd"
    (te / f"{t_one[5][0]}.png").unlink()
    test["annotations"].append(dict(t_one[6][1]))  # a duplicate test id: one submission row
    for a in test["annotations"]:
        a["category_id"] = None  # as in the real test JSON
    # The test JSON's categories differ from training's: one dropped, one renamed, one unknown.
    test["categories"] = test["categories"][1:]
    test["categories"][0] = {**test["categories"][0], "name": "Nessie"}
    test["categories"].append({"id": 500, "name": "Kraken", "supercategory": ""})
    expect["test_ids"] = sorted({a["id"] for a in test["annotations"]})
    for s, coco in (("train", train), ("test", test)):
        (data / f"dataset_{s}.json").write_text(json.dumps(coco))
    return expect


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted run: tiny demo with bad input, every stage once, in-process."""
    tmp = tmp_path_factory.mktemp("faults")
    overrides = [f"data.root={tmp / 'data'}", f"output_root={tmp / 'out'}", "exp=ref", *FAST]
    assert demo_main(["--config", "configs/demo.yaml", *overrides]) == 0
    expect = seed_bad_input(tmp / "data")
    run = SimpleNamespace(overrides=overrides, exp="ref", output_root=tmp / "out", out=tmp / "out" / "ref", data=tmp / "data",
                          tmp=tmp, expect=expect)
    for s in STAGES:
        assert timed(f"uninterrupted {s}", lambda s=s: load_script(s).main(args_for(run))) == 0, s
    yield run
    print("\nseconds per step:", json.dumps(COSTS, indent=1))


@pytest.fixture
def copy(ref, tmp_path):
    """A copy of the reference outputs to damage (exp 'ref' under another output_root)."""
    shutil.copytree(ref.out, tmp_path / "out" / "ref")
    return SimpleNamespace(**{**vars(ref), "output_root": tmp_path / "out", "out": tmp_path / "out" / "ref"})


# ----------------------------------------------------------------------------- kill -9, rerun, compare


@pytest.fixture(scope="module")
def faulted(ref):
    """The chain again, each of 01, 02 and 04 killed once with SIGKILL and rerun; what each step saw."""
    out = ref.output_root / "faulted"
    shutil.copytree(ref.out / "00_prepare", out / "00_prepare")
    a = args_for(ref, "faulted")
    seen: dict = {}
    # 01: killed in the middle of epoch 2 of fold 1 (fold 0 done; fold 1's last.pt holds epoch 1).
    r = timed("01 killed mid-epoch", lambda: sub("01_train_folds.py", a, kill_at="train_batch 01_train/fold_1 epoch 2"))
    d = out / "01_train"
    seen["01_kill"] = SimpleNamespace(rc=r.returncode, fold0_done=(d / "fold_0" / "record.json").is_file(),
                                      fold1_done=(d / "fold_1" / "record.json").is_file(), stage_done=(d / "record.json").is_file(),
                                      last_epoch=torch.load(d / "fold_1" / "last.pt", weights_only=True)["epoch"],
                                      lock_note=(d / ".lock").read_text())
    assert_whole(d)
    seen["01_rerun"] = timed("01 rerun", lambda: sub("01_train_folds.py", a))
    # 02: killed with test_probs.npz written and pseudo_labels.csv complete in its temp file, not yet renamed.
    r = timed("02 killed mid-stage", lambda: sub("02_pseudo_label.py", a, kill_at="write:pseudo_labels.csv"))
    d = out / "02_pseudo"
    seen["02_kill"] = SimpleNamespace(rc=r.returncode, probs=(d / "test_probs.npz").is_file(), labels=(d / "pseudo_labels.csv").is_file(),
                                      temps=len(temp_files(d)), record=(d / "record.json").is_file())
    assert_whole(d)
    seen["03_on_half_02"] = sub("03_retrain.py", a)
    seen["02_rerun"] = timed("02 rerun", lambda: sub("02_pseudo_label.py", a))
    assert timed("03 (not faulted)", lambda: load_script("03_retrain.py").main(a)) == 0
    # 04: killed after phase 1's probabilities were cached, while storing phase 2's.
    r = timed("04 killed mid-stage", lambda: sub("04_infer_submit.py", a, kill_at="write:phase2.npz"))
    d = out / "04_submit"
    seen["04_kill"] = SimpleNamespace(rc=r.returncode, phase1=(d / "probs" / "phase1.npz").is_file(),
                                      phase2=(d / "probs" / "phase2.npz").is_file(), temps=len(temp_files(d)),
                                      submission=(d / "submission.csv").is_file(), record=(d / "record.json").is_file())
    assert_whole(d)
    seen["04_rerun"] = timed("04 rerun", lambda: sub("04_infer_submit.py", a))
    seen["submission"] = (d / "submission.csv").read_bytes()
    # 04 again with another decoding, killed with the new submission complete but not renamed: the old one stays.
    r = timed("04 killed while replacing the submission", lambda: sub("04_infer_submit.py", [*a, "submit.decode=min_risk"],
                                                                      kill_at="write:submission.csv"))
    seen["04_replace_kill"] = SimpleNamespace(rc=r.returncode, submission=(d / "submission.csv").read_bytes(), temps=len(temp_files(d)),
                                              record=(d / "record.json").is_file())
    assert_whole(d)
    return SimpleNamespace(out=out, seen=seen)


def test_bad_input_runs_through_and_every_test_annotation_is_answered(ref):
    d = ref.out / "00_prepare"
    rejects = pd.read_csv(d / "rejects.csv")
    train_rej = rejects[rejects["split"] == "train"]
    for ann_id, reason in ref.expect["train"].items():
        assert any(reason in r for r in train_rej.loc[train_rej["annotation_id"].astype(str) == str(ann_id), "reason"]), (ann_id, reason)
    rois = pd.read_csv(d / "rois.csv", keep_default_na=False)
    assert ref.expect["kept"] in set(rois.loc[rois["split"] == "train", "annotation_id"])
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary["test_categories_not_in_train"]) == {"Nessie", "Kraken"}
    sub_df = pd.read_csv(ref.out / "04_submit" / "submission.csv")
    assert sorted(sub_df["annotation_id"]) == ref.expect["test_ids"]  # one row per test annotation id, duplicates once
    assert sub_df["annotation_id"].is_unique
    names = set(pd.read_csv(ROOT / "configs/taxonomy/fathomnet2025.csv")["concept_name"])
    assert set(sub_df["concept_name"]) <= names
    fallbacks = pd.read_csv(ref.out / "04_submit" / "fallbacks.csv")
    assert len(fallbacks) >= 6  # the test boxes that could not be cut are answered by the prior


def test_kill_mid_epoch_of_01_resumes_that_fold_only(ref, faulted):
    k, r = faulted.seen["01_kill"], faulted.seen["01_rerun"]
    assert k.rc == -signal.SIGKILL
    assert k.fold0_done and not k.fold1_done and not k.stage_done and k.last_epoch == 0
    assert json.loads(k.lock_note)["pid"] > 0  # the dead run's lock note, left behind
    assert r.returncode == 0, r.stderr[-2000:]
    assert "01_train/fold_0: up to date" in r.stdout
    assert "01_train/fold_1: resuming at epoch 2/2" in r.stdout
    assert "taking over the lock" in r.stdout
    d = faulted.out / "01_train"
    assert not temp_files(d) and (d / ".lock").read_text() == ""
    for k in (0, 1):  # the same weights and out-of-fold probabilities as the run never killed
        assert same_weights(d / f"fold_{k}" / "best.pt", ref.out / "01_train" / f"fold_{k}" / "best.pt")
        assert same_npz(d / f"fold_{k}" / "oof.npz", ref.out / "01_train" / f"fold_{k}" / "oof.npz")
    cv = [json.loads((o / "01_train" / "record.json").read_text())["result"]["cv_distance"] for o in (faulted.out, ref.out)]
    assert cv[0] == cv[1]


def test_kill_mid_02_leaves_no_half_file_and_downstream_waits(ref, faulted):
    k = faulted.seen["02_kill"]
    assert k.rc == -signal.SIGKILL and k.probs and not k.labels and k.temps == 1 and not k.record
    r = faulted.seen["03_on_half_02"]
    assert r.returncode == 2 and "02_pseudo/record.json is missing; run 02_pseudo_label.py first" in r.stderr
    r = faulted.seen["02_rerun"]
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed 1 temp file(s)" in r.stdout
    d = faulted.out / "02_pseudo"
    assert not temp_files(d)
    assert same_npz(d / "test_probs.npz", ref.out / "02_pseudo" / "test_probs.npz")
    assert (d / "pseudo_labels.csv").read_text() == (ref.out / "02_pseudo" / "pseudo_labels.csv").read_text()


def test_kill_mid_04_reuses_the_cached_model_and_the_old_submission_survives(ref, faulted):
    k = faulted.seen["04_kill"]
    assert k.rc == -signal.SIGKILL and k.phase1 and not k.phase2 and k.temps == 1 and not k.submission and not k.record
    r = faulted.seen["04_rerun"]
    assert r.returncode == 0, r.stderr[-2000:]
    assert "phase1 test probabilities from cache" in r.stdout and "removed 1 temp file(s)" in r.stdout
    k = faulted.seen["04_replace_kill"]
    assert k.rc == -signal.SIGKILL and not k.record and k.temps == 1
    assert k.submission == faulted.seen["submission"]  # the reader still sees the old file, whole


def test_faulted_chain_ends_with_the_uninterrupted_submission(ref, faulted):
    assert faulted.seen["submission"] == (ref.out / "04_submit" / "submission.csv").read_bytes()
    for m in ("phase1", "phase2"):
        assert same_npz(faulted.out / "04_submit" / "probs" / f"{m}.npz", ref.out / "04_submit" / "probs" / f"{m}.npz")


# ----------------------------------------------------------------------------- kill -9 during the download


class _Frames(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = self.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_kill_mid_download_then_rerun_completes(ref, tmp_path):
    from lib.data.download import verify_image

    data = tmp_path / "data"
    shutil.copytree(ref.data, data)
    frames = data / "train" / "images"
    gone = sorted(frames.glob("*.png"), key=lambda p: int(p.stem))[-6:]
    _Frames.files = {p.name: p.read_bytes() for p in gone}
    for p in gone:
        p.unlink()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Frames)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        coco = json.loads((data / "dataset_train.json").read_text())
        for im in coco["images"]:
            im["coco_url"] = f"http://127.0.0.1:{server.server_port}/{im['id']}.png"
        (data / "dataset_train.json").write_text(json.dumps(coco))
        a = args_for(ref, "dl", tmp_path / "out", f"data.root={data}", "prepare.download_workers=2", "prepare.download_retries=0")
        r = timed("00 killed mid-download", lambda: sub("00_prepare_data.py", ["--download", *a], kill_at="download_chunk@3"))
        assert r.returncode == -signal.SIGKILL
        assert all(verify_image(frames / p.name) for p in gone if (frames / p.name).exists())  # no half frame under a final name
        assert [p for p in frames.iterdir() if p.name.endswith(".part")]  # the frame being written when killed
        assert sum((frames / p.name).exists() for p in gone) < len(gone)
        r = timed("00 rerun with --download", lambda: sub("00_prepare_data.py", ["--download", *a]))
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr[-2000:]
    assert "partial download(s)" in r.stdout and "taking over the lock" in r.stdout
    assert not [p for p in frames.iterdir() if p.name.endswith(".part")]
    assert all((frames / p.name).read_bytes() == b for p, b in zip(gone, _Frames.files.values()))
    got = (tmp_path / "out" / "dl" / "00_prepare" / "rois.csv").read_text()
    assert got == (ref.out / "00_prepare" / "rois.csv").read_text()  # the same crops as the run that never lost a frame


# ----------------------------------------------------------------------------- lost and damaged artifacts


def test_deleted_best_pt_reruns_only_that_fold(ref, copy, caplog):
    (copy.out / "01_train" / "fold_1" / "best.pt").unlink()
    caplog.set_level(logging.INFO)
    assert timed("01 after deleting fold_1/best.pt", lambda: load_script("01_train_folds.py").main(args_for(copy))) == 0
    text = caplog.text
    assert "01_train: running (missing output: fold_1/best.pt)" in text
    assert "01_train/fold_0: up to date" in text and "01_train/fold_1: running (missing output: best.pt)" in text
    assert "training 01_train/fold_1 again from scratch" in text
    assert same_weights(copy.out / "01_train" / "fold_1" / "best.pt", ref.out / "01_train" / "fold_1" / "best.pt")
    caplog.clear()  # the retrained fold is the same bytes on CPU, so nothing downstream reruns: the loss cost one fold
    for s in STAGES[2:]:
        assert load_script(s).main(args_for(copy, None, None, "--dry-run")) == 0
    ups = [f"{n}: up to date ({copy.out / n})" for n in ("02_pseudo", "03_retrain", "04_submit")]
    assert [m for m in caplog.messages if "up to date" in m] == ups


def test_truncated_record_and_checkpoint_are_absent_with_a_warning(ref, copy, caplog):
    """A truncated fold record and last.pt: that fold trains afresh; a truncated best.pt of the other fold: it reruns too."""
    f0, f1 = copy.out / "01_train" / "fold_0", copy.out / "01_train" / "fold_1"
    for p in (f0 / "record.json", f0 / "last.pt", f1 / "best.pt"):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    caplog.set_level(logging.INFO)
    assert timed("01 after truncating 3 files", lambda: load_script("01_train_folds.py").main(args_for(copy))) == 0
    text = caplog.text
    assert f"ignoring unreadable record {f0 / 'record.json'}" in text
    assert f"ignoring unreadable checkpoint {f0 / 'last.pt'}" in text
    assert f"{f1 / 'best.pt'} is not the file its record vouches for" in text
    for k in (0, 1):
        assert same_weights(copy.out / "01_train" / f"fold_{k}" / "best.pt", ref.out / "01_train" / f"fold_{k}" / "best.pt")


def test_damaged_stage_outputs_and_caches_are_redone(ref, copy, caplog):
    """A garbage 02 record, a truncated probability cache of 04 and a truncated rois.csv."""
    from lib.core.io import cached_npz

    caplog.set_level(logging.INFO)
    (copy.out / "02_pseudo" / "record.json").write_text("{not json")
    assert load_script("02_pseudo_label.py").main(args_for(copy, None, None, "--dry-run")) == 0
    assert f"ignoring unreadable record {copy.out / '02_pseudo' / 'record.json'}" in caplog.text
    assert "02_pseudo: would run (no record)" in caplog.text
    cache = copy.out / "04_submit" / "probs" / "phase1.npz"
    cache.write_bytes(cache.read_bytes()[:50])
    arrays, hit = cached_npz(cache, "k", lambda: {"probs": np.ones(3)})
    assert not hit and np.array_equal(arrays["probs"], np.ones(3))
    assert f"ignoring unreadable cache {cache}" in caplog.text
    p = copy.out / "00_prepare" / "rois.csv"
    p.write_bytes(p.read_bytes()[:100])
    assert load_script("00_prepare_data.py").main(args_for(copy)) == 0
    assert "00_prepare: running (changed output: rois.csv)" in caplog.text
    assert f"{p} is not the file its record vouches for" in caplog.text
    assert p.read_text() == (ref.out / "00_prepare" / "rois.csv").read_text()
    caplog.clear()  # 00 made the same files again: 01 stays up to date (04 waits for the 02 whose record went bad)
    for s in ("01_train_folds.py", "04_infer_submit.py"):
        assert load_script(s).main(args_for(copy, None, None, "--dry-run")) == 0
    assert "01_train: up to date" in caplog.text and "04_submit: would run (upstream 02_pseudo, 03_retrain would run)" in caplog.text


# ----------------------------------------------------------------------------- disk full, lock held, bad config


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_names_the_file_and_loses_nothing(ref, copy, caplog):
    fold = copy.out / "01_train" / "fold_0"
    before = {p.name: p.read_bytes() for p in fold.iterdir() if p.is_file() and p.name != ".lock"}
    r = timed("01 --fold 0 on a full disk", lambda: sub("01_train_folds.py", args_for(copy, None, None, "--fold", "0", "--force"),
                                                         preexec=_file_size_limit(300_000)))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: Could not write '{fold / 'best.pt'}'") and "earlier outputs are untouched" in err
    for name in ("best.pt", "oof.npz", "last.pt"):
        assert (fold / name).read_bytes() == before[name]
    assert not temp_files(fold) and not (fold / "record.json").exists()  # voided: never mistaken for a finished run
    caplog.set_level(logging.INFO)  # with room again, the rerun finds last.pt complete: nothing to train
    assert timed("01 rerun after the full disk", lambda: load_script("01_train_folds.py").main(args_for(copy))) == 0
    assert "01_train/fold_0: last.pt is complete" in caplog.text and "01_train/fold_1: up to date" in caplog.text
    assert (fold / "best.pt").read_bytes() == before["best.pt"]


def test_second_run_of_a_stage_refuses_at_once_and_a_dead_lock_is_taken_over(ref, copy, capsys, caplog):
    from lib.core.locks import acquire_lock, release_locks

    folder = copy.out / "04_submit"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); from lib.core.locks import acquire_lock;"
                               "acquire_lock(sys.argv[1], '04_submit'); print('held', flush=True); time.sleep(300)", str(folder)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.time()
        rc = load_script("04_infer_submit.py").main(args_for(copy, None, None, "submit.decode=min_risk"))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and time.time() - t0 < 15
        assert err.startswith(f"error: 04_submit is already running in {folder} (pid {holder.pid} on ") and err.count("\n") == 0
        assert (folder / "record.json").is_file()  # the refused run touched nothing
    finally:
        holder.kill()
        holder.wait()
    caplog.set_level(logging.INFO)
    acquire_lock(folder, "04_submit")
    release_locks()
    assert "taking over the lock" in caplog.text and f"pid {holder.pid}" in caplog.text


def paused(script: str, args: list[str], at: str) -> subprocess.Popen:
    """A stage started in a fresh process that stops itself (SIGSTOP) at fault point `at`; returned once stopped."""
    p = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env={**stage_env(), "PIPELINE_PAUSE_AT": at},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return p
        time.sleep(0.2)
    p.kill()
    raise AssertionError(f"{script} never reached {at} (rc {p.wait()}): {p.stderr.read()[-2000:] if p.stderr else ''}")


def resume(p: subprocess.Popen) -> int:
    p.send_signal(signal.SIGCONT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    return p.returncode


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads a process's state from /proc")
def test_an_upstream_rerun_refuses_while_04_reads_it(ref, copy):
    """Issue 16's probe: 04 predicting (paused mid-way) and `01 --force train.lr=0.005` started beside it: 01 (and a --fold run)
    refuses with one sentence naming 04, touches nothing, and 04 ends with the probabilities of one version of the models."""
    shutil.rmtree(copy.out / "04_submit" / "probs")  # 04 computes its probabilities again, and stops before storing them
    best = {p: p.read_bytes() for p in (copy.out / "01_train").glob("fold_*/best.pt")}
    p = paused("04_infer_submit.py", args_for(copy, None, None, "--force"), at="write:phase1.npz")
    try:
        for extra in (["--force", "train.lr=0.005"], ["--fold", "0", "--force"]):
            r = timed("01 refused beside 04", lambda extra=extra: sub("01_train_folds.py", args_for(copy, None, None, *extra)))
            err = r.stderr.strip().splitlines()[-1]
            assert r.returncode == 2 and err.startswith(f"error: 01_train cannot run now: 04_submit (pid {p.pid} on "), r.stderr
            assert f"is reading {copy.out / '01_train'}; wait for that run to end" in err
        assert resume(p) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert {q: q.read_bytes() for q in best} == best  # 01 never started
    assert same_npz(copy.out / "04_submit" / "probs" / "phase1.npz", ref.out / "04_submit" / "probs" / "phase1.npz")
    assert (copy.out / "04_submit" / "submission.csv").read_bytes() == (ref.out / "04_submit" / "submission.csv").read_bytes()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads a process's state from /proc")
def test_readers_refuse_while_01_is_rewritten(ref, copy):
    """`01 --force` training (paused mid-epoch): 02, 03, 04 and the kNN on 01's models each refuse at once with one sentence
    naming the running 01 (not "record.json is missing"); once 01 is done the chain is whole again."""
    p = paused("01_train_folds.py", args_for(copy, None, None, "--force"), at="train_batch 01_train/fold_0 epoch 1")
    try:
        for script, extra in (("02_pseudo_label.py", []), ("03_retrain.py", []), ("04_infer_submit.py", []),
                              ("knn_baseline.py", ["knn.source=phase1"])):
            t0 = time.time()
            r = timed(f"{script} refused beside 01", lambda s=script, e=extra: sub(s, args_for(copy, None, None, *e)))
            err = r.stderr.strip().splitlines()[-1]
            assert r.returncode == 2 and time.time() - t0 < 60, r.stderr
            assert err.startswith(f"error: 01_train is running (pid {p.pid} on ") and "wait for it to end, then rerun" in err, err
        assert resume(p) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    for s in STAGES[2:]:  # on CPU the retrained folds are the same bytes: the rest of the chain stays up to date
        assert sub(s, args_for(copy)).returncode == 0, s


def test_missing_input_and_unknown_backbone_are_caught_before_any_work(ref, copy, capsys):
    rc = load_script("00_prepare_data.py").main(args_for(copy, "fresh", None, "data.train_json=nope.json"))
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: data.train_json '{ref.data / 'nope.json'}' does not exist; set data.root (now '{ref.data}') or data.train_json."
    assert not (copy.output_root / "fresh").exists()
    rec = (copy.out / "01_train" / "record.json").read_bytes()
    assert load_script("01_train_folds.py").main(args_for(copy, None, None, "model.backbone=resnet5O")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.backbone 'resnet5O' is not a timm model (did you mean 'resnet50'?)")
    assert (copy.out / "01_train" / "record.json").read_bytes() == rec  # the old record was not voided


def test_metric_cli_names_missing_ids(ref, tmp_path, capsys):
    from lib.decide import metric

    sol = pd.read_csv(ref.data / "solution.csv")
    sub_df = pd.read_csv(ref.out / "04_submit" / "submission.csv")
    sub_df = sub_df[sub_df["annotation_id"].isin(sol["annotation_id"])]
    sub_df.iloc[3:].to_csv(tmp_path / "sub.csv", index=False)
    sol.to_csv(tmp_path / "sol.csv", index=False)
    assert metric.main([str(tmp_path / "sol.csv"), str(tmp_path / "sub.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Cannot score: 3 solution ids missing from the submission (e.g. ") and err.count("\n") == 0
