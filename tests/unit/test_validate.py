"""`nemotron-deploy validate`: the shipped inventories pass; every class of mistake is refused by name.

Each bad inventory is written into tmp_path (an inventory file plus `group_data/` beside it, as pyinfra
loads it) from a copy of the shipped H100 one, with one thing broken.
"""

from __future__ import annotations

import json

import pytest
from helpers import FAKE_NGC_KEY, INVENTORIES, SHIPPED, only_field, problems_of, run_main, write_inventory

from nemotron_deploy import inventory

H100_HOSTS = {
    "login01.h100.example.internal",
    "gpu-h100-001.example.internal",
    "gpu-h100-002.example.internal",
}


def _bad(tmp_path, **settings):
    return write_inventory(tmp_path, "h100", settings=settings)


def _hosts(login, compute):
    return f"login = {login!r}\ncompute = {compute!r}\n"


def _every_host(problems, path):
    """Per-host settings problems: one per host, each naming the inventory file."""
    assert {p.host for p in problems} == H100_HOSTS
    assert {p.file for p in problems} == {str(path)}


# --- the shipped inventories ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_inventory_is_valid(name):
    cluster = inventory.load(str(INVENTORIES / f"{name}.py"))
    assert len(cluster.login) == 1 and cluster.compute
    assert set(cluster.host_settings) == {*cluster.login, *cluster.compute}
    assert cluster.plan.nodes <= len(cluster.compute)


def test_validate_all_shipped_exits_0(capsys):
    paths = [str(INVENTORIES / f"{n}.py") for n in SHIPPED]
    assert run_main(["validate", *paths]) == 0
    out = capsys.readouterr().out
    for path in paths:
        assert f"ok       {path}:" in out
    assert "INVALID" not in out


def test_a_copied_inventory_is_valid(tmp_path):
    """The baseline every bad inventory below starts from."""
    cluster = inventory.load(str(write_inventory(tmp_path, "h100")))
    assert cluster.settings.gpu_type == "H100-80GB-SXM"
    assert cluster.settings.slurm_partition == "batch"  # group_data/h100.py was read


# --- GPUs and sizing ------------------------------------------------------------------------------------


def test_unknown_gpu_type(tmp_path):
    path = _bad(tmp_path, gpu_type="H100-80GB")
    problems = only_field(problems_of(path), "gpu_type")
    _every_host(problems, path)
    for p in problems:
        assert p.value == "H100-80GB"
        assert "unknown GPU type 'H100-80GB'" in p.message
        assert "did you mean" in p.message and "H100-80GB-SXM" in p.message


def test_gpus_per_node_the_type_does_not_come_in(tmp_path):
    path = _bad(tmp_path, gpus_per_node=16)
    problems = only_field(problems_of(path), "gpus_per_node")
    _every_host(problems, path)
    for p in problems:
        assert p.value == 16
        assert "not a node size H100-80GB-SXM comes in" in p.message
        assert "[1, 2, 4, 8]" in p.message


def test_fewer_compute_nodes_than_the_plan_needs(tmp_path):
    path = write_inventory(tmp_path, "h100", hosts=_hosts(["login01"], ["gpu01"]))
    (problem,) = only_field(problems_of(path), "compute")
    assert problem.file == str(path)
    assert "needs 2 compute node(s)" in problem.message
    assert "inventory has 1" in problem.message
    assert "add 1 node(s) to the `compute` group" in problem.message


def test_tensor_parallel_that_does_not_divide(tmp_path):
    path = _bad(tmp_path, tensor_parallel=3)
    (problem,) = only_field(problems_of(path), "tensor_parallel")
    assert problem.file == str(path)
    assert "tensor_parallel=3 is impossible" in problem.message
    assert "valid: 8, 4, 2, 1" in problem.message


