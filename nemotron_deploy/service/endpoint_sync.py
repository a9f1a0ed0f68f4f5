"""Point the endpoint's replica slots at the replicas, through HAProxy's runtime API: no reload.

The endpoint's haproxy.cfg (render.render_endpoint) has slots r1..rN in the backend ``replicas``,
all in maintenance at start. Only Slurm knows where each replica's rank 0 runs, so this updater,
run by the health timer every minute and right after submit, takes the desired backends
``{slot: (address or None, port)}`` and, over the stats socket:

* reads ``show servers state <backend>``;
* for a slot that should serve: it gets traffic only once its health check (a real generation)
  passes at its address. Out of maintenance: ``addr`` (if it differs), ``state drain``, ``health
  down``, ``state ready``. Serving, at another address: ``health down``, then ``addr``. (``state
  ready`` straight from maintenance would put it UP at once: queued requests would go to a replica
  that may still be loading, before any check.)
* for a slot that should not (``None``: no replica, or it is not running): ``state maint`` unless it
  already is. Requests in flight on it finish; new ones go elsewhere.

Slots already as desired get no command, so a second run sends nothing. Addresses are resolved here
(the runtime API takes IPs): a node name that does not resolve leaves its slot in maintenance.

Stdlib only: it runs from the health timer's venv on the login node, like health.py.

    python -m nemotron_deploy.service.endpoint_sync --socket /run/haproxy/admin.sock --set r1=gpu01:1424 --set r2=-
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

# The endpoint's names, defined here (stdlib-only: the health check and the rollout import this
# module on the login node) and re-exported by endpoint.py for the templates.
BACKEND = "replicas"
SLOT_PREFIX = "r"
SPARE_PREFIX = "u"  # one spare slot, u1, for rolling updates
SPARE_SLOT = f"{SPARE_PREFIX}1"
SOCKET = "/run/haproxy/admin.sock"
# srv_admin_state bits (HAProxy's SRV_ADMF_*): maintenance forced, inherited, by resolution, by hostname;
# drain forced, inherited. (0x04, CMAINT, only records the config's `disabled` and stays after
# `state ready`.)
_ADMIN_MAINT = 0x01 | 0x02 | 0x20 | 0x40
_ADMIN_DRAIN = 0x08 | 0x10
# srv_op_state: 0 stopped (down), 1 starting, 2 running (up), 3 stopping.
OP_STATES = {0: "down", 1: "starting", 2: "up", 3: "stopping"}

Desired = dict[str, "tuple[str | None, int]"]


class SyncError(Exception):
    """The stats socket could not be used, or HAProxy refused a command; the message says which."""


@dataclass(frozen=True)
class ServerState:
    name: str
    addr: str
    port: int
    op_state: int
    admin_state: int

    @property
    def in_maintenance(self) -> bool:
        return bool(self.admin_state & _ADMIN_MAINT)

    @property
    def draining(self) -> bool:
        return bool(self.admin_state & _ADMIN_DRAIN)

    @property
    def status(self) -> str:
        if self.in_maintenance:
            return "maint"
        return "drain" if self.draining else OP_STATES.get(self.op_state, str(self.op_state))


def replica_job_name(job_name: str, index: int) -> str:
    """The Slurm job name of replica `index` (1-based): <job_name>-r<index>."""
    return f"{job_name}-{SLOT_PREFIX}{index}"


def slot_for_job(job_name: str, name: str) -> str | None:
    """The slot (r<i>) a replica job's name maps to, or None when it is not one of this deployment's."""
    m = re.fullmatch(re.escape(job_name) + r"-(" + SLOT_PREFIX + r"[1-9][0-9]*)", name)
    return m.group(1) if m else None


def desired_from_nodes(
    job_name: str, replicas: int, first_nodes: dict[str, str | None], port: int
) -> Desired:
    """{slot: (first node or None, port)} for every slot, from {replica job name: first node}.

    A job missing from `first_nodes`, or mapped to None (pending, ended), leaves its slot empty.
    """
    desired: Desired = {f"{SLOT_PREFIX}{i}": (None, port) for i in range(1, replicas + 1)}
    for name, node in first_nodes.items():
        slot = slot_for_job(job_name, name)
        if slot in desired:
            desired[slot] = (node or None, port)
    return desired


def command(socket_path: str, line: str, timeout: float = 10.0) -> str:
    """One runtime API command (non-interactive: HAProxy answers and closes)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(socket_path)
            conn.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except OSError as exc:
        raise SyncError(
            f"HAProxy's stats socket {socket_path}: {exc.strerror or exc} (is the endpoint running, and is "
            "this user in the socket's group?)"
        ) from exc
    return b"".join(chunks).decode(errors="replace")


