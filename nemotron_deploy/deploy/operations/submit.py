"""Submitting the job (only with `--data submit=true`) and waiting for it to generate."""

from __future__ import annotations

import json
import shlex
import time

import gevent
from pyinfra import logger
from pyinfra.api import FunctionCommand, StringCommand, operation

from ...service.slurm import ACTIVE_STATES, ENDING_STATES, active_rows, parse_scontrol_record
from .accounts import run_as


class SubmitError(Exception):
    """Why the job was not submitted or did not come up; printed as the host's error, no traceback."""


# How long a job of the same name may take to finish COMPLETING before a new one is submitted.
ENDING_WAIT_SECONDS = 300


def wait_command(
    *,
    venv: str,
    job_name: str,
    port: int,
    budget: int,
    job_user: str,
    nodes_file: str | None = None,
    replica_key_file: str | None = None,
) -> str:
    """The health check that waits until the submitted job generates (progress as plain lines): the
    job of that name among `job_user`'s, its record trusted only as that account's."""
    argv = [f"{venv}/bin/python", "-m", "nemotron_deploy.service.health", "--wait", "--progress-lines"]
    argv += ["--slurm-job", job_name, "--port", str(port), "--budget", str(budget), "--job-user", job_user]
    if nodes_file:
        argv += ["--nodes-file", nodes_file]
    if replica_key_file:
        argv += ["--replica-key-file", replica_key_file]
    return " ".join(shlex.quote(a) for a in argv)


def wait_all_command(commands: dict[str, str]) -> str:
    """Run the waits {job name: command} at once, each line prefixed with its job's name; fails if any
    fails (every wait still runs to its end, so each replica's outcome is printed)."""
    if len(commands) == 1:
        return next(iter(commands.values()))
    lines = ["set -o pipefail", "pids=''"]
    for name, command in commands.items():
        prefix = shlex.quote(f"s/^/[{name}] /")
        lines.append(f'{{ {command} 2>&1 | sed -u {prefix}; }} & pids="$pids $!"')
    lines.append('rc=0; for p in $pids; do wait "$p" || rc=1; done; exit "$rc"')
    return "bash -c " + shlex.quote("\n".join(lines))


