"""Keeping the service up, on the sandbox (2 replicas on 4 compute nodes): the scheduled check, run
as its user exactly as cron runs it, replaces a replica whose job died (through the sudo rule the deploy
installed) and one whose server stays unhealthy; `state=stopped` stops the service and its replacement.

The sandbox's cron is paused for the tests (conftest.py): each test runs the cron entry's command
itself, once per "interval".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from nemotron_rehearsal import sandbox as sb_api
from sshutil import (
    AS_SERVICE_USER,
    CRON_FILE,
    HEALTH_USER,
    JOB_BASE,
    RECORDS_DIR,
    SBATCH,
    cancel_jobs,
    deploy_ok,
    job_ids,
    pyinfra,
    ssh,
    wait_for,
)
from test_replicas import _generated, _jobs, _put, _serve_both, _servers, steady_clients

from nemotron_deploy.service.slurm import files_digest

R1, R2 = f"{JOB_BASE}-r1", f"{JOB_BASE}-r2"


def _cron_command(sandbox) -> str:
    cron = ssh(sandbox, sandbox.login_host, f"cat {CRON_FILE}").stdout
    return cron.splitlines()[-1].split(f" {HEALTH_USER} ", 1)[1].removesuffix(" >/dev/null 2>&1")


def _check(sandbox, *extra: str) -> dict:
    """One scheduled check (as cron runs it, plus `extra` options), its JSON."""
    command = f"{_cron_command(sandbox)} --json {' '.join(extra)}"
    out = ssh(sandbox, sandbox.login_host, f"runuser -u {HEALTH_USER} -- {command}", check=False).stdout
    return json.loads(out)


@pytest.fixture(scope="module", autouse=True)
def _alone(sandbox):
    with sb_api.exclusive_use("keep-up tests (submit, kill and replace jobs)"):
        cancel_jobs(sandbox)
        ssh(sandbox, sandbox.login_host, "rm -f /var/lib/nemotron-health/state.json")
        yield
        cancel_jobs(sandbox)


def test_a_killed_replica_is_replaced_and_serves_again_with_no_client_request_lost(sandbox):
    _serve_both(sandbox)
    old_r2 = _jobs(sandbox)[R2][0]
    with steady_clients("keep up") as traffic:
        time.sleep(1)
        killed = time.monotonic()
        ssh(sandbox, sandbox.login_host, f"scancel {old_r2}")  # as a node failure would end it
        wait_for(lambda: R2 not in _jobs(sandbox), 60, "the killed r2 to end")
        # Within two check intervals a new job is submitted for r2 (as the deploy's user, via sudo).
        checks = [_check(sandbox) for _ in range(2)]
        replaced = [r["replacement"] for c in checks for r in c["replicas"] if r["name"] == "r2"]
        new_ids = [r["new_job_id"] for r in replaced if r and r.get("new_job_id")]
        assert len(new_ids) == 1, checks
        assert replaced[0]["cause"] == "gone"
        wait_for(lambda: _jobs(sandbox).get(R2, ("",))[0] == new_ids[0], 60, "the new r2 job to run")
        # It generates; the next check points the endpoint at it; HAProxy's check puts it UP.
        wait_for(lambda: _check(sandbox)["replicas"][1]["reason"] == "ok", 120, "the new r2 to generate")
        wait_for(lambda: _servers(sandbox)["r2"]["status"] == "UP", 30, "r2 UP in the endpoint")
        print(
            f"replica killed -> full capacity again: {time.monotonic() - killed:.1f}s (checks run back to back)"
        )
        before = int(_servers(sandbox)["r2"]["stot"])
        wait_for(lambda: int(_servers(sandbox)["r2"]["stot"]) > before, 30, "the new r2 to get requests")
    assert traffic.sent > 20
    assert len(traffic.failures) <= 1, traffic.failures  # at most the one in flight on r2 when it was killed
    log = ssh(sandbox, sandbox.login_host, "cat /var/lib/nemotron-health/state.json").stdout
    event = json.loads(log)["r2"]["events"][-1]
    assert (event["cause"], event["old_job_id"], event["new_job_id"]) == ("gone", "-", new_ids[0])


def test_a_replica_whose_server_stays_unhealthy_is_replaced(sandbox):
    """r2 runs a server that answers 200 with an error string after its start-up check: once it has
    failed the check longer than the threshold (shortened here), the check cancels it and submits r2
    again (a healthy one, from the deployed sbatch)."""
    _serve_both(sandbox)
    ssh(sandbox, sandbox.login_host, f"scancel --name={R2}")
    # Gone, COMPLETING included: its nodes are free for the faulty one.
    wait_for(lambda: R2 not in _jobs(sandbox) and len(job_ids(sandbox)) == 1, 120, "r2 to end")
    faulty = ssh(
        sandbox,
        sandbox.login_host,
        f"{AS_SERVICE_USER} sbatch --parsable --export=ALL,NEMO_EMULATOR_ERROR_AFTER=1 --job-name={R2} {SBATCH}",
    ).stdout.strip()
    wait_for(lambda: _jobs(sandbox).get(R2, ("",))[0] == faulty, 120, "the faulty r2 to run")
    # Submitted by hand, it is hidden from the check's user (PrivateData) until its record exists: a
    # check before that would see r2 gone and replace it.
    record = f"{RECORDS_DIR}/{R2}.job.json"
    wait_for(
        lambda: Path(record).exists() and f'"job_id": "{faulty}"' in Path(record).read_text(),
        60,
        "the faulty r2's record",
    )
    # Checks as scheduled (600 s threshold) see it start, then fail; then one with the threshold and
    # the start-up budget shortened replaces it.
    # Its generations fail: NeMo's Flask app (the stand-in serves through it) answers them with
    # 500 (http_error); an error string in a 200 would be `rejected`. Either is a server that does
    # not generate.
    failing = ("rejected", "http_error")
    wait_for(lambda: _check(sandbox)["replicas"][1]["reason"] in failing, 60, "r2 failing")
    assert _jobs(sandbox)[R2][0] == faulty, "replaced before the threshold"
    short = ("--unhealthy-restart-after", "2", "--budget", "1")
    _check(sandbox, *short)
    time.sleep(3)
    result = _check(sandbox, *short)
    r2 = result["replicas"][1]
    assert r2["replacement"]["action"] == "replace" and r2["replacement"]["cause"] == "unhealthy", r2
    new_id = r2["replacement"]["new_job_id"]
    wait_for(lambda: _jobs(sandbox).get(R2, ("",))[0] == new_id, 60, "the replacement to run")
    assert faulty not in {job_id for job_id, _ in _jobs(sandbox).values()}, "the faulty job still runs"
    wait_for(lambda: _check(sandbox)["replicas"][1]["reason"] == "ok", 120, "the new r2 to generate")


def test_stop_really_stops_and_the_check_replaces_nothing(sandbox):
    _serve_both(sandbox)
    try:
        run = deploy_ok("--data", "state=stopped")
        assert "Stop the service" in run.output
        wait_for(lambda: not _jobs(sandbox), 60, "every replica to end")
        for _ in range(2):
            result = _check(sandbox)
            assert (result["status"], result["reason"]) == ("OK", "stopped"), result
        time.sleep(2)
        assert not _jobs(sandbox), "the check resurrected a stopped replica"
        assert {k: v["status"] for k, v in _servers(sandbox).items()} == {"r1": "MAINT", "r2": "MAINT"}
        again = deploy_ok("--data", "state=stopped")  # stopped, nothing to change
        assert "Grand total" in again.output and not _jobs(sandbox)
    finally:
        run = pyinfra("--data", "submit=true", timeout=300)  # running again, for the next tests
        assert run.rc == 0, run.describe()


def _records_digest(sandbox) -> dict[str, str]:
    out = {}
    for name in (R1, R2):
        path = Path(f"{RECORDS_DIR}/{name}.job.json")
        if path.exists():
            out[name] = json.loads(path.read_text()).get("files")
    return out


def test_a_rollout_across_two_replicas_under_load_fails_no_client_request(sandbox):
    """Every node serves (4 nodes, 2 replicas): one replica at a time is drained, cancelled, submitted
    again on the new files and put back, while the other serves every request."""
    _serve_both(sandbox)
    old = files_digest(SBATCH)
    run = deploy_ok("--data", "slurm_time_limit=00:58:00")  # the sbatch changes: both replicas stale
    assert run.output.count("still runs the files of an earlier deploy") == 2, run.output
    assert _check(sandbox)["reason"] == "stale"
    with steady_clients("rollout") as traffic:
        started = time.monotonic()
        rolled = pyinfra("--data", "slurm_time_limit=00:58:00", "--data", "rollout=true", timeout=600)
        took = time.monotonic() - started
    assert rolled.rc == 0, rolled.describe()
    assert "rollout: done: every replica runs the current files" in rolled.output
    print(
        f"rollout of 2 replicas: {took:.1f}s, {traffic.sent} client requests, {len(traffic.failures)} failed"
    )
    assert traffic.failures == [], traffic.failures
    assert traffic.sent > 20
    new = files_digest(SBATCH)
    assert new != old and _records_digest(sandbox) == {R1: new, R2: new}
    assert _check(sandbox)["reason"] == "ok"
    # Back to the inventory's files, rolled out too, for the next tests.
    back = pyinfra("--data", "rollout=true", timeout=600)
    assert back.rc == 0, back.describe()


def test_a_rollout_whose_new_job_never_generates_leaves_the_old_replica_serve_both(sandbox):
    """One replica on 4 nodes: room for one more, so the new job starts beside the old one. It never
    generates (its server dies loading): the rollout stops, says so, and the old job keeps serving."""
    cancel_jobs(sandbox)
    one = ("--data", "replicas=1")
    run = pyinfra(*one, "--data", "submit=true", timeout=300)
    assert run.rc == 0, run.describe()
    old_job = _jobs(sandbox)[R1][0]
    broken = ("--data", 'job_env={"NEMO_EMULATOR_FAIL_LOAD": "1"}', "--data", "rollout=true")
    rolled = pyinfra(*one, *broken, timeout=600)
    assert rolled.rc != 0, rolled.describe()
    assert "did not generate" in rolled.output and f"job {old_job} keeps serving" in rolled.output, (
        rolled.output
    )
    assert _jobs(sandbox) == {R1: (old_job, _jobs(sandbox)[R1][1])}, "the old job is not the one running"
    assert all(_generated(*_put(f"still served {i}:")) for i in range(4))
    cancel_jobs(sandbox)
    assert pyinfra(*one).rc == 0  # the inventory's files again
