"""The replica's front: the only way into a replica from other hosts, for whoever holds its key.

NeMo's server has no authentication and ``megatron_gpt_eval.py`` binds every address of its node, so
any user of the cluster could call a replica directly and skip the endpoint (its API keys, its
envelope, its per-key limits). The job therefore runs NeMo bound to the node's loopback
(``nemo_launch.py``) and this front on the node's other addresses, same port: it forwards a request
to ``127.0.0.1:<port>`` unchanged only if it carries the replica key (``X-Nemotron-Replica-Key``, a
secret the deploy generates; HAProxy and the scheduled check send it), else answers 401 (no key) or
403 (a wrong one) with a JSON error, before reading the body.

With ``--openai CONFIG`` it also translates ``POST /v1/completions`` and ``/v1/chat/completions``
(``service/openai/translator.py``): one ``PUT /generate`` to NeMo each, the answer in OpenAI's shape,
its token counts in ``X-Nemotron-Usage`` for HAProxy's per-key metrics. Translating here, where every
request already passes, adds no hop to the endpoint's path (a translator on the login node added two,
HAProxy -> it -> HAProxy, and measured +4 ms at p99).

Forwarding: the request line, headers and body as received (the key header and hop-by-hop headers
dropped); NeMo answers whole and closes, and so does the front (no streaming, one connection per
request, as NeMo's own server). If NeMo refuses or drops the connection, the front closes the
client's connection without an answer, so that HAProxy retries another replica (`retry-on
conn-failure empty-response`), as it did when it talked to NeMo directly.

The key is re-read when its file changes (a new key after a deploy needs no restart of the job).
Runs inside the job's container, as the job's user: standard library only (and the container's
``sentencepiece`` for the OpenAI routes' tokenizer).

    python3 -m nemotron_deploy.service.replica_front --port 1424 --key-file /path/replica.key
"""

from __future__ import annotations

import argparse
import hmac
import http.client
import json
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .openai.translator import ROUTES, Translator, Unanswered, load_config

KEY_HEADER = "X-Nemotron-Replica-Key"
UPSTREAM_HOST = "127.0.0.1"
MAX_BODY = 64 << 20  # the endpoint's own buffer is far smaller; this only bounds a stranger's body
# Hop-by-hop headers (RFC 9110 7.6.1) are the connection's, not the request's: never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)


class KeyFile:
    """The replica key, read from its file again whenever the file changes (inode, size, mtime)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._key = b""
        self.current()  # fail at start, not at the first request, if it can't be read

    def current(self) -> bytes:
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if stamp != self._stamp:
                with open(self.path, "rb") as f:
                    key = f.read(4096).strip()
                if len(key) < 16:
                    raise ValueError(f"the replica key in {self.path} is shorter than 16 bytes")
                self._key, self._stamp = key, stamp
            return self._key


def key_matches(given: str | None, key: bytes) -> bool:
    """Constant-time comparison (no timing hint about how much of a guess was right)."""
    return given is not None and hmac.compare_digest(given.strip().encode("utf-8", "replace"), key)


class FrontServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        keys: KeyFile,
        upstream_port: int,
        timeout: float | None,
        translator: Translator | None = None,
    ):
        self.keys = keys
        self.translator = translator
        self.upstream_port = upstream_port
        self.upstream_timeout = timeout
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, FrontHandler)

    def server_bind(self) -> None:
        # No reverse DNS lookup (HTTPServer.server_bind's getfqdn): a bad resolver would delay start-up.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FrontServer
    server_version = "nemotron-replica-front"
    sys_version = ""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        # Refusals only (who knocked, never a key): a forwarded request is NeMo's to log.
        sys.stderr.write(f"replica front: {self.client_address[0]} {format % args}\n")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if str(code) in ("401", "403"):
            super().log_request(code, size)

    def _refuse(self, status: int, code: str, message: str) -> None:
        body = json.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def handle_expect_100(self) -> bool:
        # The key is checked before the client is told to send its body.
        self._checked = True
        if not self._authorized():
            return False
        return super().handle_expect_100()

    def _authorized(self) -> bool:
        given = self.headers.get(KEY_HEADER)
        if given is None:
            self._refuse(
                401,
                "replica_key_missing",
                "This is a replica of the Nemotron service: call the endpoint on the login node instead",
            )
            return False
        try:
            key = self.server.keys.current()
        except (OSError, ValueError) as exc:
            self.log_message("cannot read the replica key: %s", exc)
            self._refuse(503, "replica_key_unreadable", "The replica cannot read its key file")
            return False
        if not key_matches(given, key):
            self._refuse(403, "replica_key_invalid", "Wrong replica key: call the endpoint instead")
            return False
        return True

    def handle_one_request(self) -> None:
        # Every method goes through one path (NeMo's Flask app answers each of them itself).
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            self._checked = False
            if not self.parse_request():
                return
            if not self._checked and not self._authorized():
                return
            self._forward()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
        self.close_connection = True

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers: dropped
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            return None
        return self.rfile.read(length)

    def _forward(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self._refuse(400, "bad_request", "Malformed request body framing")
            return
        if body is None:
            self._refuse(413, "too_large", f"The body is larger than {MAX_BODY} bytes")
            return
        route = ROUTES.get(self.path) if self.command == "POST" else None
        if route is not None and self.server.translator is not None:
            self._translate(route, body)
            return
        headers = [
            (name, value)
            for name, value in self.headers.items()
            if name.lower() not in HOP_BY_HOP and name.lower() not in (KEY_HEADER.lower(), "content-length")
        ]
        try:
            response, answer = self._upstream(self.command, self.path, headers, body)
        except (OSError, http.client.HTTPException) as exc:
            self._unanswered(exc)
            return
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer)

    def _upstream(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """One request to NeMo on 127.0.0.1, its answer read whole (NeMo closes after each)."""
        upstream = http.client.HTTPConnection(
            UPSTREAM_HOST, self.server.upstream_port, timeout=self.server.upstream_timeout
        )
        try:
            upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                upstream.putheader(name, value)
            if body or method in ("PUT", "POST", "PATCH"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            return response, response.read()
        finally:
            upstream.close()

    def _unanswered(self, exc: BaseException) -> None:
        # NeMo is down or died mid-request: no answer at all, so that HAProxy tries another replica.
        self.log_message("upstream %s:%s failed: %s", UPSTREAM_HOST, self.server.upstream_port, exc)
        self.close_connection = True

    def _translate(self, route: str, body: bytes) -> None:
        """An OpenAI request: one PUT /generate to NeMo, its answer in OpenAI's shape (service/openai)."""

        def generate(data: bytes) -> tuple[int, str]:
            try:
                response, answer = self._upstream(
                    "PUT", "/generate", [("Host", "localhost"), ("Content-Type", "application/json")], data
                )
            except (OSError, http.client.HTTPException) as exc:
                raise Unanswered(str(exc)) from exc
            return response.status, answer.decode("utf-8", errors="replace")

        try:
            reply = self.server.translator.reply(route, body, generate)
        except Unanswered as exc:
            self._unanswered(exc)
            return
        self.send_response_only(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)


