"""Wheels for the login node's health-check venv, built once per source version and cached.

Cluster nodes often can't reach PyPI; the deploy uploads these wheels and installs them offline
with pypa's `installer`, whose own wheel is uploaded beside them and run from there (a venv made
`--without-pip`: pip's bootstrap was most of a first deploy's fixed cost). The health check needs
only this package and prometheus-client (it never imports pyinfra or pydantic): no dependencies are
resolved.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

# Beside our own wheel, at the versions installed here: the health check's one dependency, and the
# wheel installer the login node runs.
WHEEL_DISTS = ("prometheus-client", "installer")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # nemotron_deploy/, what the wheel carries
REPO = PACKAGE_DIR.parent


def source_digest() -> str:
    """Hash of everything that goes into our wheel, plus the versions of the other wheels."""
    h = hashlib.sha256()
    files = [
        REPO / "pyproject.toml",
        *sorted(PACKAGE_DIR.rglob("*.py")),
        *sorted(PACKAGE_DIR.rglob("*.yaml")),
        *sorted(PACKAGE_DIR.rglob("*.yml")),  # service/alerts/nemotron.rules.yml
        *sorted(PACKAGE_DIR.rglob("*.j2")),  # deploy/templates/
    ]
    for path in files:
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    for dist in WHEEL_DISTS:
        h.update(f"{dist}=={version(dist)}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nemotron-deploy" / "wheelhouse"


def build() -> tuple[str, list[Path]]:
    """(digest, wheel paths); builds into the cache on first use for this source digest."""
    digest = source_digest()
    target = cache_root() / digest
    done = target / ".complete"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="nemotron-wheel-") as tmp:
            _build_into(target, _clean_copy(Path(tmp)))
        done.write_text(digest)
    return digest, sorted(target.glob("*.whl"))


def _clean_copy(dest: Path) -> Path:
    """The sources the wheel is built from, copied: setuptools builds in the source tree's build/, and
    a module removed from the package (an earlier layout's) stayed in build/lib and in every later
    wheel; the build writes no build/ or egg-info into the repository either."""
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(PACKAGE_DIR, dest / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _build_into(target: Path, source: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--wheel-dir",
        str(target),
        str(source),
        *(f"{dist}=={version(dist)}" for dist in WHEEL_DISTS),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"building the health-check wheels failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}\n"
            "pip needs PyPI (or a configured index) on the deploying machine for this step"
        )
