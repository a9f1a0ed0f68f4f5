"""A node = a network namespace + an init process holding private UTS, mount and PID namespaces.

What is private to each node (and why), as seen from inside it:
 - /etc: an overlay of the host's /etc. Reads see the host's files, every write (a deploy's
   /etc/cron.d job, /etc/systemd/system unit, the node's sshd_config, /etc/hosts, the `nemotron`
   user in /etc/passwd) lands in the node's upper dir and never on the host.
 - /run, /opt, /tmp, /var/tmp, /var/log, /var/spool, /var/lib/containers, /root, /usr/local/bin:
   empty per-node directories bound over the host's, so each node has its own daemons' sockets and
   pid files, its own /opt/NeMo, podman storage, Slurm spool, logs, and `nvidia-smi` only where it
   is installed (compute nodes).
 - /usr: the host's, read-only, so a deploy can't change the host's software by accident.
 - /dev (compute nodes): a tmpfs of the node's own with the host's entries bound in, plus what a GPU
   node has and the host lacks: /dev/nvidia*, /dev/mqueue (see nodeinit.private_dev).
Shared by all nodes like on a real cluster: /home (the sandbox's, not the host's), the shared dir
(/var/lib/nemotron-sandbox/shared, same path everywhere), /etc/slurm (read-only, the sandbox's
generated config) and /run/munge (the one munged's socket).
Everything else (/work, /var/lib, /srv...) is the host's: deploys should not write there.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from . import netns
from .layout import NODE_DEV_DIR, STATE_DIR, Node
from .proc import SandboxError, kill_and_wait, pid_alive, read_pid, run, tail, wait_until

NODEINIT = Path(__file__).with_name("nodeinit.py")
DEV_MARK = ".nemotron-sandbox-node"  # nodeinit.DEV_MARK (nodeinit.py runs alone, imports nothing of ours)
SYSTEM_PYTHON = "/usr/bin/python3"
HOME_DIR = STATE_DIR / "home"  # /home on every node
MUNGE_RUN_DIR = STATE_DIR / "munge" / "run"  # /run/munge on every node
SLURM_DIR = STATE_DIR / "slurm"  # /etc/slurm on every node (read-only)
HOST_DIRS_FILE = STATE_DIR / "host-dirs-created.json"

# Node path -> subdirectory of the node's local dir bound over it (order matters: parents first).
PRIVATE_DIRS: dict[str, str] = {
    "/run": "run",
    "/opt": "opt",
    "/tmp": "tmp",
    "/var/tmp": "var-tmp",
    "/var/log": "var-log",
    "/var/spool": "var-spool",
    "/var/lib/containers": "var-lib-containers",
    # Where the deploy's health check keeps state and writes node_exporter metrics (login node).
    "/var/lib/nemotron-health": "var-lib-nemotron-health",
    "/var/lib/prometheus": "var-lib-prometheus",
    "/root": "root",
}
STICKY_DIRS = {"/tmp", "/var/tmp"}
NODE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


def etc_upper(node: Node) -> Path:
    return node.local_dir / "etc"


def host_path(node: Node, path: str) -> Path:
    """Where the node-private file `path` (as seen in the node) lives on the host.

    Only valid for paths under a private dir or under /etc (the overlay's upper dir, which must only
    be written before the node starts).
    """
    if path == "/usr/local/bin" or path.startswith("/usr/local/bin/"):
        return node.local_dir / "usr-local-bin" / path.removeprefix("/usr/local/bin").lstrip("/")
    for prefix, sub in sorted(PRIVATE_DIRS.items(), key=lambda kv: -len(kv[0])):
        if path == prefix or path.startswith(prefix + "/"):
            return node.local_dir / sub / path.removeprefix(prefix).lstrip("/")
    if path.startswith("/etc/"):
        return etc_upper(node) / path.removeprefix("/etc/")
    raise ValueError(f"{path} is not node-private")


def install_file(
    node: Node, path: str, content: bytes, mode: int = 0o644, *, only_if_changed: bool = False
) -> bool:
    """Put a file at `path` inside the node, atomically (a program starting meanwhile sees the old or
    the new file, never half of one); with only_if_changed, leave an identical file alone. True when
    it wrote the file."""
    target = host_path(node, path)
    if only_if_changed and target.is_file() and target.read_bytes() == content:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(content)
    tmp.chmod(mode)
    tmp.rename(target)
    return True


def ensure_host_mountpoints() -> None:
    """Create the host directories the nodes bind over if the host lacks them (recorded for `down`)."""
    created = []
    for path in PRIVATE_DIRS:
        if not Path(path).exists():
            Path(path).mkdir(parents=True)
            created.append(path)
    if created:
        previous = json.loads(HOST_DIRS_FILE.read_text()) if HOST_DIRS_FILE.exists() else []
        HOST_DIRS_FILE.write_text(json.dumps(sorted(set(previous) | set(created))))


_HOST_DIRS_LOCK = threading.Lock()


def ensure_host_mountpoint(path: str) -> None:
    """A directory the nodes bind over later (e.g. docker's data root), created if the host lacks it
    and recorded for `down` like the PRIVATE_DIRS. Nodes start their engines in parallel threads:
    one creates and records it, the others find it."""
    with _HOST_DIRS_LOCK:
        try:
            Path(path).mkdir(parents=True)
        except FileExistsError:
            return
        previous = json.loads(HOST_DIRS_FILE.read_text()) if HOST_DIRS_FILE.exists() else []
        HOST_DIRS_FILE.write_text(json.dumps(sorted({*previous, path})))


def remove_host_mountpoints() -> None:
    """Remove the (empty) host directories `ensure_host_mountpoints` created."""
    if not HOST_DIRS_FILE.exists():
        return
    for path in sorted(json.loads(HOST_DIRS_FILE.read_text()), key=len, reverse=True):
        try:
            Path(path).rmdir()
        except OSError:
            pass  # not empty (something else uses it now) or already gone: leave it
    HOST_DIRS_FILE.unlink()


def prepare_fs(node: Node, extra_mounts: Sequence[dict] = ()) -> None:
    """Create the node's private directories (empty, with the host's modes) and its init spec
    (`extra_mounts`: more nodeinit.py mount entries, applied last)."""
    local = node.local_dir
    for path, sub in PRIVATE_DIRS.items():
        d = local / sub
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o1777 if path in STICKY_DIRS else 0o700 if path == "/root" else 0o755)
    for sub in ("etc", "etc-work", "usr-local-bin", "run/munge", "etc/slurm"):
        (local / sub).mkdir(parents=True, exist_ok=True)
    (local / "run" / "lock").mkdir(mode=0o1777, exist_ok=True)
    for name in (".bashrc", ".profile"):
        skel = Path("/etc/skel") / name
        if skel.exists():
            shutil.copy2(skel, local / "root" / name)
    (etc_upper(node) / "hostname").write_text(node.name + "\n")
    mounts: list[dict] = [
        {"kind": "proc", "target": "/proc"},
        {"kind": "overlay", "target": "/etc", "upper": str(local / "etc"), "work": str(local / "etc-work")},
        *({"kind": "bind", "source": str(local / sub), "target": path} for path, sub in PRIVATE_DIRS.items()),
        {"kind": "bind", "source": str(MUNGE_RUN_DIR), "target": "/run/munge"},
        {"kind": "bind", "source": str(HOME_DIR), "target": "/home"},
        {"kind": "bind", "source": str(SLURM_DIR), "target": "/etc/slurm", "readonly": True},
        {"kind": "bind", "source": "/usr", "target": "/usr", "readonly": True},
        {"kind": "bind", "source": str(local / "usr-local-bin"), "target": "/usr/local/bin"},
        *extra_mounts,
    ]
    if node.role == "compute":  # last: the fake devices it binds are in the node's /opt
        mounts.append(private_dev_mount(node))
    spec = {"hostname": node.name, "pid_file": str(local / "init.pid"), "mounts": mounts}
    (local / "init.json").write_text(json.dumps(spec, indent=1))


def private_dev_mount(node: Node) -> dict:
    """nodeinit.py's entry for a compute node's own /dev (see nodeinit.private_dev)."""
    return {
        "kind": "dev",
        "target": "/dev",
        "stage": str(node.local_dir / "dev-stage"),
        "devices": NODE_DEV_DIR,
    }


def ensure_private_dev(node: Node) -> None:
    """A running compute node that an older `up` started with the host's /dev gets its own, now and
    at its next start (its init spec)."""
    entry = private_dev_mount(node)
    spec_path = node.local_dir / "init.json"
    spec = json.loads(spec_path.read_text())
    if not any(m["kind"] == "dev" for m in spec["mounts"]):
        spec["mounts"].append(entry)
        spec_path.write_text(json.dumps(spec, indent=1))
    if run_in(node, ["test", "-e", f"/dev/{DEV_MARK}"], check=False).returncode != 0:
        run_in(
            node, [SYSTEM_PYTHON, str(NODEINIT), "--dev", json.dumps(entry)], what=f"{node.name}'s own /dev"
        )


def init_pid(node: Node) -> int | None:
    """The host PID of the node's init process, or None if it isn't running.

    The pid file alone could be stale after a crash (PID reused), so the process must also be
    nodeinit.py running this node's spec.
    """
    pid = read_pid(node.local_dir / "init.pid")
    if pid is None or not pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if str(node.local_dir / "init.json").encode() in cmdline else None


def start_init(node: Node, timeout: float = 15) -> int:
    """Start the node's init process (see nodeinit.py) and wait until its namespaces are ready."""
    pid_file = node.local_dir / "init.pid"
    pid_file.unlink(missing_ok=True)
    log = node.local_dir / "init.log"
    argv = [
        "setsid", "-f",
        "nsenter", f"--net=/run/netns/{node.netns}",
        "unshare", "--uts", "--mount", "--pid", "--fork", "--propagation", "private",
        SYSTEM_PYTHON, str(NODEINIT), str(node.local_dir / "init.json"),
    ]  # fmt: skip
    with open(log, "a") as out:
        result = run_detached(argv, out)
    if result != 0:
        raise SandboxError(f"could not start the init process of {node.name} (exit {result})\n{tail(log)}")
    return wait_until(
        lambda: init_pid(node),
        timeout=timeout,
        what=f"{node.name}'s init process to set up its namespaces",
        hint=lambda: tail(log),
    )


