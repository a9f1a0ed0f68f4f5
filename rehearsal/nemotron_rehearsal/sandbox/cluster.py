"""Bringing the whole sandbox up and down, and reporting on it: the public Python API.

    up(nodes=2, gpus_per_node=8) -> Sandbox   idempotent: an already healthy sandbox of that size is
                                              returned as is; anything else (other size, a crashed
                                              leftover) is torn down first. docker=True (default:
                                              NEMOTRON_SANDBOX_RUNTIME=docker) also starts the
                                              compute nodes' Docker engines (docker.py)
    start_docker() -> dict, stop_docker()     the Docker engines alone, on a running sandbox
    down()                                    removes everything: processes, namespaces, links, files
    status() -> dict                          per node: address, init process, daemons, Slurm state
    current() -> Sandbox | None               the running sandbox, from the state file
plus the fault-injection helpers tests use: stop/start one node's sshd, power a node off and on.

`up` writes the state file before creating anything, and `down` also finds what a crashed run left
behind by name (nsb-* namespaces, the nsbr0 bridge, the state dir), so both are safe to repeat.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import (
    apptainer,
    docker,
    etc,
    gpus,
    layout,
    locks,
    munge,
    nemo,
    netns,
    packages,
    pyxis,
    registry,
    registry_tls,
    slurm,
    sshd,
)
from . import nodes as node_ops
from .layout import SHARED_DIR, STATE_DIR, STATE_FILE, Node, Sandbox, plan, read_state
from .proc import SandboxError, tail

Log = Callable[[str], None]

# Daemons (process names) each kind of node runs once up.
LOGIN_DAEMONS = ("sshd", "munged", "slurmctld", "docker-registry", "cron")
COMPUTE_DAEMONS = ("sshd", "slurmd")


def _quiet(_: str) -> None:
    pass


def _parallel(fn: Callable[[Node], object], items: list[Node] | tuple[Node, ...]) -> list:
    """Run `fn` for each node in threads (it mostly waits on subprocesses); re-raise the first error."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(items)))) as pool:
        return list(pool.map(fn, items))


def current() -> Sandbox | None:
    """The sandbox described by the state file, or None if there is none (it may not be running)."""
    return read_state()


def _save(sandbox: Sandbox) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(sandbox.to_json(), indent=1) + "\n")
    tmp.rename(STATE_FILE)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def node_processes(sandbox: Sandbox) -> dict[str, dict[str, int]]:
    """Node name -> {process name: count} of everything running in the node."""
    by_ns = netns.pids_by_netns([n.netns for n in sandbox.nodes])
    out = {}
    for n in sandbox.nodes:
        counts: dict[str, int] = {}
        for pid in by_ns[n.netns]:
            name = _comm(pid)
            counts[name] = counts.get(name, 0) + 1
        out[n.name] = counts
    return out


def _expected(node: Node) -> tuple[str, ...]:
    return LOGIN_DAEMONS if node.role == "login" else COMPUTE_DAEMONS


def _healthy(sandbox: Sandbox) -> bool:
    """Cheap check (no network traffic): every node's init and daemons are running."""
    if not netns.bridge_exists() or any(node_ops.init_pid(n) is None for n in sandbox.nodes):
        return False
    procs = node_processes(sandbox)
    return all(procs[n.name].get(d) for n in sandbox.nodes for d in _expected(n))


def _current(sandbox: Sandbox) -> bool:
    """Made by this version's `up`: a sandbox from before pyxis ran slurmd without it (rebuilt)."""
    return (node_ops.SLURM_DIR / "plugstack.conf").is_file()


# --- up ------------------------------------------------------------------------------------------


def _prepare_files(sandbox: Sandbox) -> None:
    """Everything written before any node starts: dirs, keys, configs, /etc overlays, fake GPUs."""
    for d in (STATE_DIR, SHARED_DIR, node_ops.HOME_DIR):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    node_ops.ensure_host_mountpoints()
    enroot = pyxis.find()
    for node in sandbox.nodes:
        node_ops.prepare_fs(node, extra_mounts=pyxis.mounts(enroot))
    etc.prepare(sandbox)
    sshd.prepare(sandbox)
    munge.prepare(sandbox.login)
    slurm.prepare(sandbox)
    pyxis.prepare(enroot)
    registry.prepare(sandbox)
    registry_tls.prepare(sandbox)
    for node in sandbox.compute:
        gpus.install(node, sandbox.gpus_per_node)
        nemo.install_emulator(node)
        pyxis.install_programs(node, enroot)
    nemo.install_model(sandbox)
    ensure_api_key()


