"""Who gets through the endpoint, for real: the rendered haproxy.cfg + Lua envelope in Debian's HAProxy
(tests/live_endpoint.py: 127.0.0.1, free ports), NeMo stand-ins behind it, API keys made by
`nemotron-deploy api-key new`'s code, TLS made by the deploy's own key-pair script.

Every request that reaches a stand-in is recorded as it arrived there (method, raw path, headers,
body): "refused before any replica" is counted at the replica, not inferred from the answer. A second
loopback address (127.0.0.2) is the client source that endpoint_metrics_allow does not list. Nothing
here leaves 127.0.0.0/8. HAProxy and openssl must be installed (scripts/setup does): missing, these
tests fail, never skip.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO
from live_endpoint import HOST, Endpoint, Replica, ask, cluster_with, replica, running_endpoint, wait_for
from nemotron_rehearsal import emulator

from nemotron_deploy.service import probe

OTHER_SOURCE = "127.0.0.2"  # a loopback address, not in endpoint_metrics_allow's default


@pytest.fixture
def arrivals(monkeypatch) -> dict[int, list[tuple[str, str, dict[str, str], bytes]]]:
    """{stand-in port: [(method, raw path, headers, body)]}: every request a stand-in read, health
    checks included (their body holds HAProxy's "ping")."""
    seen: dict[int, list] = {}
    read = emulator._Handler._read_body

    def recording(handler) -> bytes:
        body = read(handler)
        port = handler.server.server_address[1]
        headers = {k.lower(): v for k, v in handler.headers.items()}
        seen.setdefault(port, []).append((handler.command, handler.path, headers, body))
        return body

    monkeypatch.setattr(emulator._Handler, "_read_body", recording)
    return seen


def client_requests(arrivals: dict, rep: Replica) -> list[tuple[str, str, dict[str, str], bytes]]:
    return [r for r in arrivals.get(rep.port, []) if b'"ping"' not in r[3]]


@pytest.fixture
def one(tmp_path, arrivals) -> Iterator[tuple[Endpoint, Replica]]:
    """API keys on (keys "client" and "health"), one stand-in UP behind the endpoint."""
    a = replica()
    try:
        with running_endpoint(cluster_with(tmp_path), 1, tmp_path / "ep") as ep:
            ep.sync(r1=(HOST, a.port))
            ep.wait_status("r1", "up")
            yield ep, a
    finally:
        a.handle.stop()


def _is_invalid_api_key(status: int, headers: dict[str, str], text: str) -> None:
    assert status == 401, text
    assert headers.get("www-authenticate") == "Bearer"
    assert headers.get("content-type") == "application/json"
    error = json.loads(text)["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "invalid_api_key",
    )
    assert "Authorization: Bearer" in error["message"]


def test_no_key_or_a_wrong_key_gets_401_and_reaches_no_replica(one, arrivals):
    """Without a key, with an unknown one, with the key's hash instead of the key, with the key in
    another scheme or header: 401 with the JSON error and WWW-Authenticate: Bearer; the stand-in
    sees none of them. With the key: it generates, and the key never reaches the replica."""
    ep, a = one
    key = ep.keys["client"]
    from nemotron_deploy import api_keys

    for label, headers, use_key in (
        ("none", {}, None),
        ("unknown", {"Authorization": "Bearer nmt-not-a-key"}, None),
        ("empty", {"Authorization": "Bearer "}, None),
        ("the hash", {"Authorization": f"Bearer {api_keys.digest(key)}"}, None),
        ("basic", {"Authorization": f"Basic {key}"}, None),
        ("other header", {"X-Api-Key": key}, None),
    ):
        status, got, text = ep.request(
            "PUT", "/generate", ask(f"stranger {label}"), key=use_key, headers=headers
        )
        _is_invalid_api_key(status, got, text)
    assert client_requests(arrivals, a) == []

    status, text = ep.put(ask("with a key"))
    assert status == 200, text
    assert json.loads(text)["sentences"][0].startswith("with a key")
    ((method, path, headers, _),) = client_requests(arrivals, a)
    assert (method, path) == ("PUT", "/generate")
    assert "authorization" not in headers, "the API key reached the replica"


# Bodies NeMo's server would read differently from the envelope, or that are not one JSON object:
# each must be refused (400, JSON) by the envelope, never forwarded.
PROMPT = {"sentences": ["bypass"] * 9, "tokens_to_generate": 1}  # 9 > inference_batch 8
TEXT = json.dumps(PROMPT)
BYPASS_BODIES = {
    "utf-8 bom": b"\xef\xbb\xbf" + TEXT.encode(),
    "utf-16 le bom": TEXT.encode("utf-16"),
    "utf-16 be": TEXT.encode("utf-16-be"),
    "utf-32": TEXT.encode("utf-32"),
    "trailing garbage": TEXT.encode() + b"x",
    "two objects": TEXT.encode() + b' {"sentences": ["b"]}',
    "array": json.dumps([PROMPT]).encode(),
    "empty": b"",
    "whitespace": b"  \n",
    "null": b"null",
    "string": b'"sentences"',
    "number": b"1",
    "invalid utf-8": b'{"sentences": ["\xff\xfe"], "tokens_to_generate": 1}',
    "no sentences": b'{"prompts": ["bypass"], "tokens_to_generate": 1}',
    "truncated": TEXT.encode()[:-1],
}


@pytest.mark.parametrize("label", sorted(BYPASS_BODIES))
def test_the_envelope_refuses_every_body_that_is_not_one_json_object(one, arrivals, label):
    ep, a = one
    status, headers, text = ep.request("PUT", "/generate", BYPASS_BODIES[label])
    assert status == 400, (label, status, text)
    assert headers.get("content-type") == "application/json"
    assert isinstance(json.loads(text), str)  # the envelope's answers are JSON strings, as NeMo's
    assert client_requests(arrivals, a) == [], f"{label}: reached the replica"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("put", "/generate", 405),  # methods are case-sensitive: not PUT
        ("Put", "/generate", 405),
        ("POST", "/generate", 405),
        ("GET", "/generate", 405),
        ("DELETE", "/generate", 405),
        ("PATCH", "/generate", 405),
        ("PUT", "/%67enerate", 404),
        ("PUT", "//generate", 404),
        ("PUT", "/generate/", 404),
        ("PUT", "/./generate", 404),
        ("PUT", "/x/../generate", 404),
        ("PUT", "/Generate", 404),
        ("PUT", "/generate%00", 404),
        ("PUT", "/generate;x", 404),
        ("PUT", "/", 404),
        ("PUT", "/metrics", 404),  # /metrics is GET only
        ("GET", "/stats", 404),
    ],
)
def test_only_put_on_the_exact_path_generate_reaches_a_replica(one, arrivals, method, path, status):
    """Other methods get 405 (Allow: PUT), other raw paths 404, both JSON; the stand-in sees none
    (the request would be valid for the envelope: one prompt)."""
    ep, a = one
    got, headers, text = ep.request(method, path, ask("sneaky"))
    assert got == status, (method, path, got, text)
    error = json.loads(text)["error"]
    assert error["code"] == {404: "not_found", 405: "method_not_allowed"}[status]
    if status == 405:
        assert headers.get("allow") == "PUT"
    assert client_requests(arrivals, a) == [], f"{method} {path} reached the replica"


