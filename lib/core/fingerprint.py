"""The code digest of a stage: the meaning of the code that computes its results, nothing else.

A stage's record holds one digest per source file it runs: its script and every `lib` module the
script reaches through imports (function-level imports included), transitively. Two rules keep
that to what changes results:

- Infrastructure never decides a rerun: `lib/core/` (io, locks, paths, errors, this module),
  `lib/pipeline/` (records, the CLI, the stage graph), `lib/report/` (reports and plots) and
  `lib/config/` (typed config: its defaults already sit in
  the recorded config values) are neither hashed nor followed.
- Code is hashed by meaning, not bytes: the digest of a file is the sha256 of its AST with
  docstrings and logging statements (`log.info(...)`, `print(...)` as whole statements) dropped,
  so a comment, a reflowed line or a reworded log message reruns nothing, while any real
  statement change reruns what uses it.

Parsing is cached by (path, size, mtime) in `<output_root>/.hash_cache.json` (lib.core.io), so an
up-to-date stage decides without parsing anything.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

from lib.core.io import cached_by_stat, sha256_bytes
from lib.core.paths import ROOT

INFRASTRUCTURE = ("lib/core/", "lib/pipeline/", "lib/report/", "lib/config/")
_LOG_NAMES = {"log", "logger", "logging"}
_LOG_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def is_infrastructure(rel: str) -> bool:
    """True for a project-relative path whose code never decides a rerun."""
    return rel.startswith(INFRASTRUCTURE)


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _is_logging(node: ast.stmt) -> bool:
    """A statement that only logs or prints: `log.info(...)`, `logging.warning(...)`, `print(...)`."""
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return False
    f = node.value.func
    if isinstance(f, ast.Name):
        return f.id == "print"
    return isinstance(f, ast.Attribute) and f.attr in _LOG_LEVELS and isinstance(f.value, ast.Name) and f.value.id in _LOG_NAMES


def _strip(tree: ast.AST) -> ast.AST:
    """Drop docstrings and logging statements from every body (a body left empty gets a `pass`)."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                continue
            kept = [s for s in body if not _is_logging(s)]
            if kept and _is_docstring(kept[0]) and field == "body" and isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kept = kept[1:]
            setattr(node, field, kept or [ast.Pass()])
    return tree


def meaning_digest(source: str) -> str:
    """sha256 of the source's AST without docstrings, comments, formatting and logging statements."""
    return sha256_bytes(ast.dump(_strip(ast.parse(source)), include_attributes=False).encode())


def lib_imports(tree: ast.AST) -> set[str]:
    """Dotted names of the `lib` modules (or packages) a parsed file imports, anywhere in it.

    `from lib.pkg import name` yields both `lib.pkg` and `lib.pkg.name`: `_module_file` keeps the
    one that is a file, so a submodule imported by name is found.
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "lib" or a.name.startswith("lib."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "lib" or node.module.startswith("lib.")):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _analyse(path: Path) -> str:
    source = path.read_text()
    tree = ast.parse(source)
    return json.dumps({"digest": meaning_digest(source), "imports": sorted(lib_imports(tree))})


def _module_file(dotted: str) -> Path | None:
    """The file of a dotted `lib` module: `lib/a/b.py` or the package's `lib/a/b/__init__.py`; None for a name."""
    base = ROOT.joinpath(*dotted.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def code_digests(script: str | Path) -> dict[str, str]:
    """Digest by meaning of the script and of every result-computing lib module it reaches (relative path -> sha)."""
    todo, seen = [Path(script).resolve()], set()
    out: dict[str, str] = {}
    while todo:
        p = todo.pop()
        if p in seen or not p.is_file():
            continue
        seen.add(p)
        try:
            rel = p.relative_to(ROOT).as_posix()
        except ValueError:
            rel = p.name
        if is_infrastructure(rel):
            continue
        info = json.loads(cached_by_stat(p, "code", _analyse))
        if not rel.endswith("__init__.py") or info["digest"] != meaning_digest(""):
            out[rel] = info["digest"]
        todo += [f for f in map(_module_file, info["imports"]) if f is not None]
    return dict(sorted(out.items()))