def submit_decision(rows: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """What to do given the jobs of that name that have not ended: ("reuse", [id]) for one that is
    queued or running (the newest), ("wait", ids) while only ending ones remain, else ("submit", [])."""
    live = [job_id for job_id, state in rows if state not in ENDING_STATES]
    if live:
        return "reuse", [live[-1]]
    if rows:
        return "wait", [job_id for job_id, _ in rows]
    return "submit", []


def _queued(host, job_name: str, user: str) -> list[tuple[str, str]]:
    # The service account's jobs only: another user may have submitted a job of the same name.
    ok, out = host.run_shell_command(
        f"squeue -h -t all -u {shlex.quote(user)} -n {shlex.quote(job_name)} -o '%i %T'"
    )
    if not ok:
        raise SubmitError(f"squeue failed: {out.stderr or out.stdout}")
    return active_rows(out.stdout)


@operation(is_idempotent=False)
def submit_and_wait(
    sbatch_path: str,
    job_names: list[str],
    health_commands: dict[str, str],
    until_done: bool = False,
    budget_seconds: int = 2700,
    started_file: str | None = None,
    submit_as: str = "nemotron",
    deploy_user: str = "root",
):
    """
    Submit `sbatch_path` as `submit_as` (service_user: runuser from root, else sudo -n) once per job name (``sbatch --job-name=<name>``: one job per replica) unless
    a job of that name is already pending or running, then wait (printing each replica's progress,
    prefixed with its job name) until every replica's health check sees its server generate.

    + job_names: the replicas' Slurm job names, e.g. nemotron-340b-r1, nemotron-340b-r2
    + health_commands: {job name: the command that waits until that replica generates}
    + until_done: for a job that ends by itself (smoke mode: one call, then every rank stops; one job
      name): wait until it has ended instead, succeed if it COMPLETED with exit code 0 and print its
      output from the job's own health-check line on. (A health check from outside can miss the few
      milliseconds such a job serves, then sees the job gone and fails a good run.)
    + budget_seconds: with until_done, how long the job may take to end
    + submit_as: the account the jobs are submitted (and looked up) as, the service account
    + deploy_user: who this deploy's commands run as on the host
    + started_file: where to record {"at": time, "jobs": {name: id}} once submitted: the scheduled
      check replaces dead replicas only once the service was started, and counts these as starting

    **Example:**

    .. code:: python

        submit_and_wait(name="Submit", sbatch_path="/shared/jobs/nemotron.sbatch",
                        job_names=["nemotron-340b-r1"],
                        health_commands={"nemotron-340b-r1": "/opt/venv/bin/python -m ..."})
    """

    def run(state, host):
        try:
            return _submit(state, host)
        except SubmitError as exc:
            host.log_styled(str(exc), fg="red", log_func=logger.error)
            return False  # fails this operation, cleanly

    def _submit(state, host):
        failed = sorted(h.name for h in state.failed_hosts)
        if failed:
            raise SubmitError(
                f"not submitting {', '.join(job_names)}: the deploy failed on {', '.join(failed)}, so the "
                "jobs would start without what they were to get; fix them and re-run"
            )
        job_ids = [_submit_one(host, job_name) for job_name in job_names]
        if started_file:
            ok, out = host.run_shell_command(
                write_started(started_file, dict(zip(job_names, job_ids, strict=True)))
            )
            if not ok:
                raise SubmitError(f"cannot write {started_file}: {out.stderr}")
        if until_done:
            _wait_until_done(host, job_ids[0], budget_seconds)
            return
        print(
            f"{host.print_prefix}waiting until {', '.join(job_names)} generate: {next(iter(health_commands.values()))}"
        )
        ok, out = host.run_shell_command(wait_all_command(health_commands), print_output=True)
        if not ok:
            raise SubmitError(
                f"not every replica became healthy ({', '.join(job_names)}): see each one's last lines above"
            )

    def _submit_one(host, job_name: str) -> str:
        action, ids = submit_decision(_queued(host, job_name, submit_as))
        deadline = time.monotonic() + ENDING_WAIT_SECONDS
        while action == "wait":
            if time.monotonic() > deadline:
                raise SubmitError(
                    f"job(s) {', '.join(ids)} of {job_name} still COMPLETING after {ENDING_WAIT_SECONDS}s"
                )
            print(f"{host.print_prefix}job(s) {', '.join(ids)} of {job_name} still ending; waiting")
            gevent.sleep(2)
            action, ids = submit_decision(_queued(host, job_name, submit_as))
        if action == "reuse" and until_done:
            # A smoke run needs a job of its own: waiting for a serving job to end would never finish.
            raise SubmitError(
                f"job {job_name} is already queued or running ({ids[0]}): cancel it with "
                f"`scancel --user={submit_as} --name={job_name}` before a smoke run, or deploy with mode=serve"
            )
        if action == "reuse":
            print(f"{host.print_prefix}job {job_name} already queued or running: {ids[0]}")
            return ids[0]
        command = run_as(
            submit_as,
            f"sbatch --parsable --job-name={shlex.quote(job_name)} {shlex.quote(sbatch_path)}",
            deploy_user,
        )
        ok, out = host.run_shell_command(command)
        if not ok:
            raise SubmitError(f"sbatch {sbatch_path} ({job_name}) failed: {out.stderr}")
        job_id = out.stdout.strip().split(";")[0]
        print(f"{host.print_prefix}submitted {sbatch_path} as job {job_id} ({job_name})")
        return job_id

    yield FunctionCommand(run, (), {})


def _wait_until_done(host, job_id: str, budget_seconds: int) -> None:
    deadline = time.monotonic() + budget_seconds
    while True:
        ok, out = host.run_shell_command(f"scontrol show job -o {shlex.quote(job_id)}")
        if not ok:
            raise SubmitError(f"scontrol show job {job_id} failed: {out.stderr or out.stdout}")
        job = parse_scontrol_record(out.stdout.strip())
        if job.get("JobState") not in ACTIVE_STATES:
            break
        if time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} is still {job.get('JobState')} after {budget_seconds}s")
        gevent.sleep(1)
    stdout = job.get("StdOut", "")
    # The job's output from its own health check's line on: that line, the prompt and the answer.
    host.run_shell_command(
        f"sed -n '/^NEMOTRON /,$p' {shlex.quote(stdout)}", print_output=True, print_input=False
    )
    if job.get("JobState") != "COMPLETED" or job.get("ExitCode") != "0:0":
        raise SubmitError(
            f"job {job_id} ended {job.get('JobState')} with exit code {job.get('ExitCode')}; "
            f"see {job.get('StdErr', 'its StdErr')}"
        )
    print(f"{host.print_prefix}job {job_id} COMPLETED: the smoke test passed")


