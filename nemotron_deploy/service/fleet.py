"""The fleet check: every replica of a deployment, and the endpoint in front of them, in one verdict.

``nemotron-deploy health --slurm-job NAME --replicas N`` (also ``python -m nemotron_deploy.service.health``):
each replica is its own Slurm job ``NAME-r<i>`` (i = 1..N, endpoint_sync.replica_job_name). For each
one the check finds the job (squeue by name; where squeue hides it, PrivateData=jobs, the record its
batch script wrote in ``--records-dir``), probes its first node with the single check's one-token
generation (check.check_once) and keeps its busy count and last success in ONE state file, keyed by
replica (``r1``...). With ``--endpoint-socket`` it then points the endpoint's slots at the running replicas and takes the
others out (endpoint_sync.apply, HAProxy's runtime API), and reads HAProxy's view: slots UP and the
backend's queue. A replica whose Slurm lookup failed leaves its slot as it is.

Verdict (Nagios exit codes): OK when every replica generates; WARNING when some do but not all, or
when the only trouble is busy replicas (below ``--busy-critical-after``); CRITICAL when none
generates, or when the endpoint socket fails or HAProxy refuses a command (``endpoint_error``);
UNKNOWN when Slurm could not be asked. One summary line with perfdata, then one line per replica;
``--json`` prints one object with ``replicas`` and ``endpoint``.

Metrics (``--prometheus-textfile``): metrics.REPLICA and metrics.DEPLOYMENT, the contract in
metrics.py (``--stopped``: metrics.STOPPED only). Replacing dead replicas (``--restart-policy
always``) is replacement.py's, options included.

Runs on the cluster (the login node's scheduled check): standard library only at import time
(``prometheus_client`` only to write the textfile, in metrics.py).
"""

from __future__ import annotations

import json
import re
import sys
import time

from . import metrics, replacement
from .check import Target, check_once
from .nagios import CRITICAL, OK, STATUS_NAMES, UNKNOWN, WARNING
from .options import UsageError, positive
from .outcome import Outcome
from .probe import DEFAULT_PORT
from .slurm import PENDING_STATES, SlurmError, files_digest, read_record, record_path
from .state import default_state_file, load_state, save_state

# endpoint_sync is imported where it is used: every single check imports this module for its
# options (add_arguments), and only the fleet check needs HAProxy's socket.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from .slurm import JobInfo

