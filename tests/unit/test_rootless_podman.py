"""podman runs the job's container rootless as service_user, so the deploy pulls, logs in and out,
checks presence and measures free space as that account (deploy/rootless.py): the commands, run
for real in a shell with stand-ins for runuser/sudo, podman and getsubids; and the preflight's
refusals of an account that lacks subordinate IDs or its runtime dir."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import write_inventory

from nemotron_deploy import inventory
from nemotron_deploy.deploy import host_checks, rootless
from nemotron_deploy.deploy.facts.images import RootlessPodman
from nemotron_deploy.deploy.operations import containers

IMAGE = "nvcr.io/nvidia/nemo:24.01.framework"
# An account other than the one running the tests, as the deploy (root) and service_user differ.
ACCOUNT = "nobody"


def stand_in(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bindir / name).chmod(0o755)


def become_stand_ins(bindir: Path, log: Path) -> None:
    """runuser -u U -- CMD / sudo -n -u U -- CMD: record how, then run CMD (as whoever we are)."""
    for tool in ("runuser", "sudo"):
        stand_in(
            bindir, tool, f'echo "{tool} $*" >> {log}; while [ "$1" != -- ]; do shift; done; shift; exec "$@"'
        )


def sh(command: str, bindir: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", **env}
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=environ, cwd="/tmp")


@pytest.fixture
def podman_cluster(tmp_path):
    hosts = "login = ['login01']\ncompute = ['gpu1', 'gpu2']\n"
    path = write_inventory(
        tmp_path, "h100", hosts=hosts, settings={"container_runtime": "podman", "container_image": IMAGE}
    )
    return inventory.load(str(path))


def test_only_the_podman_runtime_pulls_as_the_service_user(podman_cluster, tmp_path):
    assert rootless.account(podman_cluster.settings) == "nemotron"
    for runtime, pull in (("docker", None), ("pyxis", None), ("host", "podman")):
        s = podman_cluster.settings.model_copy(update={"container_runtime": runtime, "pull_runtime": pull})
        assert rootless.account(s) is None, (runtime, pull)  # root's daemon / root's storage


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns the account's temp dir: needs root, as the deploy")
@pytest.mark.parametrize("pull_rc", [0, 1])
def test_the_pull_logs_in_pulls_and_logs_out_as_the_account_with_a_temp_dir_of_its_own(
    tmp_path, monkeypatch, pull_rc
):
    monkeypatch.setattr(
        containers, "host", SimpleNamespace(get_temp_filename=lambda hint: str(tmp_path / "k"))
    )
    steps = list(
        containers.pull_image._inner(
            runtime="podman", image=IMAGE, present=False, ngc_key="nvapi-x", as_user=ACCOUNT
        )
    )
    login, fetch = str(steps[-2]), steps[-1].args[0]
    bindir, log = tmp_path / "bin", tmp_path / "log"
    become_stand_ins(bindir, log)
    # podman: who runs it where, with which runtime and temp dir; the key as its stdin (login);
    # the pull's temp dir as podman sees it (owner, mode), with a blob copied into it.
    stand_in(
        bindir,
        "podman",
        f'echo "podman $1 pwd=$(pwd) xdg=$XDG_RUNTIME_DIR" >> {log}; '
        f'[ "$1" = login ] && echo "stdin=$(cat)" >> {log}; '
        f'[ "$1" = pull ] && {{ echo "tmp=$TMPDIR $(stat -c "%U %a" "$TMPDIR")" >> {log}; echo blob > "$TMPDIR/b"; exit {pull_rc}; }}; '
        "exit 0",
    )
    (tmp_path / "k").mkdir(mode=0o700)
    key = tmp_path / "k" / "key"
    key.write_text("nvapi-x")
    key.chmod(0o600)
    assert sh(login, bindir).returncode == 0
    assert not (tmp_path / "k").exists(), "the key's dir stays after the login"
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    assert sh(fetch.command, bindir, W=str(work)).returncode == pull_rc
    uid = pwd.getpwnam(ACCOUNT).pw_uid
    assert (
        log.read_text().splitlines()
        == [
            f"runuser -u {ACCOUNT} -- env XDG_RUNTIME_DIR=/run/user/{uid} podman login --tls-verify=true --username $oauthtoken --password-stdin nvcr.io",  # a key: TLS verified
            f"podman login pwd=/ xdg=/run/user/{uid}",
            "stdin=nvapi-x",
            f"runuser -u {ACCOUNT} -- env XDG_RUNTIME_DIR=/run/user/{uid} TMPDIR={work}.account podman pull --tls-verify=true {IMAGE}",
            f"podman pull pwd=/ xdg=/run/user/{uid}",
            f"tmp={work}.account {ACCOUNT} 700",
            f"runuser -u {ACCOUNT} -- env XDG_RUNTIME_DIR=/run/user/{uid} podman logout nvcr.io",
            f"podman logout pwd=/ xdg=/run/user/{uid}",
        ]
    )
    assert not Path(f"{work}.account").exists(), "the pull left the account's temp dir"
    # Progress is measured where the blobs go; a stopped pull's cleanup removes that dir and logs out.
    Path(f"{work}.account").mkdir()
    Path(f"{work}.account/b").write_text("x" * 5000)
    measured = sh(fetch.measure, bindir, W=str(work)).stdout.strip()
    assert int(measured) >= 5000, measured
    log.unlink()
    sh(fetch.cleanup, bindir, W=str(work))
    assert not Path(f"{work}.account").exists()
    assert f"podman logout pwd=/ xdg=/run/user/{uid}" in log.read_text()


def test_as_root_runuser_else_sudo_else_as_is(tmp_path):
    bindir, log = tmp_path / "bin", tmp_path / "log"
    become_stand_ins(bindir, log)
    stand_in(bindir, "podman", f'echo "podman $*" >> {log}')
    me = pwd.getpwuid(os.geteuid()).pw_name
    for user in (me, ACCOUNT):
        assert sh(rootless.as_account(user, "podman version"), bindir).returncode == 0
    lines = log.read_text().splitlines()
    become = "runuser" if os.geteuid() == 0 else "sudo"
    assert lines[0] == "podman version", "the account itself: no runuser, no sudo"
    assert lines[1].startswith(
        f"{become} {'-n ' if become == 'sudo' else ''}-u {ACCOUNT} -- env XDG_RUNTIME_DIR="
    )


def test_the_read_asks_the_accounts_podman_for_the_image_and_its_storage(tmp_path):
    bindir, log = tmp_path / "bin", tmp_path / "log"
    become_stand_ins(bindir, log)
    store = tmp_path / "users" / "65534" / "storage"  # not made yet: df looks at its parent
    (tmp_path / "users").mkdir()
    stand_in(
        bindir,
        "podman",
        f'case "$1" in image) [ "$2 $3" = "exists {IMAGE}" ];; info) echo {store};; *) exit 9;; esac',
    )
    # A subordinate GID range but no UID range.
    stand_in(bindir, "getsubids", f'[ "$1" = -g ] && echo "0: {ACCOUNT} 100000 65536"; true')
    result = sh(RootlessPodman().snippet(ACCOUNT, IMAGE), bindir)
    found = RootlessPodman().process(result.stdout.splitlines())
    assert found["present"] is True and found["graph_root"] == str(store), result.stdout
    assert (found["subuid"], found["subgid"]) == (False, True), result.stdout
    assert isinstance(found["free"], float), result.stdout
    assert (
        RootlessPodman().process(
            sh(RootlessPodman().snippet("no-such-user-x", IMAGE), bindir).stdout.splitlines()
        )
        is None
    )


def test_preflight_names_missing_subordinate_ids_and_runtime_dir(podman_cluster):
    account = {"uid": "2000", "gecos": "", "group": "nemotron", "groups": ["nemotron"]}
    store = {
        "subuid": False,
        "subgid": True,
        "runtime_dir": None,
        "present": False,
        "graph_root": None,
        "free": None,
    }
    snap = {"service_user": account, "runtimes": {"podman": "4.3"}, "gpus": None, "model": {"error": "x"}}
    found = host_checks.compute_problems(podman_cluster, {**snap, "rootless": store})
    (ids,) = [p for p in found if "subordinate ID" in p]
    assert "/etc/subuid" in ids and "/etc/subgid" not in ids and "usermod --add-subuids" in ids
    (run,) = [p for p in found if "/run/user/2000" in p]
    assert "does not exist" in run and "loginctl enable-linger nemotron" in run
    wrong = {**store, "subuid": True, "runtime_dir": "root 755"}
    found = host_checks.compute_problems(podman_cluster, {**snap, "rootless": wrong})
    assert not any("subordinate ID" in p for p in found)
    assert any("/run/user/2000" in p and "owner, mode" in p for p in found), found
    ready = {**wrong, "runtime_dir": "nemotron 700"}
    assert not any(
        "rootless" in p for p in host_checks.compute_problems(podman_cluster, {**snap, "rootless": ready})
    )
