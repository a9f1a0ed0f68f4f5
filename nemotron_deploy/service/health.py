#!/usr/bin/env python3
"""Is the Nemotron server able to generate? A health check for NeMo's ``megatron_gpt_eval.py`` server.

Why a real generation: NeMo's server has no health endpoint, answers 404 on ``/`` and 200 with a
JSON *string* for a bad request, so a TCP connect or "any HTTP reply" proves nothing. The probe is a
``PUT /generate`` of one short prompt, ``tokens_to_generate: 1``, greedy; it is healthy only on 200
with a JSON object whose ``sentences`` is a list of exactly one string. Every other outcome has a
short machine-friendly reason code (see ``REASONS``).

Two modes:

* single check (default), for timers and monitoring: Nagios plugin exit codes (0 OK, 1 WARNING,
  2 CRITICAL, 3 UNKNOWN), one summary line with perfdata, ``--json``, a state file that turns a
  persistent ``busy`` (generation lock held, or wedged ranks) from WARNING into CRITICAL and keeps the
  last success time, and an optional Prometheus textfile.
* ``--wait``, for start-up: polls until the server generates, within a start-up budget (45 min by
  default: loading 682 GB takes many minutes). Polling is fast while the port is refused so that
  readiness is noticed well under a second after it happens; with a Slurm job it fails at once when
  the job leaves PENDING/RUNNING/CONFIGURING/COMPLETING and prints the tail of the job's StdErr.
* ``--endpoint URL``: the same single check through the endpoint (HAProxy in front of the replicas),
  labelled ``endpoint``; its own answers are read: 503 "replicas are busy" is ``busy``, 503 "No
  replica is up" is ``no_replica``, its envelope's 400/413 is ``envelope_refused``.
* ``--slurm-job NAME --replicas N``: every replica job ``NAME-r<i>`` and the endpoint's slots, one
  verdict (``fleet.py``, imported only then; its docstring lists the metrics).

This file runs every minute on login nodes and inside the job's container, so it imports only the
standard library at import time (``prometheus_client`` only when a textfile is asked for) and it
works as a single file: ``python3 health.py --wait --host 127.0.0.1 --port 1424``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import sys
import time

from .nagios import CRITICAL, OK, STATUS_NAMES, UNKNOWN, WARNING
from .slurm import (
    PENDING_STATES,
    JobInfo,
    SlurmError,
    expand_hostlist,
    find_job_id,
    first_node,
    parse_scontrol_record,
    query_job,
    read_record,
)

TYPE_CHECKING = False  # typing costs ~4 ms of import time on every run; annotations are strings
if TYPE_CHECKING:
    from typing import Any

# Re-exported: the check's own names for what it reports (tests and callers use health.X).
__all__ = [
    "CRITICAL",
    "OK",
    "STATUS_NAMES",
    "UNKNOWN",
    "WARNING",
    "expand_hostlist",
    "first_node",
    "parse_scontrol_record",
    "main",
]

PROG = "nemotron-deploy health"
DEFAULT_PORT = 1424  # the model card's port (NeMo's own default is 5555)
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_TIMEOUT = 15.0  # SkyPilot's readiness timeout; a 1 s timeout flaps behind the generation lock
DEFAULT_STARTUP_TIMEOUT = 45 * 60.0
DEFAULT_BUSY_CRITICAL_AFTER = 3
DEFAULT_JOB_CHECK_INTERVAL = 2.0
DEFAULT_PROMPT = "The capital of France is"
POLL_START = 0.1
PROGRESS_LINE_SECONDS = 15  # --progress-lines: at least one line this often while waiting
POLL_CAP = 5.0
# A refused connect costs one round trip; polling it often is what keeps readiness latency < 1 s.
POLL_CAP_REFUSED = 0.25
PENDING_POLL_CAP = 15.0
MAX_BODY = 1 << 20
TAIL_LINES = 20


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
    "server_exited": "the server process given with --server-pid has exited",
    "startup_timeout": "the server did not become ready within the start-up budget",
    "slurm_error": "Slurm could not be asked about the job",
    "no_replica": "no replica in rotation: the endpoint's 503 'No replica is up' (--replicas: none generates)",
    "envelope_refused": "HTTP 400/413 from the endpoint's request envelope (its message names the limit)",
    "degraded": "--replicas: some replicas generate, not all (each replica's line says why)",
    "restart_capped": "--replicas: a replica was replaced max-restarts-per-day times in 24 h; not again",
    "stale": "--replicas: every replica generates, some still run the files of an earlier deploy",
    "stopped": "--replicas --stopped: the service is stopped on purpose (state=stopped); nothing runs",
    "endpoint_error": "--endpoint-socket: HAProxy's stats socket failed, or HAProxy refused a command",
    "internal_error": "the health check itself failed",
}


class UsageError(Exception):
    """Bad arguments: UNKNOWN (3), with a message that says what to pass instead."""


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------


class ProbeResult:
    """One probe's outcome: ``reason`` is a key of :data:`REASONS`."""

    __slots__ = ("reason", "message", "duration", "http_status", "detail", "url")

    def __init__(
        self,
        reason: str,
        message: str,
        duration: float,
        url: str,
        http_status: int | None = None,
        detail: str | None = None,
    ) -> None:
        self.reason = reason
        self.message = message
        self.duration = duration
        self.url = url
        self.http_status = http_status
        self.detail = detail

    @property
    def ok(self) -> bool:
        return self.reason == "ok"

    def __repr__(self) -> str:
        return f"ProbeResult({self.reason!r}, {self.message!r}, {self.duration:.3f}s)"