def ensure_api_key() -> None:
    """The sandbox endpoint's keys file with one key, made once with the product's own `api-key new`
    code; the key itself only in REHEARSAL_KEY_FILE (root, 0600)."""
    from nemotron_deploy import api_keys

    layout.ENDPOINT_DIR.mkdir(mode=0o700, exist_ok=True)
    layout.ENDPOINT_DIR.chmod(0o700)
    if layout.REHEARSAL_KEY_FILE.exists() and layout.API_KEYS_FILE.exists():
        return
    layout.API_KEYS_FILE.unlink(missing_ok=True)
    key = api_keys.add(layout.API_KEYS_FILE, layout.REHEARSAL_KEY_NAME)
    fd = os.open(layout.REHEARSAL_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")


def _refresh_programs(sandbox: Sandbox) -> None:
    """Re-copy the NeMo emulator, the nvidia-smi stand-in and the podman setup if they changed since
    `up`, so a running sandbox serves the current code (all are read afresh at every start/call)."""
    for node in sandbox.compute:
        nemo.install_emulator(node, only_if_changed=True)
        gpus.install_stand_in(node, only_if_changed=True)
    registry.refresh_podman(sandbox)
    registry.refresh_image(sandbox)
    registry_tls.refresh(sandbox)
    etc.refresh(sandbox)  # the account's subordinate IDs and runtime dir (rootless podman)
    for node in sandbox.compute:
        node_ops.ensure_private_dev(node)
    apptainer.refresh(sandbox)
    if docker.wanted():
        for node in sandbox.compute:
            docker.install_hook(node)


def _start_login(sandbox: Sandbox) -> None:
    login = sandbox.login
    munge.start(login)
    slurm.start_controller(login)
    registry.start(login)
    registry_tls.start(login)
    sshd.start(login)
    node_ops.start_daemon(login, ["cron"], node_ops.host_path(login, "/var/log/cron.log"))


def _start_compute(node: Node) -> None:
    sshd.start(node)
    slurm.start_slurmd(node)


def docker_requested() -> bool:
    """NEMOTRON_SANDBOX_RUNTIME=docker: the runtime the sandbox inventory then deploys needs engines."""
    return os.environ.get("NEMOTRON_SANDBOX_RUNTIME") == "docker"


def up(nodes: int = 2, gpus_per_node: int = 8, *, log: Log = _quiet, docker: bool | None = None) -> Sandbox:
    """Bring the sandbox up with `nodes` compute nodes (see module docstring), and with `docker` (default:
    docker_requested()) the compute nodes' Docker engines. Needs root."""
    sandbox = _up(nodes, gpus_per_node, log)
    if docker if docker is not None else docker_requested():
        start_docker(sandbox, log=log)
    return sandbox


def start_docker(sandbox: Sandbox | None = None, *, log: Log = _quiet) -> dict[str, float]:
    """Start the Docker engine of every compute node of the running sandbox (those not running yet);
    the seconds each took. The default runtime's path never starts them."""
    sandbox = sandbox or _require_up()
    return docker.start_engines(sandbox, log=log)


def stop_docker(sandbox: Sandbox | None = None) -> None:
    """Stop the compute nodes' Docker engines (their pulled images stay for the next start)."""
    docker.stop_engines(sandbox or _require_up())


def _up(nodes: int, gpus_per_node: int, log: Log) -> Sandbox:
    packages.check_host()
    wanted = plan(nodes, gpus_per_node)
    existing = current()
    if existing == wanted and _healthy(existing) and _current(existing):
        packages.ensure_packages(log=log)  # one dpkg-query; installs what a newer sandbox needs
        _refresh_programs(existing)
        ensure_api_key()
        log(f"sandbox already up: {len(existing.compute)} compute nodes, {existing.gpus_per_node} GPUs each")
        return existing
    with locks.exclusive_use("bring the sandbox up", on_wait=log):
        existing = current()  # someone else may have brought it up while we waited
        if existing == wanted and _healthy(existing) and _current(existing):
            return existing
        if existing is not None or netns.sandbox_netns() or netns.bridge_exists() or STATE_DIR.exists():
            why = " (different size)" if existing and existing != wanted else ""
            log(f"tearing down the previous sandbox{why}")
            down(log=log)
        return _create(wanted, log)


def _create(sandbox: Sandbox, log: Log) -> Sandbox:
    timings: dict[str, float] = {}
    t0 = last = time.monotonic()

    def mark(step: str) -> None:
        nonlocal last
        now = time.monotonic()
        timings[step] = round(now - last, 3)
        last = now

    installed = packages.ensure_packages(log=log)
    mark("packages")
    _save(sandbox)  # before creating anything: `down` can always find what to remove
    _prepare_files(sandbox)
    mark("files")
    netns.ensure_bridge()
    netns.create_nodes(list(sandbox.nodes))
    mark("network")
    _parallel(node_ops.start_init, sandbox.nodes)
    mark("namespaces")
    _start_login(sandbox)
    mark("login daemons")
    _parallel(_start_compute, sandbox.compute)
    apptainer.refresh(sandbox)
    mark("compute daemons")
    registry.push_image(sandbox)
    mark("image push")
    slurm.wait_nodes_idle(sandbox)
    munge.check(sandbox.compute[0])
    mark("slurm ready")
    timings["total"] = round(time.monotonic() - t0, 3)
    if installed:
        timings["installed_packages"] = len(installed)
    sandbox = Sandbox(
        login=sandbox.login, compute=sandbox.compute, gpus_per_node=sandbox.gpus_per_node, timings=timings
    )
    _save(sandbox)
    if not nemo.emulator_available():
        log(f"warning: {nemo.EMULATOR} is missing: compute nodes got a placeholder megatron_gpt_eval.py")
    log(
        f"sandbox up in {timings['total']:.1f}s: login {sandbox.login.name} {sandbox.login.address}, "
        f"{len(sandbox.compute)} compute nodes x {sandbox.gpus_per_node} GPUs, registry {sandbox.registry}"
    )
    return sandbox


# --- down ----------------------------------------------------------------------------------------


def _host_mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if target == str(path) or target.startswith(prefix):
            mounts.append(target)
    return mounts


def down(*, log: Log = _quiet) -> None:
    """Remove the sandbox completely; safe to run when it is half up, crashed, or not there at all."""
    packages.check_host()
    with locks.exclusive_use("take the sandbox down", on_wait=log):
        _remove(log)


def _remove(log: Log) -> None:
    t0 = time.monotonic()
    sandbox = current()
    names = set(netns.sandbox_netns())
    known = {n.netns: n for n in sandbox.nodes} if sandbox else {}
    names |= set(known)
    # A stale node without a state file still has its init in its namespace: killing every process
    # of the namespace gets it, and with it its whole PID namespace.
    stale = [Node(ns, "", "", ns, STATE_DIR / "nodes" / ns) for ns in names - set(known)]
    all_nodes = [*known.values(), *stale]
    if all_nodes:
        _parallel(node_ops.kill_node, all_nodes)
    netns.delete_netns(sorted(names))
    netns.delete_bridge()
    leftover = [m for m in _host_mounts_under(STATE_DIR) if m]
    if leftover:
        raise SandboxError(
            f"refusing to delete {STATE_DIR}: still mounted on the host: {leftover}; unmount them and rerun"
        )
    if STATE_DIR.exists():
        node_ops.remove_host_mountpoints()
        shutil.rmtree(STATE_DIR)
    log(f"sandbox down in {time.monotonic() - t0:.1f}s")


# --- status --------------------------------------------------------------------------------------


def status() -> dict:
    """A JSON-able report: is it up, and per node its address, init PID, daemons and Slurm state."""
    sandbox = current()
    if sandbox is None:
        return {"up": False, "state_dir": str(STATE_DIR), "leftovers": netns.sandbox_netns(), "nodes": []}
    procs = node_processes(sandbox)
    slurm_states: dict[str, str] = {}
    if node_ops.init_pid(sandbox.login) is not None:
        try:
            slurm_states = slurm.node_states(sandbox.login)
        except SandboxError:
            pass
    report_nodes = []
    engines = docker.wanted()
    for n in sandbox.nodes:
        expected = (*_expected(n), *(docker.DAEMONS if engines and n.role == "compute" else ()))
        daemons = {d: bool(procs[n.name].get(d)) for d in expected}
        report_nodes.append(
            {
                "name": n.name,
                "address": n.address,
                "role": n.role,
                "netns": n.netns,
                "init_pid": node_ops.init_pid(n),
                "daemons": daemons,
                "processes": sum(procs[n.name].values()),
                "slurm_state": slurm_states.get(n.name) if n.role == "compute" else None,
            }
        )
    healthy = _healthy(sandbox)
    return {
        "up": healthy,
        "state_dir": str(sandbox.state_dir),
        "gpus_per_node": sandbox.gpus_per_node,
        "login": sandbox.login.name,
        "compute": sandbox.compute_names,
        "ssh_key": str(sandbox.ssh_key),
        "known_hosts": str(sandbox.known_hosts),
        "shared_dir": str(sandbox.shared_dir),
        "registry": sandbox.registry,
        "registry_tls": registry_tls.TLS_REGISTRY,
        "image": sandbox.image,
        "registry_access_log": str(sandbox.registry_access_log),
        "emulator_installed": nemo.emulator_available(),
        "timings": sandbox.timings,
        "docker_engines": engines,
        "nodes": report_nodes,
    }


# --- fault injection -----------------------------------------------------------------------------


def _require_up() -> Sandbox:
    sandbox = current()
    if sandbox is None:
        raise SandboxError("the sandbox is not up: run `nemotron-deploy sandbox up`")
    return sandbox


def _require(name: str) -> tuple[Sandbox, Node]:
    sandbox = _require_up()
    return sandbox, sandbox.node(name)


def stop_node_sshd(name: str) -> None:
    """Stop sshd on one node (open sessions survive, new connections are refused)."""
    sshd.stop(_require(name)[1])


def start_node_sshd(name: str) -> None:
    sshd.start(_require(name)[1])


def node_down(name: str) -> None:
    """Power a node off: every process of it dies and its cable is unplugged (connections time out,
    as with a dead host). Slurm notices after SlurmdTimeout (30 s)."""
    _, node = _require(name)
    node_ops.kill_node(node)
    netns.set_link(node, up=False)


def node_up(name: str, timeout: float = 30) -> None:
    """Power a node back on: fresh /run, its daemons restarted; for a compute node, wait until Slurm
    has it idle again."""
    sandbox, node = _require(name)
    if node_ops.init_pid(node) is not None:
        return
    netns.set_link(node, up=True)
    run_dir = node_ops.host_path(node, "/run")
    # /run is a tmpfs on real machines: empty after a reboot (but for /run/user/<uid> of the
    # rootless podman's account, which a lingering user's logind makes again at boot)
    for entry in run_dir.iterdir():
        if entry.name not in ("munge", "lock", "sshd", "user"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    node_ops.start_init(node)
    if node.role == "login":
        _start_login(sandbox)
    else:
        _start_compute(node)
        if docker.wanted():
            docker.start(node, sandbox)
        slurm.wait_nodes_idle(sandbox, [node.name], timeout=timeout)


# The login node's cron, paused and resumed around work it must not race (the tests' jobs, the
# benchmark's samples), as shell commands: the tests reach the node over SSH, the benchmark with
# node_run. Pausing lets a check cron already started (run as the deploy's health user) finish,
# for up to 30 s, so none runs once it returns.
PAUSE_CRON = (
    "pkill -STOP -x cron; "
    "for _ in $(seq 150); do pgrep -u nemotron-health >/dev/null || break; sleep 0.2; done; true"
)
RESUME_CRON = "pkill -CONT -x cron; true"


def node_run(name: str, argv: list[str], **kwargs):
    """Run a command inside a node without SSH (as root, in all of its namespaces)."""
    return node_ops.run_in(_require(name)[1], argv, **kwargs)


def logs(name: str) -> str:
    """The tails of a node's logs, for error messages and debugging."""
    _, node = _require(name)
    return "\n".join(tail(p, 15) for p in sorted(node_ops.host_path(node, "/var/log").rglob("*.log")))


def set_gpu_faults(name: str, /, **faults) -> None:
    """Make one compute node's nvidia-smi report faults (see gpus.set_gpu_faults for the keywords).

    `name` is positional-only: the fault keyword `name=` (the GPU model nvidia-smi reports) is free."""
    gpus.set_gpu_faults(_require(name)[1], **faults)


def clear_gpu_faults(name: str) -> None:
    gpus.clear_gpu_faults(_require(name)[1])
