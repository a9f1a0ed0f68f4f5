"""The package's layers, read from its imports: deploy -> model -> service, never back; no import circle.

- ``nemotron_deploy/service/`` runs on the cluster (the scheduled check, the rollout, inside the job's
  container): it imports only the standard library and itself. Its one runtime dependency,
  prometheus_client, may be imported only inside a function (where a textfile is written), and is
  what the deploy ships beside it (``wheelhouse.WHEEL_DISTS``).
- the model (``settings``, ``inventory``, ``planner``, ``catalog``) may use the service side's
  knowledge (Slurm names), never the deploy-time side or the command line.
- ``nemotron_deploy/deploy/`` never imports the command line.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "nemotron_deploy"
PACKAGE_NAME = "nemotron_deploy"
MODEL = (
    "nemotron_deploy.settings",
    "nemotron_deploy.inventory",
    "nemotron_deploy.planner",
    "nemotron_deploy.catalog",
)
SERVICE_RUNTIME_DEPENDENCIES = {"prometheus_client"}
# A dependency one service module alone may import (inside a function): the replica front's tokenizer
# (NeMo's container has it).
SERVICE_MODULE_DEPENDENCIES = {"nemotron_deploy.service.openai.tokenizer": {"sentencepiece"}}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # absolute name imported (for `from X import y`: X.y when that is a module, else X)
    lazy: bool  # inside a function
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (REPO / rel).with_suffix(".py").is_file() or (REPO / rel / "__init__.py").is_file()


def imports_of(path: Path) -> list[Import]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lazy_nodes = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        lazy = id(node) in lazy_nodes
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, lazy, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                target = sub if source.startswith("nemotron_deploy") and _is_module(sub) else source
                found.append(Import(module, target, lazy, node.lineno))
    return [i for i in found if i.target != "__future__"]


def package_imports() -> list[Import]:
    return [i for path in sorted(PACKAGE.rglob("*.py")) for i in imports_of(path)]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _where(i: Import) -> str:
    return f"{i.module} (line {i.line}) imports {i.target}"


def test_service_imports_only_the_standard_library_and_itself():
    stdlib = set(sys.stdlib_module_names)
    wrong = [
        _where(i)
        for i in package_imports()
        if _within(i.module, "nemotron_deploy.service")
        and not _within(i.target, "nemotron_deploy.service")
        and i.target.split(".")[0] not in stdlib
        and not (i.lazy and i.target.split(".")[0] in SERVICE_RUNTIME_DEPENDENCIES)
        and not (i.lazy and i.target.split(".")[0] in SERVICE_MODULE_DEPENDENCIES.get(i.module, ()))
    ]
    assert wrong == [], "service/ runs on the cluster: standard library and itself only\n" + "\n".join(wrong)


def test_the_service_runtime_dependency_is_what_the_deploy_ships():
    from nemotron_deploy.deploy import wheelhouse

    shipped = {dist.replace("-", "_") for dist in wheelhouse.WHEEL_DISTS}
    assert SERVICE_RUNTIME_DEPENDENCIES <= shipped
    # The tokenizer's library is the job container's (NeMo's has it), not the login node's.
    assert not set().union(*SERVICE_MODULE_DEPENDENCIES.values()) & shipped


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        (MODEL, ("nemotron_deploy.deploy", "nemotron_deploy.cli")),
        (("nemotron_deploy.deploy",), ("nemotron_deploy.cli",)),
        (("nemotron_deploy.service",), ("nemotron_deploy.deploy", "nemotron_deploy.cli", *MODEL)),
    ],
    ids=["model", "deploy", "service"],
)
def test_layers_point_one_way(layer, forbidden):
    wrong = [
        _where(i)
        for i in package_imports()
        if any(_within(i.module, m) for m in layer) and any(_within(i.target, f) for f in forbidden)
    ]
    assert wrong == [], "deploy -> model -> service, never back:\n" + "\n".join(wrong)


def test_the_checker_sees_what_it_must():
    """The rules above read real imports: relative, aliased, and lazy ones inside functions."""
    health = imports_of(PACKAGE / "service" / "health.py")
    assert any(i.target.startswith("nemotron_deploy.service.") and not i.lazy for i in health)
    steps = imports_of(PACKAGE / "deploy" / "steps.py")
    assert any(i.target == "nemotron_deploy.inventory" for i in steps)
    assert any(i.lazy for path in PACKAGE.rglob("*.py") for i in imports_of(path))


# --- import circles ----------------------------------------------------------------------------


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
                if alias.name.split(".")[0] == PACKAGE_NAME:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != PACKAGE_NAME:
                continue
            for alias in node.names:
                target = f"{origin}.{alias.name}"
                add(target if target in modules else origin)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}
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


def test_no_import_circles():
    """The whole package: no module imports itself, and no circle (deferred imports count: a circle
    that works only because an import is deferred is still a knot)."""
    graph = import_graph()
    selfish = sorted(name for name, deps in graph.items() if name in deps)
    assert not selfish, f"modules that import themselves: {selfish}"
    circles = [_cycle(graph, c) for c in strongly_connected(graph) if len(c) > 1]
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_two_test_files_share_a_name_across_tiers():
    """pytest imports test files by basename (rootdir mode): a second tests/<tier>/test_x.py stops the
    whole run at collection (found when two branches each added one)."""
    from collections import Counter

    tests = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in tests.glob("*/test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