def test_pipeline_parallel_that_does_not_divide(tmp_path):
    path = _bad(tmp_path, pipeline_parallel=5)
    (problem,) = only_field(problems_of(path), "pipeline_parallel")
    assert "pipeline_parallel=5 does not divide the model's 96 layers" in problem.message


def test_pinned_parallelism_that_divides_is_accepted(tmp_path):
    cluster = inventory.load(str(_bad(tmp_path, tensor_parallel=4)))
    assert (cluster.plan.tensor_parallel, cluster.plan.pipeline_parallel) == (4, 4)


# --- values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "port, bound", [(80, "greater than or equal to 1024"), (70000, "less than or equal")]
)
def test_port_out_of_range(tmp_path, port, bound):
    path = _bad(tmp_path, port=port)
    problems = only_field(problems_of(path), "port")
    _every_host(problems, path)
    for p in problems:
        assert p.value == port
        assert bound in p.message
        assert "use a port from 1024 to 65535" in p.message


def test_relative_path(tmp_path):
    path = _bad(tmp_path, model_dir="models/x")
    problems = only_field(problems_of(path), "model_dir")
    _every_host(problems, path)
    for p in problems:
        assert p.value == "models/x"
        assert "must be an absolute path" in p.message


def test_path_with_dotdot(tmp_path):
    path = _bad(tmp_path, shared_dir="/lustre/../etc")
    for p in only_field(problems_of(path), "shared_dir"):
        assert "without '..'" in p.message


def test_partition_that_would_break_a_shell_script(tmp_path):
    path = _bad(tmp_path, slurm_partition="gpu;rm -rf /")
    problems = only_field(problems_of(path), "slurm_partition")
    _every_host(problems, path)
    for p in problems:
        assert p.value == "gpu;rm -rf /"
        assert "only letters, digits" in p.message


def test_job_name_with_command_substitution(tmp_path):
    path = _bad(tmp_path, job_name="nemotron$(reboot)")
    for p in only_field(problems_of(path), "job_name"):
        assert p.value == "nemotron$(reboot)"
        assert "only letters, digits" in p.message


@pytest.mark.parametrize("value, bad", [("WARN INFO", " "), ("WARN'", "'"), ('x"$HOME"', '"$')])
def test_job_env_value_that_would_break_a_shell_script(tmp_path, value, bad):
    path = _bad(tmp_path, job_env={"NCCL_DEBUG": value})
    problems = only_field(problems_of(path), "job_env.NCCL_DEBUG")
    _every_host(problems, path)
    for p in problems:
        assert p.value == value
        assert f"contains {bad!r}" in p.message
        assert "could break a shell script" in p.message


def test_job_env_name_that_is_not_a_variable(tmp_path):
    path = _bad(tmp_path, job_env={"NCCL DEBUG": "WARN"})
    problems = problems_of(path)
    assert {p.field for p in problems} == {"job_env.NCCL DEBUG.[key]"}
    assert all("environment variable name" in p.message for p in problems)


def test_sbatch_option_with_a_space(tmp_path):
    path = _bad(tmp_path, extra_sbatch_options=["--qos=high --wrap=reboot"])
    problems = only_field(problems_of(path), "extra_sbatch_options.0")
    assert all("one long sbatch option" in p.message for p in problems)


def test_time_limit_that_slurm_would_reject(tmp_path):
    path = _bad(tmp_path, slurm_time_limit="4 hours")
    assert all("Slurm time limit" in p.message for p in only_field(problems_of(path), "slurm_time_limit"))


def test_unknown_runtime_names_the_choices(tmp_path):
    path = _bad(tmp_path, container_runtime="singularity")
    for p in only_field(problems_of(path), "container_runtime"):
        assert "pyxis, docker, podman, apptainer, host" in p.message


# --- settings that used to pass here and break in the deploy ------------------------------------------


