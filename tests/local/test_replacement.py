"""Replacing dead replicas: the decision with a fake clock (back-off, daily cap, start-up budget,
unhealthy threshold), the fleet check acting through a fake Slurm (what it submits, the lock that keeps
two checks from submitting twice), stale replicas, state=stopped, and the sudo rule (visudo accepts it).
"""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fake_slurm import job
from helpers import INVENTORIES, write_inventory

from nemotron_deploy import inventory
from nemotron_deploy.deploy import desired
from nemotron_deploy.service import health, metrics
from nemotron_deploy.service.replacement import DAY, CheckLock, Policy, backoff_seconds, decide

POLICY = Policy(unhealthy_after=600, backoff_max=1800, max_per_day=10, startup_budget=300, first_backoff=60)


def _decide(state, now, reason="job_gone", job_id=None, active=False, started=None, down=None, policy=POLICY):
    return decide(
        reason=reason,
        job_id=job_id,
        job_active=active,
        started=started,
        down_in_endpoint=down,
        state=state,
        now=now,
        policy=policy,
    )


def _replaced(state, now):
    """What the fleet check records after a replacement it submitted."""
    state["restarts"] = [*state.get("restarts", []), now]
    state["last_restart"] = now
    state["consecutive_restarts"] = int(state.get("consecutive_restarts") or 0) + 1


# --- the decision -------------------------------------------------------------------------------------


def test_a_gone_job_is_replaced_at_once_then_with_doubling_back_off():
    state: dict = {}
    assert _decide(state, 1000).action == "replace"
    _replaced(state, 1000)
    # Its replacement died too: not before 60 s, then 120 s, 240 s ... up to 1800 s.
    assert _decide(state, 1059).action == "backoff"
    assert _decide(state, 1060).action == "replace"
    _replaced(state, 1060)
    assert _decide(state, 1060 + 119).action == "backoff"
    assert _decide(state, 1060 + 120).action == "replace"
    assert [backoff_seconds(n, POLICY) for n in range(1, 8)] == [60, 120, 240, 480, 960, 1800, 1800]


def test_a_replica_that_generates_again_resets_the_back_off():
    state: dict = {}
    for t in (0, 60, 180):
        _replaced(state, t)
    assert _decide(state, 200, reason="ok", job_id="9", active=True).action == "none"
    assert state["consecutive_restarts"] == 0
    assert _decide(state, 10_000).action == "replace"  # at once again


def test_the_daily_cap_stops_replacing_and_says_why():
    policy = Policy(max_per_day=3, first_backoff=1, backoff_max=1, startup_budget=1, unhealthy_after=60)
    state: dict = {}
    now = 0.0
    for _ in range(3):
        now += 10
        assert _decide(state, now, policy=policy).action == "replace"
        _replaced(state, now)
    capped = _decide(state, now + 10, policy=policy)
    assert capped.action == "capped" and state["capped"] is True
    assert "3 replacements in 24h reached max_restarts_per_day=3" in capped.message
    # A day after the first of them, one may go again.
    assert _decide(state, 10 + DAY, policy=policy).action == "replace"


def test_a_job_the_check_submitted_is_starting_while_slurm_hides_it():
    state = {"submitted": {"job_id": "42", "at": 1000.0}}
    assert _decide(state, 1000 + 299).action == "starting"  # within the start-up budget (300)
    assert _decide(state, 1000 + 301).action == "replace"  # it never showed up: gone
    state = {"submitted": {"job_id": "42", "at": 1000.0}}
    assert _decide(state, 1010, reason="refused", job_id="42", active=True).action == "starting"
    assert "submitted" not in state, "the job it submitted runs: no longer 'submitted'"


def test_an_unhealthy_server_is_replaced_after_the_threshold_never_during_start_up():
    state: dict = {}
    # Seen first at t=0: start-up budget 300 s, whatever the probe says.
    assert _decide(state, 0, reason="refused", job_id="7", active=True).action == "starting"
    assert _decide(state, 299, reason="refused", job_id="7", active=True).action == "starting"
    wait = _decide(state, 300, reason="refused", job_id="7", active=True)
    assert wait.action == "wait" and wait.cause == "unhealthy"
    assert _decide(state, 899, reason="not_nemo", job_id="7", active=True).action == "wait"
    assert _decide(state, 900, reason="refused", job_id="7", active=True).action == "replace"


def test_an_unhealthy_streak_is_broken_by_one_success():
    state: dict = {}
    _decide(state, 0, reason="refused", job_id="7", active=True, started=-1000)
    assert _decide(state, 500, reason="ok", job_id="7", active=True).action == "none"
    assert _decide(state, 700, reason="refused", job_id="7", active=True).action == "wait"


