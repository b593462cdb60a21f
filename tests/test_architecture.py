"""The package's shape: layers that import only downwards, no import cycle, small modules.

Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``. The
layers, lowest first (a module may import its own unit and any lower layer; units that share
a layer must not import each other):

====  =============================================  ======================================
 0    ``errors``, ``logs``, ``ops.metrics``           exceptions, logging, the registry
 1    ``crypt``                                       age keys and the age file format
 2    ``storage``                                     the Storage protocol and its backends
 3    ``format``                                      what is stored, and its names
 4    ``wire``                                        everything that talks to Redis
 5    ``config``, ``attime``, ``service``,            settings, times, running components,
      ``retrying``                                    backoff
 6    ``ops``                                         endpoints, status, progress
 7    ``backup``, ``restore``, ``verify``,            the four flows, independent
      ``compact``
 8    ``cli``                                         the commands: may import anything
====  =============================================  ======================================
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rrb_streams"
MAX_LINES = 600

LAYERS: list[tuple[str, ...]] = [
    ("errors", "logs", "ops.metrics"),
    ("crypt",),
    ("storage",),
    ("format",),
    ("wire",),
    ("config", "attime", "service", "retrying"),
    ("ops",),
    ("backup", "restore", "verify", "compact"),
    ("cli",),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("rrb_streams", *parts))] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> Iterator[str]:
    """Every rrb_streams module ``module`` imports, wherever the import statement is."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: use absolute imports"
            base = node.module or ""
            # ``from rrb_streams.format import codec`` imports the module ``format.codec``.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for name in names:
            if name.startswith("rrb_streams") and name != module:
                yield name


GRAPH = {m: sorted(set(_imports(m, p))) for m, p in MODULES.items()}


def _unit(module: str) -> str:
    """The unit of the layer table a module belongs to (its longest listed prefix)."""
    name = module.removeprefix("rrb_streams").lstrip(".")
    units = [u for layer in LAYERS for u in layer]
    matches = [u for u in units if name == u or name.startswith(u + ".")]
    assert matches, f"{module} belongs to no layer: add it to LAYERS"
    return max(matches, key=len)


def _rank(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def test_every_module_belongs_to_a_layer() -> None:
    for module in MODULES:
        if module != "rrb_streams":
            _unit(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "rrb_streams"))
def test_module_imports_only_its_own_unit_or_lower_layers(module: str) -> None:
    unit = _unit(module)
    wrong = []
    for imported in GRAPH[module]:
        if imported == "rrb_streams":
            continue  # the package itself holds only __version__
        other = _unit(imported)
        if other == unit:
            continue
        if _rank(other) >= _rank(unit):
            wrong.append(f"{imported} ({other}, layer {_rank(other)})")
    assert not wrong, f"{module} ({unit}, layer {_rank(unit)}) imports upwards or sideways: {wrong}"


def test_package_has_no_import_cycle() -> None:
    # Tarjan's strongly connected components over the module graph.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, []):
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
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small_enough_to_read_in_one_sitting(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by role"


def test_package_inits_import_nothing() -> None:
    # An __init__ that imports its submodules runs them on any import of the package, and
    # makes every submodule depend on its siblings.
    for module, path in MODULES.items():
        if path.name == "__init__.py" and module != "rrb_streams":
            assert not GRAPH[module], f"{module}/__init__.py imports {GRAPH[module]}"


def test_layer_table_detects_an_upward_import() -> None:
    # The checker itself: an import of the command line from a low layer is caught.
    assert _rank(_unit("rrb_streams.cli")) > _rank(_unit("rrb_streams.wire.connections"))
    assert _unit("rrb_streams.ops.metrics") == "ops.metrics"
    assert _rank(_unit("rrb_streams.ops.metrics")) < _rank(_unit("rrb_streams.ops.http"))
