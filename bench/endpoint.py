"""The endpoint as its users feel it: throughput with 1 and 2 replicas, latency it adds, failover.

Everything runs on loopback, no root, nothing shared with the sandbox:

* HAProxy (Debian's 2.6, ``haproxy -db``) runs the configuration the deploy installs on a login node:
  ``render.render_endpoint`` for ``inventories/h100.py`` with 2 replica slots. Only what cannot be
  the deployed value on a shared machine differs: ``endpoint_port`` (a free port, given as a data
  override the way ``pyinfra --data`` would), the bind address (127.0.0.1), the config dir and the
  stats socket (a temp dir), and, when not run as root, the user HAProxy switches to. It is rendered
  in a subprocess: loading an inventory runs pyinfra's CLI, which monkey-patches threading with gevent,
  and this process's clients are threads.
* Each replica is the emulator in script mode (the real ``megatron_gpt_eval.py`` command line), one
  process each, as the sandbox runs it, listening on 127.0.0.1 (``NEMO_EMULATOR_BIND``). Slots are
  pointed at them by ``endpoint_sync.apply`` over the stats socket, as the health timer does. For
  latency and throughput each is behind its replica front (``service/replica_front.py`` with the
  replica key and the OpenAI translation config, as a job starts it), so ``PUT /generate`` and
  ``/v1/completions`` take the deployed path; failover, sustained load and the refused connection
  point the slots at the emulators themselves (what HAProxy does with a dying process).
* Clients are threads here, each sending the model card client's body (one prompt, a few tokens,
  ``PUT /generate``), a new connection per request as ``call_server.py`` does; an answer counts when
  it is 200 with a JSON object holding ``sentences``. Through the endpoint they do what the deployed
  default asks of a client: TLS verified against the self-signed certificate (made by the deploy's own
  key-pair script, here), and an API key each (made with ``api-key new``'s code: one key per client,
  as separate users, so the per-key limit of requests in flight does not throttle the load).

Five measurements:

1. throughput: replicas with a fixed generation time (``NEMO_EMULATOR_SLOW_SECONDS``), ``clients``
   closed-loop clients through the endpoint, rounds of 1, 2, 2, 1 replicas (drift cancels); for 1,
   slot r2 is in maintenance. Requests/s = answers completed in the round's window / its length.
2. latency: a replica without extra generation time, one client, requests alternating between the
   replica's own port, ``PUT /generate`` through the endpoint and ``POST /v1/completions`` through
   the endpoint (same replica, same front), after a warm-up.
3. failover: 2 replicas, ``FAILOVER_CLIENTS`` clients, one replica's process SIGKILLed mid-run; failed
   requests, the longest time between two answers around the kill, the request that was on the killed
   replica, and the time until HAProxy shows the slot DOWN (polled on the stats socket).
4. sustained load: 2 clients back to back against replicas with no generation time (a few hundred
   requests/s) for max(10, 4 x seconds) s while both replicas are rolled again and again; failed
   requests, and the time no slot was UP.
5. refused once: the only serving replica (the other drained) refuses one connection; failed requests
   in the 1.5 s after it, and how long its slot was not UP (issue 20's 503 bursts).
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import pwd
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nemotron_rehearsal import tokenizer

from nemotron_deploy import api_keys
from nemotron_deploy.deploy import endpoint as endpoint_files
from nemotron_deploy.service import endpoint_sync

from . import common

INVENTORY = "inventories/h100.py"
REPLICAS = 2
SLOTS = ("r1", "r2")
GENERATION_SECONDS = 0.1  # fixed time per generation in the throughput and failover runs
FAILOVER_CLIENTS = 4
WARMUP_REQUESTS = 30  # per path, before the latency samples
ROUND_PATTERN = (1, 2, 2, 1)
ROUND_WARMUP = 0.3  # seconds of each round not counted (the clients' first requests start together)
STATUS_TIMEOUT = 30.0
END_STRINGS = ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]
MODEL_ID = "nemotron-4-340b-base"  # inventories/h100.py's model, as GET /v1/models names it

REPLICA_KEY = "0" * 64  # the replica key HAProxy sends (its map rendered beside haproxy.cfg), the fronts ask
# Renders the endpoint for the shipped inventory; run with `python -c` (see the module docstring).
RENDER = (
    f"REPLICA_KEY = {REPLICA_KEY!r}\n"
    + """\