def test_metrics_only_to_allowed_networks_or_a_key(one):
    """GET /metrics from 127.0.0.1 (endpoint_metrics_allow's default) answers without a key; from
    127.0.0.2 it needs a key (401 without, 200 with)."""
    ep, _ = one
    status, _, text = ep.request("GET", "/metrics", key=None)
    assert status == 200 and "haproxy_process_" in text
    status, headers, text = ep.request("GET", "/metrics", key=None, source=OTHER_SOURCE)
    _is_invalid_api_key(status, headers, text)
    status, _, text = ep.request("GET", "/metrics", key="health", source=OTHER_SOURCE)
    assert status == 200 and "haproxy_server_status" in text


def test_metrics_allow_narrows_to_what_it_lists(tmp_path):
    """endpoint_metrics_allow = [127.0.0.2/32]: 127.0.0.2 reads /metrics without a key, 127.0.0.1 does
    not."""
    inv = cluster_with(tmp_path, endpoint_metrics_allow=["127.0.0.2/32"])
    with running_endpoint(inv, 1, tmp_path / "ep") as ep:
        assert ep.request("GET", "/metrics", key=None, source=OTHER_SOURCE)[0] == 200
        assert ep.request("GET", "/metrics", key=None)[0] == 401


def _hold(ep: Endpoint, key: str, prompt: str, results: dict, seconds: float = 0.0) -> threading.Thread:
    """A request in flight (the stand-in answers it after `seconds` more) on its own thread."""
    body = ask(prompt) if not seconds else ask(prompt, tokens_to_generate=int(seconds / 0.01))
    thread = threading.Thread(target=lambda: results.setdefault(prompt, ep.put(body, key=key)))
    thread.start()
    return thread


