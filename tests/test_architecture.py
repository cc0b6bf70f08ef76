"""The layout stays what docs/architecture.md says: no import cycles in backend/,
gen3d_wire/ or blender_addon/, and each layer imports only the layers below it.
Imports are read from the source (every `import`, also inside functions), not run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("backend", "gen3d_wire", "blender_addon")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports (a ``from pkg import sub`` counts as ``pkg.sub``)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # 'backend.x.y' where y is a name in module backend.x
                t = t.rpartition(".")[0]
            # a module's own parent packages are initialised before it: no edge back to them
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_import_graph_is_read():
    assert "backend.service.server" in GRAPH["backend.cli"] or any(
        m.startswith("backend.service") for m in GRAPH["backend.cli"])
    assert "backend.common.cameras" in GRAPH["backend.mesh.gltf"]
    assert "blender_addon.manager" in GRAPH["blender_addon.operators"]
    # the checker finds a cycle when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


# what each layer may not import (prefixes); a layer imports only what is below it
FORBIDDEN = {
    "backend.common": ("backend.",),  # depends on nothing of ours (but itself)
    "backend.gaussians": ("backend.pipeline", "backend.kinds", "backend.service", "backend.app", "backend.cli", "backend.models"),
    "backend.mesh": ("backend.pipeline", "backend.kinds", "backend.service", "backend.app", "backend.cli", "backend.models"),
    "backend.models": ("backend.pipeline", "backend.kinds", "backend.service", "backend.app", "backend.cli"),
    "backend.pipeline": ("backend.kinds", "backend.service", "backend.app", "backend.cli"),
    "backend.service": ("backend.kinds", "backend.pipeline", "backend.app", "backend.cli"),
    "backend.kinds": ("backend.app", "backend.cli"),
    "backend.app": ("backend.cli",),
    "gen3d_wire": ("backend", "blender_addon"),
    "blender_addon": ("backend",),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_what_is_below_them(layer):
    bad = []
    for mod, deps in GRAPH.items():
        if mod != layer and not mod.startswith(layer + "."):
            continue
        for d in deps:
            if layer == "backend.common" and d.startswith("backend.common"):
                continue
            if any(d == f or d.startswith(f if f.endswith(".") else f + ".") or d == f.rstrip(".") for f in FORBIDDEN[layer]):
                bad.append(f"{mod} -> {d}")
    assert not bad, "\n".join(bad)
