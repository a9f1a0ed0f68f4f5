"""The fleet check (`health --slurm-job NAME --replicas N`) and the endpoint check (`health --endpoint`).

Replicas are NeMo stand-ins (the emulator) on 127.0.0.1, 127.0.0.2, ... all on the same port, as
replicas on different nodes are; Slurm is the fake on PATH (fake_slurm.py); the endpoint is the
rendered haproxy.cfg in a real HAProxy on loopback (live_endpoint.py). Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fake_slurm import job
from helpers import REPO
from live_endpoint import HOST, Replica, ask, cluster_with, replica, running_endpoint
from prometheus_client.parser import text_string_to_metric_families

from nemotron_deploy.service import health, probe
from nemotron_deploy.service import metrics as contract

JOB = "nemotron-340b"


def rjob(i: int, state: str = "RUNNING", **kw) -> dict:
    """Replica i's job as the fake Slurm shows it: named NAME-r<i>, rank 0 on 127.0.0.<i>."""
    kw.setdefault("nodelist", f"127.0.0.{i}")
    return job(state, name=f"{JOB}-r{i}", **kw)


def shared_port(n: int) -> int:
    """A port free on 127.0.0.1..n (replicas on different nodes listen on the same port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        try:
            for i in range(2, n + 1):
                with socket.socket() as s:
                    s.bind((f"127.0.0.{i}", port))
        except OSError:
            continue
        return port
    pytest.fail("no port free on every loopback address")


@contextmanager
def fleet_of(n: int, faults: dict[int, dict] | None = None) -> Iterator[tuple[list[Replica], int]]:
    """n stand-ins, replica i on 127.0.0.<i>, all on one port; `faults` per replica number."""
    port = shared_port(n)
    reps = []
    try:
        for i in range(1, n + 1):
            reps.append(replica(host=f"127.0.0.{i}", port=port, **(faults or {}).get(i, {})))
        yield reps, port
    finally:
        for rep in reps:
            rep.handle.stop()


def run(capsys, *argv: str) -> tuple[int, str]:
    code = health.main(list(argv))
    out, _ = capsys.readouterr()
    return code, out


def run_fleet(capsys, tmp_path: Path, n: int, port: int, *extra: str, as_json: bool = True):
    argv = ["--slurm-job", JOB, "--replicas", str(n), "--port", str(port)]
    argv += ["--state-file", str(tmp_path / "fleet-state.json"), *extra]
    code, out = run(capsys, *argv, *(["--json"] if as_json else []))
    return code, (json.loads(out) if as_json else out)


def metrics(path: Path) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(path.read_text())}


def by_replica(samples: list) -> dict[str, float]:
    return {s.labels["replica"]: s.value for s in samples}


def slot_commands(port: int, *slots: int) -> list[str]:
    out = []
    for i in slots:
        out += [
            f"set server replicas/r{i} addr 127.0.0.{i} port {port}",
            f"set server replicas/r{i} state drain",
            f"set server replicas/r{i} health down",
            f"set server replicas/r{i} state ready",
        ]
    return out


# --------------------------------------------------------------------------------------------------
# --replicas
# --------------------------------------------------------------------------------------------------


def test_all_replicas_generate_ok_and_the_endpoint_follows(tmp_path, slurm, capsys):
    """Both replica jobs run and generate: OK. The first check points the endpoint's slots at their
    first nodes; once HAProxy's checks pass, the next sends nothing and reports both UP; the textfile
    holds every metric of the contract with these values."""
    prom = tmp_path / "metrics" / "nemotron.prom"
    prom.parent.mkdir()
    slurm.set({"jobs": {"101": rjob(1), "102": rjob(2)}})
    with fleet_of(2) as (reps, port), running_endpoint(cluster_with(tmp_path), 2, tmp_path / "ep") as ep:
        extra = ("--endpoint-socket", ep.socket, "--prometheus-textfile", str(prom))
        code, data = run_fleet(capsys, tmp_path, 2, port, *extra)
        assert code == 0, data
        assert (data["status"], data["reason"]) == ("OK", "ok")
        assert data["endpoint"]["commands"] == slot_commands(port, 1, 2)
        assert [(r["name"], r["job_id"], r["node"], r["state"], r["reason"]) for r in data["replicas"]] == [
            ("r1", "101", "127.0.0.1", "RUNNING", "ok"),
            ("r2", "102", "127.0.0.2", "RUNNING", "ok"),
        ]
        assert all(r["last_success"] and r["duration"] > 0 for r in data["replicas"])
        assert [rep.handle.generations >= 1 for rep in reps] == [True, True]  # real generations
        ep.wait_status("r1", "up")
        ep.wait_status("r2", "up")
        code, out = run_fleet(capsys, tmp_path, 2, port, *extra, as_json=False)
        started = time.time()
    assert code == 0, out
    summary, line1, line2, endpoint_line = out.splitlines()
    assert summary.startswith("NEMOTRON OK - 2/2 replicas generate | replicas_up=2;;;0;2 ")
    assert "endpoint_replicas_up=2;;;0;2" in summary and "queue_length=0;;;0" in summary
    assert line1.startswith("r1 OK - generated 1 token in ") and "job 101 RUNNING on 127.0.0.1" in line1
    assert line2.startswith("r2 OK - ")
    assert "2/2 slots UP" in endpoint_line and "sent: nothing" in endpoint_line

    m = metrics(prom)
    # Every family of the contract's fleet metrics, no other (the parser names a counter without _total).
    assert set(m) == {x.name.removesuffix("_total") for x in (*contract.REPLICA, *contract.DEPLOYMENT)}
    assert by_replica(m["nemotron_replica_up"]) == {"r1": 1.0, "r2": 1.0}
    assert by_replica(m["nemotron_replica_busy"]) == {"r1": 0.0, "r2": 0.0}
    for s in m["nemotron_replica_last_success_timestamp_seconds"]:
        assert started - 30 < s.value <= started
    assert all(s.value > 0 for s in m["nemotron_replica_probe_duration_seconds"])
    assert [(s.labels, s.value) for s in m["nemotron_replica_info"]] == [
        ({"deployment": JOB, "replica": "r1", "job_id": "101", "node": "127.0.0.1", "state": "RUNNING"}, 1.0),
        ({"deployment": JOB, "replica": "r2", "job_id": "102", "node": "127.0.0.2", "state": "RUNNING"}, 1.0),
    ]
    one = {x.name: m[x.name][0] for x in contract.DEPLOYMENT}
    assert all(s.labels == {"deployment": JOB} for s in one.values())
    assert one["nemotron_endpoint_replicas"].value == 2
    assert one["nemotron_replicas_up"].value == 2
    assert one["nemotron_endpoint_replicas_up"].value == 2
    assert one["nemotron_endpoint_queue_length"].value == 0
    assert one["nemotron_check_status"].value == 0
    assert abs(one["nemotron_check_timestamp_seconds"].value - started) < 30
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert sorted(p.name for p in prom.parent.iterdir()) == ["nemotron.prom"]


def test_a_gone_replica_is_warning_and_its_slot_goes_to_maintenance(tmp_path, slurm, capsys):
    """r2's job ended: WARNING (1/2 generate), r2 job_gone, and its slot is put in maintenance through
    the stats socket while r1 stays UP; its info metric says GONE."""
    prom = tmp_path / "nemotron.prom"
    slurm.set({"jobs": {"101": rjob(1), "102": rjob(2)}})
    with fleet_of(2) as (_, port), running_endpoint(cluster_with(tmp_path), 2, tmp_path / "ep") as ep:
        extra = ("--endpoint-socket", ep.socket, "--prometheus-textfile", str(prom))
        assert run_fleet(capsys, tmp_path, 2, port, *extra)[0] == 0
        ep.wait_status("r1", "up")
        ep.wait_status("r2", "up")
        slurm.set({"jobs": {"101": rjob(1)}})
        code, out = run_fleet(capsys, tmp_path, 2, port, *extra, as_json=False)
        assert code == 1, out
        assert out.startswith(
            f"NEMOTRON WARNING - 1/2 replicas generate; r2: job_gone: no job named '{JOB}-r2' in the queue | "
            "replicas_up=1;;;0;2"
        )
        assert "sent: set server replicas/r2 state maint" in out
        assert ep.state()["r2"].status == "maint"
        assert ep.state()["r1"].status == "up"
        code, data = run_fleet(capsys, tmp_path, 2, port, *extra)
        assert (code, data["reason"], data["endpoint"]["commands"]) == (1, "degraded", [])
    m = metrics(prom)
    assert by_replica(m["nemotron_replica_up"]) == {"r1": 1.0, "r2": 0.0}
    info = {s.labels["replica"]: s.labels for s in m["nemotron_replica_info"]}
    assert info["r2"] == {"deployment": JOB, "replica": "r2", "job_id": "", "node": "", "state": "GONE"}
    assert m["nemotron_endpoint_replicas_up"][0].value == 1
    assert m["nemotron_replicas_up"][0].value == 1
    assert m["nemotron_check_status"][0].value == 1


def test_no_replica_is_critical_and_the_endpoint_then_says_no_replica(tmp_path, slurm, capsys, monkeypatch):
    """No replica job (one pending, one gone): CRITICAL no_replica, every slot in maintenance; then
    `health --endpoint` through HAProxy answers CRITICAL no_replica saying none is in rotation."""
    slurm.set({"jobs": {"102": rjob(2, "PENDING", reason="Resources", nodelist="(null)")}})
    with fleet_of(2) as (reps, port), running_endpoint(cluster_with(tmp_path), 2, tmp_path / "ep") as ep:
        ep.sync(r1=(HOST, reps[0].port), r2=("127.0.0.2", port))  # as a previous check left them
        ep.wait_status("r1", "up")
        code, data = run_fleet(capsys, tmp_path, 2, port, "--endpoint-socket", ep.socket)
        assert code == 2, data
        assert (data["status"], data["reason"]) == ("CRITICAL", "no_replica")
        assert data["message"].startswith("0/2 replicas generate; r1: job_gone: ")
        assert [r["reason"] for r in data["replicas"]] == ["job_gone", "job_pending"]
        assert data["replicas"][1]["state"] == "PENDING"
        assert data["endpoint"]["commands"] == [
            "set server replicas/r1 state maint",
            "set server replicas/r2 state maint",
        ]
        assert {n: s.status for n, s in ep.state().items()} == {"r1": "maint", "r2": "maint", "u1": "maint"}
        generations = reps[0].handle.generations

        monkeypatch.setenv(probe.API_KEY_ENV, ep.keys["health"])
        code, out = run(
            capsys,
            "--endpoint",
            ep.url,
            "--json",
            "--state-file",
            str(tmp_path / "ep.json"),
        )
        result = json.loads(out)
        assert code == 2, result
        assert result["reason"] == "no_replica" and "no replica is in rotation" in result["message"]
        assert result["http_status"] == 503
        assert reps[0].handle.generations == generations  # HAProxy answered itself


def test_busy_escalates_per_replica(tmp_path, slurm, capsys):
    """r2 wedged: its busy count climbs (WARNING, then CRITICAL on its own line at the 3rd) while r1's
    stays 0, kept in one state file keyed by replica. Then r1 wedges and r2 recovers: r1 starts at 1
    (WARNING), r2 back to 0: one shared counter would have said CRITICAL."""
    state = tmp_path / "fleet-state.json"
    prom = tmp_path / "nemotron.prom"
    slurm.set({"jobs": {"101": rjob(1), "102": rjob(2)}})
    args = ("--timeout", "0.3", "--busy-critical-after", "3", "--prometheus-textfile", str(prom))
    with fleet_of(2, {2: {"hang_after": 0}}) as (_, port):
        runs = [run_fleet(capsys, tmp_path, 2, port, *args) for _ in range(3)]
    assert [code for code, _ in runs] == [1, 1, 1]
    assert [d["reason"] for _, d in runs] == ["busy", "busy", "degraded"]
    assert [[r["status"] for r in d["replicas"]] for _, d in runs] == [
        ["OK", "WARNING"],
        ["OK", "WARNING"],
        ["OK", "CRITICAL"],
    ]
    assert "3 times in a row" in runs[2][1]["replicas"][1]["message"]
    saved = json.loads(state.read_text())
    assert (saved["r1"]["consecutive_busy"], saved["r2"]["consecutive_busy"]) == (0, 3)
    assert saved["r1"]["last_success"] and not saved["r2"].get("last_success")
    m = metrics(prom)
    assert by_replica(m["nemotron_replica_busy"]) == {"r1": 0.0, "r2": 1.0}
    assert by_replica(m["nemotron_replica_last_success_timestamp_seconds"])["r2"] == 0

    with fleet_of(2, {1: {"hang_after": 0}}) as (_, port2):
        code, data = run_fleet(capsys, tmp_path, 2, port2, *args)
    assert code == 1 and data["reason"] == "busy"  # the only trouble is a busy replica
    assert [(r["reason"], r["status"], r["consecutive_busy"]) for r in data["replicas"]] == [
        ("busy", "WARNING", 1),
        ("ok", "OK", 0),
    ]
    assert by_replica(metrics(prom)["nemotron_replica_busy"]) == {"r1": 1.0, "r2": 0.0}


def test_replicas_hidden_by_privatedata_are_found_by_their_records(tmp_path, slurm, capsys):
    """squeue shows this user none of the replica jobs (PrivateData=jobs): with --records-dir, each
    replica's record (NAME-rI.job.json, written by its batch script) gives its job id and node."""
    records = tmp_path / "records"
    records.mkdir()
    for i in (1, 2):
        name = f"{JOB}-r{i}"
        record = {
            "job_id": f"10{i}",
            "job_name": name,
            "node": f"127.0.0.{i}",
            "user": "nemotron",
            "started": 1,
        }
        (records / f"{name}.job.json").write_text(json.dumps(record))
    slurm.set({"jobs": {}})
    with fleet_of(2) as (_, port):
        blind = run_fleet(capsys, tmp_path, 2, port)
        code, data = run_fleet(capsys, tmp_path, 2, port, "--records-dir", str(records))
    assert blind[0] == 2 and [r["reason"] for r in blind[1]["replicas"]] == ["job_gone", "job_gone"]
    assert code == 0, data
    assert [(r["job_id"], r["node"], r["state"], r["reason"]) for r in data["replicas"]] == [
        ("101", "127.0.0.1", "RECORDED", "ok"),
        ("102", "127.0.0.2", "RECORDED", "ok"),
    ]
    assert [c for c in slurm.calls() if c.startswith("squeue")] == [
        f"squeue -h -t all -n {JOB}-r{i} -o %i %T" for i in (1, 2, 1, 2)
    ]


