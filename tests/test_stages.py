"""Record decisions: skip when unchanged, name what changed, rerun downstream, treat corrupt records as absent."""
import json
from pathlib import Path

from lib.config import load_config
from lib.core.io import atomic_write_json
from lib.pipeline.records import Stage, compare, read_record

SCRIPT = Path(__file__).resolve().parent.parent / "01_train_folds.py"


def make(tmp_path, overrides=(), inputs=None):
    cfg = load_config("configs/demo.yaml", list(overrides))
    return Stage.create("01_train", tmp_path / "01_train", cfg, ["seed", "model", "train"], SCRIPT, inputs or {"00_prepare": "a"})


def test_new_stage_runs_then_is_up_to_date(tmp_path):
    st = make(tmp_path)
    assert st.reasons() == ["no record"]
    st.finish({"cv_distance": 1.0}, started=0)
    assert make(tmp_path).reasons() == []
    rec = read_record(st.record_path)
    assert rec is not None and rec["result"] == {"cv_distance": 1.0}


def test_changed_key_is_named_with_old_and_new_value(tmp_path):
    make(tmp_path, ["train.epochs=3"]).finish({}, started=0)
    assert make(tmp_path, ["train.epochs=4"]).reasons() == ["changed: train.epochs 3 -> 4"]


def test_key_outside_the_stage_sections_does_not_rerun(tmp_path):
    make(tmp_path).finish({}, started=0)
    assert make(tmp_path, ["submit.decode=argmax", "knn.k=3"]).reasons() == []


def test_upstream_change_reruns_downstream(tmp_path):
    make(tmp_path).finish({}, started=0)
    assert make(tmp_path, inputs={"00_prepare": "b"}).reasons() == ["changed input: 00_prepare"]


def test_corrupt_record_is_absent(tmp_path, caplog):
    st = make(tmp_path)
    st.dir.mkdir(parents=True)
    st.record_path.write_text('{"fingerprint": ')
    assert st.reasons() == ["no record"]
    assert "ignoring unreadable record" in caplog.text


def test_child_fold_adds_its_number(tmp_path):
    st = make(tmp_path)
    f0 = st.child("01_train/fold_0", st.dir / "fold_0", {"fold": 0})
    f0.finish({}, started=0)
    f1 = st.child("01_train/fold_1", st.dir / "fold_0", {"fold": 1})
    assert f1.reasons() == ["changed: fold 0 -> 1"]


def test_code_change_is_reported(tmp_path):
    a = {"config": {}, "code": {"lib/x.py": "1"}, "inputs": {}}
    b = {"config": {}, "code": {"lib/x.py": "2"}, "inputs": {}}
    assert compare(a, b) == ["changed code: lib/x.py"]


