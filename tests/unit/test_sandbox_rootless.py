"""The sandbox's compute nodes give the service account what rootless podman needs, as a site does
(rehearsal/.../sandbox: etc.py, registry.py, nodes.py/nodeinit.py), without touching the host's files."""

from __future__ import annotations

import json
from pathlib import Path

from nemotron_rehearsal.sandbox import etc, layout, nodes, registry

from nemotron_deploy.deploy.rootless import runtime_dir


def test_each_node_keeps_the_accounts_rootless_storage_of_its_own():
    conf = registry.podman_files("10.213.0.2:5000", 8)["/etc/containers/storage.conf"]
    assert f'rootless_storage_path = "{registry.ROOTLESS_STORAGE}/$UID/storage"' in conf
    # Node-private (each node its own images), not the shared /home the account's default would be.
    assert registry.ROOTLESS_STORAGE.startswith("/var/lib/containers/")
    assert "/var/lib/containers" in nodes.PRIVATE_DIRS


def test_subordinate_ids_start_past_every_range_of_the_hosts_file(tmp_path):
    subuid = tmp_path / "subuid"
    assert etc.subid_start(str(subuid)) == 100000  # no file: useradd's first range
    subuid.write_text("alice:100000:65536\nbob:165536:65536\n")
    assert etc.subid_start(str(subuid)) == 231072
    lines = etc.subid_lines()
    assert set(lines) == {"/etc/subuid", "/etc/subgid"}
    assert all(
        line.startswith(f"{layout.UNPRIVILEGED_USER}:") and line.endswith(":65536") for line in lines.values()
    )


def test_compute_nodes_get_a_dev_of_their_own_with_the_fake_gpus_and_the_login_node_does_not(tmp_path):
    for role in ("compute", "login"):
        node = layout.Node(f"sb-{role}", "10.213.0.99", role, f"nsb-{role}", tmp_path / role)
        nodes.prepare_fs(node)
        mounts = json.loads((node.local_dir / "init.json").read_text())["mounts"]
        dev = [m for m in mounts if m["kind"] == "dev"]
        if role == "login":
            assert dev == []
            continue
        # Last: the fake devices it binds in are in the node's /opt, bound before it.
        assert mounts[-1] == dev[0] == nodes.private_dev_mount(node)
        assert dev[0]["devices"] == layout.NODE_DEV_DIR and Path(dev[0]["stage"]).parent == node.local_dir
        assert "/opt" in [m["target"] for m in mounts[:-1]]


def test_the_accounts_runtime_dir_is_the_one_the_deploy_pins():
    assert runtime_dir("nemotron") == '"/run/user/$(id -u nemotron)"'
