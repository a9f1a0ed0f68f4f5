"""Submitting the job (only with `--data submit=true`) and waiting for it to generate."""

from __future__ import annotations

import shlex

from pyinfra.api import FunctionCommand, operation


@operation(is_idempotent=False)
def submit_and_wait(sbatch_path: str, job_name: str, health_command: str):
    """
    Submit `sbatch_path` unless a job named `job_name` is already pending or running, then wait
    (printing progress) until the health check sees the server generate.

    **Example:**

    .. code:: python

        submit_and_wait(name="Submit", sbatch_path="/shared/jobs/nemotron.sbatch",
                        job_name="nemotron-340b", health_command="/opt/venv/bin/python -m ...")
    """

    def run(state, host):
        q_name = shlex.quote(job_name)
        ok, out = host.run_shell_command(f"squeue -h -n {q_name} -t PENDING,RUNNING,CONFIGURING -o %i")
        existing = [line.strip() for line in out.stdout_lines if line.strip()] if ok else []
        if existing:
            print(f"{host.print_prefix}job {job_name} already queued or running: {', '.join(existing)}")
        else:
            ok, out = host.run_shell_command(
                f"sbatch --parsable {shlex.quote(sbatch_path)}", print_output=True
            )
            if not ok:
                raise RuntimeError(f"sbatch {sbatch_path} failed: {out.stderr}")
        ok, out = host.run_shell_command(health_command, print_output=True, print_input=True)
        if not ok:
            raise RuntimeError(f"job {job_name} did not become healthy: {out.stderr or out.stdout}")

    yield FunctionCommand(run, (), {})
