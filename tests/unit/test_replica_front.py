"""The replica's own port: the front (service/replica_front.py) and the launcher (service/nemo_launch.py).

The front runs as the job runs it: NeMo's stand-in on 127.0.0.1:<port>, the front on another local
address (127.0.0.2 here; the node's own addresses in a job), same port. The launcher runs the
emulator, installed as NeMo's package is in the sandbox's image, and must leave it listening on
127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from helpers import REPO
from nemotron_rehearsal import EMULATOR
from nemotron_rehearsal.emulator import serve_in_thread
from nemotron_rehearsal.sandbox import image

from nemotron_deploy.service import probe, replica_front

FRONT = "127.0.0.2"  # another loopback address: the front's, as the node's own address is in a job
KEY = "5e" * 32
SERVICE = REPO / "nemotron_deploy" / "service"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def call(port: int, method: str = "PUT", path: str = "/generate", body: bytes = b"", headers=None):
    conn = http.client.HTTPConnection(FRONT, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


GENERATE = json.dumps(
    {"sentences": ["The capital of France is"], "tokens_to_generate": 4, "greedy": True}
).encode()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "replica.key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


def start_front(key_file: Path, port: int, translator=None) -> replica_front.FrontServer:
    keys = replica_front.KeyFile(str(key_file))
    server = replica_front.FrontServer((FRONT, port), keys, port, 30.0, translator)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@contextmanager
def fronted(key_file: Path, translator=None):
    """The emulator on 127.0.0.1:<port> and the front on 127.0.0.2:<port>."""
    port = free_port()
    with serve_in_thread(port) as nemo:
        assert nemo.wait_ready()
        front = start_front(key_file, port, translator)
        try:
            yield nemo, port
        finally:
            front.shutdown()
            front.server_close()


@pytest.fixture
def replica(key_file: Path):
    with fronted(key_file) as pair:
        yield pair


def test_a_request_without_the_key_gets_401_and_never_reaches_nemo(replica):
    nemo, port = replica
    status, headers, body = call(port, body=GENERATE, headers={"Content-Type": "application/json"})
    assert status == 401
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "replica_key_missing"
    assert nemo.generations == 0


@pytest.mark.parametrize("given", ["wrong", KEY[:-1], KEY + "0", KEY.upper()])
def test_a_wrong_key_gets_403_and_never_reaches_nemo(replica, given):
    nemo, port = replica
    status, _, body = call(port, body=GENERATE, headers={replica_front.KEY_HEADER: given})
    assert status == 403
    assert json.loads(body)["error"]["code"] == "replica_key_invalid"
    assert nemo.generations == 0


def test_with_the_key_the_answer_is_nemos_own(replica):
    nemo, port = replica
    headers = {"Content-Type": "application/json", replica_front.KEY_HEADER: KEY}
    status, _, through = call(port, body=GENERATE, headers=headers)
    direct = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    direct.request("PUT", "/generate", body=GENERATE, headers={"Content-Type": "application/json"})
    expected = direct.getresponse().read()
    direct.close()
    assert status == 200
    assert json.loads(through) == json.loads(expected)
    assert nemo.generations == 2
    # NeMo's own answers to everything else pass through too (its 404 page, its 200-with-a-string).
    status, _, _ = call(port, "GET", "/", headers={replica_front.KEY_HEADER: KEY})
    assert status == 404
    status, _, body = call(port, body=b'{"sentences": ["a"], "tokens_to_generate": "x"}', headers={**headers})
    assert status == 200 and isinstance(json.loads(body), str)


def test_the_request_reaches_nemo_unchanged_but_for_the_key(key_file):
    """Method, path, headers and body as sent; the key header (and hop-by-hop ones) dropped."""
    seen = {}

    class Recorder(BaseHTTPRequestHandler):
        def do_PUT(self):
            seen["line"] = self.requestline
            seen["headers"] = dict(self.headers.items())
            seen["body"] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Upstream", "yes")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    port = free_port()
    upstream = HTTPServer(("127.0.0.1", port), Recorder)
    threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    front = start_front(key_file, port)
    try:
        status, headers, body = call(
            port,
            "PUT",
            "/generate?x=1",
            b'{"sentences": ["hi"]}',
            {replica_front.KEY_HEADER: KEY, "Content-Type": "application/json", "X-Client": "c"},
        )
    finally:
        front.shutdown()
        front.server_close()
        upstream.shutdown()
        upstream.server_close()
    assert (status, body, headers["X-Upstream"]) == (200, b"{}", "yes")
    assert seen["line"] == "PUT /generate?x=1 HTTP/1.1"
    assert seen["body"] == b'{"sentences": ["hi"]}'
    assert seen["headers"]["X-Client"] == "c"
    assert seen["headers"]["Content-Type"] == "application/json"
    assert replica_front.KEY_HEADER not in seen["headers"]


def test_nemo_down_means_no_answer_so_haproxy_retries_another_replica(key_file):
    port = free_port()  # nothing listens on 127.0.0.1:port
    front = start_front(key_file, port)
    try:
        with pytest.raises(http.client.RemoteDisconnected):
            call(port, body=GENERATE, headers={replica_front.KEY_HEADER: KEY})
    finally:
        front.shutdown()
        front.server_close()


def test_a_new_key_in_the_file_is_used_at_once(replica, key_file):
    nemo, port = replica
    new = "7a" * 32
    key_file.write_text(new + "\n")
    os.utime(key_file, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    json_type = {"Content-Type": "application/json"}
    assert call(port, body=GENERATE, headers={replica_front.KEY_HEADER: KEY, **json_type})[0] == 403
    assert call(port, body=GENERATE, headers={replica_front.KEY_HEADER: new, **json_type})[0] == 200


def test_expect_100_continue_without_the_key_is_refused_before_the_body(replica):
    nemo, port = replica
    with socket.create_connection((FRONT, port), timeout=5) as s:
        s.sendall(
            b"PUT /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 1000000\r\n\r\n"
        )
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert nemo.generations == 0


def test_the_probe_sends_the_key_it_is_given_and_names_a_refusal(replica, key_file):
    nemo, port = replica
    try:
        probe.use_replica_key_file(None)
        refused = probe.probe(FRONT, port)
        assert refused.reason == "unauthorized"
        assert "--replica-key-file" in refused.message
        probe.use_replica_key_file(str(key_file))
        assert probe.probe(FRONT, port).ok
    finally:
        probe.use_replica_key_file(None)


def test_a_short_key_file_is_refused_at_start(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="shorter than 16 bytes"):
        replica_front.KeyFile(str(short))
    assert replica_front.main(["--port", "1", "--key-file", str(short)]) == 1


def test_the_nodes_addresses_leave_out_loopback():
    addresses = replica_front.node_addresses()
    assert not any(a.startswith("127.") or a == "::1" for a in addresses)


def test_the_front_process_listens_where_told_and_stops_on_sigterm(key_file):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nemotron_deploy.service.replica_front", "--port", str(port),
         "--key-file", str(key_file), "--listen", FRONT],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: _listening(FRONT, port)), "the front never listened"
        assert call(port, body=GENERATE)[0] == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert f"{FRONT}:{port} -> 127.0.0.1:{port}" in err


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


# --- the launcher ------------------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, _, hexport = local.partition(":")
        if state == "0A" and int(hexport, 16) == port:
            out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out


@pytest.fixture
def nemo_tree(tmp_path: Path) -> Path:
    """NeMo's tree as the sandbox's image has it: the emulator as the script and as the server module."""
    emulator = EMULATOR.read_bytes()
    for rel, data in image.nemo_package(emulator).items():
        target = tmp_path / "root" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    script = tmp_path / "root" / "opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_bytes(emulator)
    model = tmp_path / "model"
    (model / "model_weights").mkdir(parents=True)
    (model / "model_config.yaml").write_text("num_layers: 2\nnum_attention_heads: 2\nnum_query_groups: 1\n")
    return tmp_path


def _launch(tree: Path, port: int, *, nemo_on_path: bool = True) -> subprocess.Popen:
    script = tree / "root/opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py"
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "NEMO_EMULATOR_", "RANK", "PYTHON"))
    }
    env = {**clean, "NEMO_EMULATOR_LOAD_DELAY": "0.1", "NEMO_EMULATOR_READY_FILE": str(tree / "ready")}
    if nemo_on_path:
        env["PYTHONPATH"] = str(tree / "root/opt/NeMo")
    return subprocess.Popen(
        [sys.executable, str(SERVICE / "nemo_launch.py"), str(script), f"gpt_model_file={tree / 'model'}",
         "tensor_model_parallel_size=1", "pipeline_model_parallel_size=1", "trainer.devices=1",
         "trainer.num_nodes=1", "server=True", f"port={port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


# --- the OpenAI routes (--openai): translated here, one PUT /generate each

COMPLETION = json.dumps({"model": "nemotron-4-340b-base", "prompt": "The capital of France is",
                         "max_tokens": 4, "temperature": 0}).encode()  # fmt: skip


def translator(tmp_path: Path, tokenizer: Path | None = None):
    from nemotron_rehearsal import tokenizer as stand_in

    from nemotron_deploy.service.openai.translator import Translator

    path = tokenizer or stand_in.train(tmp_path / "nemotron_2_256k.model")
    t = Translator({"model": "nemotron-4-340b-base", "context_length": 4096, "tokenizer": str(path),
                    "max_prompts": 8, "logprobs_allowed": True})  # fmt: skip
    t.load_tokenizer()
    return t


@pytest.fixture
def openai_replica(key_file: Path, tmp_path: Path):
    with fronted(key_file, translator(tmp_path)) as pair:
        yield pair


def test_an_openai_request_needs_the_key_too(openai_replica):
    _, port = openai_replica
    status, _, body = call(port, "POST", "/v1/completions", COMPLETION, {"Content-Type": "application/json"})
    assert status == 401 and json.loads(body)["error"]["code"] == "replica_key_missing"


def test_an_openai_request_is_one_generation_answered_in_openais_shape(openai_replica):
    _, port = openai_replica
    status, headers, body = call(port, "POST", "/v1/completions", COMPLETION, {replica_front.KEY_HEADER: KEY})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["object"] == "text_completion" and answer["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
    usage = answer["usage"]
    # the token counts for HAProxy's per-key metrics (HAProxy removes the header)
    assert headers["X-Nemotron-Usage"] == f"{usage['prompt_tokens']} {usage['completion_tokens']}"


def test_an_openai_request_nemo_never_answered_gets_no_answer_either(key_file, tmp_path):
    """As for PUT /generate: the connection closes without an answer, so HAProxy may try another replica."""
    port = free_port()  # nothing listens on 127.0.0.1:port
    front = start_front(key_file, port, translator(tmp_path))
    try:
        with pytest.raises(http.client.RemoteDisconnected):
            call(port, "POST", "/v1/completions", COMPLETION, {replica_front.KEY_HEADER: KEY})
    finally:
        front.shutdown()
        front.server_close()


def test_without_its_tokenizer_the_replica_still_generates_and_the_openai_routes_say_why(key_file, tmp_path):
    missing = tmp_path / "absent" / "nemotron_2_256k.model"
    with fronted(key_file, translator(tmp_path, missing)) as (_, port):
        status, headers, body = call(
            port, "POST", "/v1/completions", COMPLETION, {replica_front.KEY_HEADER: KEY}
        )
        json_key = {replica_front.KEY_HEADER: KEY, "Content-Type": "application/json"}
        generate = call(port, body=GENERATE, headers=json_key)
    error = json.loads(body)["error"]
    assert (status, error["code"], headers.get("Retry-After")) == (503, "tokenizer_unavailable", "1")
    assert str(missing) in error["message"]
    assert generate[0] == 200 and "sentences" in json.loads(generate[2])


def test_nemos_refusals_become_openai_errors():
    from nemotron_deploy.service.openai.errors import ApiError
    from nemotron_deploy.service.openai.translator import nemo_answer

    assert nemo_answer(200, '{"sentences": ["x"]}') == {"sentences": ["x"]}
    for status, text, expected in (
        (200, '"temperature must be a positive number"', 400),  # NeMo's 200-with-a-string
        (200, "not json", 502),
        (500, "<html>Internal Server Error</html>", 502),
    ):
        with pytest.raises(ApiError) as err:
            nemo_answer(status, text)
        assert err.value.status == expected, (status, text)
    with pytest.raises(ApiError) as err:
        nemo_answer(200, '"temperature must be a positive number"')
    assert "temperature must be a positive number" in err.value.message


def test_the_launcher_keeps_nemos_server_on_loopback(nemo_tree):
    """The unchanged script asks MegatronServer.run for 0.0.0.0; the launcher's patch makes it 127.0.0.1."""
    port = free_port()
    proc = _launch(nemo_tree, port)
    try:
        assert wait_until(lambda: (nemo_tree / "ready").exists()), proc.stderr
        assert _listening_addresses(port) == {"127.0.0.1"}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("PUT", "/generate", body=GENERATE, headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert "asked for 0.0.0.0" in err and f"listening on 127.0.0.1:{port} only" in err
    assert f"Running on http://127.0.0.1:{port}" in err


def test_without_nemos_module_the_launcher_starts_nothing(nemo_tree):
    proc = _launch(nemo_tree, free_port(), nemo_on_path=False)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert "cannot bind NeMo's server to 127.0.0.1" in err and "not starting it" in err
    assert not (nemo_tree / "ready").exists()


def test_the_launcher_passes_the_scripts_exit_status(tmp_path):
    pkg = tmp_path / "nemo/collections/nlp/modules/common"
    pkg.mkdir(parents=True)
    for d in [pkg, *pkg.parents][: len(pkg.relative_to(tmp_path).parts)]:
        (d / "__init__.py").write_text("")
    (pkg / "text_generation_server.py").write_text(
        "class MegatronServer:\n    def run(self, url, port=5000):\n        print('RUN', url, port)\n"
    )
    script = tmp_path / "eval" / "megatron_gpt_eval.py"
    script.parent.mkdir()
    script.write_text(
        "import sys\nfrom nemo.collections.nlp.modules.common.text_generation_server import MegatronServer\n"
        "print('ARGV', sys.argv, sys.path[0])\nMegatronServer().run('0.0.0.0', port=7)\nsys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(SERVICE / "nemo_launch.py"), str(script), "a=1", "b=2"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert f"ARGV [{str(script)!r}, 'a=1', 'b=2'] {script.parent}" in done.stdout
    assert "RUN 127.0.0.1 7" in done.stdout
