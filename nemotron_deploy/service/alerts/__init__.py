"""Prometheus alert rules for a deployment, shipped as package data: `nemotron.rules.yml` beside this file.

The deploy installs them on the login node when `prometheus_rules_dir` is set (desired.for_host), with
the health-check staleness threshold scaled to `health_interval_seconds` (:func:`rules`). They are
linted and unit-tested with promtool (tests/test_alert_rules.py, tests/prometheus/).
"""

from __future__ import annotations

import re
from importlib.resources import files

RULES_NAME = "nemotron.rules.yml"

METRICS: dict[str, str] = {
    # Per replica; labels deployment (the base Slurm job name), replica (r1..rN).
    "nemotron_replica_up": "1 if the replica's last check got a generation, else 0",
    "nemotron_replica_busy": "1 if the replica was connected but did not answer in time (generation lock held)",
    "nemotron_replica_last_success_timestamp_seconds": "when the replica last generated (Unix time)",
    "nemotron_replica_info": "always 1; labels job_id, node and state (Slurm) of the replica's job",
    "nemotron_replica_stale": "1 if the replica runs files older than the last deploy (roll it out)",
    "nemotron_replica_restarts_total": "how many times the check replaced the replica",
    "nemotron_replica_restart_capped": "1 once the check stopped replacing it after max_restarts_per_day",
    # Per endpoint; label deployment.
    "nemotron_endpoint_replicas": "replica slots the endpoint has (the deployment's replica count)",
    "nemotron_replicas_up": "replicas the check saw generate",
    "nemotron_endpoint_replicas_up": "replicas the endpoint (HAProxy) has UP",
    "nemotron_endpoint_queue_length": "requests waiting in the endpoint for a free replica",
    "nemotron_check_timestamp_seconds": "when the check last ran (Unix time)",
    "nemotron_check_status": "the check's Nagios status (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)",
    # node_exporter's textfile collector, about the file the check writes (label file).
    "node_textfile_mtime_seconds": "when node_exporter saw the check's textfile last modified (Unix time)",
}
"""Every metric the alert rules may use, with what it means: the scheduled health check's metrics (in
node_exporter's textfile directory; node_exporter adds `instance` and `job`) and node_exporter's own.
tests/test_alert_rules.py fails when a rule names a metric not listed here, so a metric renamed on
one side breaks the tests instead of silencing an alert."""

DEFAULT_HEALTH_INTERVAL_SECONDS = 60
STALE_AFTER_CHECKS = 5  # the textfile is stale when not rewritten for 5 check intervals (300 s at 60 s)
_STALE_EXPR = 'time() - node_textfile_mtime_seconds{file=~"(.*/)?nemotron\\\\.prom"} > '
_STALE_THRESHOLD = re.compile(re.escape(_STALE_EXPR) + r"(\d+)$", re.M)


def default_rules() -> str:
    """The rules file as shipped (for the default 60 s health interval)."""
    return files(__package__).joinpath(RULES_NAME).read_text(encoding="utf-8")


def stale_after_seconds(health_interval_seconds: int) -> int:
    return STALE_AFTER_CHECKS * health_interval_seconds


def rules(health_interval_seconds: int = DEFAULT_HEALTH_INTERVAL_SECONDS) -> str:
    """The rules file for a deployment whose check runs every `health_interval_seconds`: the same as
    shipped but for NemotronHealthCheckStale's threshold, 5 intervals (300 s at the 60 s default)."""
    text = default_rules()
    default = str(stale_after_seconds(DEFAULT_HEALTH_INTERVAL_SECONDS))
    if _STALE_THRESHOLD.findall(text) != [default]:
        raise RuntimeError(
            f"{RULES_NAME}: expected NemotronHealthCheckStale's `{_STALE_EXPR}{default}` exactly once"
        )
    threshold = _STALE_EXPR + str(stale_after_seconds(health_interval_seconds))
    return _STALE_THRESHOLD.sub(lambda _: threshold, text)
