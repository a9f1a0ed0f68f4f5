"""Safe on a shared cluster (issue 18): the cluster's other users can't redirect the endpoint, make
root write through their links, or take over what root runs. Each test is an attack by an
unprivileged local account on the sandbox's login node (`nobody`, or the health check's own user),
run for real: real sshd, Slurm (PrivateData=jobs), sudo, HAProxy.

Every command the tests look at is the one the deploy installed or would run (the cron entry, the
rollout command from nemotron_deploy.deploy.desired), so each test names the real paths of the tree
under test, and fails on a tree without the protection.
"""

from __future__ import annotations

import json
import shlex
import time

import pytest
from nemotron_rehearsal import sandbox as sb_api
from sshutil import (
    HEALTH_METRICS_DIR,
    HEALTH_STATE_DIR,
    HEALTH_USER,
    INVENTORY,
    JOB_BASE,
    LOGS_DIR,
    REPO,
    SHARED,
    cancel_jobs,
    deploy_ok,
    endpoint_slots,
    pyinfra,
    reset_deploy,
    results_table,
    ssh,
    wait_for,
)

R1 = f"{JOB_BASE}-r1"
FORGED_NODE = "10.213.0.250"  # no compute node of the cluster: an impostor's address


@pytest.fixture(scope="module")
def alone(sandbox):
    """These tests reset the deploy and plant files on the login node: no other user of the sandbox
    (a concurrent test session, a benchmark) runs meanwhile (sandbox/locks.py)."""
    with sb_api.exclusive_use("shared-cluster tests (reset the deploy, plant files, stop the service)"):
        yield sandbox


@pytest.fixture(scope="module")
def deployed(alone):
    sandbox = alone
    """A fresh deploy (no replica submitted): the endpoint runs, the check is installed. No test here
    needs a replica to serve, so another run's leftover processes on a node don't hold them up."""
    reset_deploy(sandbox, wait_for_processes=False)
    deploy_ok()
    yield sandbox
    cancel_jobs(sandbox, wait_for_processes=False)


def cron_command(sandbox) -> str:
    cron = ssh(sandbox, sandbox.login_host, "cat /etc/cron.d/nemotron-health").stdout
    return cron.splitlines()[-1].split(f" {HEALTH_USER} ", 1)[1].removesuffix(" >/dev/null 2>&1")


def option(command: str, name: str) -> str:
    words = shlex.split(command)
    return words[words.index(name) + 1]


def run_check(sandbox) -> str:
    """The installed scheduled check, as its user, once: its Nagios lines."""
    run = ssh(
        sandbox, sandbox.login_host, f"runuser -u {HEALTH_USER} -- {cron_command(sandbox)}", check=False
    )
    assert run.returncode in (0, 1, 2), f"the check itself failed:\n{run.stdout}{run.stderr}"
    return run.stdout


def slot_address(sandbox, slot: str) -> str:
    return endpoint_slots(sandbox)[slot][0]


def forged(job_id: str = "4242", node: str = FORGED_NODE) -> str:
    record = {"job_id": job_id, "job_name": R1, "node": node, "user": "nobody", "started": int(time.time())}
    return json.dumps(record)


def test_a_record_forged_by_another_user_does_not_move_the_endpoint(deployed):
    """`nobody` writes replica r1's record naming an impostor's address where the check reads records;
    failing that (only the submitting account may write there), root itself puts a regular file owned
    by nobody there. The check says why it ignores it and never points slot r1 at the address."""
    sandbox = deployed
    login = sandbox.login_host
    records = option(cron_command(sandbox), "--records-dir")
    path = f"{records}/{R1}.job.json"
    ssh(sandbox, login, "cat > /tmp/forged.json && chmod 644 /tmp/forged.json", input=forged() + "\n")
    attempt = ssh(sandbox, login, f"runuser -u nobody -- cp /tmp/forged.json {path}", check=False)
    if attempt.returncode != 0:  # the directory is not nobody's to write: plant the file as root
        assert "Permission denied" in attempt.stderr, attempt.stderr
        ssh(sandbox, login, f"install -o nobody -g nogroup -m 644 /dev/stdin {path}", input=forged() + "\n")
    try:
        out = run_check(sandbox)
        r1 = next(line for line in out.splitlines() if line.startswith("r1 "))
        assert "untrusted_record" in r1 and "owned by nobody" in r1, out
        assert slot_address(sandbox, "r1") != FORGED_NODE, out
    finally:
        ssh(sandbox, login, f"rm -f {path}")


