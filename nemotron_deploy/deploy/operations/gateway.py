"""The OpenAI gateway on the login node: its account, and the service running on the deployed files."""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand, operation

from ..openai_gateway import INIT_SCRIPT, UNIT, USER_MARK


@operation()
def ensure_user(username: str, exists: bool, marked: bool = True):
    """
    Create the gateway's unprivileged system user (no login shell, no home), marked as the deploy's in
    its GECOS field, unless it exists; mark one the deploy made unmarked (`marked=False`).

    **Example:**

    .. code:: python

        ensure_user(name="Gateway user", username="nemotron-gateway", exists=False)
    """
    q = shlex.quote(username)
    if not exists:
        yield StringCommand(
            "useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "
            f"--comment {shlex.quote(USER_MARK)} {q}"
        )
    elif not marked:
        yield StringCommand(f"usermod --comment {shlex.quote(USER_MARK)} {q}")


@operation()
def ensure_running(kind: str, changed: bool, running: bool, enabled: bool):
    """
    Start the gateway if it is not running, restart it when its config, unit or venv changed; leave it
    alone otherwise (a re-deploy with nothing changed does nothing).

    + kind: "systemd" (the unit, enabled at boot) or "cron" (the init script, started here)
    + changed: this deploy changes the gateway's config, unit/script or venv
    + running: the gateway runs now (from the host snapshot)
    + enabled: systemd: the unit is enabled
    """
    if kind == "systemd":
        if changed:
            yield StringCommand("systemctl daemon-reload")
        if changed or not enabled:
            yield StringCommand(f"systemctl enable {UNIT}")
        if changed and running:
            yield StringCommand(f"systemctl restart {UNIT}")
        elif not running:
            yield StringCommand(f"systemctl start {UNIT}")
        return
    if changed and running:
        yield StringCommand(f"{INIT_SCRIPT} restart")
    elif not running:
        yield StringCommand(f"{INIT_SCRIPT} start")
