"""The pyxis (enroot) and apptainer image imports: the commands the deploy runs, run for real in a
shell, with stand-ins for enroot and apptainer (this machine has neither) that write the image file
the way the real tools do, or fail the way they do."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from nemotron_deploy.deploy.operations.containers import enroot_credentials, import_image_file, registry_of

IMAGE = "nvcr.io#nvidia/nemo:24.01.framework"


def commands(**kwargs) -> list[str]:
    """The shell commands the operation runs on the host (its generator, outside a pyinfra run): the
    import itself is watched (operations/watched.py), so its command is in the FunctionCommand's Fetch."""
    return [cmd.args[0].command for cmd in import_image_file._inner(**kwargs)]


def stand_in(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)


def run(command: str, bindir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_import_lands_world_readable_under_the_final_name(tmp_path, runtime):
    bindir = tmp_path / "bin"
    # enroot import --output FILE docker://REF ; apptainer pull FILE docker://REF: both write FILE
    # with the umask's mode; 0600 is what pyxis then refuses ("Invalid image format").
    # Each also leaves scratch (layers) where it is told to: the import must remove it.
    scratch = 'mkdir -p "${ENROOT_CACHE_PATH:-$APPTAINER_CACHEDIR}" && echo layer > "${ENROOT_CACHE_PATH:-$APPTAINER_CACHEDIR}/l"'
    stand_in(bindir, "enroot", f'echo "$@" > "$TMPDIR_LOG"; {scratch}; umask 077; echo squashfs > "$3"')
    stand_in(bindir, "apptainer", f'echo "$@" > "$TMPDIR_LOG"; {scratch}; umask 077; echo sif > "$2"')
    target = tmp_path / "images" / f"image.{'sqsh' if runtime == 'pyxis' else 'sif'}"
    target.parent.mkdir()
    (cmd,) = commands(
        runtime=runtime, image=IMAGE, target=str(target), present=False, tmp_dir=str(tmp_path / "scratch")
    )
    log = tmp_path / "args"
    result = run(f"export TMPDIR_LOG={log}; {cmd}", bindir)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not Path(f"{target}.partial").exists()
    args = log.read_text()
    if runtime == "pyxis":
        assert "docker://nvcr.io#nvidia/nemo:24.01.framework" in args  # enroot wants the '#' form
    else:
        assert "docker://nvcr.io/nvidia/nemo:24.01.framework" in args  # apptainer the docker form
    assert (tmp_path / "scratch").is_dir(), "scratch must be on the disk the inventory names, not /tmp"
    assert list((tmp_path / "scratch").iterdir()) == [], "the import's scratch (tens of GB) must go"


def test_a_failed_import_never_leaves_a_file_under_the_final_name(tmp_path):
    bindir = tmp_path / "bin"
    stand_in(
        bindir,
        "enroot",
        'echo half > "$3"; echo "[ERROR] URL https://nvcr.io/... returned error code: 401" >&2; exit 1',
    )
    target = tmp_path / "image.sqsh"
    (cmd,) = commands(runtime="pyxis", image=IMAGE, target=str(target), present=False, tmp_dir=str(tmp_path))
    result = run(cmd, bindir)
    assert result.returncode != 0
    assert "401" in result.stderr
    assert not target.exists()
    assert not Path(f"{target}.partial").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("import.")] == []


def test_no_import_when_the_image_file_is_there():
    assert commands(runtime="pyxis", image=IMAGE, target="/x.sqsh", present=True, tmp_dir="/t") == []


def test_enroot_reads_the_key_from_a_private_dir_removed_with_the_import(tmp_path, monkeypatch):
    """The key reaches enroot as a netrc file in a 0700 dir made for this import, never on a command
    line, and leaves the node with the import: after a good one and after a failed one."""
    from pyinfra.api import StringCommand

    from nemotron_deploy.deploy.operations import containers

    key_dir = tmp_path / "nemotron-enroot"
    monkeypatch.setattr(containers, "host", SimpleNamespace(get_temp_filename=lambda hint: str(key_dir)))
    for outcome, body in (("ok", 'cp "$ENROOT_CONFIG_PATH/.credentials" "$3"'), ("fail", "exit 1")):
        bindir = tmp_path / f"bin-{outcome}"
        # The stand-in reads the key where enroot would, then writes the image (or fails).
        stand_in(bindir, "enroot", body)
        steps = list(
            import_image_file._inner(
                runtime="pyxis", image=IMAGE, target=str(tmp_path / f"{outcome}.sqsh"), present=False,
                tmp_dir=str(tmp_path / "t"), ngc_key="nvapi-secret",
            )
        )  # fmt: skip
        mkdir, upload, watch = steps
        assert isinstance(mkdir, StringCommand) and "mkdir -m 700" in mkdir.get_raw_value()
        assert upload.dest == f"{key_dir}/.credentials"
        fetch = watch.args[0]
        assert "nvapi-secret" not in fetch.command + fetch.cleanup + mkdir.get_raw_value()
        assert f"ENROOT_CONFIG_PATH={key_dir}" in fetch.command
        run(mkdir.get_raw_value(), bindir)
        (key_dir / ".credentials").write_text(upload.src.getvalue())
        (key_dir / ".credentials").chmod(0o600)
        assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
        result = run(f"W={tmp_path}/w-{outcome}; {fetch.command}", bindir)
        assert (result.returncode == 0) == (outcome == "ok"), result.stderr
        assert not key_dir.exists(), f"the key's directory stayed after a {outcome} import"
    assert (tmp_path / "ok.sqsh").read_text() == "machine nvcr.io login $oauthtoken password nvapi-secret\n"