def test_busy_counts_only_when_the_endpoint_has_the_replica_down():
    """A loaded replica is busy too: only HAProxy's own check failing (its timeout is above the
    longest generation) makes busy a failure."""
    state: dict = {"job_id": "7", "job_seen": -10_000}
    for t in (0, 700, 1400):
        assert _decide(state, t, reason="busy", job_id="7", active=True, down=False).action == "none"
    assert _decide(state, 2000, reason="busy", job_id="7", active=True, down=True).action == "wait"
    assert _decide(state, 2600, reason="busy", job_id="7", active=True, down=True).action == "replace"


# --- the fleet check acting ---------------------------------------------------------------------------


@pytest.fixture
def acting(slurm, tmp_path, monkeypatch):
    """The fake Slurm with a recording sbatch/scancel, and the check's arguments to replace."""
    bin_dir = slurm.bin
    log = tmp_path / "slurm-actions.log"
    counter = tmp_path / "next-id"
    counter.write_text("100")
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'sleep "${{FAKE_SBATCH_SLEEP:-0}}"\n'
        f"id=$(cat {counter}); echo $((id + 1)) > {counter}\n"
        f'echo "sbatch $*" >> {log}\n'
        'echo "$id"\n'
    )
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "scancel $*" >> {log}\n')
    for name in ("sbatch", "scancel"):
        (bin_dir / name).chmod(0o755)
    sbatch = tmp_path / "nemotron.sbatch"
    sbatch.write_text("#!/bin/bash\nreadonly FILES_DIGEST=abc\n")
    started = tmp_path / "started.json"
    started.write_text(json.dumps({"at": 1.0, "jobs": {}}))
    argv = [
        "--slurm-job", "svc", "--replicas", "2", "--port", "1",
        "--restart-policy", "always", "--sbatch", str(sbatch), "--slurm-bin", str(bin_dir),
        "--started-file", str(started), "--state-file", str(tmp_path / "state.json"),
        "--budget", "300", "--json", "--connect-timeout", "0.2", "--timeout", "0.5",
    ]  # fmt: skip
    return argv, log


def _run(argv, capsys):
    code = health.main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_the_check_replaces_gone_replicas_and_logs_why(acting, slurm, capsys):
    argv, log = acting
    slurm.set({"jobs": {}})  # neither replica's job exists
    code, out = _run(argv, capsys)
    assert log.read_text().splitlines() == [
        f"scancel --user={getpass.getuser()} --name=svc-r1",  # this account's jobs only
        f"sbatch --parsable --job-name=svc-r1 {argv[argv.index('--sbatch') + 1]}",
        f"scancel --user={getpass.getuser()} --name=svc-r2",
        f"sbatch --parsable --job-name=svc-r2 {argv[argv.index('--sbatch') + 1]}",
    ]
    replaced = {r["name"]: r["replacement"] for r in out["replicas"]}
    assert replaced["r1"] == {"action": "replace", "cause": "gone", "message": None, "new_job_id": "100"}
    assert replaced["r2"]["new_job_id"] == "101"
    assert code == 2 and out["reason"] == "no_replica"  # nothing generates yet
    state = json.loads(Path(argv[argv.index("--state-file") + 1]).read_text())
    event = state["r1"]["events"][-1]
    assert (event["cause"], event["new_job_id"], event["job_name"]) == ("gone", "100", "svc-r1")
    # The next check, a minute later: the new jobs are still starting (Slurm hides them): no resubmit.
    _run(argv, capsys)
    assert len(log.read_text().splitlines()) == 4


def test_nothing_is_replaced_before_a_deploy_started_the_service(acting, slurm, capsys, tmp_path):
    argv, log = acting
    Path(argv[argv.index("--started-file") + 1]).unlink()
    slurm.set({"jobs": {}})
    _run(argv, capsys)
    assert not log.exists(), "a deploy that only installed must start nothing"


def test_two_checks_at_once_submit_one_job_per_replica(acting, slurm, tmp_path):
    """The lock: both run the whole check; only one may replace (the other waits, then sees the
    replacement in the state file and counts it as starting)."""
    argv, log = acting
    slurm.set({"jobs": {}})
    env = {**__import__("os").environ, "FAKE_SBATCH_SLEEP": "0.5"}
    cmd = [sys.executable, "-m", "nemotron_deploy.service.health", *argv]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.wait(timeout=60)
    submits = [line for line in log.read_text().splitlines() if line.startswith("sbatch")]
    assert sorted(s.split()[2] for s in submits) == ["--job-name=svc-r1", "--job-name=svc-r2"], submits