def test_a_symlinked_record_is_not_followed(deployed):
    """A link where r1's record goes, to a well-formed record of root's naming a cluster node: not
    followed (the check opens records with O_NOFOLLOW)."""
    sandbox = deployed
    login = sandbox.login_host
    records = option(cron_command(sandbox), "--records-dir")
    path = f"{records}/{R1}.job.json"
    target = f"{SHARED}/elsewhere-{R1}.job.json"
    node = sandbox.compute_names[0]
    ssh(sandbox, login, f"cat > {target} && ln -sfn {target} {path}", input=forged("4343", node) + "\n")
    try:
        out = run_check(sandbox)
        r1 = next(line for line in out.splitlines() if line.startswith("r1 "))
        assert "untrusted_record" in r1 and "symbolic link" in r1, out
        address = ssh(sandbox, login, f"getent hosts {node} | cut -d' ' -f1").stdout.strip()
        assert slot_address(sandbox, "r1") not in (node, address), out
    finally:
        ssh(sandbox, login, f"rm -f {path} {target}")


def test_another_users_job_named_like_a_replica_is_left_alone(deployed):
    """`nobody` submits a job named like replica r1. Stopping the service (the deploy, as root, which
    sees every job) cancels the service's replicas, never nobody's job."""
    sandbox = deployed
    login = sandbox.login_host
    submit = f"sbatch --parsable --chdir=/tmp -p gpu -o /dev/null --job-name={R1} --wrap 'sleep 300'"
    job = ssh(sandbox, login, f"runuser -u nobody -- {submit}").stdout.strip()

    def state() -> str:
        return ssh(sandbox, login, f"squeue -h -j {job} -o %T", check=False).stdout.strip()

    try:
        wait_for(lambda: state() in ("PENDING", "RUNNING"), 30, f"nobody's job {job}")
        run = pyinfra("--data", "state=stopped")
        assert run.rc == 0, run.describe()
        assert state() in ("PENDING", "RUNNING"), f"nobody's job {job} was cancelled:\n{run.output[-3000:]}"
    finally:
        ssh(sandbox, login, f"scancel {job}", check=False)
        deploy_ok()  # running again (nothing submitted) for the next tests


def _rollout_command() -> str:
    """The rollout the deploy runs as root on the login node, from the tree under test."""
    from nemotron_deploy import inventory
    from nemotron_deploy.deploy import desired

    cluster = inventory.load(str(REPO / INVENTORY))
    return desired.rollout_command(cluster, desired.Login(init="cron", endpoint=True))


def test_links_the_health_user_plants_are_never_followed_by_root(deployed):
    """The health user owns its state and metrics directories. It plants links there, under every name
    root ever wrote or opened in them (the started file and its temp, the locks), pointing at a file
    of root's and at a path that does not exist. Then root acts: the deploy submits the replicas (it
    writes the started file) and runs the rollout (it opens the check's lock). The file is unchanged
    and the missing path still missing. The jobs' logs (NeMo logs every prompt) are not readable by
    other users."""
    sandbox = deployed
    login = sandbox.login_host
    canary, missing = "/root/nemotron-canary", "/root/nemotron-canary-created"
    ssh(sandbox, login, f"echo untouched > {canary}; chmod 600 {canary}; rm -f {missing}")
    names = ["started.json", "started.json.tmp", "state.json.lock", "check.lock"]
    plant = "; ".join(
        f"ln -sfn {target} {d}/{name}"
        for d in (HEALTH_STATE_DIR, HEALTH_METRICS_DIR)
        for name, target in zip(names, [canary, missing, missing, canary], strict=True)
    )
    ssh(sandbox, login, f"runuser -u {HEALTH_USER} -- sh -c {shlex.quote(plant)}")
    try:
        # Root writes the started file right after sbatch; whether the replicas then serve is not
        # this test's question.
        run = pyinfra("--data", "submit=true", timeout=500)
        assert "submitted" in run.output, run.describe()
        rollout = ssh(sandbox, login, f"{_rollout_command()} --dry-run", check=False)
        assert rollout.returncode == 0, rollout.stdout + rollout.stderr
        assert ssh(sandbox, login, f"cat {canary}").stdout == "untouched\n"
        assert ssh(sandbox, login, f"test -e {missing}", check=False).returncode != 0, (
            f"root followed a planted link and created {missing}"
        )
        # The jobs' output: the submitting account's (root's) alone.
        wait_for(
            lambda: [n for n in ssh(sandbox, login, f"ls {LOGS_DIR}").stdout.split() if n.endswith(".out")],
            60,
            "a job log",
        )
        logs = [n for n in ssh(sandbox, login, f"ls {LOGS_DIR}").stdout.split() if n.endswith(".out")]
        read = ssh(sandbox, login, f"runuser -u nobody -- cat {LOGS_DIR}/{logs[0]}", check=False)
        assert read.returncode != 0 and "Permission denied" in read.stderr, read.stdout[:500]
    finally:
        ssh(
            sandbox,
            login,
            f"rm -f {canary} {missing}; "
            + "; ".join(f"rm -f {d}/{n}" for d in (HEALTH_STATE_DIR, HEALTH_METRICS_DIR) for n in names),
        )
        cancel_jobs(sandbox, wait_for_processes=False)