@pytest.mark.parametrize("version", ["abc", "535.104.05-beta", "v535.104.05", "535..104", "535.", ""])
def test_min_driver_version_that_is_not_a_driver_version(tmp_path, version):
    path = _bad(tmp_path, min_driver_version=version)
    problems = only_field(problems_of(path), "min_driver_version")
    _every_host(problems, path)
    for p in problems:
        assert p.value == version
        assert "dotted numeric NVIDIA driver version" in p.message
        assert "e.g. 535.104.05" in p.message


@pytest.mark.parametrize("version", ["535.104.05", "550.54.15", "470.82.01", "390.157", "535"])
def test_min_driver_version_that_nvidia_smi_prints_is_accepted(tmp_path, version):
    cluster = inventory.load(str(_bad(tmp_path, min_driver_version=version)))
    assert cluster.settings.min_driver_version == version


def test_health_user_root_is_refused(tmp_path):
    path = _bad(tmp_path, health_user="root")
    problems = only_field(problems_of(path), "health_user")
    _every_host(problems, path)
    for p in problems:
        assert p.value == "root"
        assert "must not run as root" in p.message
        assert "nemotron-health" in p.message


# Directories the deploy creates and owns (root-owned, its own mode): never a system directory.
OWNED_SYSTEM_DIRS = [
    ("prometheus_textfile_dir", "/etc"),
    ("prometheus_textfile_dir", "/var/lib"),
    ("prometheus_textfile_dir", "/tmp"),
    ("node_dir", "/usr"),
    ("node_dir", "/opt"),
    ("node_dir", "/"),
    ("node_dir", "/lib64"),
    ("node_dir", "/usr/local"),
    ("health_venv", "/usr/bin"),
    ("health_venv", "/home"),
]


@pytest.mark.parametrize("field, directory", OWNED_SYSTEM_DIRS)
def test_owned_directory_that_is_a_system_directory(tmp_path, field, directory):
    path = _bad(tmp_path, **{field: directory})
    problems = only_field(problems_of(path), field)
    _every_host(problems, path)
    for p in problems:
        assert p.value == directory
        assert f"{directory} is a system directory" in p.message
        assert "e.g. " in p.message  # the fix: a directory of its own


@pytest.mark.parametrize("directory", ["/opt/health-venv", "/venv", "/usr/local/venv"])
def test_health_venv_whose_parent_is_a_system_directory(tmp_path, directory):
    """The deploy owns the venv's parent directory too (it creates it, root 755)."""
    path = _bad(tmp_path, health_venv=directory)
    for p in only_field(problems_of(path), "health_venv"):
        assert "system directory" in p.message
        assert "/opt/nemotron-deploy/health-venv" in p.message


def test_shared_dir_root_is_refused(tmp_path):
    path = _bad(tmp_path, shared_dir="/")
    for p in only_field(problems_of(path), "shared_dir"):
        assert "shared filesystem" in p.message


