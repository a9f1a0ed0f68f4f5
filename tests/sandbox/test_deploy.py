"""The deploy against the sandbox cluster, run as an operator runs it: `pyinfra -y inventories/sandbox.py
deploys/nemotron.py` in a subprocess, over real SSH, then the nodes are inspected over SSH.

What is checked: the first deploy places every file with its owner and mode, byte-identical to
`nemotron-deploy render`; a second run changes nothing (and reads each host in one command); a bad
inventory or a failing preflight stops before any host is changed; a host that is down fails the
deploy by name while the others finish, and one unreachable at the start or lost mid-deploy is named
with its address, what failed and the drain command, without a traceback; a missing image is pulled again on that node only; the NGC
key never shows; `--dry` plans a change without making it.

The sandbox comes up once per session (tests/conftest.py); each test starts from a converged deploy.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import write_inventory
from nemotron_rehearsal import sandbox as sb_api
from sshutil import (
    ACCOUNT_PODMAN,
    COMPUTE_CONFIGS,
    COMPUTE_SCRIPTS,
    CRON_FILE,
    DEPLOY_SHARED,
    DEPLOY_STATE_DIR,
    HEALTH_METRICS_DIR,
    HEALTH_STATE_DIR,
    HEALTH_USER,
    HEALTH_VENV,
    IMAGE,
    IMAGE_FILE,
    IMAGES_DIR,
    IMPORT_OP,
    INVENTORY,
    JOBS_DIR,
    LOGS_DIR,
    NODE_DIR,
    PODMAN,
    PULL_OP,
    RECORDS_DIR,
    REPO,
    SBATCH,
    SCRIPTS_DIR,
    SERVICE_USER,
    SHARED,
    TEXTFILE_DIR,
    TLS,
    TLS_IMAGE,
    TLS_IMAGE_FILE,
    TLS_PYXIS_IMAGE,
    TLS_REGISTRY,
    clean_env,
    commands_per_host,
    compute_script,
    console_script,
    converged_attempts,
    deploy_ok,
    dry_plan,
    exists,
    file_state,
    image_present,
    op_statuses,
    pyinfra,
    read_bytes,
    remove_image,
    reset_deploy,
    results_table,
    ssh,
    stat_paths,
)

FIRST, SECOND = "sb-node01", "sb-node02"
ROOT_755 = ("755", "root", "root")
ROOT_644 = ("644", "root", "root")


@pytest.fixture(autouse=True)
def _alone(sandbox):
    """These tests reset the deploy, inject GPU faults, stop sshd and remove images: no other user of
    the sandbox (a concurrent test session, a benchmark) runs meanwhile (see sandbox/locks.py)."""
    with sb_api.exclusive_use("deploy tests (reset the deploy, inject faults, stop sshd)"):
        yield


def _healthy_nodes(sandbox) -> None:
    """Undo what a failed test may have left: a powered-off node, GPU faults, a stopped sshd."""
    for node in sb_api.status()["nodes"]:
        if node["init_pid"] is None:
            sb_api.node_up(node["name"])
    for node in sandbox.compute_names:
        sb_api.clear_gpu_faults(node)
    status = sb_api.status()
    for node in status["nodes"]:
        if not node["daemons"].get("sshd"):
            sb_api.start_node_sshd(node["name"])


@pytest.fixture
def deployed(sandbox):
    """The sandbox with a converged deploy (a no-change run when the previous test left it so)."""
    _healthy_nodes(sandbox)
    deploy_ok()
    yield sandbox
    _healthy_nodes(sandbox)


def _watched(sandbox) -> dict[str, dict[str, str]]:
    """Checksums and mtimes of what the deploy placed on every host, to prove a run changed nothing."""
    watched = {
        node: file_state(
            sandbox, node, [compute_script(name) for name in (*COMPUTE_SCRIPTS, *COMPUTE_CONFIGS)]
        )
        for node in sandbox.compute_names
    }
    watched[sandbox.login_host] = file_state(
        sandbox, sandbox.login_host, [SBATCH, CRON_FILE, f"{HEALTH_VENV}-wheels/installed.sha256"]
    )
    return watched


def _remove_on_every_host(sandbox) -> dict[str, str]:
    """Delete one deployed file per host; {host: path}. A run that changes anything puts them back."""
    removed = {FIRST: compute_script("call_server.py"), SECOND: compute_script("nemo_inference.sh")}
    removed[sandbox.login_host] = SBATCH
    for node, path in removed.items():
        ssh(sandbox, node, f"rm -f {shlex.quote(path)}")
    return removed


def _assert_untouched(sandbox, removed: dict[str, str], before: dict[str, dict[str, str]]) -> None:
    back = {node: path for node, path in removed.items() if exists(sandbox, node, path)}
    assert not back, f"the failed deploy changed hosts: it put back {back}"
    after = _watched(sandbox)
    assert after == before, "the failed deploy changed files on the hosts"


# --- 1. the first deploy ---------------------------------------------------------------------------


def test_first_deploy_places_everything_with_the_right_modes(sandbox, tmp_path):
    _healthy_nodes(sandbox)
    reset_deploy(sandbox)
    for node in sandbox.compute_names:
        assert not exists(sandbox, node, NODE_DIR), f"reset left {NODE_DIR} on {node}"
    assert not exists(sandbox, sandbox.login_host, CRON_FILE)
    assert ssh(sandbox, sandbox.login_host, f"id {HEALTH_USER}", check=False).returncode != 0

    run = deploy_ok("--debug")
    total = results_table(run.output)["Grand total"]
    assert total["Error"] == "-" and total["Success"] != "-", (
        f"a first deploy must change things:\n{run.output}"
    )
    # Every host's changed files travel in one upload (each SFTP file costs its own round trips).
    uploads = run.output.count("Attempting upload of")
    assert uploads == 1 + len(sandbox.compute_names), f"{uploads} uploads, want one per host:\n{run.output}"

    rendered = tmp_path / "rendered"
    render = subprocess.run(
        [console_script("nemotron-deploy"), "render", INVENTORY, "--out", str(rendered)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert render.returncode == 0, render.stdout + render.stderr
    assert sorted(p.name for p in rendered.iterdir()) == sorted(
        [*COMPUTE_SCRIPTS, *COMPUTE_CONFIGS, "nemotron.sbatch"]
    )

    for node in sandbox.compute_names:
        scripts = [compute_script(name) for name in COMPUTE_SCRIPTS]
        configs = [compute_script(name) for name in COMPUTE_CONFIGS]
        modes = stat_paths(sandbox, node, [NODE_DIR, SCRIPTS_DIR, *scripts, *configs])
        expected = {path: ROOT_755 for path in [NODE_DIR, SCRIPTS_DIR, *scripts]}
        assert modes == {**expected, **{path: ROOT_644 for path in configs}}, node
        for name in (*COMPUTE_SCRIPTS, *COMPUTE_CONFIGS):
            assert read_bytes(sandbox, node, compute_script(name)) == (rendered / name).read_bytes(), (
                f"{name} on {node} differs from `nemotron-deploy render`"
            )

    login = sandbox.login_host
    lock = f"{DEPLOY_STATE_DIR}/check.lock"
    modes = stat_paths(
        sandbox,
        login,
        [DEPLOY_SHARED, JOBS_DIR, LOGS_DIR, RECORDS_DIR, SBATCH, CRON_FILE, DEPLOY_STATE_DIR, lock],
    )
    assert modes == {
        DEPLOY_SHARED: ROOT_755,
        JOBS_DIR: ROOT_755,
        # The jobs' output (NeMo logs prompts) is the service account's alone (the jobs run as it);
        # their records only it writes. Root writes the check's started file and lock in a directory only root writes.
        LOGS_DIR: ("700", SERVICE_USER, SERVICE_USER),
        RECORDS_DIR: ("755", SERVICE_USER, SERVICE_USER),
        SBATCH: ROOT_644,
        CRON_FILE: ROOT_644,
        DEPLOY_STATE_DIR: ROOT_755,
        lock: ("660", "root", HEALTH_USER),
    }
    assert read_bytes(sandbox, login, SBATCH) == (rendered / "nemotron.sbatch").read_bytes()

    # The health check: cron (the login node has no systemd), its user, venv and directories.
    assert not exists(sandbox, login, "/etc/systemd/system/nemotron-health.timer")
    cron = read_bytes(sandbox, login, CRON_FILE).decode()
    assert (
        f" {HEALTH_USER} {HEALTH_VENV}/bin/python -m nemotron_deploy.service.health --slurm-job nemotron-340b"
        in cron
    )
    user = ssh(sandbox, login, f"getent passwd {HEALTH_USER}").stdout.strip().split(":")
    assert user[6] == "/usr/sbin/nologin" and int(user[2]) < 1000, f"not a system user: {user}"
    assert user[4] == "nemotron-deploy health check", f"not marked as the deploy's: {user}"
    assert stat_paths(sandbox, login, [HEALTH_STATE_DIR, HEALTH_METRICS_DIR, TEXTFILE_DIR]) == {
        HEALTH_STATE_DIR: ("750", HEALTH_USER, HEALTH_USER),
        HEALTH_METRICS_DIR: ("755", HEALTH_USER, HEALTH_USER),
        TEXTFILE_DIR: ROOT_755,  # node_exporter's: the health user writes through a link, not the dir
    }
    link = ssh(sandbox, login, f"readlink {TEXTFILE_DIR}/nemotron.prom").stdout.strip()
    assert link == f"{HEALTH_METRICS_DIR}/nemotron.prom"
    ssh(
        sandbox,
        login,
        f"{HEALTH_VENV}/bin/python -c 'import nemotron_deploy.service.health, prometheus_client'",
    )
    # What cron runs, as the user cron runs it as: no job yet (CRITICAL), but the metrics are written.
    command = cron.splitlines()[-1].split(f" {HEALTH_USER} ", 1)[1].removesuffix(" >/dev/null 2>&1")
    check = ssh(sandbox, login, f"runuser -u {HEALTH_USER} -- {command}", check=False)
    assert check.returncode in (0, 1, 2), f"the health check itself failed:\n{check.stdout}{check.stderr}"
    prom = ssh(sandbox, login, f"cat {TEXTFILE_DIR}/nemotron.prom").stdout
    assert "nemotron_replica_up{" in prom, prom


def test_an_existing_textfile_dir_keeps_its_owner_and_mode(sandbox):
    """Before: the deploy made node_exporter's textfile dir group-writable by the health user,
    whatever it was (prometheus_textfile_dir=/etc gave that user write access to /etc)."""
    login = sandbox.login_host
    theirs = "/srv/node-exporter-textfiles"
    ssh(sandbox, login, f"rm -rf {theirs}; mkdir -m 710 {theirs} && chown nobody:nogroup {theirs}")
    try:
        deploy_ok("--data", f"prometheus_textfile_dir={theirs}")
        assert stat_paths(sandbox, login, [theirs]) == {theirs: ("710", "nobody", "nogroup")}
        link = ssh(sandbox, login, f"readlink {theirs}/nemotron.prom").stdout.strip()
        assert link == f"{HEALTH_METRICS_DIR}/nemotron.prom"
        again = deploy_ok("--data", f"prometheus_textfile_dir={theirs}")
        assert results_table(again.output)["Grand total"]["Success"] == "-", again.describe()
    finally:
        ssh(sandbox, login, f"rm -rf {theirs}")
        deploy_ok()


# --- 2. a second run ---------------------------------------------------------------------------------


def test_second_run_reports_zero_changes(sandbox):
    _healthy_nodes(sandbox)

    def attempt() -> None:
        plan = dry_plan()
        assert plan, "the dry run listed no operations"
        changes = {name: hosts for name, hosts in plan.items() if hosts}
        assert not changes, f"a converged deploy plans changes: {plan}"

        run = deploy_ok("-vvv")
        table = results_table(run.output)
        assert table["Grand total"]["Success"] == "-", f"a second run changed things:\n{run.output[-3000:]}"
        assert table["Grand total"]["Error"] == "-"
        assert all(row["Success"] == "-" for row in table.values()), table
        # A host whose read shows its files in place gets no file operation at all (at 64 nodes the
        # calls alone were a fifth of a re-deploy).
        assert not [name for name in table if name.startswith("Job files")], table

        counts = commands_per_host(run.output)
        print(f"no-change re-deploy: {run.seconds:.1f}s, shell commands per host: {counts}")
        assert set(counts) == {sandbox.login_host, *sandbox.compute_names}, counts
        assert max(counts.values()) <= 3, f"every fact is batched into one command per host: {counts}"

    converged_attempts(attempt)


# --- 3. a bad inventory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("port", 80, "greater than or equal to 1024"),
        ("slurm_partition", "gpu; touch /tmp/nemotron-pwned", "must start with a letter or digit"),
    ],
)
def test_bad_inventory_stops_before_any_host_is_touched(deployed, tmp_path, field, value, why):
    sandbox = deployed
    inventory = write_inventory(tmp_path / "inv", base="sandbox", settings={field: value})
    removed = _remove_on_every_host(sandbox)
    before = _watched(sandbox)

    run = pyinfra(inventory=inventory)
    assert run.rc != 0, f"an invalid inventory deployed:\n{run.describe()}"
    assert f"{field} = {value!r}" in run.output and why in run.output, run.describe()
    assert "nothing was changed" in run.output
    assert "Starting operation" not in run.output, run.describe()
    _assert_untouched(sandbox, removed, before)
    for node in sandbox.compute_names:
        assert not exists(sandbox, node, "/tmp/nemotron-pwned")


# --- 4. preflight ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "expected"),
    [
        ({"gpus": 4}, ["found 4 GPU(s), expected 8"]),
        ({"name": "NVIDIA H100 80GB HBM3"}, ["'NVIDIA H100 80GB HBM3', expected 'NVIDIA H200'"]),
        ({"ecc_uncorrected": {3: 2}}, ["GPU 3", "2 uncorrected volatile ECC error(s)"]),
    ],
    ids=["fewer-gpus", "wrong-model", "ecc-error"],
)
def test_preflight_stops_before_any_change(deployed, faults, expected):
    sandbox = deployed
    removed = _remove_on_every_host(sandbox)
    before = _watched(sandbox)
    sb_api.set_gpu_faults(SECOND, **faults)
    try:
        run = pyinfra()
    finally:
        sb_api.clear_gpu_faults(SECOND)
    assert run.rc != 0, f"the deploy went ahead on a faulty node:\n{run.describe()}"
    assert f"preflight failed on {SECOND}" in run.output, run.describe()
    assert f"preflight failed on {FIRST}" not in run.output
    for text in expected:
        assert text in run.output, run.describe()
    assert "Starting operation" not in run.output
    _assert_untouched(sandbox, removed, before)


@pytest.mark.parametrize(
    "model_dir",
    [f"{SHARED}/models", f"{SHARED}/models/Nemotron-4-340B-Base-typo"],
    ids=["parent-dir", "missing-dir"],
)
def test_preflight_names_model_config_for_a_wrong_model_dir(deployed, tmp_path, model_dir):
    sandbox = deployed
    inventory = write_inventory(tmp_path / "inv", base="sandbox", settings={"model_dir": model_dir})
    removed = _remove_on_every_host(sandbox)
    before = _watched(sandbox)
    run = pyinfra(inventory=inventory)
    assert run.rc != 0, run.describe()
    assert "preflight failed on sb-node0" in run.output
    assert f"model_dir {model_dir}" in run.output and "model_config.yaml" in run.output, run.describe()
    _assert_untouched(sandbox, removed, before)


def test_skip_preflight_lets_the_deploy_through(deployed):
    sandbox = deployed
    removed = _remove_on_every_host(sandbox)
    sb_api.set_gpu_faults(SECOND, gpus=4)
    try:
        run = pyinfra("--data", "skip_preflight=true")
    finally:
        sb_api.clear_gpu_faults(SECOND)
    assert run.rc == 0, run.describe()
    missing = {node: path for node, path in removed.items() if not exists(sandbox, node, path)}
    assert not missing, f"skip_preflight=true deployed but did not restore {missing}"


# --- 5. a host that is down --------------------------------------------------------------------------


def test_a_host_that_is_down_fails_by_name_and_the_others_finish(deployed):
    sandbox = deployed
    removed = _remove_on_every_host(sandbox)
    sb_api.stop_node_sshd(SECOND)
    try:
        run = pyinfra()
    finally:
        sb_api.start_node_sshd(SECOND)
    assert run.rc != 0, f"a deploy with an unreachable host reported success:\n{run.describe()}"
    assert f"[{SECOND}] Could not connect" in run.output, run.describe()
    for node in (FIRST, sandbox.login_host):
        assert exists(sandbox, node, removed[node]), f"{node} did not finish while {SECOND} was down"
    assert not exists(sandbox, SECOND, removed[SECOND])

    run = deploy_ok()
    assert op_statuses(run.output, "Job files").get(SECOND) == "Success", run.output
    assert exists(sandbox, SECOND, removed[SECOND])

    def then_no_change() -> None:
        run = deploy_ok()
        assert results_table(run.output)["Grand total"]["Success"] == "-", run.output

    converged_attempts(then_no_change)


def _assert_unreachable_reported(sandbox, run, node: str, failed: str) -> None:
    """One line for the host (name, address, what failed), then the summary; no traceback."""
    assert run.rc != 0, f"a deploy with an unreachable host reported success:\n{run.describe()}"
    assert "Traceback" not in run.output, run.describe()
    address = sandbox.node(node).address
    lines = [line.strip() for line in run.output.splitlines()]
    host_lines = [line for line in lines if line.startswith(f"{node} ({address}): ")]
    assert len(host_lines) == 1, f"want one line for {node} ({address}):\n{run.describe()}"
    assert failed in host_lines[0], host_lines[0]
    assert f"Not deployed: {node}." in lines, run.describe()
    summary = run.output[run.output.index(f"Not deployed: {node}.") :]
    assert "Slurm may still schedule jobs onto it" in summary, summary
    assert f"scontrol update nodename={node} state=drain reason=" in summary, summary
    assert "or fix it and re-run the deploy" in summary, summary
    for other in (n for n in [sandbox.login_host, *sandbox.compute_names] if n != node):
        address = sandbox.node(other).address
        assert not any(line.startswith(f"{other} ({address})") for line in lines), run.describe()


@pytest.mark.parametrize("fault", ["sshd stopped", "powered off"])
def test_a_host_unreachable_at_the_start_is_reported_with_what_to_do(deployed, fault):
    sandbox = deployed
    removed = _remove_on_every_host(sandbox)
    if fault == "sshd stopped":
        sb_api.stop_node_sshd(SECOND)
    else:
        sb_api.node_down(SECOND)
    try:
        run = pyinfra()
    finally:
        _healthy_nodes(sandbox)
    _assert_unreachable_reported(sandbox, run, SECOND, "could not connect over SSH")
    for node in (FIRST, sandbox.login_host):
        assert exists(sandbox, node, removed[node]), f"{node} did not finish while {SECOND} was down"


def test_a_host_lost_mid_deploy_is_reported_and_the_others_finish(deployed):
    """The node answers while pyinfra connects and reads facts, then is powered off before its first
    change (an upload): today paramiko's error escapes as a traceback and stops every host."""
    sandbox = deployed
    removed = _remove_on_every_host(sandbox)
    try:
        run = pyinfra(
            deploy="tests/fixtures/lose_node_mid_deploy.py", env=clean_env(NEMOTRON_TEST_LOSE_NODE=SECOND)
        )
    finally:
        _healthy_nodes(sandbox)
    _assert_unreachable_reported(sandbox, run, SECOND, "lost the SSH connection during")
    for node in (FIRST, sandbox.login_host):
        assert exists(sandbox, node, removed[node]), f"{node} did not finish after {SECOND} was lost"
    assert op_statuses(run.output, "Enable the health timer").get(sandbox.login_host), run.output

    run = deploy_ok()
    assert exists(sandbox, SECOND, removed[SECOND]), f"the re-run did not deploy {SECOND}"