def test_atomic_json_replaces_whole_file(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


# ----------------------------------------------------------------------------- outputs a record vouches for


def test_record_vouches_for_its_outputs(tmp_path, caplog):
    st = make(tmp_path)
    st.outputs = ("a.bin", "b.bin")
    st.dir.mkdir(parents=True)
    (st.dir / "a.bin").write_bytes(b"1234")
    (st.dir / "b.bin").write_bytes(b"5678")
    st.finish({}, started=0)
    assert make(tmp_path).reasons() == []
    (st.dir / "a.bin").write_bytes(b"12")  # truncated
    (st.dir / "b.bin").unlink()
    assert make(tmp_path).reasons() == ["changed output: a.bin", "missing output: b.bin"]
    assert f"{st.dir / 'a.bin'} is not the file its record vouches for" in caplog.text


def test_same_size_corruption_is_caught_by_the_hash(tmp_path):
    import os

    st = make(tmp_path)
    st.outputs = ("a.bin",)
    st.dir.mkdir(parents=True)
    (st.dir / "a.bin").write_bytes(b"1234")
    st.finish({}, started=0)
    before = (st.dir / "a.bin").stat().st_mtime_ns
    (st.dir / "a.bin").write_bytes(b"1235")
    os.utime(st.dir / "a.bin", ns=(before, before + 10**9))  # file clocks tick coarsely: make the rewrite visibly later
    assert make(tmp_path).reasons() == ["changed output: a.bin"]


def test_stage_record_relies_on_its_fold_records(tmp_path):
    from lib.pipeline.graph import fold_records

    st = make(tmp_path)
    st.sub_records = fold_records
    for k in (0, 1):
        f = st.child(f"01_train/fold_{k}", st.dir / f"fold_{k}", {"fold": k}, outputs=("best.pt",))
        f.dir.mkdir(parents=True)
        (f.dir / "best.pt").write_bytes(b"w")
        f.finish({}, started=0)
    st.finish({"folds": 2}, started=0)
    assert st.reasons() == []
    (st.dir / "fold_1" / "best.pt").unlink()
    assert st.reasons() == ["missing output: fold_1/best.pt"]
    (st.dir / "fold_0" / "record.json").unlink()
    assert st.reasons() == ["missing output: fold_0/record.json", "missing output: fold_1/best.pt"]


def test_record_that_is_json_but_not_a_record_is_absent(tmp_path, caplog):
    st = make(tmp_path)
    st.dir.mkdir(parents=True)
    for text in ('[1, 2]', '{"fingerprint": 3}', '{"fingerprint": {}, "outputs": []}', "\x00\x01"):
        st.record_path.write_text(text)
        assert st.reasons() == ["no record"]
    assert caplog.text.count("ignoring unreadable record") == 4


# ----------------------------------------------------------------------------- write errors


def test_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno
    import os

    import pytest

    from lib.core.errors import StageError
    from lib.core.io import atomic_path, atomic_write_text

    p = tmp_path / "submission.csv"
    atomic_write_text(p, "old\n")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StageError, match=rf"Could not write '{p}' \(No space left on device \[errno 28\]; \d+ MiB free there\)"):
        atomic_write_text(p, "new\n")
    with pytest.raises(StageError, match=rf"Could not write '{tmp_path / 'x.npz'}'"):
        with atomic_path(tmp_path / "x.npz") as tmp:
            tmp.write_bytes(b"data")
    assert p.read_text() == "old\n" and sorted(x.name for x in tmp_path.iterdir()) == ["submission.csv"]


def test_write_into_a_file_as_folder_is_one_sentence(tmp_path):
    import pytest

    from lib.core.errors import StageError
    from lib.core.io import atomic_write_json

    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(StageError, match=r"Could not write '.*blocker/r.json' \(File exists"):
        atomic_write_json(tmp_path / "blocker" / "r.json", {})


def test_temp_files_of_killed_runs_are_swept(tmp_path):
    from lib.core.io import remove_temp_files

    (tmp_path / "fold_0").mkdir()
    for name in (".best.tmp-abc.pt", ".record.json.x1.tmp", "fold_0/.oof.tmp-z.npz", "best.pt", ".lock"):
        (tmp_path / name).write_text("x")
    assert remove_temp_files(tmp_path) == 3
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [".lock", "best.pt"]


# ----------------------------------------------------------------------------- locks and fault points

HOLD = ("import sys, time; sys.path.insert(0, '.'); from lib.core.locks import acquire_lock; "
        "acquire_lock(sys.argv[1], 'st', shared=sys.argv[2] == 'shared'); print('held', flush=True); time.sleep(300)")


def _holder(folder, mode="exclusive"):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], cwd=SCRIPT.parent, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_lock_refuses_a_second_run_and_dead_runs_release_it(tmp_path, caplog):
    import logging

    import pytest

    from lib.core.errors import StageLocked
    from lib.core.locks import acquire_lock, release_locks

    p = _holder(tmp_path)
    try:
        with pytest.raises(StageLocked, match=rf"st is already running in {tmp_path} \(pid {p.pid} on .*\); wait for that run"):
            acquire_lock(tmp_path, "st")
        with pytest.raises(StageLocked):
            acquire_lock(tmp_path, "st", shared=True)  # a --fold run never runs beside a whole-stage run
    finally:
        p.kill()  # kill -9: the kernel drops the lock, the owner note stays
        p.wait()
    caplog.set_level(logging.INFO)
    acquire_lock(tmp_path, "st")
    acquire_lock(tmp_path, "st")  # re-entrant
    assert f"taking over the lock in {tmp_path}" in caplog.text and f"pid {p.pid}" in caplog.text
    release_locks()
    assert (tmp_path / ".lock").read_text() == ""  # a clean release leaves no note


def test_fold_runs_share_the_stage_lock(tmp_path):
    import pytest

    from lib.core.errors import StageLocked
    from lib.core.locks import acquire_lock, release_locks

    p = _holder(tmp_path, "shared")
    try:
        acquire_lock(tmp_path, "st", shared=True)  # another --fold run: fine
        release_locks()
        with pytest.raises(StageLocked, match=r"\(--fold runs\)"):
            acquire_lock(tmp_path, "st")
    finally:
        p.kill()
        p.wait()


