"""The sandbox's Docker engines (rehearsal/.../sandbox/docker.py) and its stand-in of NVIDIA's hook:
what they are configured with must match what the deploy's docker path expects of a node."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys

import pytest
from nemotron_rehearsal.sandbox import docker, layout, nodes
from nemotron_rehearsal.sandbox.registry import NODE_RUNC_SHIM

from nemotron_deploy.deploy.operations.containers import _docker_watch


def test_the_engine_keeps_its_data_where_the_deploy_measures_pulls_and_free_space():
    config = json.loads(docker.daemon_json("10.213.0.2:5000", "overlay2"))
    assert _docker_watch("docker")["measure"].startswith(f"du -sb {config['data-root']}/tmp ")
    assert config["data-root"] == docker.NODE_DATA_ROOT == "/var/lib/docker"
    # The client's default socket, /var/run/docker.sock, is /run/docker.sock (node-private /run).
    assert config["hosts"] == ["unix:///run/docker.sock"]
    assert config["exec-root"].startswith("/run/") and config["pidfile"].startswith("/run/")


def test_only_the_sandbox_registry_is_insecure_and_runc_goes_through_the_rlimit_shim():
    config = json.loads(docker.daemon_json("10.213.0.2:5000", "vfs"))
    assert config["insecure-registries"] == ["10.213.0.2:5000"]
    assert config["storage-driver"] == "vfs"
    assert config["runtimes"][config["default-runtime"]] == {"path": NODE_RUNC_SHIM}
    assert (config["bridge"], config["iptables"]) == ("none", False)


def test_the_hook_is_where_dockerd_looks_for_it_on_compute_nodes_only():
    # moby daemon/nvidia_linux.go: exec.LookPath("nvidia-container-runtime-hook") on dockerd's PATH.
    assert docker.NODE_HOOK == "/usr/local/bin/nvidia-container-runtime-hook"
    path = nodes.NODE_ENV["PATH"].split(":")
    assert path.index("/usr/local/bin") < path.index("/usr/bin")
    # /usr/local/bin is node-private: the host's (and the login node's) have no hook.
    assert nodes.host_path(layout.plan(1).compute[0], docker.NODE_HOOK).is_relative_to(layout.STATE_DIR)


@pytest.fixture
def hook():
    return runpy.run_path(str(docker.HOOK), run_name="hook")


def test_the_hook_uses_the_nodes_fake_gpus(hook):
    assert hook["DEV_DIR"] == layout.NODE_DEV_DIR


def test_the_hook_reads_the_last_nvidia_visible_devices(hook):
    env = hook["environment"]({"env": ["NVIDIA_VISIBLE_DEVICES=all", "A=1", "NVIDIA_VISIBLE_DEVICES=0,1"]})
    assert env["NVIDIA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize("value", ["", "void", "none"])
def test_no_device_for_void_none_or_empty(hook, value):
    assert hook["devices"](value) == []


def test_the_hook_picks_the_gpus_named_and_nvidiactl(hook, monkeypatch, tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl"):
        (tmp_path / name).touch()
    devices = hook["devices"]
    monkeypatch.setitem(devices.__globals__, "DEV_DIR", str(tmp_path))
    monkeypatch.setitem(devices.__globals__, "os", _FakeMinor())
    assert [n for n, _ in devices("all")] == ["nvidia0", "nvidia1", "nvidia2", "nvidiactl"]
    assert [n for n, _ in devices("2,0")] == ["nvidia2", "nvidia0", "nvidiactl"]
    monkeypatch.setitem(devices.__globals__, "fail", _raise)
    with pytest.raises(RuntimeError, match=r"no GPU \[5\]"):
        devices("5")


class _FakeMinor:
    """os, with the minor number of a plain file taken from its name (nvidiactl: 255)."""

    def __getattr__(self, name):
        import os

        return getattr(os, name)

    @staticmethod
    def minor(rdev):
        return rdev

    @staticmethod
    def stat(path):
        name = path.rsplit("/", 1)[1]
        return type("S", (), {"st_rdev": 255 if name == "nvidiactl" else int(name[6:])})


def _raise(message):
    raise RuntimeError(message)


def test_the_hook_does_nothing_but_prestart():
    run = subprocess.run([sys.executable, str(docker.HOOK), "poststop"], input=b"{}", capture_output=True)
    assert run.returncode == 0 and not run.stdout and not run.stderr
