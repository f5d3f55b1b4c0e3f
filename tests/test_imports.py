"""The package's import graph: every module imports in a fresh interpreter, and no two modules
import each other at module level, directly or around a loop (lazy imports inside functions are
for start-up time, never to dodge a cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ftl
import ftl.kernels


def modules(root: Path, name: str) -> dict[str, Path]:
    """Module name -> file, for the package at ``root`` and its subpackages (``__main__`` runs, not imports)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] != "__main__":
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def installed() -> dict[str, Path]:
    """Every module of the installed ``ftl``: ``launcher/`` and ``kernels/`` (installed as ``ftl.kernels``)."""
    return {**modules(Path(ftl.__file__).resolve().parent, "ftl"), **modules(Path(ftl.kernels.__file__).resolve().parent, "ftl.kernels")}


def import_graph(found: dict[str, Path], name: str) -> dict[str, set[str]]:
    """Who imports whom when a module is first imported: module-level imports only, not those under
    ``if TYPE_CHECKING``; importing ``a.b.c`` imports the packages ``a.b`` first."""
    graph = {}
    for module, path in found.items():
        deps: set[str] = set()

        def visit(body: list[ast.stmt]) -> None:
            for node in body:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == name:
                    deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in found else node.module for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.split(".")[0] == name)
                elif isinstance(node, (ast.If, ast.Try, ast.With)):
                    for block in (node.body, getattr(node, "orelse", []), *[h.body for h in getattr(node, "handlers", [])]):
                        visit(block)

        visit(ast.parse(path.read_text()).body)
        for dep in list(deps):
            parts = dep.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts)))
        # A module's own packages are already being imported when it is: not an edge.
        graph[module] = {d for d in deps if d in found and d != module and not module.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return found


def test_no_module_level_import_cycle():
    found = installed()
    assert {"ftl.training.trainer", "ftl.objectives.kto", "ftl.distributed.strategies.zero", "ftl.kernels.patch"} <= set(found)
    assert cycles(import_graph(found, "ftl")) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    """The check above can fail: a loop through a package's __init__ and a deferred TYPE_CHECKING import."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from typing import TYPE_CHECKING\nfrom pkg.sub.c import x\nif TYPE_CHECKING:\n    from pkg import b\n")
    (root / "b.py").write_text("import pkg.a\n")
    (root / "sub" / "__init__.py").write_text("from pkg import b\n")
    (root / "sub" / "c.py").write_text("x = 1\n")
    assert cycles(import_graph(modules(root, "pkg"), "pkg")) == [["pkg.a", "pkg.sub", "pkg.b", "pkg.a"]]


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(installed())
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported', len(sys.argv) - 1)"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(names)}" in result.stdout


def test_every_package_is_in_the_wheel():
    """pyproject's package list names each package folder: a wheel (``pip install .``, not the
    editable install the tests run on) holds only those, and would miss a subpackage left out."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in installed().items() if path.name == "__init__.py"}
    assert packages == listed
