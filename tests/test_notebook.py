"""notebooks/kaggle_fathomnet2025.ipynb: its jupytext pair, its helpers (lib.kaggle.notebook), and a headless run of it.

The run (slow) executes the notebook with nbclient on the tiny demo of tests/test_pipeline.py, its
parameters pointed at temp folders and its own working directory elsewhere than the repository.
"""
import json
import os
import sys
from pathlib import Path

import pytest

from lib.kaggle import notebook as nb

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "kaggle_fathomnet2025.ipynb"
PAIR = NOTEBOOK.with_suffix(".py")
TINY = ["demo.per_class=3", "demo.test_per_class=1", "demo.frame_width=160", "demo.frame_height=120", "prepare.n_folds=2",
        "prepare.crop_size=32", "prepare.workers=1", "model.img_size=32", "knn.img_size=32", "train.epochs=1", "train.batch_size=64",
        "pseudo.threshold=0.0"]


def cells(notebook):
    return [(c.cell_type, c.source.strip(), list(c.metadata.get("tags", []))) for c in notebook.cells]


def test_the_notebook_and_its_py_pair_hold_the_same_cells():
    """Review the .py, run the .ipynb: `jupytext --sync notebooks/kaggle_fathomnet2025.py` after editing either."""
    import jupytext
    import nbformat

    ipynb, py = nbformat.read(NOTEBOOK, as_version=4), jupytext.read(PAIR)
    assert cells(ipynb) == cells(py)
    assert ipynb.metadata["kernelspec"]["name"] == "python3"


def test_parameters_come_first_and_no_outputs_are_stored():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    for name in ("REPO_DIR", "CONFIG", "DATA_ROOT", "OUTPUT_ROOT", "OVERRIDES", "OFFLINE", "WHEELS_DIR", "RESUME_FROM"):
        assert f"\n{name}" in "\n" + code[0].source, name
    assert all(not c.outputs and c.execution_count is None for c in code)


def test_runtime_requirements_leave_out_comments_and_the_dev_tools():
    text = "# runtime\ntorch>=2.1\ntimm>=1.0,<2  # models\nPyYAML>=6\n\n# tests\npytest>=8\nruff>=0.6\nmypy>=1.10\nnbclient>=0.10\njupytext\n"
    assert nb.runtime_requirements(text) == ["torch>=2.1", "timm>=1.0,<2", "PyYAML>=6"]
    assert "pytest>=8" not in nb.runtime_requirements((ROOT / "requirements.txt").read_text())


def test_offline_pip_never_reaches_for_the_network(tmp_path):
    cmd = nb.pip_command(tmp_path / "r.txt", "/kaggle/input/wheels")
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and cmd[-3:] == ["--no-index", "--find-links", "/kaggle/input/wheels"]
    assert "--no-index" not in nb.pip_command(tmp_path / "r.txt", None)
    with pytest.raises(nb.NotebookError, match="WHEELS_DIR '/nowhere' is not a folder; attach a wheels dataset"):
        nb.install(ROOT, offline=True, wheels_dir="/nowhere")


def test_relay_passes_output_through_and_returns_the_exit_code(tmp_path, capsys):
    code = "import os, sys; print(os.getcwd()); sys.stderr.write('bar 1/2\\rbar 2/2\\n'); sys.exit(3)"
    assert nb.relay([sys.executable, "-c", code], cwd=tmp_path) == 3
    assert capsys.readouterr().out == f"{tmp_path}\nbar 1/2\rbar 2/2\n"  # stderr too, carriage returns kept (progress bars)


def test_a_failing_command_stops_with_one_sentence(tmp_path):
    (tmp_path / "fails.py").write_text("import sys; sys.exit(2)\n")
    with pytest.raises(nb.NotebookError, match=r"^fails.py stopped \(exit 2, its message is above\); .* finished stages and folds are kept"):
        nb.Run(tmp_path, "c.yaml", ()).stage("fails.py")


def test_doctor_is_optional_but_its_fatal_problems_stop_the_notebook(tmp_path, capsys):
    run = nb.Run(tmp_path, "c.yaml", ())
    assert run.doctor() is False
    assert "no lib.doctor" in capsys.readouterr().out
    (tmp_path / "lib" / "doctor").mkdir(parents=True)
    (tmp_path / "lib" / "__init__.py").write_text("")
    (tmp_path / "lib" / "doctor" / "__init__.py").write_text("")
    (tmp_path / "lib" / "doctor" / "__main__.py").write_text("import sys; print('gpu: none', sys.argv[1:]); sys.exit(1)\n")
    with pytest.raises(nb.NotebookError, match=r"^lib.doctor found a fatal problem \(exit 1, each one named above\); fix it"):
        run.doctor("--time")
    assert f"gpu: none ['--config', '{tmp_path / 'c.yaml'}', '--time']" in capsys.readouterr().out
    (tmp_path / "lib" / "doctor" / "__main__.py").write_text("print('all well')\n")
    assert run.doctor() is True


