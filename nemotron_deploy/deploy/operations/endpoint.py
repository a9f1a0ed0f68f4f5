"""The endpoint's HAProxy on the login node: running, on the deployed configuration, slots in place."""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand, operation

from ..endpoint import CONFIG_DIR, CONFIG_FILE

SERVICE = "haproxy"


@operation()
def ensure_running(service: str, running: bool, config_changed: bool, sync_command: str | None):
    """
    Start HAProxy if it is not running, or reload it when its configuration changed (after `haproxy
    -c` accepts the file); leave it alone otherwise, so a re-deploy with nothing changed drops no
    connection. After a start or reload (whose slots start in maintenance), point the slots at the
    replicas at once with `sync_command` instead of waiting for the next scheduled check.

    + service: "systemd" (systemctl) or "sysv" (/etc/init.d/haproxy, hosts without systemd)
    + running: HAProxy runs now (from the host snapshot)
    + config_changed: this deploy changes haproxy.cfg or the Lua file it loads
    + sync_command: the scheduled check, run once as its user (it applies the slots); None where no
      replica has ever written its record (a first deploy): there is nothing to point a slot at

    **Example:**

    .. code:: python

        ensure_running(name="Endpoint", service="systemd", running=False, config_changed=True,
                       sync_command="runuser -u nemotron-health -- /opt/.../python -m ...")
    """
    if running and not config_changed:
        return
    config = shlex.quote(f"{CONFIG_DIR}/{CONFIG_FILE}")
    yield StringCommand(f"haproxy -c -q -f {config}")
    if service == "systemd":
        if running:
            yield StringCommand(f"systemctl reload {SERVICE}")
        yield StringCommand(f"systemctl enable --now {SERVICE}")
    else:
        yield StringCommand(f"/etc/init.d/{SERVICE} {'reload' if running else 'start'}")
    if sync_command:
        # The check exits 1/2 while replicas are still loading: that is not a failed deploy.
        yield StringCommand(f"{sync_command} || true")


@operation(is_idempotent=False)
def sync_now(command: str):
    """
    Run the scheduled check once (as its user): it points the endpoint's slots at the replicas now,
    not at its next run.

    **Example:**

    .. code:: python

        sync_now(name="Endpoint slots", command="runuser -u nemotron-health -- /opt/.../python -m ...")
    """
    yield StringCommand(f"{command} || true")


@operation(is_idempotent=False)
def serving(command: str):
    """
    Wait (bounded) until HAProxy has every replica's slot UP, its check (a generation) passed: the
    deploy ends with an endpoint that serves, or fails naming the slots HAProxy cannot use.

    **Example:**

    .. code:: python

        serving(name="Endpoint serves", command="runuser -u nemotron-health -- /opt/.../python -m ...")
    """
    yield StringCommand(command)


@operation()
def self_signed_certificate(script: str, present: bool):
    """
    Make the endpoint's self-signed key pair on this host, once: nothing when both files are there
    (a re-deploy never replaces a certificate clients already trust).

    + script: the shell that makes them (``deploy.endpoint.self_signed_script``)
    + present: the certificate and its key are both on the host (from the host snapshot)
    """
    if present:
        return
    yield StringCommand(script)


@operation()
def replica_key(script: str):
    """
    Make the replica key on the login node, or give its copies their owners and modes again
    (``deploy.replica_key.script``: it reuses the key on shared storage when there is one). The
    deploy calls it only when the host read shows a copy missing or owned otherwise.

    + script: the shell that writes the copies (no key in it: the key never leaves the host's shell)
    """
    yield StringCommand(script)
