"""Scale-down's decisions (service/scale_down.py, deploy/steps.py): which of the submitting account's
jobs are replicas above `replicas`, when the deploy adds an operation, and what `plan` says.
The whole path (drain, maintenance, scancel) runs against a real HAProxy in tests/local/test_fleet.py
and on the sandbox in tests/sandbox/test_scale_down.py."""

from __future__ import annotations

import json

from helpers import run_main, write_inventory

from nemotron_deploy.deploy import desired, steps
from nemotron_deploy.inventory import load
from nemotron_deploy.service import scale_down

# `squeue -h -t all -u root -o '%i %T %j'` on the sandbox: the replicas, an ended one, another job.
SQUEUE = """\
41 RUNNING nemotron-340b-r1
42 RUNNING nemotron-340b-r2
43 PENDING nemotron-340b-r3
39 CANCELLED nemotron-340b-r2
44 COMPLETING nemotron-340b-r4
45 RUNNING nemotron-340b-r2-debug
46 RUNNING my job with spaces
47 RUNNING nemotron-340b-r05
"""
FOUR_NODES = 'login = ["login01"]\ncompute = ["gpu-001", "gpu-002", "gpu-003", "gpu-004"]\n'


def test_replicas_above_the_count_are_found_by_name_and_state():
    assert scale_down.extra_replicas(SQUEUE, "nemotron-340b", 1) == {
        2: [("42", "RUNNING")],
        3: [("43", "PENDING")],
        4: [("44", "COMPLETING")],
    }
    assert scale_down.extra_replicas(SQUEUE, "nemotron-340b", 4) == {}
    # A job only ending is not one to cancel (the deploy has nothing to do for it).
    assert list(scale_down.to_cancel(scale_down.extra_replicas(SQUEUE, "nemotron-340b", 1))) == [2, 3]
    assert scale_down.extra_replicas(SQUEUE, "other", 0) == {}


def test_the_squeue_asks_for_one_account_only():
    argv = scale_down.squeue_argv("/usr/bin", "nemotron")
    assert argv == ["/usr/bin/squeue", "-h", "-t", "all", "--user=nemotron", "-o", "%i %T %j"]


def cluster(tmp_path, replicas):
    return load(str(write_inventory(tmp_path, "h100", hosts=FOUR_NODES, settings={"replicas": replicas})))


def test_the_deploy_cancels_only_with_a_job_above_the_count(tmp_path):
    one = cluster(tmp_path, 1)
    snap = {"account_jobs": SQUEUE.splitlines()}
    assert list(steps.extra_replicas(one, snap)) == [2, 3]
    assert steps.extra_replicas(one, {"account_jobs": ["41 RUNNING nemotron-340b-r1"]}) == {}
    assert steps.extra_replicas(one, {"account_jobs": []}) == {}
    argv = desired.scale_down_command(one, desired.Login(submit_as="nemotron", endpoint=True)).split()
    assert argv[argv.index("--replicas") + 1] == "1"
    assert argv[argv.index("--user") + 1] == "nemotron"
    assert "--endpoint-socket" in argv and "--lock" in argv


def test_the_endpoint_keeps_a_slot_per_replica_the_nodes_hold(tmp_path):
    """replicas = 1 of the 2 the nodes hold: slots r1..r2, so lowering `replicas` removes no slot (the
    scale-down's is in maintenance); the per-key limit follows the replicas that run."""
    cfg = next(f for f in desired.endpoint_files(cluster(tmp_path, 1)) if f.path.endswith("haproxy.cfg"))
    assert "server-template r 1-2 " in cfg.content
    assert "those above r1 (replicas = 1) stay in" in cfg.content
    assert "sc0_conn_cur gt 1 }" in cfg.content


def test_plan_says_what_a_deploy_cancels_and_how_a_rollout_chooses(tmp_path, capsys):
    path = write_inventory(tmp_path, "h100", hosts=FOUR_NODES, settings={"replicas": 1})
    assert run_main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "scale-down         a deploy cancels the submitting account's jobs nemotron-340b-r2 and above" in out
    )
    assert (
        "surge (new job beside the old) when Slurm has 2 idle node(s) with 8 GPUs in partition batch" in out
    )
    assert run_main(["plan", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scale_down"]["keeps"] == ["nemotron-340b-r1"]
    assert data["scale_down"]["cancels_from"] == "nemotron-340b-r2"
    assert (data["rollout"]["nodes_per_replica"], data["rollout"]["gpus_per_node"]) == (2, 8)


def test_lowering_replicas_leaves_the_running_ones_current(tmp_path):
    """The job files' digest (what marks a running replica stale) does not depend on `replicas`: a
    scale-down must not ask for a rollout of the replicas it keeps."""
    one, two = cluster(tmp_path / "one", 1), cluster(tmp_path / "two", 2)
    assert desired.files_digest(one) == desired.files_digest(two)


def test_the_deploys_read_lists_the_service_users_jobs():
    """The replicas run as service_user, not as the deploy's SSH user: their jobs are that account's."""
    from nemotron_deploy.deploy.facts.slurm import AccountJobs

    assert AccountJobs().snippet("nemotron") == (
        "squeue -h -t all --user=nemotron -o '%i %T %j' 2>/dev/null || true"
    )