def test_a_missing_endpoint_socket_is_critical_and_names_the_socket(tmp_path, slurm, capsys):
    """Every replica generates, but the stats socket is not there: CRITICAL endpoint_error, saying which
    socket and what to fix; HAProxy's view is absent from the metrics rather than made up."""
    prom = tmp_path / "nemotron.prom"
    sock = tmp_path / "run" / "admin.sock"
    slurm.set({"jobs": {"101": rjob(1), "102": rjob(2)}})
    with fleet_of(2) as (_, port):
        extra = ("--endpoint-socket", str(sock), "--prometheus-textfile", str(prom))
        code, out = run_fleet(capsys, tmp_path, 2, port, *extra, as_json=False)
        code_json, data = run_fleet(capsys, tmp_path, 2, port, *extra)
    assert code == code_json == 2, out
    assert out.startswith(f"NEMOTRON CRITICAL - endpoint_error: HAProxy's stats socket {sock}: ")
    assert "2/2 replicas generate" in out.splitlines()[0]
    assert data["reason"] == "endpoint_error" and str(sock) in data["endpoint"]["error"]
    assert "--endpoint-socket" in data["message"] and "group" in data["message"]
    m = metrics(prom)
    assert "nemotron_endpoint_replicas_up" not in m and "nemotron_endpoint_queue_length" not in m
    assert m["nemotron_replicas_up"][0].value == 2
    assert m["nemotron_check_status"][0].value == 2


