"""MUNGE, Slurm's authentication: one munged for the whole sandbox, running on the login node.

Its socket is a file in `<state>/munge/run`, bound at /run/munge on every node, so slurmctld,
slurmd and every Slurm client reach it at the default path `/run/munge/munge.socket.2` from any
node (a unix socket on the filesystem works across network namespaces). The key is made per
sandbox; the host's own munge (if any) is neither used nor touched.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from . import nodes
from .layout import STATE_DIR, Node
from .proc import SandboxError, tail, wait_until

MUNGE_DIR = STATE_DIR / "munge"
KEY = MUNGE_DIR / "munge.key"
SOCKET = "/run/munge/munge.socket.2"  # inside every node
LOG = "/var/log/munge/munged.log"  # inside the login node


def prepare(login: Node) -> None:
    """Key, socket dir and log dir, owned by the `munge` user that munged runs as."""
    try:
        user = pwd.getpwnam("munge")
    except KeyError:
        raise SandboxError("user `munge` is missing: reinstall the Debian package `munge`") from None
    uid, gid = user.pw_uid, user.pw_gid
    for d, mode in (
        (MUNGE_DIR, 0o700),
        (nodes.MUNGE_RUN_DIR, 0o755),
        (nodes.host_path(login, "/var/log/munge"), 0o700),
    ):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, uid, gid)
        d.chmod(mode)
    if not KEY.exists():
        KEY.write_bytes(os.urandom(128))
    os.chown(KEY, uid, gid)
    KEY.chmod(0o400)


def start(login: Node, timeout: float = 10) -> None:
    log = nodes.host_path(login, LOG)  # munged insists on owning its log: not also our stderr capture
    socket = nodes.MUNGE_RUN_DIR / Path(SOCKET).name
    argv = [
        "setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
        "/usr/sbin/munged",
        f"--key-file={KEY}",
        f"--socket={SOCKET}",
        "--pid-file=/run/munge/munged.pid",
        f"--log-file={LOG}",
        f"--seed-file={MUNGE_DIR / 'munged.seed'}",
        "--num-threads=4",
    ]  # fmt: skip
    try:
        nodes.start_daemon(login, argv, nodes.host_path(login, "/var/log/munged.stderr"))
    except SandboxError as exc:
        raise SandboxError(f"{exc}\n{tail(log)}") from None
    wait_until(socket.is_socket, timeout=timeout, what=f"munged's socket {socket}", hint=lambda: tail(log))


def check(node: Node) -> None:
    """Encode a credential and decode it on `node`: proves the shared socket works from there."""
    cred = nodes.run_in(node, ["munge", "-n"], what=f"munge -n on {node.name}").stdout
    nodes.run_in(node, ["unmunge"], input=cred, what=f"unmunge on {node.name}")
