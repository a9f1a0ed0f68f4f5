"""scripts/setup, scripts/test and scripts/rehearse need root, and work from a root shell (a container's,
without sudo) and from a user's shell (they ask sudo); the README's two commands are written to work both ways.

The user-shell cases run the real scripts as `nobody` with a stand-in `sudo` first on PATH that prints what
it was asked to run and exits 42: a script that re-executes itself with sudo exits 42 before doing anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import REPO, shellcheck

SCRIPTS = ("setup", "test", "rehearse")
NOBODY = 65534
FAKE_SUDO = '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\nexit 42\n'


@pytest.fixture
def bin_dir():
    """A PATH directory everybody can read: `id`, `dirname`, `realpath`, `env`, `grep`, `basename` only."""
    path = Path(tempfile.mkdtemp(prefix="nemotron-scripts-"))
    path.chmod(0o755)
    for tool in ("id", "dirname", "realpath", "env", "grep", "basename"):
        (path / tool).symlink_to(shutil.which(tool))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def scripts_dir():
    """A world-readable copy of scripts/: the clone itself may sit where `nobody` can't read (a home
    directory is 0700 on Debian 12, as is a `mktemp -d`), and these tests are about the scripts."""
    root = Path(tempfile.mkdtemp(prefix="nemotron-scripts-copy-"))
    root.chmod(0o755)
    shutil.copytree(REPO / "scripts", root / "scripts")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root / "scripts"
    shutil.rmtree(root)


def _as_user(argv: list[str], path: Path, **env: str) -> subprocess.CompletedProcess:
    """`argv` as an unprivileged user (nobody, if this is root), with PATH=`path` only."""
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.fail("needs setpriv (util-linux) to run the scripts as a user")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return subprocess.run(
        [*prefix, *argv],
        cwd="/",
        env={"PATH": str(path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_as_a_user_the_script_asks_sudo_for_itself(name, bin_dir, scripts_dir):
    (bin_dir / "sudo").write_text(FAKE_SUDO)
    (bin_dir / "sudo").chmod(0o755)
    script = scripts_dir / name
    run = _as_user(
        ["/bin/bash", str(script), "-k", "two words"],
        bin_dir,
        NEMOTRON_MODEL_CARD_CLIENT="/x/call_server.py",
        NEMOTRON_SANDBOX_NODES="3",
        NGC_API_KEY="not-forwarded",
    )
    assert run.returncode == 42, f"{name} did not re-run itself with sudo:\n{run.stdout}{run.stderr}"
    argv = run.stdout.splitlines()
    # sudo -- env NEMOTRON_...=... bash /abs/scripts/NAME ARGS...: the same script, the same arguments.
    assert argv[:2] == ["--", "env"]
    assert argv[-4:] == ["bash", str(script), "-k", "two words"]
    assert set(argv[2:-4]) == {"NEMOTRON_MODEL_CARD_CLIENT=/x/call_server.py", "NEMOTRON_SANDBOX_NODES=3"}
    assert "sudo" in run.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_as_a_user_without_sudo_the_script_says_it_needs_root(name, bin_dir, scripts_dir):
    run = _as_user(["/bin/bash", str(scripts_dir / name)], bin_dir)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{name}: needs root" in run.stderr and "no sudo" in run.stderr
    assert run.stdout == ""


def test_as_root_need_root_just_returns(bin_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    (bin_dir / "sudo").write_text(FAKE_SUDO)
    (bin_dir / "sudo").chmod(0o755)
    lib = REPO / "scripts" / "lib" / "need-root.bash"
    run = subprocess.run(
        ["/bin/bash", "-c", f'set -euo pipefail; source "{lib}"; need_root a b; echo ran as root'],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (run.returncode, run.stdout) == (0, "ran as root\n"), run.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_use_the_one_check_and_are_shellcheck_clean(name):
    text = (REPO / "scripts" / name).read_text()
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/lib/need-root.bash"' in text
    assert re.search(r"^\s*need_root \"\$@\"$", text, re.M)
    shellcheck(REPO / "scripts" / name, REPO / "scripts" / "lib" / "need-root.bash", REPO / ".ci" / "run")


def test_readme_has_two_setup_commands_that_work_as_root_and_as_a_user():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Try it: two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    assert blocks == ["scripts/rehearse\n", "scripts/test\n"]
    assert "sudo" in section  # says they ask for it when not root