def test_no_key_no_credentials(tmp_path):
    (cmd,) = commands(runtime="pyxis", image=IMAGE, target="/x.sqsh", present=False, tmp_dir="/t")
    assert "ENROOT_CONFIG_PATH" not in cmd
    line = enroot_credentials("nvapi-secret")
    assert line == "machine nvcr.io login $oauthtoken password nvapi-secret\n"


def test_registry_of_both_reference_forms():
    assert registry_of("nvcr.io#nvidia/nemo:24.01.framework") == "nvcr.io"
    assert registry_of("nvcr.io/nvidia/nemo:24.01.framework") == "nvcr.io"
    assert registry_of("10.213.0.2:5000/nvidia/nemo:24.01.framework") == "10.213.0.2:5000"
    assert registry_of("nvidia/nemo:24.01.framework") == "docker.io"


@pytest.mark.parametrize("pull_rc", [0, 1])
def test_a_pull_that_logged_in_logs_out_whatever_its_outcome(tmp_path, monkeypatch, pull_rc):
    """docker/podman keep a login in a file of their own: the pull logs out when it ends (and the
    watcher's clean-up after a stalled or killed pull does too), keeping the pull's exit code."""
    from nemotron_deploy.deploy.operations import containers

    monkeypatch.setattr(
        containers, "host", SimpleNamespace(get_temp_filename=lambda hint: str(tmp_path / "k"))
    )
    steps = list(
        containers.pull_image._inner(
            runtime="podman", image="nvcr.io/nvidia/nemo:24.01.framework", present=False, ngc_key="nvapi-x"
        )
    )
    fetch = steps[-1].args[0]
    bindir = tmp_path / "bin"
    calls = tmp_path / "calls"
    stand_in(bindir, "podman", f'echo "$*" >> {calls}; [ "$1" = logout ] || exit {pull_rc}')
    assert run(fetch.command, bindir).returncode == pull_rc
    assert calls.read_text().splitlines() == [
        "pull --tls-verify=true nvcr.io/nvidia/nemo:24.01.framework",
        "logout nvcr.io",
    ]
    calls.unlink()
    run(fetch.cleanup, bindir)
    assert calls.read_text().splitlines() == ["logout nvcr.io"]


def test_an_anonymous_pull_does_not_log_out(monkeypatch):
    from nemotron_deploy.deploy.operations import containers

    (watch,) = containers.pull_image._inner(runtime="podman", image="quay.io/x/y:1", present=False)
    assert "logout" not in watch.args[0].command + watch.args[0].cleanup


@pytest.mark.parametrize("tls_verify", [True, False])
def test_apptainer_pull_skips_tls_only_where_the_inventory_says(tmp_path, tls_verify):
    """registry_tls_verify = false (a plain-HTTP registry such as the sandbox's) is apptainer's
    `--no-https`, as it is podman's --tls-verify=false; left on, apptainer checks certificates."""
    bindir = tmp_path / "bin"
    stand_in(bindir, "apptainer", 'echo "$@" > "$TMPDIR_LOG"; shift $(($# - 2)); echo sif > "$1"')
    target = tmp_path / "image.sif"
    (cmd,) = commands(
        runtime="apptainer",
        image="10.213.0.2:5000/nvidia/nemo:24.01.framework",
        target=str(target),
        present=False,
        tmp_dir=str(tmp_path / "scratch"),
        tls_verify=tls_verify,
    )
    log = tmp_path / "args"
    result = run(f"export TMPDIR_LOG={log}; {cmd}", bindir)
    assert result.returncode == 0, result.stderr
    args = log.read_text().split()
    assert args[0] == "pull"
    assert ("--no-https" in args) is (not tls_verify), args
    assert args[-2:] == [f"{target}.partial", "docker://10.213.0.2:5000/nvidia/nemo:24.01.framework"]
    assert target.read_text() == "sif\n"
