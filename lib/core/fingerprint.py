"""The code digest of a stage: the script and the lib modules it reaches that compute results.
"""
from __future__ import annotations

import re
from pathlib import Path

from lib.core.io import sha256_bytes
from lib.core.paths import ROOT

_IMPORT_RE = re.compile(r"^[ \t]*(?:from[ \t]+(lib(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)|import[ \t]+([^\n#;]*))", re.M)


def _lib_imports(path: Path) -> set[str]:
    """Names of `lib.*` modules imported anywhere in a source file (functions included).

    A line scan, not an AST walk: every stage runs this over the lib modules it reaches before it
    can say "up to date", and parsing them all cost half a second per process. A matching line
    inside a string only adds a file to the fingerprint (a needless rerun, never a missed one).
    """
    found: set[str] = set()
    for m in _IMPORT_RE.finditer(path.read_text()):
        module, names, plain = m.groups()
        if module is not None:
            if module == "lib":
                found.update(f"lib.{n.split()[0]}" for n in names.strip("()").replace("\n", " ").split(",") if n.strip())
            else:
                found.add(module)
        else:
            found.update(n.split()[0] for n in plain.split(",") if n.strip().startswith("lib."))
    return found


def code_digests(script: str | Path) -> dict[str, str]:
    """Hash of the script and of every lib module it reaches, transitively (relative path -> sha)."""
    todo, seen = [Path(script).resolve()], set()
    out: dict[str, str] = {}
    while todo:
        p = todo.pop()
        if p in seen or not p.is_file():
            continue
        seen.add(p)
        try:
            rel = str(p.relative_to(ROOT))
        except ValueError:
            rel = p.name
        out[rel] = sha256_bytes(p.read_bytes())
        for mod in _lib_imports(p):
            todo.append(ROOT / (mod.replace(".", "/") + ".py"))
    return dict(sorted(out.items()))
