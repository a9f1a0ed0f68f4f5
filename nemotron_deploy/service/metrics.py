"""The metrics contract: every series the checks write to node_exporter's textfile (``--prometheus-
textfile``), declared once here (name, type, labels, help), and the writers that write them from it.

These names and labels are an interface: the alert rules (alerts/nemotron.rules.yml, whose allowed
names are alerts.METRICS, built from this module) and dashboards are written against them.

* the single check (``--url/--host/--slurm-job/--endpoint``): :data:`SINGLE_CHECK`, label ``target``;
* the fleet check (``--slurm-job NAME --replicas N``): :data:`REPLICA` per replica (labels
  ``deployment``, the base job name, and ``replica``, ``r1``...) and :data:`DEPLOYMENT` (label
  ``deployment``); ``nemotron_endpoint_replicas_up`` and ``nemotron_endpoint_queue_length`` only with
  ``--endpoint-socket``, when HAProxy answered;
* ``--replicas --stopped``: :data:`STOPPED` only, so no replica alert fires.

Written atomically (prometheus_client's temp file + rename), mode 0644. Runs on the cluster (login
nodes, and inside the job's container): standard library only at import time; ``prometheus_client``
(the service's one runtime dependency) is imported by the writers only.
"""

from __future__ import annotations

import os
from collections import namedtuple

from .outcome import REASONS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .outcome import Outcome


class Metric(namedtuple("Metric", "name kind labels help")):
    """One metric family: its name as Prometheus shows it (a counter's ends in ``_total``), its
    kind (``gauge`` or ``counter``), its label names, and its HELP text."""

    __slots__ = ()


TARGET = ("target",)
PER_REPLICA = ("deployment", "replica")
PER_DEPLOYMENT = ("deployment",)

# The single check, label target (a fixed name for the target, even when a job moves to other nodes).
UP = Metric("nemotron_up", "gauge", TARGET, "1 if the NeMo server generated a token in the last probe")
PROBE_STATUS = Metric(
    "nemotron_probe_status", "gauge", TARGET, "Nagios status of the last probe (0 OK,1 WARN,2 CRIT,3 UNKNOWN)"
)
PROBE_DURATION = Metric("nemotron_probe_duration_seconds", "gauge", TARGET, "Duration of the last probe")
PROBE_TIMESTAMP = Metric("nemotron_probe_timestamp_seconds", "gauge", TARGET, "Unix time of the last probe")
LAST_SUCCESS = Metric(
    "nemotron_last_success_timestamp_seconds",
    "gauge",
    TARGET,
    "Unix time of the last successful probe (0: never)",
)
PROBE_CONSECUTIVE_BUSY = Metric("nemotron_probe_consecutive_busy", "gauge", TARGET, "Consecutive busy probes")
PROBE_REASON = Metric(
    "nemotron_probe_reason", "gauge", (*TARGET, "reason"), "1 for the reason of the last probe"
)

# The fleet check, per replica.
REPLICA_UP = Metric(
    "nemotron_replica_up", "gauge", PER_REPLICA, "1 if the replica generated a token in this check"
)
REPLICA_BUSY = Metric(
    "nemotron_replica_busy", "gauge", PER_REPLICA, "1 if the replica's probe was busy (no reply in time)"
)
REPLICA_LAST_SUCCESS = Metric(
    "nemotron_replica_last_success_timestamp_seconds",
    "gauge",
    PER_REPLICA,
    "Unix time of the replica's last successful generation (0: never)",
)
REPLICA_PROBE_DURATION = Metric(
    "nemotron_replica_probe_duration_seconds",
    "gauge",
    PER_REPLICA,
    "Duration of the replica's probe (0: not probed)",
)
REPLICA_STALE = Metric(
    "nemotron_replica_stale",
    "gauge",
    PER_REPLICA,
    "1 if the replica runs the files of an earlier deploy (roll out to replace it)",
)
REPLICA_RESTART_CAPPED = Metric(
    "nemotron_replica_restart_capped",
    "gauge",
    PER_REPLICA,
    "1 if the check stopped replacing the replica (max_restarts_per_day in 24 h)",
)
# A counter kept in the state file (written without a _created sample).
REPLICA_RESTARTS = Metric(
    "nemotron_replica_restarts_total",
    "counter",
    PER_REPLICA,
    "Replacements of the replica's job submitted by the scheduled check",
)
# job_id and node are "" when unknown; state is Slurm's (RECORDED: from a job record, GONE: no job,
# UNKNOWN: Slurm could not be asked).
REPLICA_INFO = Metric(
    "nemotron_replica_info",
    "gauge",
    (*PER_REPLICA, "job_id", "node", "state"),
    "The replica's Slurm job, first node and state (GONE: no job); always 1",
)

