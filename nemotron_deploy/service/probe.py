"""The probe: one tiny generation (``PUT /generate``, one greedy token) and what its answer means.

Why a real generation: NeMo's server has no health endpoint, answers 404 on ``/`` and 200 with a
JSON *string* for a bad request, so a TCP connect or "any HTTP reply" proves nothing. The probe is
healthy only on 200 with a JSON object whose ``sentences`` is a list of exactly one string; every
other outcome has a short machine-friendly reason code (outcome.REASONS). With ``--endpoint`` the
endpoint's own answers (HAProxy's 503s, its envelope's 400/413) are read too (:func:`classify_endpoint`).

Runs on the cluster (login nodes, and inside the job's container): standard library only.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time

TYPE_CHECKING = False  # typing costs ~4 ms of import time on every run; annotations are strings
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PORT = 1424  # the model card's port (NeMo's own default is 5555)
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_TIMEOUT = 15.0  # SkyPilot's readiness timeout; a 1 s timeout flaps behind the generation lock
DEFAULT_PROMPT = "The capital of France is"
MAX_BODY = 1 << 20
# The endpoint's API key comes from this environment variable (never from an argument: argv is
# world-readable in /proc), or from a file named with --api-key-file.
API_KEY_ENV = "NEMOTRON_API_KEY"
# A replica's port is its front (replica_front.py): it forwards to NeMo only requests with this header.
REPLICA_KEY_HEADER = "X-Nemotron-Replica-Key"


class Access:
    """How to reach the endpoint: TLS (verified against ``ca_file``, or the system's CAs) and the API
    key sent as ``Authorization: Bearer``. Replicas are plain HTTP with the replica key (their front
    refuses a request without it): ``Access(replica_key=...)``, by default :func:`replica_access`."""

    __slots__ = ("tls", "ca_file", "api_key", "replica_key")

    def __init__(
        self,
        tls: bool = False,
        ca_file: str | None = None,
        api_key: str | None = None,
        replica_key: str | None = None,
    ) -> None:
        self.tls = tls
        self.ca_file = ca_file
        self.api_key = api_key
        self.replica_key = replica_key

    def __repr__(self) -> str:  # never a key
        return (
            f"Access(tls={self.tls}, ca_file={self.ca_file!r}, api_key={'set' if self.api_key else None}, "
            f"replica_key={'set' if self.replica_key else None})"
        )


# Every replica probe of one process sends the same key: the commands (health, rollout) load it once
# from --replica-key-file, and every probe that names no access of its own sends it.
_replica_key: str | None = None


def use_replica_key_file(path: str | None) -> None:
    """Send the replica key in ``path`` (its first line) with every replica probe; None: send none.
    Raises OSError (unreadable) or ValueError (empty)."""
    global _replica_key
    if path is None:
        _replica_key = None
        return
    with open(path, encoding="utf-8") as f:
        key = f.readline().strip()
    if not key:
        raise ValueError(f"{path} holds no key")
    _replica_key = key


def replica_access() -> Access:
    return Access(replica_key=_replica_key)


def api_key_from(env: dict[str, str] | None = None, key_file: str | None = None) -> str | None:
    """The API key: from ``key_file`` (its first line; "-": standard input) if given, else
    $NEMOTRON_API_KEY; None if neither."""
    if key_file == "-":
        import sys

        return sys.stdin.readline().strip() or None
    if key_file:
        with open(key_file, encoding="utf-8") as f:
            return f.readline().strip() or None
    return (os.environ if env is None else env).get(API_KEY_ENV, "").strip() or None


class ProbeResult:
    """One probe's outcome: ``reason`` is a key of outcome.REASONS."""

    __slots__ = ("reason", "message", "duration", "http_status", "detail", "url")

    def __init__(
        self,
        reason: str,
        message: str,
        duration: float,
        url: str,
        http_status: int | None = None,
        detail: str | None = None,
    ) -> None:
        self.reason = reason
        self.message = message
        self.duration = duration
        self.url = url
        self.http_status = http_status
        self.detail = detail

    @property
    def ok(self) -> bool:
        return self.reason == "ok"

    def __repr__(self) -> str:
        return f"ProbeResult({self.reason!r}, {self.message!r}, {self.duration:.3f}s)"


def probe_payload(prompt: str = DEFAULT_PROMPT) -> dict[str, Any]:
    """The cheapest request NeMo will still run through the model: one sentence, one greedy token.

    Only keys that every NeMo since 1.22 accepts (``random_seed`` is 1.23+ and would be logged as an
    error by older servers); ``all_probs`` stays false because it is broken with PP > 1.
    """
    return {
        "sentences": [prompt],
        "tokens_to_generate": 1,
        "temperature": 1.0,
        "add_BOS": False,
        "top_k": 0,
        "top_p": 0.9,
        "greedy": True,
        "all_probs": False,
        "repetition_penalty": 1.0,
        "min_tokens_to_generate": 0,
        "end_strings": ["<|endoftext|>"],
    }


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:  # flask-restful errors are {"message": ...}; NeMo's rejections are JSON strings
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("message"), str):
            text = obj["message"]
        elif isinstance(obj, str):
            text = obj
    except ValueError:
        text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify_response(status: int, raw: bytes, duration: float, url: str) -> ProbeResult:
    """Turn an HTTP reply to the probe into a :class:`ProbeResult` (pure, for tests and reuse)."""
    if status in (404, 405, 501) or status < 200 or 200 < status < 400:
        return ProbeResult(
            "not_nemo",
            f"HTTP {status} on PUT /generate: this port is not served by NeMo's text-generation server "
            "(check host and port, or whether another program took the port)",
            duration,
            url,
            status,
            _snippet(raw),
        )
    if status >= 400:
        detail = _snippet(raw)
        return ProbeResult(
            "http_error", f"HTTP {status} on PUT /generate: {detail}", duration, url, status, detail
        )
    try:
        obj = json.loads(raw)
    except ValueError:
        return ProbeResult(
            "invalid_json", f"HTTP 200 but the body is not JSON: {_snippet(raw, 80)!r}", duration, url, status
        )
    if isinstance(obj, str):
        return ProbeResult(
            "rejected", f"NeMo rejected the probe request: {obj}", duration, url, status, _snippet(raw)
        )
    sentences = obj.get("sentences") if isinstance(obj, dict) else None
    if not (isinstance(sentences, list) and len(sentences) == 1 and isinstance(sentences[0], str)):
        shape = type(obj).__name__ if not isinstance(obj, dict) else f"keys {sorted(obj)[:8]}"
        return ProbeResult(
            "bad_shape",
            f"HTTP 200 but not NeMo's answer (expected 'sentences' with one string, got {shape})",
            duration,
            url,
            status,
        )
    return ProbeResult("ok", f"generated 1 token in {duration:.3f}s", duration, url, status)