def probe_payload(prompt: str = DEFAULT_PROMPT) -> dict[str, Any]:
    """The cheapest request NeMo will still run through the model: one sentence, one greedy token.

    Only keys that every NeMo since 1.22 accepts (``random_seed`` is 1.23+ and would be logged as an
    error by older servers); ``all_probs`` stays false because it is broken with PP > 1.
    """
    return {
        "sentences": [prompt],
        "tokens_to_generate": 1,
        "temperature": 1.0,
        "add_BOS": False,
        "top_k": 0,
        "top_p": 0.9,
        "greedy": True,
        "all_probs": False,
        "repetition_penalty": 1.0,
        "min_tokens_to_generate": 0,
        "end_strings": ["<|endoftext|>"],
    }


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:  # flask-restful errors are {"message": ...}; NeMo's rejections are JSON strings
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("message"), str):
            text = obj["message"]
        elif isinstance(obj, str):
            text = obj
    except ValueError:
        text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify_response(status: int, raw: bytes, duration: float, url: str) -> ProbeResult:
    """Turn an HTTP reply to the probe into a :class:`ProbeResult` (pure, for tests and reuse)."""
    if status in (404, 405, 501) or status < 200 or 200 < status < 400:
        return ProbeResult(
            "not_nemo",
            f"HTTP {status} on PUT /generate: this port is not served by NeMo's text-generation server "
            "(check host and port, or whether another program took the port)",
            duration,
            url,
            status,
            _snippet(raw),
        )
    if status >= 400:
        detail = _snippet(raw)
        return ProbeResult(
            "http_error", f"HTTP {status} on PUT /generate: {detail}", duration, url, status, detail
        )
    try:
        obj = json.loads(raw)
    except ValueError:
        return ProbeResult(
            "invalid_json", f"HTTP 200 but the body is not JSON: {_snippet(raw, 80)!r}", duration, url, status
        )
    if isinstance(obj, str):
        return ProbeResult(
            "rejected", f"NeMo rejected the probe request: {obj}", duration, url, status, _snippet(raw)
        )
    sentences = obj.get("sentences") if isinstance(obj, dict) else None
    if not (isinstance(sentences, list) and len(sentences) == 1 and isinstance(sentences[0], str)):
        shape = type(obj).__name__ if not isinstance(obj, dict) else f"keys {sorted(obj)[:8]}"
        return ProbeResult(
            "bad_shape",
            f"HTTP 200 but not NeMo's answer (expected 'sentences' with one string, got {shape})",
            duration,
            url,
            status,
        )
    return ProbeResult("ok", f"generated 1 token in {duration:.3f}s", duration, url, status)


# What the endpoint answers itself (nemotron_deploy/deploy/templates/haproxy.cfg.j2): after `timeout queue`, and
# when no slot of the backend is UP. tests/test_endpoint.py checks the template still says so.
ENDPOINT_BUSY_TEXT = "replicas are busy"
ENDPOINT_NO_REPLICA_TEXT = "No replica is up"


def classify_endpoint(result: ProbeResult) -> ProbeResult:
    """Read the endpoint's own answers in a probe's result (--endpoint): its 503s and its envelope."""
    detail = result.detail or ""
    if result.http_status == 503 and ENDPOINT_BUSY_TEXT in detail:
        result.reason = "busy"
        result.message = (
            f"the endpoint answered 503: every replica stayed busy for its queue timeout: {detail}"
        )
    elif result.http_status == 503 and ENDPOINT_NO_REPLICA_TEXT in detail:
        result.reason = "no_replica"
        result.message = (
            "no replica is in rotation: the endpoint answered 503 (every slot is in maintenance or failed "
            "its health check; see nemotron-deploy health --replicas N): " + detail
        )
    elif result.http_status in (400, 413):
        result.reason = "envelope_refused"
        result.message = f"the endpoint refused the probe with HTTP {result.http_status}: {detail}"
    elif result.reason == "busy":
        result.message += " (through the endpoint: the replicas are all busy, or HAProxy's queue is full)"
    return result


