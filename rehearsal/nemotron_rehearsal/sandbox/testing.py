"""Pytest support: bring the sandbox up once per session, and fail (never skip) when it can't be.

For tests/conftest.py:

    @pytest.fixture(scope="session")
    def sandbox():
        from nemotron_rehearsal.sandbox.testing import session_sandbox
        yield from session_sandbox()

The sandbox is brought up with NEMOTRON_SANDBOX_NODES compute nodes (default 2), or reused if it is
already up with that size (with NEMOTRON_SANDBOX_RUNTIME=docker, with its Docker engines too). It
is taken down at the end only if a test session brought it up, no other session still uses it and
NEMOTRON_SANDBOX_KEEP=1 isn't set, so a developer's running sandbox survives a test run. Tests that power nodes off or stop sshd wrap that in
`with nemotron_rehearsal.sandbox.exclusive_use("why"):` so concurrent sessions don't trip over it.
pytest is imported lazily: this module is part of the package, which doesn't depend on pytest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

from . import cluster, layout, locks
from .layout import STATE_DIR, Sandbox
from .proc import SandboxError

CREATED_BY_TESTS = STATE_DIR / "created-by-tests"  # marker: a test session may take it down


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
    """Generator for a pytest fixture: yields a running Sandbox, cleans up what it started.

    The session holds the sandbox lock shared while it runs (see locks.py), so concurrent sessions
    share one sandbox and none tears it down or resizes it under another. At the end, the sandbox
    is taken down if a test session created it and no other user holds the lock.
    """
    require_root()
    nodes = nodes or requested_nodes()
    try:
        locks.hold_shared("use the sandbox")
        existing = cluster.current()
        reused = existing == layout.plan(nodes, gpus_per_node) and cluster.status()["up"]
        sandbox = cluster.up(nodes=nodes, gpus_per_node=gpus_per_node, log=lambda m: print(f"sandbox: {m}"))
        if not reused:
            CREATED_BY_TESTS.touch()
    except SandboxError as exc:
        locks.release_shared()
        import pytest

        pytest.fail(f"the sandbox did not come up: {exc}", pytrace=False)
    try:
        yield sandbox
    finally:
        locks.release_shared()
        if os.environ.get("NEMOTRON_SANDBOX_KEEP") != "1":
            with locks.try_exclusive("take the sandbox down after the tests") as alone:
                if alone and CREATED_BY_TESTS.exists():
                    cluster.down()
