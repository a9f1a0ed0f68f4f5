"""Rolling update: replace the replicas that run an earlier deploy's files, one at a time, with no
request lost. Run by the deploy on the login node with ``--data rollout=true`` (as the user the deploy
submits as), or by hand:

    python -m nemotron_deploy.service.rollout --slurm-job nemotron-340b --replicas 2 --sbatch .../nemotron.sbatch \\
        --records-dir .../logs --port 1424 --endpoint-socket /run/haproxy/admin.sock --budget 2700

For each replica whose running job's record names other files than the sbatch now in place, with
``--surge`` (the deploy passes it when the compute nodes hold more replicas than run):

1. submit its new job (same name, ``<job>-r<i>``) beside the old one;
2. wait until the new job generates (the health check's start-up wait);
3. put it in the endpoint's spare slot ``u1`` and wait until HAProxy has it UP;
4. drain the old job's slot (``state drain``: no new request) and wait for its request in flight;
5. cancel the old job; point the replica's slot at the new job, wait until UP; drain and free ``u1``.

A new job that does not generate within the start-up budget is cancelled and the rollout stops
there, saying so: the old replicas, this one included, keep serving.

Without room for one more replica (every node serves), one replica at a time is taken out instead:
drain its slot and wait for its request in flight, cancel its job, submit the new one, wait until it
generates, point the slot at it. The others serve meanwhile (capacity drops by one replica, no
request fails); if the new job does not generate, the rollout stops with that replica down and says
so, the others still serving the earlier files.

Without an endpoint there is nothing to drain: the old job is cancelled once the new one generates
(surge), or before it is submitted. The scheduled check's lock is held throughout, so the check
neither replaces nor re-points slots meanwhile.

Standard library only (runs from the login node's venv).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from . import endpoint_sync, replacement
from .check import wait_for_job
from .endpoint_sync import SPARE_SLOT
from .nagios import OK
from .slurm import (
    RecordTrust,
    SlurmError,
    as_account,
    files_digest,
    query_job,
    record_path,
    replica_job_name,
)

POLL = 0.5


class RolloutError(Exception):
    """The rollout stopped; the message says where and why, and that the old replicas still serve."""


def say(text: str) -> None:
    print(f"rollout: {text}", flush=True)


def stale_replicas(
    job_name: str, replicas: int, records_dir: str, digest: str, trust: RecordTrust | None = None
) -> list[tuple[int, str]]:
    """[(replica index, its running job id)] of replicas whose running job started with other files.
    Only trusted records count (`trust`; default: this user's): the rollout cancels the job a record
    names, as root."""
    stale = []
    for i in range(1, replicas + 1):
        path = record_path(records_dir, replica_job_name(job_name, i))
        rec, untrusted = (trust or RecordTrust()).read(path)
        if untrusted:
            say(f"ignored: {untrusted}")
        if rec is None:
            continue
        try:
            job = query_job(str(rec["job_id"]))
        except SlurmError:
            continue
        if job.active and rec.get("files") != digest:
            stale.append((i, str(rec["job_id"])))
    return stale


def _slurm(argv: list[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RolloutError(f"`{' '.join(argv)}` failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout.strip()


def _wait(what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RolloutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL)


def _status(socket: str, slot: str) -> str:
    return endpoint_sync.servers_state(socket)[slot].status


def _in_flight(socket: str, slot: str) -> int:
    return int(endpoint_sync.backend_stat(socket)[slot].get("scur") or 0)


def _as_submitter(opts: argparse.Namespace, argv: list[str]) -> list[str]:
    return as_account(opts.submit_as, argv)


def _cancel_old(opts: argparse.Namespace, old_id: str) -> None:
    """The replica's old job, by the id its trusted record names: as the rollout's own user (root
    when the deploy runs it), since a release before service_user submitted it as root; an old job
    of the service account is cancelled all the same."""
    _slurm([f"{opts.slurm_bin}/scancel", old_id])


def _owner(opts: argparse.Namespace) -> list[str]:
    """scancel's filter: only the service account's jobs, whatever a name or id matches."""
    return [f"--user={opts.submit_as}"] if opts.submit_as else []


def _submit(opts: argparse.Namespace, name: str) -> str:
    argv = [f"{opts.slurm_bin}/sbatch", "--parsable", f"--job-name={name}", opts.sbatch]
    return _slurm(_as_submitter(opts, argv)).split(";")[0]


def _generates(opts: argparse.Namespace, job_id: str) -> bool:
    """The health check's start-up wait for the new job; its verdict line goes to stdout."""
    out = wait_for_job(job_id, opts.port, opts.budget)
    print(out.nagios(), flush=True)
    return out.status == OK


def _gone(job_id: str) -> bool:
    try:
        return not query_job(job_id).active
    except SlurmError:
        return False


def roll_in_place(opts: argparse.Namespace, index: int, old_id: str) -> None:
    """No room for one more replica: take this one out, then bring it back on the new files."""
    name = replica_job_name(opts.slurm_job, index)
    slot = f"{endpoint_sync.SLOT_PREFIX}{index}"
    sock = opts.endpoint_socket
    if sock:
        endpoint_sync.command(sock, f"set server {endpoint_sync.BACKEND}/{slot} state drain")
        say(f"{slot}: no room for one more replica: draining job {old_id} (the others serve meanwhile)")
        _wait(f"job {old_id}'s request in flight", lambda: _in_flight(sock, slot) == 0, opts.drain_timeout)
        endpoint_sync.apply(sock, {slot: (None, opts.port)})
    _cancel_old(opts, old_id)
    # A job of that name still waiting (an interrupted rollout's) would take the freed nodes first.
    _slurm(
        _as_submitter(opts, [f"{opts.slurm_bin}/scancel", *_owner(opts), "--state=PENDING", f"--name={name}"])
    )
    _wait(f"job {old_id} to end and free its nodes", lambda: _gone(old_id), 300)
    new_id = _submit(opts, name)
    say(f"{slot}: cancelled job {old_id}; submitted job {new_id}; waiting until it generates")
    if not _generates(opts, new_id):
        raise RolloutError(
            f"{slot}: the new job {new_id} did not generate (see above): {slot} is down (its earlier job "
            "was cancelled to free its nodes); the other replicas keep serving, those not rolled yet on "
            "the earlier files. Fix the cause and deploy again with --data rollout=true"
        )
    node = query_job(new_id).node
    if sock:
        endpoint_sync.apply(sock, {slot: (node, opts.port)})
        _wait(f"{slot} (job {new_id}) to be UP", lambda: _status(sock, slot) == "up", 60)
    say(f"{slot}: job {new_id} on {node} serves")


def roll_one(opts: argparse.Namespace, index: int, old_id: str) -> None:
    """Room for one more replica: the new job first, then swap."""
    name = replica_job_name(opts.slurm_job, index)
    slot = f"{endpoint_sync.SLOT_PREFIX}{index}"
    new_id = _submit(opts, name)
    say(f"{slot}: submitted job {new_id} beside job {old_id}; waiting until it generates")
    if not _generates(opts, new_id):
        subprocess.run(
            _as_submitter(opts, [f"{opts.slurm_bin}/scancel", *_owner(opts), new_id]),
            capture_output=True,
            timeout=60,
        )
        raise RolloutError(
            f"{slot}: the new job {new_id} did not generate (see above); it was cancelled, and job {old_id} "
            "keeps serving with the earlier files, as do the replicas not rolled yet. Fix the cause and "
            "deploy again with --data rollout=true"
        )
    node = query_job(new_id).node
    if not opts.endpoint_socket:
        _cancel_old(opts, old_id)
        say(f"{slot}: job {new_id} on {node} generates; cancelled job {old_id}")
        return
    sock = opts.endpoint_socket
    endpoint_sync.apply(sock, {SPARE_SLOT: (node, opts.port)})
    _wait(
        f"the spare slot {SPARE_SLOT} (job {new_id}) to be UP", lambda: _status(sock, SPARE_SLOT) == "up", 60
    )
    endpoint_sync.command(sock, f"set server {endpoint_sync.BACKEND}/{slot} state drain")
    say(f"{slot}: job {new_id} serves in {SPARE_SLOT}; draining job {old_id}")
    _wait(f"job {old_id}'s request in flight", lambda: _in_flight(sock, slot) == 0, opts.drain_timeout)
    _cancel_old(opts, old_id)
    endpoint_sync.apply(sock, {slot: (node, opts.port)})
    _wait(f"{slot} (job {new_id}) to be UP", lambda: _status(sock, slot) == "up", 60)
    endpoint_sync.command(sock, f"set server {endpoint_sync.BACKEND}/{SPARE_SLOT} state drain")
    _wait("the spare slot's request in flight", lambda: _in_flight(sock, SPARE_SLOT) == 0, opts.drain_timeout)
    endpoint_sync.apply(sock, {SPARE_SLOT: (None, opts.port)})
    say(f"{slot}: job {new_id} on {node} serves; job {old_id} cancelled")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nemotron_deploy.service.rollout", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--slurm-job", required=True, metavar="NAME", help="the deployment's job name")
    p.add_argument("--replicas", type=int, required=True)
    p.add_argument(
        "--sbatch", required=True, help="the batch file now in place (its FILES_DIGEST is current)"
    )
    p.add_argument("--records-dir", required=True, help="where the batch scripts write their job records")
    p.add_argument("--port", type=int, default=1424)
    p.add_argument("--endpoint-socket", help="HAProxy's stats socket (none: no endpoint)")
    p.add_argument("--slurm-bin", default="/usr/bin")
    p.add_argument("--budget", type=float, default=2700.0, help="start-up budget of a new job (s)")
    p.add_argument("--drain-timeout", type=float, default=330.0, help="longest wait for a request in flight")
    p.add_argument("--lock", help="the scheduled check's lock file (held throughout)")
    p.add_argument(
        "--nodes-file",
        help="root's list of the cluster's compute nodes: a record naming another node is ignored",
    )
    p.add_argument(
        "--submit-as",
        metavar="USER",
        help="the service account the replicas run as: submit and cancel as it (runuser as root, else "
        "sudo -n), trust only its job records (default: this user)",
    )
    p.add_argument("--dry-run", action="store_true", help="only list the stale replicas")
    p.add_argument(
        "--surge", action="store_true", help="there is room for one more replica: start each new job first"
    )
    opts = p.parse_args(argv)
    digest = files_digest(opts.sbatch)
    if digest is None:
        print(f"rollout: error: {opts.sbatch} names no FILES_DIGEST: deploy first", file=sys.stderr)
        return 2
    lock = replacement.CheckLock(opts.lock, timeout=600)
    with lock as locked:
        if opts.lock and not locked:
            why = lock.error or f"the scheduled check holds {opts.lock}; try again"
            print(f"rollout: error: {why}", file=sys.stderr)
            return 2
        trust = RecordTrust(opts.submit_as, opts.nodes_file)  # the service account's records only
        stale = stale_replicas(opts.slurm_job, opts.replicas, opts.records_dir, digest, trust)
        if not stale:
            say("every running replica runs the current files: nothing to roll out")
            return 0
        say(f"{len(stale)} replica(s) run earlier files: " + ", ".join(f"r{i} (job {j})" for i, j in stale))
        if opts.dry_run:
            return 0
        for index, old_id in stale:
            try:
                (roll_one if opts.surge else roll_in_place)(opts, index, old_id)
            except (RolloutError, endpoint_sync.SyncError, SlurmError) as exc:
                print(f"rollout: error: {exc}", file=sys.stderr)
                return 1
    say("done: every replica runs the current files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
