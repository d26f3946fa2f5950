"""Structure of the core: no import cycle, no over-long function (ast scans, no imports)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "core" / "dcplan"
#: owned by another part of the work (CLI, manager); scanned there
LENGTH_EXEMPT = ("cli/", "manager.py")
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    rel = path.relative_to(CORE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, name: str, is_pkg: bool) -> set[str]:
    """Modules the module imports, at import time or later (in function bodies); TYPE_CHECKING blocks excluded."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    sub = getattr(node, field, None)
                    if isinstance(sub, list):
                        visit([s for s in sub if isinstance(s, ast.stmt)] + [
                            s for h in sub if isinstance(h, ast.ExceptHandler) for s in h.body
                        ])

    visit(tree.body)
    return out


def _graph() -> dict[str, set[str]]:
    files = {(_module_name(p)): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = _imports(tree, name, path.name == "__init__.py")
        # "from dcplan import compat" names the module dcplan.compat, not the package
        graph[name] = {d for d in deps if d in files and d != name}
        graph[name] = {d for d in graph[name] if not _is_package_only(d, deps, files)}
    return graph


def _is_package_only(d: str, deps: set[str], files: dict[str, Path]) -> bool:
    """``from dcplan import x`` adds ``dcplan`` and ``dcplan.x``: keep only the submodule when there is one."""
    return files[d].name == "__init__.py" and any(x.startswith(d + ".") for x in deps)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_core_modules_form_no_import_cycle() -> None:
    """Function-level imports count too (they only delay a cycle); TYPE_CHECKING imports do not."""
    graph = _graph()
    cycle = _cycle(graph)
    assert cycle is None, "import cycle among core modules: " + " -> ".join(cycle or [])


def test_compat_imports_nothing_from_dcplan_but_errors() -> None:
    tree = ast.parse((CORE / "compat.py").read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dcplan"):
            mods.add(node.module)
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names if a.name.startswith("dcplan"))
    assert mods <= {"dcplan.errors"}, mods


def test_no_core_function_is_longer_than_about_100_lines() -> None:
    long = []
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE).as_posix()
        if rel.startswith(LENGTH_EXEMPT):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