def test_slurm_errors_are_unknown_and_leave_the_slots_alone(tmp_path, slurm, capsys):
    """The controller does not answer: UNKNOWN, and the endpoint's slots keep serving (no maint)."""
    with fleet_of(1) as (reps, port), running_endpoint(cluster_with(tmp_path), 1, tmp_path / "ep") as ep:
        ep.sync(r1=(HOST, reps[0].port))
        slurm.set({"down": True})
        code, data = run_fleet(capsys, tmp_path, 1, port, "--endpoint-socket", ep.socket)
        assert code == 3 and data["reason"] == "slurm_error", data
        assert "Unable to contact slurm controller" in data["replicas"][0]["message"]
        assert data["endpoint"]["commands"] == []
        assert ep.state()["r1"].status != "maint"


def test_a_check_with_fewer_replicas_keeps_the_slots_above_in_maintenance(tmp_path, slurm, capsys):
    """`replicas` lowered to 1 while r2 still serves in its slot (the endpoint keeps a slot per replica
    the nodes hold): the check, now --replicas 1, neither counts nor replaces r2, and takes its slot out."""
    prom = tmp_path / "nemotron.prom"
    slurm.set({"jobs": {"101": rjob(1), "102": rjob(2)}})
    with fleet_of(2) as (_, port), running_endpoint(cluster_with(tmp_path), 2, tmp_path / "ep") as ep:
        assert run_fleet(capsys, tmp_path, 2, port, "--endpoint-socket", ep.socket)[0] == 0
        ep.wait_status("r1", "up")
        ep.wait_status("r2", "up")
        extra = ("--endpoint-socket", ep.socket, "--prometheus-textfile", str(prom))
        code, data = run_fleet(capsys, tmp_path, 1, port, *extra)
        assert (code, data["reason"], data["replicas_configured"]) == (0, "ok", 1), data
        assert [r["name"] for r in data["replicas"]] == ["r1"]
        assert data["endpoint"]["commands"] == ["set server replicas/r2 state maint"]
        assert data["endpoint"]["replicas_up"] == 1
        assert ep.state()["r2"].status == "maint" and ep.state()["r1"].status == "up"
        assert not [c for c in slurm.calls() if c.startswith("scancel")]
        code, data = run_fleet(capsys, tmp_path, 1, port, *extra)
        assert (code, data["endpoint"]["commands"]) == (0, [])  # stays out: nothing sent again
    m = metrics(prom)
    assert by_replica(m["nemotron_replica_up"]) == {"r1": 1.0}
    assert m["nemotron_endpoint_replicas_up"][0].value == 1
    assert m["nemotron_endpoint_replicas"][0].value == 1