def test_resume_copies_an_earlier_session_without_overwriting_this_one(tmp_path):
    old = tmp_path / "input" / "prev" / "output" / "x"  # a notebook version's output: <name>/output/<exp>
    (old / "01_train" / "fold_0").mkdir(parents=True)
    (old / "01_train" / "fold_0" / "last.pt").write_text("old")
    (old / "00_prepare").mkdir()
    (old / "00_prepare" / "record.json").write_text("old")
    (old / "00_prepare" / "record.json").chmod(0o444)  # attached datasets are read-only
    new = tmp_path / "working" / "output" / "x" / "00_prepare"
    new.mkdir(parents=True)
    (new / "record.json").write_text("new")
    assert nb.resume(tmp_path / "input" / "prev", tmp_path / "working" / "output", "x") == 1
    assert (new / "record.json").read_text() == "new"
    copied = tmp_path / "working" / "output" / "x" / "01_train" / "fold_0" / "last.pt"
    assert copied.read_text() == "old" and os.access(copied, os.W_OK)
    with pytest.raises(nb.NotebookError, match="holds no folder 'y'"):
        nb.resume(tmp_path / "input" / "prev", tmp_path / "working" / "output", "y")


def test_frames_to_download_go_to_a_writable_copy_of_a_read_only_data_root(tmp_path, monkeypatch):
    given, writable = tmp_path / "input" / "comp", tmp_path / "working" / "data"
    given.mkdir(parents=True)
    (given / "dataset_test.json").write_text("{}")
    assert nb.data_root(given, download=False, writable=writable) == given
    monkeypatch.setattr(nb.os, "access", lambda path, mode: False)  # as /kaggle/input (root could write anywhere here)
    assert nb.data_root(given, download=True, writable=writable) == writable
    assert (writable / "dataset_test.json").read_text() == "{}"


