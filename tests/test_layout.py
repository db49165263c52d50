"""The package's import graph runs one way, as the README's layout table says.

Parsed from the source (every ``import`` statement, also the lazy ones inside functions), so the
rule holds for code paths that a test run might not reach:

* no import cycles between the package's modules;
* the op layer (``_contract``, ``reference``, ``backends``) imports nothing of ours above it;
* ``sharding`` (the public ops' sharded-head decorators) imports no module of the package;
* ``training`` and ``integrations`` reach the ops only through the public op modules
  (``api``, ``tokens``, ``linear``), never the contract, the reference or a backend.
"""

from __future__ import annotations

import ast
import os

import pytest

PKG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rho_kernels")
OP_LAYER = ("rho_kernels._contract", "rho_kernels.reference", "rho_kernels.backends", "rho_kernels._C")
COMPILED = ("rho_kernels._C",)  # the extension: a module without a .py file
PUBLIC_OPS = ("rho_kernels.api", "rho_kernels.tokens", "rho_kernels.linear")
UPPER_LAYERS = ("rho_kernels.training", "rho_kernels.integrations")


def _modules() -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(PKG_DIR):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG_DIR))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(root, f)
    return found


def _imports(name: str, path: str, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports (resolved; non-package imports dropped)."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from X import y" imports the module X.y where y is a module, else a name of X.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "import rho_kernels.backends.cpu.x" -> nearest module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods) | set(COMPILED)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    graph.update({name: set() for name in COMPILED})
    return graph


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_graph_sees_the_package():
    graph = _graph()
    # Guards the parser itself: these edges exist, so a graph without them would prove nothing.
    assert "rho_kernels.api" in graph["rho_kernels"]
    assert "rho_kernels.backends" in graph["rho_kernels.api"]
    assert "rho_kernels._contract" in graph["rho_kernels.reference"]


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("layer", OP_LAYER)
def test_op_layer_imports_nothing_above_it(layer):
    graph = _graph()
    for name, deps in graph.items():
        if _within(name, (layer,)):
            above = sorted(d for d in deps if not _within(d, OP_LAYER))
            assert not above, f"{name} (op layer) imports {above}"


def test_training_and_integrations_use_only_the_public_op_api():
    graph = _graph()
    for name, deps in graph.items():
        if _within(name, UPPER_LAYERS):
            bad = sorted(d for d in deps if _within(d, OP_LAYER) or d == "rho_kernels")
            assert not bad, f"{name} imports {bad}; use the public op modules {list(PUBLIC_OPS)}"


def test_sharding_imports_nothing_of_the_package():
    graph = _graph()
    assert "rho_kernels.sharding" in graph["rho_kernels.linear"]  # the edge exists (the ops' decorators)
    assert not graph["rho_kernels.sharding"], graph["rho_kernels.sharding"]
