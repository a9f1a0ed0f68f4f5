"""Hosts that can't be reached: each fails alone, and the deploy ends by naming them and what to do.

pyinfra already handles most of it: a host it can't connect to is dropped before the deploy (its
"Could not connect" line), and a command that hits a dead connection fails that host only. Two gaps:

 - an upload over a dead connection raises pyinfra's ConnectError (it wraps paramiko's "SSH session
   not active" when it opens the SFTP channel), which pyinfra's operation runner does not catch: a
   traceback, and the run stops for every host. `UploadCommand` turns it back into the SSHException
   pyinfra expects, so only that host fails.
 - nothing says at the end which hosts were not deployed, nor that Slurm still schedules onto them.
   `report_unreachable_hosts` records hosts whose connection failed (at the start, or during an
   operation: a pyinfra state callback) and prints, as the process exits, one line per host and a
   summary with the `scontrol` command that drains them.

pyinfra exits non-zero whenever a host failed, so the exit code needs nothing from here.
"""

from __future__ import annotations

import atexit
from typing import TYPE_CHECKING, Any

import click
from paramiko import SSHException
from pyinfra.api import FileUploadCommand
from pyinfra.api.exceptions import ConnectError
from pyinfra.api.state import BaseStateCallback

if TYPE_CHECKING:
    from ..inventory import Cluster

DRAIN_REASON = "nemotron-deploy: unreachable, not deployed"


class UploadCommand(FileUploadCommand):
    """pyinfra's upload; a connection that is gone fails this host like any other SSH error."""

    def execute(self, state: Any, host: Any, connector_arguments: Any) -> bool:
        try:
            return super().execute(state, host, connector_arguments)
        except (ConnectError, EOFError) as exc:  # SFTP channel refused / connection closed mid-upload
            raise SSHException(str(exc.__cause__ or exc) or type(exc).__name__) from exc


def connection_lost(host: Any) -> bool:
    """True if this host's SSH connection is gone (other connectors never lose one)."""
    client = getattr(host.connector, "client", None)
    if client is None:
        return False
    transport = client.get_transport()
    return transport is None or not transport.is_active()


class _Watch(BaseStateCallback):
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.lost: dict[Any, str] = {}  # host -> what failed, in the order they were lost

    def operation_host_error(self, state, host, op_hash, retry_count=0, max_retries=0):  # type: ignore[override]
        if host not in self.lost and connection_lost(host):
            names = ", ".join(sorted(state.get_op_meta(op_hash).names)) or "an operation"
            self.lost[host] = f'lost the SSH connection during "{names}"'

    def unreachable(self, state: Any) -> dict[Any, str]:
        """{host: what failed}: never connected (in the --limit), then lost during the run."""
        found = {
            host: "could not connect over SSH when the deploy started (pyinfra's reason is above)"
            for host in state.inventory
            if state.is_host_in_limit(host) and host not in state.activated_hosts
        }
        found.update(self.lost)
        return found

    def summary(self, state: Any) -> list[str]:
        hosts = self.unreachable(state)
        if not hosts:
            return []
        lines = ["--> Unreachable hosts:"]
        lines += [f"    {host.name} ({_address(host)}): {what}" for host, what in hosts.items()]
        names = [host.name for host in hosts]
        compute = [name for name in names if name in self.cluster.compute]
        lines.append(f"    Not deployed: {', '.join(names)}.")
        it = "it" if len(compute) == 1 else "them"
        if compute:
            lines += [
                f"    Slurm may still schedule jobs onto {it}: drain {it} with",
                f'      scontrol update nodename={",".join(compute)} state=drain reason="{DRAIN_REASON}"',
                f"    or fix {it} and re-run the deploy.",
            ]
        else:
            lines.append(f"    Fix {'it' if len(names) == 1 else 'them'} and re-run the deploy.")
        return lines


def _address(host: Any) -> str:
    return str(host.data.get("ssh_hostname") or host.name)


_watches: dict[int, _Watch] = {}


def report_unreachable_hosts(state: Any, cluster: Cluster) -> None:
    """Once per run (the deploy file runs once per host): watch for lost connections and, as pyinfra
    exits, print the unreachable hosts and what to do about them."""
    if id(state) in _watches:
        return
    watch = _Watch(cluster)
    _watches[id(state)] = watch
    state.add_callback_handler(watch)

    def _print() -> None:
        for line in watch.summary(state):
            click.echo(line, err=True)

    atexit.register(_print)