def test_scale_down_drains_the_replica_above_then_cancels_it(tmp_path, slurm, capsys):
    """service.scale_down against a real HAProxy and the fake Slurm: r2 (slow: 1.5 s a generation) has
    a client request in flight; it is drained, that request is answered, the slot goes to maintenance,
    and only then is r2's job cancelled (the account's jobs of that name only). r1 serves throughout;
    a second run finds nothing to do."""
    from nemotron_deploy.service import endpoint_sync, scale_down

    slurm.set({"jobs": {"101": rjob(1), "102": rjob(2), "103": rjob(2, user="someone-else")}})
    with (
        fleet_of(2, {2: {"slow_seconds": 1.5}}) as (_, port),
        running_endpoint(cluster_with(tmp_path), 2, tmp_path / "ep") as ep,
    ):
        assert run_fleet(capsys, tmp_path, 2, port, "--endpoint-socket", ep.socket)[0] == 0
        ep.wait_status("r1", "up")
        ep.wait_status("r2", "up")
        answers: list[tuple[int, str]] = []
        clients = [
            threading.Thread(target=lambda: answers.append(ep.put(ask("in flight")))) for _ in range(2)
        ]
        for t in clients:
            t.start()
        wait_for_in_flight = time.monotonic() + 10
        while int(endpoint_sync.backend_stat(ep.socket)["r2"].get("scur") or 0) == 0:
            assert time.monotonic() < wait_for_in_flight, "no request reached r2"
            time.sleep(0.02)
        argv = ["--slurm-job", JOB, "--replicas", "1", "--user", "alice", "--endpoint-socket", ep.socket]
        argv += ["--slurm-bin", str(slurm.bin), "--drain-timeout", "20"]
        assert scale_down.main(argv) == 0
        out = capsys.readouterr().out
        for t in clients:
            t.join(10)
        assert [status for status, _ in answers] == [200, 200], answers
        assert all("sentences" in json.loads(text) for _, text in answers), answers
        assert f"{JOB}-r2 (job 102 RUNNING) is above replicas=1" in out, out
        assert out.index("r2: in maintenance") < out.index(f"{JOB}-r2: cancelled"), out
        assert ep.state()["r2"].status == "maint" and ep.state()["r1"].status == "up"
        assert f"scancel --user=alice --name={JOB}-r2" in slurm.calls()
        assert sorted(json.loads(slurm.config.read_text())["jobs"]) == ["101", "103"]  # another user's stays
        status, text = ep.put(ask("after"))
        assert status == 200 and "sentences" in json.loads(text)
        assert scale_down.main(argv) == 0
        assert "no job of alice's above" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--slurm-job", "4242", "--replicas", "2"], "--replicas goes with --slurm-job NAME"),
        (["--host", "x", "--replicas", "2"], "--host does not go with --replicas"),
        (["--slurm-job", JOB, "--replicas", "2", "--job-record", "/x.json"], "use --records-dir"),
        (
            ["--slurm-job", JOB, "--endpoint-socket", "/x.sock"],
            "--endpoint-socket goes with --slurm-job NAME",
        ),
        (["--endpoint", "http://login01"], "give the endpoint's port"),
    ],
)
def test_fleet_usage_errors_are_unknown(argv, says, capsys):
    code = health.main(argv)
    assert code == 3
    assert says in capsys.readouterr().err


