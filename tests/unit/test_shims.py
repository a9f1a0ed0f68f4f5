"""The earlier layout's module paths (`python -m nemotron_deploy.health`, `... .rollout`), kept for
one release: a login node whose timer or cron entry still names them during an upgrade gets the same
check, the same output and the same exit code as the new path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from helpers import REPO


def python_m(module: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=30, env=env, cwd=REPO
    )


@pytest.mark.parametrize("name", ["health", "rollout"])
def test_old_path_gives_the_new_paths_help(name):
    old = python_m(f"nemotron_deploy.{name}", "--help")
    new = python_m(f"nemotron_deploy.service.{name}", "--help")
    assert (old.returncode, old.stdout, old.stderr) == (new.returncode, new.stdout, new.stderr)
    assert new.returncode == 0 and new.stdout.startswith("usage: ")


def test_old_health_path_gives_the_same_result_for_a_refused_connection():
    # A bound socket that never listens: connections to it are refused, and nothing else takes it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = str(closed.getsockname()[1])
        argv = ("--host", "127.0.0.1", "--port", port, "--no-state-file")
        old = python_m("nemotron_deploy.health", *argv)
        new = python_m("nemotron_deploy.service.health", *argv)
    assert new.returncode == 2, new.stdout + new.stderr  # CRITICAL: refused
    assert old.returncode == new.returncode, old.stdout + old.stderr
    # Nagios reads stdout: the shim adds nothing (durations differ, so compare all but the perfdata).
    assert old.stdout.split("|")[0] == new.stdout.split("|")[0]
    assert old.stdout.split()[:2] == ["NEMOTRON", "CRITICAL"]
    assert old.stderr == new.stderr == ""


def test_shims_import_only_the_stdlib_and_the_service_package():
    for name in ("health", "rollout"):
        text = (REPO / "nemotron_deploy" / f"{name}.py").read_text()
        imports = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
        assert imports == ["import sys", f"from nemotron_deploy.service.{name} import main"], imports
        assert "next release" in text
