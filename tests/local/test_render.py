"""`nemotron-deploy render`: the job files, byte for byte (goldens), shellcheck-clean in every variant,
free of the model card's bugs, and a call_server.py that behaves against a stand-in HTTP server.

Goldens live in tests/golden/<inventory>/; after an intended template change run `scripts/regen-goldens`.
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import GOLDEN, INVENTORIES, REPO, SHIPPED, run_main, shellcheck, write_inventory

from nemotron_deploy import inventory
from nemotron_deploy.deploy import render

ALWAYS = ("call_server.py", "nemo_inference.sh", "nemo_launch.py", "nemotron.sbatch", "nemotron_openai.json")
SHELL = ("nemo_inference.sh", "nemotron.sbatch")
PER_TASK_VARS = ("SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID")
RUNTIMES = ("pyxis", "docker", "podman", "apptainer", "host")


@pytest.fixture(scope="module")
def shipped() -> dict[str, inventory.Cluster]:
    return {name: inventory.load(str(INVENTORIES / f"{name}.py")) for name in SHIPPED}


def _files(cluster: inventory.Cluster) -> dict[str, str]:
    """The rendered text files (the health zipapp is bytes, tested on its own)."""
    return {f.name: f.content for f in render.render(cluster) if isinstance(f.content, str)}


def _code(text: str) -> str:
    """Shell text without comment lines (#SBATCH directives and the shebang stay)."""
    return "\n".join(
        line
        for line in text.splitlines()
        if not line.lstrip().startswith("#") or line.startswith(("#SBATCH", "#!"))
    )


def _sbatch_directives(sbatch: str) -> dict[str, str]:
    found = {}
    for line in sbatch.splitlines():
        if line.startswith("#SBATCH "):
            option = line.removeprefix("#SBATCH ").strip()
            key, _, value = option.partition("=")
            found[key] = value
    return found


def _hydra_overrides(script: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+([a-z_.]+)=(\S+?)\s*\\?$", script, re.M))


def _variant(tmp_path: Path, **settings) -> inventory.Cluster:
    return inventory.load(str(write_inventory(tmp_path, "h100", settings=settings)))


# --- goldens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_golden_dir_holds_exactly_the_templated_files(name):
    assert sorted(p.name for p in (GOLDEN / name).iterdir()) == sorted(ALWAYS)


@pytest.mark.parametrize("filename", ALWAYS)
@pytest.mark.parametrize("name", SHIPPED)
def test_render_matches_golden(name, filename, shipped):
    rendered = _files(shipped[name])[filename].encode()
    golden = (GOLDEN / name / filename).read_bytes()
    if rendered != golden:
        diff = "".join(
            difflib.unified_diff(
                golden.decode().splitlines(keepends=True),
                rendered.decode().splitlines(keepends=True),
                f"tests/golden/{name}/{filename}",
                "rendered",
            )
        )
        pytest.fail(
            f"rendered {filename} differs from the golden (if intended: scripts/regen-goldens):\n{diff}"
        )


@pytest.mark.parametrize("name", SHIPPED)
def test_cli_render_writes_exactly_the_rendered_files(name, shipped, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(["render", str(INVENTORIES / f"{name}.py"), "--out", str(out)]) == 0
    expected = [f.name for f in render.render(shipped[name])]
    assert set(ALWAYS) <= set(expected)
    assert render.HEALTH_APP in expected
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert capsys.readouterr().out.split() == [str(out / n) for n in expected]
    for filename in ALWAYS:
        assert (out / filename).read_bytes() == (GOLDEN / name / filename).read_bytes()
    assert (out / render.HEALTH_APP).read_bytes() == render.health_zipapp()


def test_file_modes_and_roles(shipped, tmp_path):
    cluster = shipped["h100"]
    render.write(render.render(cluster), tmp_path)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["call_server.py"] == modes["nemo_inference.sh"] == 0o755
    assert modes["nemotron.sbatch"] == 0o644
    roles = {f.name: f.directory(cluster) for f in render.render(cluster)}
    assert roles["nemotron.sbatch"] == "/lustre/nemotron/nemotron-deploy/jobs"
    assert roles["nemo_inference.sh"] == roles["call_server.py"] == "/opt/nemotron-deploy/scripts"


def test_regen_goldens_script_is_there_and_clean():
    script = REPO / "scripts" / "regen-goldens"
    assert script.stat().st_mode & 0o111, "scripts/regen-goldens must be executable"
    assert "nemotron-deploy" in script.read_text() and "tests/golden" in script.read_text()
    shellcheck(script)


# --- shellcheck ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shellcheck_shipped(name, shipped, tmp_path):
    render.write(render.render(shipped[name]), tmp_path)
    shellcheck(*(tmp_path / f for f in SHELL))


@pytest.mark.parametrize("mode, gpu_request", [("serve", "gpus-per-node"), ("smoke", "gres")])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_shellcheck_every_runtime_and_mode(runtime, mode, gpu_request, tmp_path):
    image = {} if runtime == "pyxis" else {"container_image": None}
    cluster = _variant(
        tmp_path / "inv", container_runtime=runtime, mode=mode, gpu_request=gpu_request, **image
    )
    render.write(render.render(cluster), tmp_path / "out")
    shellcheck(*(p for p in (tmp_path / "out").iterdir() if p.suffix in (".sh", ".sbatch")))
    files = _files(cluster)
    assert f"container runtime: {runtime}." in files["nemotron.sbatch"]
    assert f'NEMOTRON_MODE="${{NEMOTRON_MODE:-{mode}}}"' in files["nemotron.sbatch"]
    assert f'MODE="${{NEMOTRON_MODE:-{mode}}}"' in files["nemo_inference.sh"]
    directives = _sbatch_directives(files["nemotron.sbatch"])
    if gpu_request == "gres":
        assert directives["--gres"] == "gpu:8" and "--gpus-per-node" not in directives
    else:
        assert directives["--gpus-per-node"] == "8" and "--gres" not in directives


def test_shellcheck_minimal_settings(tmp_path):
    cluster = _variant(
        tmp_path / "inv",
        slurm_account=None,
        slurm_partition=None,
        slurm_exclusive=False,
        scripts_on_shared_storage=True,
        job_env={},
        extra_sbatch_options=["--qos=high", "--requeue"],
    )
    render.write(render.render(cluster), tmp_path / "out")
    shellcheck(*(tmp_path / "out" / f for f in SHELL))
    sbatch = (tmp_path / "out" / "nemotron.sbatch").read_text()
    directives = _sbatch_directives(sbatch)
    assert not {"--account", "--partition", "--exclusive"} & set(directives)
    assert directives["--qos"] == "high" and "--requeue" in directives
    assert "bash /lustre/nemotron/nemotron-deploy/scripts/nemo_inference.sh" in sbatch


# --- the model card's bugs, fixed ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_no_literal_model_mount_and_no_partition_typo(name, shipped):
    for filename, text in _files(shipped[name]).items():
        assert "MODEL:/model" not in text, filename
        assert "PARITION" not in text, filename


@pytest.mark.parametrize("name", SHIPPED)
def test_no_pkill_and_every_srun_kills_on_bad_exit(name, shipped):
    files = _files(shipped[name])
    for filename in SHELL:
        code = _code(files[filename])
        assert not re.search(r"\b(pkill|killall)\b", code), filename
    sbatch = _code(files["nemotron.sbatch"])
    sruns = re.findall(r"\bsrun\b.*", sbatch)
    assert sruns and all(s.startswith("srun --kill-on-bad-exit=1") for s in sruns)


@pytest.mark.parametrize("name", SHIPPED)
def test_sbatch_asks_for_the_plan(name, shipped):
    cluster = shipped[name]
    plan, s = cluster.plan, cluster.settings
    sbatch = _files(cluster)["nemotron.sbatch"]
    directives = _sbatch_directives(sbatch)
    assert directives["--nodes"] == str(plan.nodes)
    assert directives["--ntasks-per-node"] == str(plan.gpus_per_node)  # one task per GPU
    gpus = directives.get("--gpus-per-node") or directives["--gres"].removeprefix("gpu:")
    assert gpus == str(plan.gpus_per_node)
    assert ("--gres" in directives) == (s.gpu_request == "gres")
    assert directives["--partition"] == s.slurm_partition
    assert directives["--account"] == s.slurm_account
    assert directives["--job-name"] == f"{s.job_name}-r1"  # replica 1; submit names each replica
    assert directives["--time"] == s.slurm_time_limit
    # The card's text said 4 nodes while its script asked for 2: the comment says what the job asks.
    assert f"on {plan.nodes} x {plan.gpus_per_node} {plan.gpu} (TP {plan.tensor_parallel} x PP " in sbatch


def test_shipped_plans_are_nvidias(shipped):
    got = {n: (c.plan.nodes, c.plan.tensor_parallel, c.plan.pipeline_parallel) for n, c in shipped.items()}
    assert got == {"h100": (2, 8, 2), "h200": (1, 8, 1), "a100": (2, 8, 2)}


@pytest.mark.parametrize("name", SHIPPED)
def test_nemo_launch_matches_the_plan(name, shipped):
    cluster = shipped[name]
    plan = cluster.plan
    script = _files(cluster)["nemo_inference.sh"]
    overrides = _hydra_overrides(script)
    assert overrides["tensor_model_parallel_size"] == str(plan.tensor_parallel)
    assert overrides["pipeline_model_parallel_size"] == str(plan.pipeline_parallel)
    assert overrides["trainer.devices"] == str(plan.gpus_per_node)
    assert overrides["trainer.num_nodes"] == str(plan.nodes)
    # NeMo asserts this on every rank.
    assert plan.gpus_per_node * plan.nodes == plan.tensor_parallel * plan.pipeline_parallel
    assert overrides["trainer.precision"] == "bf16"
    assert overrides["server"] == "True"
    assert overrides["gpt_model_file"] == '"${MODEL_DIR}"'
    assert f"readonly MODEL_DIR={cluster.settings.model_dir}" in script
    assert f"readonly PORT={cluster.settings.port}" in script


@pytest.mark.parametrize("name", SHIPPED)
def test_pyxis_image_mounts_and_home(name, shipped):
    cluster = shipped[name]
    s = cluster.settings
    sbatch = _files(cluster)["nemotron.sbatch"]
    (image,) = (shlex.split(v)[0] for v in re.findall(r"--container-image=(\S+)", sbatch))
    assert "#" in image or image.endswith(".sqsh")
    assert image.startswith(s.images_dir + "/") and image.endswith(".sqsh")
    assert "24.01.framework" in image  # named after the reference
    assert "--no-container-mount-home" in sbatch
    (mounts,) = (shlex.split(v)[0] for v in re.findall(r"--container-mounts=(\S+)", sbatch))
    assert mounts.split(",") == [
        f"{s.model_dir}:{s.model_dir}:ro",
        f"{s.scripts_dir}:{s.scripts_dir}:ro",  # the job can't rewrite its own files
        f"{s.logs_dir}:{s.logs_dir}",
        # The replica key alone, read-only: rank 0's front reads it (test_replica_front).
        f"{s.replica_key_file}:{s.replica_key_file}:ro",
    ]


def test_image_tag_is_a_setting(tmp_path):
    cluster = _variant(tmp_path, container_image="nvcr.io#nvidia/nemo:24.05")
    sbatch = _files(cluster)["nemotron.sbatch"]
    assert "nemo+24.05.sqsh" in sbatch
    assert "24.01" not in sbatch


def test_pyxis_without_an_image_file_gets_the_hash_form(tmp_path):
    cluster = _variant(tmp_path, container_image=None)
    assert cluster.settings.image == "nvcr.io#nvidia/nemo:24.01.framework"


@pytest.mark.parametrize("name", SHIPPED)
def test_per_task_variables_are_expanded_by_each_task(name, shipped):
    files = _files(shipped[name])
    sbatch, task = _code(files["nemotron.sbatch"]), _code(files["nemo_inference.sh"])
    for var in PER_TASK_VARS:
        assert not re.search(rf"\$\{{?{var}\b", sbatch), f"the batch shell expands ${var}"
    for var in ("SLURM_PROCID", "SLURM_NODEID"):
        assert re.search(rf"\$\{{{var}\b", task), f"nemo_inference.sh does not read ${var}"
    # The sbatch hands the task script over unexpanded: srun runs it, one per task.
    assert "nemo_inference.sh" in sbatch


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_clean_environment_runtimes_pass_the_task_variables(runtime, tmp_path):
    cluster = _variant(tmp_path, container_runtime=runtime, container_image=None)
    script = _files(cluster)["nemo_container.sh"]  # what each task runs (see the test below)
    passed = set(re.findall(r"--env (\w+)", script))
    assert set(render.SLURM_TASK_ENV) | set(cluster.settings.job_env) <= passed
    assert not re.search(r"--env \w+=", script)  # names only: values come from each task's environment
    assert "--network=host" in script


def _runtime_variant(tmp_path: Path, runtime: str) -> dict[str, str]:
    image = {} if runtime == "pyxis" else {"container_image": None}
    return _files(_variant(tmp_path, container_runtime=runtime, **image))


def _starting_the_container(files: dict[str, str], runtime: str) -> list[str]:
    """The rendered files whose code runs `<runtime> run` (literally or as "${RUNTIME}")."""
    pattern = rf'(\b{runtime}|"\$\{{RUNTIME\}}") run\b'
    return [name for name, text in files.items() if re.search(pattern, _code(text))]


def _srun_lines(sbatch: str) -> list[str]:
    """Each srun command of the sbatch, continuation lines joined."""
    code = _code(sbatch).replace("\\\n", " ")
    return [line.strip() for line in code.splitlines() if line.strip().startswith("srun ")]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_user_site_packages_never_reach_the_task(runtime, tmp_path):
    """~/.local shadowed the NeMo container's packages and broke 340B inference on 24.01: every task,
    whatever the runtime, runs Python with PYTHONNOUSERSITE=1."""
    files = _runtime_variant(tmp_path, runtime)
    sbatch = _code(files["nemotron.sbatch"])
    sruns = _srun_lines(files["nemotron.sbatch"])
    assert sruns
    assert "\nexport PYTHONNOUSERSITE=1\n" in sbatch
    assert sbatch.index("export PYTHONNOUSERSITE=1") < sbatch.index("\nsrun ")
    for srun in sruns:  # srun hands the batch environment to the tasks (its default, --export=ALL)
        assert not re.search(r"--export(?!=ALL\b)", srun), srun
        assert "--cleanenv" not in srun and "--containall" not in srun, srun
    if runtime in ("docker", "podman"):  # a clean environment in the container: pass it by name
        (script,) = _starting_the_container(files, runtime)
        assert re.search(r"--env PYTHONNOUSERSITE\b", files[script])


def test_apptainer_does_not_bind_home(tmp_path):
    """apptainer binds $HOME unless told not to; a user's ~/.local then shadows the image's packages."""
    (srun,) = _srun_lines(_runtime_variant(tmp_path, "apptainer")["nemotron.sbatch"])
    assert re.search(r"\bapptainer exec\b.*\s--no-home\s", srun), srun


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_docker_podman_containers_are_named_per_task_and_stopped_when_the_task_is(runtime, tmp_path):
    """The daemon (docker) or conmon (podman), not srun, owns each task's container: scancel ends the
    client only. Each task names its container after the job and itself, and stops it on TERM/INT."""
    files = _runtime_variant(tmp_path, runtime)
    (srun,) = _srun_lines(files["nemotron.sbatch"])
    runs = _starting_the_container(files, runtime)
    assert runs and "nemotron.sbatch" not in runs, f"the batch shell starts the container: {runs}"
    (script,) = runs
    assert srun.endswith(f"/{script}"), f"srun does not run {script}: {srun}"
    code = _code(files[script])
    assert f"readonly RUNTIME={runtime}\n" in code
    # Expanded by each task (srun runs this script once per task): the job id and the task's rank.
    assert (
        'NAME="nemotron-${SLURM_JOB_ID:?not running under srun}-${SLURM_PROCID:?not running under srun}"'
        in code
    )
    run = code[code.index('"${RUNTIME}" run ') :]
    assert run.startswith('"${RUNTIME}" run --rm --init --name "${NAME}" ')
    assert run.rstrip().endswith('nemo_inference.sh &\nwait "$!"'), "the client must run in the background"
    # TERM/INT (what scancel and srun deliver): stop and remove the named container, wait, exit.
    assert re.search(r"^trap 'stop_container; wait; exit 143' TERM INT$", code, re.M)
    assert code.index("trap '") < code.index('"${RUNTIME}" run ')  # no window without the trap
    stop = code[code.index("stop_container() {") :].split("\n}\n", 1)[0]
    assert re.search(r'"\$\{RUNTIME\}" stop --time \d+ "\$\{NAME\}"', stop)
    assert '"${RUNTIME}" rm -f "${NAME}"' in stop
    # podman runs rootless as the job's user, with the runtime dir the deploy pulled with (rootless.py).
    pinned = 'XDG_RUNTIME_DIR="/run/user/$(id -u)"\nexport XDG_RUNTIME_DIR\n'
    if runtime == "podman":
        assert pinned in code and code.index(pinned) < code.index('"${RUNTIME}" run ')
    else:
        assert "XDG_RUNTIME_DIR" not in code


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer", "host"])
def test_only_docker_podman_get_the_container_script(runtime, tmp_path):
    assert "nemo_container.sh" not in _runtime_variant(tmp_path, runtime)


@pytest.mark.parametrize("name", SHIPPED)
def test_strict_mode(name, shipped):
    files = _files(shipped[name])
    for filename in SHELL:
        assert "\nset -euo pipefail\n" in files[filename], filename
    assert files["nemo_inference.sh"].startswith("#!/usr/bin/env bash\n")
    assert files["nemotron.sbatch"].startswith("#!/bin/bash\n")


@pytest.mark.parametrize("name", SHIPPED)
def test_readiness_is_a_generation_not_a_tcp_check(name, shipped):
    task = _code(_files(shipped[name])["nemo_inference.sh"])
    assert "curl" not in task
    assert 'nemotron_health.pyz" --wait' in task


@pytest.mark.parametrize("name", SHIPPED)
def test_call_server_defaults_to_the_inventory_port(name, shipped):
    text = _files(shipped[name])["call_server.py"]
    assert f'p.add_argument("--port", type=int, default={shipped[name].settings.port},' in text


def test_changed_port_reaches_every_file(tmp_path):
    files = _files(_variant(tmp_path, port=5555))
    assert "default=5555" in files["call_server.py"]
    assert "readonly PORT=5555" in files["nemo_inference.sh"]


# --- call_server.py against a stand-in server ---------------------------------------------------------


class _NeMoStandIn(BaseHTTPRequestHandler):
    """Answers PUT /generate the way the server in the protocol doc does, per `server.behaviour`."""

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_PUT(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.command, self.path, body))
        behaviour = self.server.behaviour
        if self.path != "/generate":
            return self._send(404, b"<!doctype html><title>404 Not Found</title>")
        if behaviour == "500":
            return self._send(500, b"<title>500 Internal Server Error</title>")
        if behaviour == "reject":
            return self._send(
                200, json.dumps("tokens_to_generate must be an integer greater than 0").encode()
            )
        sentences = [prompt + " and the rest of it." for prompt in body["sentences"]]
        answer = {"sentences": sentences, "tokens": [], "logprob": None, "token_ids": [], "offsets": []}
        return self._send(200, json.dumps(answer).encode())

    def _send(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NeMoStandIn)
    httpd.behaviour = "ok"
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def call_server(tmp_path_factory, shipped) -> Path:
    path = tmp_path_factory.mktemp("call_server") / "call_server.py"
    path.write_text(_files(shipped["h100"])["call_server.py"])
    return path


def _call(script: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=30, input=stdin
    )


def test_call_server_help(call_server):
    result = _call(call_server, "--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--prompt", "--prompt-file", "--tokens", "--json"):
        assert option in result.stdout
    assert "(default: 1424)" in result.stdout


def test_call_server_prints_the_completion_without_the_prompt(call_server, server):
    port = str(server.server_address[1])
    result = _call(
        call_server, "--host", "127.0.0.1", "--port", port, "--prompt", "Once upon a time", "--tokens", "7"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Once upon a time\n and the rest of it.\n"
    ((method, path, body),) = server.requests
    assert (method, path) == ("PUT", "/generate")
    assert body["sentences"] == ["Once upon a time"]
    assert body["tokens_to_generate"] == 7
    assert body["all_probs"] is False  # broken upstream with PP > 1
    assert body["greedy"] is True


def test_call_server_json_and_batches_of_128(call_server, server, tmp_path):
    prompts = [f"prompt {i}" for i in range(130)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    port = str(server.server_address[1])
    result = _call(
        call_server,
        "--port",
        port,
        "--host",
        "127.0.0.1",
        "--prompt-file",
        str(tmp_path / "prompts.txt"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [" and the rest of it."] * 130
    assert [len(body["sentences"]) for _, _, body in server.requests] == [128, 2]


def test_call_server_connection_refused(call_server):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _call(call_server, "--host", "127.0.0.1", "--port", str(port), "--timeout", "5")
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"cannot reach http://127.0.0.1:{port}/generate" in result.stderr
    assert "Connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_call_server_http_500(call_server, server):
    server.behaviour = "500"
    result = _call(call_server, "--host", "127.0.0.1", "--port", str(server.server_address[1]))
    assert result.returncode == 3
    assert "answered HTTP 500" in result.stderr
    assert "Traceback" not in result.stderr


def test_call_server_nemo_rejection_is_an_error(call_server, server):
    """NeMo answers a bad request with HTTP 200 and a JSON string: that is not a completion."""
    server.behaviour = "reject"
    result = _call(call_server, "--host", "127.0.0.1", "--port", str(server.server_address[1]))
    assert result.returncode == 4
    assert result.stdout == ""
    assert "NeMo rejected the request: tokens_to_generate must be an integer greater than 0" in result.stderr