# --- 6. the image -----------------------------------------------------------------------------------


def test_a_missing_image_is_pulled_again_on_that_node_only(deployed):
    """The podman path: every compute node pulls for itself."""
    sandbox = deployed
    deploy_ok(env=clean_env(**PODMAN))
    for node in sandbox.compute_names:
        assert image_present(sandbox, node), f"the deploy did not pull the image on {node}"
    remove_image(sandbox, SECOND)
    log = sandbox.registry_access_log
    offset = log.stat().st_size

    run = deploy_ok(env=clean_env(**PODMAN))
    # Nodes whose read shows the image get no pull operation at all.
    others = {node: "Skipped" for node in sandbox.compute_names if node != SECOND}
    assert op_statuses(run.output, PULL_OP) == {
        **others,
        SECOND: "Success",
        sandbox.login_host: "Skipped",
    }, run.output
    assert image_present(sandbox, SECOND)
    manifest_clients = {
        line.split()[0]
        for line in log.read_bytes()[offset:].decode(errors="replace").splitlines()
        if "/manifests/" in line
    }
    assert manifest_clients == {sandbox.node(SECOND).address}, manifest_clients


def test_a_missing_image_file_is_imported_once_for_the_whole_cluster(deployed):
    """The pyxis path (the default): the first compute node imports with real enroot into shared
    storage, through a temporary name; the other nodes read the same file."""
    sandbox = deployed
    assert stat_paths(sandbox, FIRST, [IMAGE_FILE]) == {IMAGE_FILE: ROOT_644}
    ssh(sandbox, FIRST, f"rm -f {IMAGE_FILE}")
    log = sandbox.registry_access_log
    offset = log.stat().st_size

    run = deploy_ok()
    others = {node: "Skipped" for node in sandbox.compute_names if node != FIRST}
    assert op_statuses(run.output, IMPORT_OP) == {
        FIRST: "Success",
        **others,
        sandbox.login_host: "Skipped",
    }, run.output
    # 0644 (pyxis refuses a 0600 squashfs), a real squashfs, and nothing half-written left beside it.
    assert stat_paths(sandbox, SECOND, [IMAGE_FILE]) == {IMAGE_FILE: ROOT_644}
    assert ssh(sandbox, FIRST, f"head -c 4 {IMAGE_FILE}").stdout == "hsqs"
    assert ssh(sandbox, FIRST, f"ls -A {IMAGES_DIR}").stdout.split() == [IMAGE_FILE.rsplit("/", 1)[1]]
    scratch = ssh(sandbox, FIRST, f"ls -A {DEPLOY_SHARED}/.import-tmp").stdout.split()
    assert scratch == [], f"the import left its scratch (layers) behind: {scratch}"
    clients = {
        line.split()[0]
        for line in log.read_bytes()[offset:].decode(errors="replace").splitlines()
        if "/v2/" in line
    }
    assert clients == {sandbox.node(FIRST).address}, clients
    again = deploy_ok()
    assert op_statuses(again.output, IMPORT_OP)[FIRST] == "No changes"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _registry_pid(sandbox) -> int:
    """The host PID of the sandbox's docker-registry (it runs in the login node's namespaces)."""
    from nemotron_rehearsal.sandbox import netns
    from nemotron_rehearsal.sandbox import registry as sb_registry

    pids = [
        pid
        for pid in netns.pids_in(sandbox.login.netns)
        if Path(f"/proc/{pid}/comm").read_text().strip() == "docker-registry"
        # the plain-HTTP one (the TLS one, sandbox/registry_tls.py, serves its storage on 5443)
        and str(sb_registry.CONFIG).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(pids) == 1, f"expected one plain docker-registry in {sandbox.login.name}, found {pids}"
    return pids[0]


@contextmanager
def _registry_stopped(sandbox):
    """SIGSTOP the registry: it keeps accepting connections (the kernel's backlog) and answers nothing."""
    pid = _registry_pid(sandbox)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _pull_leftovers(sandbox, node: str) -> str:
    """What a pull could leave on the node: its work dir, podman's temp storage, a podman process."""
    return ssh(
        sandbox,
        node,
        "ls -d /var/tmp/nemotron-fetch.* /var/tmp/storage[0-9]* /var/tmp/container_images_storage* 2>/dev/null; "
        "pgrep -a podman; true",
    ).stdout.strip()


def test_a_stalled_registry_fails_the_pull_in_time_and_no_host_changes_its_files(deployed):
    """Before: with the registry stalled, the deploy sat silent for over 6 minutes until killed.
    (The podman path: a pull per node.)"""
    sandbox = deployed
    deploy_ok(env=clean_env(**PODMAN))
    remove_image(sandbox, SECOND)
    assert not _pull_leftovers(sandbox, SECOND)
    removed = _remove_on_every_host(sandbox)
    before = _watched(sandbox)
    stall = 20
    with _registry_stopped(sandbox):
        run = pyinfra(
            "--data", f"pull_stall_timeout_seconds={stall}", timeout=stall + 120, env=clean_env(**PODMAN)
        )
    assert run.rc != 0, f"the deploy succeeded with the registry stalled:\n{run.describe()}"
    print(f"stalled registry: the deploy failed after {run.seconds:.1f}s (stall limit {stall}s)")
    assert run.seconds < stall + 30, f"the stalled pull failed the deploy only after {run.seconds:.0f}s"
    assert op_statuses(run.output, PULL_OP).get(SECOND, "").startswith("Error"), run.describe()
    message = f"pull of {IMAGE} on {SECOND} from registry {sandbox.registry} stalled: no progress for"
    assert message in run.output, run.describe()
    assert f'last output "Trying to pull {IMAGE}..."' in run.output, run.describe()
    assert f"pull_stall_timeout_seconds={stall}" in run.output

    assert not image_present(sandbox, SECOND)
    assert not _pull_leftovers(sandbox, SECOND), "the stopped pull left something on the node"
    images = ssh(sandbox, SECOND, f"{ACCOUNT_PODMAN} images -a --noheading").stdout.strip()
    assert not images, f"the stopped pull left an image record: {images}"
    # The job files changed on no host: not the one whose pull stalled, nor the others.
    _assert_untouched(sandbox, removed, before)

    run = deploy_ok(env=clean_env(**PODMAN))  # the registry answers again
    assert op_statuses(run.output, PULL_OP).get(SECOND) == "Success", run.output
    assert image_present(sandbox, SECOND)
    assert all(exists(sandbox, node, path) for node, path in removed.items())

    def then_no_change() -> None:
        deploy_ok(env=clean_env(**PODMAN))  # converged_attempts converges the default runtime first
        again = deploy_ok(env=clean_env(**PODMAN))
        assert results_table(again.output)["Grand total"]["Success"] == "-", again.output

    converged_attempts(then_no_change)


def test_a_slow_pull_prints_progress_per_host_at_least_every_interval(deployed):
    """The registry answers nothing for a while, then serves: a progress line for the pulling node comes
    at least every progress interval meanwhile (shortened to 2 s here; 20 s by default, never over 30)."""
    sandbox = deployed
    deploy_ok(env=clean_env(**PODMAN))
    remove_image(sandbox, SECOND)
    interval, paused = 2.0, 9.0
    argv = [console_script("pyinfra"), "-y", INVENTORY, "deploys/nemotron.py"]
    env = clean_env(NEMOTRON_DEPLOY_PROGRESS_SECONDS=str(interval), PYTHONUNBUFFERED="1", **PODMAN)
    lines: list[tuple[float, str]] = []
    with _registry_stopped(sandbox):
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        reader = threading.Thread(  # pyinfra colours the host name: strip that
            target=lambda: lines.extend((time.monotonic(), ANSI.sub("", x)) for x in proc.stdout)
        )
        reader.start()
        time.sleep(paused)
        resumed = time.monotonic()  # lines after this may show the pull moving on ("Copying blob ...")
    rc = proc.wait(timeout=180)
    reader.join(timeout=10)
    output = "".join(text for _, text in lines)
    assert rc == 0, output[-6000:]
    assert op_statuses(output, PULL_OP).get(SECOND) == "Success", output
    progress = [(t, x) for t, x in lines if x.startswith(f"[{SECOND}] pull of {IMAGE}: ") and "elapsed" in x]
    assert len(progress) >= paused / interval - 2, f"too few progress lines:\n{output[-4000:]}"
    times = [t for t, _ in progress]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) <= interval + 3, (
        f"{max(gaps):.1f}s between progress lines:\n{''.join(x for _, x in progress)}"
    )
    assert all("fetched" in x for _, x in progress), progress
    stalled = [x for t, x in progress if t < resumed - 1]
    assert stalled and all('last output "Trying to pull' in x for x in stalled), progress
    elapsed = [int(m.group(1)) for _, x in progress if (m := re.search(r", (\d+)s elapsed", x))]
    assert elapsed == sorted(elapsed) and elapsed[0] <= interval + 3, elapsed
    assert not any(x.startswith(f"[{FIRST}] pull of") for _, x in lines), "a node with the image pulled"
    assert image_present(sandbox, SECOND)
    assert not _pull_leftovers(sandbox, SECOND), "the pull left its work dir or temp storage"


