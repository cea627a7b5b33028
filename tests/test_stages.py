"""Record decisions: skip when unchanged, name what changed, rerun downstream, treat corrupt records as absent."""
import json
from pathlib import Path

from lib.config import load_config
from lib.stages import Stage, atomic_write_json, code_digests, compare, read_record

SCRIPT = Path(__file__).resolve().parent.parent / "01_train_folds.py"


def make(tmp_path, overrides=(), inputs=None):
    cfg = load_config("configs/demo.yaml", list(overrides))
    return Stage.create("01_train", tmp_path / "01_train", cfg, ["seed", "model", "train"], SCRIPT, inputs or {"00_prepare": "a"})


def test_new_stage_runs_then_is_up_to_date(tmp_path):
    st = make(tmp_path)
    assert st.reasons() == ["no record"]
    st.finish({"cv_distance": 1.0}, started=0)
    assert make(tmp_path).reasons() == []
    assert read_record(st.record_path)["result"] == {"cv_distance": 1.0}


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


def test_code_digests_follow_lib_imports_transitively():
    digests = code_digests(SCRIPT)
    assert "01_train_folds.py" in digests
    # 01 imports lib.train lazily inside main_; lib.train imports lib.losses, which imports lib.config.
    for mod in ("lib/train.py", "lib/losses.py", "lib/config.py", "lib/stages.py", "lib/plots.py"):
        assert mod in digests


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