# What the endpoint answers itself (nemotron_deploy/deploy/templates/haproxy.cfg.j2): after `timeout queue`, and
# when no slot of the backend is UP. tests/local/test_fleet.py checks the template still says so.
ENDPOINT_BUSY_TEXT = "replicas are busy"
ENDPOINT_NO_REPLICA_TEXT = "No replica is up"


def classify_endpoint(result: ProbeResult) -> ProbeResult:
    """Read the endpoint's own answers in a probe's result (--endpoint): its 503s and its envelope."""
    detail = result.detail or ""
    if result.http_status == 503 and ENDPOINT_BUSY_TEXT in detail:
        result.reason = "busy"
        result.message = (
            f"the endpoint answered 503: every replica stayed busy for its queue timeout: {detail}"
        )
    elif result.http_status == 503 and ENDPOINT_NO_REPLICA_TEXT in detail:
        result.reason = "no_replica"
        result.message = (
            "no replica is in rotation: the endpoint answered 503 (every slot is in maintenance or failed "
            "its health check; see nemotron-deploy health --replicas N): " + detail
        )
    elif result.http_status == 401:
        result.reason = "unauthorized"
        result.message = (
            f"the endpoint refused the probe's API key (HTTP 401): set {API_KEY_ENV} (or --api-key-file) "
            f"to a key whose hash is in endpoint_api_keys_file: {detail}"
        )
    elif result.http_status == 429:
        result.reason = "busy"
        result.message = (
            f"the endpoint answered 429: this API key has its limit of requests in flight: {detail}"
        )
    elif result.http_status in (400, 413):
        result.reason = "envelope_refused"
        result.message = f"the endpoint refused the probe with HTTP {result.http_status}: {detail}"
    elif result.reason == "busy":
        result.message += " (through the endpoint: the replicas are all busy, or HAProxy's queue is full)"
    return result


