"""Scale-down and the rollout's room, on the sandbox (4 compute nodes, 2-node replicas, partition gpu).

- A deploy with `replicas=1` while 2 replicas serve cancels r2's job (the submitting account's, by
  name), puts slot r2 in maintenance, and the scheduled check (now `--replicas 1`) neither counts
  nor replaces r2; the endpoint keeps answering. The dry run names the job it will cancel; a second
  deploy changes nothing.
- The rollout asks Slurm for room before each replica: with r1 alone on 4 nodes, 2 idle nodes make
  room and it surges; with another user's job holding those 2 nodes (the partition is shared), it
  drains and replaces instead of leaving a surge job pending. The plan alone (2 replicas' worth of
  nodes, 1 running) would have surged both times.
"""

from __future__ import annotations

import pytest
from nemotron_rehearsal import sandbox as sb_api
from sshutil import (
    HEALTH_METRICS_DIR,
    JOB_BASE,
    cancel_jobs,
    converged_attempts,
    deploy_ok,
    dry_plan,
    pyinfra,
    reset_deploy,
    results_table,
    ssh,
    wait_for,
)
from test_keep_up import _check
from test_replicas import _generated, _jobs, _put, _serve_both, _servers

R1, R2 = f"{JOB_BASE}-r1", f"{JOB_BASE}-r2"
ONE = ("--data", "replicas=1")
OTHER_USER = "nobody"  # another account of the cluster, with work of its own on the partition


def _idle_nodes(sandbox) -> list[str]:
    out = ssh(sandbox, sandbox.login_host, "sinfo -h -N -p gpu -t idle -o '%n %t'").stdout
    return sorted(name for name, state in (line.split() for line in out.splitlines()) if state == "idle")


def _active(sandbox, name: str) -> list[str]:
    """Job ids named `name` Slurm still has (pending, running or ending), any account's."""
    out = ssh(sandbox, sandbox.login_host, f"squeue -h -n {name} -t PD,R,CF,CG -o %i").stdout
    return out.split()


@pytest.fixture(scope="module", autouse=True)
def _alone(sandbox):
    with sb_api.exclusive_use("scale-down and rollout-room tests (submit, cancel, take nodes)"):
        reset_deploy(sandbox)  # from nothing: what another branch's deploy left is not this one's
        yield
        cancel_jobs(sandbox)
        deploy_ok()  # the inventory's own settings again, for the next modules


def test_a_deploy_with_fewer_replicas_cancels_the_ones_above_and_keeps_serving(sandbox):
    _serve_both(sandbox)
    r2_job = _jobs(sandbox)[R2][0]
    # What the deploy will cancel, from its read of the cluster (pyinfra's dry run).
    planned = dry_plan(*ONE)
    cancel_op = f"Scale down to 1 replica(s): cancel {R2} (job {r2_job}), slots in maintenance"
    assert cancel_op in planned and planned[cancel_op] == ["sb-login"], sorted(planned)

    run = deploy_ok(*ONE)
    print(f"scale-down deploy (replicas 2 -> 1, r2 drained, cancelled, gone): {run.seconds:.1f}s")
    assert f"scale-down: {R2} (job {r2_job} RUNNING) is above replicas=1" in run.output, run.output
    wait_for(lambda: not _active(sandbox, R2), 60, "r2's job to leave the queue")
    assert R1 in _jobs(sandbox)
    assert _servers(sandbox)["r2"]["status"] == "MAINT", _servers(sandbox)["r2"]
    # The endpoint answers (r1; after the deploy's reload, once HAProxy's own check passes).
    wait_for(lambda: _generated(*_put("after the scale-down:")), 60, "a generation through the endpoint")

    # The scheduled check (cron's command, now --replicas 1): r1 only, OK; r2 neither counted nor
    # replaced, its slot left in maintenance.
    for _ in range(2):
        result = _check(sandbox)
        assert (result["status"], result["replicas_configured"]) == ("OK", 1), result
        assert [r["name"] for r in result["replicas"]] == ["r1"], result
        assert result["endpoint"]["replicas_up"] == 1, result["endpoint"]
        assert result["endpoint"]["servers"]["r2"] == "maint", result["endpoint"]
    assert not _active(sandbox, R2), "the check submitted r2 again"
    assert _servers(sandbox)["r2"]["status"] == "MAINT"
    prom = ssh(sandbox, sandbox.login_host, f"cat {HEALTH_METRICS_DIR}/nemotron.prom").stdout
    assert 'replica="r1"' in prom and 'replica="r2"' not in prom, prom
    up = [line for line in prom.splitlines() if line.startswith("nemotron_endpoint_replicas_up{")]
    assert len(up) == 1 and up[0].endswith(" 1.0"), up

    def no_change() -> None:
        again = deploy_ok(*ONE)
        assert "Scale down" not in again.output
        assert results_table(again.output)["Grand total"]["Success"] == "-", again.output

    converged_attempts(no_change, 3, *ONE)


