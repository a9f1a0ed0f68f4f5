"""Helpers for the foundation tests: throw-away inventories beside their own `group_data/`.

pyinfra reads `group_data/` from the inventory file's directory, so a test inventory is a directory
holding `<name>.py` (the hosts) and `group_data/all.py` + `group_data/<name>.py` (the settings), copied
from the repository's `inventories/` and then changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nemotron_deploy import inventory

REPO = Path(__file__).resolve().parent.parent
INVENTORIES = REPO / "inventories"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = Path(__file__).resolve().parent / "golden"
MODEL_CONFIG = FIXTURES / "model_config.yaml"
SHIPPED = ("h100", "h200", "a100")

# The model card's unchanged client (call_server.py): not in the repository, so the tests that run it
# find it through this variable (.ci/run sets it to the model card beside the clone).
MODEL_CARD_CLIENT_ENV = "NEMOTRON_MODEL_CARD_CLIENT"


def model_card_client() -> Path:
    """The model card's call_server.py; skip the test when the variable is unset, fail when it is wrong."""
    value = os.environ.get(MODEL_CARD_CLIENT_ENV, "")
    if not value:
        pytest.skip(
            f"needs the model card's own client: set {MODEL_CARD_CLIENT_ENV} to the model card's "
            "call_server.py to run it (.ci/run sets it)"
        )
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        pytest.fail(
            f"{MODEL_CARD_CLIENT_ENV}={value}: no such file ({path}); point it at the model card's "
            "call_server.py, or unset it to skip the tests that run it",
            pytrace=False,
        )
    return path


# A key that looks like a real NGC personal key (never a real one).
FAKE_NGC_KEY = "nvapi-Zq3x9LmT0pWv7RkYb2Hs5JdN8cFg4UaE1oXiK6tQ"


def write_inventory(
    directory: Path,
    base: str = "h100",
    *,
    hosts: str | None = None,
    settings: dict[str, Any] | None = None,
    extra: str = "",
    name: str | None = None,
) -> Path:
    """Copy inventories/<base>.py and its group data into `directory`, then change them.

    hosts:    replaces the inventory file's text (the `login`/`compute` groups).
    settings: assignments appended to group_data/<name>.py; a later assignment wins, so these
              override the shipped values.
    extra:    raw Python appended to group_data/<name>.py.
    name:     the inventory's file name (default `base`); group_data/<name>.py follows it.
    """
    name = name or base
    directory.mkdir(parents=True, exist_ok=True)
    group_data = directory / "group_data"
    group_data.mkdir(exist_ok=True)
    shutil.copy(INVENTORIES / "group_data" / "all.py", group_data / "all.py")
    data = (INVENTORIES / "group_data" / f"{base}.py").read_text()
    for key, value in (settings or {}).items():
        data += f"{key} = {value!r}\n"
    (group_data / f"{name}.py").write_text(data + extra)
    keys = INVENTORIES / f"{base}.api-keys"  # endpoint_api_keys_file, beside the inventory
    if keys.exists() and not (directory / keys.name).exists():
        shutil.copy(keys, directory / keys.name)
    path = directory / f"{name}.py"
    path.write_text(hosts if hosts is not None else (INVENTORIES / f"{base}.py").read_text())
    return path


def problems_of(path: Path) -> list[inventory.Problem]:
    """The problems `inventory.load` reports; fails the test if the inventory loads."""
    with pytest.raises(inventory.InventoryError) as info:
        inventory.load(str(path))
    assert info.value.problems, "InventoryError without problems"
    return info.value.problems


def only_field(problems: list[inventory.Problem], field: str) -> list[inventory.Problem]:
    """The problems about `field`, asserting there is at least one and that none is about another field."""
    fields = {p.field for p in problems}
    assert fields == {field}, f"expected problems about {field!r} only, got {fields}: {problems}"
    return problems


def require_shellcheck() -> str:
    path = shutil.which("shellcheck")
    if path is None:
        pytest.fail("install shellcheck (apt-get install shellcheck)")
    return path


def shellcheck(*files: Path) -> None:
    """Fail with shellcheck's findings unless every file is clean (all severities)."""
    result = subprocess.run(
        [require_shellcheck(), "--format=gcc", *map(str, files)], capture_output=True, text=True
    )
    assert result.returncode == 0, f"shellcheck found problems:\n{result.stdout}{result.stderr}"


def run_main(argv: list[str]) -> int:
    """`nemotron-deploy ARGV` in-process, as an exit code (a SystemExit counts, as in the shell)."""
    from nemotron_deploy import cli

    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def haproxy() -> str:
    """Debian's haproxy binary (scripts/setup installs it); fails the test, naming the fix, without it."""
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if path is None:
        pytest.fail(
            "haproxy is not installed: run scripts/setup (it installs Debian's haproxy)", pytrace=False
        )
    return path


# Three A100 40GB nodes: the plan that leaves no room for log-probs (its envelope refuses them).
A100_40GB_HOSTS = 'login = ["login01"]\ncompute = ["gpu01", "gpu02", "gpu03"]\n'


def run_health(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`nemotron-deploy health ARGV...` in-process: (exit code, stdout, stderr)."""
    from nemotron_deploy.service import health

    code = health.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