def probe(
    host: str,
    port: int,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    timeout: float = DEFAULT_TIMEOUT,
    payload: dict[str, Any] | None = None,
    access: Access | None = None,
) -> ProbeResult:
    """PUT one tiny generation to ``http://host:port/generate`` and classify what happens.

    The connect timeout is short (a host that does not answer SYNs is down); the read timeout is
    long, because the generation lock makes a healthy server answer late behind real traffic.
    """
    access = access or replica_access()
    url = f"{'https' if access.tls else 'http'}://{host_for_url(host)}:{port}/generate"
    body = json.dumps(payload if payload is not None else probe_payload()).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if access.api_key:
        headers["Authorization"] = f"Bearer {access.api_key}"
    if access.replica_key:
        headers[REPLICA_KEY_HEADER] = access.replica_key
    start = time.monotonic()

    def done(reason: str, message: str) -> ProbeResult:
        return ProbeResult(reason, message, time.monotonic() - start, url)

    if access.tls:
        import ssl

        try:
            context = ssl.create_default_context(cafile=access.ca_file)
        except (OSError, ssl.SSLError) as exc:
            return done("tls_error", f"cannot read the CA file {access.ca_file}: {exc}")
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=connect_timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=connect_timeout)
    try:
        try:
            conn.connect()
        except socket.gaierror as exc:
            return done("unresolvable", f"cannot resolve host {host!r}: {exc.strerror or exc}")
        except ConnectionRefusedError:
            return done("refused", f"connection refused by {host}:{port} (server not listening yet, or down)")
        except TimeoutError:
            return done("connect_timeout", f"no TCP answer from {host}:{port} within {connect_timeout:g}s")
        except OSError as exc:
            if access.tls and type(exc).__module__ == "ssl":  # ssl.SSLError and its kinds
                return done(
                    "tls_error",
                    f"TLS with {host}:{port} failed: {exc}; pass the endpoint's certificate with --ca-file "
                    "(/etc/haproxy/nemotron-endpoint.crt on the login node) or check the host name",
                )
            return done("unreachable", f"cannot connect to {host}:{port}: {exc.strerror or exc}")
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        try:
            conn.request(
                "PUT",
                "/generate",
                body=body,
                headers=headers,
            )
            resp = conn.getresponse()
            raw = resp.read(MAX_BODY)
        except TimeoutError:
            return done(
                "busy",
                f"connected to {host}:{port} but no reply within {timeout:g}s "
                "(generation lock held by a long request, or the ranks are wedged)",
            )
        except (http.client.BadStatusLine, http.client.LineTooLong) as exc:
            if isinstance(exc, http.client.RemoteDisconnected):
                return done("disconnected", f"{host}:{port} closed the connection without a reply")
            return done("not_nemo", f"{host}:{port} does not speak HTTP ({type(exc).__name__})")
        except (http.client.HTTPException, OSError) as exc:
            return done("disconnected", f"connection to {host}:{port} broke: {type(exc).__name__}: {exc}")
        result = classify_response(resp.status, raw, time.monotonic() - start, url)
        if resp.status in (401, 403) and resp.getheader("Server", "").startswith("nemotron-replica-front"):
            result.reason = "unauthorized"
            result.message = (
                f"the replica's front on {host}:{port} refused the probe (HTTP {resp.status}: "
                f"{result.detail}): give the check the replica key with --replica-key-file (the deploy "
                "keeps it in /var/lib/nemotron-deploy/replica.key on the login node)"
            )
        return result
    finally:
        conn.close()


def host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