# Options that go only with --replicas (health.py refuses them for the single check).
REPLICAS_ONLY = ("records_dir", "endpoint_socket", "lock_file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fleet check's options, for health.build_parser."""
    fl = parser.add_argument_group("replicas (--slurm-job NAME --replicas N)")
    fl.add_argument(
        "--replicas",
        type=positive(int),
        metavar="N",
        help="check every replica job NAME-r1..NAME-rN (each one's first node), one verdict for all",
    )
    fl.add_argument(
        "--records-dir",
        metavar="DIR",
        help="with --replicas: where the batch scripts write their job records (NAME-rI.job.json), read "
        "for a replica squeue does not show to this user (PrivateData=jobs)",
    )
    fl.add_argument(
        "--lock-file",
        metavar="PATH",
        help="with --replicas: the lock that keeps two checks (or a check and a rollout) from acting at "
        "once (default: the state file's path + .lock); opened without following a link",
    )
    fl.add_argument(
        "--endpoint-socket",
        metavar="PATH",
        help="with --replicas: HAProxy's stats socket (e.g. /run/haproxy/admin.sock): point the "
        "endpoint's slots at the running replicas, take the others out, and report HAProxy's view",
    )


class ReplicaResult:
    """One replica's part of the check."""

    def __init__(self, slot: str, job_name: str, out: Outcome, state: dict[str, Any]) -> None:
        self.slot = slot
        self.job_name = job_name
        self.status = out.status
        self.reason = out.reason
        self.message = " ".join(out.message.split())  # Slurm's multi-line errors: one line each
        self.duration = out.duration
        self.url = out.url
        self.job: JobInfo | None = out.job
        self.last_success: float | None = state.get("last_success")
        self.consecutive_busy = int(state.get("consecutive_busy") or 0)
        self.restarts_total = int(state.get("restarts_total") or 0)
        self.decision: replacement.Decision | None = None  # with --restart-policy always
        self.replaced_by: str | None = None  # the job id this check submitted for it
        self.stale: bool | None = None  # runs files other than the current sbatch's (None: unknown)
        self.record: dict[str, Any] | None = None  # this job's record (its batch script's own)

    @property
    def capped(self) -> bool:
        return self.decision is not None and self.decision.action == "capped"

    @property
    def ok(self) -> bool:
        return self.reason == "ok"

    @property
    def busy(self) -> bool:
        return self.reason == "busy"

    @property
    def job_id(self) -> str:
        return self.job.job_id if self.job and self.job.job_id != "?" else ""

    @property
    def node(self) -> str:
        return (self.job.node if self.job else None) or ""

    @property
    def slurm_state(self) -> str:
        if self.reason == "slurm_error":
            return "UNKNOWN"
        return self.job.state if self.job else "UNKNOWN"

    def serving_node(self) -> str | None:
        """The node the endpoint's slot should point at: the first node of a job that holds its nodes."""
        job = self.job
        if job is None or not job.active or job.state in PENDING_STATES or not job.node:
            return None
        return job.node

    def line(self) -> str:
        where = f"job {self.job_id or '-'} {self.slurm_state}" + (f" on {self.node}" if self.node else "")
        text = self.message if self.ok else f"{self.reason}: {self.message}"
        if self.stale:
            text += "; stale: runs the files of an earlier deploy (roll out with --data rollout=true)"
        d = self.decision
        if self.replaced_by:
            text += f"; replaced ({d.cause if d else '?'}): submitted job {self.replaced_by}"
        elif d is not None and d.action != "none":
            text += (
                f"; {d.action}"
                + (f" ({d.cause})" if d.cause else "")
                + (f": {d.message}" if d.message else "")
            )
        return f"{self.slot} {STATUS_NAMES[self.status]} - {text} [{self.job_name}: {where}]"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.slot,
            "job_name": self.job_name,
            "job_id": self.job_id or None,
            "node": self.node or None,
            "state": self.slurm_state,
            "status": STATUS_NAMES[self.status],
            "reason": self.reason,
            "message": self.message,
            "url": self.url,
            "duration": None if self.duration is None else round(self.duration, 6),
            "consecutive_busy": self.consecutive_busy,
            "last_success": self.last_success,
            "stale": self.stale,
            "restarts_total": self.restarts_total,
            "replacement": None
            if self.decision is None
            else {
                "action": self.decision.action,
                "cause": self.decision.cause or None,
                "message": self.decision.message or None,
                "new_job_id": self.replaced_by,
            },
        }


class EndpointView:
    """What the check did to the endpoint and what HAProxy reported back."""

    def __init__(self, socket_path: str) -> None:
        self.socket = socket_path
        self.commands: list[str] = []
        self.replicas_up: int | None = None
        self.queue_length: int | None = None
        self.servers: dict[str, str] = {}
        self.error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "socket": self.socket,
            "replicas_up": self.replicas_up,
            "queue_length": self.queue_length,
            "servers": self.servers,
            "commands": self.commands,
            "error": self.error,
        }


