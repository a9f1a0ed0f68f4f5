"""End to end on the sandbox cluster: deploy, submit the 2-node job, get answers from the server with
the deployed client and with the model card's own client, check where the 16 tasks ran, that a job
leaves no process behind when it ends (smoke) or is cancelled (serve), that a re-deploy after a
submit changes nothing, and that the health check fails fast with the state of a job killed during
start-up, and that a cancelled job of the podman runtime leaves no container on any node.

Every test cancels the jobs it submitted, so the next one starts with an idle cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import model_card_client
from nemotron_rehearsal import sandbox as sb_api
from sshutil import (
    AS_SERVICE_USER,
    CRON_FILE,
    HEALTH_USER,
    HEALTH_VENV,
    IMAGE,
    IMAGE_FILE,
    IMAGES_DIR,
    JOB_NAME,
    LOGS_DIR,
    PODMAN,
    PORT,
    RECORDS_DIR,
    REPO,
    SBATCH,
    SCRIPTS_DIR,
    Run,
    cancel_jobs,
    clean_env,
    console_script,
    converged_attempts,
    deploy_ok,
    job_ids,
    job_state,
    leftover_processes,
    op_statuses,
    pyinfra,
    results_table,
    ssh,
    wait_for,
)

OK_LINE = re.compile(r"NEMOTRON OK - ready after \S+ \(\d+ attempts\): generated")
FIRST = "sb-node01"


def _idle(sandbox) -> None:
    """No GPU faults, sshd everywhere, no job of ours queued or running."""
    for node in sandbox.compute_names:
        sb_api.clear_gpu_faults(node)
    for node in sb_api.status()["nodes"]:
        if not node["daemons"].get("sshd"):
            sb_api.start_node_sshd(node["name"])
    cancel_jobs(sandbox)


def _deploy(*args: str) -> Run:
    """A deploy of these tests' one replica (the sandbox's other 2 nodes stay idle)."""
    return deploy_ok("--data", "replicas=1", *args)


def _submit(*data: str, env: dict[str, str] | None = None) -> Run:
    """Deploy with `--data submit=true` (plus `data`), which waits until the health check says OK."""
    # One replica (2 of the sandbox's 4 nodes): these tests follow one job; test_replicas.py runs two.
    args = [a for d in ("submit=true", "replicas=1", *data) for a in ("--data", d)]
    run = pyinfra(*args, timeout=240, env=clean_env(**(env or {})))
    assert run.rc == 0, f"deploy with submit=true failed:\n{run.describe()}"
    return run


def _only_job(sandbox) -> str:
    ids = job_ids(sandbox)
    assert len(ids) == 1, f"expected one {JOB_NAME} job, Slurm has {ids}"
    return ids[0]


def _logs(job_id: str) -> tuple[str, str]:
    base = Path(LOGS_DIR) / f"{JOB_NAME}-{job_id}"
    return (
        Path(f"{base}.out").read_text(errors="replace"),
        Path(f"{base}.err").read_text(errors="replace"),
    )


def _no_job_processes_left(sandbox, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while left := leftover_processes(sandbox):
        if time.monotonic() > deadline:
            pytest.fail(f"job processes still running {timeout}s after the job ended: {left}", pytrace=False)
        time.sleep(0.5)


_serving: dict[str, tuple[str, Run]] = {}


@pytest.fixture
def serving(sandbox):
    """A serve-mode job submitted by the deploy, shared by the tests that only look at it: submitted
    again if a test in between ended it. (job id, the submitting deploy's run)."""
    job = _serving.get("job")
    if job is None or job_state(sandbox, job[0]) != "RUNNING":
        _idle(sandbox)
        run = _submit()
        _serving["job"] = (_only_job(sandbox), run)
    return _serving["job"]


@pytest.fixture(scope="module", autouse=True)
def _alone(sandbox):
    """These tests submit and cancel jobs that take every GPU of the cluster: no other user of the
    sandbox runs meanwhile (see sandbox/locks.py); the last job is cancelled at the end."""
    with sb_api.exclusive_use("end-to-end tests (submit and cancel jobs)"):
        yield
        _serving.clear()
        cancel_jobs(sandbox)


# --- 1. the whole path ---------------------------------------------------------------------------


def test_the_whole_path_both_clients_get_an_answer(sandbox, serving, tmp_path):
    card_client = model_card_client()  # skips unless NEMOTRON_MODEL_CARD_CLIENT is set (.ci/run sets it)
    job_id, run = serving
    assert OK_LINE.search(run.output), f"the deploy's output has no health OK line:\n{run.output[-3000:]}"
    assert job_state(sandbox, job_id) == "RUNNING"

    # The deployed client, from the rendered files, run here against the job's first node.
    rendered = tmp_path / "rendered"
    subprocess.run(
        [console_script("nemotron-deploy"), "render", "inventories/sandbox.py", "--out", str(rendered)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    first = sandbox.node(FIRST).address
    ours = subprocess.run(
        [sys.executable, str(rendered / "call_server.py"), "--host", first, "--port", str(PORT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ours.returncode == 0, ours.stdout + ours.stderr
    prompt, answer = ours.stdout.split("\n", 1)
    assert prompt == "Write a poem on NVIDIA in the style of Shakespeare"
    assert answer.strip(), f"no answer: {ours.stdout!r}"

    # The model card's own client, unchanged: it talks to localhost:1424, so it runs on the node.
    requests_ok = ssh(sandbox, FIRST, "/usr/bin/python3 -c 'import requests'", check=False)
    if requests_ok.returncode != 0:
        pytest.fail(
            "setup gap: the model card's client needs `requests`, and /usr/bin/python3 on the compute node "
            f"can't import it (install python3-requests on the host; the nodes share its /usr):\n"
            f"{requests_ok.stderr}",
            pytrace=False,
        )
    card = ssh(sandbox, FIRST, "python3 -", input=card_client.read_text(), check=False)
    assert card.returncode == 0, f"the model card's client failed:\n{card.stdout}{card.stderr}"
    # Greedy generation is deterministic: both clients print the prompt and the same continuation.
    assert card.stdout == ours.stdout, f"model card client:\n{card.stdout}\ndeployed client:\n{ours.stdout}"


# --- 2. where the tasks run ----------------------------------------------------------------------


def test_sixteen_tasks_run_eight_per_node_with_the_right_node_ids(sandbox, serving):
    job_id, _ = serving
    # Each rank's own environment, as srun gave it to the server process (not what the batch shell saw).
    script = (
        "for p in $(pgrep -f megatron_gpt_eval.py); do "
        "tr '\\0' '\\n' < /proc/$p/environ | grep -E '^SLURM_(JOB_ID|PROCID|NODEID|LOCALID)=' | sort | "
        "paste -sd' '; done"
    )
    seen: dict[int, tuple[str, int, int]] = {}
    for node in sandbox.compute_names:
        for line in ssh(sandbox, node, script).stdout.splitlines():
            env = dict(item.split("=", 1) for item in line.split())
            if env.get("SLURM_JOB_ID") != job_id:
                continue
            rank = int(env["SLURM_PROCID"])
            assert rank not in seen, f"rank {rank} runs twice: {seen[rank]} and {node}"
            seen[rank] = (node, int(env["SLURM_NODEID"]), int(env["SLURM_LOCALID"]))
    expected = {rank: (sandbox.compute_names[rank // 8], rank // 8, rank % 8) for rank in range(16)}
    assert seen == expected, f"(node, node id, local id) per rank:\n{seen}"

    # The emulator's log says the same: every rank 0-15 loaded, and rank 0 serves.
    _, err = _logs(job_id)
    loaded = {int(r) for r in re.findall(r"megatron_gpt_eval:\d+ rank(\d+)\] Loaded checkpoint", err)}
    assert loaded == set(range(16)), f"ranks that loaded: {sorted(loaded)}"
    assert "[rank 0 node 0] server ready" in err, err[-2000:]


# --- 4. a re-deploy after a submit ---------------------------------------------------------------------


def test_a_redeploy_after_submit_reports_zero_changes(sandbox, serving):
    job_id, _ = serving

    def no_change() -> None:
        run = _deploy()
        table = results_table(run.output)
        assert table["Grand total"]["Success"] == "-", f"re-deploy after submit changed things:\n{run.output}"

    converged_attempts(no_change, 3, "--data", "replicas=1")
    assert job_ids(sandbox) == [job_id], "the re-deploy (submit=false) touched the running job"


def test_the_scheduled_check_finds_the_job_slurm_hides_from_its_user(sandbox, serving):
    """The sandbox's Slurm runs with PrivateData=jobs, as many sites do: the health user sees no job in
    squeue. Before: the timer's check then said job_gone forever; now it reads the job's record."""
    job_id, _ = serving
    login = sandbox.login_host
    hidden = ssh(sandbox, login, f"runuser -u {HEALTH_USER} -- squeue -h -n {JOB_NAME} -o %i").stdout
    assert hidden.strip() == "", f"PrivateData=jobs should hide root's job from {HEALTH_USER}: {hidden}"
    cron = ssh(sandbox, login, f"cat {CRON_FILE}").stdout
    command = cron.splitlines()[-1].split(f" {HEALTH_USER} ", 1)[1].removesuffix(" >/dev/null 2>&1")
    check = ssh(sandbox, login, f"runuser -u {HEALTH_USER} -- {command}", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("NEMOTRON OK"), check.stdout
    record = json.loads(ssh(sandbox, login, f"cat {RECORDS_DIR}/{JOB_NAME}.job.json").stdout)
    assert record["job_id"] == job_id and record["node"] == FIRST


def test_every_rank_runs_inside_the_imported_image(sandbox, serving):
    """pyxis for real: the 16 servers run in enroot containers made from the imported squashfs
    (the image's own files, e.g. its README, are at their root; the host's python tests are not)."""
    for node in sandbox.compute_names[:2]:  # the one replica's 2 nodes (of the sandbox's 4)
        probe = ssh(
            sandbox,
            node,
            "for p in $(pgrep -f '[m]egatron_gpt_eval.py'); do "  # [m]: not this shell itself
            "if [ -e /proc/$p/root/opt/nemotron-sandbox-image/README ] && "
            "[ ! -e /proc/$p/root/usr/lib/python3.11/test ]; then echo inside; else echo outside; fi; done",
        ).stdout.split()
        assert probe == ["inside"] * sandbox.gpus_per_node, f"{node}: {probe}"


def test_the_server_and_its_job_run_as_the_service_user_not_root(sandbox, serving):
    """service_user (the sandbox's `nemotron`, the same UID on every node): Slurm runs the job as it
    and every rank's server process, in its enroot container, is that account's; the job files are
    mounted read-only into the container."""
    job_id, _ = serving
    user = ssh(sandbox, sandbox.login_host, f"squeue -h -j {job_id} -o %u").stdout.strip()
    assert user == "nemotron", f"job {job_id} runs as {user!r}, not the service user"
    for node in sandbox.compute_names[:2]:
        owners = ssh(
            sandbox, node, "for p in $(pgrep -f '[m]egatron_gpt_eval.py'); do stat -c %U /proc/$p; done"
        ).stdout.split()
        assert owners == ["nemotron"] * sandbox.gpus_per_node, f"{node}: server processes of {owners}"
        pid = ssh(sandbox, node, "pgrep -f '[m]egatron_gpt_eval.py' | head -n 1").stdout.strip()
        mounts = ssh(sandbox, node, f"cat /proc/{pid}/mounts").stdout
        scripts = [line for line in mounts.splitlines() if f" {SCRIPTS_DIR} " in line]
        assert scripts and all(" ro," in line or " ro " in line for line in scripts), scripts or mounts


def test_a_new_image_tag_is_imported_beside_the_running_jobs_file(sandbox, serving):
    """pyxis: a new tag is a new file (never the old name reused), imported while the job serves from
    the old one, which stays in place; the sbatch then points at the new file."""
    job_id, _ = serving
    new_file = IMAGE_FILE.replace("24.01.framework", "24.05")
    ssh(sandbox, FIRST, f"rm -f {new_file}")
    try:
        run = _deploy("--data", "container_image=10.213.0.2:5000#nvidia/nemo:24.05")
        assert op_statuses(run.output, "Import 10.213.0.2:5000#nvidia/nemo:24.05 (pyxis)")[FIRST] == "Success"
        listing = ssh(sandbox, FIRST, f"ls {IMAGES_DIR}").stdout.split()
        assert listing == sorted([IMAGE_FILE.rsplit("/", 1)[1], new_file.rsplit("/", 1)[1]]), listing
        assert f"--container-image={new_file}" in Path(SBATCH).read_text()
        assert job_state(sandbox, job_id) == "RUNNING", "the running job lost its image"
    finally:
        _deploy()  # back to the inventory's tag (the sbatch again points at the first file)
        ssh(sandbox, FIRST, f"rm -f {new_file}")
    assert f"--container-image={IMAGE_FILE}" in Path(SBATCH).read_text()


# --- 3. nothing is left behind ----------------------------------------------------------------------------


def test_a_smoke_job_ends_by_itself_and_leaves_nothing(sandbox):
    _idle(sandbox)
    try:
        run = _submit("mode=smoke")  # waits until the job has ended
        job_id = max(job_ids(sandbox, states="all"), key=int)
        assert f"job {job_id} COMPLETED: the smoke test passed" in run.output, run.output[-3000:]
        assert OK_LINE.search(run.output), run.output[-3000:]  # the job's own health check, from its .out
        assert job_state(sandbox, job_id) == "COMPLETED"
        out, err = _logs(job_id)
        assert "Write a poem on NVIDIA in the style of Shakespeare\n" in out, out[-2000:]
        assert "smoke call finished with status 0" in err, err[-2000:]
        _no_job_processes_left(sandbox)
    finally:
        cancel_jobs(sandbox)
        _deploy()  # back to the inventory's mode (serve) for the next tests


def test_a_cancelled_serve_job_leaves_nothing(sandbox):
    _idle(sandbox)
    try:
        _submit()
        job_id = _only_job(sandbox)
        running = leftover_processes(sandbox)
        nodes = set(sandbox.compute_names[:2])  # the one replica's 2 nodes (of the sandbox's 4)
        assert set(running) == nodes, f"the job should run on both of its nodes: {running}"
        ssh(sandbox, sandbox.login_host, f"scancel {job_id}")
        wait_for(lambda: job_state(sandbox, job_id) == "CANCELLED", 30, f"job {job_id} to be cancelled")
        _no_job_processes_left(sandbox)
    finally:
        cancel_jobs(sandbox)


# --- 5. the health check and a job killed during start-up ------------------------------------------------


def test_health_fails_fast_with_the_state_of_a_job_killed_during_startup(sandbox):
    _idle(sandbox)
    _deploy()  # the sbatch file and the health venv are in place
    login = sandbox.login_host
    try:
        job_id = ssh(
            sandbox,
            login,
            f"{AS_SERVICE_USER} sbatch --parsable --export=ALL,NEMO_EMULATOR_LOAD_DELAY=60 {SBATCH}",
        ).stdout.strip()
        assert job_id.isdigit(), job_id
        wait_for(lambda: job_state(sandbox, job_id) == "RUNNING", 30, f"job {job_id} to start")
        health = subprocess.Popen(
            sandbox.ssh_argv(
                login,
                f"{HEALTH_VENV}/bin/python -m nemotron_deploy.service.health --wait --slurm-job {JOB_NAME} "
                "--budget 120 --no-progress",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            time.sleep(2)  # the check is waiting: the server is still "loading" for a minute
            assert health.poll() is None, (
                f"health returned before the server could answer: {health.stdout.read()}"
            )
            ssh(sandbox, login, f"scancel {job_id}")
            cancelled = time.monotonic()
            output, _ = health.communicate(timeout=30)
            took = time.monotonic() - cancelled
        finally:
            if health.poll() is None:
                health.kill()
        assert health.returncode == 2, f"expected CRITICAL (2), got {health.returncode}:\n{output}"
        assert "CANCELLED" in output and job_id in output, output
        assert took < 10, f"health took {took:.1f}s to notice the cancelled job:\n{output}"
    finally:
        cancel_jobs(sandbox)


# --- 6. the podman runtime: a cancelled job leaves no container ------------------------------------------


def _containers(sandbox, node: str, *, all_states: bool = False) -> set[str]:
    """Names of the containers of the sandbox's image on a node (podman ps, run inside the node)."""
    listing = "podman ps -a" if all_states else "podman ps"
    out = ssh(sandbox, node, f"{listing} --filter ancestor={IMAGE} --format '{{{{.Names}}}}'").stdout
    return set(out.split())


def test_a_cancelled_podman_job_leaves_no_container(sandbox):
    """podman's containers are conmon's, not srun's: scancel used to end the clients only and leave the
    containers (and their GPUs) behind. Each task now names its container and stops it when signalled."""
    _idle(sandbox)
    try:
        _submit(env=PODMAN)  # waits until rank 0, in its container, generates
        job_id = _only_job(sandbox)
        per_node = sandbox.gpus_per_node
        job_nodes = sandbox.compute_names[:2]  # the one replica's 2 nodes (of the sandbox's 4)
        running = {node: _containers(sandbox, node) for node in sandbox.compute_names}
        assert {node: len(names) for node, names in running.items()} == {
            node: per_node if node in job_nodes else 0 for node in sandbox.compute_names
        }, f"one container per task on each of the job's nodes, none elsewhere: {running}"
        # The user site-packages are kept out of every rank's Python, inside its container.
        environ = (
            "for p in $(pgrep -f megatron_gpt_eval.py); do "
            f"grep -qxz SLURM_JOB_ID={job_id} /proc/$p/environ && "
            "{ grep -qxz PYTHONNOUSERSITE=1 /proc/$p/environ && echo yes || echo no; }; done; true"
        )
        for node in job_nodes:
            flags = ssh(sandbox, node, environ).stdout.split()
            assert flags == ["yes"] * per_node, f"{node}: PYTHONNOUSERSITE=1 in the ranks: {flags}"

        ssh(sandbox, sandbox.login_host, f"scancel {job_id}")
        wait_for(lambda: job_state(sandbox, job_id) == "CANCELLED", 30, f"job {job_id} to be cancelled")
        deadline = time.monotonic() + 20
        while left := {
            n: c for n in sandbox.compute_names if (c := _containers(sandbox, n, all_states=True))
        }:
            if time.monotonic() > deadline:
                pytest.fail(f"containers of job {job_id} left 20s after scancel: {left}", pytrace=False)
            time.sleep(0.5)
        _no_job_processes_left(sandbox)

        # They were named after the job and each task (global rank), so each task could stop its own.
        expected = {
            node: {f"nemotron-{job_id}-{i * per_node + local}" for local in range(per_node)}
            if node in job_nodes
            else set()
            for i, node in enumerate(sandbox.compute_names)
        }
        assert running == expected
    finally:
        cancel_jobs(sandbox)
        for node in sandbox.compute_names:  # whatever a failure left, for the tests after this one
            ssh(
                sandbox,
                node,
                f"podman rm -f $(podman ps -aq --filter ancestor={IMAGE}) >/dev/null 2>&1; true",
            )
            ssh(sandbox, node, f"rm -f {SCRIPTS_DIR}/nemo_container.sh")
        _deploy()  # back to the inventory's runtime (host) for the next tests