@pytest.mark.parametrize(
    "settings",
    [
        # Directories the deploy only uses (reads, mounts, creates a subdirectory in) may be anywhere.
        {"shared_dir": "/home"},
        {"shared_dir": "/srv"},
        {"model_dir": "/opt"},
        {"nemo_dir": "/usr/local/NeMo"},
        {"enroot_tmp_dir": "/var/tmp"},
        # Directories of their own under system directories are what these settings are for.
        {"node_dir": "/opt/nemotron"},
        {"node_dir": "/usr/local/nemotron-deploy"},
        {"prometheus_textfile_dir": "/var/lib/node_exporter/textfile_collector"},
        {"health_venv": "/srv/nemotron/health-venv"},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_directories_of_its_own_or_only_used_are_accepted(tmp_path, settings):
    cluster = inventory.load(str(_bad(tmp_path, **settings)))
    for key, value in settings.items():
        assert getattr(cluster.settings, key) == value


def test_validate_text_and_json_name_the_field_and_the_fix(tmp_path, capsys):
    path = _bad(tmp_path, prometheus_textfile_dir="/etc")
    assert run_main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "gpu-h100-001" in line)
    assert line.startswith("  - host gpu-h100-001.example.internal: prometheus_textfile_dir = '/etc': ")
    assert "/var/lib/prometheus/node-exporter" in line
    assert run_main(["validate", "--json", str(path)]) == 1
    problem = json.loads(capsys.readouterr().out)["inventories"][0]["problems"][0]
    assert (problem["field"], problem["value"]) == ("prometheus_textfile_dir", "/etc")
    assert problem["message"].startswith("/etc is a system directory")


# --- container images ---------------------------------------------------------------------------------


def test_pyxis_image_in_docker_form(tmp_path):
    path = _bad(tmp_path, container_image="nvcr.io/nvidia/nemo:24.01.framework")
    problems = only_field(problems_of(path), "container_image")
    _every_host(problems, path)
    for p in problems:
        assert p.value == "nvcr.io/nvidia/nemo:24.01.framework"
        assert "docker form" in p.message
        assert "'nvcr.io#nvidia/nemo:24.01.framework'" in p.message  # the fix, spelled out


def test_image_without_a_tag(tmp_path):
    path = _bad(tmp_path, container_image="nvcr.io#nvidia/nemo")
    for p in only_field(problems_of(path), "container_image"):
        assert p.value == "nvcr.io#nvidia/nemo"
        assert "has no tag or digest" in p.message


def test_docker_image_in_pyxis_form(tmp_path):
    path = _bad(tmp_path, container_runtime="docker")  # keeps the shipped nvcr.io#... image
    for p in only_field(problems_of(path), "container_image"):
        assert "docker needs 'nvcr.io/nvidia/nemo:24.01.framework'" in p.message


def test_image_pinned_by_digest_is_accepted(tmp_path):
    digest = "nvcr.io#nvidia/nemo@sha256:" + "0123456789abcdef" * 4
    assert inventory.load(str(_bad(tmp_path, container_image=digest))).settings.image == digest


# --- the inventory file's structure ----------------------------------------------------------------------


def test_duplicate_host(tmp_path):
    path = write_inventory(tmp_path, "h100", hosts=_hosts(["login01"], ["gpu01", "gpu02", "gpu01"]))
    (problem,) = problems_of(path)
    assert (problem.file, problem.host, problem.field) == (str(path), "gpu01", "compute")
    assert "duplicate host" in problem.message


def test_host_in_login_and_compute(tmp_path):
    path = write_inventory(tmp_path, "h100", hosts=_hosts(["gpu01"], ["gpu01", "gpu02"]))
    (problem,) = problems_of(path)
    assert (problem.file, problem.host) == (str(path), "gpu01")
    assert "both login and compute" in problem.message


def test_empty_group(tmp_path):
    path = write_inventory(tmp_path, "h100", hosts=_hosts(["login01"], []))
    (problem,) = problems_of(path)
    assert (problem.file, problem.field, problem.value) == (str(path), "compute", [])
    assert "empty group" in problem.message


def test_group_that_is_not_a_list(tmp_path):
    path = write_inventory(tmp_path, "h100", hosts='login = ["login01"]\ncompute = "gpu01"\n')
    (problem,) = problems_of(path)
    assert (problem.file, problem.field, problem.value) == (str(path), "compute", "gpu01")
    assert "not a list of hosts" in problem.message


def test_more_than_one_login_host(tmp_path):
    path = write_inventory(tmp_path, "h100", hosts=_hosts(["login01", "login02"], ["gpu01", "gpu02"]))
    (problem,) = problems_of(path)
    assert (problem.field, problem.value) == ("login", ["login01", "login02"])
    assert "more than one login host" in problem.message


def test_missing_group(tmp_path):
    path = write_inventory(tmp_path, "h100", hosts='compute = ["gpu01", "gpu02"]\n')
    (problem,) = problems_of(path)
    assert problem.field == "login" and "no `login` group" in problem.message


def test_inventory_that_raises(tmp_path):
    path = write_inventory(tmp_path, "h100", hosts="login = [undefined_name]\n")
    (problem,) = problems_of(path)
    assert "fails to run" in problem.message and "NameError" in problem.message


def test_inventory_with_a_syntax_error(tmp_path):
    path = write_inventory(tmp_path, "h100", hosts="login = [\n")
    (problem,) = problems_of(path)
    assert problem.file == str(path)
    assert "fails to run: SyntaxError" in problem.message


def test_group_data_that_raises(tmp_path):
    path = write_inventory(tmp_path, "h100", extra="port = undefined_name\n")
    (problem,) = problems_of(path)
    group_data = str(tmp_path / "group_data" / "h100.py")
    assert problem.file == group_data
    assert f"group data file {group_data} fails to run: NameError" in problem.message
    assert "undefined_name" in problem.message


def test_missing_inventory_file(tmp_path):
    (problem,) = problems_of(tmp_path / "nope.py")
    assert problem.message == "no such inventory file"


# --- settings across hosts ------------------------------------------------------------------------------


def test_unknown_setting_suggests_the_right_one(tmp_path):
    path = _bad(tmp_path, slurm_partiton="gpu")
    problems = only_field(problems_of(path), "slurm_partiton")
    _every_host(problems, path)
    for p in problems:
        assert "unknown setting; did you mean 'slurm_partition'?" in p.message


def test_unknown_setting_like_no_other_points_at_the_list(tmp_path):
    path = _bad(tmp_path, frobnicate=1)
    for p in only_field(problems_of(path), "frobnicate"):
        assert p.message == "unknown setting; `nemotron-deploy settings` lists them all"


def test_missing_required_setting(tmp_path):
    path = write_inventory(tmp_path, "h100", extra="del model_dir\n")
    for p in only_field(problems_of(path), "model_dir"):
        assert "required setting is missing: set it in group_data (The checkpoint directory" in p.message
        assert "Required" not in p.message  # the description's first sentence only
        assert p.value is None


def test_settings_that_differ_between_hosts(tmp_path):
    hosts = 'login = ["login01"]\ncompute = ["gpu01", ("gpu02", {"port": 2000})]\n'
    path = write_inventory(tmp_path, "h100", hosts=hosts)
    (problem,) = problems_of(path)
    assert (problem.file, problem.host, problem.field, problem.value) == (str(path), "gpu02", "port", 2000)
    assert "differs from gpu01's 1424" in problem.message
    assert "same on every host" in problem.message


def test_pyinfra_connection_data_per_host_is_fine(tmp_path):
    hosts = 'login = ["login01"]\ncompute = [("gpu01", {"ssh_hostname": "10.0.0.5"}), "gpu02"]\n'
    cluster = inventory.load(str(write_inventory(tmp_path, "h100", hosts=hosts)))
    assert cluster.compute == ["gpu01", "gpu02"]


# --- secrets ----------------------------------------------------------------------------------------------


def test_ngc_key_in_plain_text(tmp_path):
    path = _bad(tmp_path, ngc_api_key=FAKE_NGC_KEY)
    problems = only_field(problems_of(path), "ngc_api_key")
    _every_host(problems, path)
    for p in problems:
        assert p.value == "<redacted>"
        assert "NGC key in plain text" in p.message
        assert "ngc_api_key_env" in p.message
        assert FAKE_NGC_KEY not in str(p)


def test_ngc_key_in_plain_text_under_a_secret_name_whatever_it_looks_like(tmp_path):
    path = _bad(tmp_path, registry_password="hunter2")
    for p in only_field(problems_of(path), "registry_password"):
        assert p.value == "<redacted>" and "hunter2" not in str(p)


def test_key_looking_value_in_another_field(tmp_path):
    path = _bad(tmp_path, slurm_account=FAKE_NGC_KEY)
    problems = only_field(problems_of(path), "slurm_account")
    _every_host(problems, path)
    assert all(p.value == "<redacted>" and "NGC key" in p.message for p in problems)


def test_key_in_job_env(tmp_path):
    """Would be exported in the world-readable sbatch file."""
    path = _bad(tmp_path, job_env={"NGC_CLI_API_KEY": FAKE_NGC_KEY})
    problems = only_field(problems_of(path), "job_env.NGC_CLI_API_KEY")
    assert all(p.value == "<redacted>" for p in problems)


def test_key_in_per_host_data(tmp_path):
    hosts = f'login = ["login01"]\ncompute = [("gpu01", {{"ngc_api_key": "{FAKE_NGC_KEY}"}}), "gpu02"]\n'
    path = write_inventory(tmp_path, "h100", hosts=hosts)
    (problem,) = problems_of(path)
    assert (problem.host, problem.field, problem.value) == ("gpu01", "ngc_api_key", "<redacted>")


@pytest.mark.parametrize(
    "compute",
    [
        f'("gpu01", {{"ngc_api_key": "{FAKE_NGC_KEY}"}})',  # the list brackets forgotten
        f'[["gpu01", {{"ngc_api_key": "{FAKE_NGC_KEY}"}}], "gpu02"]',  # a list instead of a tuple
    ],
    ids=["group-not-a-list", "host-not-a-tuple"],
)
def test_key_in_a_malformed_group_is_redacted(tmp_path, capsys, compute):
    path = write_inventory(tmp_path, "h100", hosts=f'login = ["login01"]\ncompute = {compute}\n')
    (problem,) = problems_of(path)
    assert problem.field == "compute"
    assert "pyinfra ignores" in problem.message
    assert FAKE_NGC_KEY not in str(problem) and "<redacted>" in str(problem)
    assert "gpu01" in str(problem)  # the rest of the value is still shown
    assert run_main(["validate", "--json", str(path)]) == 1
    assert FAKE_NGC_KEY not in capsys.readouterr().out


@pytest.mark.parametrize("as_json", [False, True])
def test_secret_never_printed(tmp_path, capsys, as_json):
    path = _bad(tmp_path, ngc_api_key=FAKE_NGC_KEY, slurm_account=FAKE_NGC_KEY, job_env={"K": FAKE_NGC_KEY})
    assert run_main(["validate", *(["--json"] if as_json else []), str(path)]) == 1
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "<redacted>" in output
    assert "ngc_api_key" in output and "slurm_account" in output and "job_env.K" in output
    assert FAKE_NGC_KEY not in output
    assert FAKE_NGC_KEY[len("nvapi-") :][:12] not in output  # not even a part of it


# --- the CLI ---------------------------------------------------------------------------------------------


def test_validate_json_shape(tmp_path, capsys):
    good = str(INVENTORIES / "h200.py")
    bad = str(_bad(tmp_path, port=80))
    assert run_main(["validate", "--json", good, bad]) == 1
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"valid", "inventories"}
    assert report["valid"] is False
    ok, invalid = report["inventories"]
    assert (ok["inventory"], ok["valid"], ok["problems"]) == (good, True, [])
    assert ok["hosts"] == 2
    assert (ok["plan"]["nodes"], ok["plan"]["tensor_parallel"], ok["plan"]["pipeline_parallel"]) == (1, 8, 1)
    assert (invalid["inventory"], invalid["valid"]) == (bad, False)
    assert len(invalid["problems"]) == 3
    for problem in invalid["problems"]:
        assert set(problem) == {"file", "host", "field", "value", "message"}
        assert problem["file"] == bad
        assert problem["host"] in H100_HOSTS
        assert (problem["field"], problem["value"]) == ("port", 80)
        assert "1024" in problem["message"]


