"""The one ``PUT /generate`` a request makes, to HAProxy's internal listener (which keeps one request
per replica and its queue). Never retried here: a retry could run the generation twice."""

from __future__ import annotations

import http.client
import json
import socket
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


def generate(address: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """NeMo's answer (a JSON object with sentences), or ApiError in OpenAI's terms."""
    data = json.dumps(body).encode()
    conn = connection(address, timeout)
    try:
        try:
            conn.request(
                "PUT", "/generate", data, {"Content-Type": "application/json", "Host": "nemotron-gateway"}
            )
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", errors="replace")
        except TimeoutError:
            raise ApiError(
                504, f"No answer from the replicas within {timeout:g} s", code="upstream_timeout"
            ) from None
        except OSError as exc:
            raise ApiError(
                503,
                f"The endpoint's internal listener is not reachable ({exc.strerror or exc})",
                code="upstream_unavailable",
            ) from None
    finally:
        conn.close()
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
