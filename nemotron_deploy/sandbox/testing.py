"""Pytest support: bring the sandbox up once per session, and fail (never skip) when it can't be.

For tests/conftest.py:

    @pytest.fixture(scope="session")
    def sandbox():
        from nemotron_deploy.sandbox.testing import session_sandbox
        yield from session_sandbox()

The sandbox is brought up with NEMOTRON_SANDBOX_NODES compute nodes (default 2), or reused if it is
already up with that size. It is taken down at the end only if this session brought it up and
NEMOTRON_SANDBOX_KEEP=1 isn't set, so a developer's running sandbox survives a test run.
pytest is imported lazily: this module is part of the package, which doesn't depend on pytest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

from . import cluster
from .layout import Sandbox
from .proc import SandboxError


def require_root() -> None:
    """Fail the test (not skip it) with what to do when not root: the sandbox tests must run."""
    if os.geteuid() != 0:
        import pytest

        pytest.fail(
            "the sandbox tests need root (network namespaces, a bridge, mounts): run them as root, "
            f"e.g. `sudo {sys.executable} -m pytest -m sandbox`",
            pytrace=False,
        )


def requested_nodes() -> int:
    return int(os.environ.get("NEMOTRON_SANDBOX_NODES", "2"))


def session_sandbox(nodes: int | None = None, gpus_per_node: int = 8) -> Iterator[Sandbox]:
    """Generator for a pytest fixture: yields a running Sandbox, cleans up what it started."""
    require_root()
    nodes = nodes or requested_nodes()
    existing = cluster.current()
    was_up = (
        existing is not None
        and len(existing.compute) == nodes
        and existing.gpus_per_node == gpus_per_node
        and cluster.status()["up"]
    )
    try:
        sandbox = cluster.up(nodes=nodes, gpus_per_node=gpus_per_node, log=lambda m: print(f"sandbox: {m}"))
    except SandboxError as exc:
        import pytest

        pytest.fail(f"the sandbox did not come up: {exc}", pytrace=False)
    yield sandbox
    if not was_up and os.environ.get("NEMOTRON_SANDBOX_KEEP") != "1":
        cluster.down()
