"""No request lost while replicas serve, on the sandbox (4 compute nodes, 2 replicas): two clients send
`PUT /generate` back to back through the endpoint (a few hundred requests/s against the stand-in)
while `job_env` changes are rolled out again and again (`--data rollout=true`, drain and replace).

Every request must be answered with a generation: the endpoint may never answer 503 while a replica
serves, and a request may fail only if it was on a replica's job when that job was cancelled (at most
one per cancelled job; the rollout drains a replica before cancelling it, so normally none).

Meanwhile HAProxy's view of every slot is sampled on the login node (`show stat`, every 20 ms, a line
per change): a failure prints what the slots went through, the evidence of why.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from nemotron_rehearsal import sandbox as sb_api
from sshutil import (
    HEALTH_USER,
    HEALTH_VENV,
    LOGIN_ADDRESS,
    PORT,
    cancel_jobs,
    endpoint_cert,
    pyinfra,
    rehearsal_key,
    reset_deploy,
)
from test_replicas import R1, R2, SOCKET, _jobs, _serve_both

ROLLOUTS = 3
CLIENTS = 2  # one API key, whose limit of requests in flight is the replica count (2)

# Runs on the login node as the health user (the stats socket's group): one line per change of any
# replica slot's state, with HAProxy's own counters of what went wrong on real traffic.
SAMPLER = f"""
import socket, sys, time
COLUMNS = ("status", "check_status", "econ", "eresp", "wretr", "wredis", "hanafail", "chkfail", "chkdown", "hrsp_5xx")
def stat():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect({SOCKET!r}); s.sendall(b"show stat\\n"); data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines(); head = lines[0][2:].split(",")
    rows = [dict(zip(head, line.split(","))) for line in lines[1:] if line]
    return {{r["svname"]: r for r in rows if r.get("pxname") == "replicas"}}
last = None
while True:
    rows = stat()
    now = " ".join(
        f"{{name}}=" + "/".join(rows[name].get(c, "") for c in COLUMNS)
        for name in sorted(rows) if name != "BACKEND"
    ) + " queue=" + rows["BACKEND"].get("qcur", "")
    if now != last:
        print(f"{{time.time():.3f}} {{now}}", flush=True)
        last = now
    time.sleep(0.02)
"""


class Load:
    """`CLIENTS` threads, each sending the model card's kind of request back to back (a new TLS
    connection each, as call_server.py opens one), every answer checked."""

    def __init__(self) -> None:
        self.context = ssl.create_default_context(cafile=str(endpoint_cert()))
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {rehearsal_key()}"}
        self.sent = 0
        self.failures: list[tuple[float, str]] = []  # (when, what)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def _put(self, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(LOGIN_ADDRESS, PORT, timeout=60, context=self.context)
        try:
            conn.request("PUT", "/generate", body, self.headers)
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {"sentences": [f"load {i} {n}:"], "tokens_to_generate": 4, "temperature": 1.0, "top_k": 1}
            try:
                status, data = self._put(json.dumps(body).encode())
                try:
                    reply = json.loads(data)
                except ValueError:
                    reply = None
                problem = (
                    None if status == 200 and isinstance(reply, dict) and "sentences" in reply else status
                )
                if problem is not None:
                    problem = f"HTTP {status}: {data[:160].decode(errors='replace')}"
            except OSError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.sent += 1
                if problem:
                    self.failures.append((time.time(), problem))

    def rate(self, seconds: float = 2.0) -> float:
        before, t0 = self.sent, time.monotonic()
        time.sleep(seconds)
        return (self.sent - before) / (time.monotonic() - t0)

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(90)


@contextmanager
def heavy_load() -> Iterator[Load]:
    load = Load()
    for t in load.threads:
        t.start()
    try:
        yield load
    finally:
        load.stop()


@contextmanager
def slot_samples(sandbox) -> Iterator[list[str]]:
    """HAProxy's view of the slots, sampled on the login node while the block runs."""
    argv = sandbox.ssh_argv(
        sandbox.login_host,
        f"exec runuser -u {HEALTH_USER} -- {HEALTH_VENV}/bin/python -u -c {_quoted(SAMPLER)}",
    )
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        proc.terminate()
        proc.wait(10)
        reader.join(10)


def _quoted(text: str) -> str:
    import shlex

    return shlex.quote(text)


@pytest.fixture(scope="module", autouse=True)
def _alone(sandbox):
    with sb_api.exclusive_use("no-lost-request test (heavy load, rollouts)"):
        reset_deploy(sandbox)  # from "never deployed": whatever an earlier session's deploy left
        yield
        cancel_jobs(sandbox)


def test_heavy_load_through_repeated_rollouts_loses_no_request(sandbox):
    _serve_both(sandbox)
    cancelled: list[str] = []
    try:
        with slot_samples(sandbox) as samples, heavy_load() as load:
            rate = load.rate()
            print(f"load: {rate:.0f} requests/s through the endpoint")
            assert rate > 50, f"the load is too light to show anything ({rate:.0f}/s)"
            for i in range(ROLLOUTS):
                before = {name: job for name, (job, _) in _jobs(sandbox).items()}
                env = f'job_env={{"NEMOTRON_ROLL": "{i}"}}'
                run = pyinfra("--data", env, "--data", "rollout=true", timeout=600)
                assert run.rc == 0, run.describe()
                assert "rollout: done: every replica runs the current files" in run.output, run.output[-3000:]
                after = {name: job for name, (job, _) in _jobs(sandbox).items()}
                assert set(after) == {R1, R2} and all(after[n] != before.get(n) for n in after), (
                    before,
                    after,
                )
                cancelled += [before[n] for n in before]
            load.rate(3.0)  # a few more seconds of load with both new replicas
        print(f"{load.sent} requests, {len(load.failures)} failed, {len(cancelled)} jobs cancelled")
        evidence = "".join(samples[-400:])
        fives = [f for f in load.failures if f[1].startswith("HTTP 503")]
        assert not fives, f"{len(fives)} answered 503, first {fives[0]}, last {fives[-1]}\nslots:\n{evidence}"
        # At most the one request in flight on each cancelled job (the rollout drains first: none).
        assert len(load.failures) <= len(cancelled), f"{load.failures[:20]}\nslots:\n{evidence}"
    finally:
        # Back to the inventory's job_env, rolled out, for the next tests.
        back = pyinfra("--data", "rollout=true", timeout=600)
        assert back.rc == 0, back.describe()