def test_validate_json_all_valid(capsys):
    assert run_main(["validate", "--json", *(str(INVENTORIES / f"{n}.py") for n in SHIPPED)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is True
    assert [r["valid"] for r in report["inventories"]] == [True, True, True]


def test_validate_text_names_file_host_field_and_value(tmp_path, capsys):
    path = _bad(tmp_path, gpu_type="H100-80GB")
    assert run_main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"INVALID  {path}:" in out
    assert "  - host gpu-h100-001.example.internal: gpu_type = 'H100-80GB': unknown GPU type" in out


def test_validate_structural_problem_in_text(tmp_path, capsys):
    path = write_inventory(tmp_path, "h100", hosts=_hosts(["login01"], []))
    assert run_main(["validate", str(path)]) == 1
    assert "  - compute = []: empty group" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["validate"], ["validate", "--frobnicate", "inventories/h100.py"]])
def test_validate_usage_error_exits_2(argv, capsys):
    assert run_main(argv) == 2
    assert "usage:" in capsys.readouterr().err


# --- replicas and the endpoint ------------------------------------------------------------------------

FOUR_NODES = _hosts(
    ["login01.h100.example.internal"], [f"gpu-h100-00{i}.example.internal" for i in range(1, 5)]
)


def test_replicas_default_to_every_replica_the_nodes_hold(tmp_path):
    cluster = inventory.load(str(write_inventory(tmp_path, "h100", hosts=FOUR_NODES)))
    assert (cluster.plan.replicas, cluster.plan.replica_capacity) == (2, 2)


