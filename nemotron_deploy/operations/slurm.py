"""Submitting the job (only with `--data submit=true`) and waiting for it to generate."""

from __future__ import annotations

import re
import shlex
import time

import gevent
from pyinfra.api import FunctionCommand, operation

# States of a job that has not ended yet (squeue's and scontrol's names).
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING"}
)


def job_record(line: str) -> dict[str, str]:
    """`scontrol show job -o` output as {"JobState": ..., "ExitCode": ..., "StdOut": ...}."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


@operation(is_idempotent=False)
def submit_and_wait(
    sbatch_path: str,
    job_name: str,
    health_command: str,
    until_done: bool = False,
    budget_seconds: int = 2700,
):
    """
    Submit `sbatch_path` unless a job named `job_name` is already pending or running, then wait
    (printing progress) until the health check sees the server generate.

    + until_done: for a job that ends by itself (smoke mode: one call, then every rank stops): wait
      until it has ended instead, succeed if it COMPLETED with exit code 0 and print its output
      from the job's own health-check line on. (A health check from outside can miss the few
      milliseconds such a job serves, then sees the job gone and fails a good run.)
    + budget_seconds: with until_done, how long the job may take to end

    **Example:**

    .. code:: python

        submit_and_wait(name="Submit", sbatch_path="/shared/jobs/nemotron.sbatch",
                        job_name="nemotron-340b", health_command="/opt/venv/bin/python -m ...")
    """

    def run(state, host):
        q_name = shlex.quote(job_name)
        ok, out = host.run_shell_command(f"squeue -h -n {q_name} -t PENDING,RUNNING,CONFIGURING -o %i")
        existing = [line.strip() for line in out.stdout_lines if line.strip()] if ok else []
        if existing and until_done:
            # A smoke run needs a job of its own: waiting for a serving job to end would never finish.
            raise RuntimeError(
                f"job {job_name} is already queued or running ({', '.join(existing)}): cancel it with "
                f"`scancel --name={job_name}` before a smoke run, or deploy with mode=serve"
            )
        if existing:
            print(f"{host.print_prefix}job {job_name} already queued or running: {', '.join(existing)}")
            job_id = existing[-1]
        else:
            ok, out = host.run_shell_command(f"sbatch --parsable {shlex.quote(sbatch_path)}")
            if not ok:
                raise RuntimeError(f"sbatch {sbatch_path} failed: {out.stderr}")
            job_id = out.stdout.strip().split(";")[0]
            print(f"{host.print_prefix}submitted {sbatch_path} as job {job_id}")
        if until_done:
            _wait_until_done(host, job_id, budget_seconds)
            return
        ok, out = host.run_shell_command(health_command, print_output=True, print_input=True)
        if not ok:
            raise RuntimeError(f"job {job_name} did not become healthy: {out.stderr or out.stdout}")

    yield FunctionCommand(run, (), {})


def _wait_until_done(host, job_id: str, budget_seconds: int) -> None:
    deadline = time.monotonic() + budget_seconds
    while True:
        ok, out = host.run_shell_command(f"scontrol show job -o {shlex.quote(job_id)}")
        if not ok:
            raise RuntimeError(f"scontrol show job {job_id} failed: {out.stderr or out.stdout}")
        job = job_record(out.stdout.strip())
        if job.get("JobState") not in ACTIVE_STATES:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} is still {job.get('JobState')} after {budget_seconds}s")
        gevent.sleep(1)
    stdout = job.get("StdOut", "")
    # The job's output from its own health check's line on: that line, the prompt and the answer.
    host.run_shell_command(
        f"sed -n '/^NEMOTRON /,$p' {shlex.quote(stdout)}", print_output=True, print_input=False
    )
    if job.get("JobState") != "COMPLETED" or job.get("ExitCode") != "0:0":
        raise RuntimeError(
            f"job {job_id} ended {job.get('JobState')} with exit code {job.get('ExitCode')}; "
            f"see {job.get('StdErr', 'its StdErr')}"
        )
    print(f"{host.print_prefix}job {job_id} COMPLETED: the smoke test passed")
