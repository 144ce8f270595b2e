"""The package's modules import in one direction only: config at the bottom, the training script on
top. The graph is read from the source (every import statement, at module level or inside a
function), so an import moved into a function to dodge a circle still counts."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package name it installs as (setup.cfg's package_dir).
PACKAGES = {ROOT / "nano_dit": "nano_dit", ROOT / "pipelines": "nano_dit.pipelines"}


def _modules(packages: dict[Path, str]) -> dict[str, Path]:
    found = {}
    for folder, package in packages.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def import_graph(packages: dict[Path, str] = PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of this package it imports."""
    modules = _modules(packages)
    graph = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from package import submodule` imports the submodule; `from module import name`, the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `nano_dit.x.y` where only `nano_dit.x` is a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert {"nano_dit.config", "nano_dit.validation", "nano_dit.pipelines.pipeline_nano_dit"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_config_sits_at_the_bottom():
    graph = import_graph()
    above = {"nano_dit.validation", "nano_dit.hub", "nano_dit.report", "nano_dit.data", "nano_dit.training_log"}
    assert not graph["nano_dit.config"] & above
    assert not graph["nano_dit.pipelines.pipeline_nano_dit"]  # it travels with saved pipelines, alone


@pytest.mark.parametrize(
    "sources,cycle",
    [
        (
            {"a": "from . import b\n", "b": "def f():\n    from .a import x\n"},
            ["nano_dit.a", "nano_dit.b", "nano_dit.a"],
        ),
        ({"a": "import nano_dit.b.c\n", "b": ""}, None),
        ({"a": "from .b import y\n", "b": "import os\n"}, None),
    ],
)
def test_the_graph_counts_imports_inside_functions(tmp_path, sources, cycle):
    folder = tmp_path / "nano_dit"
    folder.mkdir()
    for name, text in sources.items():
        (folder / f"{name}.py").write_text(text)
    assert find_cycle(import_graph({folder: "nano_dit"})) == cycle
