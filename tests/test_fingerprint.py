"""What decides a rerun: the meaning of the code that computes results, never infrastructure, comments or logging."""
import ast
import shutil
from pathlib import Path

import pytest

from lib.core import fingerprint
from lib.core.fingerprint import code_digests, lib_imports, meaning_digest
from lib.core.paths import ROOT
from lib.pipeline.graph import SPECS

SCRIPT = ROOT / "01_train_folds.py"


def test_digests_follow_imports_to_the_code_that_computes_results():
    digests = code_digests(SCRIPT)
    # 01 imports lib.engine.folds inside its main function; the fold loop reaches the trainer, losses, heads and net.
    for mod in ("01_train_folds.py", "lib/engine/folds.py", "lib/engine/train.py", "lib/model/losses.py", "lib/model/heads.py", "lib/model/net.py",
                "lib/data/augment.py"):
        assert mod in digests
    # Infrastructure is neither hashed nor followed.
    assert not [m for m in digests if m.startswith(("lib/core/", "lib/pipeline/", "lib/report/", "lib/config/"))]


def test_meaning_ignores_comments_docstrings_formatting_and_logging():
    base = 'def f(x):\n    """Doc."""\n    log.info("x is %s", x)\n    return x + 1\n'
    same = ['# a comment\n' + base,
            base.replace('"""Doc."""', '"""Another docstring, longer."""'),
            'def f(x):\n    log.warning("reworded %s", x)\n    print(x)\n    return (x +\n            1)  # reflowed\n',
            'def f(x):\n    return x + 1\n']
    assert {meaning_digest(s) for s in same} == {meaning_digest(base)}
    for changed in ('def f(x):\n    return x + 2\n', 'def f(x):\n    y = log.info("x")\n    return x + 1\n',
                    'def f(x, k=1):\n    return x + 1\n'):
        assert meaning_digest(changed) != meaning_digest(base)


def test_lib_imports_finds_every_form(tmp_path):
    src = ("import os\nimport lib.a\nimport lib.b as bb, numpy\nfrom lib.c import x\nfrom lib import d, e as ee\n"
           "def h():\n    from lib.i import j  # inside a function\n    import lib.k\nfrom library import z\n")
    found = lib_imports(ast.parse(src))
    assert {"lib.a", "lib.b", "lib.c", "lib.d", "lib.e", "lib.i", "lib.k"} <= found
    assert not [m for m in found if not m.startswith("lib")]


@pytest.fixture
def tree_copy(tmp_path, monkeypatch):
    """The project's code copied to tmp_path, fingerprinted there (the real checkout is never edited)."""
    for d in ("lib",):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    for spec in SPECS.values():
        shutil.copy2(ROOT / spec.script, tmp_path / spec.script)
    monkeypatch.setattr(fingerprint, "ROOT", tmp_path)
    monkeypatch.setattr("lib.core.io._cache_file", tmp_path / ".hash_cache.json")  # its own hash cache
    return tmp_path


def _all(root: Path) -> dict[str, dict[str, str]]:
    return {name: code_digests(root / spec.script) for name, spec in SPECS.items()}


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_comments_everywhere_and_plot_statements_rerun_nothing(tree_copy):
    before = _all(tree_copy)
    for p in [*tree_copy.rglob("*.py")]:
        _append(p, "\n# a comment a user appended\n")
    _append(tree_copy / "lib" / "report" / "plots.py", "\nEXTRA_DPI = 300\n")
    _append(tree_copy / "lib" / "core" / "locks.py", "\nLOCK_NOTE = 'x'\n")
    for part in ("schema", "load", "checks", "output"):  # the config's code: its defaults sit in the recorded values
        _append(tree_copy / "lib" / "config" / f"{part}.py", "\nNOTE = 1\n")
    _append(tree_copy / "lib" / "pipeline" / "graph.py", "\nGRAPH_NOTE = 1\n")
    assert _all(tree_copy) == before


def test_a_statement_in_the_losses_reruns_the_training_stages_only(tree_copy):
    before = _all(tree_copy)
    _append(tree_copy / "lib" / "model" / "losses.py", "\nDEFAULT_EPS = 1e-6\n")
    after = _all(tree_copy)
    changed = {name for name in before if before[name] != after[name]}
    assert {"01_train", "03_retrain"} <= changed
    assert "00_prepare" not in changed and "knn" not in changed


def test_how_04_blends_never_retrains_phase_2():
    """02 and 03 read out-of-fold rows and temperatures (lib.decide.oof, lib.decide.calibration) but not 04's blend code:
    a change to blending or greedy selection reruns 04 alone."""
    from lib.core.fingerprint import code_digests

    for script in ("02_pseudo_label.py", "03_retrain.py"):
        assert not {"lib/decide/blending.py", "lib/decide/weights.py"} & set(code_digests(ROOT / script)), script
    assert "lib/decide/blending.py" in code_digests(ROOT / "04_infer_submit.py")
