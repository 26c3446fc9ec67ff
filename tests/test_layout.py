"""The house plan holds: imports flow one way (entry points → analyses → core → infrastructure), there is no import
cycle, no module takes another module's private names, and no module is over the size limit.

The imports are read from the source (``ast``), including imports inside functions; imports under
``if TYPE_CHECKING:`` are type hints only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "qkdissect"
MAX_LINES = 550

# Lower number = lower floor; a module may import modules on its own floor or below.
FLOORS = {
    0: ("qkdissect._version", "qkdissect.errors", "qkdissect.progress", "qkdissect.files", "qkdissect.outputs",
        "qkdissect.cache", "qkdissect.testpoints", "qkdissect.formats",
        "qkdissect.images", "qkdissect.parallel", "qkdissect.factored", "qkdissect.forms", "qkdissect.plots",
        "qkdissect.overlays"),
    1: ("qkdissect.metrics", "qkdissect.weights", "qkdissect.adapters", "qkdissect.atlas", "qkdissect.decomposition",
        "qkdissect.positional", "qkdissect.projection", "qkdissect.synthetic", "qkdissect.builtin"),
    2: ("qkdissect.comparison", "qkdissect.mining", "qkdissect.preference", "qkdissect.views", "qkdissect.report",
        "qkdissect.dynamics", "qkdissect.model_survey"),
    3: ("qkdissect.commands", "qkdissect.cli", "qkdissect.__main__", "qkdissect.oddoneout", "qkdissect"),
}
FLOOR_NAMES = {0: "infrastructure", 1: "core", 2: "analyses", 3: "entry points"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int:
    """The floor of the longest prefix of ``module`` listed in FLOORS."""
    best, floor = -1, None
    for level, prefixes in FLOORS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), level
    if floor is None:
        raise AssertionError(f"{module} is on no floor of the house plan: add it to FLOORS in {__file__}.")
    return floor


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str) -> list[tuple[str, tuple[str, ...], int]]:
    """(imported module, names taken from it, line) for every qkdissect import of ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: list[tuple[str, tuple[str, ...], int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qkdissect":
                    found.append((alias.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qkdissect":
            names = tuple(alias.name for alias in node.names)
            submodules = [f"{node.module}.{name}" for name in names if f"{node.module}.{name}" in MODULES]
            found.extend((sub, (), node.lineno) for sub in submodules)
            rest = tuple(name for name in names if f"{node.module}.{name}" not in MODULES)
            if rest:
                found.append((node.module, rest, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _ in imports(module) if target != module and target in MODULES}
            for module in MODULES}


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor_of(module)


def test_imports_flow_downwards():
    upward = []
    for module in MODULES:
        for target, _, line in imports(module):
            if target in MODULES and floor_of(target) > floor_of(module):
                upward.append(f"{MODULES[module].relative_to(SRC)}:{line} ({FLOOR_NAMES[floor_of(module)]}) imports "
                              f"{target} ({FLOOR_NAMES[floor_of(target)]})")
    assert not upward, "imports that run upwards:\n" + "\n".join(upward)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return cycles


def test_find_cycles_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" ↔ ".join(cycle) for cycle in cycles)


def test_no_module_takes_private_names():
    taken = []
    for module in MODULES:
        for target, names, line in imports(module):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                taken.append(f"{MODULES[module].relative_to(SRC)}:{line} takes {', '.join(private)} from {target}")
    assert not taken, "private names imported from other modules:\n" + "\n".join(taken)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(SRC)} has {lines} lines (limit {MAX_LINES}): split it"
