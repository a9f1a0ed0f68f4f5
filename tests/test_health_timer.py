"""The scheduled health check the deploy installs: systemd units that systemd accepts, a cron entry
cron accepts, and (on the sandbox's login node) the installed command run as the unprivileged user."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nemotron_deploy.deploy.operations import health_timer as health

REPO = Path(__file__).resolve().parent.parent


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: apt-get install systemd"
    command = health.check_command(
        venv=str(Path(sys.executable).parent.parent),
        job_name="nemotron-340b",
        replicas=2,
        port=1424,
        records_dir="/shared/logs",
        endpoint_socket="/run/haproxy/admin.sock",
    )
    paths = []
    for path, text in health.systemd_units(
        user="nemotron-health", command=command, interval=60, job_name="nemotron-340b"
    ).items():
        local = tmp_path / Path(path).name
        local.write_text(text)
        paths.append(str(local))
    result = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"systemd warned about our units:\n{result.stderr}"


def test_service_treats_nagios_results_as_success_and_runs_unprivileged():
    command = health.check_command(
        venv="/opt/v", job_name="job", replicas=2, port=1424, records_dir="/s", endpoint_socket=None
    )
    service = health.systemd_units(user="nemotron-health", command=command, interval=60, job_name="job")[
        "/etc/systemd/system/nemotron-health.service"
    ]
    assert "User=nemotron-health" in service
    assert "SuccessExitStatus=1 2 3" in service
    assert (
        "ExecStart=/opt/v/bin/python -m nemotron_deploy.service.health --slurm-job job --replicas 2 --records-dir /s "
        "--port 1424 --prometheus-textfile" in service
    )


@pytest.mark.parametrize(("interval", "schedule"), [(60, "*"), (30, "*"), (300, "*/5")])
def test_cron_entry_schedule_and_user(interval, schedule):
    ((path, text),) = health.cron_entry(
        user="nemotron-health", command=["/opt/v/bin/python", "-m", "x"], interval=interval
    ).items()
    assert path == "/etc/cron.d/nemotron-health"
    line = [entry for entry in text.splitlines() if entry and not entry.startswith(("#", "PATH="))]
    assert line == [f"{schedule} * * * * nemotron-health /opt/v/bin/python -m x >/dev/null 2>&1"]
    assert text.endswith("\n"), "cron ignores a last line without a newline"


@pytest.mark.sandbox
def test_installed_check_runs_as_the_health_user_and_writes_metrics(sandbox):
    """Deploy, then run exactly the command cron would run, as the user cron would run it."""
    deploy = subprocess.run(
        [str(REPO / ".venv/bin/pyinfra"), "-y", "inventories/sandbox.py", "deploys/nemotron.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    login = sandbox.login.name
    cron = subprocess.run(
        sandbox.ssh_argv(login, "cat /etc/cron.d/nemotron-health"), capture_output=True, text=True
    )
    (entry,) = [line for line in cron.stdout.splitlines() if line and not line.startswith(("#", "PATH="))]
    fields = entry.split(" ", 6)
    user, command = fields[5], fields[6].removesuffix(" >/dev/null 2>&1")
    assert user == "nemotron-health"
    textfile = command.split("--prometheus-textfile ", 1)[1].split(" ", 1)[0]
    run = subprocess.run(
        sandbox.ssh_argv(
            login,
            f"rm -f {textfile}; su -s /bin/sh {user} -c '{command}'; echo rc=$?; stat -c %U {textfile}; cat {textfile}",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = run.stdout.splitlines()
    rc = int(next(line for line in out if line.startswith("rc=")).removeprefix("rc="))
    assert rc in (0, 1, 2), run.stdout + run.stderr  # a result, not UNKNOWN (3): the check itself works
    owner_index = next(i for i, line in enumerate(out) if line.startswith("rc=")) + 1
    assert out[owner_index] == "nemotron-health"
    samples = [
        sample
        for family in text_string_to_metric_families("\n".join(out[owner_index + 1 :]) + "\n")
        for sample in family.samples
    ]
    metrics = {sample.name: sample for sample in samples}
    assert {
        "nemotron_replica_up",
        "nemotron_replica_probe_duration_seconds",
        "nemotron_replica_last_success_timestamp_seconds",
        "nemotron_replicas_up",
        "nemotron_check_status",
    } <= set(metrics)
    # One series per replica the inventory holds (the sandbox's 4 nodes: 2), labelled r1, r2.
    replicas = sorted(s.labels["replica"] for s in samples if s.name == "nemotron_replica_up")
    assert replicas == ["r1", "r2"], replicas
    assert metrics["nemotron_check_status"].value == rc
