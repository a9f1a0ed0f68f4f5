"""The sandbox inventory must never hand pyinfra its 10.213.0.x addresses while the sandbox is down:
without the bridge they would be routed off this machine."""

from __future__ import annotations

import json
import runpy

import pytest
from helpers import REPO
from nemotron_rehearsal.sandbox import netns

INVENTORY = REPO / "inventories" / "sandbox.py"


def test_refuses_to_load_for_pyinfra_when_the_bridge_is_down(monkeypatch):
    monkeypatch.delenv("NEMOTRON_DEPLOY_OFFLINE", raising=False)
    monkeypatch.setattr(netns, "BRIDGE", "nsb-no-such-bridge")
    with pytest.raises(RuntimeError, match="sandbox up"):
        runpy.run_path(str(INVENTORY))


def test_validation_reads_it_without_the_sandbox(monkeypatch):
    monkeypatch.delenv("NEMOTRON_BENCH_NODES", raising=False)
    monkeypatch.setattr(netns, "BRIDGE", "nsb-no-such-bridge")
    from nemotron_deploy.inventory import load

    cluster = load(str(INVENTORY))
    assert cluster.compute == ["sb-node01", "sb-node02"]


def _fake_running_sandbox(monkeypatch, tmp_path, nodes):
    from nemotron_rehearsal.sandbox import layout

    state = tmp_path / "state.json"
    state.write_text(json.dumps(layout.plan(nodes).to_json()))
    monkeypatch.setattr(layout, "STATE_FILE", state)
    monkeypatch.setattr(netns, "bridge_exists", lambda: True)


def test_lists_the_compute_nodes_the_running_sandbox_has(monkeypatch, tmp_path):
    monkeypatch.delenv("NEMOTRON_BENCH_NODES", raising=False)
    _fake_running_sandbox(monkeypatch, tmp_path, 5)
    names = [name for name, _ in runpy.run_path(str(INVENTORY))["compute"]]
    assert names == [f"sb-node0{i}" for i in range(1, 6)]


def test_bench_variable_selects_the_first_n_nodes(monkeypatch, tmp_path):
    _fake_running_sandbox(monkeypatch, tmp_path, 5)
    monkeypatch.setenv("NEMOTRON_BENCH_NODES", "3")
    compute = runpy.run_path(str(INVENTORY))["compute"]
    assert [name for name, _ in compute] == ["sb-node01", "sb-node02", "sb-node03"]
    assert compute[2][1]["ssh_hostname"] == "10.213.0.13"
    monkeypatch.setenv("NEMOTRON_BENCH_NODES", "6")
    with pytest.raises(RuntimeError, match="has 5 compute nodes"):
        runpy.run_path(str(INVENTORY))


def test_the_deploy_reads_the_keys_file_sandbox_up_makes(monkeypatch, tmp_path):
    """Loaded for pyinfra (not offline), the sandbox inventory names the keys file `sandbox up` makes;
    for validation only, the committed one without keys."""
    from nemotron_rehearsal.sandbox import layout

    monkeypatch.delenv("NEMOTRON_DEPLOY_OFFLINE", raising=False)
    data = runpy.run_path(str(REPO / "inventories" / "group_data" / "sandbox.py"))
    assert data["endpoint_api_keys_file"] == str(layout.STATE_DIR / "endpoint" / "api-keys")
    if hasattr(layout, "API_KEYS_FILE"):  # this checkout's rehearsal package
        assert data["endpoint_api_keys_file"] == str(layout.API_KEYS_FILE)
    monkeypatch.setenv("NEMOTRON_DEPLOY_OFFLINE", "1")
    data = runpy.run_path(str(REPO / "inventories" / "group_data" / "sandbox.py"))
    assert data["endpoint_api_keys_file"] == "sandbox.api-keys"


def test_the_tls_registry_is_verified_and_the_plain_one_is_not(monkeypatch):
    """NEMOTRON_SANDBOX_REGISTRY=tls: the image over HTTPS with TLS verified (a login may send a key
    there); by default the plain-HTTP port, unverified, which no key may reach."""
    monkeypatch.setattr(netns, "BRIDGE", "nsb-no-such-bridge")
    from nemotron_deploy.inventory import load

    monkeypatch.delenv("NEMOTRON_SANDBOX_REGISTRY", raising=False)
    plain = load(str(INVENTORY)).settings
    assert (plain.registry, plain.registry_tls_verify) == ("10.213.0.2:5000", False)
    monkeypatch.setenv("NEMOTRON_SANDBOX_REGISTRY", "tls")
    tls = load(str(INVENTORY)).settings
    assert (tls.registry, tls.registry_tls_verify) == ("10.213.0.2:5443", True)
    assert tls.image == "10.213.0.2:5443#nvidia/nemo:24.01.framework"
