"""The sandbox network: one Linux bridge on the host and one network namespace per node.

Each node gets a veth pair: `nsb-<node>` on the host, enslaved to the bridge, and `eth0` inside the
node's namespace with the node's address. There is no default route and no NAT: nodes can reach
each other and the host's bridge address, nothing else.
All links for all nodes are created with one `ip -batch` call, which keeps `up` fast for 16 nodes.
"""

from __future__ import annotations

import os
from pathlib import Path

from .layout import BRIDGE, BRIDGE_ADDRESS, NETNS_PREFIX, PREFIX_LEN, Node
from .proc import SandboxError, run

NETNS_DIR = Path("/run/netns")


def _ip_batch(commands: list[str], what: str) -> None:
    """Run `ip -batch -`; every command is built from validated node names and addresses."""
    if commands:
        run(["ip", "-batch", "-"], input="\n".join(commands) + "\n", what=what)


def bridge_exists() -> bool:
    return Path(f"/sys/class/net/{BRIDGE}").exists()


def ensure_bridge() -> None:
    if bridge_exists():
        return
    _ip_batch(
        [
            f"link add {BRIDGE} type bridge",
            f"addr add {BRIDGE_ADDRESS}/{PREFIX_LEN} dev {BRIDGE}",
            f"link set {BRIDGE} up",
        ],
        what=f"creating bridge {BRIDGE}",
    )


def delete_bridge() -> None:
    if bridge_exists():
        run(["ip", "link", "del", BRIDGE], what=f"deleting bridge {BRIDGE}")


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def sandbox_netns() -> list[str]:
    """Every network namespace the sandbox created (by name prefix), including stale ones."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(NETNS_PREFIX))


def create_nodes(nodes: list[Node]) -> None:
    """Create the namespace, veth pair, address and links of each node (none may exist yet)."""
    for node in nodes:
        if netns_exists(node.netns):
            raise SandboxError(
                f"network namespace {node.netns} already exists; run `nemotron-deploy sandbox down`"
            )
    _ip_batch([f"netns add {n.netns}" for n in nodes], what="creating network namespaces")
    host_side: list[str] = []
    for n in nodes:
        host_side += [
            f"link add {n.veth} type veth peer name eth0 netns {n.netns}",
            f"link set {n.veth} master {BRIDGE} up",
        ]
    _ip_batch(host_side, what="creating veth pairs")
    for n in nodes:
        commands = [f"addr add {n.address}/{PREFIX_LEN} dev eth0", "link set lo up", "link set eth0 up"]
        run(
            ["ip", "-n", n.netns, "-batch", "-"],
            input="\n".join(commands) + "\n",
            what=f"configuring eth0 in {n.netns}",
        )


def set_link(node: Node, up: bool) -> None:
    """Plug or unplug a node's cable (host side of its veth): unplugged looks like a dead host."""
    run(
        ["ip", "link", "set", node.veth, "up" if up else "down"],
        what=f"setting {node.veth} {'up' if up else 'down'}",
    )


def pids_by_netns(names: list[str]) -> dict[str, list[int]]:
    """For each named namespace, every process in it (whatever its mount/PID namespace), in one pass
    over /proc. A process is in a namespace when /proc/PID/ns/net is the same inode as /run/netns/X."""
    inodes = {}
    for name in names:
        try:
            inodes[(NETNS_DIR / name).stat().st_ino] = name
        except OSError:
            pass
    found: dict[str, list[int]] = {name: [] for name in names}
    if not inodes:
        return found
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            link = os.readlink(f"/proc/{entry.name}/ns/net")  # "net:[4026532288]"
        except OSError:
            continue
        name = inodes.get(int(link[5:-1]))
        if name:
            found[name].append(int(entry.name))
    return found


def pids_in(netns: str) -> list[int]:
    return pids_by_netns([netns])[netns]


def delete_netns(names: list[str]) -> None:
    """Delete namespaces (their veth ends go with them); ignores ones already gone."""
    existing = [n for n in names if netns_exists(n)]
    if existing:
        _ip_batch([f"netns del {n}" for n in existing], what="deleting network namespaces")
