"""Replicas behind the endpoint, on the sandbox: 4 compute nodes hold 2 replicas of the 2-node layout.

The deploy (`--data submit=true`) submits one Slurm job per replica and waits for both; HAProxy on the
login node (started by the deploy, from Debian's package and its init script: the sandbox's login node
has no systemd) serves both, takes a replica that answers 200 with an error string out of rotation,
and loses at most one client request when a replica's job is cancelled under load. A re-deploy with
nothing changed changes nothing and leaves HAProxy running as it was.
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import model_card_client
from nemotron_rehearsal import sandbox as sb_api
from sshutil import (
    AS_SERVICE_USER,
    CRON_FILE,
    HEALTH_USER,
    HEALTH_VENV,
    JOB_BASE,
    RECORDS_DIR,
    SBATCH,
    cancel_jobs,
    converged_attempts,
    deploy_ok,
    endpoint_put,
    job_ids,
    pyinfra,
    results_table,
    ssh,
    wait_for,
)

R1, R2 = f"{JOB_BASE}-r1", f"{JOB_BASE}-r2"
SOCKET = "/run/haproxy/admin.sock"


def _put(prompt: str, timeout: float = 30) -> tuple[int, str]:
    """Through the endpoint (TLS, the rehearsal's API key), as a client on the cluster network."""
    body = {"sentences": [prompt], "tokens_to_generate": 4, "temperature": 1.0, "top_k": 1}
    return endpoint_put(body, timeout)


def _generated(status: int, text: str) -> bool:
    return status == 200 and isinstance(json.loads(text), dict) and "sentences" in json.loads(text)


class Traffic:
    """Client threads sending the model card's kind of request through the endpoint every 50 ms, each
    answer checked: `sent` requests so far, `failures` (what failed and how)."""

    def __init__(self, tag: str, limit: int | None, before: Callable[[int], None] | None) -> None:
        self.tag, self.limit, self.before = tag, limit, before
        self.sent = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def _client(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self.limit is not None and self.sent >= self.limit:
                    return
                self.sent += 1
                n = self.sent
            if self.before:
                self.before(n)
            try:
                status, text = _put(f"{self.tag} {n}:")
                if not _generated(status, text):
                    self.failures.append(f"{n}: {status} {text[:200]}")
            except OSError as exc:
                self.failures.append(f"{n}: {exc!r}")
            time.sleep(0.05)

    def join(self, timeout: float) -> None:
        """Wait for the clients to end (all `limit` requests sent), at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


@contextmanager
def steady_clients(
    tag: str, clients: int = 2, *, limit: int | None = None, before: Callable[[int], None] | None = None
) -> Iterator[Traffic]:
    """`clients` threads send requests (`before(n)` runs before the n-th) until the block ends or
    `limit` requests were sent."""
    traffic = Traffic(tag, limit, before)
    traffic.threads = [threading.Thread(target=traffic._client) for _ in range(clients)]
    for t in traffic.threads:
        t.start()
    try:
        yield traffic
    finally:
        traffic._stop.set()
        traffic.join(60)


def _haproxy(sandbox, command: str) -> str:
    """A runtime API command on the login node, as the health user (the socket's group)."""
    script = (
        f"from nemotron_deploy.service import endpoint_sync as e; print(e.command({SOCKET!r}, {command!r}))"
    )
    return ssh(
        sandbox, sandbox.login_host, f'runuser -u {HEALTH_USER} -- {HEALTH_VENV}/bin/python -c "{script}"'
    ).stdout


def _servers(sandbox) -> dict[str, dict[str, str]]:
    """`show stat` rows of the replicas' slots: {r1: {status, stot, addr, ...}}."""
    text = _haproxy(sandbox, "show stat").lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    # The replicas' slots r1..rN (not BACKEND, nor the spare slot u1 that rollouts use).
    return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["svname"].startswith("r")}


def _scheduled_check(sandbox) -> str:
    """Run the timer's command now, as its user (cron would in the next minute)."""
    cron = ssh(sandbox, sandbox.login_host, f"cat {CRON_FILE}").stdout
    command = cron.splitlines()[-1].split(f" {HEALTH_USER} ", 1)[1].removesuffix(" >/dev/null 2>&1")
    return ssh(sandbox, sandbox.login_host, f"runuser -u {HEALTH_USER} -- {command}", check=False).stdout


def _jobs(sandbox) -> dict[str, tuple[str, str]]:
    """{job name: (job id, node list)} of the replicas Slurm runs."""
    out = ssh(sandbox, sandbox.login_host, f"squeue -h -t RUNNING -n {R1},{R2} -o '%j %i %N'").stdout
    return {name: (job_id, nodes) for name, job_id, nodes in (line.split() for line in out.splitlines())}


def _haproxy_pid(sandbox) -> str:
    return ssh(sandbox, sandbox.login_host, "cat /run/haproxy.pid").stdout.strip()


def _both_up(sandbox, timeout: float = 60) -> None:
    wait_for(
        lambda: {k: v["status"] for k, v in _servers(sandbox).items()} == {"r1": "UP", "r2": "UP"},
        timeout,
        "both replicas UP in the endpoint",
    )


def _serve_both(sandbox) -> None:
    """Both replicas submitted by the deploy and in the endpoint (again, after a test ended one)."""
    if set(_jobs(sandbox)) != {R1, R2}:
        run = pyinfra("--data", "submit=true", timeout=300)
        assert run.rc == 0, run.describe()
    else:  # e.g. a replica the check replaced: the check (paused cron's) points its slot at it
        wait_for(lambda: "r2 OK" in _scheduled_check(sandbox), 120, "both replicas to generate")
    _both_up(sandbox)


@pytest.fixture(scope="module")
def submitted(sandbox):
    """The deploy with submit=true, from no job at all; (its run). Every test here holds the sandbox."""
    with sb_api.exclusive_use("replica tests (submit and cancel jobs)"):
        cancel_jobs(sandbox)
        run = pyinfra("--data", "submit=true", timeout=300)
        assert run.rc == 0, run.describe()
        yield run
        cancel_jobs(sandbox)


def test_the_deploy_runs_one_job_per_replica_and_waits_for_every_one(sandbox, submitted):
    jobs = _jobs(sandbox)
    assert set(jobs) == {R1, R2}, jobs
    assert jobs[R1][1] != jobs[R2][1], f"both replicas on the same nodes: {jobs}"
    for name in (R1, R2):  # each replica's progress and outcome, prefixed with its job name
        assert f"[{name}] NEMOTRON OK - ready after" in submitted.output, submitted.output[-4000:]
    assert f"--job-name={JOB_BASE}-r1" in open(SBATCH).read()
    _both_up(sandbox)


def test_both_replicas_serve_through_the_endpoint(sandbox, submitted):
    _serve_both(sandbox)
    before = {k: int(v["stot"]) for k, v in _servers(sandbox).items()}
    answers = [_put(f"Question {i}:") for i in range(12)]
    assert all(_generated(*a) for a in answers), answers
    after = {k: int(v["stot"]) for k, v in _servers(sandbox).items()}
    # Health checks don't count in stot: these are client requests, and both replicas got some.
    served = {k: after[k] - before[k] for k in after}
    assert sum(served.values()) >= 12 and all(n > 0 for n in served.values()), served


def test_the_model_card_client_on_the_login_node_meets_the_closed_endpoint(sandbox, submitted):
    """The card's unchanged client calls http://localhost:1424 without a key: on the login node that
    is now the endpoint, with TLS and API keys, so it gets no generation there (it is answered where it
    runs as the card means it to, on a replica's own node: test_e2e)."""
    client = model_card_client()
    _serve_both(sandbox)
    before = {k: int(v["stot"]) for k, v in _servers(sandbox).items()}
    run = ssh(sandbox, sandbox.login_host, f"cd /tmp && python3 {client}", check=False)
    assert run.returncode != 0, run.stdout + run.stderr
    after = {k: int(v["stot"]) for k, v in _servers(sandbox).items()}
    assert after == before, "the card's keyless request reached a replica"


def test_a_replica_answering_200_with_an_error_string_is_taken_out(sandbox, submitted):
    """r2 is resubmitted with a server that, after its start-up check, answers every generation 200
    with a JSON string (NeMo's way of failing): the endpoint marks it DOWN and r1 serves everything."""
    _serve_both(sandbox)
    ssh(sandbox, sandbox.login_host, f"scancel -n {R2}")
    wait_for(lambda: R2 not in _jobs(sandbox) and len(job_ids(sandbox)) == 1, 60, "r2 to end")
    ssh(
        sandbox,
        sandbox.login_host,
        f"{AS_SERVICE_USER} sbatch --parsable --export=ALL,NEMO_EMULATOR_ERROR_AFTER=1 --job-name={R2} {SBATCH}",
    )
    wait_for(lambda: R2 in _jobs(sandbox), 60, "the faulty r2 to run")
    # Submitted by hand, it is hidden from the check's user (PrivateData) until its batch script writes
    # its record: a check before that would see r2 gone and replace it with a healthy one.
    faulty = _jobs(sandbox)[R2][0]
    record = Path(f"{RECORDS_DIR}/{R2}.job.json")
    wait_for(lambda: record.exists() and f'"job_id": "{faulty}"' in record.read_text(), 60, "its record")
    try:
        # The scheduled check points slot r2 at the new job's node; HAProxy's own check then fails it.
        wait_for(
            lambda: (
                _scheduled_check(sandbox) and _servers(sandbox)["r2"]["addr"].split(":")[0] != "127.0.0.1"
            ),
            90,
            "slot r2 to point at the new job",
        )
        # DOWN for 6 s running (a few of HAProxy's checks): not merely DOWN while its server loads
        # (refused), after which the first generation, the only good one, may bring it UP for a while.
        down_since: list[float] = []

        def down_for_6s() -> bool:
            if not _servers(sandbox)["r2"]["status"].startswith("DOWN"):
                down_since.clear()
                return False
            down_since[:] = down_since or [time.monotonic()]
            return time.monotonic() - down_since[0] >= 6

        wait_for(down_for_6s, 60, "r2 DOWN for 6 s running")
        servers = _servers(sandbox)
        assert servers["r2"]["status"].startswith("DOWN") and servers["r1"]["status"] == "UP", servers
        before = int(servers["r1"]["stot"])
        answers = [_put(f"Only r1 {i}:") for i in range(6)]
        assert all(_generated(*a) for a in answers), answers
        assert int(_servers(sandbox)["r1"]["stot"]) - before == 6
    finally:
        ssh(sandbox, sandbox.login_host, f"scancel -n {R2}")
        wait_for(lambda: R2 not in _jobs(sandbox), 60, "the faulty r2 to end")


def test_cancelling_a_replica_under_load_costs_at_most_one_client_request(sandbox, submitted):
    """Two clients send a steady stream through the endpoint; r2's job is scancel-ed half-way. At
    most one request fails (one that was on r2 when it died), and the endpoint keeps answering."""
    _serve_both(sandbox)
    total, kill_at = 80, 30

    def kill_r2_half_way(n: int) -> None:
        if n == kill_at:
            ssh(sandbox, sandbox.login_host, f"scancel -n {R2}")

    with steady_clients("stream", limit=total, before=kill_r2_half_way) as traffic:
        traffic.join(150)
    assert traffic.sent == total
    assert len(traffic.failures) <= 1, traffic.failures
    assert R2 not in _jobs(sandbox), "r2 still runs: the scancel did not happen"
    assert _generated(*_put("after the kill:"))
    # The scheduled check takes the gone replica's slot out of the endpoint (maintenance).
    out = _scheduled_check(sandbox)
    assert "r2" in out and "job_gone" in out, out
    assert _servers(sandbox)["r2"]["status"] == "MAINT", _servers(sandbox)["r2"]


def test_a_redeploy_with_nothing_changed_leaves_haproxy_alone(sandbox, submitted):
    _serve_both(sandbox)
    pid = _haproxy_pid(sandbox)

    def no_change() -> None:
        run = deploy_ok()
        assert results_table(run.output)["Grand total"]["Success"] == "-", run.output

    converged_attempts(no_change)
    assert _haproxy_pid(sandbox) == pid, "HAProxy was restarted or reloaded by a no-change deploy"
    assert {k: v["status"] for k, v in _servers(sandbox).items()} == {"r1": "UP", "r2": "UP"}
