"""The scheduled health check the deploy installs: systemd units that systemd accepts and a cron entry
cron accepts (tests/sandbox/test_scheduled_check.py runs the installed command on the login node)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nemotron_deploy.deploy.operations import health_timer as health


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