import grp, os, pwd, sys
from pathlib import Path
from nemotron_deploy import inventory
from nemotron_deploy.deploy import render
from nemotron_deploy.deploy import openai_config
inv, out, sock, port, replicas, keys, tokenizer = sys.argv[1:8]
cluster = inventory.load(inv, override_data={"endpoint_port": int(port), "endpoint_api_keys_file": keys})
who = {}
if os.geteuid() != 0:  # HAProxy can only switch to the user it runs as
    who = {"run_as": pwd.getpwuid(os.geteuid()).pw_name, "socket_group": grp.getgrgid(os.getegid()).gr_name}
for f in render.render_endpoint(cluster, int(replicas), config_dir=out, stats_socket=sock,
                                bind_address="127.0.0.1", replica_key=REPLICA_KEY, **who):
    Path(out, f.name).write_text(str(f.content))
# The replica fronts' translation config, as the job carries it, with the stand-in tokenizer.
Path(out, openai_config.CONFIG_FILE).write_text(openai_config.config_text(cluster, tokenizer=tokenizer))
print(cluster.settings.endpoint_check_seconds, cluster.settings.endpoint_queue_seconds)
"""
)


def haproxy() -> str:
    for path in ("/usr/sbin/haproxy", "/usr/bin/haproxy"):
        if Path(path).exists():
            return path
    raise RuntimeError("haproxy is not installed: run scripts/setup (it installs Debian's haproxy)")


def body(prompt: str, tokens: int = 16) -> bytes:
    """What the model card's client sends (call_server.py's defaults), with few tokens."""
    return json.dumps(
        {
            "sentences": [prompt],
            "tokens_to_generate": tokens,
            "temperature": 1.0,
            "add_BOS": False,
            "top_k": 0,
            "top_p": 1.0,
            "greedy": True,
            "all_probs": False,
            "repetition_penalty": 1.0,
            "min_tokens_to_generate": 1,
            "end_strings": END_STRINGS,
        }
    ).encode()


KEYS = 64  # one API key per client thread (at most this many clients)


def put(
    port: int, data: bytes, timeout: float = 60.0, *, key: str | None = None, ca_file: str | None = None
) -> tuple[int, bytes]:
    """One request on a new connection: plain to a replica; to the endpoint over TLS with a key."""
    if ca_file:
        context = ssl.create_default_context(cafile=ca_file)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            common.LOOPBACK, port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(common.LOOPBACK, port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request("PUT", "/generate", data, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _same_path() -> dict[str, str]:
    """A front imports what this process does (sentencepiece from a PYTHONPATH, if that is where it is)."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}