def test_a_key_at_its_limit_gets_429_and_another_key_is_served(tmp_path, arrivals):
    """endpoint_max_inflight_per_key = 1, two replicas: while "client" has one request in flight (1 s),
    its second gets 429 with Retry-After and a JSON error at once, and "health"'s request is served by
    the other replica; once the first ends, "client" is served again."""
    slow, fast = replica(token_seconds=0.01), replica(token_seconds=0.01)
    try:
        inv = cluster_with(tmp_path, endpoint_max_inflight_per_key=1)
        with running_endpoint(inv, 2, tmp_path / "ep") as ep:
            ep.sync(r1=(HOST, slow.port), r2=(HOST, fast.port))
            ep.wait_status("r1", "up", timeout=20)
            ep.wait_status("r2", "up", timeout=20)
            results: dict[str, tuple[int, str]] = {}
            holder = _hold(ep, "client", "held", results, seconds=3.0)
            wait_for(
                lambda: any(
                    b'"held"' in r[3] for rep in (slow, fast) for r in client_requests(arrivals, rep)
                ),
                20,
                "the held request at a replica",
            )
            status, headers, text = ep.request("PUT", "/generate", ask("second"), key="client")
            assert status == 429, text
            assert "held" not in results, "the 429 waited for the first request instead of coming at once"
            assert headers.get("retry-after", "").isdigit()
            error = json.loads(text)["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
            assert "endpoint_max_inflight_per_key" in error["message"]
            status, text = ep.put(ask("other key"), key="health")
            assert status == 200, text
            holder.join(30)
            assert results["held"][0] == 200, results
            assert ep.put(ask("after"), key="client")[0] == 200
        prompts = [
            json.loads(r[3])["sentences"][0] for rep in (slow, fast) for r in client_requests(arrivals, rep)
        ]
        assert sorted(prompts) == ["after", "held", "other key"]
    finally:
        slow.handle.stop()
        fast.handle.stop()


def test_the_limit_counts_requests_in_flight_not_idle_keep_alive_connections(tmp_path):
    """endpoint_max_inflight_per_key = 1: a client that keeps two idle keep-alive connections open,
    after a request on each, is served on a third connection and again on the first; a request in
    flight is what counts."""
    a = replica(token_seconds=0.01)  # ask(): 4 tokens, 40 ms
    try:
        inv = cluster_with(tmp_path, endpoint_max_inflight_per_key=1)
        with running_endpoint(inv, 1, tmp_path / "ep") as ep:
            ep.sync(r1=(HOST, a.port))
            ep.wait_status("r1", "up", timeout=20)
            headers = {"Authorization": f"Bearer {ep.keys['client']}", "Content-Type": "application/json"}
            idle = [http.client.HTTPConnection(HOST, ep.port, timeout=30) for _ in range(2)]
            try:
                for n, conn in enumerate(idle):
                    conn.request("PUT", "/generate", json.dumps(ask(f"keep-alive {n}")), headers)
                    resp = conn.getresponse()
                    assert resp.status == 200 and not resp.will_close, resp.read()
                    resp.read()
                # both connections stay open and idle: a third is served
                assert ep.put(ask("third connection"))[0] == 200
                # and the first connection, reused, too
                idle[0].request("PUT", "/generate", json.dumps(ask("reused")), headers)
                resp = idle[0].getresponse()
                assert resp.status == 200, resp.read()
                resp.read()
                # back to back, never two at once: never refused (a request answered a moment ago
                # is still counted until HAProxy frees it; without the envelope's second look,
                # about 1 in 20 of these got 429 here)
                codes = [ep.put(ask(f"back to back {n}"))[0] for n in range(100)]
                assert codes == [200] * 100, f"{codes.count(429)} x 429"
                # whereas a request in flight does count
                results: dict[str, tuple[int, str]] = {}
                holder = _hold(ep, "client", "in flight", results, seconds=1.0)
                time.sleep(0.3)
                assert ep.put(ask("over the limit"))[0] == 429
                holder.join(30)
                assert results["in flight"][0] == 200
            finally:
                for conn in idle:
                    conn.close()
    finally:
        a.handle.stop()


def test_auth_none_opens_the_endpoint_and_says_so(tmp_path, arrivals):
    """endpoint_auth = none: no key needed; `plan` says the endpoint is open; /metrics from a source
    outside endpoint_metrics_allow gets 403."""
    a = replica()
    try:
        inv = cluster_with(tmp_path, endpoint_auth="none")
        with running_endpoint(inv, 1, tmp_path / "ep") as ep:
            ep.sync(r1=(HOST, a.port))
            ep.wait_status("r1", "up")
            assert ep.put(ask("open"), key=None)[0] == 200
            assert ep.request("GET", "/metrics", key=None, source=OTHER_SOURCE)[0] == 403
            assert ep.request("GET", "/metrics", key=None)[0] == 200
    finally:
        a.handle.stop()
    plan = subprocess.run(
        [sys.executable, "-m", "nemotron_deploy.cli", "plan", str(inv.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plan.returncode == 0, plan.stderr
    assert "OPEN to anyone who can reach it (endpoint_auth = none)" in plan.stdout


# --- TLS -------------------------------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path) -> Iterator[tuple[Endpoint, Replica]]:
    """endpoint_tls = self-signed (the deploy's own key-pair script, run here), keys on."""
    a = replica()
    try:
        with running_endpoint(cluster_with(tmp_path, endpoint_tls="self-signed"), 1, tmp_path / "ep") as ep:
            ep.sync(r1=(HOST, a.port))
            ep.wait_status("r1", "up")
            yield ep, a
    finally:
        a.handle.stop()


def test_self_signed_tls_is_served_and_verified_with_the_certificate(tls):
    """A client that verifies against the deployed certificate (curl --cacert, Python's ssl) is
    served; one that trusts only the system's CAs is refused by its own TLS check; plain HTTP on the
    port gets no answer from a replica. The key file is readable by its owner and group only."""
    ep, a = tls
    assert ep.ca_file is not None
    status, text = ep.put(ask("over tls"))
    assert status == 200, text
    key_file = Path(ep.ca_file + ".key")
    assert (
        oct(key_file.stat().st_mode & 0o777) == "0o640"
        and oct(Path(ep.ca_file).stat().st_mode & 0o777) == "0o644"
    )
    assert b"PRIVATE KEY" not in Path(ep.ca_file).read_bytes()
    # curl, with the key from a header file (never on its command line)
    header = Path(ep.ca_file).parent / "auth.header"
    header.write_text(f"Authorization: Bearer {ep.keys['client']}\n")
    header.chmod(0o600)
    curl = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--cacert", ep.ca_file, "-H", f"@{header}", "-X", "PUT",
         "-H", "Content-Type: application/json", "--data", json.dumps(ask("curl")), f"https://localhost:{ep.port}/generate"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert curl.returncode == 0, curl.stderr
    assert json.loads(curl.stdout)["sentences"][0].startswith("curl")
    untrusted = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-X", "PUT", f"https://{HOST}:{ep.port}/generate"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert untrusted.returncode == 60, untrusted.stderr  # curl: peer certificate cannot be authenticated
    plain = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT",
         f"http://{HOST}:{ep.port}/generate"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert plain.stdout in ("000", "400"), plain


def test_health_endpoint_over_tls_with_the_key_from_the_environment(tls, tmp_path):
    """`health --endpoint https://... --ca-file CERT` with NEMOTRON_API_KEY generates; without the
    certificate it says tls_error; without the key, unauthorized; --api-key-file works too."""
    ep, a = tls
    base = [sys.executable, "-m", "nemotron_deploy.service.health", "--endpoint", ep.url, "--no-state-file"]
    env = {**os.environ, probe.API_KEY_ENV: ep.keys["health"], "NO_PROXY": "*"}

    def health(*extra: str, environ: dict[str, str] = env) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60, env=environ)

    ok = health("--ca-file", ep.ca_file)
    assert ok.returncode == 0 and ok.stdout.startswith("NEMOTRON OK - generated 1 token"), (
        ok.stdout + ok.stderr
    )
    assert ep.keys["health"] not in ok.stdout + ok.stderr
    untrusted = health()
    assert untrusted.returncode == 2 and "tls_error" in untrusted.stdout and "--ca-file" in untrusted.stdout
    keyless = {k: v for k, v in env.items() if k != probe.API_KEY_ENV}
    refused = health("--ca-file", ep.ca_file, environ=keyless)
    assert (
        refused.returncode == 2 and "unauthorized" in refused.stdout and probe.API_KEY_ENV in refused.stdout
    )
    key_file = tmp_path / "health.key"
    key_file.write_text(ep.keys["health"] + "\n")
    key_file.chmod(0o600)
    from_file = health("--ca-file", ep.ca_file, "--api-key-file", str(key_file), environ=keyless)
    assert from_file.returncode == 0, from_file.stdout + from_file.stderr
    from_stdin = subprocess.run(
        [*base, "--ca-file", ep.ca_file, "--api-key-file", "-"],
        input=ep.keys["health"] + "\n", capture_output=True, text=True, timeout=60, env=keyless,
    )  # fmt: skip
    assert from_stdin.returncode == 0, from_stdin.stdout + from_stdin.stderr


def test_the_deployed_call_server_calls_the_endpoint_with_the_key_from_the_environment(tls, tmp_path):
    """The call_server.py the deploy installs, through the endpoint: --tls --ca-file and the key in
    NEMOTRON_API_KEY; without the key it exits 3 saying what to set."""
    ep, _ = tls
    out = tmp_path / "job-files"
    rendered = subprocess.run(
        [sys.executable, "-m", "nemotron_deploy.cli", "render", str(REPO / "inventories" / "h100.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    argv = [sys.executable, str(out / "call_server.py"), "--host", HOST, "--port", str(ep.port), "--tls",
            "--ca-file", ep.ca_file, "--tokens", "4", "--prompt", "through the endpoint"]  # fmt: skip
    env = {**os.environ, probe.API_KEY_ENV: ep.keys["client"], "NO_PROXY": "*"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("through the endpoint\n")
    env.pop(probe.API_KEY_ENV)
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 3 and "HTTP 401" in refused.stderr and "NEMOTRON_API_KEY" in refused.stderr
