"""The replica key: the secret each replica's front (service/replica_front.py) asks of every request.

NeMo listens on its node's 127.0.0.1 only (nemo_launch.py); other hosts reach a replica through its
front, which forwards a request only with this key. It is made once, on the login node, by root
(`script`), and kept in three files, each readable only by the accounts that need it:

- `<shared_dir>/nemotron-deploy/replica.key` (shared storage, the jobs read it on their first node and
  mount it into the container): the submitting account's, 0400, in root's directory;
- `/var/lib/nemotron-deploy/replica.key` (login node): root:<health_user> 0640, for the scheduled
  check's probes (and root's: the deploy's wait, the rollout);
- `/etc/haproxy/nemotron_replica_key.map` (login node, with an endpoint): root:haproxy 0640, the map
  haproxy.cfg reads the header's value from (HAProxy reads it as root when it starts).

The key never appears on a command line (the script reads and writes it with shell builtins), in
pyinfra's output or in the host read (which only stats these files). A later deploy reuses the shared
copy; delete it to have the next deploy make a new key (running fronts read the new one at once;
HAProxy gets it when the deploy reloads it).
"""

from __future__ import annotations

import shlex
from typing import Any

from ..inventory import Cluster
from . import desired
from . import endpoint as endpoint_mod

PROBE_KEY_FILE = desired.REPLICA_PROBE_KEY_FILE
KEY_BYTES = 32


def map_path() -> str:
    return f"{endpoint_mod.CONFIG_DIR}/{endpoint_mod.REPLICA_KEY_MAP_FILE}"


def wanted(cluster: Cluster, login: desired.Login) -> dict[str, tuple[str, str, str]]:
    """{path: (user, group, mode)} of every copy of the key on the login node."""
    user, group = desired.records_owner(login)
    files = {
        cluster.settings.replica_key_file: (user, group, "400"),
        PROBE_KEY_FILE: ("root", cluster.settings.health_user, "640"),
    }
    if login.endpoint:
        files[map_path()] = ("root", endpoint_mod.RUN_AS, "640")
    return files


def paths(cluster: Cluster) -> tuple[str, ...]:
    """What the login node's read stats (never reads) for the key: every copy it may have."""
    return (cluster.settings.replica_key_file, PROBE_KEY_FILE, map_path())


def in_place(cluster: Cluster, snap: dict[str, Any]) -> bool:
    """Every copy there, a regular file with its owner and mode (from the host read)."""
    login = desired.Login.of(cluster, snap)
    states = snap.get("paths") or {}
    for path, (user, group, mode) in wanted(cluster, login).items():
        state = states.get(path)
        if (
            state is None
            or state.kind != "file"
            or (state.user, state.group, state.mode) != (user, group, mode)
        ):
            return False
    return True


def script(cluster: Cluster, login: desired.Login) -> str:
    """POSIX sh, run by root on the login node: reuse the shared copy's key (a regular file, not a
    link), or make one from /dev/urandom; then write every copy by rename with its owner and mode."""
    files = wanted(cluster, login)
    shared = cluster.settings.replica_key_file
    lines = [
        "set -eu",
        "umask 077",
        f"shared={shlex.quote(shared)}",
        'key=""',
        'if [ -f "$shared" ] && [ ! -L "$shared" ]; then key=$(head -c 256 "$shared" | tr -dc "0-9a-f"); fi',
        f'if [ "${{#key}}" -lt {KEY_BYTES * 2} ]; then',
        f"    key=$(head -c {KEY_BYTES} /dev/urandom | od -An -vtx1 | tr -dc 0-9a-f)",
        "fi",
        f'if [ "${{#key}}" -lt {KEY_BYTES * 2} ]; then echo "replica key: could not read {KEY_BYTES} bytes from /dev/urandom" >&2; exit 1; fi',
    ]
    for path, (user, group, mode) in files.items():
        line = "replica $key" if path == map_path() else "$key"
        new = shlex.quote(path + ".nemotron-new")
        lines += [
            f"printf '%s\\n' \"{line}\" > {new}",
            f"chown {shlex.quote(user)}:{shlex.quote(group)} {new}",
            f"chmod {mode} {new}",
            f"mv -f {new} {shlex.quote(path)}",
        ]
    return "\n".join(lines)
