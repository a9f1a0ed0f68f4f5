"""The service account on the login node: every replica's job is submitted as it (service_user)."""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand, operation

SERVICE_USER_MARK = "nemotron-deploy service"


def run_as(user: str, command: str, deploy_user: str | None = None, *, cwd: str | None = None) -> str:
    """Shell: `command` (a simple command: words) run as `user`, from whoever runs the deploy's shell:
    as is where that is already `user`, runuser where it is root, else sudo (non-interactive, so a
    missing rule fails instead of asking). `deploy_user` known: decided here; None (a fact's read,
    which runs before anyone asks): decided by the shell, in a subshell. `cwd`: run there (root's
    working directory is closed to the account). A redirection after it is made by the caller's shell."""
    q = shlex.quote(user)
    where = f"cd {shlex.quote(cwd)} && " if cwd else ""
    if deploy_user is not None:
        become = f"runuser -u {q} -- " if deploy_user == "root" else f"sudo -n -u {q} -- "
        if deploy_user == user:
            become = ""
        return f"( {where}{become}{command} )" if where else f"{become}{command}"
    choose = (
        f'if [ "$(id -un)" = {q} ]; then set --; elif [ "$(id -u)" = 0 ]; then set -- runuser -u {q} --; '
        f"else set -- sudo -n -u {q} --; fi"
    )
    return f'( {where}{choose} && exec "$@" {command} )'


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
