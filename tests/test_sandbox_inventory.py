"""The sandbox inventory must never hand pyinfra its 10.213.0.x addresses while the sandbox is down:
without the bridge they would be routed off this machine."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from nemotron_rehearsal.sandbox import netns

INVENTORY = Path(__file__).resolve().parent.parent / "inventories" / "sandbox.py"


def test_refuses_to_load_for_pyinfra_when_the_bridge_is_down(monkeypatch):
    monkeypatch.delenv("NEMOTRON_DEPLOY_OFFLINE", raising=False)
    monkeypatch.setattr(netns, "BRIDGE", "nsb-no-such-bridge")
    with pytest.raises(RuntimeError, match="sandbox up"):
        runpy.run_path(str(INVENTORY))


def test_validation_reads_it_without_the_sandbox(monkeypatch):
    monkeypatch.setattr(netns, "BRIDGE", "nsb-no-such-bridge")
    from nemotron_deploy.inventory import load

    cluster = load(str(INVENTORY))
    assert cluster.compute == ["sb-node01", "sb-node02"]
