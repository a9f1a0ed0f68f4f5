"""The sandbox cluster: namespaced nodes reachable over SSH, Slurm with fake GPUs, the registry and podman,
the nvidia-smi stand-in, fault injection, and a `down` that leaves nothing behind.

Tests marked `sandbox` need root and bring the sandbox up (or reuse a running one of the same size);
without root they FAIL with what to do. The stand-in's format tests at the top need nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from nemotron_rehearsal import EMULATOR, NVIDIA_SMI_CAPTURES, PACKAGE_DIR
from nemotron_rehearsal import sandbox as sb_api
from nemotron_rehearsal.sandbox import gpus, layout, netns, nvidia_smi, slurm
from nemotron_rehearsal.sandbox.proc import pid_alive
from nemotron_rehearsal.sandbox.testing import CREATED_BY_TESTS
from sshutil import cancel_jobs

ROOT = REPO
CAPTURES = NVIDIA_SMI_CAPTURES
STAND_IN = PACKAGE_DIR / "sandbox" / "nvidia_smi.py"


# --- the nvidia-smi stand-in, run locally against the packaged captures ---------------------------


@pytest.fixture
def smi(tmp_path):
    """Run the stand-in with N GPUs and optional faults; returns (exit code, stdout)."""

    def call(*args: str, gpus: int = 2, faults: dict | None = None) -> tuple[int, str]:
        faults_file = tmp_path / "faults.json"
        if faults is not None:
            faults_file.write_text(json.dumps(faults))
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"gpus": gpus, "captures": str(CAPTURES), "faults": str(faults_file)}))
        env = {**os.environ, "NEMOTRON_SANDBOX_NVIDIA_SMI_CONFIG": str(config)}
        result = subprocess.run(
            [sys.executable, str(STAND_IN), *args], capture_output=True, text=True, env=env, timeout=30
        )
        return result.returncode, result.stdout

    return call


def _identity_free(text: str) -> str:
    """Mask what the stand-in must change per GPU (UUID, serial, PDI, module id) to compare formats."""
    text = re.sub(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "GPU-UUID", text)
    text = re.sub(r"<serial>\d+</serial>", "<serial/>", text)
    text = re.sub(r"<pdi>0x[0-9a-f]+</pdi>", "<pdi/>", text)
    return re.sub(r"<module_id>\d+</module_id>", "<module_id/>", text)


@pytest.mark.parametrize(
    ("capture", "args"),
    [
        ("nvidia-smi.txt", []),
        ("L.txt", ["-L"]),
        ("q.xml", ["-q", "-x"]),
        ("ecc.txt", ["-q", "-d", "ECC,PAGE_RETIREMENT,ROW_REMAPPER"]),
        ("topo.txt", ["topo", "-m"]),
        ("nvlink.txt", ["nvlink", "-s"]),
        ("query-name-mem.csv", ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]),
        (
            "health-query.csv",
            [
                "--query-gpu=index,name,memory.total,memory.used,ecc.errors.uncorrected.volatile.total,"
                "clocks_event_reasons.active,retired_pages.pending,remapped_rows.pending,remapped_rows.failure",
                "--format=csv",
            ],
        ),
        (
            "query-gpu.csv",
            [
                "--query-gpu=index,name,uuid,memory.total,memory.used,driver_version,pci.bus_id,persistence_mode,"
                "ecc.mode.current,ecc.errors.uncorrected.volatile.total,temperature.gpu,power.draw,compute_cap",
                "--format=csv",
            ],
        ),
    ],
)
def test_stand_in_with_two_gpus_prints_the_captures(smi, capture, args):
    code, out = smi(*args, gpus=2)
    assert code == 0
    assert _identity_free(out) == _identity_free((CAPTURES / capture).read_text())


def test_stand_in_widens_to_eight_gpus_with_distinct_identities(smi):
    _, listing = smi("-L", gpus=8)
    lines = listing.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"GPU {i}" for i in range(8)]
    assert all("NVIDIA H200" in line for line in lines)
    assert len({line.split("UUID: ")[1] for line in lines}) == 8
    _, table = smi(gpus=8)
    width = {len(line) for line in table.splitlines() if line.startswith(("|", "+"))}
    assert width == {91}, "every table line keeps the captured width"
    assert [int(m) for m in re.findall(r"^\|\s+(\d+)  NVIDIA H200", table, re.M)] == list(range(8))
    _, bus = smi("--query-gpu=pci.bus_id", "--format=csv,noheader", gpus=8)
    assert bus.split() == [f"00000000:00:{6 + i:02X}.0" for i in range(8)]


def test_stand_in_query_gpu_any_fields_units_and_unknowns(smi):
    _, out = smi("--query-gpu=memory.free,gpu_name,not.a.field,count", "--format=csv", gpus=3)
    assert out.splitlines() == [
        "memory.free [MiB], name, not.a.field, count",
        "143156 MiB, NVIDIA H200, [N/A], 3",
        "143156 MiB, NVIDIA H200, [N/A], 3",
        "143156 MiB, NVIDIA H200, [N/A], 3",
    ]
    _, out = smi("--query-gpu=memory.total,power.draw", "--format=csv,nounits", "-i", "1", gpus=3)
    assert out.splitlines() == ["memory.total [MiB], power.draw [W]", "143771, 76.65"]


def test_stand_in_faults(smi):
    faults = {"gpus": 7, "ecc_uncorrected": {"3": 2}, "name": "NVIDIA H100 80GB HBM3"}
    _, out = smi(
        "--query-gpu=index,name,ecc.errors.uncorrected.volatile.total",
        "--format=csv,noheader",
        gpus=8,
        faults=faults,
    )
    rows = [line.split(", ") for line in out.splitlines()]
    assert len(rows) == 7
    assert {r[1] for r in rows} == {"NVIDIA H100 80GB HBM3"}
    assert [r[2] for r in rows] == ["0", "0", "0", "2", "0", "0", "0"]
    _, ecc = smi("-q", "-d", "ECC,PAGE_RETIREMENT,ROW_REMAPPER", "-i", "3", gpus=8, faults=faults)
    assert re.findall(r"DRAM Uncorrectable\s+: (\d+)", ecc) == ["2", "2"]
    code, out = smi(gpus=8, faults={"driver_failure": True})
    assert code == 9 and "couldn't communicate with the NVIDIA driver" in out


def test_stand_in_refuses_uncaptured_invocations(smi):
    code, out = smi("-q", gpus=2)
    assert code == 2 and out == ""


def test_front_repeats_kept_healthy_answers_and_faults_always_reach_the_stand_in(tmp_path):
    """The node's `nvidia-smi` is a shell front: the first healthy call runs the stand-in, which keeps
    its answer; the same arguments again print that answer; a fault file sends every call to the
    stand-in, which keeps nothing then."""
    faults, answers = tmp_path / "faults.json", tmp_path / "answers"
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"gpus": 8, "captures": str(CAPTURES), "faults": str(faults), "cache": str(answers)})
    )
    program = tmp_path / "nvidia-smi"
    program.write_text(
        gpus.front(faults=str(faults), answers=str(answers), stand_in=str(STAND_IN), python=sys.executable)
    )
    program.chmod(0o755)
    env = {**os.environ, "NEMOTRON_SANDBOX_NVIDIA_SMI_CONFIG": str(config)}
    query = ("--query-gpu=index,name", "--format=csv,noheader")

    def run(*args: str) -> str:
        return subprocess.run(
            [program, *args], capture_output=True, text=True, env=env, timeout=30, check=True
        ).stdout

    healthy = [f"{i}, NVIDIA H200" for i in range(8)]
    assert run(*query).splitlines() == healthy
    (kept,) = answers.iterdir()
    kept.write_text(kept.read_text() + "kept\n")  # what the front prints is the kept file
    assert run(*query).splitlines() == [*healthy, "kept"]
    assert run("-L").count("NVIDIA H200") == 8  # other arguments: their own answer
    assert len(list(answers.iterdir())) == 2
    faults.write_text(json.dumps({"gpus": 7}))
    assert run(*query).splitlines() == healthy[:7]
    assert len(list(answers.iterdir())) == 2, "an answer under a fault was kept"
    faults.unlink()
    assert run(*query).splitlines() == [*healthy, "kept"]
    shellcheck = subprocess.run(
        ["shellcheck", "-s", "sh", "-"], input=gpus.FRONT, capture_output=True, text=True
    )
    assert shellcheck.returncode == 0, shellcheck.stdout


def test_slurm_hostlist_and_gres():
    sandbox = layout.plan(16, 8)
    assert slurm.hostlist(sandbox.compute_names) == "sb-node[01-16]"
    assert "File=/opt/nemotron-sandbox/dev/nvidia[0-7]" in slurm.gres_conf(sandbox)
    assert "SlurmctldHost=sb-login(10.213.0.2)" in slurm.slurm_conf(sandbox)
    assert nvidia_smi.ECC_QUERY == {"ECC", "PAGE_RETIREMENT", "ROW_REMAPPER"}


# --- the running sandbox (root) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_slurm(sandbox):
    """No job left by earlier modules (a deployed replica): these tests take the nodes for their own."""
    cancel_jobs(sandbox, timeout=60)


@pytest.fixture
def sb(sandbox, idle_slurm):
    """The session's sandbox (tests/conftest.py: testing.session_sandbox); these tests need >= 2 nodes."""
    assert len(sandbox.compute) >= 2 and sandbox.gpus_per_node == 8
    return sandbox


