"""Docker engines on the compute nodes, for the `docker` runtime's path: Debian's docker.io (20.10).

One dockerd per compute node, in that node's namespaces, and only when asked (`start_engines`:
`nemotron-deploy sandbox up --docker`, `up` with NEMOTRON_SANDBOX_RUNTIME=docker, the docker tests):
the default pyxis path starts none and pays nothing. Once started, a node's engine is started again
when the node is powered back on (node_up), until `down`.

Per node, all of it private to the node:
 - data root /var/lib/docker: the node's own dir bound there at the engine's first start (the deploy
   measures a pull's progress in /var/lib/docker/tmp and checks free space on /var/lib/docker);
 - exec root /run/docker, pid file /run/docker.pid, socket /run/docker.sock (the client's default;
   /run is node-private); dockerd starts its own containerd under them (/run/docker/containerd,
   /var/lib/docker/containerd), as no /run/containerd/containerd.sock exists in the node;
 - /etc/docker/daemon.json in the node's /etc overlay: the sandbox registry as an insecure (plain
   HTTP) registry, no bridge, no iptables (the job's containers use the node's network), cgroupfs,
   and runc through runc-sandbox (runc_sandbox.py: this machine denies raising hard rlimits, which
   `--ulimit memlock=-1` asks). The deploy writes none of it: on a real cluster it never sees them.
 - the storage driver: overlay2, the first of STORAGE_DRIVERS that starts (the data root is on the
   host's disk through a bind mount, not on an overlay, so overlay2 works on an ext4/xfs host; a
   host whose disk refuses it gets fuse-overlayfs, then vfs). `driver(node)` says which.
 - the fake GPUs for `docker run --gpus=all`: nvidia_hook.py as /usr/local/bin/nvidia-container-
   runtime-hook, on dockerd's PATH when it starts, which is all Docker 20.10 needs to accept --gpus.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import signal
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from . import netns, nodes, packages
from .layout import STATE_DIR, Node, Sandbox
from .proc import SandboxError, kill_and_wait, tail, wait_until
from .registry import NODE_RUNC_SHIM, install_runc_shim

PACKAGES = {"docker.io": "one Docker engine per compute node, for the docker runtime's path (on demand)"}
WANTED = STATE_DIR / "docker-engines"  # marker: engines were started; node_up starts them again
LOCK = STATE_DIR / "docker.lock"
HOOK = Path(__file__).with_name("nvidia_hook.py")
NODE_HOOK = "/usr/local/bin/nvidia-container-runtime-hook"
NODE_DAEMON_JSON = "/etc/docker/daemon.json"
NODE_DATA_ROOT = "/var/lib/docker"
NODE_EXEC_ROOT = "/run/docker"
NODE_SOCKET = "/run/docker.sock"
NODE_PID_FILE = "/run/docker.pid"
NODE_LOG = "/var/log/dockerd.log"
DATA_ROOT_DIR = "var-lib-docker"  # under the node's local dir
DRIVER_FILE = "docker-storage-driver"  # under the node's local dir: the driver that worked
STORAGE_DRIVERS = ("overlay2", "fuse-overlayfs", "vfs")
DOCKERD = "/usr/sbin/dockerd"
DAEMONS = ("dockerd", "containerd")  # process names, in `status`
START_TIMEOUT = 60.0


def daemon_json(registry: str, driver: str) -> str:
    config = {
        "data-root": NODE_DATA_ROOT,
        "exec-root": NODE_EXEC_ROOT,
        "pidfile": NODE_PID_FILE,
        "hosts": [f"unix://{NODE_SOCKET}"],
        "storage-driver": driver,
        "insecure-registries": [registry],
        "bridge": "none",
        "iptables": False,
        "ip-forward": False,
        "ip-masq": False,
        "userland-proxy": False,
        "exec-opts": ["native.cgroupdriver=cgroupfs"],
        "default-runtime": "runc-sandbox",
        "runtimes": {"runc-sandbox": {"path": NODE_RUNC_SHIM}},
    }
    return json.dumps(config, indent=1) + "\n"


def install_hook(node: Node) -> None:
    """The GPU hook stand-in (read afresh at every container start: a changed one takes effect at once)."""
    nodes.install_file(node, NODE_HOOK, HOOK.read_bytes(), 0o755, only_if_changed=True)


def wanted() -> bool:
    return WANTED.exists()


@contextmanager
def _locked():
    """One caller at a time starts engines (two would race for a node's pid file)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _ping(node: Node) -> bool:
    """GET /_ping on the node's engine socket, reached through its host path (no netns needed)."""
    path = nodes.host_path(node, NODE_SOCKET)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(str(path))
        conn = http.client.HTTPConnection("localhost")
        conn.sock = sock
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        sock.close()


def _dockerd_pids(node: Node) -> list[int]:
    found = []
    for pid in netns.pids_in(node.netns):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd":
                found.append(pid)
        except OSError:
            pass
    return found


def _starting(node: Node) -> bool:
    """A process of the node on its way to be dockerd or being it: `setsid -f` forks before it execs,
    so for a moment the new process is still called setsid (its command line names dockerd)."""
    for pid in netns.pids_in(node.netns):
        try:
            if DOCKERD.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def running(node: Node) -> bool:
    return bool(_dockerd_pids(node)) and _ping(node)


def driver(node: Node) -> str | None:
    """The storage driver the node's engine started with (None before its first start)."""
    f = node.local_dir / DRIVER_FILE
    return f.read_text().strip() if f.is_file() else None


def _bind_data_root(node: Node) -> None:
    """The node's own dir at /var/lib/docker inside it (never the host's /var/lib/docker)."""
    source = node.local_dir / DATA_ROOT_DIR
    source.mkdir(mode=0o710, exist_ok=True)
    nodes.ensure_host_mountpoint(NODE_DATA_ROOT)
    script = 'mountpoint -q "$1" || mount --bind "$2" "$1"'
    nodes.run_in(
        node, ["sh", "-c", script, "sh", NODE_DATA_ROOT, str(source)], what="binding /var/lib/docker"
    )
    # Inside the node, the mount's source shows as the host path.
    found = nodes.run_in(node, ["findmnt", "-n", "-o", "SOURCE", NODE_DATA_ROOT], check=False).stdout
    if str(source) not in found:
        raise SandboxError(f"{node.name}: {NODE_DATA_ROOT} is not the node's own dir ({found.strip()!r})")


def _write_node_file(node: Node, path: str, text: str) -> None:
    """Write a file of the node's /etc (a mounted overlay: written from inside the node)."""
    if nodes.run_in(node, ["cat", path], check=False).stdout == text:
        return
    write = 'mkdir -p "${1%/*}" && cat > "$1.tmp" && mv "$1.tmp" "$1"'
    nodes.run_in(node, ["sh", "-c", write, "sh", path], input=text, what=f"writing {path}")


def _try_start(node: Node, sandbox: Sandbox, drv: str) -> str | None:
    """Start dockerd with storage driver `drv`; None once it answers, else why it did not."""
    _write_node_file(node, NODE_DAEMON_JSON, daemon_json(sandbox.registry, drv))
    log = nodes.host_path(node, NODE_LOG)
    mark = log.stat().st_size if log.exists() else 0
    # Its log through a pipe, as systemd's journal takes it on a real node: a pull's watcher counts
    # dockerd's disk writes as progress, and its own log lines written to a file would be some.
    nodes.start_daemon(node, ["sh", "-c", f"{DOCKERD} 2>&1 | cat"], log, foreground=True)

    def settled() -> str | bool:
        if _ping(node):
            return "up"
        return "died" if not _starting(node) else False

    try:
        outcome = wait_until(
            settled, timeout=START_TIMEOUT, what=f"dockerd on {node.name}", hint=lambda: tail(log)
        )
    except SandboxError as exc:
        stop(node)  # one that never answered: out of the way of the next attempt
        return str(exc)
    if outcome == "up":
        return None
    with open(log, errors="replace") as f:
        f.seek(mark)
        return f.read()[-2000:]


def start(node: Node, sandbox: Sandbox) -> float:
    """Start the node's engine unless it runs; the seconds it took (0 if it was running)."""
    if running(node):
        return 0.0
    t0 = time.monotonic()
    if _dockerd_pids(node):  # a dockerd that does not answer (still starting, or stuck): wait for it
        try:
            wait_until(lambda: _ping(node), timeout=START_TIMEOUT, what=f"dockerd on {node.name} to answer")
            return time.monotonic() - t0
        except SandboxError:
            raise SandboxError(
                f"dockerd runs on {node.name} but does not answer on {NODE_SOCKET}\n"
                f"{tail(nodes.host_path(node, NODE_LOG))}"
            ) from None
    install_hook(node)
    install_runc_shim(node, only_if_changed=True)
    _bind_data_root(node)
    known = driver(node)
    errors = []
    for drv in (known,) if known else STORAGE_DRIVERS:
        why = _try_start(node, sandbox, drv)
        if why is None:
            (node.local_dir / DRIVER_FILE).write_text(drv + "\n")
            return time.monotonic() - t0
        errors.append(f"--- storage driver {drv}:\n{why}")
    raise SandboxError(f"dockerd did not start on {node.name}:\n" + "\n".join(errors))


def start_engines(sandbox: Sandbox, *, log: Callable[[str], None] = lambda _: None) -> dict[str, float]:
    """Start the Docker engine of every compute node that has none running (in parallel); return the
    seconds each took. Installs docker.io first if missing. Needs root."""
    from .cluster import _parallel

    packages.ensure_packages(log=log, required=PACKAGES)
    with _locked():
        WANTED.touch()
        took = _parallel(lambda n: start(n, sandbox), sandbox.compute)
    timings = {n.name: round(t, 3) for n, t in zip(sandbox.compute, took, strict=True)}
    if any(timings.values()):
        log(f"docker engines up ({driver(sandbox.compute[0])}): {timings}")
    return timings


def stop(node: Node, timeout: float = 30) -> None:
    """Stop the node's engine: dockerd stops its containers and its containerd on SIGTERM. Its data
    root (the images pulled) stays for the next start."""
    pids = _dockerd_pids(node)
    if pids:
        kill_and_wait(pids, timeout=timeout, sig=signal.SIGTERM)
    # What dockerd leaves mounted: its handle of the node's network namespace (host networking).
    handle = f"{NODE_EXEC_ROOT}/netns/default"
    nodes.run_in(node, ["sh", "-c", 'if mountpoint -q "$1"; then umount "$1"; fi', "sh", handle], check=False)


def stop_engines(sandbox: Sandbox) -> None:
    """Stop every compute node's engine; node_up no longer starts them."""
    from .cluster import _parallel

    with _locked():
        WANTED.unlink(missing_ok=True)
        _parallel(stop, sandbox.compute)
