"""Readiness latency: from "the server can generate" to "the waiter says so", ours against the card's.

Each start runs the emulator in script mode (the real ``megatron_gpt_eval.py`` command line) with a
random ``NEMO_EMULATOR_LOAD_DELAY`` on its own loopback port; it writes the ``time.time()`` at which
it became able to generate to ``NEMO_EMULATOR_READY_FILE``. The waiter is started together with the
server, as the model card's launch script does:

* ours: ``.venv/bin/python -m nemotron_deploy.service.health --wait --host 127.0.0.1 --port P`` (the real CLI);
* the card's: its ``depends_on`` function verbatim in bash (``curl -X PUT`` every 10 s until curl
  exits 0), then its ``sleep 5`` before ``call_server.py`` would run.

Latency = the waiter's exit time (seen by the runner) minus the ready timestamp. The card's loop
takes 10-15 s per start, so starts run concurrently, each on its own port, staggered a little so that
twenty Python start-ups don't land on the same instant of a 2-core machine. Both waiters see the
same list of load delays; the two kinds run one after the other, never mixed, so that the card's
processes don't steal CPU from ours or the other way round.
"""

from __future__ import annotations

import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from . import common

# The model card's depends_on() from nemo_inference.sh, unchanged except for the two arguments it is
# called with; the `sleep 5` is what the card does before calling the server.
CARD_LOOP = r"""
depends_on () {
HOST=$1
PORT=$2
STATUS=$(curl -X PUT http://$HOST:$PORT >/dev/null 2>/dev/null; echo $?)
while [ $STATUS -ne 0 ]
do
echo "waiting for server ($HOST:$PORT) to be up"
sleep 10
STATUS=$(curl -X PUT http://$HOST:$PORT >/dev/null 2>/dev/null; echo $?)
done
echo "server ($HOST:$PORT) is up running"
}
depends_on "$1" "$2"
echo "start get json"
sleep 5
"""

KINDS = ("ours", "card")
WAITER_TIMEOUT = 90.0


def waiter_argv(kind: str, port: int) -> list[str]:
    if kind == "ours":
        return [
            common.python(),
            "-m",
            "nemotron_deploy.service.health",
            "--wait",
            "--host",
            common.LOOPBACK,
            "--port",
            str(port),
        ]
    return ["bash", "-c", CARD_LOOP, "card-loop", common.LOOPBACK, str(port)]


_ports: set[int] = set()
_ports_lock = threading.Lock()


def _unique_port() -> int:
    """A free port no other start of this run was given (the kernel may hand one out twice)."""
    with _ports_lock:
        while True:
            port = common.free_port()
            if port not in _ports:
                _ports.add(port)
                return port


def _one(kind: str, delay: float, workdir: Path, model: Path, index: int) -> dict:
    """One start: emulator + waiter launched together; returns the sample (latency or error)."""
    port = _unique_port()
    ready = workdir / f"{kind}-{index}.ready"
    emu = common.start_emulator(model, port, delay, ready)
    waiter = subprocess.Popen(
        waiter_argv(kind, port),
        cwd=common.REPO,
        env=common.child_env(XDG_STATE_HOME=str(workdir / "state")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # A blocking wait (not wait(timeout), which polls every 50 ms) so the exit is seen at once;
    # the timer only kills a waiter that hangs.
    killer = threading.Timer(WAITER_TIMEOUT, waiter.kill)
    killer.start()
    rc = waiter.wait()
    done = time.time()
    killer.cancel()
    ready_at = common.read_ready(ready)
    common.stop(emu)
    sample = {"kind": kind, "index": index, "port": port, "load_delay": delay, "exit_code": rc}
    if rc != 0 or ready_at is None:
        sample["error"] = f"waiter exit {rc}" if rc != 0 else "emulator never became ready"
        sample["latency"] = float("nan")
    else:
        sample["latency"] = done - ready_at
    return sample


def _phase(kind: str, delays: list[float], stagger: float, workdir: Path, model: Path) -> list[dict]:
    samples: list[dict] = []
    lock = threading.Lock()

    def worker(i: int, delay: float) -> None:
        sample = _one(kind, delay, workdir, model, i)
        with lock:
            samples.append(sample)

    threads = []
    for i, delay in enumerate(delays):
        t = threading.Thread(target=worker, args=(i, delay), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(stagger)
    for t in threads:
        t.join()
    return sorted(samples, key=lambda s: s["index"])


def run(
    starts: int = 20,
    delay_min: float = 0.5,
    delay_max: float = 3.0,
    *,
    stagger: float = 0.2,
    seed: int | None = None,
    log=print,
) -> dict:
    """Measure both waiters over ``starts`` starts each; returns samples and summaries."""
    rng = random.Random(seed)
    delays = [round(rng.uniform(delay_min, delay_max), 3) for _ in range(starts)]
    out: dict = {"starts": starts, "delay_range": [delay_min, delay_max], "stagger": stagger}
    with tempfile.TemporaryDirectory(prefix="bench-readiness-") as tmp:
        workdir = Path(tmp)
        model = common.model_dir(workdir)
        for kind in KINDS:
            t0 = time.monotonic()
            samples = _phase(kind, delays, stagger, workdir, model)
            latencies = [s["latency"] for s in samples]
            summary = common.Summary.of(latencies)
            errors = [s for s in samples if "error" in s]
            out[kind] = {
                "samples": samples,
                "summary": summary.as_dict(),
                "errors": len(errors),
                "seconds": round(time.monotonic() - t0, 1),
            }
            log(
                f"readiness {kind}: median {summary.median:.3f}s p95 {summary.p95:.3f}s "
                f"(min {summary.min:.3f} max {summary.max:.3f}, {len(errors)} errors) "
                f"in {out[kind]['seconds']}s"
            )
    return out
