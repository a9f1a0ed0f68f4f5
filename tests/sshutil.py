"""Helpers for the deploy and end-to-end tests against the sandbox cluster (tests/sandbox/test_deploy.py,
tests/test_e2e.py): run pyinfra as an operator does, run commands on the nodes over real SSH, reset
what a deploy placed, and cancel the jobs a test submitted.

Paths here are the sandbox inventory's (inventories/group_data/sandbox.py): the shared dir has the
same path on the host and every node; /opt is private to each node, so it is read over SSH.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
INVENTORY = "inventories/sandbox.py"
DEPLOY = "deploys/nemotron.py"

SHARED = "/var/lib/nemotron-sandbox/shared"
DEPLOY_SHARED = f"{SHARED}/nemotron-deploy"
JOBS_DIR = f"{DEPLOY_SHARED}/jobs"
LOGS_DIR = f"{DEPLOY_SHARED}/logs"
RECORDS_DIR = f"{DEPLOY_SHARED}/records"  # the job records: the submitting account's alone
SBATCH = f"{JOBS_DIR}/nemotron.sbatch"
NODE_DIR = "/opt/nemotron-deploy"
SCRIPTS_DIR = f"{NODE_DIR}/scripts"
COMPUTE_SCRIPTS = ("call_server.py", "nemo_inference.sh", "nemo_launch.py", "nemotron_health.pyz")
COMPUTE_CONFIGS = ("nemotron_openai.json",)  # the replica front's OpenAI translation config (0644)
HEALTH_VENV = f"{NODE_DIR}/health-venv"
# The account the replicas' jobs run as (service_user's default; the sandbox has it on every node):
# a test that submits a replica by hand submits as it, as the deploy does.
SERVICE_USER = "nemotron"
AS_SERVICE_USER = f"runuser -u {SERVICE_USER} --"
HEALTH_USER = "nemotron-health"
HEALTH_STATE_DIR = "/var/lib/nemotron-health"
HEALTH_METRICS_DIR = "/var/lib/nemotron-health-metrics"
DEPLOY_STATE_DIR = "/var/lib/nemotron-deploy"  # root's: the started file, the check's lock
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
CRON_FILE = "/etc/cron.d/nemotron-health"
IMAGE = "10.213.0.2:5000/nvidia/nemo:24.01.framework"  # podman's form
PYXIS_IMAGE = "10.213.0.2:5000#nvidia/nemo:24.01.framework"
IMAGES_DIR = f"{DEPLOY_SHARED}/images"
IMAGE_FILE = f"{IMAGES_DIR}/10.213.0.2+5000+nvidia+nemo+24.01.framework.sqsh"  # pyxis imports it once
IMPORT_OP = f"Import {PYXIS_IMAGE} (pyxis)"
# The same images from the sandbox's TLS registry, verified with the sandbox CA the nodes trust: where a
# deploy may log in with the NGC key (inventories/group_data/sandbox.py, sandbox/registry_tls.py).
TLS = {"NEMOTRON_SANDBOX_REGISTRY": "tls"}
TLS_REGISTRY = "10.213.0.2:5443"
TLS_IMAGE = f"{TLS_REGISTRY}/nvidia/nemo:24.01.framework"
TLS_PYXIS_IMAGE = f"{TLS_REGISTRY}#nvidia/nemo:24.01.framework"
TLS_IMAGE_FILE = f"{IMAGES_DIR}/10.213.0.2+5443+nvidia+nemo+24.01.framework.sqsh"
# The sandbox's inventory runs pyxis unless told otherwise (inventories/group_data/sandbox.py).
PODMAN = {"NEMOTRON_SANDBOX_RUNTIME": "podman"}
JOB_BASE = "nemotron-340b"  # the job_name setting; replica i runs as <JOB_BASE>-r<i>
JOB_NAME = f"{JOB_BASE}-r1"
# Every replica the test sandbox (4 compute nodes, 2-node replicas) can hold, and then some.
REPLICA_JOBS = ",".join(f"{JOB_BASE}-r{i}" for i in range(1, 5))
PORT = 1424
PULL_OP = f"Pull {IMAGE} (podman)"
# Processes a job leaves behind if it is not stopped properly.
JOB_PROCESSES = ("megatron_gpt_eval.py", "nemo_inference.sh", "nemotron_health.pyz", "replica_front")

T = TypeVar("T")


def console_script(name: str) -> str:
    """An installed console script: beside the running Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"the {name} console script is not installed (pip install -e .)")
    return found


