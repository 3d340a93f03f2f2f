"""tokred's imports point one way: no cycles, and each layer imports only the layers below it (docs/DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tokred"

FORBIDDEN = {
    # layer -> the tokred packages it must not import
    "tokred.tokens": ("tokred",),
    "tokred.compat": ("tokred",),
    "tokred.kernels": ("tokred.adapters", "tokred.stages", "tokred.methods", "tokred.eval", "tokred.demo"),
    "tokred.methods": ("tokred.adapters", "tokred.stages", "tokred.eval", "tokred.demo"),
    "tokred.adapters": ("tokred.stages", "tokred.methods", "tokred.eval", "tokred.demo"),
    "tokred.stages": ("tokred.eval", "tokred.demo", "tokred.patch"),
    "tokred.kv": ("tokred.adapters", "tokred.stages", "tokred.methods", "tokred.weights", "tokred.eval", "tokred.demo"),
    "tokred.weights": ("tokred.stages", "tokred.methods", "tokred.eval", "tokred.demo", "tokred.patch"),
    "tokred.zoo.families": ("tokred",),  # a family's builder needs only transformers, its siblings and the tasks
    "tokred.zoo.datasets": ("tokred",),  # the synthetic tasks: numpy and PIL only
}
ALLOWED = {"tokred.zoo.families": ("tokred.zoo.datasets",)}  # exceptions: the tokenizer learns the tasks' answers


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str, top_level_only: bool) -> set[str]:
    """The tokred modules `name` imports (at module level only, or anywhere in it)."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return {m for m in found if m in MODULES}


def test_the_walk_sees_the_package():
    assert {"tokred", "tokred.tokens", "tokred.compat", "tokred.stages.session", "tokred.adapters.base"} <= set(MODULES)
    assert "tokred.tokens" in imports("tokred.adapters.base", top_level_only=True)


def test_no_import_cycles():
    graph = {name: imports(name, top_level_only=True) - {"tokred", name} for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join((*path[path.index(name) :], name)))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    members = [m for m in MODULES if m == layer or m.startswith(layer + ".")]
    assert members, layer
    wrong = {
        (m, imported)
        for m in members
        for imported in imports(m, top_level_only=False)
        if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN[layer])
        and not imported.startswith((layer, *ALLOWED.get(layer, ())))
    }
    assert not wrong, f"{layer} must not import {FORBIDDEN[layer]}: {sorted(wrong)}"
