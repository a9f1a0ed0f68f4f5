"""The package's import graph: no module imports itself, and no import circles, counting every
`import` and `from ... import` of a nemotron_deploy module (relative ones, and those inside functions
or `if TYPE_CHECKING:` included: a circle that only works because an import is deferred is still a
knot)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = "nemotron_deploy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that `name` (the file at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # `from x import y`: y is a module when x.y is one, else a name in x (or its package).
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                target = f"{origin}.{alias.name}"
                add(target if target in modules else origin)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {
        _module_name(p): p for p in sorted((REPO / PACKAGE).rglob("*.py")) if "__pycache__" not in p.parts
    }
    modules = set(files)
    return {name: _imports(path, name, modules) for name, path in files.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the graph's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One circle through the component's first module, for the message: a -> b -> ... -> a."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                return [*paths[node], start]
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return component


def test_the_graph_sees_relative_and_local_imports():
    graph = import_graph()
    assert "nemotron_deploy.service.slurm" in graph["nemotron_deploy.service.check"]  # from .slurm import
    assert "nemotron_deploy.inventory" in graph["nemotron_deploy.cli"]  # inside a function


def test_service_has_no_import_cycles():
    """Named for service/, the layer this guards first; it checks the whole package."""
    graph = import_graph()
    selfish = sorted(name for name, deps in graph.items() if name in deps)
    assert not selfish, f"modules that import themselves: {selfish}"
    circles = [_cycle(graph, c) for c in strongly_connected(graph) if len(c) > 1]
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


# Imported inside a function only: prometheus_client (the service's one runtime dependency) by the
# textfile writers; pyyaml by preflight's --expect-gpu, which says what to pass without it.
LAZY_ONLY = {"prometheus_client", "yaml"}


def test_service_imports_only_the_standard_library_and_itself():
    """service/ runs on the cluster: the standard library and service/ itself, and LAZY_ONLY inside
    functions; never the deploy side (deploy/, settings, inventory, planner, catalog, cli)."""
    import sys

    service = REPO / PACKAGE / "service"
    wrong = []
    for path in sorted(service.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        in_function = {
            id(node)
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.ImportFrom):
                name = _module_name(path)
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or name.startswith(f"{PACKAGE}.service"):
                    continue
                if top in LAZY_ONLY and id(node) in in_function:
                    continue
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not wrong, wrong
