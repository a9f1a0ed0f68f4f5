"""What ships to a cluster is the product only: the health-check wheel and `pip install .` carry no
rehearsal code (sandbox, NeMo stand-in, fake nvidia-smi), and the wheel's digest, which decides
whether every login node reinstalls its venv, does not move when only rehearsal code changes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

# Names that only the rehearsal has; none may appear in a shipped wheel.
TEMPLATES = sorted(p.name for p in (REPO / "nemotron_deploy" / "deploy" / "templates").glob("*.j2"))
REHEARSAL_MARKERS = ("sandbox", "emulator", "nvidia_smi_captures", "rehearsal", "model_config.yaml")


def _tracked_copy(dest: Path) -> Path:
    """The repository's tracked files (what a fresh clone has), copied to `dest`."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if not src.is_file():
            continue  # deleted in the working tree
        target = dest / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
    return dest


def _build(repo: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[Path]]:
    """wheelhouse.build() of the package in `repo` (the wheels the deploy uploads), in a fresh cache.

    wheelhouse.py is loaded from `repo` itself (it finds the package beside it), not the installed one.
    """
    spec = importlib.util.spec_from_file_location(
        "_wheelhouse_under_test", repo / "nemotron_deploy" / "deploy" / "wheelhouse.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return module.build()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tracked_copy(tmp_path_factory.mktemp("clone") / "nemotron-deploy")


def test_health_wheel_carries_no_rehearsal_code(
    clone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, wheels = _build(clone, tmp_path / "cache", monkeypatch)
    ours = [w for w in wheels if w.name.startswith("nemotron_deploy-")]
    assert len(ours) == 1, wheels
    names = zipfile.ZipFile(ours[0]).namelist()
    assert "nemotron_deploy/service/health.py" in names and "nemotron_deploy/catalog/gpus.yaml" in names
    assert "nemotron_deploy/service/alerts/nemotron.rules.yml" in names
    assert "nemotron_deploy/deploy/templates/nemotron.sbatch.j2" in names
    leaked = [n for n in names if any(m in n for m in REHEARSAL_MARKERS)]
    assert leaked == [], f"rehearsal code in the shipped wheel: {leaked}"


def test_pip_install_of_the_root_is_the_product_only(clone: Path, tmp_path: Path) -> None:
    """`pip install .` of a clone: what a user gets; built as a wheel so nothing is installed here."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(clone)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("nemotron_deploy-*.whl")
    top_levels = {n.split("/", 1)[0] for n in zipfile.ZipFile(wheel).namelist()}
    # Package data: the alert rules the deploy installs come from the installed package.
    names = zipfile.ZipFile(wheel).namelist()
    assert "nemotron_deploy/service/alerts/nemotron.rules.yml" in names
    # The templates are package data: `nemotron-deploy render` works from an installed package.
    assert {f"nemotron_deploy/deploy/templates/{t}" for t in TEMPLATES} <= set(names)
    assert {t for t in top_levels if not t.endswith(".dist-info")} == {"nemotron_deploy"}
    leaked = [n for n in zipfile.ZipFile(wheel).namelist() if any(m in n for m in REHEARSAL_MARKERS)]
    assert leaked == []


def test_digest_moves_with_the_product_not_the_rehearsal(
    clone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, _ = _build(clone, tmp_path / "c1", monkeypatch)
    emulator = clone / "rehearsal" / "nemotron_rehearsal" / "emulator.py"
    assert emulator.is_file(), "the NeMo stand-in should live in the rehearsal package"
    emulator.write_text(emulator.read_text() + "\n# a rehearsal-only edit\n")
    stand_in = clone / "rehearsal" / "nemotron_rehearsal" / "sandbox" / "nvidia_smi.py"
    stand_in.write_text(stand_in.read_text() + "\n# another\n")
    assert _build(clone, tmp_path / "c2", monkeypatch)[0] == before, (
        "a rehearsal edit changed the shipped digest"
    )

    rules = clone / "nemotron_deploy" / "service" / "alerts" / "nemotron.rules.yml"
    rules.write_text(rules.read_text() + "\n# an edit of the shipped alert rules\n")
    with_rules = _build(clone, tmp_path / "c3", monkeypatch)[0]
    assert with_rules != before, "a rules edit must change the digest (the rules ship in the wheel)"

    health = clone / "nemotron_deploy" / "service" / "health.py"
    health.write_text(health.read_text() + "\n# a product edit\n")
    assert _build(clone, tmp_path / "c4", monkeypatch)[0] not in (before, with_rules), (
        "a product edit must change the digest"
    )


def test_a_stale_build_dir_does_not_ship_removed_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setuptools builds in the source tree's build/: a module an earlier layout had (its build/lib
    left over from a deploy of that release) must not ride along in the login node's wheel, and the
    build leaves nothing in the checkout."""
    repo = _tracked_copy(tmp_path / "checkout")
    stale = repo / "build" / "lib" / "nemotron_deploy" / "fleet.py"  # the earlier layout's module
    stale.parent.mkdir(parents=True)
    stale.write_text("raise SystemExit('the earlier layout')\n")
    _, wheels = _build(repo, tmp_path / "cache", monkeypatch)
    (ours,) = [w for w in wheels if w.name.startswith("nemotron_deploy-")]
    names = zipfile.ZipFile(ours).namelist()
    assert "nemotron_deploy/fleet.py" not in names and "nemotron_deploy/service/fleet.py" in names
    assert not (repo / "nemotron_deploy.egg-info").exists()
    assert sorted(p.name for p in (repo / "build").iterdir()) == ["lib"]
