"""The stand-in answers every request as NeMo's own Flask app does (issue 20).

NeMo's ``text_generation_server.py`` (vendored verbatim from nemo_toolkit 1.23.0, run by
``tests/nemo_reference.py`` on Flask/Werkzeug/flask-restful with only torch, logging and ``generate``
stubbed) and the stand-in (in script mode, as srun runs it) both listen on 127.0.0.1; every request of
the battery below goes, as raw bytes on a fresh connection, to both, and the two raw answers must agree:
status lines, headers in order (the values of ``Date`` and ``Server`` aside, and ``Content-Length`` of
a generation) and body. A generation's body is made by each side's own fake model, so only its shape
is compared (keys, types, number of sentences). Nothing here says what an answer should be: NeMo's
app does.

Both run with the same PYTHONHASHSEED, once per seed in ``SEEDS`` (see there). The stand-in is started
afresh after a 500: one from inside ``generate()`` wedges it, as it wedges the real server's ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nemo_reference
import pytest
from nemotron_rehearsal import EMULATOR, MODEL_CONFIG

HOST = "Host: 127.0.0.1:5555"  # the same Host header to both
JSON = "application/json"


def _request(
    method: str = "PUT",
    target: str = "/generate",
    body: bytes | str | object | None = None,
    content_type: str | None = JSON,
    headers: tuple[str, ...] = (),
    version: str = "HTTP/1.1",
    length: bool = True,
) -> bytes:
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    lines = [f"{method} {target} {version}", HOST, "Connection: close", *headers]
    if content_type is not None and body is not None:
        lines.append(f"Content-Type: {content_type}")
    if body is not None and length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def _chunked(body: bytes) -> bytes:
    half = len(body) // 2
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:])) + b"0\r\n\r\n"


GOOD = {"sentences": ["Hello there"], "tokens_to_generate": 3, "greedy": True}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "put", "get", "head", "FOO"]
PATHS = [
    "/",
    "/generate",
    "/generate/",
    "//generate",
    "/%67enerate",
    "/GENERATE",
    "/nonexistent",
    "/static/x",
    "/index.html",
    "/generate?x=1&y",
    "/?q=1",
    "/generate/../generate",
    "/a/b/c.txt",
    "/generate%2F",
]


def _battery() -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for method in METHODS:
        for path in PATHS:
            body = GOOD if method.upper() in {"PUT", "POST", "PATCH", "DELETE"} else None
            out.append((f"{method} {path}", _request(method, path, body)))
    bodies: dict[str, object] = {
        "valid": GOOD,
        "valid, every option": {
            "sentences": ["a", "b"],
            "tokens_to_generate": 5,
            "temperature": 0.7,
            "add_BOS": True,
            "top_k": 5,
            "top_p": 0.5,
            "greedy": False,
            "all_probs": True,
            "repetition_penalty": 1.0,
            "min_tokens_to_generate": 1,
            "end_strings": ["<|endoftext|>", "\n"],
            "compute_logprob": True,
            "random_seed": 7,
            "neighbors": 2,
        },
        "unknown key": {"sentences": ["x"], "bogus": 1},
        "non-ASCII prompt": {"sentences": ["héllo ✓ 日本"], "tokens_to_generate": 2},
        "128 sentences": {"sentences": ["x"] * 128, "tokens_to_generate": 1},
        "129 sentences": {"sentences": ["x"] * 129},
        "129 sentences as an object": {"sentences": {str(i): i for i in range(129)}},
        "missing sentences": {"tokens_to_generate": 3},
        "empty object": {},
        "sentences null": {"sentences": None},
        "sentences int": {"sentences": 5},
        "sentences string": {"sentences": "Hello"},
        "sentences empty": {"sentences": []},
        "sentences [1]": {"sentences": [1]},
        "task_ids": {"sentences": ["x"], "task_ids": [0]},
        "tokens_to_generate string": {"sentences": ["x"], "tokens_to_generate": "5"},
        "tokens_to_generate 0": {"sentences": ["x"], "tokens_to_generate": 0},
        "tokens_to_generate 1.5": {"sentences": ["x"], "tokens_to_generate": 1.5},
        "tokens_to_generate true": {"sentences": ["x"], "tokens_to_generate": True},
        "temperature 0": {"sentences": ["x"], "temperature": 0},
        "temperature string": {"sentences": ["x"], "temperature": "1"},
        "temperature true": {"sentences": ["x"], "temperature": True},
        "temperature 101": {"sentences": ["x"], "temperature": 101},
        "temperature NaN": '{"sentences": ["x"], "temperature": NaN}',
        "top_p 2": {"sentences": ["x"], "top_p": 2},
        "top_p -0.1": {"sentences": ["x"], "top_p": -0.1},
        "top_p string": {"sentences": ["x"], "top_p": "0.5"},
        "top_k -1": {"sentences": ["x"], "top_k": -1},
        "top_k string": {"sentences": ["x"], "top_k": "3"},
        "top_k Infinity": '{"sentences": ["x"], "top_k": Infinity}',
        "greedy string": {"sentences": ["x"], "greedy": "true"},
        "all_probs string": {"sentences": ["x"], "all_probs": "false"},
        "add_BOS 1": {"sentences": ["x"], "add_BOS": 1},
        "compute_logprob string": {"sentences": ["x"], "compute_logprob": "yes"},
        "repetition_penalty 0.5": {"sentences": ["x"], "repetition_penalty": 0.5},
        "end_strings string": {"sentences": ["x"], "end_strings": "x"},
        "end_strings [a, 1]": {"sentences": ["x"], "end_strings": ["a", 1]},
        "min_tokens_to_generate -1": {"sentences": ["x"], "min_tokens_to_generate": -1},
        "min_tokens_to_generate string": {"sentences": ["x"], "min_tokens_to_generate": "1"},
        "neighbors -1": {"sentences": ["x"], "neighbors": -1},
        "neighbors string": {"sentences": ["x"], "neighbors": "2"},
        "random_seed -1": {"sentences": ["x"], "random_seed": -1},
        "random_seed string": {"sentences": ["x"], "random_seed": "7"},
        "random_seed null": {"sentences": ["x"], "random_seed": None},
        "random_seed 1.5": {"sentences": ["x"], "random_seed": 1.5},
        "invalid JSON": '{"sentences": [',
        "JSON string": '"hello"',
        "JSON array": "[1, 2]",
        "JSON null": "null",
        "JSON number": "42",
        "empty body": "",
        "whitespace body": " \n",
        "trailing garbage": json.dumps(GOOD) + " x",
        "UTF-8 BOM": b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),
        "UTF-16 with BOM": json.dumps(GOOD).encode("utf-16"),
        "UTF-16-LE without BOM": json.dumps(GOOD).encode("utf-16-le"),
        "UTF-32": json.dumps(GOOD).encode("utf-32"),
        "Latin-1 bytes": b'{"sentences": ["caf\xe9"]}',
        "escaped non-ASCII": '{"sentences": ["caf\\u00e9 \\ud83d\\ude00"]}',
        "lone surrogate": '{"sentences": ["\\ud800"]}',
        "duplicate keys": '{"sentences": 1, "sentences": ["x"]}',
    }
    for name, body in bodies.items():
        out.append((f"PUT body: {name}", _request(body=body)))
    body = json.dumps(GOOD)
    for ctype in [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/JSON",
        "APPLICATION/JSON; charset=latin-1",
        "application/json;charset=utf-16",
        "application/vnd.api+json",
        "application/jsonx",
        "text/json",
        "application/x-json",
        "",
        " application/json ",
    ]:
        out.append((f"PUT content-type {ctype!r}", _request(body=body, content_type=ctype)))
    out.append(("PUT invalid JSON as text/plain", _request(body="{", content_type="text/plain")))
    out.append(("PUT no body, no Content-Type", _request(body=None)))
    out.append(("PUT no Content-Length", _request(body=body, length=False)))
    chunked = ("Transfer-Encoding: chunked",)
    out.append(("PUT chunked", _request(body=_chunked(body.encode()), headers=chunked, length=False)))
    out.append(("PUT Expect: 100-continue", _request(body=body, headers=("Expect: 100-continue",))))
    out.append(("PUT HTTP/1.0", _request(body=body, version="HTTP/1.0")))
    out.append(("GET HTTP/1.0 /", _request("GET", "/", version="HTTP/1.0")))
    out.append(("PUT absolute-form target", _request(target="http://127.0.0.1:5555/generate", body=body)))
    out.append(("OPTIONS *", _request("OPTIONS", "*")))
    out.append(("PUT with query", _request(target="/generate?sentences=x", body=body)))
    out.append(("POST bad JSON", _request("POST", body="{")))
    out.append(("GET /generate with body", _request("GET", body=body)))
    return out


@dataclass
class Answer:
    raw: bytes

    def split(self) -> tuple[list[bytes], bytes]:
        """Heads (interim 1xx ones too) and the body."""
        rest, heads = self.raw, []
        while True:
            head, sep, rest = rest.partition(b"\r\n\r\n")
            heads.append(head)
            if not sep or not head.startswith(b"HTTP/1.1 1"):
                return heads, rest

    def view(self) -> dict[str, object]:
        """What must be equal: status lines, headers in order (the values of Date and Server aside), body."""
        heads, body = self.split()
        lines = b"\r\n".join(heads).decode("latin-1").split("\r\n")
        status = [line for line in lines if line.startswith("HTTP/")]
        headers = []
        for line in lines:
            if not line.startswith("HTTP/"):
                key, _, value = line.partition(":")
                headers.append((key, "*" if key.lower() in ("date", "server") else value.strip()))
        view: dict[str, object] = {"status": status, "headers": headers, "body": body}
        if status and status[-1].split()[1] == "200" and body.startswith(b"{"):
            # A generation: each side's fake model wrote it; compare its shape, not its text.
            view["headers"] = [h for h in headers if h[0].lower() != "content-length"]
            view["body"] = {k: _shape(v) for k, v in json.loads(body).items()}
        return view


def _shape(value: object, top: bool = True) -> object:
    """Types all the way down; the length of the outer list (one item a sentence) only."""
    if isinstance(value, list):
        return ["list", len(value) if top else "*", *sorted({repr(_shape(v, False)) for v in value})]
    return type(value).__name__


def _exchange(port: int, raw: bytes) -> Answer:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        chunks = []
        try:
            while data := sock.recv(65536):
                chunks.append(data)
        except (TimeoutError, ConnectionResetError) as exc:
            chunks.append(f"<{type(exc).__name__}>".encode())
    return Answer(b"".join(chunks))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StandIn:
    """The stand-in in script mode, as srun runs it on a fake node, on 127.0.0.1 with ``seed``."""

    def __init__(self, workdir: Path, seed: str) -> None:
        self.workdir, self.seed = workdir, seed
        self.model = workdir / "model"
        self.model.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MODEL_CONFIG, self.model / "model_config.yaml")
        self.script = workdir / "megatron_gpt_eval.py"  # verbatim, far from the package, as on a node
        shutil.copyfile(EMULATOR, self.script)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        self.port = _free_port()
        ready = self.workdir / "ready"
        ready.unlink(missing_ok=True)
        argv = [f"gpt_model_file={self.model}", "tensor_model_parallel_size=8"]
        argv += ["pipeline_model_parallel_size=2", "trainer.devices=8", "trainer.num_nodes=2"]
        argv += ["server=True", f"port={self.port}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEMO_EMULATOR_", "RANK"))}
        env.update(
            PYTHONHASHSEED=self.seed,
            NEMO_EMULATOR_LOAD_DELAY="0",
            NEMO_EMULATOR_BIND="127.0.0.1",
            NEMO_EMULATOR_READY_FILE=str(ready),
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-s", str(self.script), *argv],  # not -I: it would ignore PYTHONHASHSEED
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert self.proc.poll() is None, "the stand-in exited"
            assert time.monotonic() < deadline, "the stand-in did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def _nemo(tmp_path: Path, seed: str) -> Iterator[int]:
    problem = nemo_reference.missing_requirements()
    if problem:
        pytest.fail(f"NeMo's own server cannot run, so the stand-in cannot be checked against it: {problem}")
    with nemo_reference.start(tmp_path / f"nemo-{seed}.log", env={"PYTHONHASHSEED": seed}) as port:
        yield port


BATTERY = _battery()
# Werkzeug lists a 405's allowed methods in the iteration order of a set of strings, so NeMo's Allow
# header, and whether flask-restful's JSON or Flask's HTML answers a 405 on /generate, change with the
# process's string-hash seed: random for each start of NeMo (PYTHONHASHSEED is not set there). Each
# seed here runs both servers with it; between them these show both kinds of 405.
SEEDS = ["0", "1"]


def test_battery_names_are_unique() -> None:
    names = [name for name, _ in BATTERY]
    assert len(names) == len(set(names))


def test_the_seeds_show_both_of_nemos_405_answers(tmp_path: Path) -> None:
    answers = set()
    for seed in SEEDS:
        with _nemo(tmp_path, seed) as port:
            answers.add(repr(_exchange(port, _request("POST", body=GOOD)).view()["body"]))
    assert len(answers) == 2, answers


@pytest.mark.parametrize("seed", SEEDS)
def test_stand_in_answers_as_nemo_does(tmp_path: Path, seed: str) -> None:
    differences = []
    standin = StandIn(tmp_path / "standin", seed)
    try:
        with _nemo(tmp_path, seed) as nemo_port:
            standin.start()
            for name, raw in BATTERY:
                want = _exchange(nemo_port, raw).view()
                got = _exchange(standin.port, raw).view()
                if got != want:
                    differences.append(f"{name}:\n  NeMo:     {want}\n  stand-in: {got}")
                if not got["status"] or "500" in got["status"][-1]:
                    # A 500 may come from inside generate(), which wedges the stand-in as it wedges
                    # NeMo's other ranks: start it afresh.
                    standin.stop()
                    standin.start()
    finally:
        standin.stop()
    assert not differences, f"{len(differences)} of {len(BATTERY)} requests differ:\n" + "\n".join(
        differences
    )
