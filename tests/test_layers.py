"""The house plan holds: lib/ in layers whose imports point one way, no module imports a script, README lists every module."""
import ast
import re
from pathlib import Path

from lib.core.paths import ROOT

# What each part of lib/ may import (besides itself), lowest first. core holds the leaves (errors, paths, io, locks,
# faults, fingerprint); views and modelref are the name grammars (TTA views, model names), leaves too; config reads
# them; pipeline (records, CLI, the stage graph) is the stage machinery over the config.
BASE = {"core", "views", "modelref", "config", "pipeline"}
ALLOWED = {
    "core": set(),
    "views": set(),
    "modelref": set(),
    "config": {"core", "views", "modelref"},
    "pipeline": {"core", "config", "modelref"},
    "data": BASE,
    "model": BASE | {"data"},
    "decide": BASE | {"data"},
    "report": BASE | {"data", "decide"},  # reports score with the metric; plots are drawn for engine's artifacts
    "engine": BASE | {"data", "model", "decide", "report"},
    "demo": BASE | {"data"},
    "kaggle": BASE | {"data", "decide"},  # a tool: checks 04's submission again (decide) against the test JSON (data)
    "doctor": BASE | {"data", "model"},  # a tool: asks the model layer which precision `auto` picks, times its Net on synthetic crops
}
MAX_LINES = 450  # a module longer than this says why in its docstring, in a line starting "Over 450 lines:"
LIB = sorted(p for p in (ROOT / "lib").rglob("*.py") if "__pycache__" not in p.parts)


def part(path: Path) -> str:
    """core, data, ... for lib/<part>/x.py; config or views for the top-level modules."""
    rel = path.relative_to(ROOT / "lib").parts
    return rel[0] if len(rel) > 1 else Path(rel[0]).stem


def imported(path: Path) -> set[str]:
    """Dotted names of every lib module (or package) imported anywhere in the file, function-level imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lib."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("lib"):
            found.update([node.module] if node.module != "lib" else [f"lib.{a.name}" for a in node.names])
            found.update(f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}"))
    return found


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def module_graph() -> dict[str, set[str]]:
    """lib module -> the lib modules it imports (a package stands for its __init__)."""
    def name(p: Path) -> str:
        rel = p.relative_to(ROOT).with_suffix("")
        return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)

    return {name(p): {m for m in imported(p) if _module_file(m)} - {name(p)} for p in LIB}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_lib_module_belongs_to_a_known_part():
    assert {part(p) for p in LIB} - {"__init__"} <= set(ALLOWED), {part(p) for p in LIB}


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_module_import_cycle():
    """No lib module reaches itself through imports, function-level imports included: a cycle dodged inside a
    function is still a cycle. A package stands for its __init__ (which may re-export its own modules)."""
    graph = module_graph()
    assert not cycles(graph), cycles(graph)


def test_long_modules_say_why():
    """A lib module over MAX_LINES lines gives its reason in its docstring ("Over 450 lines: ...")."""
    long = [p for p in LIB if len(p.read_text().splitlines()) > MAX_LINES]
    unexplained = [str(p.relative_to(ROOT)) for p in long if f"Over {MAX_LINES} lines:" not in (ast.get_docstring(ast.parse(p.read_text())) or "")]
    assert not unexplained, unexplained


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
