"""Shared fixtures. The sandbox cluster (real sshd, Slurm, registry in network namespaces) comes up
once per session for the tests that need it, and fails them loudly (never skips) when it can't."""

from __future__ import annotations

import os
import subprocess

import pytest

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
    if request.node.get_closest_marker("sandbox"):
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
