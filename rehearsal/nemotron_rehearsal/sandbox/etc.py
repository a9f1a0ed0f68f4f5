"""Files each node sees in its private /etc: names of the cluster's hosts, and the unprivileged user.

They are written into each node's /etc overlay upper dir before the node starts, starting from the
host's own copy, so the host's /etc/hosts and /etc/passwd are never modified. The `nemotron` user has
the same UID on every node and a home in the sandbox's shared /home, like on a real cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import nodes
from .layout import UNPRIVILEGED_USER, Node, Sandbox

FIRST_UID = 2000


def _free_id(path: str) -> int:
    used = {int(line.split(":")[2]) for line in Path(path).read_text().splitlines() if line.count(":") >= 2}
    uid = FIRST_UID
    while uid in used:
        uid += 1
    return uid


def user_ids() -> tuple[int, int]:
    """UID and GID of the sandbox user: the first free ones from 2000 up in the host's files."""
    return _free_id("/etc/passwd"), _free_id("/etc/group")


def hosts_file(sandbox: Sandbox) -> str:
    lines = [Path("/etc/hosts").read_text().rstrip("\n"), "", "# nemotron-deploy sandbox nodes"]
    lines += [f"{n.address}\t{n.name}" for n in sandbox.nodes]
    return "\n".join(lines) + "\n"


def _append(node: Node, path: str, line: str, mode: int) -> None:
    target = nodes.host_path(node, path)
    text = Path(path).read_text()
    target.write_text(text + ("" if text.endswith("\n") else "\n") + line + "\n")
    target.chmod(mode)


def _join_group(node: Node, group: str, user: str) -> None:
    """`user` a member of `group` in the node's /etc/group, where the group exists: the jobs run as
    the service user, and the docker runtime's `docker run` needs the engine's socket (group docker),
    as a site that offers docker grants it."""
    target = nodes.host_path(node, "/etc/group")
    lines = target.read_text().splitlines()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if len(fields) == 4 and fields[0] == group and user not in fields[3].split(","):
            fields[3] = ",".join(m for m in (*fields[3].split(","), user) if m)
            lines[i] = ":".join(fields)
    target.write_text("\n".join(lines) + "\n")


def prepare(sandbox: Sandbox) -> None:
    uid, gid = user_ids()
    user = UNPRIVILEGED_USER
    home = nodes.HOME_DIR / user
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, uid, gid)
    home.chmod(0o755)
    hosts = hosts_file(sandbox)
    for node in sandbox.nodes:
        nodes.host_path(node, "/etc/hosts").write_text(hosts)
        _append(
            node,
            "/etc/passwd",
            f"{user}:x:{uid}:{gid}:nemotron-deploy sandbox user:/home/{user}:/bin/bash",
            0o644,
        )
        _append(node, "/etc/group", f"{user}:x:{gid}:", 0o644)
        if node.role == "compute":
            _join_group(node, "docker", user)
        _append(node, "/etc/shadow", f"{user}:*:19700:0:99999:7:::", 0o640)
        shadow = nodes.host_path(node, "/etc/shadow")
        stat = Path("/etc/shadow").stat()
        os.chown(shadow, stat.st_uid, stat.st_gid)