class FleetOutcome:
    def __init__(self, deployment: str, replicas: list[ReplicaResult], endpoint: EndpointView | None) -> None:
        self.deployment = deployment
        self.replicas = replicas
        self.endpoint = endpoint
        self.timestamp = time.time()
        self.long_lines: list[str] = []
        self.extra: dict[str, Any] = {}
        self.status, self.reason, self.message = verdict(replicas, endpoint)

    @property
    def generating(self) -> int:
        return sum(r.ok for r in self.replicas)

    def perfdata(self) -> list[str]:
        n = len(self.replicas)
        perf = [
            f"replicas_up={self.generating};;;0;{n}",
            f"replicas_busy={sum(r.busy for r in self.replicas)};;;0;{n}",
        ]
        ep = self.endpoint
        if ep is not None and ep.replicas_up is not None:
            perf.append(f"endpoint_replicas_up={ep.replicas_up};;;0;{n}")
        if ep is not None and ep.queue_length is not None:
            perf.append(f"queue_length={ep.queue_length};;;0")
        perf += [f"{r.slot}_probe_duration={r.duration or 0.0:.3f}s;;;0" for r in self.replicas]
        return perf

    def nagios(self) -> str:
        line = f"NEMOTRON {STATUS_NAMES[self.status]} - {self.message} | " + " ".join(self.perfdata())
        lines = [line, *(r.line() for r in self.replicas)]
        ep = self.endpoint
        if ep is not None:
            if ep.error:
                lines.append(f"endpoint ({ep.socket}): {ep.error}")
            else:
                slots = ", ".join(f"{name} {status}" for name, status in sorted(ep.servers.items()))
                lines.append(
                    f"endpoint ({ep.socket}): {ep.replicas_up}/{len(self.replicas)} slots UP ({slots}), "
                    f"queue {ep.queue_length}; sent: {'; '.join(ep.commands) or 'nothing (slots as desired)'}"
                )
        return "\n".join([*lines, *self.long_lines])

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": STATUS_NAMES[self.status],
            "exit_code": self.status,
            "reason": self.reason,
            "message": self.message,
            "deployment": self.deployment,
            "replicas_configured": len(self.replicas),
            "replicas_generating": self.generating,
            "timestamp": round(self.timestamp, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.timestamp)),
            "replicas": [r.as_dict() for r in self.replicas],
            "endpoint": self.endpoint.as_dict() if self.endpoint else None,
            **self.extra,
        }


def verdict(replicas: list[ReplicaResult], endpoint: EndpointView | None) -> tuple[int, str, str]:
    """(Nagios status, reason code, summary) of the whole deployment."""
    n, ok = len(replicas), sum(r.ok for r in replicas)
    bad = [r for r in replicas if not r.ok]
    text = f"{ok}/{n} replicas generate" + "".join(f"; {r.slot}: {r.reason}: {r.message}" for r in bad)
    if endpoint is not None and endpoint.error:
        return CRITICAL, "endpoint_error", f"endpoint_error: {endpoint.error}; {text}"
    if any(r.reason == "slurm_error" for r in replicas):
        return UNKNOWN, "slurm_error", text
    capped = [r for r in replicas if r.capped]
    if capped:
        msg = "; ".join(f"{r.slot}: {r.decision.message}" for r in capped if r.decision)
        return CRITICAL, "restart_capped", f"{text}; {msg}"
    if not bad:
        stale = [r.slot for r in replicas if r.stale]
        if stale:
            return (
                WARNING,
                "stale",
                (
                    f"{text}; stale: {', '.join(stale)} still run(s) the files of an earlier deploy "
                    "(roll out with --data rollout=true)"
                ),
            )
        return OK, "ok", text
    if all(r.busy and r.status == WARNING for r in bad):
        return WARNING, "busy", text
    if ok:
        return WARNING, "degraded", text
    return CRITICAL, "no_replica", text