def fake_kaggle(tmp_path, monkeypatch):
    """A kaggle CLI that records its arguments, first on the PATH the notebook's kernel inherits, with a token set."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "kaggle_calls.jsonl"
    bin_dir.mkdir()
    (bin_dir / "kaggle").write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (bin_dir / "kaggle").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    return calls


def execute(tmp_path, params):
    """The notebook with `params` injected after its parameters cell (as papermill does), run headless in tmp_path/elsewhere."""
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    try:
        nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        nbformat.write(notebook, tmp_path / "executed.ipynb")  # kept for a look when it fails
    return notebook, cwd


@pytest.mark.slow
def test_the_notebook_runs_every_stage_headless_on_the_tiny_demo(tmp_path, monkeypatch):
    calls = fake_kaggle(tmp_path, monkeypatch)
    monkeypatch.setenv("PIPELINE_FOLD_PROCESSES", "2")  # 01 and 03 fold-parallel, as on Kaggle's two T4s, on the CPU
    params = {"REPO_DIR": str(ROOT), "CONFIG": "configs/demo.yaml", "DATA_ROOT": str(tmp_path / "data"), "OUTPUT_ROOT": str(tmp_path / "out"),
              "OVERRIDES": ["exp=tiny", *TINY], "INSTALL": False, "MAKE_DEMO": True,
              "SUBMISSION_OUT": str(tmp_path / "working" / "submission.csv"), "UPLOAD": True}
    notebook, cwd = execute(tmp_path, params)
    exp = tmp_path / "out" / "tiny"
    assert (tmp_path / "working" / "submission.csv").read_bytes() == (exp / "04_submit" / "submission.csv").read_bytes()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for said in ("01_train", "03_retrain", "knn", "phase 1 CV distance", "precision           train.precision auto picks", "uploaded; logged in"):
        assert said in text, said
    assert "\r" in text  # the stages' progress bars came through
    for stage in ("01_train", "03_retrain"):  # each fold in its own process, the record written by the parent
        assert f"{stage}: 2 folds over 2 processes" in text and f"[gpu 1] {stage}/fold_1: val distance" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2 + 2 + 1  # 01's and 03's two folds' curves, the UMAP
    assert any("# Submission report: tiny" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    [argv] = [json.loads(line) for line in calls.read_text().splitlines()]
    assert argv[:4] == ["competitions", "submit", "-c", "fathomnet-2025"] and argv[7].startswith("tiny: phase1 + phase2")
    assert len((exp / "submissions.csv").read_text().splitlines()) == 2
    assert not any(cwd.iterdir())  # every path the notebook hands on is absolute: nothing lands in its own directory


def test_kaggle_requirements_are_requirements_txt_without_the_images_own_packages():
    kaggle = nb.runtime_requirements((ROOT / nb.KAGGLE_REQUIREMENTS).read_text())
    names = [nb.requirement_name(r) for r in kaggle]
    assert not set(names) & {"torch", "torchvision", "torchaudio", "numpy", "opencv-python", "opencv-python-headless",
                             "opencv-contrib-python"}
    assert not any(n.startswith(("torch", "numpy", "opencv")) for n in names)
    full = nb.runtime_requirements((ROOT / "requirements.txt").read_text())
    assert kaggle == [r for r in full if nb.requirement_name(r) not in nb.IMAGE_KEEPS]  # the same lines, in sync


def test_versions_are_checked_against_specifiers_without_packaging():
    for version, spec, ok in (("2.3.0+cu121", ">=2.1", True), ("1.26.4", ">=1.24", True), ("1.23.5", ">=1.24", False),
                              ("2.0.8", ">=2.0,<2.1", True), ("2.1.0", ">=2.0,<2.1", False), ("0.1.0", "==0.1.0", True),
                              ("1.0.31", ">=1.0,<2", True), ("2.0rc1", "<2", False), ("1.4.2", "~=1.4", True), ("2.0", "~=1.4", False)):
        assert nb.satisfies(version, spec) is ok, (version, spec)
    reqs = "torch>=2.1\nnumpy>=1.24\ntimm>=1.0,<2\n"
    assert nb.image_problems(reqs, {"torch": "2.5.1", "numpy": "2.0.2"}) == []
    assert nb.image_problems(reqs, {"torch": "2.0.1", "numpy": "2.0.2"}) == [
        "The image's torch 2.0.1 does not meet requirements.txt's >=2.1; pick a newer Kaggle environment (Settings > Environment > "
        "Always use latest) rather than upgrading it in the notebook."]
    assert nb.image_constraints({"numpy": "1.26.4", "torch": "2.5.1+cu121", "timm": "1.0"}) == ["torch==2.5.1+cu121", "numpy==1.26.4"]


def test_install_pins_the_images_torch_numpy_and_opencv_with_a_constraints_file(tmp_path, monkeypatch, capsys):
    seen: dict = {}

    def fake_relay(cmd, cwd):
        seen["cmd"], seen["cwd"] = list(cmd), cwd
        seen["reqs"] = Path(cmd[cmd.index("-r") + 1]).read_text().split()
        seen["pins"] = Path(cmd[cmd.index("-c") + 1]).read_text().split() if "-c" in cmd else None
        return 0

    image = {"torch": "2.5.1+cu121", "torchvision": "0.20.1+cu121", "numpy": "1.26.4", "opencv-python": "4.10.0.84"}
    monkeypatch.setattr(nb, "relay", fake_relay)
    monkeypatch.setattr(nb, "installed_versions", lambda names: {n: v for n, v in image.items() if n in names})
    nb.install(ROOT, offline=False, wheels_dir="/unused")
    cmd = seen["cmd"]
    assert cmd[:7] == [sys.executable, "-m", "pip", "install", "-q", "-r", cmd[6]] and cmd[7] == "-c" and len(cmd) == 9
    assert seen["pins"] == ["torch==2.5.1+cu121", "torchvision==0.20.1+cu121", "numpy==1.26.4", "opencv-python==4.10.0.84"]
    assert seen["reqs"] == nb.runtime_requirements((ROOT / nb.KAGGLE_REQUIREMENTS).read_text()) and seen["cwd"] == ROOT
    assert "the image's torch==2.5.1+cu121, torchvision==0.20.1+cu121, numpy==1.26.4, opencv-python==4.10.0.84 kept" in capsys.readouterr().out
    (tmp_path / "wheels").mkdir()
    nb.install(ROOT, offline=True, wheels_dir=str(tmp_path / "wheels"))
    assert seen["cmd"][7:] == ["-c", seen["cmd"][8], "--no-index", "--find-links", str(tmp_path / "wheels")]
    nb.install(ROOT, offline=False, wheels_dir="/unused", keep_image=False)  # the plain route: requirements.txt, nothing pinned
    assert seen["pins"] is None and "torch>=2.1" in seen["reqs"]
    image["numpy"] = "1.21.0"
    with pytest.raises(nb.NotebookError, match=r"^The image's numpy 1.21.0 does not meet requirements.txt's >=1.24; pick a newer"):
        nb.install(ROOT, offline=False, wheels_dir="/unused")
    image["numpy"] = "1.26.4"
    monkeypatch.setattr(nb, "relay", lambda cmd, cwd: 1)
    with pytest.raises(nb.NotebookError, match=r"pip could not install requirements-kaggle.txt \(exit 1, its message is above\) \(it may "
                                               r"not change the image's torch==2.5.1\+cu121, .*turn the notebook's internet on"):
        nb.install(ROOT, offline=False, wheels_dir="/unused")
