"""The docker runtime for real: one Docker engine (Debian's docker.io 20.10) per compute node, started
on demand (sandbox/docker.py), pulling from the sandbox registry.

The deploy with `container_runtime = "docker"` pulls the image on every compute node (with progress
and the stall bound), submits the job, and waits until it generates; each task runs its rank in a
container of its own with the fake GPUs (`--gpus=all`, through the sandbox's stand-in of NVIDIA's
hook). `scancel`, and one rank failing (`srun --kill-on-bad-exit`), leave no container on any node.
The NGC key path: `docker login --password-stdin`, the pull, `docker logout`: the key is in no file.

Every test cancels the jobs it submitted and removes the containers a failure left.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from nemotron_rehearsal import sandbox as sb_api
from nemotron_rehearsal.sandbox import docker as sb_docker
from nemotron_rehearsal.sandbox import netns as sb_netns
from nemotron_rehearsal.sandbox import registry as sb_registry
from sshutil import (
    ENDPOINT_CERT,
    HEALTH_VENV,
    IMAGE,
    JOB_NAME,
    LOGS_DIR,
    PORT,
    SHARED,
    TLS,
    TLS_IMAGE,
    TLS_REGISTRY,
    cancel_jobs,
    clean_env,
    deploy_ok,
    job_ids,
    job_state,
    leftover_processes,
    op_statuses,
    pyinfra,
    rehearsal_key,
    ssh,
    wait_for,
)

DOCKER = {"NEMOTRON_SANDBOX_RUNTIME": "docker"}
PULL_OP = f"Pull {IMAGE} (docker)"
HOOK_LOG = "/var/log/nvidia-container-runtime-hook.log"
GONE_WITHIN = 20  # seconds: every container of a job gone after its end


@pytest.fixture(scope="module", autouse=True)
def engines(sandbox):
    """The compute nodes' Docker engines (started if they aren't), and the sandbox to these tests
    alone: they submit and cancel jobs that take the nodes' GPUs."""
    with sb_api.exclusive_use("docker runtime tests (submit and cancel jobs)"):
        were_running = sb_docker.wanted() and all(sb_docker.running(n) for n in sandbox.compute)
        sb_api.start_docker(sandbox)
        cancel_jobs(sandbox)
        try:
            yield
        finally:
            cancel_jobs(sandbox)
            for node in sandbox.compute_names:
                _remove_containers(sandbox, node)
            deploy_ok(env=clean_env())  # back to the inventory's runtime for the next tests
            if not were_running:  # the sandbox as these tests found it: no engine's memory for others
                sb_api.stop_docker(sandbox)


def _containers(sandbox, node: str, job_id: str = "") -> set[str]:
    """Names of the job's containers on a node, in any state (`docker ps -a`, inside the node)."""
    out = ssh(sandbox, node, f"docker ps -a --filter name=nemotron-{job_id} --format '{{{{.Names}}}}'").stdout
    return set(out.split())


def _left(sandbox, job_id: str) -> dict[str, set[str]]:
    return {n: c for n in sandbox.compute_names if (c := _containers(sandbox, n, f"{job_id}-"))}


def _remove_containers(sandbox, node: str) -> None:
    ssh(sandbox, node, "docker rm -f $(docker ps -aq --filter name=nemotron-) >/dev/null 2>&1; true")


def _remove_image(sandbox, node: str) -> None:
    ssh(sandbox, node, f"docker rmi -f {IMAGE} >/dev/null 2>&1; true")
    assert not _has_image(sandbox, node), f"docker rmi left {IMAGE} on {node}"


def _has_image(sandbox, node: str) -> bool:
    return ssh(sandbox, node, f"docker image inspect {IMAGE} >/dev/null 2>&1", check=False).returncode == 0


def _submit() -> str:
    run = pyinfra("--data", "submit=true", "--data", "replicas=1", timeout=300, env=clean_env(**DOCKER))
    assert run.rc == 0, f"the docker deploy with submit=true failed:\n{run.describe()}"
    return run.output


def _endpoint_generates(sandbox) -> bool:
    """The deployed check's one generation through the endpoint, as a client: TLS against the
    deployed certificate, the rehearsal's API key on standard input."""
    probe = ssh(
        sandbox,
        sandbox.login_host,
        f"{HEALTH_VENV}/bin/python -m nemotron_deploy.service.health --endpoint https://127.0.0.1:{PORT} "
        f"--ca-file {ENDPOINT_CERT} --api-key-file - --no-state-file",
        input=rehearsal_key() + "\n",
        check=False,
    )
    return probe.returncode == 0 and probe.stdout.startswith("NEMOTRON OK")


