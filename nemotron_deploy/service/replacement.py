"""Replacing dead replicas, from the scheduled check (``health --replicas N --restart-policy always``).

A replica is replaced when its job is gone (ended, cancelled, failed, timed out: Slurm no longer runs
a job of its name) or when its server has failed the check for ``unhealthy_after`` seconds in a row
(never while the job is within its start-up budget; a *busy* probe counts only when the endpoint also
has the replica DOWN, since a loaded replica is busy too). Replacing = ``scancel --user=<submit_as> --name=<job>-r<i>``
(what is left of it) then ``sbatch --job-name=<job>-r<i> <sbatch>``.

Limits, per replica: the first replacement is at once; each next one after a back-off that doubles
from ``first_backoff`` (the check's interval) up to ``backoff_max``; at most ``max_per_day`` in 24
hours, after which the check stops replacing it and reports CRITICAL ``restart_capped`` until it
generates again. A job the check submitted counts as starting (not gone) for its start-up budget,
also where ``PrivateData=jobs`` hides it from this user until its batch script writes its record.

The decision (:func:`decide`) is a plain function of the replica's result, its state and the clock,
so tests drive it with a fake clock; :func:`replace` runs the two Slurm commands, through ``sudo -n
-u <submit_as>`` when this user is not the one the deploy submits as (the deploy installs a sudoers
rule that allows exactly those commands). Every action is logged to syslog (journald) with the job
ids and the cause, and kept in the state file's ``events``.

Standard library only (the check runs every minute from the login node's venv).
"""

from __future__ import annotations

import fcntl
import getpass
import os
import time
from collections import namedtuple

from .options import positive
from .slurm import as_account
from .state import load_state

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

DAY = 86400.0
MAX_EVENTS = 50  # kept per replica in the state file
SYSLOG_IDENT = "nemotron-health"

