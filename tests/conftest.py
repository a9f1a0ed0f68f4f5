"""Shared fixtures. The sandbox cluster (real sshd, Slurm, registry in network namespaces) comes up
once per session for the tests that need it, and fails them loudly (never skips) when it can't."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def sandbox():
    from nemotron_rehearsal.sandbox.testing import session_sandbox

    # 4 compute nodes: two replicas of the 2-node layout (NEMOTRON_SANDBOX_NODES overrides).
    yield from session_sandbox(int(os.environ.get("NEMOTRON_SANDBOX_NODES", "4")))


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A fake Slurm (fake_slurm.FakeSlurm) first on PATH: `slurm.set({"jobs": {...}})` says what it knows."""
    from fake_slurm import FakeSlurm

    from nemotron_deploy import slurm as slurm_module

    fake = FakeSlurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{fake.bin}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm_module, "_FIRST_NODE", {})  # hostname expansions are cached per process
    return fake