def _no_container_left(sandbox, job_id: str) -> None:
    deadline = time.monotonic() + GONE_WITHIN
    while left := _left(sandbox, job_id):
        if time.monotonic() > deadline:
            pytest.fail(
                f"containers of job {job_id} left {GONE_WITHIN}s after its end: {left}", pytrace=False
            )
        time.sleep(0.5)
    wait_for(lambda: not leftover_processes(sandbox), GONE_WITHIN, "the job's processes to exit")


def test_a_docker_job_pulls_serves_through_the_endpoint_and_scancel_leaves_no_container(sandbox):
    for node in sandbox.compute_names:
        _remove_image(sandbox, node)
    output = _submit()
    # Pulled on every compute node by its own engine, from the sandbox registry, with progress.
    assert op_statuses(output, PULL_OP) == {
        **dict.fromkeys(sandbox.compute_names, "Success"),
        sandbox.login_host: "Skipped",
    }, output[-4000:]
    assert all(_has_image(sandbox, n) for n in sandbox.compute_names)
    (job_id,) = job_ids(sandbox)
    wait_for(lambda: _endpoint_generates(sandbox), 60, "a generation through the endpoint")

    per_node = sandbox.gpus_per_node
    job_nodes = sandbox.compute_names[:2]  # the one replica's 2 nodes (of the sandbox's 4)
    running = {node: _containers(sandbox, node, f"{job_id}-") for node in sandbox.compute_names}
    expected = {
        node: {f"nemotron-{job_id}-{i * per_node + local}" for local in range(per_node)}
        if node in job_nodes
        else set()
        for i, node in enumerate(sandbox.compute_names)
    }
    assert running == expected, "one container per task, named after the job and the rank"
    # Each rank runs inside the image, in a container of the node's engine, and sees the node's GPUs.
    probe = (
        "for p in $(pgrep -f '[m]egatron_gpt_eval.py'); do "
        "[ -e /proc/$p/root/opt/nemotron-sandbox-image/README ] && echo image || echo host; "
        "stat -c '%t:%T' /proc/$p/root/dev/nvidia0 /proc/$p/root/dev/nvidia7 /proc/$p/root/dev/nvidiactl "
        "| paste -sd' '; done"
    )
    for node in job_nodes:
        lines = ssh(sandbox, node, probe).stdout.splitlines()
        assert lines == ["image", "c3:0 c3:7 c3:ff"] * per_node, f"{node}: {lines}"
        hooked = ssh(sandbox, node, f"grep -c \"NVIDIA_VISIBLE_DEVICES='all'\" {HOOK_LOG}").stdout
        assert int(hooked) >= per_node, f"{node}: the GPU hook ran {hooked.strip()} times"

    ssh(sandbox, sandbox.login_host, f"scancel {job_id}")
    wait_for(lambda: job_state(sandbox, job_id) == "CANCELLED", 30, f"job {job_id} to be cancelled")
    _no_container_left(sandbox, job_id)


def test_a_failing_rank_ends_every_container_of_the_job(sandbox):
    """srun --kill-on-bad-exit: one rank's container dies (killed by its engine); srun ends the other
    15 tasks, and each stops its container: none is left on any node, and the job ends."""
    if not job_ids(sandbox):
        _submit()
    (job_id,) = job_ids(sandbox)
    victim = f"nemotron-{job_id}-9"  # a rank on the second node
    wait_for(lambda: len(_containers(sandbox, "sb-node02", f"{job_id}-")) == 8, 30, "rank 9's container")
    ssh(sandbox, "sb-node02", f"docker kill {victim}")
    wait_for(lambda: job_state(sandbox, job_id) not in ("RUNNING", "COMPLETING"), 30, f"job {job_id} to end")
    assert job_state(sandbox, job_id) == "FAILED"
    _no_container_left(sandbox, job_id)
    err = (Path(LOGS_DIR) / f"{JOB_NAME}-{job_id}.err").read_text()
    # docker kill's 137 came back through `docker run` and the task; srun then ended the step.
    assert "sb-node02: task 9: Exited with exit code 137" in err, err[-3000:]
    assert f"Terminating StepId={job_id}.0" in err, err[-3000:]


