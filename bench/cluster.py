"""The sandbox as the benchmarks use it: its size, a reset to "never deployed", image removal, and
the pyinfra deploy as a timed subprocess.

Why one sandbox of the largest size for every node count: the inventory lists the sandbox's nodes, and
the bench-only ``NEMOTRON_BENCH_NODES`` makes it list the first N compute nodes only, so the runs for 2, 4, 8 and 16 nodes can be interleaved without
tearing the cluster down between them (``sandbox.up`` with another size means down + up). The nodes
a run doesn't list sit idle: an sshd and a slurmd waiting on a socket.

Resets and image removals run inside the nodes with ``sandbox.node_run`` (namespaces, no SSH), so
they neither add SSH sessions to what is counted nor depend on the code under test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from . import common

INVENTORY = "inventories/sandbox.py"
DEPLOY = "deploys/nemotron.py"
NODE_DIR = "/opt/nemotron-deploy"  # node_dir (compute) and the health venv's parent (login)
CRON_FILE = "/etc/cron.d/nemotron-health"
DEPLOY_TIMEOUT = 600


def sandbox_api():
    from nemotron_rehearsal import sandbox

    return sandbox


def node_count() -> int | None:
    """Compute nodes of the running sandbox, or None when it isn't up."""
    sb = sandbox_api()
    current = sb.current()
    if current is None or not sb.status().get("up"):
        return None
    return len(current.compute)


def ensure_nodes(nodes: int, log=print):
    """A running sandbox with at least ``nodes`` compute nodes; (sandbox, node count found before)."""
    sb = sandbox_api()
    before = node_count()
    if before is not None and before >= nodes:
        return sb.current(), before
    log(f"sandbox: bringing it up with {nodes} compute nodes (it had {before or 'none'})")
    return sb.up(nodes=nodes, log=lambda m: log(f"sandbox: {m}")), before


def restore(before: int | None, log=print) -> None:
    """Put the sandbox back to the size it had before the benchmark (down if it wasn't up)."""
    sb = sandbox_api()
    now = node_count()
    if now == before:
        return
    if before is None:
        log("sandbox: taking it down again (it wasn't up before the benchmark)")
        sb.down(log=lambda m: log(f"sandbox: {m}"))
    else:
        log(f"sandbox: restoring {before} compute nodes")
        sb.up(nodes=before, log=lambda m: log(f"sandbox: {m}"))


@contextmanager
def sandbox_lock(mode: str, log=print) -> Iterator[None]:
    """Hold the sandbox lock exclusively while deploys are measured (``mode`` "none": the caller does).

    Test sessions hold it shared; waiting for exclusive use means no test runs, resets or deploys
    while the benchmark does, and ``up``/``down`` inside (a resize, the restore) are re-entrant.
    """
    if mode == "none":
        yield
        return
    with sandbox_api().exclusive_use("benchmark deploys (they reset the deploy)", on_wait=log):
        yield


@contextmanager
def cron_paused(sandbox) -> Iterator[None]:
    """The login node's cron stopped (SIGSTOP), after any check it started has finished (bounded).

    Once a deploy installed it, the scheduled check runs every minute (~0.4 s of CPU at 32
    replicas): whichever sample it lands in, deploy or floor, it would measure the check.
    """
    sb = sandbox_api()
    login = sandbox.login.name
    sb.node_run(login, ["sh", "-c", sb.PAUSE_CRON], timeout=60)
    try:
        yield
    finally:
        sb.node_run(login, ["sh", "-c", sb.RESUME_CRON], timeout=60)


def _parallel(fn, items) -> list:
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(items)))) as pool:
        return list(pool.map(fn, items))


def reset(sandbox, nodes: int, settings) -> None:
    """Compute nodes 1..N and the login node as never deployed (nemotron_rehearsal.sandbox.reset, the
    tests' definition too), after cancelling the deploy's Slurm jobs, whose logs live in the shared
    dir. It stops HAProxy and removes its config: otherwise a first deploy after one of the same size
    found HAProxy running with the same config and skipped starting it (0.6 s at 64 nodes), so the
    first deploy's time hung on the order of sizes. The images stay: first deploys are measured with
    the image there (the registry part measures the fetch on its own).
    """
    from nemotron_rehearsal.sandbox import reset as never_deployed

    sb = sandbox_api()
    login_script = f"scancel --name {settings.job_name} 2>/dev/null; " + never_deployed.login_script(settings)
    jobs = [(sandbox.login.name, ["sh", "-c", login_script])]
    jobs += [(n.name, never_deployed.compute_command(settings)) for n in sandbox.compute[:nodes]]
    _parallel(lambda job: sb.node_run(job[0], job[1], timeout=60), jobs)


