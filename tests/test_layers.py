"""The house plan holds: lib/ in layers whose imports point one way, no module imports a script, README lists every module."""
import ast
import re
from pathlib import Path

from lib.core.paths import ROOT

# What each part of lib/ may import (besides itself). Foundation (core, config, views) is one
# layer: config raises core's UserError and the stage graph reads the config.
FOUNDATION = {"core", "config", "views"}
ALLOWED = {
    "core": FOUNDATION,
    "config": FOUNDATION,
    "views": set(),
    "data": FOUNDATION,
    "model": FOUNDATION | {"data"},
    "decide": FOUNDATION | {"data"},
    "report": FOUNDATION | {"data", "decide"},  # reports score with the metric; plots are drawn for engine's artifacts
    "engine": FOUNDATION | {"data", "model", "decide", "report"},
    "demo": FOUNDATION | {"data"},
    "kaggle": FOUNDATION | {"data", "decide"},  # a tool: checks 04's submission again (decide) against the test JSON (data)
    "doctor": FOUNDATION | {"model"},  # a tool: it asks the model layer which precision `auto` picks
}
LIB = sorted(p for p in (ROOT / "lib").rglob("*.py") if "__pycache__" not in p.parts)


def part(path: Path) -> str:
    """core, data, ... for lib/<part>/x.py; config or views for the top-level modules."""
    rel = path.relative_to(ROOT / "lib").parts
    return rel[0] if len(rel) > 1 else Path(rel[0]).stem


def imported(path: Path) -> set[str]:
    """Dotted names of every lib module (or package) imported anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lib."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("lib"):
            found.update([node.module] if node.module != "lib" else [f"lib.{a.name}" for a in node.names])
    return found


def test_every_lib_module_belongs_to_a_known_part():
    assert {part(p) for p in LIB} - {"__init__"} <= set(ALLOWED), {part(p) for p in LIB}


def test_no_import_runs_upward():
    bad = []
    for p in LIB:
        src = part(p)
        for mod in imported(p):
            dst = mod.split(".")[1]
            if dst != src and dst not in ALLOWED.get(src, set()):
                bad.append(f"{p.relative_to(ROOT)} imports {mod} ({src} -> {dst})")
    assert not bad, "\n".join(bad)


def test_no_lib_module_imports_a_script():
    scripts = {p.stem for p in ROOT.glob("*.py")} | {p.stem for p in (ROOT / "scripts").glob("*.py")}
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in LIB for m in imported(p) if m.split(".")[-1] in scripts]
    bad += [str(p.relative_to(ROOT)) for p in LIB if "spec_from_file_location" in p.read_text()]
    assert not bad, bad


def test_readme_layout_names_every_lib_module_and_benchmark():
    """The README's layout lists every lib package and module, every benchmark and scripts/ablate.py."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout.split("\n## ")[1 if layout.startswith("\n") else 0]
    missing = [str(p.relative_to(ROOT / "lib")) for p in LIB if p.name not in ("__init__.py", "__main__.py")
               and not re.search(rf"\b{re.escape(p.stem)}\b", layout)]
    missing += [p.name for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in layout]
    missing += [p.name for p in (ROOT / "scripts").iterdir() if p.suffix in (".py", ".sh") and p.name not in layout]
    missing += [d.name + "/" for d in (ROOT / "lib").iterdir() if d.is_dir() and d.name != "__pycache__" and f"{d.name}/" not in layout]
    assert not missing, f"README's layout does not mention: {missing}"
