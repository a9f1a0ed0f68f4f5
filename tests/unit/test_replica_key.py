"""The replica key on the login node (nemotron_deploy/deploy/replica_key.py): the script the deploy runs
makes one key, writes each copy with its owner and mode, reuses the shared copy on a later run, and
holds no key itself; every command that probes replicas from the login node names a key file."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import write_inventory

from nemotron_deploy import inventory
from nemotron_deploy.deploy import desired, replica_key
from nemotron_deploy.deploy.facts.files import PathState

ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name


@pytest.fixture
def cluster(tmp_path: Path) -> inventory.Cluster:
    shared = tmp_path / "shared"
    (shared / "nemotron-deploy").mkdir(parents=True)
    return inventory.load(str(write_inventory(tmp_path / "inv", settings={"shared_dir": str(shared)})))


@pytest.fixture
def in_tmp(cluster, tmp_path, monkeypatch) -> dict[str, str]:
    """The copies redirected under tmp_path (owned by whoever runs the tests): {role: path}."""
    paths = {
        "shared": cluster.settings.replica_key_file,
        "probe": str(tmp_path / "state" / "replica.key"),
        "map": str(tmp_path / "haproxy" / "nemotron_replica_key.map"),
    }
    for p in paths.values():
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    modes = {"shared": "400", "probe": "640", "map": "640"}
    monkeypatch.setattr(replica_key, "map_path", lambda: paths["map"])
    monkeypatch.setattr(
        replica_key,
        "wanted",
        lambda c, login: {paths[r]: (ME, MY_GROUP, modes[r]) for r in ("shared", "probe", "map")},
    )
    return paths


def run(script: str) -> None:
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_the_script_makes_one_key_in_every_copy_with_its_mode(cluster, in_tmp):
    script = replica_key.script(cluster, desired.Login())
    assert not re.search(r"[0-9a-f]{32}", script), "a key in the script"
    run(script)
    key = Path(in_tmp["shared"]).read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert Path(in_tmp["probe"]).read_text().strip() == key
    assert Path(in_tmp["map"]).read_text() == f"replica {key}\n"
    assert {r: oct(os.stat(p).st_mode & 0o777) for r, p in in_tmp.items()} == {
        "shared": "0o400",
        "probe": "0o640",
        "map": "0o640",
    }
    # A second run (a copy lost, or a new owner) keeps the key of the shared copy.
    os.unlink(in_tmp["probe"])
    run(script)
    assert Path(in_tmp["probe"]).read_text().strip() == key
    # Without the shared copy, a new key.
    os.unlink(in_tmp["shared"])
    run(script)
    assert Path(in_tmp["shared"]).read_text().strip() != key


def test_a_link_in_place_of_the_shared_copy_is_not_read(cluster, in_tmp, tmp_path):
    planted = tmp_path / "chosen"
    planted.write_text("ab" * 32 + "\n")
    os.symlink(planted, in_tmp["shared"])
    run(replica_key.script(cluster, desired.Login()))
    assert Path(in_tmp["probe"]).read_text().strip() != "ab" * 32
    assert not os.path.islink(in_tmp["shared"])


def test_in_place_wants_every_copy_with_its_owner_and_mode(cluster):
    login = desired.Login(submit_as="nemotron", submit_group="nemotron")
    snap = {"submit": {"user": "nemotron", "group": "nemotron"}, "haproxy": {"service": "sysv"}, "paths": {}}
    want = replica_key.wanted(cluster, login)
    assert set(want) == set(replica_key.paths(cluster))
    assert want[cluster.settings.replica_key_file] == ("nemotron", "nemotron", "400")
    assert want[desired.REPLICA_PROBE_KEY_FILE] == ("root", cluster.settings.health_user, "640")
    assert want[replica_key.map_path()] == ("root", "haproxy", "640")
    states = {p: PathState(p, "file", mode, user, group) for p, (user, group, mode) in want.items()}
    assert replica_key.in_place(cluster, {**snap, "paths": states})
    for path in want:
        wrong = dict(states)
        wrong[path] = PathState(path, "file", "644", *want[path][:2])
        assert not replica_key.in_place(cluster, {**snap, "paths": wrong}), path
        del wrong[path]
        assert not replica_key.in_place(cluster, {**snap, "paths": wrong}), path


def test_every_probe_of_replicas_from_the_login_node_names_a_key_file(cluster):
    login = desired.Login()
    check = desired.health_check_command(cluster, login)
    assert check[check.index("--replica-key-file") + 1] == desired.REPLICA_PROBE_KEY_FILE
    rollout = shlex.split(desired.rollout_command(cluster, login))
    assert rollout[rollout.index("--replica-key-file") + 1] == cluster.settings.replica_key_file