def check_replica(opts: argparse.Namespace, job_name: str, port: int, state: dict[str, Any]) -> Outcome:
    """check.check_once for one replica job, its busy count and last success in `state`."""
    record = record_path(opts.records_dir, job_name) if opts.records_dir else None
    target = Target(
        None,
        port,
        job_name,
        None,
        record=record,
        trust=getattr(opts, "trust", None),
        job_user=getattr(opts, "job_user", None),
    )
    try:
        out = check_once(opts, target, state)
    except SlurmError as exc:
        return Outcome(UNKNOWN, "slurm_error", str(exc), None)
    if out.duration is None:  # no probe (job pending or gone): a new job starts with a clean count
        state["consecutive_busy"] = 0
        state["last_reason"] = out.reason
        state["last_check"] = time.time()
    return out


def sync_endpoint(socket_path: str, job_name: str, replicas: list[ReplicaResult], port: int) -> EndpointView:
    from . import endpoint_sync

    view = EndpointView(socket_path)
    nodes = {r.job_name: r.serving_node() for r in replicas}
    desired = endpoint_sync.desired_from_nodes(job_name, len(replicas), nodes, port)
    for r in replicas:  # Slurm could not say where it runs: leave its slot as it is
        if r.reason == "slurm_error":
            desired.pop(r.slot, None)
    try:
        # Slots above rN (the nodes hold more replicas than `replicas`, or a scale-down left them) stay
        # in maintenance: nothing of this deployment serves there.
        view.commands = endpoint_sync.apply(socket_path, desired, retire_above=len(replicas))
        servers = endpoint_sync.servers_state(socket_path)
        view.servers = {name: s.status for name, s in servers.items()}
        counted = set(endpoint_sync.slots_above(servers, len(replicas)))
        view.replicas_up = sum(s.status == "up" for name, s in servers.items() if name not in counted)
        view.queue_length = endpoint_sync.queue_length(endpoint_sync.backend_stat(socket_path))
    except endpoint_sync.SyncError as exc:
        view.error = (
            f"{exc}. Fix: start the endpoint (haproxy.service on the login node) or pass its stats socket "
            "as --endpoint-socket, and let this user use it (the socket's group)"
        )
    return view


def check_fleet(opts: argparse.Namespace, job_name: str, count: int, port: int) -> FleetOutcome:
    from . import endpoint_sync

    acting = opts.restart_policy == "always" and not opts.stopped
    lock = replacement.CheckLock(
        getattr(opts, "lock_file", None) or (f"{opts.state_path}.lock" if opts.state_path else None)
    )
    with lock as locked:
        states = load_state(opts.state_path)
        results = []
        for i in range(1, count + 1):
            slot = f"{endpoint_sync.SLOT_PREFIX}{i}"
            name = endpoint_sync.replica_job_name(job_name, i)
            sub = states.get(slot)
            if not isinstance(sub, dict):
                sub = states[slot] = {}
            out = check_replica(opts, name, port, sub)
            results.append(ReplicaResult(slot, name, out, sub))
        current = files_digest(opts.sbatch) if opts.sbatch else None
        for r in results:
            rec = (
                read_record(record_path(opts.records_dir, r.job_name), getattr(opts, "trust", None))
                if opts.records_dir
                else None
            )
            r.record = rec if rec and str(rec.get("job_id")) == r.job_id else None
            if current and r.record is not None and r.job is not None and r.job.active:
                r.stale = r.record.get("files") != current
        view = None
        if opts.endpoint_socket and locked:  # unlocked: a rollout or another check is changing slots
            view = sync_endpoint(opts.endpoint_socket, job_name, results, port)
        if acting and locked and not any(r.reason == "slurm_error" for r in results):
            replacement.replace_dead(opts, results, states, view)
            if view is not None and any(r.replaced_by for r in results):
                view = sync_endpoint(opts.endpoint_socket, job_name, results, port)
        fleet = FleetOutcome(job_name, results, view)
        if not locked:
            fleet.long_lines.append(
                f"warning: {lock.error}"
                if lock.error
                else f"warning: another check or a rollout holds {lock.path}: this check changed nothing"
            )
        error = save_state(opts.state_path, states) if locked else None
    if error:
        fleet.long_lines.append(f"warning: {error}")
    return fleet


