"""The single check and the start-up wait, as plain functions of the parsed options and a Target.

* :func:`check_once`: one probe with Nagios semantics: busy is WARNING, and CRITICAL from the
  ``--busy-critical-after``-th busy check in a row (the state file, state.py), which also keeps the
  last success.
* :func:`wait_ready` (``--wait``, for start-up): polls until the server generates, within a start-up
  budget (45 min by default: loading 682 GB takes many minutes). Polling is fast while the port is
  refused so that readiness is noticed well under a second after it happens; with a Slurm job it
  fails at once when the job leaves PENDING/RUNNING/CONFIGURING/COMPLETING and prints the tail of
  the job's StdErr. :func:`wait_for_job` is that wait for one job, for callers (the rollout).

Runs on the cluster (login nodes, and inside the job's container): standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from .nagios import CRITICAL, OK, UNKNOWN, WARNING
from .outcome import Outcome, fmt_duration
from .probe import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PROMPT,
    DEFAULT_TIMEOUT,
    Access,
    ProbeResult,
    classify_endpoint,
    host_for_url,
    probe,
    probe_payload,
)
from .slurm import PENDING_STATES, JobInfo, RecordTrust, SlurmError, find_job_id, query_job
from .state import load_state, save_state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_STARTUP_TIMEOUT = 45 * 60.0
DEFAULT_BUSY_CRITICAL_AFTER = 3
DEFAULT_JOB_CHECK_INTERVAL = 2.0
POLL_START = 0.1
PROGRESS_LINE_SECONDS = 15  # --progress-lines: at least one line this often while waiting
POLL_CAP = 5.0
# A refused connect costs one round trip; polling it often is what keeps readiness latency < 1 s.
POLL_CAP_REFUSED = 0.25
PENDING_POLL_CAP = 15.0
TAIL_LINES = 20


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
        trust: RecordTrust | None = None,
        job_user: str | None = None,
        access: Access | None = None,
    ) -> None:
        self.host = host
        self.trust = trust  # whose records to believe (default: this user's), and on which nodes
        self.job_user = job_user  # --job-user: a job name is looked up among this account's jobs only
        self.access = access  # --endpoint: TLS and the API key (replicas: plain HTTP, no key)
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
        return f"{host_for_url(host or self.host or '?')}:{self.port}"

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
            found = find_job_id(spec, self.job_user)
            if found is None:
                return self._recorded_job(spec) or JobInfo("?", name=spec, state="GONE", source="gone")
            self._resolved_id = found
        return query_job(self._resolved_id or spec)

    def _recorded_job(self, name: str) -> JobInfo | None:
        """The job as its batch script recorded it: squeue shows nothing where Slurm runs with
        PrivateData=jobs and this user (the scheduled check's) does not own the job."""
        if not self.record:
            return None
        rec, untrusted = (self.trust or RecordTrust()).read(self.record)
        if untrusted:
            return JobInfo("?", name=name, state="GONE", source="untrusted", reason=untrusted)
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
            reason = "untrusted_record" if job.source == "untrusted" else "job_gone"
            out = Outcome(CRITICAL, reason, job.describe(), None)
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
        access=target.access,
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
                    access=target.access,
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


def run_check(opts: argparse.Namespace, target: Target) -> Outcome:
    """:func:`wait_ready` with ``opts.wait``, else :func:`check_once`; a failure is UNKNOWN, never a
    traceback (a monitoring plugin must say UNKNOWN)."""
    try:
        return wait_ready(opts, target) if opts.wait else check_once(opts, target)
    except SlurmError as exc:
        return Outcome(UNKNOWN, "slurm_error", str(exc), None)
    except Exception as exc:
        return Outcome(UNKNOWN, "internal_error", f"{type(exc).__name__}: {exc}", None)


def wait_for_job(job_id: str, port: int, budget: float) -> Outcome:
    """``health --wait --progress-lines --slurm-job JOB_ID --port PORT --budget BUDGET``, the other
    options at their defaults: until the job's first node generates (progress lines on stderr)."""
    opts = argparse.Namespace(
        wait=True,
        connect_timeout=DEFAULT_CONNECT_TIMEOUT,
        timeout=DEFAULT_TIMEOUT,
        prompt=DEFAULT_PROMPT,
        startup_timeout=budget,
        server_pid=None,
        job_check_interval=DEFAULT_JOB_CHECK_INTERVAL,
        no_progress=False,
        progress_lines=True,
    )
    return run_check(opts, Target(None, port, job_id, None))
