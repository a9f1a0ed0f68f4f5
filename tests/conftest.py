"""Shared fixtures and the test tiers. A test's folder is its tier, and its marker:

- ``tests/unit/``: no root, no tool beyond Python; seconds.   ``.venv/bin/pytest tests/unit``
- ``tests/local/``: real tools on this machine (haproxy, promtool, shellcheck, systemd-analyze,
  visudo, pip), loopback only, no root.                        ``.venv/bin/pytest tests/unit tests/local``
- ``tests/sandbox/``: the sandbox cluster (real sshd, Slurm, registry, enroot + pyxis in network
  namespaces); root. It comes up once per session, and fails its tests loudly (never skips) when it
  can't.                                                       ``scripts/test`` runs all three.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

TIERS = ("unit", "local", "sandbox")


def _tier(path: Path) -> str | None:
    parts = Path(path).parts
    return next((tier for tier in TIERS if tier in parts[-2:-1]), None)


def pytest_collection_modifyitems(config, items):
    """Mark each test with its folder's tier; the sandbox fixture outside tests/sandbox/ is an error."""
    for item in items:
        tier = _tier(item.path)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/local or tests/sandbox")
        item.add_marker(tier)
        if tier != "sandbox" and "sandbox" in item.fixturenames:
            raise pytest.UsageError(
                f"{item.nodeid} uses the sandbox cluster: move it to tests/sandbox/ (its tier needs root)"
            )


# What Slurm saw when a sandbox test failed: CI prints only the report, so it carries the evidence.
_SLURM_STATE = (
    "squeue -a -o '%i %j %u %T %M %R' ; sinfo -N -h -o '%N %T %E' ; tail -n 25 /var/log/slurm/slurmctld.log"
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    sb = item.funcargs.get("sandbox") if hasattr(item, "funcargs") else None
    if report.failed and sb is not None and call.when == "call":
        try:
            argv = [*sb.ssh_argv(sb.login_host, _SLURM_STATE)]
            state = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            state = f"(could not read Slurm's state: {exc})"
        report.longrepr = f"{report.longrepr}\n--- Slurm at the failure ---\n{state}"


@pytest.fixture(scope="session")
def sandbox():
    from nemotron_rehearsal.sandbox.testing import session_sandbox

    # 4 compute nodes: two replicas of the 2-node layout (NEMOTRON_SANDBOX_NODES overrides).
    for sb in session_sandbox(int(os.environ.get("NEMOTRON_SANDBOX_NODES", "4"))):
        # The login node's cron runs the scheduled check every minute, and the check replaces dead
        # replicas: it would race the jobs the tests submit and cancel. Paused for the session; tests
        # run the cron entry's command themselves when they mean to (as its user, like cron).
        _pause_cron(sb)
        try:
            yield sb
        finally:
            from nemotron_rehearsal.sandbox import RESUME_CRON

            resume = [*sb.ssh_argv(sb.login_host, RESUME_CRON)]
            subprocess.run(resume, capture_output=True, timeout=30)


def _pause_cron(sb) -> None:
    """SIGSTOP cron, then let a check it already started finish (bounded): none runs after this."""
    from nemotron_rehearsal.sandbox import PAUSE_CRON

    subprocess.run([*sb.ssh_argv(sb.login_host, PAUSE_CRON)], capture_output=True, timeout=60)


@pytest.fixture(scope="module", autouse=True)
def _cron_paused_for_module(request):
    """Pause cron again before a sandbox module's own set-up (which cancels jobs): an earlier module
    that brought the sandbox up again (a resize, a restart of its daemons) started a new cron, whose
    checks would replace the next tests' replicas."""
    if _tier(request.node.path) == "sandbox" and "sandbox" in request.fixturenames:
        _pause_cron(request.getfixturevalue("sandbox"))


@pytest.fixture(autouse=True)
def _cron_paused(request):
    """The same before every sandbox test (a test earlier in the module may have restarted it)."""
    if "sandbox" in request.fixturenames:
        _pause_cron(request.getfixturevalue("sandbox"))


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A fake Slurm (fake_slurm.FakeSlurm) first on PATH: `slurm.set({"jobs": {...}})` says what it knows."""
    from fake_slurm import FakeSlurm

    from nemotron_deploy.service import slurm as slurm_module

    fake = FakeSlurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{fake.bin}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm_module, "_FIRST_NODE", {})  # hostname expansions are cached per process
    return fake