def test_replicas_caps_how_many_run(tmp_path, capsys):
    path = write_inventory(tmp_path, "h100", hosts=FOUR_NODES, settings={"replicas": 1})
    assert inventory.load(str(path)).plan.replicas == 1
    assert run_main(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["replicas"], plan["replica_capacity"]) == (1, 2)
    assert run_main(["plan", str(path)]) == 0
    assert "replicas           1 of the 2 that the 4 compute nodes hold" in capsys.readouterr().out


def test_more_replicas_than_the_nodes_hold(tmp_path, capsys):
    path = write_inventory(tmp_path, "h100", hosts=FOUR_NODES, settings={"replicas": 3})
    (problem,) = only_field(problems_of(path), "replicas")
    assert "replicas=3 needs 6 compute node(s)" in problem.message
    assert "the inventory has 4, which hold 2" in problem.message
    assert "add 2 node(s) to the `compute` group, or set replicas to 2 or less" in problem.message
    assert run_main(["validate", str(path)]) == 1
    assert "replicas=3 needs 6" in capsys.readouterr().out


def test_zero_replicas_is_refused_with_the_fix(tmp_path):
    problems = only_field(problems_of(_bad(tmp_path, replicas=0)), "replicas")
    _every_host(problems, tmp_path / "h100.py")
    assert all("greater than or equal to 1" in p.message for p in problems)
    assert all("leave it unset for every replica the compute nodes hold" in p.message for p in problems)