# --- 7. the NGC key ---------------------------------------------------------------------------------------


def _registry_requests() -> tuple[int, int]:
    """Lines in the access logs of the sandbox registry's plain-HTTP and TLS instances."""
    from nemotron_rehearsal.sandbox import layout, registry_tls

    logs = (layout.STATE_DIR / "registry" / "access.log", registry_tls.ACCESS_LOG)
    return tuple(len(p.read_bytes().splitlines()) if p.exists() else 0 for p in logs)  # type: ignore[return-value]


def test_credentials_for_the_pyxis_import_never_show(deployed):
    """The pyxis path, from the TLS registry the nodes verify (the only kind a key may go to): enroot
    reads the key from a 0600 netrc file in a 0700 dir made for the import, never from a command line,
    and fetches over https only; after the import the key is in no file of any node, nor in the output
    or the shared dir. A credentials file an earlier release kept between deploys is removed."""
    sandbox = deployed
    key = f"nvapi-TEST{uuid.uuid4().hex}"
    old_creds = f"{NODE_DIR}/enroot/.credentials"
    import_op = f"Import {TLS_PYXIS_IMAGE} (pyxis)"
    ssh(sandbox, FIRST, f"rm -f {TLS_IMAGE_FILE}")
    ssh(
        sandbox,
        FIRST,
        f"install -d -m 700 {NODE_DIR}/enroot && echo 'machine x login y password {key}' > {old_creds}",
    )
    try:
        plain_before, tls_before = _registry_requests()
        run = pyinfra("-vvv", "--data", "registry_login=true", env=clean_env(NGC_API_KEY=key, **TLS))
        assert run.rc == 0, run.describe().replace(key, "<KEY>")
        assert key not in run.output, "the NGC key is in pyinfra's -vvv output"
        assert op_statuses(run.output, import_op)[FIRST] == "Success", run.output.replace(key, "<KEY>")
        assert ssh(sandbox, FIRST, f"test -s {TLS_IMAGE_FILE}", check=False).returncode == 0, (
            "the import did not land"
        )
        plain_after, tls_after = _registry_requests()
        assert tls_after > tls_before, "the import did not come from the TLS registry"
        assert plain_after == plain_before, "the import with the key reached the plain-HTTP registry"
        found = subprocess.run(["grep", "-rlF", key, SHARED], capture_output=True, text=True)
        assert found.returncode == 1, f"the key is in shared files: {found.stdout}{found.stderr}"
        for node in [*sandbox.compute_names, sandbox.login_host]:
            grep = ssh(
                sandbox, node, "grep -rlsF -D skip -f - /tmp /var/tmp /root /opt /run /etc /var/lib/nemotron-sandbox/nodes",
                input=key + "\n", check=False,
            )  # fmt: skip
            assert grep.stdout.split() == [], f"the key is in files on {node}: {grep.stdout}"
        # The image is there: the next deploy uploads no key at all, and changes nothing.
        again = pyinfra("-vvv", "--data", "registry_login=true", env=clean_env(NGC_API_KEY=key, **TLS))
        assert again.rc == 0, again.describe().replace(key, "<KEY>")
        assert results_table(again.output)["Grand total"]["Success"] == "-", again.output[-3000:].replace(
            key, "<KEY>"
        )
        assert "nemotron-enroot" not in again.output, "a key was uploaded though the image was there"
    finally:
        ssh(sandbox, FIRST, f"rm -rf {NODE_DIR}/enroot {TLS_IMAGE_FILE}")
        deploy_ok()  # the job files back on the inventory's own registry


