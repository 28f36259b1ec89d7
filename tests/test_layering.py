"""The package layering holds: the import graph of ``src/loom`` (read with ``ast``, so
imports inside functions and under ``TYPE_CHECKING`` count) has no cycle, and no layer
imports one above it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# Layer -> the layers it must not import.
FORBIDDEN = {
    "engine": {"runtime", "server", "router", "sdk", "client", "api"},
    "models": {"runtime", "server", "router", "sdk", "client", "api", "engine"},
    "api": {"runtime", "server", "router", "sdk", "client"},
    "runtime": {"server", "router"},
    "router": {"server"},
    "kernels": {"runtime", "server", "router", "sdk", "client", "api", "engine", "models"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "loom").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if "guest" in parts:  # the inferlet SDK's guest side builds into Wasm, apart
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # ``from pkg import mod`` imports the module when there is one.
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                         for a in node.names]  # fmt: skip
            for name in names:
                target = resolve(name) if name.startswith("loom") else None
                if target is not None and target != mod:
                    graph[mod].add(target)
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_layer_imports_one_above_it() -> None:
    def layer(mod: str) -> str:
        return mod.split(".")[1] if "." in mod else mod

    bad = sorted(
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        for dep in deps
        if layer(dep) in FORBIDDEN.get(layer(mod), set())
    )
    assert not bad, "\n".join(bad)


def test_the_graph_sees_function_level_and_type_checking_imports() -> None:
    graph = import_graph()
    # (the worker's executor imports the KV transfer inside a method; host modules import the
    # runtime's protocol under TYPE_CHECKING.)
    assert "loom.engine.kv_transfer" in graph["loom.engine.worker.executor"]
    assert "loom.runtime.services" in graph["loom.runtime.host.generate_api"]
