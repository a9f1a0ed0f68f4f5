"""The deploy's facts: their shell snippets run for real (local sh) and their parsers on real output."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from nemotron_rehearsal import NVIDIA_SMI_CAPTURES

from nemotron_deploy.deploy.facts.disk import FreeSpace
from nemotron_deploy.deploy.facts.files import ManagedPaths
from nemotron_deploy.deploy.facts.gpus import NvidiaGpus
from nemotron_deploy.deploy.facts.haproxy import Haproxy
from nemotron_deploy.deploy.facts.images import ImagePresent
from nemotron_deploy.deploy.facts.model import ModelConfig
from nemotron_deploy.deploy.facts.runtimes import ContainerRuntimes
from nemotron_deploy.deploy.facts.slurm import SlurmVersion
from nemotron_deploy.deploy.facts.snapshot import HostSnapshot
from nemotron_deploy.deploy.facts.system import InitSystem, UserExists
from nemotron_deploy.service.nvidia_smi import QUERY_COMMAND

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CAPTURE = NVIDIA_SMI_CAPTURES


def run_fact(fact_cls, *args, path_prefix: str | None = None):
    """Run the fact's command in a real shell, as pyinfra would on the host, and parse it."""
    env = dict(os.environ)
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    result = subprocess.run(["sh", "-c", fact_cls().command(*args)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"a fact's command must never fail the host: {result.stderr}"
    return fact_cls().process(result.stdout.splitlines())


def fake_nvidia_smi(tmp_path: Path, body: str) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(bindir)


def test_managed_paths_reports_files_dirs_modes_and_checksums(tmp_path):
    f = tmp_path / "call_server.py"
    f.write_text("print('hi')\n")
    f.chmod(0o755)
    d = tmp_path / "scripts"
    d.mkdir()
    d.chmod(0o1777)
    missing = tmp_path / "nope"
    spaced = tmp_path / "with space"
    spaced.write_text("x")
    states = run_fact(ManagedPaths, (str(f), str(d), str(missing), str(spaced)))
    assert states[str(f)].kind == "file"
    assert states[str(f)].mode == "755"
    assert states[str(f)].sha256 == hashlib.sha256(b"print('hi')\n").hexdigest()
    assert states[str(d)].kind == "directory" and states[str(d)].mode == "1777"
    assert states[str(spaced)].sha256 == hashlib.sha256(b"x").hexdigest()
    assert str(missing) not in states
    user = states[str(f)].user
    assert user == Path(f).owner()


def test_managed_paths_stats_unhashed_files_without_reading_them(tmp_path):
    """The container image is only stat-ed: reading tens of GB on every node at every deploy would be
    the deploy's slowest step."""
    image, script = tmp_path / "nemo.sqsh", tmp_path / "run.sh"
    image.write_bytes(b"image")
    image.chmod(0o640)
    script.write_text("x")
    link = tmp_path / "link.sqsh"
    link.symlink_to(image)
    states = run_fact(ManagedPaths, (str(script),), (str(image), str(link), str(tmp_path / "absent.sqsh")))
    assert states[str(image)].kind == "file" and states[str(image)].sha256 is None
    assert states[str(image)].mode == "640" and states[str(image)].user == image.owner()
    assert states[str(link)].kind == "other"  # never followed to an image elsewhere
    assert states[str(script)].sha256 == hashlib.sha256(b"x").hexdigest()
    assert str(tmp_path / "absent.sqsh") not in states
    command = ManagedPaths().command((str(script),), (str(image),))
    assert command.count("sha256sum") == 1 and "cat" not in command


def test_gpu_fact_parses_the_real_capture(tmp_path):
    # The stand-in answers the deploy's exact query from the real 2 x H200 capture.
    bindir = fake_nvidia_smi(tmp_path, f"cat {CAPTURE / 'health-query.csv'}")
    gpus = run_fact(NvidiaGpus, path_prefix=bindir)
    assert [g.name for g in gpus] == ["NVIDIA H200", "NVIDIA H200"]
    assert {g.memory_total_mib for g in gpus} == {143771}


def test_gpu_fact_without_nvidia_smi_is_none_not_a_failure():
    assert not shutil.which("nvidia-smi", path="/usr/bin:/bin"), "this test needs a PATH without nvidia-smi"
    result = subprocess.run(
        ["sh", "-c", NvidiaGpus().command()], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0
    assert NvidiaGpus().process(result.stdout.splitlines()) is None


def test_gpu_fact_reports_a_failing_driver(tmp_path):
    bindir = fake_nvidia_smi(
        tmp_path,
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9',
    )
    result = run_fact(NvidiaGpus, path_prefix=bindir)
    assert "couldn't communicate with the NVIDIA driver" in result["error"]


def test_query_command_is_what_the_fact_runs():
    assert QUERY_COMMAND in NvidiaGpus().command()


def test_runtimes_fact_finds_what_is_installed(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool, out in {"podman": "podman version 4.3.1", "enroot": "3.4.1"}.items():
        (bindir / tool).write_text(f"#!/bin/sh\necho '{out}'\n")
        (bindir / tool).chmod(0o755)
    (bindir / "srun").write_text(
        "#!/bin/sh\necho '      --container-image=[USER@][REGISTRY#]IMAGE[:TAG]|PATH'\n"
    )
    (bindir / "srun").chmod(0o755)
    env_path = f"{bindir}:/nonexistent"
    result = subprocess.run(
        ["sh", "-c", ContainerRuntimes().command()],
        capture_output=True,
        text=True,
        env={"PATH": f"{env_path}:/usr/bin:/bin"},
    )
    found = ContainerRuntimes().process(result.stdout.splitlines())
    assert found["podman"] == str(bindir / "podman")  # where it is: presence is all the deploy needs
    assert found["enroot"] == str(bindir / "enroot")
    assert found["pyxis"] == "yes"
    assert "apptainer" not in found


def test_runtimes_fact_sees_srun_without_pyxis(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text("#!/bin/sh\necho 'Usage: srun [OPTIONS(0)...]'\n")
    (bindir / "srun").chmod(0o755)
    result = subprocess.run(
        ["sh", "-c", ContainerRuntimes().command()],
        capture_output=True,
        text=True,
        env={"PATH": f"{bindir}:/usr/bin:/bin"},
    )
    assert ContainerRuntimes().process(result.stdout.splitlines())["pyxis"] == "no"


def test_slurm_version_from_real_sbatch(tmp_path, monkeypatch):
    assert shutil.which("sbatch"), "sbatch missing: run scripts/setup (installs slurm-client)"
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    version = run_fact(SlurmVersion)["version"]
    assert version[0].isdigit() and "." in version


def test_slurm_fact_reports_an_sbatch_that_cannot_run(tmp_path, monkeypatch):
    conf = tmp_path / "slurm.conf"
    conf.write_text("NotAKey=1\n")  # a broken config fails at once (a missing one retries for a minute)
    monkeypatch.setenv("SLURM_CONF", str(conf))
    result = run_fact(SlurmVersion)
    assert "version" not in result and "ClusterName" in result["error"]


def test_free_space_of_a_path_that_does_not_exist_yet(tmp_path):
    free = run_fact(FreeSpace, str(tmp_path / "images" / "not" / "yet"))
    expected = shutil.disk_usage(tmp_path).free / 1024**3
    assert free == pytest.approx(expected, abs=1.0)


def test_model_config_fact(tmp_path):
    (tmp_path / "model").mkdir()
    assert run_fact(ModelConfig, str(tmp_path / "nomodel")) == {"error": "the model directory does not exist"}
    assert "no readable model_config.yaml" in run_fact(ModelConfig, str(tmp_path / "model"))["error"]
    shutil.copy(FIXTURES / "model_config.yaml", tmp_path / "model" / "model_config.yaml")
    config = run_fact(ModelConfig, str(tmp_path / "model"))
    assert config["num_layers"] == 96 and config["num_query_groups"] == 8


def test_image_present_fact_with_a_missing_tool_says_absent():
    assert run_fact(ImagePresent, "no-such-runtime", "nvcr.io/nvidia/nemo:24.01.framework") is False


def test_user_and_init_facts():
    assert run_fact(UserExists, "root") == {"uid": "0", "gecos": "root", "group": "root", "groups": ["root"]}
    assert run_fact(UserExists, "no-such-user-xyz") is None
    assert run_fact(InitSystem) == ("systemd" if Path("/run/systemd/system").is_dir() else "cron")


def test_haproxy_fact_on_this_machine():
    """scripts/setup installs Debian's haproxy; this machine runs no systemd but has init scripts."""
    found = run_fact(Haproxy)
    assert found["version"] and found["version"].startswith("2."), found
    assert found["service"] == ("systemd" if Path("/run/systemd/system").is_dir() else "sysv")
    assert found["apt"] is bool(shutil.which("apt-get"))
    assert found["openssl"] is bool(shutil.which("openssl"))
    # the package's haproxy.cfg, untouched here: its checksum is dpkg's record of the shipped file
    config = found["config"]
    assert config is not None and config["package_md5"] and config["md5"] == config["package_md5"], config


def test_haproxy_fact_reads_the_config_it_would_overwrite(tmp_path, monkeypatch):
    """The fact's snippet, run for real on a stand-in haproxy.cfg: its first line and checksum."""
    import subprocess

    from nemotron_deploy.deploy.facts import haproxy as fact

    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("# Generated by nemotron-deploy for inventory 'x'\nglobal\n")
    monkeypatch.setattr(fact, "CONFIG", str(cfg))
    out = subprocess.run(["sh", "-c", Haproxy().command()], capture_output=True, text=True).stdout
    config = Haproxy().process(out.splitlines())["config"]
    assert config["first_line"] == "# Generated by nemotron-deploy for inventory 'x'"
    assert config["md5"] == hashlib.md5(cfg.read_bytes()).hexdigest()
    assert config["package_md5"] is None  # dpkg shipped no file at that path


def test_haproxy_fact_when_it_is_missing(tmp_path):
    """No haproxy anywhere on PATH nor in /usr/sbin: a PATH without it, and /usr/sbin not checked
    by the parser's input (what a host without the package prints)."""
    assert Haproxy().process(["apt=yes", "service=systemd"]) == {
        "version": None,
        "apt": True,
        "service": "systemd",
        "running": False,
        "openssl": False,
        "config": None,
    }
    assert (
        Haproxy().process(["version=HAProxy version 2.6.12-1+deb12u4 2026/10/17", "running=yes"])["version"]
        == "2.6.12"
    )


def test_snapshot_batches_every_fact_into_one_command(tmp_path):
    f = tmp_path / "a"
    f.write_text("x")
    bindir = fake_nvidia_smi(tmp_path, f"cat {CAPTURE / 'health-query.csv'}")
    probes = (
        ("paths", ManagedPaths, ((str(f),),)),
        ("gpus", NvidiaGpus, ()),
        ("user", UserExists, ("root",)),
        ("free", FreeSpace, (str(tmp_path),)),
    )
    command = HostSnapshot().command(probes)
    result = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, env={"PATH": f"{bindir}:/usr/bin:/bin"}
    )
    assert result.returncode == 0
    snap = HostSnapshot().process_sections(probes, result.stdout.splitlines())
    assert set(snap) == {"paths", "gpus", "user", "free"}
    assert str(f) in snap["paths"]
    assert len(snap["gpus"]) == 2
    assert snap["user"]["uid"] == "0"
    assert snap["free"] > 0


def test_fact_modes_are_octal_strings(tmp_path):
    f = tmp_path / "x"
    f.write_text("")
    f.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert run_fact(ManagedPaths, (str(f),))[str(f)].mode == "600"


def test_a_host_whose_read_fails_stops_the_deploy_by_name():
    """Before: a host lost after connecting made the snapshot None and the deploy a TypeError traceback."""
    from types import SimpleNamespace

    from nemotron_deploy.deploy.errors import DeployError
    from nemotron_deploy.deploy.facts.snapshot import snapshot

    lost = SimpleNamespace(name="gpu-007", data={"ssh_hostname": "10.0.0.7"}, get_fact=lambda *a, **k: None)
    with pytest.raises(DeployError, match=r"gpu-007 \(10.0.0.7\): could not read the host over SSH"):
        snapshot(lost, (("runtimes", ContainerRuntimes, ()),))


def test_model_config_is_parsed_once_per_text_and_each_caller_gets_its_own_dict():
    fact = ModelConfig()
    first = fact.process(["num_layers: 96", "hidden_size: 18432"])
    second = fact.process(["num_layers: 96", "hidden_size: 18432"])
    assert first == second == {"num_layers": 96, "hidden_size": 18432}
    first["num_layers"] = 1
    assert fact.process(["num_layers: 96", "hidden_size: 18432"])["num_layers"] == 96
    assert "not valid YAML" in fact.process(["a: [1,"])["error"]
    assert fact.process(["- a list"]) == {"error": "model_config.yaml is not a mapping"}
