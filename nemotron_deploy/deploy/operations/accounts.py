"""The service account on the login node: every replica's job is submitted as it (service_user)."""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand, operation

SERVICE_USER_MARK = "nemotron-deploy service"


def run_as(user: str, deploy_user: str, command: str) -> str:
    """`command` (a shell command line) run as `user`: as is where the deploy already is that user,
    runuser where it is root, else sudo (non-interactive, so a missing rule fails instead of asking)."""
    if deploy_user == user:
        return command
    if deploy_user == "root":
        return f"runuser -u {shlex.quote(user)} -- {command}"
    return f"sudo -n -u {shlex.quote(user)} -- {command}"


@operation()
def service_user(username: str, uid: str | None = None):
    """
    Create the unprivileged account the replicas' jobs are submitted as (no login shell, no home,
    marked in its GECOS field), with `uid` when the compute nodes already have it: Slurm runs a job
    with the UID it was submitted with. Where it exists (LDAP/SSSD, an admin's), nothing changes.

    **Example:**

    .. code:: python

        service_user(name="Service account", username="nemotron", uid="2000")
    """
    uid_flag = f"--uid {shlex.quote(uid)} " if uid else ""
    yield StringCommand(
        f"useradd --system --user-group {uid_flag}--no-create-home --home-dir /nonexistent "
        f"--shell /usr/sbin/nologin --comment {shlex.quote(SERVICE_USER_MARK)} {shlex.quote(username)}"
    )