def report_stopped(opts: argparse.Namespace, job_name: str) -> int:
    """state=stopped: say so (OK), write only the deployment's series, act on nothing."""
    from . import endpoint_sync

    message = (
        f"{job_name}: the service is stopped on purpose (state=stopped); nothing is checked or replaced. "
        "Start it with the deploy: --data state=running --data submit=true"
    )
    out = Outcome(OK, "stopped", message, None)
    if opts.endpoint_socket:  # no replica should get traffic: every slot in maintenance
        desired = endpoint_sync.desired_from_nodes(job_name, opts.replicas, {}, 0)
        try:
            endpoint_sync.apply(opts.endpoint_socket, desired, retire_above=opts.replicas)
        except endpoint_sync.SyncError as exc:
            out.long_lines.append(f"warning: endpoint ({opts.endpoint_socket}): {exc}")
    if opts.prometheus_textfile:
        try:
            metrics.write_stopped_textfile(opts.prometheus_textfile, job_name, out.timestamp, OK)
        except (OSError, ImportError) as exc:
            out = Outcome(UNKNOWN, "internal_error", f"cannot write {opts.prometheus_textfile}: {exc}", None)
    print(json.dumps(out.as_dict(), sort_keys=True) if opts.json else out.nagios())
    return out.status


def record_trust(opts: argparse.Namespace) -> Any:
    """Whose job records the check believes (--job-user, else this user) and on which nodes (--nodes-file)."""
    from .slurm import RecordTrust

    try:
        return RecordTrust(getattr(opts, "job_user", None), getattr(opts, "nodes_file", None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _fleet_args(opts: argparse.Namespace) -> tuple[str, int]:
    for option in ("url", "host", "endpoint", "job_id", "job_record", "wait"):
        if getattr(opts, option):
            hint = " (use --records-dir: one record per replica)" if option == "job_record" else ""
            raise UsageError(f"--{option.replace('_', '-')} does not go with --replicas{hint}")
    job = opts.slurm_job
    if not job or re.fullmatch(r"\d+(_\d+)?", job):
        raise UsageError("--replicas goes with --slurm-job NAME: the replicas are the jobs NAME-r1..NAME-rN")
    port = opts.port if opts.port is not None else DEFAULT_PORT
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port")
    return job, port


def main(opts: argparse.Namespace, parser: argparse.ArgumentParser, prog: str) -> int:
    """``health --replicas N``: called by health.main with the parsed options."""
    try:
        job_name, port = _fleet_args(opts)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return UNKNOWN
    try:
        opts.trust = record_trust(opts)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return UNKNOWN
    opts.state_path = None
    if not opts.no_state_file:
        opts.state_path = opts.state_file or default_state_file(f"fleet-{job_name}-{port}")
    if opts.stopped:
        return report_stopped(opts, job_name)
    try:
        fleet = check_fleet(opts, job_name, opts.replicas, port)
    except Exception as exc:  # a monitoring plugin says UNKNOWN, never a traceback
        out = Outcome(UNKNOWN, "internal_error", f"{type(exc).__name__}: {exc}", None)
        print(json.dumps(out.as_dict(), sort_keys=True) if opts.json else out.nagios())
        return UNKNOWN
    if opts.prometheus_textfile:
        try:
            metrics.write_fleet_textfile(opts.prometheus_textfile, fleet)
        except OSError as exc:
            fleet.long_lines.append(f"error: cannot write {opts.prometheus_textfile}: {exc}")
            fleet.extra["textfile_error"] = str(exc)
            fleet.status = UNKNOWN
    print(json.dumps(fleet.as_dict(), sort_keys=True) if opts.json else fleet.nagios())
    sys.stdout.flush()
    return fleet.status


__all__ = ["CRITICAL", "OK", "UNKNOWN", "WARNING", "add_arguments", "check_fleet", "main", "verdict"]