def parse_servers_state(text: str, backend: str = BACKEND) -> dict[str, ServerState]:
    """`show servers state` (format 1) -> {server name: ServerState} for `backend`."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = next((line for line in lines if line.startswith("# ")), None)
    if not lines or lines[0].strip() != "1" or header is None:
        raise SyncError(f"unexpected answer to `show servers state {backend}`: {text.strip()[:200]!r}")
    columns = header[2:].split()
    servers = {}
    for line in lines:
        if line.startswith("#") or line.strip() == "1":
            continue
        row = dict(zip(columns, line.split(), strict=False))
        if row.get("be_name") != backend:
            continue
        servers[row["srv_name"]] = ServerState(
            name=row["srv_name"],
            addr=row["srv_addr"],
            port=int(row["srv_port"]),
            op_state=int(row["srv_op_state"]),
            admin_state=int(row["srv_admin_state"]),
        )
    return servers


def servers_state(socket_path: str, backend: str = BACKEND) -> dict[str, ServerState]:
    text = command(socket_path, f"show servers state {backend}")
    if "Can't find backend" in text:
        raise SyncError(f"HAProxy has no backend {backend!r}: {text.strip()}")
    return parse_servers_state(text, backend)


def parse_stat(text: str, backend: str = BACKEND) -> dict[str, dict[str, str]]:
    """`show stat` (CSV, header ``# pxname,svname,qcur,...``) -> {svname: {column: value}} of `backend`'s
    rows: one per server, and ``BACKEND`` for the backend itself."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# pxname,svname,"):
        raise SyncError(f"unexpected answer to `show stat`: {text.strip()[:200]!r}")
    columns = lines[0][2:].split(",")
    rows = {}
    for line in lines[1:]:
        row = dict(zip(columns, line.split(","), strict=False))
        if row.get("pxname") == backend:
            rows[row["svname"]] = row
    if "BACKEND" not in rows:
        raise SyncError(f"HAProxy's `show stat` has no backend {backend!r}")
    return rows


def queue_length(rows: dict[str, dict[str, str]]) -> int:
    """Requests waiting in the backend's queue for a free replica (`qcur` of its BACKEND row)."""
    return int(rows["BACKEND"].get("qcur") or 0)


def backend_stat(socket_path: str, backend: str = BACKEND) -> dict[str, dict[str, str]]:
    return parse_stat(command(socket_path, "show stat"), backend)


