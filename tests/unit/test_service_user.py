"""service_user: who the replicas' jobs are submitted as (never the deploy's SSH user, never root),
how the deploy and the rollout become it, and the preflight's refusal of an account that is missing
or differs between nodes (host_checks.service_user_problems)."""

from __future__ import annotations

import getpass
import os
import pwd
import subprocess

import pytest
from helpers import write_inventory

from nemotron_deploy import inventory
from nemotron_deploy.deploy import desired, host_checks
from nemotron_deploy.deploy.operations import accounts, submit
from nemotron_deploy.service.slurm import as_account


@pytest.fixture
def cluster(tmp_path):
    hosts = "login = ['login01']\ncompute = ['gpu1', 'gpu2']\n"
    return inventory.load(str(write_inventory(tmp_path, "h100", hosts=hosts)))


def snap_of(uid: str | None, **extra) -> dict:
    account = None if uid is None else {"uid": uid, "gecos": "", "group": "svcgrp", "groups": ["svcgrp"]}
    return {"service_user": account, **extra}


def test_jobs_are_submitted_as_the_service_user_whoever_the_deploy_connects_as(cluster):
    login = desired.Login.of(cluster, snap_of("2000", submit={"user": "root", "slurm_bin": "/usr/bin"}))
    assert (login.submit_as, login.submit_group, login.deploy_user) == ("nemotron", "svcgrp", "root")
    assert desired.records_owner(login) == ("nemotron", "svcgrp")
    rule = desired.sudoers(cluster, login)
    assert "nemotron-health ALL=(nemotron) NOPASSWD: NEMOTRON_REPLICAS" in rule
    assert "(root)" not in rule and "ALL=(ALL" not in rule


def test_the_deploy_becomes_the_service_user_with_runuser_as_root_and_sudo_otherwise(cluster):
    command = "sbatch --parsable x.sbatch"
    assert accounts.run_as("nemotron", command, "root") == f"runuser -u nemotron -- {command}"
    assert accounts.run_as("nemotron", command, "admin") == f"sudo -n -u nemotron -- {command}"
    assert accounts.run_as("nemotron", command, "nemotron") == command
    assert (
        accounts.run_as("nemotron", command, "root", cwd="/")
        == f"( cd / && runuser -u nemotron -- {command} )"
    )


def test_the_shell_decides_how_to_become_the_account_where_the_deploy_user_is_not_known():
    # A fact's read runs before the deploy knows who its shell is: the same three cases, at run time.
    me = getpass.getuser()
    done = subprocess.run(["sh", "-c", accounts.run_as(me, "pwd", cwd="/")], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "/\n")
    shell = accounts.run_as("nemotron", "id")
    assert "runuser -u nemotron --" in shell and "sudo -n -u nemotron --" in shell


def test_the_deploys_wait_trusts_only_the_service_users_job_and_record():
    command = submit.wait_command(
        venv="/opt/v", job_name="j-r1", port=1424, budget=60, job_user="nemotron", nodes_file="/jobs/nodes"
    )
    assert "--job-user nemotron" in command and "--nodes-file /jobs/nodes" in command


def test_the_rollout_submits_and_cancels_as_the_service_user(cluster):
    command = desired.rollout_command(cluster, desired.Login(submit_as="nemotron"))
    assert "--submit-as nemotron" in command


def test_as_account_from_a_process_that_already_is_the_account_adds_nothing():
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert as_account(me, ["sbatch", "x"]) == ["sbatch", "x"]
    assert as_account(None, ["sbatch", "x"]) == ["sbatch", "x"]
    other = as_account("nemotron-svc-test", ["sbatch", "x"])
    if os.geteuid() == 0:
        assert other == ["runuser", "-u", "nemotron-svc-test", "--", "sbatch", "x"]
    else:
        assert other == ["sudo", "-n", "-u", "nemotron-svc-test", "sbatch", "x"]


def test_a_node_where_the_service_user_has_another_uid_is_refused_naming_both(cluster):
    assert host_checks.service_user_problems(cluster, "login01", snap_of("2000")) == []
    assert host_checks.service_user_problems(cluster, "gpu1", snap_of("2000")) == []
    found = host_checks.service_user_problems(cluster, "gpu2", snap_of("2001"))
    assert len(found) == 1, found
    assert "service_user nemotron has UID 2001 here but 2000 on gpu1, 2000 on login01" in found[0]
    assert "Slurm runs each replica with the UID it was submitted with" in found[0]


def test_a_login_node_without_the_account_is_not_refused_the_deploy_creates_it(cluster):
    assert host_checks.service_user_problems(cluster, "login01", snap_of(None)) == []
    assert host_checks.service_user_problems(cluster, "gpu1", snap_of("2000")) == []


def test_a_compute_node_without_the_account_fails_preflight_naming_it(cluster):
    snap = snap_of(None, runtimes={"enroot": "4.1.2", "pyxis": "yes"}, gpus=None, model={"error": "x"})
    found = host_checks.compute_problems(cluster, snap)
    assert any("service_user nemotron does not exist here" in p for p in found), found


def test_docker_needs_the_service_user_in_the_docker_group(tmp_path):
    hosts = "login = ['login01']\ncompute = ['gpu1', 'gpu2']\n"
    path = write_inventory(
        tmp_path,
        "h100",
        hosts=hosts,
        settings={"container_runtime": "docker", "container_image": "nvcr.io/nvidia/nemo:24.01.framework"},
    )
    cluster = inventory.load(str(path))
    snap = snap_of("2000", runtimes={"docker": "20.10"}, gpus=None, model={"error": "x"})
    found = host_checks.compute_problems(cluster, snap)
    assert any("is not in the docker group here" in p for p in found), found
    snap["service_user"]["groups"] = ["svcgrp", "docker"]
    assert not any("docker group" in p for p in host_checks.compute_problems(cluster, snap))


def test_docker_needs_the_service_user_in_the_docker_group_on_the_login_node_too(tmp_path):
    """Slurm gives a job the groups its controller sees: found when the sandbox's login node lacked it."""
    hosts = "login = ['login01']\ncompute = ['gpu1', 'gpu2']\n"
    settings = {"container_runtime": "docker", "container_image": "nvcr.io/nvidia/nemo:24.01.framework"}
    cluster = inventory.load(str(write_inventory(tmp_path, "h100", hosts=hosts, settings=settings)))
    snap = snap_of("2000", slurm={"version": "22.05.8"}, haproxy={"service": None}, endpoint=False)
    found = host_checks.login_problems(cluster, snap)
    assert any("not in the docker group on this login node" in p for p in found), found
