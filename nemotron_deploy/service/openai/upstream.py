"""The one ``PUT /generate`` a request makes, to HAProxy's internal listener (which keeps one request
per replica and its queue). Never retried here: a retry could run the generation twice."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from typing import Any

from .errors import ApiError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def connection(address: str, timeout: float) -> http.client.HTTPConnection:
    """`address` is ``unix:/path`` or ``host:port``."""
    if address.startswith("unix:"):
        return _UnixConnection(address[5:], timeout)
    host, _, port = address.rpartition(":")
    return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)


def _message(text: str) -> str:
    """HAProxy's and NeMo's error bodies are JSON strings (or OpenAI-shaped objects)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("error"), dict):
        return str(value["error"].get("message"))
    if isinstance(value, dict) and "message" in value:
        return str(value["message"])
    return text.strip()[:500]


# One kept-alive connection to HAProxy's internal listener per gateway thread (a thread serves one
# HAProxy connection, which HAProxy reuses): no connect and accept per request. Reused only while
# recently used and not closed by HAProxy (readable when idle = its end closed it, e.g. a reload),
# checked before sending: a request is never sent on a connection that might drop it, so there is
# never a reason to send it twice.
IDLE_REUSE_SECONDS = 5.0  # well under HAProxy's timeout http-keep-alive (60 s)
_local = threading.local()


def _dropped(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _connection(address: str, timeout: float) -> http.client.HTTPConnection:
    conn = getattr(_local, "conn", None)
    if conn is not None:
        fresh = time.monotonic() - _local.used < IDLE_REUSE_SECONDS and _local.address == address
        if fresh and conn.sock is not None and not _dropped(conn.sock):
            conn.sock.settimeout(timeout)
            return conn
        conn.close()
    conn = connection(address, timeout)
    _local.conn, _local.address, _local.used = conn, address, time.monotonic()
    return conn


def _forget(conn: http.client.HTTPConnection) -> None:
    conn.close()
    if getattr(_local, "conn", None) is conn:
        _local.conn = None


def _put(conn: http.client.HTTPConnection, data: bytes) -> http.client.HTTPResponse:
    """PUT /generate in one write (http.client sends the headers and the body apart: two wake-ups of
    HAProxy, which waits for the whole body), read back as http.client reads any response."""
    if conn.sock is None:
        conn.connect()
    head = (
        "PUT /generate HTTP/1.1\r\nHost: nemotron-gateway\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    conn.sock.sendall(head.encode() + data)
    resp = http.client.HTTPResponse(conn.sock, method="PUT")
    resp.begin()
    return resp


def generate(address: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """NeMo's answer (a JSON object with sentences), or ApiError in OpenAI's terms. Sent once."""
    data = json.dumps(body).encode()
    conn = _connection(address, timeout)
    try:
        resp = _put(conn, data)
        text = resp.read().decode("utf-8", errors="replace")
    except TimeoutError:
        _forget(conn)
        raise ApiError(
            504, f"No answer from the replicas within {timeout:g} s", code="upstream_timeout"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        _forget(conn)
        raise ApiError(
            503,
            f"The endpoint's internal listener is not reachable ({getattr(exc, 'strerror', None) or exc})",
            code="upstream_unavailable",
        ) from None
    if resp.will_close:
        _forget(conn)
    else:
        _local.used = time.monotonic()
    if resp.status == 200:
        try:
            answer = json.loads(text)
        except ValueError:
            raise ApiError(502, "The replica's answer was not JSON", code="bad_upstream_answer") from None
        if isinstance(answer, dict) and "sentences" in answer:
            return answer
        # NeMo's way of refusing a request: HTTP 200 with a JSON string.
        raise ApiError(400, f"The model server refused the request: {_message(text)}", code="invalid_request")
    if resp.status in (400, 413):
        raise ApiError(resp.status, _message(text), code="invalid_request")
    if resp.status == 503:
        raise ApiError(503, _message(text), code="replicas_unavailable")
    if resp.status == 504:
        raise ApiError(504, _message(text), code="upstream_timeout")
    raise ApiError(
        502, f"The replica failed this request (HTTP {resp.status}): {_message(text)}", code="upstream_error"
    )
