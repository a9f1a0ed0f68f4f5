"""The apptainer runtime for real: Apptainer 1.4.5 built by scripts/setup from rehearsal/vendor/
(sandbox/apptainer.py puts it on the compute nodes), pulling from the sandbox registry.

The deploy with `container_runtime = "apptainer"` pulls the image once into a SIF on shared storage
(`apptainer pull --no-https`: the inventory's registry_tls_verify = false, for the plain-HTTP
registry), submits the job, and waits until it generates; `srun apptainer exec --nv --no-home` runs
every rank inside the image, as the unprivileged service_user (user namespaces, the SIF mounted with
squashfuse). Through the endpoint it generates; after `scancel` no process of the job
(nor an apptainer starter) is left on any node.

The tests cancel the jobs they submitted and deploy the inventory's own runtime again at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from nemotron_rehearsal import sandbox as sb_api
from nemotron_rehearsal.sandbox import apptainer as sb_apptainer
from sshutil import (
    ENDPOINT_CERT,
    HEALTH_VENV,
    IMAGE,
    IMAGES_DIR,
    PORT,
    cancel_jobs,
    clean_env,
    deploy_ok,
    job_ids,
    job_state,
    leftover_processes,
    op_statuses,
    pyinfra,
    rehearsal_key,
    reset_deploy,
    ssh,
    wait_for,
)

APPTAINER = {"NEMOTRON_SANDBOX_RUNTIME": "apptainer"}
IMPORT_OP = f"Import {IMAGE} (apptainer)"
SIF = f"{IMAGES_DIR}/10.213.0.2+5000+nvidia+nemo+24.01.framework.sif"
GONE_WITHIN = 20  # seconds: every process of a job gone after its end
# Apptainer's process around each container: its starter (comm `starter`, titled "Apptainer runtime
# parent: <image>"), the parent of the rank's own processes.
STARTER = "pgrep -ax starter"


@pytest.fixture(scope="module", autouse=True)
def apptainer_runtime(sandbox):
    """The sandbox to these tests alone (they submit and cancel jobs that take the nodes' GPUs)."""
    if sb_apptainer.find() is None:
        pytest.fail("apptainer is not installed on this machine: run scripts/setup", pytrace=False)
    with sb_api.exclusive_use("apptainer runtime tests (submit and cancel jobs)"):
        # From a never-deployed cluster: whatever another run left (files, a service account's
        # directories the deploy rightly refuses to adopt) is not this path's to inherit.
        reset_deploy(sandbox)
        try:
            yield
        finally:
            cancel_jobs(sandbox)
            deploy_ok(env=clean_env())  # back to the inventory's runtime for the next tests


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


def _apptainer_left(sandbox) -> dict[str, str]:
    found = {}
    for node in sandbox.compute_names:
        if out := ssh(sandbox, node, f"{STARTER}; true").stdout.strip():
            found[node] = out
    return found


def test_an_apptainer_job_pulls_a_sif_serves_through_the_endpoint_and_scancel_leaves_nothing(sandbox):
    first = sandbox.compute_names[0]
    for node in sandbox.compute_names:
        version = ssh(sandbox, node, "apptainer version", check=False)
        assert version.returncode == 0, f"{node} has no apptainer: {version.stdout}{version.stderr}"
    Path(SIF).unlink(missing_ok=True)  # the shared dir is the same path on the host: import anew

    run = pyinfra("--data", "submit=true", "--data", "replicas=1", timeout=300, env=clean_env(**APPTAINER))
    assert run.rc == 0, f"the apptainer deploy with submit=true failed:\n{run.describe()}"
    # Pulled once, by the first compute node, into a SIF on shared storage that every node reads.
    skipped = {node: "Skipped" for node in [*sandbox.compute_names[1:], sandbox.login_host]}
    assert op_statuses(run.output, IMPORT_OP) == {first: "Success", **skipped}, run.output[-4000:]
    sif = Path(SIF)
    assert sif.read_bytes()[:128].find(b"SIF_MAGIC") >= 0, "not a SIF file"
    assert sif.stat().st_mode & 0o777 == 0o644
    partial = [p.name for p in sif.parent.iterdir() if p.name.endswith(".partial")]
    assert partial == [], "nothing half-written beside it"
    scratch = list((sif.parent.parent / ".import-tmp").iterdir())
    assert scratch == [], f"the import left its scratch (layers) behind: {scratch}"
    (job_id,) = job_ids(sandbox)
    wait_for(lambda: _endpoint_generates(sandbox), 60, "a generation through the endpoint")

    # Every rank runs inside the image (its root is the SIF's, which has the stand-in image's README),
    # under apptainer's starter: 8 on each of the replica's 2 nodes.
    probe = (
        "for p in $(pgrep -f '[m]egatron_gpt_eval.py'); do "
        "[ -e /proc/$p/root/opt/nemotron-sandbox-image/README ] && echo image || echo host; done"
    )
    per_node = sandbox.gpus_per_node
    for node in sandbox.compute_names[:2]:
        lines = ssh(sandbox, node, probe).stdout.splitlines()
        assert lines == ["image"] * per_node, f"{node}: {lines}"
        starters = ssh(sandbox, node, f"{STARTER}; true").stdout.splitlines()
        assert len(starters) == per_node, f"{node}: one apptainer starter per rank expected: {starters}"
        assert all("Apptainer runtime parent:" in line and line.endswith(".sif") for line in starters), (
            starters
        )

    ssh(sandbox, sandbox.login_host, f"scancel {job_id}")
    wait_for(lambda: job_state(sandbox, job_id) == "CANCELLED", 30, f"job {job_id} to be cancelled")
    deadline = time.monotonic() + GONE_WITHIN
    while (left := leftover_processes(sandbox)) or (left := _apptainer_left(sandbox)):
        if time.monotonic() > deadline:
            pytest.fail(f"processes of job {job_id} left {GONE_WITHIN}s after scancel: {left}", pytrace=False)
        time.sleep(0.5)


def test_a_second_apptainer_deploy_imports_nothing(sandbox):
    """The SIF is there: the import is not run again (a new tag gets a new file)."""
    if not Path(SIF).is_file():
        deploy_ok(env=clean_env(**APPTAINER))
    run = deploy_ok(env=clean_env(**APPTAINER))
    statuses = op_statuses(run.output, IMPORT_OP)
    assert statuses.get(sandbox.compute_names[0]) == "No changes", run.output[-3000:]
