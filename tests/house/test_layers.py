"""The house's import arrows: elastic/'s layers point one way, and no module circle exists.

Every import counts, a lazy one inside a function too: an import that is
deferred to dodge a circle is still the circle.
"""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("elastic", "storage", "chaos")
# elastic/'s layers, lowest first: a module may import its own layer and those below.
LAYERS = ("elastic.base", "elastic.coord", "elastic.train", "elastic.launch", "elastic")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for root, _dirs, files in os.walk(os.path.join(REPO, pkg)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    mod = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    out[mod.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str) -> set[str]:
    path = MODULES[mod]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node)
            names = [
                f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target
                for a in node.names
            ]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != mod:
                found.add(name)
    return found


def layer_of(mod: str) -> int | None:
    if not mod.startswith("elastic"):
        return None
    for i in range(len(LAYERS) - 1):
        if mod == LAYERS[i] or mod.startswith(LAYERS[i] + "."):
            return i
    return len(LAYERS) - 1


def test_elastic_layers_point_down() -> None:
    upward = []
    for mod in MODULES:
        mine = layer_of(mod)
        if mine is None:
            continue
        for dep in imports_of(mod):
            theirs = layer_of(dep)
            if theirs is not None and theirs > mine:
                upward.append(f"{mod} -> {dep}")
    assert not upward, "imports pointing up a layer: " + ", ".join(sorted(upward))


def test_the_layers_exist() -> None:
    # The check above passes vacuously if the folders went away.
    for layer in LAYERS[:-1]:
        assert any(m.startswith(layer + ".") for m in MODULES), layer


def test_storage_and_coordination_do_not_import_the_runtime_or_chaos() -> None:
    for mod in MODULES:
        deps = imports_of(mod)
        if mod.startswith("storage"):
            bad = [d for d in deps if d.startswith(("chaos", "elastic.train", "elastic.launch"))]
            assert not bad, f"{mod} imports {bad}"
        if mod.startswith(("elastic.base", "elastic.coord", "elastic.train")):
            bad = [d for d in deps if d.startswith("chaos")]
            assert not bad, f"{mod} imports {bad}"


def _cycle() -> list[str] | None:
    graph = {m: imports_of(m) for m in MODULES}
    # A package's __init__ that re-exports is not a circle with its own members.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (m.startswith(d + ".") and d in PACKAGES)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circle() -> None:
    cycle = _cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", ["Trainer", "RuntimeConfig", "ElasticSampler", "FitResult"])
def test_the_user_api_is_where_it_was(name: str) -> None:
    import elastic

    assert getattr(elastic, name).__name__ == name
