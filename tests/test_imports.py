"""The package's import graph, read from the source: no cycles, and no edge that climbs the layers
(sandbox/ and tools/ never import agent/). Imports inside functions count: a lazy import still ties
two modules together."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"agent": "deltanas.agent", "tools": "deltanas.tools", "sandbox": "deltanas.sandbox",
            "prompts": "deltanas.prompts"}
# Layers that must not import the named layers (the sandbox runs alone in its view; tools serve agent/).
FORBIDDEN = {"deltanas.sandbox": ("deltanas.agent",), "deltanas.tools": ("deltanas.agent",)}


def module_files() -> dict[str, Path]:
    """Dotted module name -> its file, for every .py of the package."""
    out = {}
    for folder, dotted in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((dotted, *parts))] = path
    return out


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import deltanas.agent.x.attr` and the like
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"deltanas.agent.cli", "deltanas.agent.llm.model_folder", "deltanas.sandbox.worker",
            "deltanas.tools.proxy", "deltanas.tools.zoo.lenet"} <= set(graph)
    # Lazy imports inside functions are edges too.
    assert "deltanas.agent.run.terminal" in graph["deltanas.agent.cli"]
    assert "deltanas.sandbox.worker" in graph["deltanas.sandbox.warm"]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_upward_imports(layer):
    upward = sorted(f"{src} -> {dst}" for src, targets in import_graph().items() if src.startswith(layer + ".")
                    or src == layer for dst in targets if dst.startswith(FORBIDDEN[layer]))
    assert upward == []