def test_credentials_never_show(deployed):
    """The podman path, from the TLS registry the nodes verify: `podman login --tls-verify=true
    --password-stdin` from a 0600 file in a 0700 dir, and `podman logout` when the pull ends: the key
    is in no file of any node afterwards."""
    sandbox = deployed
    deploy_ok(env=clean_env(**PODMAN))
    key = f"nvapi-TEST{uuid.uuid4().hex}"
    for node in sandbox.compute_names:
        remove_image(sandbox, node)
        ssh(sandbox, node, f"( {ACCOUNT_PODMAN} rmi -f {TLS_IMAGE} ) >/dev/null 2>&1; true")
    try:
        plain_before, tls_before = _registry_requests()
        run = pyinfra(
            "-vvv", "--data", "registry_login=true", env=clean_env(NGC_API_KEY=key, **PODMAN, **TLS)
        )
        assert run.rc == 0, run.describe().replace(key, "<KEY>")
        assert key not in run.output, "the NGC key is in pyinfra's -vvv output"
        assert op_statuses(run.output, f"Pull {TLS_IMAGE} (podman)") == {
            **dict.fromkeys(sandbox.compute_names, "Success"),
            sandbox.login_host: "Skipped",
        }
        assert "podman login --tls-verify=true" in run.output, "the deploy did not log in with TLS verified"
        plain_after, tls_after = _registry_requests()
        assert tls_after > tls_before and plain_after == plain_before, (
            f"the login and pulls did not all go to {TLS_REGISTRY}"
        )
        debug_log = REPO / "pyinfra-debug.log"
        assert not debug_log.exists() or key not in debug_log.read_text(errors="replace")

        # Not in any file: the shared dir (same path on the host), nor the nodes' private dirs.
        found = subprocess.run(["grep", "-rlF", key, SHARED], capture_output=True, text=True)
        assert found.returncode == 1, f"the key is in shared files: {found.stdout}{found.stderr}"
        auth_line = base64.b64encode(f"$oauthtoken:{key}".encode()).decode()
        for node in [*sandbox.compute_names, sandbox.login_host]:
            grep = ssh(
                sandbox,
                node,
                # (netns: a Docker engine's handle of its network namespace, which can't be read)
                "grep -rlsF -D skip --exclude-dir=netns -f - /tmp /var/tmp /root /opt /run /etc",
                input=key + "\n",
                check=False,
            )
            assert grep.returncode == 1, f"the key is in files on {node}: {grep.stdout}"
            leftovers = ssh(sandbox, node, "ls -d /tmp/pyinfra-* 2>/dev/null; true").stdout
            assert not leftovers.strip(), f"upload leftovers on {node}: {leftovers}"
        for node in sandbox.compute_names:
            assert (
                ssh(sandbox, node, f"{ACCOUNT_PODMAN} image exists {TLS_IMAGE}", check=False).returncode == 0
            )
            auth = ssh(
                sandbox,
                node,
                # The service account's (its login, /run/user/<uid>), and root's (none expected).
                f'for f in "/run/user/$(id -u {SERVICE_USER})/containers/auth.json" '
                '"${XDG_RUNTIME_DIR:-/nonexistent}/containers/auth.json" /run/containers/0/auth.json; do '
                '[ -e "$f" ] && stat -c "%a %U %n" "$f" && cat "$f"; done; true',
                check=False,
            ).stdout
            # Logged out when the pull ended: the login (and the key in it) left the node.
            assert auth_line not in auth, f"{node}: podman's auth file still holds the login:\n{auth}"
    finally:
        for node in sandbox.compute_names:
            # The image under the inventory's own name again, as the tests after this one expect it.
            ssh(
                sandbox,
                node,
                f"( {ACCOUNT_PODMAN} logout --all; {ACCOUNT_PODMAN} tag {TLS_IMAGE} {IMAGE}; "
                f"{ACCOUNT_PODMAN} rmi {TLS_IMAGE} ) >/dev/null 2>&1; true",
            )