@dataclass
class Run:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return f"$ {shlex.join(self.argv)}\n(rc {self.rc} after {self.seconds:.1f}s)\n{self.output[-6000:]}"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any NGC key (a deploy must not log in by accident)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NGC_API_KEY",)}
    env.update(extra)
    return env


def pyinfra(
    *args: str,
    inventory: str | Path = INVENTORY,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    yes: bool = True,
    deploy: str = DEPLOY,
    cwd: str | Path = REPO,
) -> Run:
    """`pyinfra -y INVENTORY deploys/nemotron.py ARGS...` from the repository root (or `cwd`: another
    tree's, with its own inventories and deploy), output captured.

    `yes=False` leaves out -y: for --dry, which then runs pyinfra's change detection (with -y it is
    skipped and --json reports no hosts_with_change at all) and exits without prompting.
    """
    argv = [console_script("pyinfra"), *(["-y"] if yes else []), str(inventory), deploy, *args]
    t0 = time.monotonic()
    result = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or clean_env(),
        stdin=subprocess.DEVNULL,
    )
    return Run(argv, result.returncode, result.stdout, result.stderr, time.monotonic() - t0)


def dry_plan(*args: str, **kwargs: Any) -> dict[str, list[str]]:
    """`pyinfra --dry --json` (change detection on, nothing executed): {operation: hosts_with_change}.

    pyinfra merges same-position operations of different hosts into one entry with several names;
    each of its names maps to the entry's hosts.
    """
    run = pyinfra("--dry", "--json", *args, yes=False, **kwargs)
    assert run.rc == 0, f"the dry run failed:\n{run.describe()}"
    try:
        plan = json.loads(run.stdout)["plan"]
    except (ValueError, KeyError) as exc:
        pytest.fail(f"--dry --json did not print a plan ({exc}):\n{run.describe()}", pytrace=False)
    changes: dict[str, list[str]] = {}
    for op in plan:
        hosts = sorted(set(op["hosts_with_change"]) | set(op["hosts_with_conditional_change"]))
        for name in op["names"]:
            changes[name] = sorted(set(changes.get(name, [])) | set(hosts))
    return changes


def deploy_ok(*args: str, **kwargs: Any) -> Run:
    run = pyinfra(*args, **kwargs)
    assert run.rc == 0, f"the deploy failed:\n{run.describe()}"
    return run


def ssh(
    sandbox, node: str, command: str, *, check: bool = True, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run a shell command on a node over SSH (as root, with the sandbox's key and known_hosts)."""
    result = subprocess.run(
        sandbox.ssh_argv(node, command), capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"ssh {node} {command!r} failed (rc {result.returncode}):\n{result.stdout}{result.stderr}",
            pytrace=False,
        )
    return result


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll until `predicate()` is truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {value!r})", pytrace=False)
        time.sleep(interval)


# --- the state of the nodes -----------------------------------------------------------------------


def endpoint_slots(sandbox) -> dict[str, tuple[str, str]]:
    """HAProxy's endpoint slots now, {name: (address, status)}, as `endpoint_sync --show` prints them
    on the login node for the check's user (with no --set it changes nothing)."""
    show = f"runuser -u {HEALTH_USER} -- {HEALTH_VENV}/bin/python -m nemotron_deploy.service.endpoint_sync --show"
    slots = {}
    for line in ssh(sandbox, sandbox.login_host, show).stdout.splitlines():
        name, target, status = line.split()
        slots[name] = (target.rpartition(":")[0], status)
    return slots


def stat_paths(sandbox, node: str, paths: list[str] | tuple[str, ...]) -> dict[str, tuple[str, str, str]]:
    """{path: (octal mode, user, group)} for the paths that exist on the node (one SSH command)."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    out = ssh(sandbox, node, f'for p in {quoted}; do [ -e "$p" ] && stat -c \'%n|%a|%U|%G\' "$p"; done; true')
    found = {}
    for line in out.stdout.splitlines():
        path, mode, user, group = line.rsplit("|", 3)
        found[path] = (mode, user, group)
    return found


def file_state(sandbox, node: str, paths: list[str] | tuple[str, ...]) -> dict[str, str]:
    """{path: "sha256 mtime_ns"} for the paths that exist on the node: compare before/after a run."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    script = (
        f'for p in {quoted}; do [ -e "$p" ] || continue; '
        'printf \'%s|%s|%s\\n\' "$p" "$(sha256sum < "$p" | cut -d\' \' -f1)" "$(stat -c %Y.%Z "$p")"; done'
    )
    found = {}
    for line in ssh(sandbox, node, script).stdout.splitlines():
        path, digest, times = line.split("|")
        found[path] = f"{digest} {times}"
    return found


