"""The layout holds: no import cycle among autoprune's modules (imports inside functions and under
TYPE_CHECKING count: a lazy import that dodges a cycle is still one), the CLI is a layer over the API, one
module builds a SearchConfig, the cost model knows no policy, tracking builds nothing it logs."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "autoprune"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The autoprune modules an import statement names (``from autoprune.search import study`` names the module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("autoprune") and name != module:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(_targets(module, node))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
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
                found.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    return found


def test_the_walk_sees_lazy_imports_and_finds_a_planted_cycle() -> None:
    graph = import_graph()
    assert "autoprune.search.runner" in graph["autoprune.api"], "api imports the runner inside search()"
    planted = {name: set(targets) for name, targets in graph.items()}
    planted["autoprune.search.record"].add("autoprune.search.runner")
    assert any("autoprune.search.record" in c and "autoprune.search.runner" in c for c in cycles(planted))


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(import_graph()) == []


def test_the_cli_is_a_layer_over_the_api_which_alone_builds_a_search_config() -> None:
    graph = import_graph()
    assert "autoprune.api" in graph["autoprune.cli"]
    assert not {"autoprune.search.runner", "autoprune.search.study", "autoprune.export"} & graph["autoprune.cli"]
    builders = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "SearchConfig":
                builders.add(module)
    assert builders == {"autoprune.api"}


def test_lower_layers_know_nothing_of_the_higher_ones() -> None:
    graph = import_graph()
    cost = {m for m in MODULES if m.startswith("autoprune.cost")}
    assert not any("autoprune.policy" in graph[m] for m in cost), "the cost model reads grids and bits, never a Policy"
    tracking = {m for m in MODULES if m.startswith("autoprune.tracking")}
    for module in tracking:
        assert not {t for t in graph[module] if t.startswith(("autoprune.deploy", "autoprune.compress", "autoprune.search"))}, module
    search = {m for m in MODULES if m.startswith("autoprune.search")}
    for module in search:
        assert not graph[module] & {"autoprune.api", "autoprune.cli", "autoprune.export"}, module
