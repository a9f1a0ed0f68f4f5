"""The OpenAI gateway's HTTP server: ``python -m nemotron_deploy.service.openai.gateway --config FILE``.

Listens on a Unix socket (or host:port for tests and benchmarks) that only HAProxy can reach: the
deploy puts it in a directory of the gateway's user with group haproxy, so no other account on the
login node can skip the endpoint's API keys. Routes: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /health`` (HAProxy's check: the tokenizer is loaded), ``GET
/metrics`` (counters per API key name and route). HAProxy passes the key's name in ``X-Nemotron-Key``
(it drops any a client sends).

The config (JSON, rendered by the deploy, see ``deploy/openai_gateway.py``)::

    {"model": "nemotron-4-340b-instruct", "context_length": 4096, "tokenizer": "/models/.../x.model",
     "max_prompts": 8, "logprobs_allowed": true, "chat_template": {...} or null, "chat_stop": [...],
     "listen": "unix:/var/lib/nemotron-gateway/run/gateway.sock", "upstream": "unix:/run/haproxy/...",
     "timeout_seconds": 930}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .. import metrics
from . import protocol, shaping, upstream
from .errors import ApiError
from .tokenizer import Tokenizer

KEY_HEADER = "X-Nemotron-Key"
MAX_BODY = 64 * 1024 * 1024  # HAProxy's tune.bufsize bounds it first
ROUTES = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat.completions",
    "/v1/models": "models",
}


class Counters:
    """The gateway's metrics (declared in service/metrics.py), in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[Any, Counter] = {m: Counter() for m in metrics.OPENAI_GATEWAY}

    def add(self, metric: metrics.Metric, labels: tuple[str, ...], value: int = 1) -> None:
        with self._lock:
            self._values[metric][labels] += value

    def exposition(self) -> str:
        out = []
        with self._lock:
            for m, values in self._values.items():
                out += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}"]
                for labels, value in sorted(values.items()):
                    pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(m.labels, labels, strict=True))
                    out.append(f"{m.name}{{{pairs}}} {value}")
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Gateway:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.limits = protocol.Limits(
            model=config["model"],
            context_length=int(config["context_length"]),
            max_prompts=int(config["max_prompts"]),
            logprobs_allowed=bool(config["logprobs_allowed"]),
            chat_template=config.get("chat_template"),
            chat_stop=tuple(config.get("chat_stop") or ()),
        )
        self.tokenizer = Tokenizer(config["tokenizer"])
        self.upstream = config["upstream"]
        self.timeout = float(config.get("timeout_seconds", 900))
        self.counters = Counters()
        self.started = int(time.time())

    def models(self) -> dict[str, Any]:
        entry = {
            "id": self.limits.model,
            "object": "model",
            "created": self.started,
            "owned_by": "nvidia",
            "max_model_len": self.limits.context_length,
        }
        return {"object": "list", "data": [entry]}

    def generate(self, route: str, data: Any, key: str) -> tuple[dict[str, Any], bool]:
        """(the response body, stream?) or ApiError."""
        build = protocol.chat if route == "chat.completions" else protocol.completion
        job = build(data, self.limits, self.tokenizer)
        answer = upstream.generate(self.upstream, job.body, self.timeout)
        body, usage = shaping.response(job, self.limits.model, answer, self.tokenizer)
        self.counters.add(metrics.OPENAI_PROMPT_TOKENS, (key, route), usage["prompt_tokens"])
        self.counters.add(metrics.OPENAI_COMPLETION_TOKENS, (key, route), usage["completion_tokens"])
        return body, job.stream


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffered: the status line, headers and body leave in one write when the handler returns
    # (handle_one_request flushes), so HAProxy is woken once per answer, not once per part.
    wbufsize = 64 * 1024
    server_version = "nemotron-gateway"
    sys_version = ""
    gateway: Gateway  # set on the server class

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # HAProxy logs every request; prompts never go to a log here

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if content_type == "text/event-stream":
            self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode() + b"\n")

    def _chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline(1024)
            if len(out) > MAX_BODY:
                raise ApiError(413, "The request body is too large", code="invalid_body")

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = self._chunked()
        elif length is None or not length.isdigit() or int(length) > MAX_BODY:
            raise ApiError(400, "The request needs a JSON body with a Content-Length", code="invalid_body")
        else:
            raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(
                400, "The request body must be one JSON object in UTF-8", code="invalid_json"
            ) from None

    def do_GET(self) -> None:  # noqa: N802
        gw = self.server.gateway  # type: ignore[attr-defined]
        if self.path == "/health":
            return self._json(200, {"status": "ok", "model": gw.limits.model})
        if self.path == "/metrics":
            return self._send(200, gw.counters.exposition().encode(), "text/plain; version=0.0.4")
        if self.path == "/v1/models":
            key = self.headers.get(KEY_HEADER, "")
            gw.counters.add(metrics.OPENAI_REQUESTS, (key, "models"))
            return self._json(200, gw.models())
        self._error(ApiError(404, f"Not found: {self.path}", code="not_found"), None)

    def do_POST(self) -> None:  # noqa: N802
        gw = self.server.gateway  # type: ignore[attr-defined]
        route = ROUTES.get(self.path)
        key = self.headers.get(KEY_HEADER, "")
        if route is None or route == "models":
            return self._error(ApiError(404, f"Not found: POST {self.path}", code="not_found"), None)
        gw.counters.add(metrics.OPENAI_REQUESTS, (key, route))
        try:
            body, stream = gw.generate(route, self._body(), key)
        except ApiError as err:
            gw.counters.add(metrics.OPENAI_ERRORS, (key, route, str(err.status)))
            return self._error(err, route)
        except Exception as exc:  # a bug here: the client still gets OpenAI's shape, the log the cause
            print(f"nemotron-gateway: {route}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            gw.counters.add(metrics.OPENAI_ERRORS, (key, route, "500"))
            return self._error(ApiError(500, "The gateway failed on this request (see its log)"), route)
        if stream:
            return self._send(200, shaping.sse(body), "text/event-stream")
        self._json(200, body)

    def _error(self, err: ApiError, route: str | None) -> None:
        body = err.body()
        self.send_response(err.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if err.status in (429, 503):
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # noqa: ANN201
        conn, _ = super().get_request()
        return conn, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port)


def make_server(gateway: Gateway, listen: str) -> socketserver.BaseServer:
    """A server on `listen` (``unix:/path``, mode 0660, or ``host:port``), not yet serving."""
    handler = type("GatewayHandler", (Handler,), {})
    if listen.startswith("unix:"):
        path = listen[5:]
        if os.path.exists(path):
            os.unlink(path)  # a socket left by a previous run
        old = os.umask(0o117)
        try:
            server: socketserver.BaseServer = _UnixServer(path, handler)
        finally:
            os.umask(old)
    else:
        host, _, port = listen.rpartition(":")
        ThreadingHTTPServer.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
        server.daemon_threads = True
    server.gateway = gateway  # type: ignore[attr-defined]
    return server


def load_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nemotron-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the gateway's JSON config (rendered by the deploy)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        gateway = Gateway(config)
    except (OSError, ValueError, KeyError) as exc:
        print(f"nemotron-gateway: cannot start: {exc}", file=sys.stderr)
        return 2
    server = make_server(gateway, config["listen"])
    print(
        f"nemotron-gateway: serving {gateway.limits.model} on {config['listen']}", file=sys.stderr, flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