def test_a_login_to_an_unverified_registry_is_refused_before_any_change(deployed, tmp_path):
    """registry_login = true with the sandbox's plain-HTTP registry (registry_tls_verify = false):
    validate refuses it, naming both settings and the fix, and so does the deploy, before any host
    is touched and before the registry hears a single request."""
    sandbox = deployed
    key = f"nvapi-TEST{uuid.uuid4().hex}"
    inventory = write_inventory(tmp_path / "inv", base="sandbox", settings={"registry_login": True})
    check = subprocess.run(
        [console_script("nemotron-deploy"), "validate", str(inventory)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    said = check.stdout + check.stderr
    assert check.returncode != 0, f"validate accepted a login to an unverified registry:\n{said}"
    for words in ("registry_login = true", "registry_tls_verify = false", "10.213.0.2:5000", "CA"):
        assert words in said, f"{words!r} not in validate's refusal:\n{said}"

    removed = _remove_on_every_host(sandbox)
    before, requests = _watched(sandbox), _registry_requests()
    for runtime in ("pyxis", "podman"):
        run = pyinfra(inventory=inventory, env=clean_env(NGC_API_KEY=key, NEMOTRON_SANDBOX_RUNTIME=runtime))
        assert run.rc != 0, f"{runtime}: the deploy logged in to an unverified registry:\n{run.describe()}"
        assert "registry_login = true" in run.output and "registry_tls_verify = false" in run.output, (
            run.describe()
        )
        assert "nothing was changed" in run.output and "Starting operation" not in run.output, run.describe()
        assert key not in run.output
    _assert_untouched(sandbox, removed, before)
    assert _registry_requests() == requests, "the refused deploy reached the registry"


def test_a_key_from_the_environment_is_never_sent_unverified(deployed, tmp_path):
    """An image on nvcr.io (logged in to by default) with registry_tls_verify = false and the key in
    $NGC_API_KEY: validate can't know of the key; the deploy refuses before reading any host, naming
    the variable, the settings and the fix. (A stand-in file where the import would land: without the
    refusal the deploy would go on without fetching anything, so nothing beyond the sandbox is called.)"""
    from nemotron_deploy.inventory import load

    sandbox = deployed
    key = f"nvapi-TEST{uuid.uuid4().hex}"
    nvcr = "nvcr.io#nvidia/nemo:24.01.framework"
    inventory = write_inventory(tmp_path / "inv", base="sandbox", settings={"container_image": nvcr})
    image_file = load(str(inventory)).settings.image_file
    ssh(sandbox, FIRST, f"echo stand-in > {image_file}")  # in the images dir the first deploy made
    try:
        removed = _remove_on_every_host(sandbox)
        before, requests = _watched(sandbox), _registry_requests()
        run = pyinfra(inventory=inventory, env=clean_env(NGC_API_KEY=key))
        assert run.rc != 0, f"the deploy went on with a key for an unverified registry:\n{run.describe()}"
        for words in (
            "$NGC_API_KEY",
            "nvcr.io",
            "registry_tls_verify = false",
            "registry_login = false",
            "CA",
        ):
            assert words in run.output, f"{words!r} not in the refusal:\n{run.describe()}"
        assert "nothing was changed" in run.output and "Starting operation" not in run.output, run.describe()
        assert key not in run.output
        _assert_untouched(sandbox, removed, before)
        assert _registry_requests() == requests
    finally:
        ssh(sandbox, FIRST, f"rm -f {image_file}")
        deploy_ok()


# --- 8. --dry ------------------------------------------------------------------------------------------


def test_dry_run_shows_the_change_without_making_it(sandbox):
    _healthy_nodes(sandbox)
    path = compute_script("nemo_inference.sh")

    def attempt() -> None:
        ssh(sandbox, FIRST, f"rm -f {path}")
        before = _watched(sandbox)

        plan = dry_plan()
        assert FIRST in plan["Job files"], f"--dry --json does not plan the missing file: {plan}"
        changed_hosts = set().union(*plan.values())
        assert changed_hosts == {FIRST}, f"--dry plans changes beyond {FIRST}'s missing file: {plan}"

        run = pyinfra("--dry", yes=False)
        assert run.rc == 0, run.describe()
        detected = run.output.split("--> Detected changes:", 1)[-1].splitlines()
        assert any(line.strip().startswith("Job files") and f"1 ({FIRST})" in line for line in detected), (
            run.output
        )

        assert not exists(sandbox, FIRST, path), "--dry put the file back"
        assert _watched(sandbox) == before, "--dry changed files"

    converged_attempts(attempt)