def test_endpoint_port_clash_on_a_login_node_that_computes(tmp_path):
    """The login node is also a compute node (one machine, two inventory names)."""
    hosts = (
        'login = [("login01", {"ssh_hostname": "10.0.0.5"})]\n'
        'compute = [("gpu01", {"ssh_hostname": "10.0.0.5"}), "gpu02"]\n'
    )
    path = write_inventory(tmp_path, "h100", hosts=hosts)
    (problem,) = only_field(problems_of(path), "endpoint_port")
    assert "both listen on port 1424 on login01 (10.0.0.5), which is also a compute node" in problem.message
    assert "set endpoint_port (or port) to another port, or endpoint = false" in problem.message
    # Either fix is accepted.
    for fix in ({"endpoint_port": 8080}, {"endpoint": False}):
        inventory.load(str(write_inventory(tmp_path / str(fix), "h100", hosts=hosts, settings=fix)))


def test_plan_says_which_request_shapes_the_headroom_covers(capsys):
    assert run_main(["plan", str(INVENTORIES / "h100.py"), "--json"]) == 0
    covered = json.loads(capsys.readouterr().out)["requests"]
    assert covered["max_prompts"] == 8 and covered["logprobs_allowed"] is True


def test_plan_says_logprobs_are_refused_where_the_headroom_does_not_hold_them(tmp_path, capsys):
    hosts = _hosts(["login"], [f"gpu{i}" for i in range(1, 5)])
    path = write_inventory(tmp_path, "a100", hosts=hosts, settings={"gpu_type": "A100-40GB"})
    assert run_main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "log-probs (all_probs, compute_logprob): refused by the endpoint (HTTP 400)" in out