def resolve(host: str) -> str | None:
    """An IP for a node name (IPv4 first, as Slurm nodes usually are), or None if it does not resolve."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    addrs = [info[4][0] for info in infos]
    v4 = [a for a in addrs if ":" not in a]
    return (v4 or addrs or [None])[0]


def _require_slots(current: dict[str, ServerState], slots: Iterable[str], backend: str) -> None:
    unknown = sorted(set(slots) - set(current))
    if unknown:
        raise SyncError(
            f"the endpoint's backend {backend} has no slot(s) {', '.join(unknown)} (it has "
            f"{', '.join(sorted(current)) or 'none'}): re-render the endpoint for this many replicas"
        )


def plan_commands(current: dict[str, ServerState], desired: Desired, backend: str = BACKEND) -> list[str]:
    """The runtime API commands that bring `current` to `desired`; none for slots already there."""
    _require_slots(current, desired, backend)
    commands = []
    for slot in sorted(desired, key=lambda name: (len(name), name)):
        addr, port = desired[slot]
        state = current[slot]
        target = f"{backend}/{slot}"
        if addr is None:
            if not state.in_maintenance:
                commands.append(f"set server {target} state maint")
            continue
        moved = state.addr != addr or state.port != port
        if state.in_maintenance:
            # `state ready` from maintenance puts a slot UP at once ("leaving forced maintenance"),
            # and HAProxy hands it queued requests before the `health down` that follows: a replica
            # still loading refuses them. Through drain (no new requests), marked down, then ready,
            # it leaves DOWN and is UP only once its check, a generation, passes.
            if moved:
                commands.append(f"set server {target} addr {addr} port {port}")
            commands += [
                f"set server {target} state drain",
                f"set server {target} health down",
                f"set server {target} state ready",
            ]
        elif moved:
            # Another replica for a slot that serves: none of its requests go to the new address
            # before a check passed there (requests in flight to the old one finish).
            commands += [f"set server {target} health down", f"set server {target} addr {addr} port {port}"]
            if state.draining:
                commands.append(f"set server {target} state ready")
        elif state.draining:
            commands.append(f"set server {target} state ready")
    return commands


def slots_above(current: dict[str, ServerState], replicas: int) -> list[str]:
    """The replica slots r<k>, k > `replicas`, that the backend has (its slots per replica the nodes
    hold, beyond the replicas that run: a scale-down's, kept in maintenance)."""
    pattern = re.escape(SLOT_PREFIX) + r"([1-9][0-9]*)"
    return [name for name in current if (m := re.fullmatch(pattern, name)) and int(m.group(1)) > replicas]


def apply(
    socket_path: str,
    desired: dict[str, tuple[str | None, int]],
    backend: str = BACKEND,
    *,
    retire_above: int | None = None,
) -> list[str]:
    """Bring the slots to `desired` ({slot: (node name or IP or None, port)}); return the commands sent.
    With `retire_above` N, every replica slot above rN the backend has is put in maintenance too.

    Node names are resolved first; one that does not resolve counts as None (slot in maintenance).
    Raises SyncError when the socket fails or HAProxy answers a command with an error.
    """
    resolved = {slot: ((resolve(addr) if addr else None), port) for slot, (addr, port) in desired.items()}
    current = servers_state(socket_path, backend)
    if retire_above is not None:
        for slot in slots_above(current, retire_above):
            resolved.setdefault(slot, (None, 0))
    commands = plan_commands(current, resolved, backend)
    # One command line per slot (`a; b`): HAProxy runs them back to back.
    per_slot: dict[str, list[str]] = {}
    for line in commands:
        per_slot.setdefault(line.split()[2], []).append(line)
    for lines in per_slot.values():
        answer = command(socket_path, "; ".join(lines))
        for reply in answer.splitlines():
            reply = reply.strip()
            # Success is silent, or says what changed ("IP changed from ...", "no need to change ...").
            if reply and not reply.startswith(("IP changed", "no need to change", "port changed")):
                raise SyncError(f"HAProxy refused `{'; '.join(lines)}`: {answer.strip()}")
    return commands


def not_up(
    socket_path: str, slots: list[str], within: float, backend: str = BACKEND
) -> dict[str, ServerState]:
    """Wait (at most `within` seconds) until HAProxy has every one of `slots` UP, i.e. its check (a
    one-token generation) passed; return the slots still not UP then ({} when all are)."""
    deadline = time.monotonic() + within
    while True:
        current = servers_state(socket_path, backend)
        _require_slots(current, slots, backend)
        waiting = {slot: current[slot] for slot in slots if current[slot].status != "up"}
        if not waiting or time.monotonic() >= deadline:
            return waiting
        time.sleep(0.2)


def _slot_arg(text: str) -> tuple[str, tuple[str | None, int | None]]:
    slot, sep, target = text.partition("=")
    if not sep or not re.fullmatch(SLOT_PREFIX + r"[1-9][0-9]*", slot):
        raise argparse.ArgumentTypeError(f"{text!r}: use SLOT=HOST:PORT or SLOT=- (e.g. r1=gpu01:1424)")
    if target == "-":
        return slot, (None, None)
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: use SLOT=HOST:PORT or SLOT=- (e.g. r1=gpu01:1424)")
    return slot, (host.strip("[]"), int(port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nemotron_deploy.service.endpoint_sync",
        description="Point the endpoint's replica slots at replicas (HAProxy runtime API, no reload). "
        "Slots not named are left alone.",
    )
    parser.add_argument("--socket", default=SOCKET, help=f"HAProxy's stats socket (default {SOCKET})")
    parser.add_argument("--backend", default=BACKEND, help=f"the backend (default {BACKEND})")
    parser.add_argument(
        "--set",
        dest="slots",
        action="append",
        type=_slot_arg,
        default=[],
        metavar="SLOT=HOST:PORT|SLOT=-",
        help="a slot's replica (its first node and port), or - for none; repeat per slot",
    )
    parser.add_argument("--show", action="store_true", help="print every slot's state after applying")
    parser.add_argument(
        "--wait-up",
        dest="wait_up",
        action="append",
        default=[],
        metavar="SLOT",
        help="then wait until HAProxy has this slot UP (its check, a generation, passed); repeat per "
        "slot; exit 1 naming the slots still not UP after --within seconds",
    )
    parser.add_argument(
        "--within", type=float, default=60.0, metavar="SECONDS", help="the bound of --wait-up (default 60)"
    )
    opts = parser.parse_args(argv)
    desired = {slot: (host, port or 0) for slot, (host, port) in opts.slots}
    try:
        for line in apply(opts.socket, desired, opts.backend):
            print(line)
        waiting = not_up(opts.socket, opts.wait_up, opts.within, opts.backend) if opts.wait_up else {}
        if opts.show:
            for name, state in sorted(servers_state(opts.socket, opts.backend).items()):
                print(f"{name} {state.addr}:{state.port} {state.status}")
    except SyncError as exc:
        print(f"endpoint_sync: {exc}", file=sys.stderr)
        return 2
    if waiting:
        slots = ", ".join(
            f"{name} ({state.addr}:{state.port}, {state.status})" for name, state in waiting.items()
        )
        print(
            f"endpoint_sync: not UP in the endpoint after {opts.within:.0f}s: {slots}. HAProxy's check of "
            "each (a one-token generation from this node) has not passed: see `nemotron-deploy health` "
            "and whether this node reaches the replica's port.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