READ = ("import sys, time; sys.path.insert(0, '.'); from lib.core.locks import acquire_read_lock; "
        "acquire_read_lock(sys.argv[1], 'up', '04_submit'); print('held', flush=True); time.sleep(300)")
WRITE = ("import sys, time; sys.path.insert(0, '.'); from lib.core.locks import acquire_lock; "
         "acquire_lock(sys.argv[1], 'up', shared=sys.argv[2] == 'shared', readers=True); print('held', flush=True); time.sleep(300)")


def _run_holder(code, *args):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=SCRIPT.parent, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_a_reader_keeps_every_writer_of_its_upstream_out_and_readers_share(tmp_path):
    """A downstream stage reading `up`: a whole-stage run and a --fold run of `up` refuse, naming the reader; other readers share."""
    import pytest

    from lib.core.errors import StageLocked
    from lib.core.locks import acquire_lock, acquire_read_lock, release_locks

    p = _run_holder(READ, tmp_path)
    try:
        for shared in (False, True):
            with pytest.raises(StageLocked, match=rf"^up cannot run now: 04_submit \(pid {p.pid} on .*\) is reading {tmp_path}; wait"):
                acquire_lock(tmp_path, "up", shared=shared, readers=True)
        acquire_read_lock(tmp_path, "up", "02_pseudo")  # another reader: fine
        release_locks()
    finally:
        p.kill()  # kill -9: the kernel drops the read lock; its note is swept by the next writer
        p.wait()
    acquire_lock(tmp_path, "up", readers=True)
    assert not list((tmp_path / ".readers").glob("*.json"))
    release_locks()


def test_a_reader_refuses_while_its_upstream_is_written_and_fold_runs_share(tmp_path):
    """A writer of `up` (whole stage or --fold runs) running: a reader refuses with one sentence naming it, not 'record missing'."""
    import pytest

    from lib.core.errors import StageLocked
    from lib.core.locks import acquire_lock, acquire_read_lock, release_locks

    p = _run_holder(WRITE, tmp_path, "exclusive")
    try:
        with pytest.raises(StageLocked, match=rf"^up is running \(pid {p.pid} on .*\) in {tmp_path}; wait for it to end, then rerun 04"):
            acquire_read_lock(tmp_path, "up", "04_submit")
    finally:
        p.kill()
        p.wait()
    p = _run_holder(WRITE, tmp_path, "shared")
    try:
        acquire_lock(tmp_path, "up", shared=True, readers=True)  # fold runs side by side
        release_locks()
        with pytest.raises(StageLocked, match=r"^up has --fold runs going in .*; wait for them to end, then rerun 04_submit\.$"):
            acquire_read_lock(tmp_path, "up", "04_submit")
    finally:
        p.kill()
        p.wait()
    acquire_read_lock(tmp_path, "up", "04_submit")  # the writers gone: reading is fine
    release_locks()
    assert not list((tmp_path / ".readers").glob("*.json"))  # a clean release removes the reader's note


def test_a_file_is_loaded_only_as_its_record_vouches(tmp_path):
    """A checkpoint or npz replaced after its record was written (another run, a copy) is one sentence at load, never used."""
    import pytest

    from lib.core.errors import StageError
    from lib.pipeline.graph import check_vouched
    from lib.pipeline.records import Stage

    fold = tmp_path / "01_train" / "fold_1"
    fold.mkdir(parents=True)
    (fold / "best.pt").write_bytes(b"model A")
    with pytest.raises(StageError, match=r"best.pt cannot be loaded \(no record.json beside it: .*\); rerun 01_train_folds.py"):
        check_vouched(fold / "best.pt")
    st = Stage(name="01_train/fold_1", dir=fold, fingerprint={"config": {}}, outputs=("best.pt",))
    st.finish({}, 0.0)
    check_vouched(fold / "best.pt")
    (fold / "best.pt").write_bytes(b"model B, retrained")
    with pytest.raises(StageError, match=r"it is not the file its record.json vouches for \(18 bytes, recorded 7\)\); rerun 01_train"):
        check_vouched(fold / "best.pt")
    with pytest.raises(StageError, match=r"its record.json does not vouch for it"):
        check_vouched(fold / "oof.npz")