def test_check_lock_is_exclusive(tmp_path):
    path = str(tmp_path / "state.json.lock")
    got = []
    with CheckLock(path) as first:
        t = threading.Thread(target=lambda: got.append(CheckLock(path, timeout=0.3).__enter__()))
        t.start()
        t.join()
    assert first is True and got == [False]


def test_a_running_replica_on_older_files_is_stale(acting, slurm, capsys, tmp_path):
    """Its record names the files digest it started with; the sbatch now in place names another."""
    from nemotron_rehearsal.emulator import serve_in_thread

    argv, _ = acting
    emu = serve_in_thread()
    records = tmp_path / "records"
    records.mkdir()
    for i, files in ((1, "abc"), (2, "old")):
        (records / f"svc-r{i}.job.json").write_text(
            json.dumps({"job_id": str(10 + i), "job_name": f"svc-r{i}", "node": "127.0.0.1", "files": files})
        )
    slurm.set(
        {
            "jobs": {
                "11": job("RUNNING", "127.0.0.1", name="svc-r1"),
                "12": job("RUNNING", "127.0.0.1", name="svc-r2"),
            }
        }
    )
    port = ["--port", str(emu.port)]
    args = [*argv[:4], *port, *argv[6:], "--records-dir", str(records)]
    code, out = _run(args, capsys)
    stale = {r["name"]: r["stale"] for r in out["replicas"]}
    assert stale == {"r1": False, "r2": True}
    assert code == 1 and out["reason"] == "stale", out["message"]
    emu.stop()


def test_stopped_replaces_nothing_and_takes_no_replica_series(acting, slurm, capsys, tmp_path):
    argv, log = acting
    textfile = tmp_path / "nemotron.prom"
    code, out = _run([*argv, "--stopped", "--prometheus-textfile", str(textfile)], capsys)
    assert code == 0 and out["reason"] == "stopped"
    assert not log.exists()
    text = textfile.read_text()
    assert 'nemotron_service_stopped{deployment="svc"} 1.0' in text
    assert "nemotron_replica_up" not in text and "nemotron_replicas_up" not in text  # no alert fires
    types = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert types == {m.name for m in metrics.STOPPED}


def test_replacement_metrics(acting, slurm, capsys, tmp_path):
    argv, _ = acting
    slurm.set({"jobs": {}})
    textfile = tmp_path / "nemotron.prom"
    _run([*argv, "--prometheus-textfile", str(textfile)], capsys)
    text = textfile.read_text()
    assert 'nemotron_replica_restarts_total{deployment="svc",replica="r1"} 1.0' in text
    assert "# TYPE nemotron_replica_restarts_total counter" in text
    assert 'nemotron_replica_restart_capped{deployment="svc",replica="r1"} 0.0' in text
    assert {metrics.REPLICA_RESTARTS, metrics.REPLICA_RESTART_CAPPED} <= set(metrics.REPLICA)  # the contract


# --- what the deploy installs -------------------------------------------------------------------------


def test_the_sudo_rule_allows_exactly_the_replicas_commands_and_visudo_accepts_it(tmp_path):
    visudo = shutil.which("visudo")
    assert visudo, "visudo missing: run scripts/setup (it installs sudo)"
    hosts = "login = ['login01']\ncompute = ['gpu1', 'gpu2', 'gpu3', 'gpu4']\n"
    cluster = inventory.load(str(write_inventory(tmp_path, "h100", hosts=hosts)))
    rule = desired.sudoers(cluster, desired.Login(submit_as="slurmsvc", slurm_bin="/usr/bin"))
    path = tmp_path / "nemotron-health"
    path.write_text(rule)
    path.chmod(0o440)
    check = subprocess.run([visudo, "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = "/lustre/nemotron/nemotron-deploy/jobs/nemotron.sbatch"
    for i in (1, 2):
        assert f"/usr/bin/scancel --user=slurmsvc --name=nemotron-340b-r{i}" in rule
        assert f"/usr/bin/sbatch --parsable --job-name=nemotron-340b-r{i} {jobs}" in rule
    assert "*" not in rule and "nemotron-340b-r3" not in rule
    assert "nemotron-health ALL=(slurmsvc) NOPASSWD: NEMOTRON_REPLICAS" in rule


def test_no_sudo_rule_without_replacement():
    cluster = inventory.load(str(INVENTORIES / "h100.py"))
    assert desired.sudoers(cluster, desired.Login()) is not None  # serve mode: always by default
    never = cluster.settings.model_copy(update={"restart_policy": "never"})
    assert not never.replaces_replicas
    stopped = cluster.settings.model_copy(update={"state": "stopped"})
    assert not stopped.replaces_replicas