def node_addresses() -> list[str]:
    """This node's addresses other than loopback (IPv4, and global IPv6), from the kernel's tables of
    this network namespace: what other hosts (HAProxy, the scheduled check) can reach it on."""
    found: list[str] = []
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    leaf = None  # each "|-- ADDRESS" line is followed by its prefixes; "/32 host LOCAL": ours
    for line in lines:
        if "|--" in line:
            leaf = line.split("|--", 1)[1].strip()
        elif line.strip() == "/32 host LOCAL" and leaf and not leaf.startswith("127.") and leaf not in found:
            found.append(leaf)
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for row in f:
                fields = row.split()
                if len(fields) >= 6 and fields[3] == "00":  # scope global
                    raw = fields[0]
                    address = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw))
                    if address not in found:
                        found.append(address)
    except OSError:
        pass
    return found


def serve(
    addresses: list[str],
    port: int,
    keys: KeyFile,
    upstream_port: int,
    timeout: float | None,
    translator: Translator | None = None,
) -> int:
    servers = []
    for address in addresses:
        try:
            servers.append(FrontServer((address, port), keys, upstream_port, timeout, translator))
        except OSError as exc:
            print(f"replica front: cannot listen on {address}:{port}: {exc.strerror or exc}", file=sys.stderr)
    if not servers:
        print(
            f"replica front: listening on none of {', '.join(addresses) or 'no address'} (port {port}): "
            "the replica cannot be reached from other hosts",
            file=sys.stderr,
        )
        return 1
    print(
        "replica front: "
        + ", ".join(f"{s.server_name}:{s.server_port}" for s in servers)
        + f" -> {UPSTREAM_HOST}:{upstream_port} (requests with the replica key only)",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    for s in servers:
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    stop.wait()
    for s in servers:
        s.shutdown()
        s.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="replica_front",
        description="Forward requests that carry the replica key to NeMo's server on 127.0.0.1.",
    )
    p.add_argument("--port", type=int, required=True, help="the port to listen on (the replica's port)")
    p.add_argument("--upstream-port", type=int, help="NeMo's port on 127.0.0.1 (default: --port)")
    p.add_argument("--key-file", required=True, help="the file holding the replica key")
    p.add_argument(
        "--listen",
        action="append",
        help="an address to listen on (repeatable; default: every address of this node but loopback)",
    )
    p.add_argument("--timeout", type=float, help="seconds to wait for NeMo's answer (default: no limit)")
    p.add_argument(
        "--openai",
        metavar="CONFIG",
        help="also serve POST /v1/completions and /v1/chat/completions, translated to one PUT /generate "
        "each (the JSON config the deploy renders: the model, its limits and tokenizer)",
    )
    opts = p.parse_args(argv)
    translator = None
    if opts.openai:
        try:
            translator = Translator(load_config(opts.openai))
        except (OSError, ValueError, KeyError) as exc:
            print(f"replica front: cannot read the OpenAI config {opts.openai}: {exc}", file=sys.stderr)
            return 1
        if not translator.load_tokenizer():
            print(
                f"replica front: cannot load the tokenizer {translator.tokenizer_path} "
                f"({translator.tokenizer_error}): the OpenAI routes answer 503 until the job restarts",
                file=sys.stderr,
            )
    try:
        keys = KeyFile(opts.key_file)
    except (OSError, ValueError) as exc:
        print(
            f"replica front: cannot read the replica key {opts.key_file}: {exc}; the deploy makes it on the "
            "login node (pyinfra ... deploys/nemotron.py), readable by the account that submits the jobs",
            file=sys.stderr,
        )
        return 1
    addresses = opts.listen or node_addresses()
    return serve(addresses, opts.port, keys, opts.upstream_port or opts.port, opts.timeout, translator)


if __name__ == "__main__":
    sys.exit(main())
