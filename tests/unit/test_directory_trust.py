"""The preflight's refusal of directories another account controls (host_checks.directory_problems),
from the one read's stat of each managed directory and every parent (facts/files.py PathChains):
what it accepts and refuses, and that each refusal names the path, owner, mode and the fix."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import write_inventory

from nemotron_deploy import inventory
from nemotron_deploy.deploy import host_checks
from nemotron_deploy.deploy.desired import WantedDir
from nemotron_deploy.deploy.facts.files import NodeState, PathChains

SCRATCH = "/scratch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = write_inventory(tmp_path_factory.mktemp("inv"), "h100", settings={"shared_dir": f"{SCRATCH}/team"})
    return inventory.load(str(path))


def st(path, kind="directory", mode=0o755, user="root"):
    return NodeState(path, kind, mode, 0 if user == "root" else 1000, user)


def problems(cluster, states, dirs, me="root"):
    snap = {"chains": {"user": me, "paths": {s.path: s for s in states}}}
    return host_checks.directory_problems(cluster, snap, dirs)


DEPLOY = f"{SCRATCH}/team/nemotron-deploy"
DIRS = [WantedDir(DEPLOY, "755", guarded=True), WantedDir(f"{DEPLOY}/jobs", "755", guarded=True)]


def test_a_fresh_sticky_scratch_is_accepted(cluster):
    states = [st("/"), st(SCRATCH, mode=0o1777), st(f"{SCRATCH}/team")]
    assert problems(cluster, states, DIRS) == []


def test_a_directory_another_user_made_in_a_sticky_scratch_is_refused(cluster):
    states = [st("/"), st(SCRATCH, mode=0o1777), st(f"{SCRATCH}/team", user="mallory")]
    found = "\n".join(problems(cluster, states, DIRS))
    assert f"{SCRATCH}/team (directory, owner mallory, mode 755)" in found
    assert f"is in {SCRATCH} (directory, owner root, mode 1777)" in found
    assert "choose another shared_dir" in found


def test_a_link_planted_where_the_deploy_dir_goes_is_refused(cluster):
    states = [st("/"), st(SCRATCH, mode=0o1777), st(f"{SCRATCH}/team"), st(DEPLOY, "link", 0o777, "mallory")]
    found = problems(cluster, states, DIRS)
    assert any(f"{DEPLOY} (link, owner mallory, mode 777) is a symbolic link" in p for p in found), found
    assert all("remove it, or choose another shared_dir" in p for p in found if DEPLOY + " (" in p)


def test_a_managed_dir_owned_by_another_account_or_writable_by_others_is_refused(cluster):
    base = [st("/"), st(SCRATCH, mode=0o1777), st(f"{SCRATCH}/team")]
    other = problems(cluster, [*base, st(DEPLOY, user="mallory")], DIRS)
    assert any("is owned by mallory, not root" in p for p in other), other
    writable = problems(cluster, [*base, st(DEPLOY, mode=0o777)], DIRS)
    assert any("is writable by other accounts" in p for p in writable), writable
    # A mode an earlier release gave it (the logs' 1777, root's) is adopted, and fixed by the deploy.
    logs = WantedDir(f"{DEPLOY}/logs", "700", guarded=True, legacy_modes=("1777",))
    assert problems(cluster, [*base, st(DEPLOY), st(logs.path, mode=0o1777)], [*DIRS, logs]) == []


def test_parents_another_account_owns_or_that_are_world_writable_without_sticky_are_refused(cluster):
    found = problems(cluster, [st("/"), st(SCRATCH, mode=0o777), st(f"{SCRATCH}/team")], DIRS)
    assert any(
        "its parent /scratch (directory, owner root, mode 777) is writable by every account and not sticky"
        in p
        for p in found
    ), found
    found = problems(cluster, [st("/"), st(SCRATCH, user="mallory")], DIRS)
    assert any("is owned by mallory, not root or root (the deploying user)" in p for p in found), found
    found = problems(cluster, [st("/"), st(SCRATCH, "link", 0o777, "mallory")], DIRS)
    assert any("is a symbolic link owned by mallory" in p for p in found), found
    # root's own link (/var/run -> /run, a site's /scratch -> /lustre/scratch) is fine.
    assert problems(cluster, [st("/"), st(SCRATCH, "link", 0o777, "root")], DIRS) == []


def test_the_read_reports_links_owners_and_modes_without_following(tmp_path):
    """PathChains' snippet on this machine: a link is reported as one, with its own owner."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    fact = PathChains()
    out = subprocess.run(["sh", "-c", fact.snippet((str(link / "child"),))], capture_output=True, text=True)
    found = fact.process(out.stdout.splitlines())
    assert found["paths"][str(link)].kind == "link"
    assert found["paths"][str(tmp_path)].kind == "directory"
    assert found["paths"][str(tmp_path)].uid == os.geteuid()
    assert found["paths"]["/"].user == "root"
    assert str(link / "child") not in found["paths"]


def test_the_health_users_dir_left_by_a_removed_account_is_adopted(cluster):
    """/var/lib/nemotron-health owned by a uid with no account (the health user was removed, its
    directory kept): re-owned to the health user the deploy creates. Another account's is refused."""
    state = WantedDir(
        "/var/lib/nemotron-health", "750", "nemotron-health", "nemotron-health", adopt=True, guarded=True
    )
    base = [st("/"), st("/var"), st("/var/lib")]
    assert problems(cluster, [*base, st(state.path, mode=0o750, user="UNKNOWN")], [state]) == []
    found = problems(cluster, [*base, st(state.path, mode=0o750, user="mallory")], [state])
    assert any("is owned by mallory" in p for p in found), found