def write_started(started_file: str, jobs: dict[str, str]) -> StringCommand:
    """The started file, {"at": time, "jobs": {name: id}}, written atomically (0644) in root's own dir."""
    record = json.dumps({"at": time.time(), "jobs": jobs})
    q = shlex.quote(started_file)
    return StringCommand(
        f"printf '%s\\n' {shlex.quote(record)} > {q}.tmp && chmod 644 {q}.tmp && mv -f {q}.tmp {q}"
    )


@operation()
def mark_started(started_file: str):
    """
    Record that the service was started, without submitting: the upgrade of a running service from a
    release that kept the started file in the health user's directory (the check replaces dead
    replicas only once it finds this file). No job ids: its jobs run already, Slurm shows them.

    **Example:**

    .. code:: python

        mark_started(name="Service started (upgrade)", started_file="/var/lib/nemotron-deploy/started.json")
    """
    yield write_started(started_file, {})


@operation()
def stop_replicas(live_jobs: list[str], started_file: str, started_file_present: bool):
    """
    Stop the service: cancel the replicas' jobs that still run or wait (from the host's read) and
    remove the started file, so the scheduled check replaces none. No change when none runs and the
    file is gone.

    **Example:**

    .. code:: python

        stop_replicas(name="Stop", live_jobs=["4242"],
                      started_file="/var/lib/nemotron-health/started.json", started_file_present=True)
    """
    if live_jobs:
        yield StringCommand(f"scancel {' '.join(shlex.quote(j) for j in live_jobs)}")
    if started_file_present:
        yield StringCommand(f"rm -f {shlex.quote(started_file)}")


@operation(is_idempotent=False)
def roll_out(command: str):
    """
    Run the rolling update (nemotron_deploy.service.rollout) on the login node, printing its progress; it
    fails, with the old replicas still serving, when a new job does not generate.

    **Example:**

    .. code:: python

        roll_out(name="Roll out", command="/opt/.../python -m nemotron_deploy.service.rollout --slurm-job ...")
    """

    def run(state, host):
        ok, _ = host.run_shell_command(command, print_output=True)
        return ok

    yield FunctionCommand(run, (), {})


@operation(is_idempotent=False)
def scale_down(command: str):
    """
    Take the replicas above the `replicas` setting out of the endpoint and cancel their jobs
    (nemotron_deploy.service.scale_down on the login node, as the account that submits them), printing
    what it does. Added only when the host's read found such a job.

    **Example:**

    .. code:: python

        scale_down(name="Scale down", command="/opt/.../python -m nemotron_deploy.service.scale_down ...")
    """

    def run(state, host):
        ok, _ = host.run_shell_command(command, print_output=True)
        return ok

    yield FunctionCommand(run, (), {})
