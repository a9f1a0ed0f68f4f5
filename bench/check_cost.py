"""Check cost: what one single health check costs, next to the cheapest ways to send the same probe.

The scheduled check runs every minute on a login node, so its cost is mostly a Python start-up.
Against one healthy emulator on loopback, each variant runs as a fresh process, one at a time,
round-robin (so drift hits them alike); wall time is measured around the process, CPU time is the
``resource.getrusage(RUSAGE_CHILDREN)`` difference (user + system) across its wait:

* ``health``: ``.venv/bin/python -m nemotron_deploy.service.health --host 127.0.0.1 --port P --no-state-file``;
* ``curl``: ``curl -s -X PUT -H 'Content-Type: application/json' -d '<same body>' .../generate``;
* ``bare-python``: a dozen-line urllib + json PUT of the same body, run by the same interpreter.

Plus the module's import time, two ways: the wall time of ``python -c 'import nemotron_deploy.service.health'``
minus that of ``python -c pass``, and ``python -X importtime``'s cumulative time of the top-level
imports that ``import nemotron_deploy.service.health`` adds to a bare start-up.
"""

from __future__ import annotations

import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from . import common

BARE_PROBE = '''\
"""Bare stdlib PUT probe: the floor for any Python health check."""
import json
import sys
import urllib.request

body = json.dumps(json.loads(sys.argv[2])).encode()
req = urllib.request.Request(sys.argv[1], data=body, method="PUT",
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=15) as resp:
    reply = json.loads(resp.read())
ok = isinstance(reply, dict) and isinstance(reply.get("sentences"), list)
sys.exit(0 if ok else 2)
'''

VARIANTS = ("health", "curl", "bare-python")


def probe_body() -> str:
    """The health check's own probe body, so every variant asks the server for the same work."""
    from nemotron_deploy.service.probe import probe_payload

    return json.dumps(probe_payload())


def variant_argv(variant: str, port: int, body: str, bare: Path) -> list[str]:
    url = f"http://{common.LOOPBACK}:{port}/generate"
    if variant == "health":
        return [
            common.python(),
            "-m",
            "nemotron_deploy.service.health",
            "--host",
            common.LOOPBACK,
            "--port",
            str(port),
            "--no-state-file",
        ]
    if variant == "curl":
        return ["curl", "-s", "-X", "PUT", "-H", "Content-Type: application/json", "-d", body, url]
    return [common.python(), str(bare), url, body]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int, bytes]:
    """(wall s, CPU s of the child, exit code, stdout) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=common.REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode, proc.stdout


def _succeeded(variant: str, rc: int, stdout: bytes) -> bool:
    if rc != 0:
        return False
    if variant == "curl":
        try:
            return isinstance(json.loads(stdout).get("sentences"), list)
        except (ValueError, AttributeError):
            return False
    return True


def importtime_us(env: dict[str, str], statement: str) -> dict[str, int]:
    """Top-level modules of ``python -X importtime -c statement`` -> their cumulative microseconds."""
    proc = subprocess.run(
        [common.python(), "-X", "importtime", "-c", statement],
        cwd=common.REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    tops: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue  # the header line, or something else on stderr
        name = parts[2][1:]  # "| " then two spaces per nesting level
        if name and not name.startswith(" "):  # depth 0: imported by the statement itself
            tops[name.strip()] = int(parts[1])
    return tops


def _importtime_added(env: dict[str, str]) -> float:
    """Seconds of import the health module adds to a bare ``python -c pass`` start-up."""
    base = importtime_us(env, "pass")
    full = importtime_us(env, "import nemotron_deploy.service.health")
    return sum(us for name, us in full.items() if name not in base) / 1e6


def run(runs: int = 30, *, warmup: int = 3, log=print) -> dict:
    """Measure every variant ``runs`` times (after ``warmup`` untimed rounds); returns the results."""
    env = common.child_env()
    body = probe_body()
    out: dict = {"runs": runs, "body": body}
    with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
        workdir = Path(tmp)
        bare = workdir / "bare_probe.py"
        bare.write_text(BARE_PROBE)
        model = common.model_dir(workdir)
        port = common.free_port()
        ready = workdir / "ready"
        emu = common.start_emulator(model, port, 0.0, ready)
        try:
            common.wait_ready(ready, emu)
            samples: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in VARIANTS}
            failures = dict.fromkeys(VARIANTS, 0)
            imports: dict[str, list[float]] = {"pass": [], "import": [], "difference": [], "importtime": []}
            py = common.python()
            for i in range(warmup + runs):
                for variant in VARIANTS:
                    wall, cpu, rc, stdout = timed(variant_argv(variant, port, body, bare), env)
                    if i < warmup:
                        continue
                    if not _succeeded(variant, rc, stdout):
                        failures[variant] += 1
                        continue
                    samples[variant]["wall"].append(wall)
                    samples[variant]["cpu"].append(cpu)
                bare_start, _, rc1, _ = timed([py, "-c", "pass"], env)
                with_import, _, rc2, _ = timed([py, "-c", "import nemotron_deploy.service.health"], env)
                if i >= warmup and rc1 == rc2 == 0:
                    imports["pass"].append(bare_start)
                    imports["import"].append(with_import)
                    imports["difference"].append(with_import - bare_start)
                if i >= warmup and i - warmup < min(runs, 10):
                    imports["importtime"].append(_importtime_added(env))
        finally:
            common.stop(emu)
    for variant in VARIANTS:
        out[variant] = {
            "wall": common.Summary.of(samples[variant]["wall"]).as_dict(),
            "cpu": common.Summary.of(samples[variant]["cpu"]).as_dict(),
            "failures": failures[variant],
            "samples": samples[variant],
        }
    out["import"] = {
        "python_pass": common.Summary.of(imports["pass"]).as_dict(),
        "python_import": common.Summary.of(imports["import"]).as_dict(),
        "difference": common.Summary.of(imports["difference"]).as_dict(),
        "importtime": common.Summary.of(imports["importtime"]).as_dict(),
    }
    h, b = out["health"]["wall"]["median"], out["bare-python"]["wall"]["median"]
    out["ratio_wall_vs_bare"] = h / b if b else float("nan")
    hc, bc = out["health"]["cpu"]["median"], out["bare-python"]["cpu"]["median"]
    out["ratio_cpu_vs_bare"] = hc / bc if bc else float("nan")
    log(
        "check cost (median wall / CPU ms): "
        + ", ".join(
            f"{v} {out[v]['wall']['median'] * 1e3:.1f}/{out[v]['cpu']['median'] * 1e3:.1f}" for v in VARIANTS
        )
        + f"; health/bare {out['ratio_wall_vs_bare']:.2f}x wall, {out['ratio_cpu_vs_bare']:.2f}x CPU; "
        f"import {out['import']['difference']['median'] * 1e3:.1f} ms (importtime "
        f"{out['import']['importtime']['median'] * 1e3:.1f} ms)"
    )
    return out