# The fleet check (and --stopped), per deployment.
ENDPOINT_REPLICAS = Metric(
    "nemotron_endpoint_replicas", "gauge", PER_DEPLOYMENT, "Replicas configured (--replicas)"
)
REPLICAS_UP = Metric(
    "nemotron_replicas_up", "gauge", PER_DEPLOYMENT, "Replicas that generated a token in this check"
)
ENDPOINT_REPLICAS_UP = Metric(
    "nemotron_endpoint_replicas_up", "gauge", PER_DEPLOYMENT, "Replica slots HAProxy has UP"
)
ENDPOINT_QUEUE_LENGTH = Metric(
    "nemotron_endpoint_queue_length", "gauge", PER_DEPLOYMENT, "Requests waiting in the endpoint's queue"
)
CHECK_TIMESTAMP = Metric(
    "nemotron_check_timestamp_seconds", "gauge", PER_DEPLOYMENT, "Unix time of this check"
)
CHECK_STATUS = Metric(
    "nemotron_check_status",
    "gauge",
    PER_DEPLOYMENT,
    "Nagios status of this check (0 OK,1 WARN,2 CRIT,3 UNKNOWN)",
)
SERVICE_STOPPED = Metric(
    "nemotron_service_stopped",
    "gauge",
    PER_DEPLOYMENT,
    "1 when the service is stopped on purpose (state=stopped)",
)

SINGLE_CHECK = (
    UP,
    PROBE_STATUS,
    PROBE_DURATION,
    PROBE_TIMESTAMP,
    LAST_SUCCESS,
    PROBE_CONSECUTIVE_BUSY,
    PROBE_REASON,
)
REPLICA = (
    REPLICA_UP,
    REPLICA_BUSY,
    REPLICA_LAST_SUCCESS,
    REPLICA_PROBE_DURATION,
    REPLICA_STALE,
    REPLICA_RESTART_CAPPED,
    REPLICA_RESTARTS,
    REPLICA_INFO,
)
DEPLOYMENT = (
    ENDPOINT_REPLICAS,
    REPLICAS_UP,
    ENDPOINT_REPLICAS_UP,
    ENDPOINT_QUEUE_LENGTH,
    CHECK_TIMESTAMP,
    CHECK_STATUS,
)
STOPPED = (SERVICE_STOPPED, CHECK_TIMESTAMP, CHECK_STATUS)

CONTRACT: tuple[Metric, ...] = tuple(dict.fromkeys(SINGLE_CHECK + REPLICA + DEPLOYMENT + STOPPED))
"""Every metric the checks write, each once."""

# The OpenAI API, per API key name (``key``; "" with endpoint_auth = none) and route (``completions``,
# ``chat.completions``, ``models``). Counted by HAProxy's Lua (the replicas' fronts report each
# answer's tokens in a header it removes), since HAProxy started; served at the endpoint's
# /metrics/openai.
PER_KEY_ROUTE = ("key", "route")
OPENAI_REQUESTS = Metric(
    "nemotron_openai_requests_total",
    "counter",
    PER_KEY_ROUTE,
    "OpenAI API requests answered, errors included",
)
OPENAI_PROMPT_TOKENS = Metric(
    "nemotron_openai_prompt_tokens_total",
    "counter",
    PER_KEY_ROUTE,
    "Prompt tokens of answered requests (the checkpoint's tokenizer)",
)
OPENAI_COMPLETION_TOKENS = Metric(
    "nemotron_openai_completion_tokens_total",
    "counter",
    PER_KEY_ROUTE,
    "Generated tokens of answered requests (the checkpoint's tokenizer)",
)
OPENAI_ERRORS = Metric(
    "nemotron_openai_errors_total",
    "counter",
    (*PER_KEY_ROUTE, "status"),
    "OpenAI API requests answered with an error, by HTTP status",
)
OPENAI_METRICS = (OPENAI_REQUESTS, OPENAI_PROMPT_TOKENS, OPENAI_COMPLETION_TOKENS, OPENAI_ERRORS)
"""Served by HAProxy itself (not in the textfile): the endpoint's Lua writes the text from these
declarations (rendered into it)."""

