"""The check's result: its reason codes (:data:`REASONS`), and :class:`Outcome`, printed as one
Nagios line with perfdata (exit codes in nagios.py) or as one JSON object.

Runs on the cluster (login nodes, and inside the job's container): standard library only.
"""

from __future__ import annotations

import time

from .nagios import STATUS_NAMES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .probe import ProbeResult
    from .slurm import JobInfo


# reason code -> what it means. The probe's own outcomes come first.
REASONS: dict[str, str] = {
    "ok": "the server generated a token",
    "refused": "connection refused: nothing listens on the port (not started, still loading, or dead)",
    "unresolvable": "the host name does not resolve",
    "connect_timeout": "no answer to the TCP connect (host down, firewalled, or listen backlog full)",
    "unreachable": "no route to the host",
    "not_nemo": "something other than NeMo's server answers on that port (404/405/501 or not HTTP)",
    "rejected": "200 with a JSON string: NeMo refused the request (its validation message is shown)",
    "http_error": "HTTP 400 or 5xx from PUT /generate",
    "invalid_json": "a 200 whose body is not JSON",
    "bad_shape": "a JSON reply without a one-string 'sentences' list",
    "busy": "connected but no reply within the probe timeout (lock held by a long request, or wedged); "
    "with --endpoint also its 503 'replicas are busy' (a request waited endpoint_queue_seconds)",
    "disconnected": "the server closed the connection without a reply (it may have crashed)",
    "job_pending": "the Slurm job has not started yet",
    "job_gone": "the Slurm job is no longer pending or running",
    "untrusted_record": "no job of the name that this user may see, and its job record is not trusted (a "
    "link, not the submitting account's, in a directory others may write, or naming a node outside the "
    "cluster): ignored",
    "server_exited": "the server process given with --server-pid has exited",
    "startup_timeout": "the server did not become ready within the start-up budget",
    "slurm_error": "Slurm could not be asked about the job",
    "no_replica": "no replica in rotation: the endpoint's 503 'No replica is up' (--replicas: none generates)",
    "tls_error": "the TLS handshake failed: the certificate is not trusted (--ca-file) or not for that host",
    "unauthorized": "HTTP 401 from the endpoint: no API key, or one it does not know (NEMOTRON_API_KEY); "
    "or 401/403 from a replica's front: no replica key, or a wrong one (--replica-key-file)",
    "envelope_refused": "HTTP 400/413 from the endpoint's request envelope (its message names the limit)",
    "degraded": "--replicas: some replicas generate, not all (each replica's line says why)",
    "restart_capped": "--replicas: a replica was replaced max-restarts-per-day times in 24 h; not again",
    "stale": "--replicas: every replica generates, some still run the files of an earlier deploy",
    "stopped": "--replicas --stopped: the service is stopped on purpose (state=stopped); nothing runs",
    "endpoint_error": "--endpoint-socket: HAProxy's stats socket failed, or HAProxy refused a command",
    "internal_error": "the health check itself failed",
}


class Outcome:
    """The final verdict of a run, printed as one Nagios line or one JSON object."""

    def __init__(self, status: int, reason: str, message: str, url: str | None) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.url = url
        self.duration: float | None = None
        self.http_status: int | None = None
        self.detail: str | None = None
        self.job: JobInfo | None = None
        self.extra: dict[str, Any] = {}
        self.perfdata: list[str] = []
        self.long_lines: list[str] = []
        self.timestamp = time.time()

    @classmethod
    def from_probe(cls, status: int, result: ProbeResult) -> Outcome:
        out = cls(status, result.reason, result.message, result.url)
        out.duration = result.duration
        out.http_status = result.http_status
        out.detail = result.detail
        out.perfdata.append(f"probe_duration={result.duration:.3f}s;;;0")
        return out

    def nagios(self) -> str:
        text = self.message if self.reason == "ok" else f"{self.reason}: {self.message}"
        line = f"NEMOTRON {STATUS_NAMES[self.status]} - {text}"
        if self.perfdata:
            line += " | " + " ".join(self.perfdata)
        return "\n".join([line, *self.long_lines])

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": STATUS_NAMES[self.status],
            "exit_code": self.status,
            "reason": self.reason,
            "message": self.message,
            "url": self.url,
            "duration_seconds": None if self.duration is None else round(self.duration, 6),
            "http_status": self.http_status,
            "detail": self.detail,
            "timestamp": round(self.timestamp, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.timestamp)),
            "job": self.job.as_dict() if self.job else None,
            **self.extra,
        }


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
