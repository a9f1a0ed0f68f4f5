"""The live endpoint for tests: the rendered haproxy.cfg + Lua envelope in Debian's HAProxy (`haproxy -db`
on 127.0.0.1 free ports, a temporary stats socket) and NeMo stand-ins (emulator.serve_in_thread) on
loopback. Used by tests/local/test_endpoint_live.py and test_fleet.py; see test_endpoint_live.py's docstring."""

from __future__ import annotations

import grp
import http.client
import json
import os
import pwd
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import haproxy, write_inventory
from nemotron_rehearsal import emulator
from nemotron_rehearsal.emulator import serve_in_thread

from nemotron_deploy import api_keys
from nemotron_deploy.deploy import endpoint
from nemotron_deploy.service import endpoint_sync

HOST = "127.0.0.1"
PING = "ping"  # the health check's prompt (haproxy.cfg.j2)
REPLICA_KEY = "ab" * 32  # the replica key HAProxy sends to every replica (its map, written beside the config)


def make_self_signed(directory: Path) -> Path:
    """The deploy's own key-pair script (endpoint.self_signed_script), run here as this user: the
    certificate for localhost / 127.0.0.1 in `directory`, its key beside it. Returns the certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / endpoint.TLS_CERT_FILE, directory / endpoint.TLS_KEY_FILE
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    script = endpoint.self_signed_script(
        str(cert), str(key), names=["localhost"], addresses=[HOST], user=user, group=group, days=2
    )
    made = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return cert


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def put(port: int, body: dict | bytes, timeout: float = 30.0, *, key: str | None = None) -> tuple[int, str]:
    """PUT /generate over plain HTTP (an endpoint with endpoint_tls = none, or a replica)."""
    status, _, text = request(port, "PUT", "/generate", body, key=key, timeout=timeout)
    return status, text


def request(
    port: int,
    method: str,
    path: str,
    body: dict | bytes | None = None,
    *,
    key: str | None = None,
    ca_file: str | None = None,
    source: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], str]:
    """One request as sent (method and path verbatim), from `source` (a loopback address) if given,
    over TLS verified against `ca_file` if given: (status, headers, body)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    source_address = (source, 0) if source else None
    if ca_file:
        context = ssl.create_default_context(cafile=ca_file)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            HOST, port, timeout=timeout, context=context, source_address=source_address
        )
    else:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout, source_address=source_address)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, data, sent)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode(errors="replace")
    finally:
        conn.close()


def ask(prompt: str, **params) -> dict:
    return {"sentences": [prompt], "tokens_to_generate": 4, "greedy": True, **params}


@dataclass
class Replica:
    """An emulator whose generations are recorded (the prompts it saw), health checks apart."""

    handle: emulator.EmulatorHandle
    prompts: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.handle.port

    @property
    def requests(self) -> list[str]:
        return [p for p in self.prompts if p != PING]


def replica(**faults) -> Replica:
    handle = serve_in_thread(**faults)
    assert handle.wait_ready(10)
    rep = Replica(handle)
    generate = handle.state.generate

    def recording(sentences, params):
        if isinstance(sentences, list):
            rep.prompts.extend(s for s in sentences if isinstance(s, str))
        return generate(sentences, params)

    handle.state.generate = recording
    return rep


@dataclass
class Endpoint:
    proc: subprocess.Popen
    port: int
    socket: str
    log: Path
    keys: dict[str, str] = field(default_factory=dict)  # name -> key (cluster_with makes them)
    ca_file: str | None = None  # the self-signed certificate, with endpoint_tls = self-signed
    tokenizer: str | None = None  # the replicas' tokenizer file, with openai=True
    openai_config: Path | None = None  # the fronts' translation config, with openai=True

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://{HOST}:{self.port}"

    def put(
        self, body: dict | bytes, timeout: float = 30.0, *, key: str | None = "client"
    ) -> tuple[int, str]:
        """PUT /generate with the key named `key` (None: no key)."""
        status, _, text = self.request("PUT", "/generate", body, key=key, timeout=timeout)
        return status, text

    def request(self, method: str, path: str, body=None, *, key: str | None = "client", **kwargs):
        """`request` to this endpoint, with the key named `key` (None: no key), over its TLS."""
        secret = self.keys[key] if key is not None else None
        return request(self.port, method, path, body, key=secret, ca_file=self.ca_file, **kwargs)

    def sync(self, **slots: tuple[str | None, int]) -> list[str]:
        return endpoint_sync.apply(self.socket, slots)

    def state(self) -> dict[str, endpoint_sync.ServerState]:
        return endpoint_sync.servers_state(self.socket)

    @contextmanager
    def front(self, rep: Replica) -> Iterator[int]:
        """`rep` behind its replica front as the job runs it (python -m ...replica_front, with the
        replica key and, with openai=True, the translation config), on a free port of 127.0.0.1:
        the port to point a slot at."""
        key_file = self.log.parent / "replica.key"
        key_file.write_text(REPLICA_KEY + "\n")
        port = free_port()
        argv = [sys.executable, "-m", "nemotron_deploy.service.replica_front", "--listen", HOST,
                "--port", str(port), "--upstream-port", str(rep.port), "--key-file", str(key_file)]  # fmt: skip
        if self.openai_config is not None:
            argv += ["--openai", str(self.openai_config)]
        log = self.log.parent / f"front-{port}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _listening(port) or proc.poll() is not None, 15, "the replica front")
            assert proc.poll() is None, f"the replica front exited {proc.returncode}:\n{log.read_text()}"
            yield port
        finally:
            _stop(proc)

    def wait_status(self, slot: str, status: str, timeout: float = 15.0) -> None:
        wait_for(
            lambda: self.state()[slot].status == status, timeout, f"{slot} {status}\n{self.log.read_text()}"
        )