def test_run_cli_releases_the_lock_even_on_a_crash(tmp_path):
    import pytest

    from lib.core.locks import _locks, acquire_lock
    from lib.pipeline.cli import run_cli, stage_parser

    def run(args, cfg):
        acquire_lock(tmp_path, "st")
        raise KeyError("boom")

    with pytest.raises(KeyError):
        run_cli(run, stage_parser("x"), ["--config", "configs/demo.yaml"])
    assert not _locks and (tmp_path / ".lock").read_text() == ""


def test_run_cli_turns_an_os_error_into_one_line(tmp_path, capsys):
    from lib.pipeline.cli import run_cli, stage_parser

    def run(args, cfg):
        open(tmp_path / "missing" / "x.csv")

    assert run_cli(run, stage_parser("x"), ["--config", "configs/demo.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: No such file or directory on '{tmp_path / 'missing' / 'x.csv'}'; check that path (disk space, permissions), then rerun."


def test_fault_point_kills_at_the_nth_visit(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, '.'); from lib.core.faults import fault_point\n"
            "for i in range(5):\n    print(i, flush=True); fault_point('here')")
    r = subprocess.run([sys.executable, "-c", code], cwd=SCRIPT.parent, capture_output=True, text=True,
                       env={**os.environ, "PIPELINE_KILL_AT": "here@3"})
    assert r.returncode == -signal.SIGKILL and r.stdout.split() == ["0", "1", "2"]


def test_model_names_are_parsed_in_one_place(tmp_path):
    import pytest

    from lib.config import ConfigError
    from lib.modelref import ModelRef
    from lib.pipeline.graph import member_folds, member_result

    assert ModelRef.parse("phase1") == ModelRef("phase1", "phase1") and ModelRef.parse("phase1").stage == "01_train"
    assert ModelRef.parse("phase2").stage == "03_retrain" and ModelRef.parse("phase2").round is None
    assert ModelRef.parse("round3") == ModelRef("round3", "round", 3) and ModelRef.parse("round3").stage == "03_retrain"
    for bad in ("round", "roundx", "phase3"):
        with pytest.raises(ValueError):
            ModelRef.parse(bad)
    cfg = load_config("configs/demo.yaml", [f"output_root={tmp_path}", "exp=e", "pseudo.rounds=2"])
    atomic_write_json(cfg.out_dir / "03_retrain" / "record.json", {"fingerprint": {}, "result": {
        "folds": 2, "fold_root": "round_2", "cv_distance": 2.0, "per_round": [{"cv_distance": 3.0}, {"cv_distance": 2.0}]}})
    ref = ModelRef.parse
    assert member_folds(cfg, ref("round1")) == [cfg.out_dir / "03_retrain" / "." / f"fold_{k}" for k in (0, 1)]
    assert member_folds(cfg, ref("round2")) == member_folds(cfg, ref("phase2"))
    assert member_result(cfg, ref("round1")) == {"cv_distance": 3.0} and member_result(cfg, ref("phase2"))["cv_distance"] == 2.0
    with pytest.raises(ConfigError, match="round<r> with r from 1 to pseudo.rounds"):
        load_config("configs/demo.yaml", ["submit.models=[phase1, round3]", "pseudo.rounds=2"])


def test_cv_summaries_write_the_record_keys_in_order():
    from lib.engine.results import CVSummary, RoundResult, SelfTraining

    cv = CVSummary(1.5, 0.5, 2, 10, 1.4, 0.1)
    assert list(cv.to_record()) == ["cv_distance", "cv_top1", "folds", "oof_rows", "fold_distance_mean", "fold_distance_std"]
    tl = CVSummary(1.5, 0.5, 2, 10, 1.4, 0.1, 2.5, 0.4)
    assert list(tl.to_record())[-2:] == ["cv_distance_testlike", "cv_top1_testlike"]
    rec = SelfTraining((RoundResult(cv, 7), RoundResult(tl, 9)), "round_2").to_record()
    assert rec == {**tl.to_record(), "pseudo_rows": 9, "rounds": 2, "fold_root": "round_2",
                   "per_round": [{"cv_distance": 1.5, "cv_top1": 0.5, "pseudo_rows": 7},
                                 {"cv_distance": 1.5, "cv_top1": 0.5, "cv_distance_testlike": 2.5, "cv_top1_testlike": 0.4, "pseudo_rows": 9}]}
