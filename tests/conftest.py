"""Shared fixtures. The sandbox cluster (real sshd, Slurm, registry in network namespaces) comes up
once per session for the tests that need it, and fails them loudly (never skips) when it can't."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture(scope="session")
def sandbox():
    from nemotron_rehearsal.sandbox.testing import session_sandbox

    # 4 compute nodes: two replicas of the 2-node layout (NEMOTRON_SANDBOX_NODES overrides).
    for sb in session_sandbox(int(os.environ.get("NEMOTRON_SANDBOX_NODES", "4"))):
        # The login node's cron runs the scheduled check every minute, and the check replaces dead
        # replicas: it would race the jobs the tests submit and cancel. Paused for the session; tests
        # run the cron entry's command themselves when they mean to (as its user, like cron).
        cron = [*sb.ssh_argv(sb.login_host, "pkill -STOP -x cron; true")]
        subprocess.run(cron, capture_output=True, timeout=30)
        try:
            yield sb
        finally:
            resume = [*sb.ssh_argv(sb.login_host, "pkill -CONT -x cron; true")]
            subprocess.run(resume, capture_output=True, timeout=30)


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A fake Slurm (fake_slurm.FakeSlurm) first on PATH: `slurm.set({"jobs": {...}})` says what it knows."""
    from fake_slurm import FakeSlurm

    from nemotron_deploy import slurm as slurm_module

    fake = FakeSlurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{fake.bin}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm_module, "_FIRST_NODE", {})  # hostname expansions are cached per process
    return fake