# Options that go only with --replicas (health.py refuses them for the single check).
REPLICAS_ONLY = ("sbatch", "submit_as", "started_file", "stopped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of replacing dead replicas (and ``--stopped``), for health.build_parser."""
    rs = parser.add_argument_group("replacing dead replicas (--replicas ... --restart-policy always)")
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
        type=positive(float),
        default=600.0,
        metavar="S",
        help="replace a running replica whose server failed the check this long (default 600)",
    )
    rs.add_argument(
        "--restart-backoff-max",
        type=positive(float),
        default=1800.0,
        metavar="S",
        help="the longest back-off between two replacements of one replica (default 1800)",
    )
    rs.add_argument(
        "--max-restarts-per-day",
        type=positive(int),
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


# Immutable records as namedtuples, not dataclasses: every single check imports this module for its
# options (add_arguments), and dataclasses costs ~5 ms of import time (it imports inspect).
class Policy(
    namedtuple(
        "Policy",
        "unhealthy_after backoff_max max_per_day startup_budget first_backoff",
        defaults=(600.0, 1800.0, 10, 2700.0, 60.0),
    )
):
    """How the check replaces: seconds unhealthy before a replacement, the back-off's cap, at most
    max_per_day replacements in 24 h, a job's start-up budget, the first back-off."""

    __slots__ = ()


class Decision(namedtuple("Decision", "action cause message", defaults=("", ""))):
    """action: "none" | "starting" | "wait" | "backoff" | "capped" | "replace"; cause: "gone" |
    "unhealthy" (for replace, backoff, capped); message: what to tell."""

    __slots__ = ()


def backoff_seconds(consecutive: int, policy: Policy) -> float:
    """How long after the last replacement the next may be: 0 for the first, then doubling."""
    if consecutive <= 0:
        return 0.0
    return min(policy.backoff_max, policy.first_backoff * 2 ** (consecutive - 1))


def decide(
    *,
    reason: str,
    job_id: str | None,
    job_active: bool,
    started: float | None,
    down_in_endpoint: bool | None,
    state: dict[str, Any],
    now: float,
    policy: Policy,
) -> Decision:
    """What to do about one replica; updates `state` (what it has seen) but never acts.

    `reason`: the check's reason code for it ("ok", "busy", "refused", "job_gone", ...);
    `job_id`/`job_active`: the job Slurm (or its record) shows, if any; `started`: when that job's
    batch script started (its record), else None; `down_in_endpoint`: HAProxy's view of its slot
    (None without an endpoint).
    """
    submitted = state.get("submitted")
    if job_active and submitted and job_id == submitted.get("job_id"):
        state.pop("submitted", None)  # the job we submitted is running: no longer "starting"
        submitted = None
    if job_active and job_id != state.get("job_id"):
        state["job_id"] = job_id
        state["job_seen"] = started if started is not None else now
        state.pop("failing_since", None)
    if reason == "ok":
        state.pop("failing_since", None)
        state["consecutive_restarts"] = 0
        state.pop("capped", None)
        return Decision("none")
    if not job_active:
        if submitted and now - float(submitted.get("at", 0)) < policy.startup_budget:
            return Decision("starting", message=f"job {submitted.get('job_id')} submitted, not started yet")
        cause = "gone"
    else:
        counts = reason != "busy" or bool(down_in_endpoint)
        if not counts:
            state.pop("failing_since", None)
            return Decision("none")
        seen = state.get("job_seen")
        if now - float(now if seen is None else seen) < policy.startup_budget:
            return Decision("starting", message="within its start-up budget")
        since = state.setdefault("failing_since", now)
        if now - since < policy.unhealthy_after:
            left = policy.unhealthy_after - (now - since)
            return Decision("wait", "unhealthy", f"failing for {now - since:.0f}s; replaced in {left:.0f}s")
        cause = "unhealthy"
    recent = [t for t in state.get("restarts", []) if now - t < DAY]
    state["restarts"] = recent
    if len(recent) >= policy.max_per_day:
        state["capped"] = True
        return Decision(
            "capped",
            cause,
            f"{len(recent)} replacements in 24h reached max_restarts_per_day={policy.max_per_day}: not "
            "replacing it again; find the cause (the job's StdErr), then resubmit it with the deploy "
            "(--data submit=true)",
        )
    wait = backoff_seconds(int(state.get("consecutive_restarts") or 0), policy)
    last = state.get("last_restart")
    since_last = float("inf") if last is None else now - float(last)
    if since_last < wait:
        return Decision("backoff", cause, f"next replacement in {wait - since_last:.0f}s (back-off)")
    return Decision("replace", cause)


def replace_dead(opts: argparse.Namespace, results: list[Any], states: dict[str, Any], view: Any) -> None:
    """The fleet check's replacements: decide for each replica (fleet.ReplicaResult, updated with its
    decision and new job), and replace the ones whose job is gone or whose server stays unhealthy.
    `states`: every replica's state by slot; `view`: the fleet.EndpointView, or None."""
    policy = Policy(
        unhealthy_after=opts.unhealthy_restart_after,
        backoff_max=opts.restart_backoff_max,
        max_per_day=opts.max_restarts_per_day,
        startup_budget=opts.startup_timeout,
        first_backoff=min(60.0, opts.restart_backoff_max),
    )
    now = time.time()
    started = None
    if opts.started_file:
        started = load_state(opts.started_file)  # {} when absent: the service was never started
        if not started:
            for r in results:
                r.decision = Decision(
                    "none", "", "not started by a deploy yet (--data submit=true): nothing replaced"
                )
            return
    for r in results:
        st = states[r.slot]
        submitted = (started or {}).get("jobs", {}).get(r.job_name)
        if submitted and st.get("deploy_at") != started.get("at") and st.get("job_id") != str(submitted):
            # The deploy submitted this job, and no check saw it run yet: it is starting (Slurm may
            # hide it from this user until its batch script writes its record). The deploy's own
            # check right after submitting sees it run, so a job that dies later is replaced at once.
            st["deploy_at"] = started.get("at")
            st["submitted"] = {"job_id": str(submitted), "at": float(started.get("at") or now)}
        down = None if view is None or view.error else view.servers.get(r.slot) == "down"
        began = r.record.get("started") if r.record else None
        r.decision = decide(
            reason=r.reason,
            job_id=r.job_id or None,
            job_active=bool(r.job is not None and r.job.active),
            started=float(began) if isinstance(began, (int, float)) else None,
            down_in_endpoint=down,
            state=st,
            now=now,
            policy=policy,
        )
        if r.decision.action != "replace":
            continue
        if not opts.sbatch:
            r.decision = Decision("none", r.decision.cause, "no --sbatch: not replaced")
            continue
        new_id, error = replace(
            job_name=r.job_name, sbatch=opts.sbatch, slurm_bin=opts.slurm_bin, submit_as=opts.submit_as
        )
        st["restarts"] = [*st.get("restarts", []), now]
        st["last_restart"] = now
        st["consecutive_restarts"] = int(st.get("consecutive_restarts") or 0) + 1
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "replica": r.slot,
            "job_name": r.job_name,
            "cause": r.decision.cause,
            "old_job_id": r.job_id or "-",
            "reason": r.reason,
        }
        if new_id:
            st["restarts_total"] = r.restarts_total = int(st.get("restarts_total") or 0) + 1
            st["submitted"] = {"job_id": new_id, "at": now}
            r.replaced_by = new_id
            event["new_job_id"] = new_id
        else:
            event["error"] = error
            r.decision = Decision("failed", r.decision.cause, f"replacement failed: {error}")
        record_event(st, event)


