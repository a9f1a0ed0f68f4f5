"""What every part shares: paths, the children's environment, summaries, and the emulator as a process.

Why a separate child environment: this machine exports ``PYTHONDONTWRITEBYTECODE=1``, so every run of
``python -m nemotron_deploy.service.health`` would recompile the module from source, which a pip-installed
health check on a login node never does. Children get bytecode caching back, with the cache in a
private temp dir (``PYTHONPYCACHEPREFIX``) so nothing is written into the repository or the system.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nemotron_rehearsal import EMULATOR, MODEL_CONFIG

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"  # never a pyenv shim: those add ~80 ms per start
LOOPBACK = "127.0.0.1"


def python() -> str:
    """The venv's interpreter (what the deployed health check runs), else this one."""
    return str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


_pycache: str | None = None


def child_env(*, private_pycache: bool = True, **extra: str) -> dict[str, str]:
    """Environment for measured children, no user site noise; bytecode cached in a private dir,
    unless ``private_pycache`` is False: the bytecode beside the sources, as installed.

    pyinfra's CLI turns bytecode writing off before it imports the deploy, so under a private cache
    every module imported after that (pydantic's, ours, some of the stdlib) would be compiled from
    source on every run: 0.8 s of CPU a deploy here, which no operator pays. Deploys therefore use
    the installed bytecode (``compile_package`` fills it for this checkout's own modules).
    """
    global _pycache
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    env.pop("PYTHONPYCACHEPREFIX", None)
    if private_pycache:
        if _pycache is None:
            _pycache = tempfile.mkdtemp(prefix="bench-pycache-")
        env["PYTHONPYCACHEPREFIX"] = _pycache
    env.update(extra)
    return env


def compile_package() -> None:
    """Bytecode for this checkout's packages, as ``pip install`` (not editable) would have written."""
    dirs = [str(REPO / "nemotron_deploy"), str(REPO / "rehearsal" / "nemotron_rehearsal")]
    env = child_env(private_pycache=False)
    subprocess.run(
        [python(), "-m", "compileall", "-q", *dirs], env=env, check=True, stdout=subprocess.DEVNULL
    )


def cleanup() -> None:
    global _pycache
    if _pycache:
        shutil.rmtree(_pycache, ignore_errors=True)
        _pycache = None


def free_port() -> int:
    """A port nothing listens on right now (the kernel picks it; another program could still race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Median, min, max and p95 of a sample; what every table cell shows."""

    n: int
    median: float
    min: float
    max: float
    p95: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        vals = [v for v in values if v == v]  # drop NaN (failed runs are counted separately)
        if not vals:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan)
        return cls(len(vals), percentile(vals, 50), min(vals), max(vals), percentile(vals, 95))

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "median": self.median, "min": self.min, "max": self.max, "p95": self.p95}


def model_dir(parent: Path) -> Path:
    """A checkpoint directory the emulator accepts: it only reads ``model_config.yaml``."""
    d = parent / "model"
    d.mkdir(exist_ok=True)
    shutil.copyfile(MODEL_CONFIG, d / "model_config.yaml")
    return d


def emulator_argv(model: Path, port: int) -> list[str]:
    """The real ``megatron_gpt_eval.py`` command line, sized for one rank (TP 1 x PP 1)."""
    return [
        python(),
        str(EMULATOR),
        f"gpt_model_file={model}",
        "tensor_model_parallel_size=1",
        "pipeline_model_parallel_size=1",
        "pipeline_model_parallel_split_rank=0",
        "trainer.devices=1",
        "trainer.num_nodes=1",
        "trainer.precision=bf16",
        "server=True",
        "web_server=False",
        f"port={port}",
    ]


def start_emulator(model: Path, port: int, load_delay: float, ready_file: Path) -> subprocess.Popen:
    """Start the emulator in script mode; it writes ``ready_file`` once it can generate."""
    env = child_env(
        NEMO_EMULATOR_LOAD_DELAY=f"{load_delay:.3f}",
        NEMO_EMULATOR_READY_FILE=str(ready_file),
        NEMO_EMULATOR_TOKEN_SECONDS="0",
    )
    return subprocess.Popen(
        emulator_argv(model, port),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def read_ready(ready_file: Path) -> float | None:
    try:
        return float(ready_file.read_text().strip())
    except (OSError, ValueError):
        return None


def wait_ready(ready_file: Path, proc: subprocess.Popen, timeout: float = 30.0) -> float:
    """Block until the emulator wrote its ready time; raise if it died or took too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ts = read_ready(ready_file)
        if ts is not None:
            return ts
        if proc.poll() is not None:
            raise RuntimeError(f"the emulator exited with {proc.returncode} before it was ready")
        time.sleep(0.01)
    raise RuntimeError(f"the emulator was not ready within {timeout:g}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def machine() -> dict[str, object]:
    """Cores and memory of this machine: every number in the report depends on them."""
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count() or 0,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "cpu": model,
        "python": sys.version.split()[0],
    }