@pytest.mark.parametrize("planted", ["link", "directory"])
def test_a_directory_another_user_made_on_a_shared_scratch_dir_stops_the_deploy(deployed, planted):
    """shared_dir on a 1777 scratch directory, where `nobody` made nemotron-deploy first (a link to a
    directory of theirs, or a directory of theirs): the deploy refuses before any host changes,
    naming the path, its owner and mode, and the fix; nobody's directory stays empty."""
    sandbox = deployed
    login = sandbox.login_host
    scratch = f"{SHARED}/scratch"
    theirs = f"{scratch}/nobodys"
    make = (
        f"mkdir {theirs} && ln -s {theirs} {scratch}/nemotron-deploy"
        if planted == "link"
        else f"mkdir {scratch}/nemotron-deploy"
    )
    ssh(sandbox, login, f"rm -rf {scratch} && mkdir -m 1777 {scratch} && chmod 1777 {scratch}")
    ssh(sandbox, login, f"runuser -u nobody -- sh -c {shlex.quote(make)}")
    try:
        run = pyinfra("--data", f"shared_dir={scratch}")
        assert run.rc != 0, run.describe()
        assert f"{scratch}/nemotron-deploy" in run.output and "owner nobody" in run.output, run.output[-3000:]
        assert "choose another shared_dir" in run.output and "nothing was changed" in run.output
        left = ssh(sandbox, login, f"find {scratch} -mindepth 1 ! -user nobody").stdout.strip()
        assert left == "", f"the deploy wrote into nobody's directory: {left}"
        own = theirs if planted == "link" else f"{scratch}/nemotron-deploy"
        assert ssh(sandbox, login, f"ls -A {own}").stdout.strip() == ""
    finally:
        ssh(sandbox, login, f"rm -rf {scratch}")


def test_an_existing_account_the_deploy_did_not_make_is_not_made_the_health_user(deployed):
    """health_user = nobody (a system account that exists): the deploy refuses before any change,
    naming it and the way out; nobody gets no sudo rule, no state directory, no socket group."""
    sandbox = deployed
    run = pyinfra("--data", "health_user=nobody")
    assert run.rc != 0, run.describe()
    assert "health_user nobody already exists" in run.output, run.output[-3000:]
    assert "health_user_existing = true" in run.output and "nothing was changed" in run.output
    rule = ssh(sandbox, sandbox.login_host, "cat /etc/sudoers.d/nemotron-health", check=False).stdout
    assert "nobody" not in rule, rule


def test_a_service_user_missing_on_the_compute_nodes_stops_the_deploy(deployed):
    """service_user must be one account on every node (Slurm runs the job with the submitting UID):
    an account the compute nodes don't have stops the deploy before any change, naming each node;
    the login node does not get it either."""
    sandbox = deployed
    run = pyinfra("--data", "service_user=nemotron-nowhere")
    assert run.rc != 0, run.describe()
    # pyinfra stops at the first host that fails its checks, before any change anywhere.
    assert any(f"preflight failed on {node} (compute)" in run.output for node in sandbox.compute_names)
    assert "service_user nemotron-nowhere does not exist here" in run.output, run.output[-3000:]
    assert "nothing was changed" in run.output, run.output[-3000:]
    made = ssh(sandbox, sandbox.login_host, "getent passwd nemotron-nowhere", check=False).stdout
    assert made == "", f"the login node got the account although the deploy stopped: {made}"


def test_the_login_node_gets_the_service_user_with_the_compute_nodes_uid(deployed):
    """A login node without the account (the compute nodes have it): the deploy creates it there with
    the compute nodes' UID, marked as the deploy's; the next deploy changes nothing."""
    sandbox = deployed
    login = sandbox.login_host
    uid = ssh(sandbox, sandbox.compute_names[0], "id -u nemotron").stdout.strip()
    ssh(sandbox, login, "userdel nemotron")
    try:
        deploy_ok()
        account = ssh(sandbox, login, "getent passwd nemotron").stdout.strip().split(":")
        assert account[2] == uid, f"UID {account[2]} on the login node, {uid} on the compute nodes"
        assert account[4] == "nemotron-deploy service", account
        assert (
            ssh(sandbox, login, "stat -c %U " + f"{SHARED}/nemotron-deploy/records").stdout.strip()
            == "nemotron"
        )
        again = results_table(deploy_ok().output)
        assert again["Grand total"]["Success"] == "-", f"the next deploy changed things: {again}"
    finally:
        if ssh(sandbox, login, "getent passwd nemotron", check=False).stdout == "":
            ssh(sandbox, login, f"useradd --uid {uid} --user-group --no-create-home nemotron")