@dataclass(frozen=True)
class Inventory:
    path: Path
    endpoint_port: int
    keys: dict[str, str] = field(default_factory=dict)
    tls: bool = False


def _as_this_user() -> list[str]:
    """HAProxy runs as whoever runs the tests: root (scripts/test) or not (the local tier alone)."""
    if os.geteuid() == 0:
        return []  # the rendered default: user and group haproxy, as the deploy installs it
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    return ["--run-as", f"{user}:{group}"]


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), 0.5).close()
        return True
    except OSError:
        return False


def train_tokenizer(path: Path) -> Path:
    """The sandbox's stand-in for the checkpoint's SentencePiece file (nemotron_rehearsal.tokenizer)."""
    from nemotron_rehearsal import tokenizer

    return tokenizer.train(path)


def _stop(proc: subprocess.Popen) -> None:
    """End a server the harness started: TERM, then KILL if it is still there after 5 s."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextmanager
def running_endpoint(
    inv: Inventory, replicas: int, directory: Path, *, openai: bool = False
) -> Iterator[Endpoint]:
    """The rendered endpoint in HAProxy; `openai`: also the fronts' translation config (with the
    sandbox's stand-in tokenizer), for replicas behind `Endpoint.front`."""
    sock = directory / "admin.sock"
    rendered = subprocess.run(
        [sys.executable, "-m", "nemotron_deploy.cli", "render", "--endpoint", str(inv.path), "--out", str(directory),
         "--replicas", str(replicas), "--config-dir", str(directory), "--stats-socket", str(sock),
         "--bind", HOST, *_as_this_user()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    # The replica key's map, which the deploy makes on the login node (never rendered).
    (directory / endpoint.REPLICA_KEY_MAP_FILE).write_text(endpoint.replica_key_map(REPLICA_KEY))
    with _haproxy(inv, directory, sock) as ep:
        if openai:
            ep.tokenizer = str(train_tokenizer(directory / "tokenizer.model"))
            ep.openai_config = _openai_config(inv, directory, ep.tokenizer)
        yield ep


def _openai_config(inv: Inventory, directory: Path, tokenizer: str) -> Path:
    """The job's translation config as `nemotron-deploy render` writes it (in a process of its own:
    pyinfra, which the inventory's loading imports, patches threads), with the stand-in tokenizer."""
    jobs = directory / "job-files"
    rendered = subprocess.run(
        [sys.executable, "-m", "nemotron_deploy.cli", "render", str(inv.path), "--out", str(jobs)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    config = jobs / "nemotron_openai.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer": tokenizer}))
    return config


@contextmanager
def _haproxy(inv: Inventory, directory: Path, sock: Path) -> Iterator[Endpoint]:
    ca_file = str(make_self_signed(directory)) if inv.tls else None
    cfg = directory / endpoint.CONFIG_FILE
    log = directory / "haproxy.log"
    with log.open("w") as out:
        proc = subprocess.Popen([haproxy(), "-f", str(cfg), "-db"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 10, "HAProxy's stats socket")
        assert proc.poll() is None, f"haproxy exited {proc.returncode}:\n{log.read_text()}"
        yield Endpoint(proc, inv.endpoint_port, str(sock), log, dict(inv.keys), ca_file)
    finally:
        _stop(proc)


def cluster_with(tmp_path: Path, base: str = "h100", hosts: str | None = None, **settings) -> Inventory:
    """An inventory beside the shipped one, checking replicas every second, on a free port. Unless
    the settings say otherwise: API keys on, with two keys made by `nemotron-deploy api-key new`'s
    code ("client" for the tests' requests, "health" for the check's), and no TLS (the TLS tests ask
    for endpoint_tls = self-signed)."""
    settings = {"endpoint_check_seconds": 1, "max_generation_seconds": 10, "endpoint_tls": "none", **settings}
    settings.setdefault("endpoint_port", free_port())
    keys: dict[str, str] = {}
    if settings.get("endpoint_auth", "api-key") == "api-key" and "endpoint_api_keys_file" not in settings:
        keys_file = tmp_path / "inv-api-keys"
        keys_file.unlink(missing_ok=True)
        keys = {name: api_keys.add(keys_file, name) for name in ("client", "health")}
        settings["endpoint_api_keys_file"] = str(keys_file)
    path = write_inventory(tmp_path / "inv", base, hosts=hosts, settings=settings)
    return Inventory(path, settings["endpoint_port"], keys, settings["endpoint_tls"] != "none")
