"""The pyxis (enroot) and apptainer image imports: the commands the deploy runs, run for real in a
shell, with stand-ins for enroot and apptainer (this machine has neither) that write the image file
the way the real tools do, or fail the way they do."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

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


def test_enroot_reads_credentials_from_its_config_dir_not_the_command_line(tmp_path):
    creds = tmp_path / "enroot" / ".credentials"
    (cmd,) = commands(
        runtime="pyxis",
        image=IMAGE,
        target="/x.sqsh",
        present=False,
        tmp_dir="/t",
        credentials_path=str(creds),
    )
    assert f"ENROOT_CONFIG_PATH={creds.parent}" in cmd
    assert "password" not in cmd
    line = enroot_credentials("nvapi-secret")
    assert line == "machine nvcr.io login $oauthtoken password nvapi-secret\n"


def test_registry_of_both_reference_forms():
    assert registry_of("nvcr.io#nvidia/nemo:24.01.framework") == "nvcr.io"
    assert registry_of("nvcr.io/nvidia/nemo:24.01.framework") == "nvcr.io"
    assert registry_of("10.213.0.2:5000/nvidia/nemo:24.01.framework") == "10.213.0.2:5000"
    assert registry_of("nvidia/nemo:24.01.framework") == "docker.io"