def ssh(
    sandbox, node: str, command: str, *, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    result = subprocess.run(sandbox.ssh_argv(node, command), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"ssh {node} {command!r} exited {result.returncode}: {result.stderr.strip()}")
    return result


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def test_ssh_reaches_each_node_with_its_hostname_and_address(sb):
    assert sb.login.address == "10.213.0.2"
    assert sb.compute_addresses[:2] == ["10.213.0.11", "10.213.0.12"]
    for node in sb.nodes:
        out = ssh(
            sb, node.name, "hostname; cat /etc/hostname; ip -4 -o addr show dev eth0; id -u nemotron"
        ).stdout
        hostname, etc_hostname, addr, uid = out.splitlines()
        assert hostname == etc_hostname == node.name
        assert f"inet {node.address}/24" in addr
        assert uid == ssh(sb, sb.login.name, "id -u nemotron").stdout.strip()
    # The exact command from the issue: strict host key checking against the sandbox's known_hosts.
    out = subprocess.run(
        ["ssh", "-i", str(sb.ssh_key), "-o", f"UserKnownHostsFile={sb.known_hosts}", "-o", "BatchMode=yes",
         "root@10.213.0.11", "hostname"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.stdout.strip() == "sb-node01", out.stderr
    as_user = subprocess.run(
        [*sb.ssh_argv("sb-node01", "id -un")[:-2], f"nemotron@{sb.compute[0].address}", "id -un"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert as_user.stdout.strip() == "nemotron", as_user.stderr


def test_node_local_and_shared_paths(sb, tmp_path):
    marker = f"marker-{os.getpid()}-{time.time_ns()}"
    ssh(
        sb,
        "sb-node01",
        f"mkdir -p /opt/nemotron-deploy && echo {marker} > /opt/nemotron-deploy/m && echo {marker} > /tmp/m",
    )
    ssh(
        sb,
        "sb-login",
        f"echo '# {marker}' > /etc/cron.d/sandbox-test && mkdir -p /etc/systemd/system && echo x > /etc/systemd/system/{marker}.service",
    )
    ssh(sb, "sb-node01", f"echo {marker} > {sb.shared_dir}/{marker}")
    try:
        assert (
            ssh(sb, "sb-node02", "cat /opt/nemotron-deploy/m /tmp/m 2>/dev/null || true").stdout.strip()
            != marker
        )
        assert (
            not Path("/opt/nemotron-deploy/m").exists()
            or marker not in Path("/opt/nemotron-deploy/m").read_text()
        )
        assert not Path("/etc/cron.d/sandbox-test").exists()
        assert not Path(f"/etc/systemd/system/{marker}.service").exists()
        assert ssh(sb, "sb-node02", f"cat {sb.shared_dir}/{marker}").stdout.strip() == marker
        assert (sb.shared_dir / marker).read_text().strip() == marker  # same path on the host
        # /usr is the host's, read-only: a deploy can't change the host's software.
        assert ssh(sb, "sb-node01", "touch /usr/nemotron-test", check=False).returncode != 0
        # nvidia-smi only on compute nodes; Slurm config at the default path on every node.
        assert ssh(sb, "sb-login", "command -v nvidia-smi", check=False).returncode != 0
        assert ssh(sb, "sb-node01", "command -v nvidia-smi").stdout.strip() == "/usr/local/bin/nvidia-smi"
        for node in sb.nodes:
            assert "ClusterName=nemotron-sandbox" in ssh(sb, node.name, "cat /etc/slurm/slurm.conf").stdout
    finally:
        (sb.shared_dir / marker).unlink(missing_ok=True)
        ssh(sb, "sb-login", f"rm -f /etc/cron.d/sandbox-test /etc/systemd/system/{marker}.service")


def test_srun_runs_16_tasks_with_the_right_node_ids_and_gpus(sb):
    cmd = "srun -N2 --ntasks-per-node=8 --gpus-per-node=8 bash -c 'echo $SLURM_NODEID $SLURM_PROCID $(hostname) $CUDA_VISIBLE_DEVICES'"
    lines = ssh(sb, "sb-login", cmd, timeout=60).stdout.splitlines()
    rows = sorted((int(n), int(p), h, g) for n, p, h, g in (line.split() for line in lines))
    assert len(rows) == 16
    assert [r[1] for r in rows] == list(range(16))
    assert {(r[0], r[2]) for r in rows} == {(0, "sb-node01"), (1, "sb-node02")}
    assert sum(1 for r in rows if r[2] == "sb-node01") == 8
    assert {r[3] for r in rows} == {"0,1,2,3,4,5,6,7"}
    gres = ssh(
        sb, "sb-login", "srun -N2 --ntasks-per-node=8 --gres=gpu:8 hostname | sort | uniq -c"
    ).stdout.split()
    assert gres == ["8", "sb-node01", "8", "sb-node02"]


def _procs(sb, node: str) -> str:
    """`ps` inside a node (its own PID namespace: only that node's processes)."""
    return sb_api.node_run(node, ["ps", "-eo", "comm=,args="]).stdout


def _sleepers(sb, tag: str) -> dict[str, int]:
    """Processes of a test job (the `sleep <tag>` tasks and their slurmstepd) per compute node."""
    return {
        node.name: sum(
            1 for line in _procs(sb, node.name).splitlines() if tag in line or line.startswith("slurmstepd")
        )
        for node in sb.compute
    }


def test_sbatch_then_scancel_leaves_no_process_on_any_node(sb):
    tag = str(3000 + os.getpid() % 1000)
    job = ssh(
        sb,
        "sb-login",
        f"sbatch --parsable -N{len(sb.compute)} --ntasks-per-node=8 --gpus-per-node=8 "
        f"-o {sb.shared_dir}/sbatch-%j.out "
        f"--wrap 'srun sleep {tag}'",
    ).stdout.strip()
    assert job.isdigit()
    try:
        wait_for(
            lambda: all(v >= 9 for v in _sleepers(sb, tag).values()), 30, "8 tasks + slurmstepd on every node"
        )
        assert ssh(sb, "sb-login", f"squeue -h -j {job} -o %T").stdout.strip() == "RUNNING"
    finally:
        ssh(sb, "sb-login", f"scancel {job}")
    wait_for(lambda: not any(_sleepers(sb, tag).values()), 30, "every task of the cancelled job to exit")
    (sb.shared_dir / f"sbatch-{job}.out").unlink(missing_ok=True)


def test_podman_pulls_the_image_from_the_registry_on_each_compute_node(sb):
    before = sb.registry_access_log.read_text().count("\n")
    host_storage = Path("/var/lib/containers/storage")
    host_storage_before = host_storage.exists() and sorted(p.name for p in host_storage.iterdir())
    for node in sb.compute:
        ssh(
            sb,
            node.name,
            f"podman rmi -f {sb.image} >/dev/null 2>&1; podman pull --quiet {sb.image}",
            timeout=120,
        )
        ssh(sb, node.name, f"podman image exists {sb.image}")
    new = sb.registry_access_log.read_text().splitlines()[before:]
    for node in sb.compute:
        blobs = [line for line in new if line.startswith(node.address + " ") and "/blobs/sha256:" in line]
        assert sum(int(line.split('" ')[1].split()[1]) for line in blobs) > 1_000_000, (
            "the 1 MiB layer was served"
        )
    for node in sb.compute:  # podman storage is node-local; the host's is untouched
        assert (node.local_dir / "var-lib-containers" / "storage" / "overlay-images").is_dir()
    assert (host_storage.exists() and sorted(p.name for p in host_storage.iterdir())) == host_storage_before


def test_the_registry_serves_a_nemo_shaped_image_as_docker_v2(sb):
    """What enroot asks for (no OCI Accept header): a v2 schema 2 manifest; NeMo's environment; the
    stand-in at NeMo's path and a Python to run it, inside the image (not from the host)."""
    import http.client
    import io
    import tarfile
    import zlib

    repo, tag = sb.image.split("/", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(sb.registry, timeout=10)

    def get(path: str, accept: str = "") -> bytes:
        conn.request("GET", path, headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body[:200])
        return body

    v2s2 = "application/vnd.docker.distribution.manifest.v2+json"
    manifest = json.loads(get(f"/v2/{repo}/manifests/{tag}", v2s2))
    assert manifest["mediaType"] == v2s2 and len(manifest["layers"]) == 2
    config = json.loads(get(f"/v2/{repo}/blobs/{manifest['config']['digest']}"))
    assert "NVIDIA_VISIBLE_DEVICES=all" in config["config"]["Env"]
    names: set[str] = set()
    for layer in manifest["layers"]:
        data = zlib.decompress(get(f"/v2/{repo}/blobs/{layer['digest']}"), 16 + zlib.MAX_WBITS)
        names |= set(tarfile.open(fileobj=io.BytesIO(data)).getnames())
    for path in (
        "opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py",
        "usr/bin/python3",
        "usr/lib/python3.11/json/__init__.py",
        "usr/bin/bash",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
    ):
        assert path in names, path
    assert get(f"/v2/{repo}/manifests/24.05", v2s2), "the second tag, for image-change tests"


def test_nvidia_smi_stand_in_and_fault_injection(sb):
    node = sb.compute[0].name
    listing = ssh(sb, node, "nvidia-smi -L").stdout.splitlines()
    assert len(listing) == 8 and all("NVIDIA H200" in line for line in listing)
    assert ssh(sb, node, "nvidia-smi | grep -c 'NVIDIA H200'").stdout.strip() == "8"
    assert ssh(sb, node, "ls /opt/nemotron-sandbox/dev | grep -c '^nvidia[0-9]'").stdout.strip() == "8"
    query = "nvidia-smi --query-gpu=index,name,ecc.errors.uncorrected.volatile.total --format=csv,noheader"
    healthy = [f"{i}, NVIDIA H200, 0" for i in range(8)]
    # A healthy answer is kept, and the node's front repeats it without the stand-in's Python.
    assert ssh(sb, node, query).stdout.splitlines() == healthy
    kept = ssh(sb, node, f"grep -l -x '7, NVIDIA H200, 0' {gpus.NODE_ANSWERS}/*").stdout.split()
    assert len(kept) == 1, kept
    ssh(sb, node, f"echo marked >> {kept[0]}")
    assert ssh(sb, node, query).stdout.splitlines() == [*healthy, "marked"]  # the kept file, as kept
    ssh(sb, node, f"rm {kept[0]}")
    with sb_api.exclusive_use("inject GPU faults"):
        try:
            sb_api.set_gpu_faults(node, gpus=7, ecc_uncorrected={2: 5}, name="NVIDIA H100 80GB HBM3")
            out = ssh(sb, node, query).stdout  # the same arguments: the fault wins over the kept answer
            assert out.splitlines() == [f"{i}, NVIDIA H100 80GB HBM3, {5 if i == 2 else 0}" for i in range(7)]
            other = ssh(sb, sb.compute[1].name, "nvidia-smi -L | wc -l").stdout.strip()
            assert other == "8", "faults are per node"
        finally:
            sb_api.clear_gpu_faults(node)
    assert len(ssh(sb, node, "nvidia-smi -L").stdout.splitlines()) == 8
    assert ssh(sb, node, query).stdout.splitlines() == healthy


def test_model_dir_and_emulator_are_installed(sb):
    config = yaml.safe_load((sb.model_dir / "model_config.yaml").read_text())
    assert config["tensor_model_parallel_size"] == 8 and config["num_layers"] == 96
    assert config["tokenizer"]["model"] == "nemotron_2_256k.model"
    assert (sb.model_dir / "model_weights").is_dir()
    emulator = EMULATOR
    sb_api.up(nodes=len(sb.compute), gpus_per_node=8)  # a running sandbox gets the current emulator
    for node in sb.compute:
        text = ssh(sb, node.name, f"cat {layout.NODE_EMULATOR_PATH}").stdout
        if emulator.exists():
            assert text == emulator.read_text()
        else:
            assert "placeholder" in text


def test_pyinfra_reaches_every_node_through_the_inventory(sb):
    pyinfra = Path(sys.executable).with_name("pyinfra")
    result = subprocess.run(
        [str(pyinfra), "-y", "inventories/sandbox.py", "exec", "--", "hostname"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for node in sb.nodes:
        assert f"[{node.name}] {node.name}" in re.sub(r"\s+", " ", result.stdout + result.stderr)


def test_status_reports_every_node_and_daemon(sb):
    result = subprocess.run(
        [sys.executable, "-m", "nemotron_rehearsal.sandbox.cli", "status", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["up"] is True
    assert [n["name"] for n in report["nodes"]] == ["sb-login", *sb.compute_names]
    assert [n["address"] for n in report["nodes"]] == [n.address for n in sb.nodes]
    assert all(all(n["daemons"].values()) for n in report["nodes"])
    assert {n["slurm_state"] for n in report["nodes"][1:]} <= {"idle", "mixed", "allocated"}


DAEMONS = ("sshd", "slurmd", "slurmctld", "munged")


def _daemon_pids(sb) -> dict[tuple[str, str], int]:
    """The first process of each daemon on every node: a re-created node has new ones."""
    pids: dict[tuple[str, str], int] = {}
    for node in sb.nodes:
        for line in sb_api.node_run(node.name, ["ps", "-eo", "pid=,comm="]).stdout.splitlines():
            pid, comm = line.split(None, 1)
            if comm.strip() in DAEMONS:
                key = (node.name, comm.strip())
                pids[key] = min(int(pid), pids.get(key, int(pid)))
    return pids


def test_up_again_is_a_no_op(sb):
    # What "no-op" means, not how long it took (a bound in seconds fails on a busy machine): the same
    # nodes, their daemons not restarted, and no new creation (its timings are the saved ones).
    before, saved = _daemon_pids(sb), sb_api.current().timings
    assert {comm for _, comm in before} == set(DAEMONS) and saved
    again = sb_api.up(nodes=len(sb.compute), gpus_per_node=8)
    assert again == sb
    assert again.timings == saved
    assert _daemon_pids(sb) == before


def test_sshd_stop_and_start_on_one_node(sb):
    node = sb.compute[1].name
    with sb_api.exclusive_use("stop sshd on a node"):
        sb_api.stop_node_sshd(node)
        try:
            refused = ssh(sb, node, "true", check=False, timeout=30)
            assert refused.returncode == 255 and "refused" in refused.stderr
            assert ssh(sb, sb.compute[0].name, "true").returncode == 0
        finally:
            sb_api.start_node_sshd(node)
        assert ssh(sb, node, "hostname").stdout.strip() == node


def test_node_down_and_up(sb):
    node = sb.compute[1].name
    with sb_api.exclusive_use("power a node off"):
        sb_api.node_down(node)
        try:
            dead = ssh(sb, node, "true", check=False, timeout=30)
            assert dead.returncode == 255
            assert sb_api.status()["nodes"][2]["init_pid"] is None
        finally:
            sb_api.node_up(node)
        assert ssh(sb, node, "hostname").stdout.strip() == node
        lines = ssh(
            sb, "sb-login", f"srun -w sb-node01,{node} -N2 --ntasks-per-node=1 hostname | sort"
        ).stdout.split()
        assert lines == ["sb-node01", node]


def _leftovers(pids: list[int]) -> list[str]:
    """Everything of the sandbox that could survive a `down`, given the PIDs that ran in its nodes."""
    found = []
    if Path("/run/netns").is_dir():
        found += [f"netns {p.name}" for p in Path("/run/netns").iterdir() if p.name.startswith("nsb-")]
    if Path("/sys/class/net/nsbr0").exists():
        found.append("bridge nsbr0")
    found += [f"link {p.name}" for p in Path("/sys/class/net").iterdir() if p.name.startswith("nsb-")]
    if layout.STATE_DIR.exists():
        found.append(f"dir {layout.STATE_DIR}")
    found += [
        f"mount {line.split()[4]}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if "nemotron-sandbox" in line or "/run/netns/nsb-" in line
    ]
    found += [f"process {pid}" for pid in pids if pid_alive(pid)]
    return found


def test_down_leaves_nothing_then_up_works_again(sb):
    """Last on purpose: tears the sandbox down and brings it back (same size) for whoever runs after."""
    with sb_api.exclusive_use("take the sandbox down and up again"):
        created_by_tests = CREATED_BY_TESTS.exists()
        ssh(sb, "sb-login", "sbatch -N2 --ntasks-per-node=2 --wrap 'srun sleep 600'")  # jobs die with nodes
        session = subprocess.Popen(sb.ssh_argv("sb-node01", "sleep 600"))  # so do open SSH sessions
        wait_for(lambda: "sleep" in _procs(sb, "sb-node02"), 30, "the job's tasks")
        pids = [pid for found in netns.pids_by_netns([n.netns for n in sb.nodes]).values() for pid in found]
        assert len(pids) >= 3 * 2 + 5
        sb_api.down()
        assert session.wait(timeout=30) != 0
        assert _leftovers(pids) == []
        sb_api.down()  # safe to repeat
        again = sb_api.up(nodes=len(sb.compute), gpus_per_node=8)
        if created_by_tests:
            CREATED_BY_TESTS.touch()
        assert again == sb
        assert ssh(again, "sb-node02", "hostname").stdout.strip() == "sb-node02"
