"""Scale-down: the replicas above the ``replicas`` setting, taken out of the endpoint and cancelled.

Run by the deploy on the login node when its read finds, among the submitting account's jobs, one
named ``<job>-r<k>`` with k above the new replica count (as that account), or by hand:

    python -m nemotron_deploy.service.scale_down --slurm-job nemotron-340b --replicas 1 --user nemotron \\
        --endpoint-socket /run/haproxy/admin.sock --lock /var/lib/nemotron-deploy/check.lock

For each such replica, highest first:

1. its endpoint slot ``r<k>``, where the backend has one: ``state drain`` (no new request), wait for
   its request in flight (bounded by ``--drain-timeout``), then ``state maint``;
2. ``scancel --user <user> --name <job>-r<k>``: that account's jobs of that name only, pending ones
   too (never another user's job of the same name);
3. wait (bounded) until Slurm shows none of them still holding nodes.

The scheduled check, now run with ``--replicas N``, neither counts nor replaces them, and keeps every
replica slot above N in maintenance. Its lock is held throughout, so it changes no slot meanwhile.

Standard library only (runs from the login node's venv).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from . import endpoint_sync, replacement
from .slurm import ACTIVE_STATES, ENDING_STATES

POLL = 0.5
GONE_TIMEOUT = 120.0


class ScaleDownError(Exception):
    """Slurm or the endpoint failed; the message says which and what is left."""


def say(text: str) -> None:
    print(f"scale-down: {text}", flush=True)


def squeue_argv(slurm_bin: str, user: str | None) -> list[str]:
    """This account's jobs (user None: whoever runs it, for the deploy's read), state then name last:
    a job name may hold spaces."""
    who = [f"--user={user}"] if user else []
    return [f"{slurm_bin}/squeue", "-h", "-t", "all", *who, "-o", "%i %T %j"]


def extra_replicas(squeue_output: str, job_name: str, replicas: int) -> dict[int, list[tuple[str, str]]]:
    """{replica index: [(job id, state)]} of the jobs of `squeue_argv`'s output named <job>-r<k>,
    k > `replicas`, that have not ended (COMPLETING ones included: they still hold nodes)."""
    found: dict[int, list[tuple[str, str]]] = {}
    for line in squeue_output.splitlines():
        fields = line.split(" ", 2)
        if len(fields) != 3 or fields[1] not in ACTIVE_STATES:
            continue
        slot = endpoint_sync.slot_for_job(job_name, fields[2].strip())
        if slot is None or int(slot[len(endpoint_sync.SLOT_PREFIX) :]) <= replicas:
            continue
        found.setdefault(int(slot[len(endpoint_sync.SLOT_PREFIX) :]), []).append((fields[0], fields[1]))
    return dict(sorted(found.items()))


def to_cancel(extra: dict[int, list[tuple[str, str]]]) -> dict[int, list[tuple[str, str]]]:
    """The replicas with a job still to cancel (not only ending ones): the deploy's "anything to do"."""
    return {i: rows for i, rows in extra.items() if any(state not in ENDING_STATES for _, state in rows)}


def _run(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ScaleDownError(f"`{' '.join(argv)}` could not run: {exc}") from exc
    if res.returncode != 0:
        raise ScaleDownError(f"`{' '.join(argv)}` failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def _take_out(sock: str, slot: str, drain_timeout: float) -> None:
    """Drain the slot, wait for its request in flight, then maintenance. A slot the backend lacks (the
    inventory's nodes hold fewer replicas than ran) has nothing to take out."""
    servers = endpoint_sync.servers_state(sock)
    if slot not in servers:
        say(f"{slot}: no such slot in the endpoint (nothing routed to it)")
        return
    target = f"{endpoint_sync.BACKEND}/{slot}"
    if not servers[slot].in_maintenance and not servers[slot].draining:
        endpoint_sync.command(sock, f"set server {target} state drain")
    deadline = time.monotonic() + drain_timeout
    while int(endpoint_sync.backend_stat(sock)[slot].get("scur") or 0) > 0:
        if time.monotonic() > deadline:
            say(f"{slot}: a request still in flight after {drain_timeout:.0f}s: it may fail")
            break
        time.sleep(POLL)
    endpoint_sync.apply(sock, {slot: (None, 0)})
    say(f"{slot}: in maintenance (no request reaches it)")


def _gone(slurm_bin: str, user: str, job_name: str, replicas: int, index: int) -> bool:
    return index not in extra_replicas(_run(squeue_argv(slurm_bin, user)), job_name, replicas)


def scale_down(opts: argparse.Namespace) -> list[int]:
    """Take out and cancel every replica above opts.replicas; the indexes done."""
    extra = to_cancel(
        extra_replicas(_run(squeue_argv(opts.slurm_bin, opts.user)), opts.slurm_job, opts.replicas)
    )
    if not extra:
        say(f"no job of {opts.user}'s above {endpoint_sync.replica_job_name(opts.slurm_job, opts.replicas)}")
        return []
    for index in sorted(extra, reverse=True):
        name = endpoint_sync.replica_job_name(opts.slurm_job, index)
        slot = f"{endpoint_sync.SLOT_PREFIX}{index}"
        ids = ", ".join(f"{job_id} {state}" for job_id, state in extra[index])
        say(f"{name} (job {ids}) is above replicas={opts.replicas}: taking it out")
        if opts.endpoint_socket:
            try:
                _take_out(opts.endpoint_socket, slot, opts.drain_timeout)
            except endpoint_sync.SyncError as exc:
                say(f"{slot}: the endpoint could not be asked ({exc}); cancelling anyway")
        _run([f"{opts.slurm_bin}/scancel", f"--user={opts.user}", f"--name={name}"])
        deadline = time.monotonic() + opts.gone_timeout
        while not _gone(opts.slurm_bin, opts.user, opts.slurm_job, opts.replicas, index):
            if time.monotonic() > deadline:
                raise ScaleDownError(
                    f"{name} still holds its nodes {opts.gone_timeout:.0f}s after scancel; see "
                    f"`squeue --user={opts.user} --name={name}` (a node may be stuck ending the job)"
                )
            time.sleep(POLL)
        say(f"{name}: cancelled")
    return sorted(extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nemotron_deploy.service.scale_down", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--slurm-job", required=True, metavar="NAME", help="the deployment's job name")
    p.add_argument("--replicas", type=int, required=True, help="the replicas to keep: r1..rN")
    p.add_argument("--user", required=True, help="the account that submits the replicas (only its jobs)")
    p.add_argument("--endpoint-socket", help="HAProxy's stats socket (none: no endpoint)")
    p.add_argument("--slurm-bin", default="/usr/bin")
    p.add_argument("--drain-timeout", type=float, default=330.0, help="longest wait for a request in flight")
    p.add_argument("--gone-timeout", type=float, default=GONE_TIMEOUT, help="longest wait for a job to end")
    p.add_argument("--lock", help="the scheduled check's lock file (held throughout)")
    opts = p.parse_args(argv)
    if opts.replicas < 1:
        p.error("--replicas must be 1 or more (state=stopped stops every replica)")
    lock = replacement.CheckLock(opts.lock, timeout=600)
    with lock as locked:
        if opts.lock and not locked:
            print(
                f"scale-down: error: {lock.error or f'the scheduled check holds {opts.lock}; try again'}",
                file=sys.stderr,
            )
            return 2
        try:
            scale_down(opts)
        except ScaleDownError as exc:
            print(f"scale-down: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
