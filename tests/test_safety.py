"""Safety: no pickle from disk, safe YAML, no shell, JSON file names and ids kept in their folder, http(s)-only downloads."""
from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from lib.core.errors import StageError
from lib.data.coco import frame_path, read_coco, safe_file_name

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for p in ROOT.rglob("*.py") if not {".venv", "output", "input", ".git"} & set(p.relative_to(ROOT).parts))


def calls(name: str):
    """(file, line, call node) of every call to `name` (a dotted suffix such as 'torch.load') in the project's sources."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func == name or func.endswith("." + name):
                    yield path, node.lineno, node


def kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key:
            return ast.unparse(k.value)
    return None


def test_sources_were_found():
    assert len(SOURCES) > 40 and ROOT / "lib" / "pipeline" / "records.py" in SOURCES


def test_the_linter_enforces_the_security_rules():
    """Shell commands (S602/S604/S605), unsafe YAML (S506), pickle (S301/S403), eval/exec (S307/S102): ruff's
    security rules, run by `make test` (make lint) over every source file, replace the source scans that were here."""
    import tomllib

    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "S" in lint["select"]
    kept = {"S602", "S604", "S605", "S506", "S301", "S403", "S307", "S102"}
    off = set(lint.get("ignore", [])) | {c for v in lint.get("per-file-ignores", {}).values() for c in v}
    assert not kept & off


def test_every_torch_load_is_weights_only():
    """No linter rule covers torch.load's pickle: every call passes weights_only=True."""
    found = list(calls("torch.load"))
    assert found
    bad = [f"{p.relative_to(ROOT)}:{line}" for p, line, n in found if kw(n, "weights_only") != "True"]
    assert not bad, bad


def test_no_numpy_load_allows_pickle():
    bad = [f"{p.relative_to(ROOT)}:{line}" for p, line, n in calls("np.load") if kw(n, "allow_pickle") == "True"]
    assert not bad, bad


class NeedsPickle:
    """Any object but tensors and plain containers needs pickle to load."""

    def __init__(self):
        self.weights = torch.zeros(2)


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/pwned_by_checkpoint",))


@pytest.mark.parametrize("obj", [{"model": NeedsPickle(), "epoch": 1}, {"model": Evil()}])
def test_checkpoint_that_needs_pickle_is_refused(tmp_path, obj, caplog):
    from lib.engine.resume import try_resume
    from lib.model.checkpoint import load_checkpoint
    from lib.model.net import load_state_file

    p = tmp_path / "best.pt"
    torch.save(obj, p)
    Path("/tmp/pwned_by_checkpoint").unlink(missing_ok=True)
    with pytest.raises(StageError, match=rf"Checkpoint '{p}' cannot be loaded safely \(UnpicklingError\); delete it"):
        load_checkpoint(p)
    with pytest.raises(StageError, match=rf"Weights file '{p}' cannot be loaded safely"):
        load_state_file(p)
    caplog.set_level(logging.INFO)
    assert try_resume(p, "digest") is None and f"ignoring unreadable checkpoint {p}" in caplog.text
    assert not Path("/tmp/pwned_by_checkpoint").exists()


@pytest.mark.parametrize("name,base", [("12.png", "12.png"), ("sub/12.png", "12.png"), ("../12.png", None), ("/etc/passwd", None),
                                       ("a/../../x.png", None), ("..\\..\\x.png", None), ("..", None), ("", None),
                                       ("C:\\frames\\x.png", "x.png")])
def test_file_names_from_json_never_leave_their_folder(tmp_path, name, base):
    assert safe_file_name(name) == base
    folder = tmp_path / "images"
    folder.mkdir()
    (tmp_path / "x.png").write_bytes(b"bait")
    (tmp_path / "12.png").write_bytes(b"bait")
    found = frame_path(folder, 999, name)
    assert found is None or found.parent == folder


def test_ids_that_are_not_integers_never_name_a_file(tmp_path, caplog):
    coco = {"images": [{"id": 1, "file_name": "1.png"}, {"id": "../../up", "file_name": "x.png"}],
            "annotations": [{"id": 5, "image_id": 1, "bbox": [0, 0, 4, 4]}, {"id": "../../../evil", "image_id": 1, "bbox": [0, 0, 4, 4]},
                            {"id": True, "image_id": 1, "bbox": [0, 0, 4, 4]}, {"id": 7.0, "image_id": 1, "bbox": [0, 0, 4, 4]}],
            "categories": []}
    (tmp_path / "d.json").write_text(json.dumps(coco))
    c = read_coco(tmp_path / "d.json")
    assert c.annotations["id"].tolist() == [5, 7] and c.images["id"].tolist() == [1]
    assert [b["annotation_id"] for b in c.bad_ids] == ["../../../evil", "True"]
    assert "left out 2 annotation(s) and 1 image(s) whose id is not an integer" in caplog.text


def test_downloads_are_http_only_capped_and_timed():
    """The download's own tests (tests/test_download.py) exercise each against a local server; here, that they exist."""
    text = (ROOT / "tests" / "test_download.py").read_text()
    for test in ("test_non_http_refused_without_request", "test_redirects_only_to_http", "test_size_cap",
                 "test_timeout_and_refused_connection_are_retried"):
        assert re.search(rf"def {test}\(", text), test
    from lib.data.prepare import check_frames

    src = Path(check_frames.__code__.co_filename).read_text()
    assert "timeout=p.download_timeout" in src  # the stage passes the configured timeout; max_bytes keeps its 64 MiB cap