NODE_EXPORTER = (
    Metric(
        "node_textfile_mtime_seconds",
        "gauge",
        ("file",),
        "Unix mtime of textfiles successfully read.",
    ),
)
"""Not written by the checks: node_exporter's own series about the textfile the check writes (label
``file``), which the alert rules read to see that the check runs."""


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def _registry() -> tuple[Any, Any]:
    try:
        from prometheus_client import CollectorRegistry, Gauge
    except ImportError:
        raise OSError("prometheus_client is not installed: pip install prometheus-client") from None
    reg = CollectorRegistry()
    return reg, lambda m: Gauge(m.name, m.help, m.labels, registry=reg)


def write_textfile(path: str, outcome: Outcome, state: dict[str, Any], target: str) -> None:
    """The single check's metrics (:data:`SINGLE_CHECK`), atomically, mode 0644."""
    reg, gauge = _registry()
    values = (
        (UP, outcome.reason == "ok"),
        (PROBE_STATUS, outcome.status),
        (PROBE_DURATION, outcome.duration or 0.0),
        (PROBE_TIMESTAMP, outcome.timestamp),
        (LAST_SUCCESS, float(state.get("last_success") or 0.0)),
        (PROBE_CONSECUTIVE_BUSY, int(state.get("consecutive_busy") or 0)),
    )
    for metric, value in values:
        gauge(metric).labels(target=target).set(value)
    reason = gauge(PROBE_REASON)
    for code in REASONS:
        reason.labels(target=target, reason=code).set(1 if code == outcome.reason else 0)
    write_registry(path, reg)


def write_fleet_textfile(path: str, fleet: Any) -> None:
    """The fleet check's metrics (:data:`REPLICA`, :data:`DEPLOYMENT`) of a fleet.FleetOutcome."""
    reg, gauge = _registry()
    dep = fleet.deployment
    per_replica = (
        (REPLICA_UP, lambda r: r.ok),
        (REPLICA_BUSY, lambda r: r.busy),
        (REPLICA_LAST_SUCCESS, lambda r: r.last_success or 0.0),
        (REPLICA_PROBE_DURATION, lambda r: r.duration or 0.0),
        (REPLICA_STALE, lambda r: bool(r.stale)),
        (REPLICA_RESTART_CAPPED, lambda r: r.capped),
    )
    for metric, value in per_replica:
        g = gauge(metric)
        for r in fleet.replicas:
            g.labels(deployment=dep, replica=r.slot).set(float(value(r)))
    reg.register(_RestartsCollector(fleet))
    info = gauge(REPLICA_INFO)
    for r in fleet.replicas:
        info.labels(deployment=dep, replica=r.slot, job_id=r.job_id, node=r.node, state=r.slurm_state).set(1)
    ep = fleet.endpoint
    per_deployment = (
        (ENDPOINT_REPLICAS, len(fleet.replicas)),
        (REPLICAS_UP, fleet.generating),
        (ENDPOINT_REPLICAS_UP, None if ep is None else ep.replicas_up),
        (ENDPOINT_QUEUE_LENGTH, None if ep is None else ep.queue_length),
        (CHECK_TIMESTAMP, fleet.timestamp),
        (CHECK_STATUS, fleet.status),
    )
    for metric, value in per_deployment:
        if value is not None:  # the endpoint's, without a socket or an answer: no series
            gauge(metric).labels(deployment=dep).set(value)
    write_registry(path, reg)


class _RestartsCollector:
    """REPLICA_RESTARTS: a counter kept in the state file (no _created sample)."""

    def __init__(self, fleet: Any) -> None:
        self.fleet = fleet

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        m = REPLICA_RESTARTS
        family = CounterMetricFamily(m.name, m.help, labels=list(m.labels))
        for r in self.fleet.replicas:
            family.add_metric([self.fleet.deployment, r.slot], r.restarts_total)
        yield family


def write_stopped_textfile(path: str, deployment: str, timestamp: float, status: int) -> None:
    """``--stopped``: only :data:`STOPPED`. Raises ImportError without prometheus_client."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    for metric, value in zip(STOPPED, (1, timestamp, status), strict=True):
        Gauge(metric.name, metric.help, metric.labels, registry=reg).labels(deployment=deployment).set(value)
    write_registry(path, reg)


def write_registry(path: str, registry: Any) -> None:
    """A textfile for node_exporter: prometheus_client's temp file + rename (atomic), mode 0644."""
    from prometheus_client import write_to_textfile

    old_umask = os.umask(0o022)
    try:
        write_to_textfile(path, registry)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o644)