def run_detached(argv: Sequence[str], out: IO, err: IO | None = None) -> int:
    """Run a command whose real work goes on in the background (it forks); return its exit code."""
    return subprocess.run(
        list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err or out, env=NODE_ENV, timeout=30
    ).returncode


def enter_argv(node: Node, argv: Sequence[str]) -> list[str]:
    """`argv` run inside the node: its network, hostname, mounts and PID namespace."""
    pid = init_pid(node)
    if pid is None:
        raise SandboxError(
            f"node {node.name} is not running (no init process); run `nemotron-deploy sandbox up`"
        )
    return ["nsenter", f"--target={pid}", "--mount", "--uts", "--net", "--pid", "--", *argv]


def run_in(node: Node, argv: Sequence[str], **kwargs):
    """Run a command inside the node and capture its output (see proc.run)."""
    kwargs.setdefault("env", NODE_ENV)
    kwargs.setdefault("what", f"{argv[0]} on {node.name}")
    return run(enter_argv(node, argv), **kwargs)


def start_daemon(
    node: Node, argv: Sequence[str], log: Path, *, foreground: bool = False, stdout: Path | None = None
) -> None:
    """Start a daemon inside the node. It ends up a child of the node's init, which reaps it.

    Daemons that fork by themselves (sshd, slurmd, munged) are run as is; `foreground` ones
    (docker-registry) are detached with `setsid -f`. Their stderr goes to `log` (a host path), their
    stdout too unless `stdout` names another file.
    """
    command = ["setsid", "-f", *argv] if foreground else list(argv)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as err, open(stdout or log, "a") as out:
        code = run_detached(enter_argv(node, command), out, err)
    if code != 0:
        raise SandboxError(f"{argv[0]} failed to start on {node.name} (exit {code})\n{tail(log)}")


def host_pid(node: Node, pid_in_node: int) -> int | None:
    """Translate a PID as seen inside the node (e.g. from its /run/sshd.pid) to the host's PID."""
    for pid in netns.pids_in(node.netns):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspids = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if len(nspids) > 1 and int(nspids[-1]) == pid_in_node:
            return pid
    return None


def daemon_pid(node: Node, pid_file: str) -> int | None:
    """Host PID of the live daemon whose pid file (written inside the node) is `pid_file`."""
    pid = read_pid(host_path(node, pid_file))
    host = host_pid(node, pid) if pid is not None else None
    return host if host is not None and pid_alive(host) else None


def kill_node(node: Node, timeout: float = 15) -> None:
    """Kill everything of the node: its init (the kernel then kills its whole PID namespace), and any
    other process still in its network namespace (e.g. the `unshare` parent, stale leftovers)."""
    pid = init_pid(node)
    if pid is not None:
        kill_and_wait([pid], timeout=timeout)
    stragglers = netns.pids_in(node.netns)
    if stragglers:
        kill_and_wait(stragglers, timeout=timeout, sig=signal.SIGKILL)
    wait_until(
        lambda: not netns.pids_in(node.netns),
        timeout=timeout,
        what=f"every process of {node.name} to exit",
    )