def _rollout(*data: str) -> str:
    run = pyinfra(*ONE, *data, "--data", "rollout=true", timeout=600)
    assert run.rc == 0, run.describe()
    print(f"deploy with rollout of r1: {run.seconds:.1f}s")
    assert "rollout: done: every replica runs the current files" in run.output, run.output
    return run.output


def test_the_rollout_surges_when_slurm_has_the_idle_nodes(sandbox):
    """r1 alone on 4 nodes: 2 idle nodes with 8 GPUs, a replica needs 2 -> the new job beside the old."""
    if set(_jobs(sandbox)) != {R1}:
        cancel_jobs(sandbox)
        assert pyinfra(*ONE, "--data", "submit=true", timeout=300).rc == 0
    wait_for(lambda: len(_idle_nodes(sandbox)) == 2, 60, "r2's nodes idle")
    idle = _idle_nodes(sandbox)
    old = _jobs(sandbox)[R1][0]
    out = _rollout("--data", "slurm_time_limit=00:58:00")
    assert (
        f"rollout: r1: surge: 2 idle nodes with 8 gpu in partition gpu ({', '.join(idle)}), a replica needs 2"
        in out
    )
    assert f"beside job {old}; waiting until it generates" in out, out
    assert _jobs(sandbox)[R1][0] != old
    assert _generated(*_put("after the surge:"))


def test_the_rollout_drains_and_replaces_when_other_work_holds_the_idle_nodes(sandbox):
    """Another user's job takes the 2 idle nodes: no room now, whatever the plan says -> r1 is drained,
    cancelled and submitted again on its own freed nodes (a surge job would wait PENDING)."""
    if set(_jobs(sandbox)) != {R1}:
        cancel_jobs(sandbox)
        assert pyinfra(*ONE, "--data", "submit=true", timeout=300).rc == 0
    wait_for(lambda: len(_idle_nodes(sandbox)) == 2, 60, "2 idle nodes")
    other = ssh(
        sandbox,
        sandbox.login_host,
        f"cd /tmp && runuser -u {OTHER_USER} -- sbatch --parsable -N2 --exclusive --gres=gpu:8 -p gpu "
        "-o /dev/null -e /dev/null -J other-work --wrap 'sleep 900'",
    ).stdout.strip()
    try:
        wait_for(lambda: not _idle_nodes(sandbox), 60, "the other user's job to hold the idle nodes")
        old = _jobs(sandbox)[R1][0]
        out = _rollout()  # back to the inventory's time limit: r1 is stale again
        assert (
            "rollout: r1: drain-and-replace: 0 idle nodes with 8 gpu in partition gpu, a replica needs 2"
            in out
        )
        assert f"no room for one more replica: draining job {old}" in out, out
        assert _jobs(sandbox)[R1][0] != old
        assert _active(sandbox, "other-work") == [other], "the other user's job was touched"
        assert _generated(*_put("after drain-and-replace:"))
    finally:
        ssh(sandbox, sandbox.login_host, f"scancel {other}")
        wait_for(lambda: not _active(sandbox, "other-work"), 60, "the other user's job to end")