def probe(
    host: str,
    port: int,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    timeout: float = DEFAULT_TIMEOUT,
    payload: dict[str, Any] | None = None,
) -> ProbeResult:
    """PUT one tiny generation to ``http://host:port/generate`` and classify what happens.

    The connect timeout is short (a host that does not answer SYNs is down); the read timeout is
    long, because the generation lock makes a healthy server answer late behind real traffic.
    """
    url = f"http://{_host_for_url(host)}:{port}/generate"
    body = json.dumps(payload if payload is not None else probe_payload()).encode()
    start = time.monotonic()

    def done(reason: str, message: str) -> ProbeResult:
        return ProbeResult(reason, message, time.monotonic() - start, url)

    conn = http.client.HTTPConnection(host, port, timeout=connect_timeout)
    try:
        try:
            conn.connect()
        except socket.gaierror as exc:
            return done("unresolvable", f"cannot resolve host {host!r}: {exc.strerror or exc}")
        except ConnectionRefusedError:
            return done("refused", f"connection refused by {host}:{port} (server not listening yet, or down)")
        except TimeoutError:
            return done("connect_timeout", f"no TCP answer from {host}:{port} within {connect_timeout:g}s")
        except OSError as exc:
            return done("unreachable", f"cannot connect to {host}:{port}: {exc.strerror or exc}")
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        try:
            conn.request(
                "PUT",
                "/generate",
                body=body,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            resp = conn.getresponse()
            raw = resp.read(MAX_BODY)
        except TimeoutError:
            return done(
                "busy",
                f"connected to {host}:{port} but no reply within {timeout:g}s "
                "(generation lock held by a long request, or the ranks are wedged)",
            )
        except (http.client.BadStatusLine, http.client.LineTooLong) as exc:
            if isinstance(exc, http.client.RemoteDisconnected):
                return done("disconnected", f"{host}:{port} closed the connection without a reply")
            return done("not_nemo", f"{host}:{port} does not speak HTTP ({type(exc).__name__})")
        except (http.client.HTTPException, OSError) as exc:
            return done("disconnected", f"connection to {host}:{port} broke: {type(exc).__name__}: {exc}")
        return classify_response(resp.status, raw, time.monotonic() - start, url)
    finally:
        conn.close()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# --------------------------------------------------------------------------------------------------
# Slurm: which job, which state, which node
# --------------------------------------------------------------------------------------------------


def tail_file(path: str | None, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a (possibly huge) log file, or one line saying why not."""
    if not path:
        return ["(Slurm reports no StdErr file for this job)"]
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError as exc:
        return [f"(cannot read {path}: {exc.strerror or exc})"]
    return data.decode("utf-8", "replace").splitlines()[-lines:]


# --------------------------------------------------------------------------------------------------
# State across runs (busy escalation, last success)
# --------------------------------------------------------------------------------------------------


def default_state_file(target_key: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", target_key).strip("_") or "default"
    return os.path.join(base, "nemotron-deploy", f"health-{slug}.json")


def load_state(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(path: str | None, state: dict[str, Any]) -> str | None:
    """Write the state atomically; returns an error message instead of failing the check."""
    if not path:
        return None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(tmp, path)
    except OSError as exc:
        return f"cannot write state file {path}: {exc.strerror or exc}"
    return None


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


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


def parse_duration(text: str) -> float:
    """``2700``, ``45m``, ``1h30m``, ``90s``, ``0.5`` -> seconds."""
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return float(raw)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", raw)
    if not parts or "".join(n + u for n, u in parts) != raw:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use seconds or e.g. 45m, 1h30m, 90s")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def write_textfile(path: str, outcome: Outcome, state: dict[str, Any], target: str) -> None:
    """Write node_exporter textfile metrics atomically (prometheus_client's temp file + rename), 0644."""
    try:
        from prometheus_client import CollectorRegistry, Gauge
    except ImportError:
        raise OSError("prometheus_client is not installed: pip install prometheus-client") from None
    reg = CollectorRegistry()
    labels = {"target": target}

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, ["target"], registry=reg).labels(**labels).set(value)

    gauge("nemotron_up", "1 if the NeMo server generated a token in the last probe", outcome.reason == "ok")
    gauge(
        "nemotron_probe_status",
        "Nagios status of the last probe (0 OK,1 WARN,2 CRIT,3 UNKNOWN)",
        outcome.status,
    )
    gauge("nemotron_probe_duration_seconds", "Duration of the last probe", outcome.duration or 0.0)
    gauge("nemotron_probe_timestamp_seconds", "Unix time of the last probe", outcome.timestamp)
    gauge(
        "nemotron_last_success_timestamp_seconds",
        "Unix time of the last successful probe (0: never)",
        float(state.get("last_success") or 0.0),
    )
    gauge(
        "nemotron_probe_consecutive_busy", "Consecutive busy probes", int(state.get("consecutive_busy") or 0)
    )
    reason = Gauge(
        "nemotron_probe_reason", "1 for the reason of the last probe", ["target", "reason"], registry=reg
    )
    for code in REASONS:
        reason.labels(target=target, reason=code).set(1 if code == outcome.reason else 0)
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


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------


class Target:
    """Where to probe: a fixed host/port, or a Slurm job's first node."""

    def __init__(
        self,
        host: str | None,
        port: int,
        job_spec: str | None,
        job_id: str | None,
        record: str | None = None,
        *,
        endpoint: bool = False,
    ) -> None:
        self.host = host
        self.endpoint = endpoint  # --endpoint: HAProxy in front of the replicas, read its own answers
        self.record = record  # --job-record: the batch script's own record, for jobs squeue hides
        self.port = port
        self.job_spec = job_spec  # --slurm-job: the host comes from the job
        self.job_id = job_id  # --job-id: the host is fixed, the job is only watched
        self._resolved_id: str | None = None  # a job name is looked up once, then followed by id

    @property
    def watches_job(self) -> bool:
        return bool(self.job_spec or self.job_id)

    def key(self) -> str:
        if self.endpoint:
            return "endpoint"
        return f"job-{self.job_spec}-{self.port}" if self.job_spec else f"{self.host}-{self.port}"

    def label(self, host: str | None = None) -> str:
        return f"{_host_for_url(host or self.host or '?')}:{self.port}"

    def url(self, host: str | None = None) -> str:
        return f"http://{self.label(host)}/generate"

    def metric_label(self) -> str:
        """A label that stays the same across runs, even when a job moves to other nodes."""
        if self.endpoint:
            return "endpoint"
        return f"slurm-job/{self.job_spec}:{self.port}" if self.job_spec else self.label()

    def lookup_job(self) -> JobInfo:
        spec = self.job_spec or str(self.job_id)
        if self._resolved_id is None and not re.fullmatch(r"\d+(_\d+)?", spec):
            found = find_job_id(spec)
            if found is None:
                return self._recorded_job(spec) or JobInfo("?", name=spec, state="GONE", source="gone")
            self._resolved_id = found
        return query_job(self._resolved_id or spec)

    def _recorded_job(self, name: str) -> JobInfo | None:
        """The job as its batch script recorded it: squeue shows nothing where Slurm runs with
        PrivateData=jobs and this user (the scheduled check's) does not own the job."""
        rec = read_record(self.record)
        if rec is None or rec.get("job_name") != name:
            return None
        return JobInfo(
            str(rec["job_id"]),
            name=name,
            state="RECORDED",
            node=str(rec["node"]),
            source="record",
            reason=f"not visible to this user (Slurm PrivateData); recorded by {self.record}",
        )


def check_once(opts: argparse.Namespace, target: Target, state: dict[str, Any] | None = None) -> Outcome:
    """One probe with Nagios semantics, busy escalation and the persisted last success.

    ``state``: this target's part of a state the caller loads and saves (the fleet check keeps one
    file for every replica); without it, ``opts.state_path`` is read and written here.
    """
    job = None
    host = target.host
    if target.watches_job:
        job = target.lookup_job()
        if not job.active:
            out = Outcome(CRITICAL, "job_gone", job.describe(), None)
            out.job = job
            return out
        if target.job_spec:
            if job.state in PENDING_STATES or not job.node:
                out = Outcome(CRITICAL, "job_pending", job.describe() + ": no node to probe yet", None)
                out.job = job
                return out
            host = job.node
    assert host is not None
    result = probe(
        host,
        target.port,
        connect_timeout=opts.connect_timeout,
        timeout=opts.timeout,
        payload=probe_payload(opts.prompt),
    )
    if target.endpoint:
        result = classify_endpoint(result)
    persist = state is None
    if state is None:
        state = load_state(opts.state_path)
    busy = int(state.get("consecutive_busy") or 0) + 1 if result.reason == "busy" else 0
    if result.ok:
        status = OK
        state["last_success"] = time.time()
    elif result.reason == "busy":
        status = CRITICAL if busy >= opts.busy_critical_after else WARNING
        if status == CRITICAL:
            result.message += f"; busy {busy} times in a row (critical from {opts.busy_critical_after})"
    else:
        status = CRITICAL
    state["consecutive_busy"] = busy
    state["last_reason"] = result.reason
    state["last_check"] = time.time()
    out = Outcome.from_probe(status, result)
    out.job = job
    out.perfdata.append(f"consecutive_busy={busy};;{opts.busy_critical_after};0")
    out.extra["consecutive_busy"] = busy
    out.extra["last_success_timestamp"] = state.get("last_success")
    out.extra["state"] = state
    error = save_state(opts.state_path, state) if persist else None
    if error:
        out.long_lines.append(f"warning: {error}")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child that its parent has not reaped yet is a zombie, not a server
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def next_interval(reason: str, current: float) -> float:
    """Back-off policy between probes in --wait mode.

    refused: the port is closed while the model loads, a refused connect is cheap, and the first
    success must be seen within well under a second, so stay at <= 0.25 s. busy: the probe already
    waited its whole timeout, so go again at once. Anything else (DNS, timeouts, a foreign server on
    the port...) backs off to 5 s, where faster polling would only add load.
    """
    if reason == "refused":
        return min(max(current, POLL_START) * 1.5, POLL_CAP_REFUSED)
    if reason == "busy":
        return 0.0
    return min(max(current, POLL_START) * 2, POLL_CAP)


class Progress:
    """Start-up progress: one updating line on a terminal; with --progress-lines, a plain line when
    the state changes and every PROGRESS_LINE_SECONDS otherwise (for logs, pyinfra, CI); else silent."""

    def __init__(self, enabled: bool, lines: bool = False) -> None:
        self.enabled = enabled or lines
        self.lines = lines
        self.last = 0.0
        self.last_key: str | None = None
        self.shown = False

    def update(self, text: str, force: bool = False, key: str | None = None) -> None:
        now = time.monotonic()
        if not self.enabled:
            return
        if self.lines:
            if key == self.last_key and now - self.last < PROGRESS_LINE_SECONDS and not force:
                return
            self.last, self.last_key = now, key
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            return
        if not force and now - self.last < 0.2:
            return
        self.last = now
        width = 200
        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns - 1
        except OSError:
            pass
        sys.stderr.write("\r\x1b[K" + text[:width])
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _job_failure(job: JobInfo, elapsed: float) -> Outcome:
    out = Outcome(CRITICAL, "job_gone", f"{job.describe()} after {fmt_duration(elapsed)} of waiting", None)
    out.job = job
    tail = tail_file(job.stderr) if job.source != "gone" else []
    if job.source != "gone":
        out.long_lines.append(f"--- last {TAIL_LINES} lines of {job.stderr or 'StdErr'} ---")
        out.long_lines.extend(tail)
    out.extra["stderr_tail"] = tail
    return out


def wait_ready(opts: argparse.Namespace, target: Target) -> Outcome:
    """Poll until the server generates, the job dies, the server process exits or the budget ends."""
    progress = Progress(enabled=not opts.no_progress and sys.stderr.isatty(), lines=opts.progress_lines)
    start = time.monotonic()
    host = target.host
    job: JobInfo | None = None
    deadline = None if target.job_spec else start + opts.startup_timeout
    attempts = 0
    interval = POLL_START
    pending_interval = opts.job_check_interval
    next_probe = start
    next_job_check = start
    last: ProbeResult | None = None

    def finish(out: Outcome) -> Outcome:
        progress.clear()
        out.job = out.job or job
        waited = time.monotonic() - start
        out.extra.update(mode="wait", attempts=attempts, waited_seconds=round(waited, 3))
        out.perfdata += [f"waited={waited:.3f}s;;;0", f"attempts={attempts};;;0"]
        return out

    try:
        while True:
            now = time.monotonic()
            if target.watches_job and now >= next_job_check:
                try:
                    job = target.lookup_job()
                except SlurmError as exc:
                    if exc.missing:
                        return finish(Outcome(UNKNOWN, "slurm_error", str(exc), None))
                    last = ProbeResult("slurm_error", str(exc), 0.0, target.url(host))
                    job = None
                if job is not None and not job.active:
                    return finish(_job_failure(job, now - start))
                if job is not None and target.job_spec:
                    if job.state in PENDING_STATES or not job.node:
                        pending_interval = min(pending_interval * 1.5, PENDING_POLL_CAP)
                        next_job_check = now + pending_interval
                        progress.update(
                            f"waiting for {job.describe()} ({fmt_duration(now - start)})", key=job.state
                        )
                        time.sleep(max(0.0, next_job_check - time.monotonic()))
                        continue
                    host = job.node
                    if deadline is None:  # the start-up budget starts when the job runs
                        deadline = now + opts.startup_timeout
                next_job_check = now + opts.job_check_interval
            if host is None:  # --slurm-job whose lookups failed so far: try again, within the budget
                if now - start > opts.startup_timeout:
                    msg = f"no answer from Slurm for {fmt_duration(now - start)}: {last.message if last else ''}"
                    return finish(Outcome(UNKNOWN, "slurm_error", msg, None))
                time.sleep(max(0.0, next_job_check - time.monotonic()))
                continue
            if opts.server_pid and not _pid_alive(opts.server_pid):
                msg = f"server process {opts.server_pid} exited before it could generate"
                return finish(Outcome(CRITICAL, "server_exited", msg, target.url(host)))
            assert deadline is not None
            if now >= deadline:
                why = f"; last: {last.reason} - {last.message}" if last else ""
                msg = (
                    f"not ready after the {fmt_duration(opts.startup_timeout)} start-up budget "
                    f"({attempts} attempts){why}"
                )
                out = finish(Outcome(CRITICAL, "startup_timeout", msg, target.url(host)))
                out.extra["last_reason"] = last.reason if last else None
                return out
            if now >= next_probe:
                remaining = max(0.05, deadline - now)
                last = probe(
                    host,
                    target.port,
                    connect_timeout=min(opts.connect_timeout, remaining),
                    timeout=min(opts.timeout, remaining),
                    payload=probe_payload(opts.prompt),
                )
                attempts += 1
                if last.ok:
                    waited = time.monotonic() - start
                    out = Outcome.from_probe(OK, last)
                    out.message = f"ready after {fmt_duration(waited)} ({attempts} attempts): {last.message}"
                    return finish(out)
                interval = next_interval(last.reason, interval)
                next_probe = time.monotonic() + interval
                job_text = f", job {job.job_id} {job.state}" if job else ""
                progress.update(
                    f"waiting for {target.label(host)}: {fmt_duration(time.monotonic() - start)} elapsed, "
                    f"{attempts} attempts{job_text}, last: {last.reason} ({last.message})",
                    key=f"{last.reason}{job_text}",
                )
            wake = min(next_probe, deadline, next_job_check if target.watches_job else deadline)
            time.sleep(max(0.0, wake - time.monotonic()))
    except KeyboardInterrupt:
        return finish(Outcome(UNKNOWN, "internal_error", "interrupted", target.url(host) if host else None))


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """Usage errors are UNKNOWN (3) for Nagios, not argparse's 2 (which would read CRITICAL)."""
        self.print_usage(sys.stderr)
        self.exit(UNKNOWN, f"{self.prog}: error: {message}\n")


def _positive(kind: type) -> Any:
    def conv(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    return conv


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    reasons = "\n".join(f"  {code:16s} {text}" for code, text in REASONS.items())
    p = _Parser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Check that the Nemotron NeMo server can generate: PUT /generate with one short prompt\n"
            "and tokens_to_generate=1. A TCP connect or an HTTP 404 is not readiness.\n\n"
            "Default mode: one check, Nagios exit codes and output. --wait: poll until ready (start-up)."
        ),
        epilog=(
            "exit codes: 0 OK, 1 WARNING (busy), 2 CRITICAL, 3 UNKNOWN (usage, Slurm or internal error)\n\n"
            f"reason codes:\n{reasons}\n\n"
            "examples:\n"
            f"  {prog} --host node001                      # one check of node001:1424\n"
            f"  {prog} --slurm-job nemotron --json         # the job's first node, JSON output\n"
            f"  {prog} --slurm-job 4242 --wait             # start-up: wait, fail fast if the job dies\n"
            f"  {prog} --wait --host 127.0.0.1 --port 1424 --server-pid $SERVER_PID   # in the job\n"
            f"  {prog} --url http://node001:1424 --prometheus-textfile /var/lib/node_exporter/nemotron.prom\n"
            f"  {prog} --endpoint http://login01:1424     # one generation through the endpoint (HAProxy)\n"
            f"  {prog} --slurm-job nemotron-340b --replicas 2 --endpoint-socket /run/haproxy/admin.sock\n"
            "      # every replica job nemotron-340b-r1..r2, and point the endpoint's slots at them"
        ),
    )
    where = p.add_argument_group("target (one of)")
    one = where.add_mutually_exclusive_group()
    one.add_argument("--url", help="server URL, e.g. http://node001:1424 (a /generate path is accepted)")
    one.add_argument("--host", help="server host name or address")
    one.add_argument(
        "--endpoint",
        metavar="URL",
        help="the endpoint (HAProxy in front of the replicas), e.g. http://login01:1424: one generation "
        "through it; its 503s read as busy / no_replica, its envelope's 400 as envelope_refused",
    )
    one.add_argument(
        "--slurm-job",
        metavar="NAME|ID",
        help="probe the first node of this Slurm job (digits = job id, else the newest job of that name that squeue shows you: all jobs, or only your own where Slurm sets PrivateData=jobs; see --job-record)",
    )
    where.add_argument(
        "--port", type=int, help=f"server port with --host/--slurm-job (default {DEFAULT_PORT})"
    )
    where.add_argument(
        "--job-record",
        metavar="PATH",
        help="with --slurm-job NAME: the record the job's batch script writes (job id, first node), read "
        "when squeue shows no such job to this user, as on clusters with PrivateData=jobs",
    )
    where.add_argument(
        "--job-id",
        help="with --url/--host: also watch this Slurm job and fail as soon as it is no longer alive",
    )

    fl = p.add_argument_group("replicas (--slurm-job NAME --replicas N)")
    fl.add_argument(
        "--replicas",
        type=_positive(int),
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
        "--endpoint-socket",
        metavar="PATH",
        help="with --replicas: HAProxy's stats socket (e.g. /run/haproxy/admin.sock): point the "
        "endpoint's slots at the running replicas, take the others out, and report HAProxy's view",
    )
    rs = p.add_argument_group("replacing dead replicas (--replicas ... --restart-policy always)")
    rs.add_argument(
        "--restart-policy",
        choices=("always", "never"),
        default="never",
        help="always: submit a replica again when its job is gone or its server failed the check for "
        "--unhealthy-restart-after seconds (default never: report only)",
    )
    rs.add_argument("--sbatch", metavar="PATH", help="the batch file a replacement submits")
    rs.add_argument(
        "--submit-as",
        metavar="USER",
        help="submit and cancel as this user (through `sudo -n -u USER`, which the deploy allows for "
        "exactly these commands) when it is not the user running the check",
    )
    rs.add_argument(
        "--slurm-bin",
        metavar="DIR",
        default="/usr/bin",
        help="where sbatch and scancel are (default /usr/bin)",
    )
    rs.add_argument(
        "--unhealthy-restart-after",
        type=_positive(float),
        default=600.0,
        metavar="S",
        help="replace a running replica whose server failed the check this long (default 600)",
    )
    rs.add_argument(
        "--restart-backoff-max",
        type=_positive(float),
        default=1800.0,
        metavar="S",
        help="the longest back-off between two replacements of one replica (default 1800)",
    )
    rs.add_argument(
        "--max-restarts-per-day",
        type=_positive(int),
        default=10,
        metavar="N",
        help="stop replacing a replica after N replacements in 24 h: CRITICAL restart_capped (default 10)",
    )
    rs.add_argument(
        "--started-file",
        metavar="PATH",
        help="the file the deploy writes when it submits the replicas: replace only once it exists "
        "(a deploy that only installs starts nothing), and count its jobs as starting meanwhile",
    )
    rs.add_argument(
        "--stopped",
        action="store_true",
        help="the service is stopped on purpose (the deploy's state=stopped): report that, replace nothing",
    )

    pr = p.add_argument_group("probe")
    pr.add_argument(
        "--connect-timeout",
        type=_positive(float),
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help=f"TCP connect timeout in seconds (default {DEFAULT_CONNECT_TIMEOUT:g})",
    )
    pr.add_argument(
        "--timeout",
        type=_positive(float),
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the reply once connected; none is 'busy' (default {DEFAULT_TIMEOUT:g})",
    )
    pr.add_argument("--prompt", default=DEFAULT_PROMPT, help="the probe's prompt (default: %(default)r)")

    wt = p.add_argument_group("start-up (--wait)")
    wt.add_argument("--wait", action="store_true", help="poll until the server generates (start-up mode)")
    wt.add_argument(
        "--startup-timeout",
        "--budget",
        dest="startup_timeout",
        type=parse_duration,
        default=DEFAULT_STARTUP_TIMEOUT,
        metavar="DURATION",
        help="start-up budget, e.g. 2700, 45m, 1h (default 45m; with --slurm-job, counted from job start)",
    )
    wt.add_argument(
        "--server-pid",
        "--watch-pid",
        dest="server_pid",
        type=int,
        metavar="PID",
        help="fail at once when this process (the server) exits",
    )
    wt.add_argument(
        "--job-check-interval",
        type=_positive(float),
        default=DEFAULT_JOB_CHECK_INTERVAL,
        metavar="S",
        help=f"seconds between Slurm job state checks (default {DEFAULT_JOB_CHECK_INTERVAL:g})",
    )
    wt.add_argument("--no-progress", action="store_true", help="no progress line even on a terminal")
    wt.add_argument(
        "--progress-lines",
        action="store_true",
        help=f"progress as plain lines (on each change, else every {PROGRESS_LINE_SECONDS} s) even when "
        "stderr is not a terminal",
    )

    out = p.add_argument_group("output and state")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of the Nagios line")
    out.add_argument(
        "--state-file",
        metavar="PATH",
        help="remembers consecutive busy probes and the last success "
        "(default $XDG_STATE_HOME/nemotron-deploy/health-<target>.json, else ~/.local/state/...)",
    )
    out.add_argument("--no-state-file", action="store_true", help="keep no state between runs")
    out.add_argument(
        "--busy-critical-after",
        type=_positive(int),
        default=DEFAULT_BUSY_CRITICAL_AFTER,
        metavar="N",
        help="busy is WARNING, and CRITICAL from the N-th busy check in a row (default %(default)s)",
    )
    out.add_argument(
        "--prometheus-textfile",
        metavar="PATH",
        help="also write metrics for node_exporter's textfile collector (atomic, mode 0644)",
    )
    return p


def _parse_url(url: str, option: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http":
        raise UsageError(f"{url}: NeMo's server speaks plain http://, not {parts.scheme}://")
    if parts.path not in ("", "/", "/generate"):
        raise UsageError(f"{url}: give the server's base URL (the probe always uses /generate)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise UsageError(f"{url}: invalid port") from None
    if not parts.hostname:
        raise UsageError(f"{url}: no host in the URL")
    if parts.port is None and option == "--endpoint":
        raise UsageError(f"{url}: give the endpoint's port (its endpoint_port setting), e.g. :1424")
    return parts.hostname, port


def _target_from_args(opts: argparse.Namespace) -> Target:
    for option in ("records_dir", "endpoint_socket", "sbatch", "submit_as", "started_file", "stopped"):
        if getattr(opts, option):
            raise UsageError(f"--{option.replace('_', '-')} goes with --slurm-job NAME --replicas N")
    if opts.url or opts.endpoint:
        option, url = ("--url", opts.url) if opts.url else ("--endpoint", opts.endpoint)
        if opts.port is not None:
            raise UsageError(f"--port goes with --host or --slurm-job; put the port in {option} instead")
        host, port = _parse_url(url, option)
        return Target(host, port, None, opts.job_id, endpoint=bool(opts.endpoint))
    port = opts.port if opts.port is not None else DEFAULT_PORT
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port")
    if opts.host:
        return Target(opts.host, port, None, opts.job_id)
    if opts.slurm_job:
        if opts.job_id:
            raise UsageError("--job-id is for --host/--url; --slurm-job already names the job")
        return Target(None, port, opts.slurm_job, None, record=opts.job_record)
    raise UsageError(
        "say what to check: --url URL, --host HOST [--port P], --slurm-job NAME|ID [--replicas N] or "
        "--endpoint URL"
    )


def _emit(out: Outcome, opts: argparse.Namespace) -> None:
    if opts.json:
        print(json.dumps(out.as_dict(), sort_keys=True))
    else:
        print(out.nagios())
    sys.stdout.flush()


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``nemotron-deploy health`` and ``python -m nemotron_deploy.service.health``."""
    parser = build_parser(prog)
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (3): return, don't exit the caller
        return exc.code if isinstance(exc.code, int) else UNKNOWN
    if opts.replicas is not None:
        try:
            from . import fleet
        except ImportError:  # the zipapp inside the container ships the single check only
            print(
                f"{prog}: error: --replicas needs the installed package (nemotron_deploy.service.fleet)",
                file=sys.stderr,
            )
            return UNKNOWN
        return fleet.main(opts, parser, prog)
    try:
        target = _target_from_args(opts)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return UNKNOWN
    opts.state_path = None
    if not opts.wait and not opts.no_state_file:
        opts.state_path = opts.state_file or default_state_file(target.key())
    try:
        out = wait_ready(opts, target) if opts.wait else check_once(opts, target)
    except SlurmError as exc:
        out = Outcome(UNKNOWN, "slurm_error", str(exc), None)
    except Exception as exc:  # a monitoring plugin must say UNKNOWN, never crash with a traceback
        out = Outcome(UNKNOWN, "internal_error", f"{type(exc).__name__}: {exc}", None)
    if opts.prometheus_textfile:
        state = out.extra.get("state") or load_state(opts.state_path)
        try:
            write_textfile(opts.prometheus_textfile, out, state, target.metric_label())
        except OSError as exc:
            out.long_lines.append(f"error: cannot write {opts.prometheus_textfile}: {exc}")
            out.extra["textfile_error"] = str(exc)
            out.status = UNKNOWN
    out.extra.pop("state", None)
    _emit(out, opts)
    return out.status


if __name__ == "__main__":
    sys.exit(main())