def exists(sandbox, node: str, path: str) -> bool:
    return ssh(sandbox, node, f"test -e {shlex.quote(path)}", check=False).returncode == 0


def read_bytes(sandbox, node: str, path: str) -> bytes:
    result = subprocess.run(
        sandbox.ssh_argv(node, f"cat {shlex.quote(path)}"), capture_output=True, timeout=60
    )
    assert result.returncode == 0, f"cat {path} on {node}: {result.stderr.decode(errors='replace')}"
    return result.stdout


def compute_script(name: str) -> str:
    return f"{SCRIPTS_DIR}/{name}"


# podman as the service account (the podman runtime's jobs run rootless as it; the deploy pulls into
# its storage): from root, in /, with its runtime dir, as the product does (deploy/rootless.py).
ACCOUNT_PODMAN = (
    f'cd / && runuser -u {SERVICE_USER} -- env XDG_RUNTIME_DIR="/run/user/$(id -u {SERVICE_USER})" podman'
)


def image_present(sandbox, node: str) -> bool:
    """The image in the service account's podman storage on the node (where its jobs look)."""
    return ssh(sandbox, node, f"{ACCOUNT_PODMAN} image exists {IMAGE}", check=False).returncode == 0


def remove_image(sandbox, node: str) -> None:
    """The image gone from the service account's podman storage; podman's own error after 30 s (a
    podman process still holding the storage lock, e.g. a logout that just ended, makes one rmi fail)."""

    def removed() -> str:
        run = ssh(
            sandbox,
            node,
            f"( {ACCOUNT_PODMAN} rmi -f {IMAGE} 2>&1; ! {ACCOUNT_PODMAN} image exists {IMAGE} )",
            check=False,
        )
        return "" if run.returncode == 0 else run.stdout

    deadline = time.monotonic() + 30
    while (last := removed()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not last, f"podman rmi on {node} left the image: {last}"


def reset_deploy(sandbox, *, wait_for_processes: bool = True) -> None:
    """Remove what a previous deploy placed, on every node: the next deploy starts from nothing
    (nemotron_rehearsal.sandbox.reset, the bench's definition too).

    Jobs are cancelled first (their logs live in the shared dir being removed). The images stay
    (podman's, and pyxis's imported file): pulling and importing are tested on their own.
    """
    from nemotron_rehearsal.sandbox import reset

    cancel_jobs(sandbox, wait_for_processes=wait_for_processes)
    settings = sandbox_settings()
    for node in sandbox.compute_names:
        ssh(sandbox, node, shlex.join(reset.compute_command(settings)))
    ssh(sandbox, sandbox.login_host, reset.login_script(settings))


@functools.cache
def sandbox_settings():
    """The sandbox inventory's settings (what the deploys under test place things by)."""
    from nemotron_deploy import inventory

    return inventory.load(str(REPO / "inventories" / "sandbox.py")).settings


# --- the endpoint -----------------------------------------------------------------------------------

LOGIN_ADDRESS = "10.213.0.2"  # the sandbox's login node (its own network namespace)
ENDPOINT = f"https://{LOGIN_ADDRESS}:1424"
ENDPOINT_CERT = "/etc/haproxy/nemotron-endpoint.crt"  # endpoint_tls = self-signed, on the login node


def rehearsal_key() -> str:
    """The sandbox inventory's API key, made by `sandbox up` (root, 0600)."""
    from nemotron_rehearsal.sandbox import layout

    return layout.REHEARSAL_KEY_FILE.read_text().strip()


def endpoint_cert() -> Path:
    """The deployed certificate, where the login node's /etc keeps it on this host."""
    from nemotron_rehearsal.sandbox import layout, nodes

    state = layout.read_state()
    assert state is not None, "the sandbox is not up"
    return nodes.host_path(state.login, ENDPOINT_CERT)


def endpoint_put(body: dict, timeout: float = 30, *, key: str | None = None) -> tuple[int, str]:
    """PUT /generate through the sandbox's endpoint from this host, as a client does: TLS verified
    against the deployed certificate, the rehearsal key (or `key`) as Authorization: Bearer."""
    import ssl
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key or rehearsal_key()}"}
    request = urllib.request.Request(
        f"{ENDPOINT}/generate", data=json.dumps(body).encode(), method="PUT", headers=headers
    )
    context = ssl.create_default_context(cafile=str(endpoint_cert()))
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --- Slurm ------------------------------------------------------------------------------------------


