"""The layout's rules that code can check: no import cycle anywhere in src/flexlora (imports inside
functions count; `if TYPE_CHECKING:` blocks, which never run, do not), the server side of a run imports no PEFT,
and no Python file is over 450 lines outside the data tables named below."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "flexlora"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The flexlora modules `path` imports (at any depth of its code, TYPE_CHECKING blocks aside)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.add(resolve(alias.name))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    origin = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    origin = child.module or ""
                if origin.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:
                    sub = f"{origin}.{alias.name}"
                    found.add(sub if sub in modules else resolve(origin))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(None)
    # Importing a.b.c first runs a/__init__ and a/b/__init__: those count too, except the
    # packages `path` itself lies in (they are already being imported when it runs).
    for target in list(found):
        parts = target.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and not (name == parent or name.startswith(parent + ".")):
                found.add(parent)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import x\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from flexlora.a import y\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from flexlora.c import z\nfrom flexlora.sub import b\n"
    )
    (pkg / "c.py").write_text("")
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        graph = import_graph()
    finally:
        SRC = saved
    assert graph["flexlora.sub"] == {"flexlora.sub.b"}
    assert graph["flexlora.sub.b"] == {"flexlora.a"}
    # the TYPE_CHECKING import does not count; importing flexlora.sub.b runs flexlora/sub/__init__
    assert graph["flexlora.a"] == {"flexlora.sub", "flexlora.sub.b"}
    assert find_cycle(graph) == ["flexlora.a", "flexlora.sub", "flexlora.sub.b", "flexlora.a"]


def test_no_import_cycle_in_src():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_server_side_imports_no_peft():
    code = (
        "import sys, flexlora.server, flexlora.checkpoint, flexlora.protocol, flexlora.methods;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'transformers'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert out.returncode == 0, out.stdout + out.stderr


# No file over MAX_LINES: a longer module is split along a seam of its subject (see "Where the
# code is" in docs/index.md). Data tables are the exception, each named here with its reason.
MAX_LINES = 450
DATA_TABLES: dict[str, str] = {}  # none today: synthetic.py's tables are in synthetic_vocab.py


def test_no_python_file_is_over_450_lines_outside_data_tables():
    root = SRC.parent
    assert all((root / path).is_file() for path in DATA_TABLES), "a data table named here no longer exists"
    over = {}
    for folder in ("src", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            if name in DATA_TABLES or "/fixtures/" in name:
                continue
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                over[name] = lines
    assert not over, f"over {MAX_LINES} lines: " + ", ".join(f"{name} ({n})" for name, n in over.items())