def test_python_m_health_runs_the_fleet_check(tmp_path, slurm):
    """`python -m nemotron_deploy.service.health --replicas` (what the timer runs) takes the fleet path."""
    import os
    import subprocess
    import sys

    slurm.set({"jobs": {"101": rjob(1)}})
    with fleet_of(1) as (_, port):
        proc = subprocess.run(
            [sys.executable, "-m", "nemotron_deploy.service.health", "--slurm-job", JOB, "--replicas", "1",
             "--port", str(port), "--no-state-file"],
            capture_output=True, text=True, timeout=30, env=dict(os.environ),
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("NEMOTRON OK - 1/1 replicas generate | replicas_up=1;;;0;1")


# --------------------------------------------------------------------------------------------------
# --endpoint
# --------------------------------------------------------------------------------------------------


def test_endpoint_check_generates_through_haproxy(tmp_path, capsys, monkeypatch):
    """--endpoint: a real one-token generation through HAProxy (the replica sees the probe's prompt),
    labelled `endpoint` in the metrics and the default state file."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    prom = tmp_path / "endpoint.prom"
    with fleet_of(1) as (reps, _), running_endpoint(cluster_with(tmp_path), 1, tmp_path / "ep") as ep:
        ep.sync(r1=(HOST, reps[0].port))
        ep.wait_status("r1", "up")
        monkeypatch.setenv(probe.API_KEY_ENV, ep.keys["health"])
        code, out = run(capsys, "--endpoint", ep.url, "--prometheus-textfile", str(prom))
    assert code == 0, out
    assert out.startswith("NEMOTRON OK - generated 1 token in ")
    assert probe.DEFAULT_PROMPT in reps[0].requests
    assert metrics(prom)["nemotron_up"][0].labels == {"target": "endpoint"}
    assert [p.name for p in (tmp_path / "state" / "nemotron-deploy").iterdir()] == ["health-endpoint.json"]


def test_endpoint_busy_on_queue_timeout(tmp_path, capsys, monkeypatch):
    """The only replica is busy with a 3 s request and the endpoint queues for 1 s: the probe gets
    HAProxy's 503 'replicas are busy' and says busy (WARNING), well before its own timeout."""
    with fleet_of(1, {1: {"slow_seconds": 3.0}}) as (reps, _):
        inv = cluster_with(tmp_path, endpoint_queue_seconds=1)
        with running_endpoint(inv, 1, tmp_path / "ep") as ep:
            ep.sync(r1=(HOST, reps[0].port))
            ep.wait_status("r1", "up", timeout=20)
            monkeypatch.setenv(probe.API_KEY_ENV, ep.keys["health"])  # the client holds its own key's limit
            first = threading.Thread(target=ep.put, args=(ask("long one"),), kwargs={"timeout": 30})
            first.start()
            time.sleep(0.3)
            started = time.monotonic()
            code, out = run(
                capsys,
                "--endpoint",
                ep.url,
                "--timeout",
                "10",
                "--json",
                "--state-file",
                str(tmp_path / "s.json"),
            )
            waited = time.monotonic() - started
            first.join(30)
    data = json.loads(out)
    assert code == 1, data
    assert (data["status"], data["reason"], data["http_status"]) == ("WARNING", "busy", 503)
    assert "replicas are busy" in data["message"]
    assert waited < 3, f"took {waited:.1f} s: the probe timed out instead of reading the 503"
    assert data["consecutive_busy"] == 1


def test_endpoint_envelope_refusal_is_critical_with_its_message(tmp_path, capsys, monkeypatch):
    """A probe the envelope refuses (here: a prompt over the plan's request buffer) is CRITICAL
    envelope_refused with the envelope's own message, and no replica sees it."""
    with fleet_of(1) as (reps, _), running_endpoint(cluster_with(tmp_path), 1, tmp_path / "ep") as ep:
        ep.sync(r1=(HOST, reps[0].port))
        ep.wait_status("r1", "up")
        url = ep.url
        monkeypatch.setenv(probe.API_KEY_ENV, ep.keys["health"])
        code, out = run(capsys, "--endpoint", url, "--prompt", "x" * 600_000, "--no-state-file")
    assert code == 2, out
    assert out.startswith(
        "NEMOTRON CRITICAL - envelope_refused: the endpoint refused the probe with HTTP 413: "
    )
    assert "the most the endpoint holds" in out
    assert reps[0].requests == []


def test_the_endpoint_texts_the_check_reads_are_in_the_template():
    """The probe recognises the endpoint's 503s by their text: what renders the endpoint must still say it."""
    source = (REPO / "nemotron_deploy/deploy/render.py").read_text()
    assert probe.ENDPOINT_BUSY_TEXT in source and probe.ENDPOINT_NO_REPLICA_TEXT in source


def test_records_the_submitting_account_did_not_write_are_not_trusted(tmp_path, slurm, capsys):
    """A record that is a link, or that others may write, or that names a node outside the cluster's
    list, is ignored: the replica is reported untrusted_record with the reason, never probed there.
    With --job-user, squeue is asked for that account's jobs only (another user's job of the same
    name is not the replica)."""
    import getpass

    records = tmp_path / "records"
    records.mkdir(mode=0o755)
    records.chmod(0o755)
    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o755)
    jobs.chmod(0o755)
    nodes = jobs / "compute-nodes"
    nodes.write_text("127.0.0.1\n127.0.0.2\n")
    nodes.chmod(0o644)

    def record(i, node):
        name = f"{JOB}-r{i}"
        return {"job_id": f"10{i}", "job_name": name, "node": node, "user": "x", "started": 1}

    (records / f"{JOB}-r1.job.json").write_text(json.dumps(record(1, "127.0.0.1")))
    (records / f"{JOB}-r1.job.json").chmod(0o666)  # anyone may rewrite it
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(record(2, "127.0.0.2")))
    (records / f"{JOB}-r2.job.json").symlink_to(elsewhere)
    # Another account's job of the replica's name, visible to this user: not the replica.
    slurm.set({"jobs": {"999": dict(rjob(1), user="mallory")}})
    me = getpass.getuser()
    with fleet_of(2) as (_, port):
        code, data = run_fleet(
            capsys, tmp_path, 2, port, "--records-dir", str(records), "--job-user", me,
            "--nodes-file", str(nodes),
        )  # fmt: skip
    assert [(r["reason"], r["node"]) for r in data["replicas"]] == [
        ("untrusted_record", None),
        ("untrusted_record", None),
    ], data
    assert "writable by other accounts" in data["replicas"][0]["message"]
    assert "symbolic link" in data["replicas"][1]["message"]
    assert code == 2
    assert [c for c in slurm.calls() if c.startswith("squeue")] == [
        f"squeue -u {me} -h -t all -n {JOB}-r{i} -o %i %T" for i in (1, 2)
    ]