def replace(
    *, job_name: str, sbatch: str, slurm_bin: str, submit_as: str | None, timeout: float = 60.0
) -> tuple[str | None, str]:
    """scancel what is left of the replica's jobs, then submit it again: (new job id or None, output)."""
    import subprocess  # not at import time: every single check imports this module for its options

    # Only the submitting account's jobs: another user may have named a job the same.
    owner = submit_as or getpass.getuser()
    cancel = as_account(submit_as, [f"{slurm_bin}/scancel", f"--user={owner}", f"--name={job_name}"])
    submit = as_account(submit_as, [f"{slurm_bin}/sbatch", "--parsable", f"--job-name={job_name}", sbatch])
    try:
        res = subprocess.run(cancel, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            return None, f"`{' '.join(cancel)}` failed: {(res.stderr or res.stdout).strip()}"
        res = subprocess.run(submit, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{exc}"
    if res.returncode != 0:
        return None, f"`{' '.join(submit)}` failed: {(res.stderr or res.stdout).strip()}"
    return res.stdout.strip().split(";")[0], ""


def record_event(state: dict[str, Any], event: dict[str, Any]) -> None:
    """Keep the event in the replica's state and send it to syslog (journald where systemd runs)."""
    state["events"] = [*state.get("events", []), event][-MAX_EVENTS:]
    try:
        import syslog

        syslog.openlog(SYSLOG_IDENT, 0, syslog.LOG_DAEMON)
        level = syslog.LOG_WARNING if event.get("new_job_id") else syslog.LOG_ERR
        syslog.syslog(level, " ".join(f"{k}={v}" for k, v in event.items()))
    except OSError:
        pass


class CheckLock:
    """One check at a time acts on a deployment: an exclusive flock beside the state file. A check
    that can't get it within `timeout` seconds acts on nothing (it still reports)."""

    def __init__(self, path: str | None, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self.fd: int | None = None
        self.error: str | None = None  # why the lock was refused (not a regular file, a link...)

    def __enter__(self) -> bool:
        if not self.path:  # no state file, nothing to guard
            return True
        import errno
        import stat

        os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        # Never through a link, never anything but a regular file: root (the rollout) opens it too.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened: {exc.strerror}"
            self.error = f"lock {self.path} {why}: acting on nothing (remove it; the deploy makes it again)"
            return False
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            self.fd = None
            self.error = f"lock {self.path} is not a regular file: acting on nothing (remove it)"
            return False
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None