# health_user (and the service_user to come) is named in the sudo rule, the unit and cron: a plain
# POSIX user name, never a word sudoers gives a meaning of its own.
@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("ALL", "means something else to sudo"),
        ("all", "means something else to sudo"),
        ("ADMINS", "means something else to sudo"),  # a User_Alias
        ("%sudo", "means something else to sudo"),
        ("+netgroup", "means something else to sudo"),
        ("#0", "means something else to sudo"),
        ("!nobody", "means something else to sudo"),
        ("Nemotron", "not a plain POSIX user name"),
        ("9health", "not a plain POSIX user name"),
        ("a" * 33, "not a plain POSIX user name"),
        ("health.user", "not a plain POSIX user name"),
    ],
)
def test_health_user_that_is_not_a_plain_user_name_is_refused(tmp_path, name, says):
    path = _bad(tmp_path, health_user=name)
    problems = only_field(problems_of(path), "health_user")
    _every_host(problems, path)
    assert any(says in p.message for p in problems), [p.message for p in problems]


@pytest.mark.parametrize("name", ["nemotron-health", "_nemotron", "svc_health-2", "a" * 32])
def test_plain_user_names_are_accepted(tmp_path, name):
    cluster = inventory.load(str(_bad(tmp_path, health_user=name)))
    assert cluster.settings.health_user == name
    assert cluster.settings.health_user_existing is False  # an existing account is refused by default


@pytest.mark.parametrize(("name", "says"), [("root", "must not"), ("ALL", "means something else to sudo")])
def test_service_user_root_or_a_sudo_word_is_refused(tmp_path, name, says):
    path = _bad(tmp_path, service_user=name)
    problems = only_field(problems_of(path), "service_user")
    _every_host(problems, path)
    assert any(says in p.message or "as root" in p.message for p in problems), [p.message for p in problems]
    assert all("nemotron" in p.message for p in problems)


def test_service_user_the_same_as_health_user_is_refused(tmp_path):
    path = _bad(tmp_path, service_user="nemotron-health")
    messages = " ".join(p.message for p in problems_of(path))
    assert "service_user and health_user are both 'nemotron-health'" in messages, messages


def test_service_user_defaults_to_nemotron(tmp_path):
    cluster = inventory.load(str(_bad(tmp_path)))
    assert cluster.settings.service_user == "nemotron"


def test_the_account_name_rule_is_one_reusable_validator():
    """The rule lives in settings.account_name, for health_user and service_user."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    from nemotron_deploy.settings import account_name

    adapter = TypeAdapter(Annotated[str, account_name("the jobs", "nemotron-svc")])
    assert adapter.validate_python("nemotron-svc") == "nemotron-svc"
    with pytest.raises(ValidationError, match="e.g. nemotron-svc"):
        adapter.validate_python("ALL")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("health_venv", "/tmp/x/venv"),
        ("health_venv", "/var/tmp/nemotron/venv"),
        ("node_dir", "/tmp/nemotron"),
    ],
)
def test_deploy_owned_dirs_in_a_world_writable_dir_are_refused(tmp_path, field, value):
    path = _bad(tmp_path, **{field: value})
    problems = only_field(problems_of(path), field)
    _every_host(problems, path)
    assert any("where every user may create files" in p.message for p in problems)
