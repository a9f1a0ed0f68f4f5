"""The scheduled health check as installed on the sandbox's login node: exactly the command cron
runs, as the unprivileged user cron runs it."""

from __future__ import annotations

import subprocess

from helpers import REPO
from prometheus_client.parser import text_string_to_metric_families
from sshutil import console_script


def test_installed_check_runs_as_the_health_user_and_writes_metrics(sandbox):
    """Deploy, then run exactly the command cron would run, as the user cron would run it."""
    deploy = subprocess.run(
        [console_script("pyinfra"), "-y", "inventories/sandbox.py", "deploys/nemotron.py"],
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