def job_ids(sandbox, states: str = "PENDING,RUNNING,CONFIGURING,COMPLETING") -> list[str]:
    out = ssh(sandbox, sandbox.login_host, f"squeue -h -n {REPLICA_JOBS} -t {states} -o %i").stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def job_state(sandbox, job_id: str) -> str:
    """The job's state from scontrol (it keeps finished jobs for MinJobAge), e.g. RUNNING, COMPLETED."""
    out = ssh(sandbox, sandbox.login_host, f"scontrol show job {job_id}", check=False).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


def cancel_jobs(sandbox, timeout: float = 30, *, wait_for_processes: bool = True) -> None:
    """scancel every job of the deploy's name and wait until Slurm has none left, nor (unless told
    not to: a test that needs no free node, beside another run's leftovers) its processes."""
    if ids := job_ids(sandbox):
        ssh(sandbox, sandbox.login_host, f"scancel {' '.join(ids)}")  # (scancel --name takes one name)
        wait_for(lambda: not job_ids(sandbox), timeout, f"Slurm to end the {JOB_BASE} jobs")
    if wait_for_processes:
        wait_for(lambda: not leftover_processes(sandbox), timeout, "the job's processes to exit")


def leftover_processes(sandbox) -> dict[str, str]:
    """{node: `ps` lines} of job processes still running on each compute node (empty when none)."""
    pattern = "|".join(re.escape(p) for p in JOB_PROCESSES)
    found = {}
    for node in sandbox.compute_names:
        out = ssh(sandbox, node, f"pgrep -af {shlex.quote(pattern)} | grep -v pgrep; true").stdout.strip()
        if out:
            found[node] = out
    return found


# --- pyinfra's output ---------------------------------------------------------------------------------


def results_table(output: str) -> dict[str, dict[str, str]]:
    """pyinfra's `--> Results:` table: {operation: {"Hosts": .., "Success": .., "Error": .., "No Change": ..}}."""
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "--> Results:")
    except StopIteration:
        return {}
    header = lines[start + 1]
    columns = ["Hosts", "Success", "Error", "No Change"]
    starts = [header.index(c) for c in columns]
    table = {}
    for line in lines[start + 2 :]:
        if not line.strip() or line.startswith("-->"):
            break
        name = line[: starts[0]].strip()
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        table[name] = dict(zip(columns, cells, strict=True))
    return table


def commands_per_host(output: str) -> dict[str, int]:
    """How many shell commands pyinfra ran on each host, from `-vvv` output (`[host] >>> cmd`)."""
    counts: dict[str, int] = {}
    for match in re.finditer(r"^\[([\w.-]+)\]\s+>>> ", output, re.MULTILINE):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def op_statuses(output: str, operation: str) -> dict[str, str]:
    """{host: "Success" | "No changes" | "Skipped" | "Error"...} of one operation in pyinfra's output."""
    statuses: dict[str, str] = {}
    inside = False
    for line in output.splitlines():
        if line.startswith("--> Starting operation: "):
            inside = operation in line
            continue
        if line.startswith("-->"):
            inside = False
        match = re.match(r"^\s+\[([\w.-]+)\]\s+(Success|No changes|Skipped|Error.*)$", line)
        if inside and match:
            statuses[match.group(1)] = match.group(2)
    return statuses


def source_digest() -> str:
    """The digest the deploy names the health-check wheel after (every .py/.yaml of the package)."""
    from nemotron_deploy.deploy import wheelhouse

    return wheelhouse.source_digest()


def converged_attempts(attempt: Callable[[], T], tries: int = 3, *data: str) -> T:
    """Converge the deploy, then run `attempt` (more runs and their checks); again if it fails while
    the package's sources changed under it.

    The login node's health-check wheel is built from this working tree, which others edit while the
    tests run: a changed source is a real change on the login node, not a fault of the deploy. A
    failure with unchanged sources is re-raised at once. `data`: the attempt's own --data arguments.
    """
    for i in range(tries):
        before = source_digest()
        deploy_ok(*data)
        try:
            return attempt()
        except AssertionError:
            if i == tries - 1 or source_digest() == before:
                raise
            print(f"package sources changed during the attempt ({before} -> {source_digest()}); again")
    raise AssertionError("unreachable")