@contextmanager
def _registry_stopped(sandbox):
    """SIGSTOP the registry: it keeps accepting connections (the kernel's backlog) and answers nothing."""
    pids = [
        pid
        for pid in sb_netns.pids_in(sandbox.login.netns)
        if Path(f"/proc/{pid}/comm").read_text().strip() == "docker-registry"
        # the plain-HTTP one (the TLS one, sandbox/registry_tls.py, serves its storage on 5443)
        and str(sb_registry.CONFIG).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(pids) == 1, f"expected one plain docker-registry in {sandbox.login.name}, found {pids}"
    os.kill(pids[0], signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pids[0], signal.SIGCONT)


def test_a_stalled_registry_fails_the_docker_pull_in_time_and_leaves_nothing(sandbox):
    """The stall bound with a real engine: the pull is the daemon's, watched through its temp dir
    (/var/lib/docker/tmp); with the registry stalled it fails the deploy in time, the engine drops the
    pull when its client is killed, and the next deploy pulls."""
    second = sandbox.compute_names[1]
    deploy_ok(env=clean_env(**DOCKER))  # everything else in place: the pull is the only change
    _remove_image(sandbox, second)
    stall = 10  # below docker's own give-up on a registry that answers nothing (~25 s: TLS, then HTTP)
    with _registry_stopped(sandbox):
        run = pyinfra(
            "--data", f"pull_stall_timeout_seconds={stall}", timeout=stall + 120, env=clean_env(**DOCKER)
        )
    assert run.rc != 0, f"the deploy succeeded with the registry stalled:\n{run.describe()}"
    assert run.seconds < stall + 30, f"the stalled pull failed the deploy only after {run.seconds:.0f}s"
    assert op_statuses(run.output, PULL_OP).get(second, "").startswith("Error"), run.describe()
    message = f"pull of {IMAGE} on {second} from registry {sandbox.registry} stalled: no progress for"
    assert message in run.output, run.describe()
    assert not _has_image(sandbox, second)
    leftovers = ssh(sandbox, second, "pgrep -a -f '[d]ocker pull'; ls -A /var/lib/docker/tmp; true").stdout
    assert not leftovers.strip(), f"the stopped pull left this on {second}: {leftovers}"

    run = deploy_ok(env=clean_env(**DOCKER))  # the registry answers again
    assert op_statuses(run.output, PULL_OP).get(second) == "Success", run.output
    assert _has_image(sandbox, second)


def test_the_ngc_key_is_used_for_docker_login_and_leaves_the_node(sandbox):
    """registry_login, against the TLS registry the engines verify (the sandbox CA in the node's
    /etc/docker/certs.d only): `docker login --password-stdin` from a 0600 file, the pull, `docker
    logout`: afterwards the key is in no file of any node, nor in docker's config.json."""
    key = f"nvapi-TEST{uuid.uuid4().hex}"
    tls_pull_op = f"Pull {TLS_IMAGE} (docker)"
    for node in sandbox.compute_names:
        _remove_image(sandbox, node)
        ssh(sandbox, node, f"docker rmi -f {TLS_IMAGE} >/dev/null 2>&1; true")
    try:
        run = pyinfra(
            "-vvv", "--data", "registry_login=true", env=clean_env(NGC_API_KEY=key, **DOCKER, **TLS)
        )
        assert run.rc == 0, run.describe().replace(key, "<KEY>")
        assert key not in run.output, "the NGC key is in pyinfra's -vvv output"
        assert op_statuses(run.output, tls_pull_op) == {
            **dict.fromkeys(sandbox.compute_names, "Success"),
            sandbox.login_host: "Skipped",
        }
        assert "docker login" in run.output, "the deploy did not log in (registry_login=true)"
        found = subprocess.run(["grep", "-rlF", key, SHARED], capture_output=True, text=True)
        assert found.returncode == 1, f"the key is in shared files: {found.stdout}{found.stderr}"
        auth_line = base64.b64encode(f"$oauthtoken:{key}".encode()).decode()
        for node in [*sandbox.compute_names, sandbox.login_host]:
            grep = ssh(
                sandbox,
                node,
                # (netns: the engine's handle of its network namespace, which can't be read)
                "grep -rlsF -D skip --exclude-dir=netns -f - /tmp /var/tmp /root /opt /run /etc "
                + ("/var/lib/docker" if node != sandbox.login_host else ""),
                input=f"{key}\n{auth_line}\n",
                check=False,
            )
            assert grep.returncode == 1, f"the key is in files on {node}: {grep.stdout}"
        for node in sandbox.compute_names:
            assert (
                ssh(
                    sandbox, node, f"docker image inspect {TLS_IMAGE} >/dev/null 2>&1", check=False
                ).returncode
                == 0
            )
            config = ssh(sandbox, node, "cat /root/.docker/config.json 2>/dev/null; true").stdout
            # Logged in while it pulled (the engine's registry in config.json), out when it ended.
            assert TLS_REGISTRY not in config, f"{node}: docker is still logged in:\n{config}"
    finally:
        for node in sandbox.compute_names:
            # The image under the inventory's own name again, as the tests after this one expect it.
            ssh(
                sandbox,
                node,
                f"docker logout {TLS_REGISTRY} >/dev/null 2>&1; docker tag {TLS_IMAGE} {IMAGE} >/dev/null 2>&1; "
                f"docker rmi {TLS_IMAGE} >/dev/null 2>&1; true",
            )


def test_a_login_the_engine_would_not_verify_is_refused_before_the_key_leaves(sandbox):
    """docker has no --tls-verify: an inventory that says the registry is verified, for a registry
    the engine lists in insecure-registries (the sandbox's plain-HTTP one), gets no login: the deploy
    asks each engine first, stops, and the key never reaches a node."""
    key = f"nvapi-TEST{uuid.uuid4().hex}"
    for node in sandbox.compute_names:
        _remove_image(sandbox, node)
    run = pyinfra(
        "--data", "registry_tls_verify=true", "--data", "registry_login=true",
        env=clean_env(NGC_API_KEY=key, **DOCKER),
    )  # fmt: skip
    assert run.rc != 0, f"the deploy logged in through an engine that does not verify:\n{run.describe()}"
    assert "insecure-registries" in run.output and "registry_login = false" in run.output, run.describe()
    assert key not in run.output
    for node in sandbox.compute_names:
        grep = ssh(sandbox, node, "grep -rlsF -D skip --exclude-dir=netns -f - /tmp /var/tmp /root /run /etc",
                   input=key + "\n", check=False)  # fmt: skip
        assert grep.returncode == 1, f"the key reached {node}: {grep.stdout}"
        assert not _has_image(sandbox, node), f"{node} pulled after the refused login"
    deploy_ok(env=clean_env(**DOCKER))  # without a key: pulled as before


def test_the_engines_are_the_nodes_own(sandbox):
    """Each engine runs in its node: its own data root (the node's dir), socket and containerd, the
    sandbox registry as insecure in the node's daemon.json only, and the driver the docs name."""
    for node in sandbox.compute:
        info = ssh(
            sandbox, node.name, "docker info --format '{{.DockerRootDir}} {{.Driver}} {{.Name}}'"
        ).stdout.split()
        assert info == ["/var/lib/docker", sb_docker.driver(node), node.name], info
        source = ssh(sandbox, node.name, "findmnt -n -o SOURCE /var/lib/docker").stdout
        assert str(node.local_dir / sb_docker.DATA_ROOT_DIR) in source, source
        own = ssh(sandbox, node.name, "test -S /run/docker/containerd/containerd.sock", check=False)
        assert own.returncode == 0, "dockerd's own containerd, under the node's /run"
        # Debian's client, whatever a host may have in its own /usr/local/bin (the nodes' is private).
        client = ssh(
            sandbox,
            node.name,
            "command -v docker; docker version --format '{{.Client.Version}} {{.Server.Version}}'",
        ).stdout.split()
        assert client[0] == "/usr/bin/docker" and client[1] == client[2], client
    assert sb_docker.driver(sandbox.compute[0]) == "overlay2"
    # No engine outside the compute nodes: the host (and the login node) run none.
    in_nodes = set().union(*sb_netns.pids_by_netns([n.netns for n in sandbox.compute]).values())
    engines = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    assert {int(p) for p in engines} - in_nodes == set(), "a dockerd runs outside the compute nodes"
    assert len(engines) == len(sandbox.compute), engines


def test_a_node_powered_off_and_on_gets_its_engine_back_with_its_images(sandbox):
    """node_down kills the node's engine with everything else of it; node_up starts it again (the
    engines were asked for), on the same data root: the image pulled before is still there."""
    node = sandbox.compute[-1]
    assert _has_image(sandbox, node.name), "the earlier tests pulled the image on every node"
    sb_api.node_down(node.name)
    try:
        assert not sb_docker.running(node)
    finally:
        sb_api.node_up(node.name)
    assert sb_docker.running(node)
    assert _has_image(sandbox, node.name), "the node's engine came back without its images"
    status = {n["name"]: n["daemons"] for n in sb_api.status()["nodes"]}
    assert status[node.name] == {"sshd": True, "slurmd": True, "dockerd": True, "containerd": True}