def completion_body(prompt: str, tokens: int = 16) -> bytes:
    """The same generation as `body` through the OpenAI API (greedy, the card's end strings)."""
    return json.dumps(
        {"model": MODEL_ID, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stop": END_STRINGS[1:]}
    ).encode()


def post(
    port: int,
    path: str,
    data: bytes,
    timeout: float = 60.0,
    *,
    key: str | None = None,
    ca_file: str | None = None,
) -> tuple[int, bytes]:
    """One OpenAI request on a new connection, to the endpoint over TLS with a key."""
    context = ssl.create_default_context(cafile=ca_file)
    conn = http.client.HTTPSConnection(common.LOOPBACK, port, timeout=timeout, context=context)
    try:
        conn.request(
            "POST", path, data, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def openai_problem(status: int, data: bytes) -> str | None:
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if (
        status == 200
        and isinstance(reply, dict)
        and isinstance(reply.get("choices"), list)
        and reply.get("usage")
    ):
        return None
    return f"HTTP {status}: {data[:160].decode(errors='replace')}"


def problem(status: int, data: bytes) -> str | None:
    """None for a real answer (200, a JSON object with sentences), else what was wrong."""
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if status == 200 and isinstance(reply, dict) and isinstance(reply.get("sentences"), list):
        return None
    return f"HTTP {status}: {data[:160].decode(errors='replace')}"


class Stack:
    """HAProxy with the rendered config, and the emulator processes behind it."""

    def __init__(self, workdir: Path, log) -> None:
        self.workdir = workdir
        self.log = log
        self.model = common.model_dir(workdir)
        self.socket = str(workdir / "admin.sock")
        self.port = common.free_port()
        self.haproxy_log = workdir / "haproxy.log"
        self.emulators: dict[str, tuple[subprocess.Popen, int]] = {}
        self.proc: subprocess.Popen | None = None
        self.keys: list[str] = []
        self.ca_file: str | None = None
        # Replica fronts (service/replica_front.py, as a job starts one once NeMo generates), by the
        # emulator's name: (process, port).
        self.fronts: dict[str, tuple[subprocess.Popen, int]] = {}

    def client(self, i: int) -> dict:
        """How client `i` calls the endpoint (put's keywords)."""
        return {"key": self.keys[i], "ca_file": self.ca_file}

    def start(self) -> dict:
        t0 = time.monotonic()
        keys_file = self.workdir / "api-keys"
        self.keys = [api_keys.add(keys_file, f"bench-{i}") for i in range(KEYS)]
        rendered = subprocess.run(
            [
                sys.executable,
                "-c",
                RENDER,
                INVENTORY,
                str(self.workdir),
                self.socket,
                str(self.port),
                str(REPLICAS),
                str(keys_file),
                str(tokenizer.train(self.workdir / "tokenizer.model")),
            ],
            cwd=common.REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if rendered.returncode != 0:
            raise RuntimeError(
                f"rendering the endpoint for {INVENTORY} failed: {rendered.stderr.strip()[-2000:]}"
            )
        check, queue = (int(x) for x in rendered.stdout.split()[-2:])
        cfg = self.workdir / "haproxy.cfg"
        # endpoint_tls = self-signed (h100's default): the deploy's own script makes the pair here
        cert, key = self.workdir / endpoint_files.TLS_CERT_FILE, self.workdir / endpoint_files.TLS_KEY_FILE
        script = endpoint_files.self_signed_script(
            str(cert), str(key), names=["localhost"], addresses=[common.LOOPBACK],
            user=pwd.getpwuid(os.geteuid()).pw_name, group=grp.getgrgid(os.getegid()).gr_name, days=2,
        )  # fmt: skip
        made = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            raise RuntimeError(f"making the self-signed certificate failed: {made.stderr.strip()[-2000:]}")
        self.ca_file = str(cert)
        with self.haproxy_log.open("w") as out:
            self.proc = subprocess.Popen(
                [haproxy(), "-f", str(cfg), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while not Path(self.socket).exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start: {self.haproxy_log.read_text()[-2000:]}")
            time.sleep(0.02)
        server_line = next(line.strip() for line in cfg.read_text().splitlines() if "server-template" in line)
        return {
            "inventory": INVENTORY,
            "haproxy": " ".join(
                subprocess.run([haproxy(), "-v"], capture_output=True, text=True).stdout.split()[:3]
            ),
            "check_seconds": check,
            "queue_seconds": queue,
            "server_line": server_line,
            "render_seconds": round(time.monotonic() - t0, 2),
        }

    def emulator(self, name: str, slow: float, load_delay: float = 0.0) -> int:
        """Start one replica process (its port refuses connections for `load_delay` s, as a loading
        replica's does); returns its port."""
        port = common.free_port()
        ready = self.workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        env = common.child_env(
            NEMO_EMULATOR_LOAD_DELAY=f"{load_delay:g}",
            NEMO_EMULATOR_READY_FILE=str(ready),
            NEMO_EMULATOR_TOKEN_SECONDS="0",
            NEMO_EMULATOR_SLOW_SECONDS=f"{slow:g}",
            NEMO_EMULATOR_BIND=common.LOOPBACK,
        )
        proc = subprocess.Popen(
            common.emulator_argv(self.model, port),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.emulators[name] = (proc, port)
        return port

    def front(self, name: str) -> int:
        """The replica front before emulator `name` (the replica key, the translation config), on a
        port of its own; the emulator must generate already. Returns the front's port."""
        key_file = self.workdir / "replica.key"
        key_file.write_text(REPLICA_KEY + "\n")
        key_file.chmod(0o600)
        port = common.free_port()
        log = self.workdir / f"front-{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nemotron_deploy.service.replica_front", "--listen", common.LOOPBACK,
                 "--port", str(port), "--upstream-port", str(self.emulators[name][1]), "--key-file",
                 str(key_file), "--openai", str(self.workdir / "nemotron_openai.json")],
                cwd=common.REPO, env=common.child_env(**_same_path()), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.fronts[name] = (proc, port)
        deadline = time.monotonic() + 15
        while "replica front: 127.0.0.1" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the replica front for {name} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        return port

    def wait_emulators(self) -> None:
        for name, (proc, _) in self.emulators.items():
            common.wait_ready(self.workdir / f"{name}.ready", proc)

    def sync(self, *, fronts: bool = False, **slots: str | None) -> None:
        """Point each slot at an emulator by name (`fronts`: at its front), or None for maintenance;
        wait until each pointed one is UP."""
        ports = {name: port for name, (_, port) in (self.fronts if fronts else self.emulators).items()}
        desired = {
            slot: ((common.LOOPBACK, ports[name]) if name else (None, 0)) for slot, name in slots.items()
        }
        endpoint_sync.apply(self.socket, desired)
        deadline = time.monotonic() + STATUS_TIMEOUT
        want = {slot: ("up" if name else "maint") for slot, name in slots.items()}
        while True:
            state = {k: v.status for k, v in self.states().items() if k in want}
            if state == want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"slots not {want} within {STATUS_TIMEOUT:g}s: {state}")
            time.sleep(0.02)

    def states(self) -> dict[str, endpoint_sync.ServerState]:
        return endpoint_sync.servers_state(self.socket)

    def served(self) -> dict[str, int]:
        """Sessions each slot has served so far (`show stat` stot; health checks not included)."""
        lines = endpoint_sync.command(self.socket, "show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == endpoint_sync.BACKEND and row.get("svname") in SLOTS:
                out[row["svname"]] = int(row.get("stot") or 0)
        return out

    def stop(self) -> None:
        for proc, _ in [*self.fronts.values(), *self.emulators.values()]:
            common.stop(proc)
        if self.proc is not None:
            common.stop(self.proc)


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def load(
    stack: Stack, clients: int, seconds: float, tag: str, at=None, *, openai: bool = False
) -> tuple[list[dict], float]:
    """`clients` closed-loop clients for `seconds`; returns every request (start/end relative to t0)
    and t0. `at`: (delay, callable) run by the calling thread `delay` seconds after t0."""
    records: list[dict] = []
    t0 = time.monotonic()
    deadline = t0 + seconds

    def client(i: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            start = time.monotonic()
            try:
                prompt = f"{tag} client {i} request {n}"
                if openai:
                    status, data = post(
                        stack.port, "/v1/completions", completion_body(prompt), **stack.client(i)
                    )
                    error = openai_problem(status, data)
                else:
                    status, data = put(stack.port, body(prompt), **stack.client(i))
                    error = problem(status, data)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
            records.append({"client": i, "start": start - t0, "end": time.monotonic() - t0, "error": error})

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    if at is not None:
        delay, action = at
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        action()
    for t in threads:
        t.join(seconds + 120)
    return sorted(records, key=lambda r: r["end"]), t0


def throughput(stack: Stack, clients: int, seconds: float, log, *, openai: bool = False) -> dict:
    """Rounds of 1, 2, 2, 1 replicas behind their fronts, as in a job; `openai`: every request POST
    /v1/completions (translated on the front)."""
    what = "openai throughput" if openai else "endpoint throughput"
    rounds = []
    for i, n in enumerate(ROUND_PATTERN):
        stack.sync(r1="b1", r2="b2" if n == 2 else None, fronts=True)
        before = stack.served()
        records, _ = load(stack, clients, seconds, f"throughput round {i}", openai=openai)
        after = stack.served()
        ends = [r["end"] for r in records if r["error"] is None and ROUND_WARMUP <= r["end"] <= seconds]
        errors = [r for r in records if r["error"] is not None]
        # Answers per second between the first and the last answer of the window: a count over the
        # window's length would be quantised to whole generations (a replica answers every 0.1 s).
        rps = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")
        per_slot = {s: after.get(s, 0) - before.get(s, 0) for s in SLOTS}
        rounds.append(
            {
                "round": i,
                "replicas": n,
                "answers": len(ends),
                "rps": rps,
                "errors": len(errors),
                "per_slot": per_slot,
            }
        )
        if errors:
            rounds[-1]["first_error"] = errors[0]["error"]
        log(f"{what} round {i}: {n} replica(s) {rps:.2f} req/s, {len(errors)} errors, by slot {per_slot}")
    rps = {n: sum(r["rps"] for r in rounds if r["replicas"] == n) / ROUND_PATTERN.count(n) for n in (1, 2)}
    return {
        "clients": clients,
        "generation_seconds": GENERATION_SECONDS,
        "seconds_per_round": seconds,
        "counted_from": ROUND_WARMUP,
        "rounds": rounds,
        "rps": {str(n): v for n, v in rps.items()},
        "ratio": rps[2] / rps[1] if rps[1] else float("nan"),
        "errors": sum(r["errors"] for r in rounds),
        "ideal_rps_per_replica": 1 / GENERATION_SECONDS,
    }


def latency(stack: Stack, requests: int, log) -> dict:
    """One client, alternating direct (to the emulator) / PUT /generate through the endpoint /
    /v1/completions through the endpoint; replica "a" (no extra time), behind its front, in r1."""
    stack.sync(r1="a", r2=None, fronts=True)
    direct_port = stack.emulators["a"][1]
    paths = {"direct": direct_port, "through": stack.port, "openai": stack.port}
    samples: dict[str, list[float]] = {k: [] for k in paths}
    errors: dict[str, int] = {k: 0 for k in paths}
    first_error: dict[str, str] = {}
    data = body("latency probe")
    openai_data = completion_body("latency probe")
    for i in range(WARMUP_REQUESTS + requests):
        for name, port in paths.items() if i % 2 == 0 else reversed(paths.items()):
            start = time.perf_counter()
            try:
                if name == "openai":
                    status, reply = post(port, "/v1/completions", openai_data, **stack.client(0))
                    elapsed = time.perf_counter() - start
                    error = openai_problem(status, reply)
                else:
                    status, reply = put(port, data, **(stack.client(0) if name == "through" else {}))
                    elapsed = time.perf_counter() - start
                    error = problem(status, reply)
            except OSError as exc:
                elapsed, error = float("nan"), f"{type(exc).__name__}: {exc}"
            if i < WARMUP_REQUESTS:
                continue
            if error:
                errors[name] += 1
                first_error.setdefault(name, error)
            else:
                samples[name].append(elapsed)
    out: dict = {
        "requests": requests,
        "warmup": WARMUP_REQUESTS,
        "errors": errors,
        "first_error": first_error,
    }
    for name in paths:
        xs = samples[name]
        out[name] = {
            **common.Summary.of(xs).as_dict(),
            "p50": common.percentile(xs, 50),
            "p99": common.percentile(xs, 99),
            "samples": xs,
        }
    out["added"] = {q: out["through"][q] - out["direct"][q] for q in ("p50", "p99")}
    # What /v1/completions adds over PUT /generate, both through the endpoint to the same replica.
    out["openai_added"] = {q: out["openai"][q] - out["through"][q] for q in ("p50", "p99")}
    log(
        f"endpoint latency: direct p50 {out['direct']['p50'] * 1e3:.2f} ms p99 {out['direct']['p99'] * 1e3:.2f} ms, "
        f"through p50 {out['through']['p50'] * 1e3:.2f} ms p99 {out['through']['p99'] * 1e3:.2f} ms, "
        f"added p50 {out['added']['p50'] * 1e3:.2f} ms p99 {out['added']['p99'] * 1e3:.2f} ms; "
        f"/v1/completions p50 {out['openai']['p50'] * 1e3:.2f} ms p99 {out['openai']['p99'] * 1e3:.2f} ms, "
        f"over PUT /generate p50 {out['openai_added']['p50'] * 1e3:.2f} ms p99 {out['openai_added']['p99'] * 1e3:.2f} ms"
    )
    return out


def failover(stack: Stack, seconds: float, log) -> dict:
    """2 replicas under load; b2's process is SIGKILLed after kill_after seconds."""
    stack.sync(r1="b1", r2="b2")
    kill_after = max(1.0, seconds / 2)
    total = kill_after + max(2.0, seconds)
    proc = stack.emulators["b2"][0]
    seen: dict = {}

    def kill() -> None:
        seen["killed"] = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        deadline = seen["killed"] + 15
        while time.monotonic() < deadline:
            status = stack.states()["r2"].status
            if status != "up":
                seen["down"] = time.monotonic()
                seen["status"] = status
                return
            time.sleep(0.005)

    records, t0 = load(stack, FAILOVER_CLIENTS, total, "failover", at=(kill_after, kill))
    killed = seen["killed"] - t0
    ok_ends = [r["end"] for r in records if r["error"] is None]
    gaps = [(b - a, a, b) for a, b in zip(ok_ends, ok_ends[1:], strict=False)]
    around = [g for g in gaps if killed - 1.0 <= g[2] and g[1] <= killed + 3.0]
    before = [g[0] for g in gaps if ROUND_WARMUP <= g[1] and g[2] < killed]
    in_flight = [r for r in records if r["start"] <= killed <= r["end"]]
    failed = [r for r in records if r["error"] is not None]
    out = {
        "clients": FAILOVER_CLIENTS,
        "generation_seconds": GENERATION_SECONDS,
        "seconds": total,
        "killed_at": killed,
        "requests": len(records),
        "failures": len(failed),
        "failed": [f"{r['start']:.3f}s: {r['error']}" for r in failed[:5]],
        "gap": max((g[0] for g in around), default=float("nan")),
        "gap_before": max(before, default=float("nan")),
        "latency_before": common.percentile(
            [r["end"] - r["start"] for r in records if r["error"] is None and r["end"] < killed], 50
        ),
        "in_flight_at_kill": [r["end"] - r["start"] for r in in_flight],
        "in_flight_longest": max((r["end"] - r["start"] for r in in_flight), default=float("nan")),
        "down_after": seen["down"] - seen["killed"] if "down" in seen else float("nan"),
        "status_after": seen.get("status", "up"),
        "answers_after_kill": sum(1 for r in records if r["error"] is None and r["start"] > killed),
    }
    log(
        f"endpoint failover: {out['failures']} failed of {out['requests']}, gap {out['gap'] * 1e3:.0f} ms "
        f"(before the kill at most {out['gap_before'] * 1e3:.0f} ms), slot DOWN {out['down_after'] * 1e3:.1f} ms after the kill, "
        f"in-flight requests took {[round(x * 1e3) for x in out['in_flight_at_kill']]} ms"
    )
    return out


SUSTAINED_CLIENTS = int(
    __import__("os").environ.get("SUS_CLIENTS", "2")
)  # back to back, no pause: a few hundred requests/s against replicas with no generation time
ROLL_LOAD_DELAY = 2.0  # seconds a rolled replica's new process refuses connections while "loading"


def _down_reasons(log_text: str) -> dict[str, int]:
    """HAProxy's own words for each time a slot went DOWN (its log), counted: the evidence of why."""
    reasons: dict[str, int] = {}
    for line in log_text.splitlines():
        if " is DOWN" in line and line.startswith("Server "):
            why = line.split(" is DOWN", 1)[1].split(". ", 1)[0].strip(", ")
            why = why.split(" info:")[0].split(" check duration")[0].strip(" ,.()")
            reasons[why] = reasons.get(why, 0) + 1
    return reasons


def sustained(stack: Stack, seconds: float, log) -> dict:
    """2 replicas with no generation time, SUSTAINED_CLIENTS clients back to back for `seconds`, while
    the replicas are rolled one at a time again and again as nemotron_deploy.service.rollout does it
    where there is no room for one more (drain, wait for the request in flight, maintenance, the old
    process stopped as scancel would, a new one that refuses connections for ROLL_LOAD_DELAY s while
    it loads, the slot pointed at it once it generates, wait until HAProxy has it UP).
    Counts failed requests, and the time no slot was UP (sampled every 10 ms)."""
    stack.emulator("s1", 0.0)
    stack.emulator("s2", 0.0)
    stack.wait_emulators()
    stack.sync(r1="s1", r2="s2")
    serving = {"r1": "s1", "r2": "s2"}
    log_start = stack.haproxy_log.stat().st_size
    stop = threading.Event()
    rolls: list[float] = []
    no_replica: list[tuple[float, float]] = []  # (from, to) monotonic, while no slot was up

    def sample() -> None:
        since = None
        while not stop.is_set():
            up = any(v.status == "up" for k, v in stack.states().items() if k in SLOTS)
            now = time.monotonic()
            if not up and since is None:
                since = now
            elif up and since is not None:
                no_replica.append((since, now))
                since = None
            time.sleep(0.01)
        if since is not None:
            no_replica.append((since, time.monotonic()))

    def wait(what: str, predicate, timeout: float = STATUS_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sustained load: {what} not within {timeout:g}s")
            time.sleep(0.01)

    def in_flight(slot: str) -> int:
        lines = endpoint_sync.command(stack.socket, "show stat")
        return int(endpoint_sync.parse_stat(lines)[slot].get("scur") or 0)

    def roll(slot: str, n: int) -> None:
        t0 = time.monotonic()
        old = serving[slot]
        endpoint_sync.command(stack.socket, f"set server {endpoint_sync.BACKEND}/{slot} state drain")
        wait(f"{slot}'s request in flight", lambda: in_flight(slot) == 0)
        endpoint_sync.apply(stack.socket, {slot: (None, 0)})
        common.stop(stack.emulators[old][0])
        new = f"{slot}-{n}"
        stack.emulator(new, 0.0, load_delay=ROLL_LOAD_DELAY)
        common.wait_ready(stack.workdir / f"{new}.ready", stack.emulators[new][0])
        endpoint_sync.apply(stack.socket, {slot: (common.LOOPBACK, stack.emulators[new][1])})
        wait(f"{slot} UP on its new process", lambda: stack.states()[slot].status == "up")
        serving[slot] = new
        rolls.append(time.monotonic() - t0)

    def roller() -> None:
        n = 0
        while not stop.wait(0.5):
            n += 1
            for slot in SLOTS:
                if stop.is_set():
                    return
                roll(slot, n)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rolling = threading.Thread(target=roller, daemon=True)
    records, t0 = load(stack, SUSTAINED_CLIENTS, seconds, "sustained", at=(0.0, rolling.start))
    stop.set()
    rolling.join(STATUS_TIMEOUT * 2)
    sampler.join(5)
    failed = [r for r in records if r["error"] is not None]
    kinds: dict[str, int] = {}
    for r in failed:
        kinds[r["error"][:60]] = kinds.get(r["error"][:60], 0) + 1
    gaps = [b - a for a, b in no_replica]
    out = {
        "clients": SUSTAINED_CLIENTS,
        "seconds": seconds,
        "requests": len(records),
        "rps": len(records) / seconds,
        "failures": len(failed),
        "failed_503": sum(1 for r in failed if r["error"].startswith("HTTP 503")),
        "failure_kinds": kinds,
        "failed_span": (failed[-1]["end"] - failed[0]["start"]) if failed else 0.0,
        "rolls": len(rolls),
        "roll_seconds": common.Summary.of(rolls).as_dict(),
        "no_replica_up_seconds": sum(gaps),
        "no_replica_up_longest": max(gaps, default=0.0),
        "down_reasons": _down_reasons(stack.haproxy_log.read_text()[log_start:]),
    }
    log(
        f"endpoint sustained load: {out['failures']} failed of {out['requests']} ({out['rps']:.0f} req/s, "
        f"{out['failed_503']} HTTP 503) while {out['rolls']} replica(s) were rolled; no slot UP for "
        f"{out['no_replica_up_seconds'] * 1e3:.0f} ms in all (longest {out['no_replica_up_longest'] * 1e3:.0f} ms); "
        f"slots went DOWN: {out['down_reasons'] or 'never'}"
    )
    return out


def refused_once(stack: Stack, log) -> dict:
    """One refused connection on the replica that serves while the other slot is drained (a
    rollout's window): how long its slot was not UP, and how many of the requests sent meanwhile
    (one client, back to back, for a second after the refusal) failed. The refusal is made by
    pointing the slot at a closed port for the one try, then back."""
    import socket

    for fresh in ("o1", "o2"):  # the earlier parts killed or stopped theirs
        stack.emulator(fresh, GENERATION_SECONDS)
        common.wait_ready(stack.workdir / f"{fresh}.ready", stack.emulators[fresh][0])
    stack.sync(r1="o1", r2="o2")
    name = "o1"
    endpoint_sync.command(stack.socket, f"set server {endpoint_sync.BACKEND}/r2 state drain")
    closed = socket.socket()
    closed.bind((common.LOOPBACK, 0))  # bound, not listening: connections to it are refused
    records: list[tuple[int, bytes] | str] = []
    states: list[tuple[float, str]] = []
    try:
        target = f"{endpoint_sync.BACKEND}/r1"
        endpoint_sync.command(
            stack.socket, f"set server {target} addr {common.LOOPBACK} port {closed.getsockname()[1]}"
        )
        first = threading.Thread(
            target=lambda: records.append(put(stack.port, body("refused once"), **stack.client(0)))
        )
        first.start()
        deadline = time.monotonic() + STATUS_TIMEOUT
        while int(endpoint_sync.backend_stat(stack.socket)["r1"].get("hanafail") or 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("refused once: r1's connection was never refused")
            time.sleep(0.001)
        endpoint_sync.command(
            stack.socket, f"set server {target} addr {common.LOOPBACK} port {stack.emulators[name][1]}"
        )
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            try:
                status, data = put(stack.port, body("after the refusal"), **stack.client(1))
                records.append((status, data))
            except OSError as exc:
                records.append(f"{type(exc).__name__}: {exc}")
            states.append((time.monotonic() - t0, stack.states()["r1"].status))
        first.join(STATUS_TIMEOUT)
    finally:
        closed.close()
        endpoint_sync.command(stack.socket, f"set server {endpoint_sync.BACKEND}/r2 state ready")
    failed = [r for r in records if isinstance(r, str) or problem(*r) is not None]
    not_up = [t for t, st in states if st != "up"]
    out = {
        "requests": len(records),
        "failures": len(failed),
        "failed_503": sum(1 for r in failed if not isinstance(r, str) and r[0] == 503),
        "slot_not_up_seconds": (max(not_up) - min(not_up)) if not_up else 0.0,
        "slot_states": sorted({st for _, st in states}),
    }
    log(
        f"endpoint refused once: {out['failures']} failed of {out['requests']} requests "
        f"({out['failed_503']} HTTP 503); the serving slot was not UP for {out['slot_not_up_seconds'] * 1e3:.0f} ms"
    )
    return out


def run(seconds: float = 5.0, requests: int = 1000, clients: int = 8, *, log=print) -> dict:
    """All three measurements on one endpoint; `seconds` per throughput round (and the failover's
    length after the kill), `requests` latency samples per path."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as tmp:
        stack = Stack(Path(tmp), log)
        try:
            out: dict = {"config": stack.start()}
            stack.emulator("a", 0.0)
            stack.emulator("b1", GENERATION_SECONDS)
            stack.emulator("b2", GENERATION_SECONDS)
            stack.wait_emulators()
            for name in ("a", "b1", "b2"):
                stack.front(name)
            log(
                f"endpoint: HAProxy on 127.0.0.1:{stack.port} ({INVENTORY}, {REPLICAS} slots), 3 replica "
                "processes, each behind its front"
            )
            out["latency"] = latency(stack, requests, log)
            out["throughput"] = throughput(stack, clients, seconds, log)
            out["openai_throughput"] = throughput(stack, clients, seconds, log, openai=True)
            out["failover"] = failover(stack, seconds, log)
            out["sustained"] = sustained(stack, max(10.0, 4 * seconds), log)
            out["refused_once"] = refused_once(stack, log)
        except Exception:
            tail = stack.haproxy_log.read_text()[-1500:] if stack.haproxy_log.exists() else ""
            if tail:
                log(f"haproxy log tail:\n{tail}")
            raise
        finally:
            stack.stop()
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out
