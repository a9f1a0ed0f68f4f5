"""Files each node sees in its private /etc: names of the cluster's hosts, and the unprivileged user.

They are written into each node's /etc overlay upper dir before the node starts, starting from the
host's own copy, so the host's /etc/hosts and /etc/passwd are never modified. The `nemotron` user has
the same UID on every node and a home in the sandbox's shared /home, like on a real cluster.

For podman's rootless runs as `nemotron` (the podman runtime), it also has what a site gives such an
account: a subordinate UID/GID range (/etc/subuid, /etc/subgid, the same on every node) and, on the
compute nodes, its runtime dir /run/user/<uid> (0700, its own), what `loginctl enable-linger` makes.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import nodes
from .layout import UNPRIVILEGED_USER, Node, Sandbox

FIRST_UID = 2000
SUBID_COUNT = 65536  # one user namespace's worth, as useradd gives


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


def subid_start(path: str) -> int:
    """The first subordinate ID past every range the host's file gives (100000 when none do)."""
    ends = [100000]
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        fields = line.split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            ends.append(int(fields[1]) + int(fields[2]))
    return max(ends)


def subid_lines() -> dict[str, str]:
    """The account's /etc/subuid and /etc/subgid lines (the same on every node)."""
    return {
        path: f"{UNPRIVILEGED_USER}:{subid_start(path)}:{SUBID_COUNT}"
        for path in ("/etc/subuid", "/etc/subgid")
    }


def runtime_dir(node: Node, uid: int, gid: int) -> None:
    """The account's /run/user/<uid> on a compute node (node-private /run; node_up keeps it)."""
    target = nodes.host_path(node, f"/run/user/{uid}")
    target.mkdir(parents=True, exist_ok=True)
    target.parent.chmod(0o755)
    os.chown(target, uid, gid)
    target.chmod(0o700)


def refresh(sandbox: Sandbox) -> None:
    """Bring a running sandbox's nodes up to date (an older `up` wrote no subordinate IDs nor runtime
    dir). Their /etc is a mounted overlay: lines are appended from inside the node, when missing."""
    uid, gid = _account_ids(sandbox)
    for node in sandbox.nodes:
        for path, line in subid_lines().items():
            append = f'grep -q "^{UNPRIVILEGED_USER}:" {path} 2>/dev/null || echo {line} >> {path}'
            nodes.run_in(node, ["sh", "-c", append], what=f"adding {UNPRIVILEGED_USER} to {path}")
        join = f"! getent group docker >/dev/null || gpasswd -a {UNPRIVILEGED_USER} docker >/dev/null"
        nodes.run_in(node, ["sh", "-c", join], what=f"adding {UNPRIVILEGED_USER} to the docker group")
        if node.role == "compute":
            runtime_dir(node, uid, gid)


def _account_ids(sandbox: Sandbox) -> tuple[int, int]:
    """The account's UID and GID on the running nodes (their /etc/passwd: the host's may differ now)."""
    line = nodes.host_path(sandbox.compute[0], "/etc/passwd").read_text().splitlines()
    fields = next(x.split(":") for x in line if x.startswith(f"{UNPRIVILEGED_USER}:"))
    return int(fields[2]), int(fields[3])


def _append(node: Node, path: str, line: str, mode: int) -> None:
    target = nodes.host_path(node, path)
    text = Path(path).read_text() if Path(path).exists() else ""
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
        # On every node, as a directory service has it: Slurm gives a job the groups the controller
        # sees (a job whose login node lacked it ran without the docker group).
        _join_group(node, "docker", user)
        _append(node, "/etc/shadow", f"{user}:*:19700:0:99999:7:::", 0o640)
        for path, line in subid_lines().items():
            _append(node, path, line, 0o644)
        if node.role == "compute":
            runtime_dir(node, uid, gid)
        shadow = nodes.host_path(node, "/etc/shadow")
        stat = Path("/etc/shadow").stat()
        os.chown(shadow, stat.st_uid, stat.st_gid)
