"""The house's map: no import circles between the project's modules (issue 20, item 4)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xai_workers", "xai_audit")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file (function-local imports
    included: a circle through a lazy import is still a circle for a reader)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_pkg else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `from pkg import name`: the module pkg or pkg.name
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _is_parent_package(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_import_circle():
    """Edges from a package's ``__init__`` to its own submodules (re-exports) are left out: a
    submodule importing its package's ``__init__`` is how Python loads it, not a circle."""
    modules = project_modules()
    graph = {
        m: {t for t in imports_of(m, p, modules) if not _is_parent_package(t, m)}
        for m, p in modules.items()
    }
    for m in graph:
        graph[m] = {t for t in graph[m] if not _is_parent_package(m, t)}
    circles = []
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


#: the folders whose modules docs/architecture.md must list, one table row each
MAPPED = ("xai_workers", "xai_audit", "benchmarks")
ROW = re.compile(r"^\|\s*`([\w/.]+\.py)`\s*\|", re.MULTILINE)


def test_architecture_doc_lists_every_module_and_nothing_else():
    """docs/architecture.md has one table row per module (first cell: its path in backticks).
    A new module needs only its row there; a row whose module is gone must go too."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    listed = ROW.findall(doc)
    assert len(listed) == len(set(listed)), "rows listed twice: " + ", ".join(
        sorted({p for p in listed if listed.count(p) > 1})
    )
    present = {
        str(p.relative_to(ROOT))
        for folder in MAPPED
        for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(present - set(listed))
    stale = sorted(set(listed) - present)
    assert not missing, (
        "modules missing from docs/architecture.md; add a row for each, e.g. "
        + "; ".join(f"| `{m}` | what it owns | who calls it |" for m in missing)
    )
    assert not stale, f"docs/architecture.md lists modules that do not exist: {stale}"