def remove_images(sandbox, nodes: int, settings) -> None:
    """Make the next deploy fetch the image again: ``podman rmi`` or ``docker rmi`` it on compute nodes
    1..N (per-node pulls), or remove the file pyxis/apptainer imported once into shared storage."""
    sb = sandbox_api()
    if settings.image_file:
        sb.node_run(sandbox.compute[0].name, ["rm", "-f", settings.image_file], timeout=60)
        return

    from nemotron_deploy.deploy import rootless

    tool = settings.pull_runtime or settings.container_runtime
    account = rootless.account(settings)

    def rmi(node) -> None:
        if tool == "docker":  # (no --ignore: an absent image is an error it says, and nothing else)
            sb.node_run(node.name, ["docker", "rmi", "--force", settings.image], timeout=120, check=False)
            if (
                sb.node_run(node.name, ["docker", "image", "inspect", settings.image], check=False).returncode
                == 0
            ):
                raise RuntimeError(f"docker rmi left {settings.image} on {node.name}")
        elif account:  # the podman runtime pulls into service_user's own (rootless) storage
            rmi = rootless.as_account(account, f"podman rmi --force --ignore {shlex.quote(settings.image)}")
            sb.node_run(node.name, ["sh", "-c", rmi], timeout=120)
        else:
            sb.node_run(node.name, ["podman", "rmi", "--force", "--ignore", settings.image], timeout=120)

    _parallel(rmi, list(sandbox.compute[:nodes]))


@contextmanager
def engines(sandbox, runtime: str, log=print) -> Iterator[None]:
    """For the docker runtime: the compute nodes' Docker engines, started for the block and stopped
    after it unless they were running before (the sandbox starts none by itself)."""
    if runtime != "docker":
        yield
        return
    from nemotron_rehearsal.sandbox import docker

    sb = sandbox_api()
    before = docker.wanted() and all(docker.running(n) for n in sandbox.compute)
    took = sb.start_docker(sandbox, log=log)
    log(
        f"docker engines: started in {max(took.values()):.2f}s (slowest node)"
        if any(took.values())
        else "docker engines: running"
    )
    try:
        yield
    finally:
        if not before:
            sb.stop_docker(sandbox)


def runtimes(sandbox) -> list[str]:
    """Container tools installed on the first compute node (which ones the sandbox can run)."""
    sb = sandbox_api()
    script = (
        "for t in podman docker apptainer singularity enroot; do command -v $t >/dev/null && echo $t; done"
    )
    res = sb.node_run(sandbox.compute[0].name, ["sh", "-c", script], check=False, timeout=30)
    return res.stdout.split()


@dataclass
class DeployRun:
    """One ``pyinfra`` run: wall time, exit code, changed/no-change counts, its output, and the peak
    resident memory of the pyinfra process (``wait4``'s ru_maxrss: it connects with paramiko, in
    process, so this is the whole deploy's memory on the deploying machine)."""

    nodes: int
    wall: float
    returncode: int
    output: str
    changed: int | None = None
    no_change: int | None = None
    errors: int | None = None
    peak_rss: int = 0  # bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.errors


def _count(cell: str) -> int:
    return 0 if cell == "-" else int(cell)


def parse_totals(output: str) -> tuple[int | None, int | None, int | None]:
    """(success i.e. changed, error, no change) from pyinfra's "Grand total" results line."""
    m = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output)
    if not m:
        return None, None, None
    return _count(m.group(2)), _count(m.group(3)), _count(m.group(4))


def op_changed(output: str, operation: str) -> int | None:
    """Hosts on which the operation whose name starts with ``operation`` changed something."""
    m = re.search(rf"^\s*{re.escape(operation)}.*?\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", output, re.MULTILINE)
    return _count(m.group(2)) if m else None


def pyinfra() -> str:
    path = common.REPO / ".venv" / "bin" / "pyinfra"
    return str(path) if path.exists() else "pyinfra"


def deploy(nodes: int, *extra: str, runtime: str | None = None) -> DeployRun:
    """``pyinfra -y inventories/sandbox.py deploys/nemotron.py`` for the first ``nodes`` nodes, timed
    (``runtime``: the sandbox's NEMOTRON_SANDBOX_RUNTIME, default its inventory's, pyxis)."""
    argv = [pyinfra(), "-y", INVENTORY, DEPLOY, *extra]
    env = common.child_env(
        private_pycache=False,
        NEMOTRON_BENCH_NODES=str(nodes),
        **({"NEMOTRON_SANDBOX_RUNTIME": runtime} if runtime else {}),
    )
    with tempfile.TemporaryFile(mode="w+") as out:  # a file, not a pipe: nothing to drain while waiting
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=common.REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        returncode, rss = _wait(proc, DEPLOY_TIMEOUT)
        wall = time.perf_counter() - t0
        out.seek(0)
        output = out.read()
    changed, errors, no_change = parse_totals(output)
    return DeployRun(nodes, wall, returncode, output, changed, no_change, errors, peak_rss=rss)


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of a child, from wait4 (ru_maxrss is in KiB on Linux)."""
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if expired.is_set():
        raise subprocess.TimeoutExpired(proc.args, timeout)
    return proc.returncode, usage.ru_maxrss * 1024


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def load_cluster(runtime: str | None = None):
    """The validated sandbox inventory, as the deploy sees it (paths don't depend on the node count)."""
    from nemotron_deploy.inventory import load

    previous = os.environ.get("NEMOTRON_SANDBOX_RUNTIME")
    if runtime:
        os.environ["NEMOTRON_SANDBOX_RUNTIME"] = runtime
    try:
        return load(str(common.REPO / INVENTORY))
    finally:
        if runtime:
            os.environ.pop("NEMOTRON_SANDBOX_RUNTIME")
            if previous is not None:
                os.environ["NEMOTRON_SANDBOX_RUNTIME"] = previous
