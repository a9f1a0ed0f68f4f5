#!/usr/bin/env python3
"""STAND-IN for NeMo's ``megatron_gpt_eval.py`` inference server. This is NOT NeMo and loads no model.

Why it exists: the real server needs ~682 GB of Nemotron-4-340B weights and 8-16 big GPUs, so tests,
benchmarks and the fake-cluster sandbox run this file instead. The sandbox copies it verbatim to
``/opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py`` on fake compute nodes and starts it
under ``srun`` with Debian's ``/usr/bin/python3``; that is why it is ONE self-contained, stdlib-only
file that imports nothing from the rest of the package.

What it reproduces (facts from NeMo v1.22/v1.23, see ``nemo-server-protocol.md`` in the shared docs):

* Hydra-style ``key=value`` arguments of the real script. ``trainer.devices * trainer.num_nodes`` must
  equal ``tensor_model_parallel_size * pipeline_model_parallel_size`` (checked on every rank, exit 1),
  Lightning's SLURM checks (``SLURM_NTASKS_PER_NODE``/``SLURM_NNODES``) and, under Slurm,
  ``SLURM_NTASKS`` must equal that world size too (the real job would hang in NCCL init instead).
  ``gpt_model_file`` must be a directory holding ``model_config.yaml``; TP must divide the attention
  heads and query groups, PP must divide the layers.
* Load time: nothing listens on the port while "loading" (connection refused), then the warm-up
  prints, then only global rank 0 (``SLURM_PROCID``/``RANK``) serves HTTP on ``0.0.0.0:port``.
  Every other rank blocks like a rank waiting in ``torch.distributed.broadcast`` and dies at once on
  SIGTERM/SIGINT/SIGHUP (what ``scancel`` and the end of a step deliver).
* HTTP as NeMo's Flask app on Werkzeug's development server (Flask 3.0, Werkzeug 3.0.1,
  flask-restful 0.3.10), checked answer by answer against NeMo's own ``text_generation_server.py`` by
  ``tests/unit/test_emulator_parity.py``. NeMo builds ``Flask(__name__, static_url_path='')``, so
  besides flask-restful's ``/generate`` (PUT, OPTIONS) a static route ``/<path:filename>`` (GET,
  HEAD, OPTIONS) with no folder behind it takes every other path: GET/HEAD anywhere but ``/`` is a 404
  page (``GET /generate`` too), other methods are 405 with ``Allow``, ``/`` is 404 for every method,
  OPTIONS answers Flask's automatic 200. Any method name is accepted (``put`` is PUT), paths are
  percent-decoded and leading slashes merged, every answer says ``Connection: close``, reasons are
  upper case (``404 NOT FOUND``), ``Expect: 100-continue`` gets two interim answers. The ``Allow``
  order is a set's, so it follows the process's string-hash seed as in NeMo, and so does the 405 body
  on ``/generate``: flask-restful's JSON if that order starts with PUT or OPTIONS, else Flask's HTML.
  On ``PUT /generate``: a Content-Type other than JSON is 415, unparsable JSON 400 (both JSON
  messages); validation errors are **200 with a JSON string body**, only "Maximum number of
  sentences is 128" is a 400, a body that is not an object or lacks ``sentences`` is a 500;
  success is a JSON object with ``sentences``/``tokens``/``logprob``/``token_ids``/``offsets``. One
  global lock serialises generation. An exception inside generation (e.g. ``sentences`` not a list
  of strings) answers 500 and wedges the server: later requests are accepted but never answered,
  as when the other ranks are stuck in a collective.
* The continuation is deterministic for greedy requests (derived from a hash of the prompt), counts
  ``tokens_to_generate`` as words, stops at ``end_strings`` and at a natural end (``<|endoftext|>``).

Fault and timing switches, all by environment variable (the script takes no emulator-only flags so
that the real command line works unchanged):

  NEMO_EMULATOR_LOAD_DELAY=S     seconds of "loading" before the port opens (float, default 2)
  NEMO_EMULATOR_TOKEN_SECONDS=S  generation time per generated token (default 0.0002)
  NEMO_EMULATOR_SLOW_SECONDS=S   extra time for every generation (default 0)
  NEMO_EMULATOR_CRASH_AFTER=N    rank 0 dies (exit 1) on the generation after N successful ones
  NEMO_EMULATOR_HANG_AFTER=N     after N generations, accept connections but never answer again
  NEMO_EMULATOR_ERROR_AFTER=N    after N generations, answer every request 200 with a JSON string error
                                 (NeMo's way of failing a request: a status check alone sees success)
  NEMO_EMULATOR_FAIL_LOAD=1      every rank dies with an error half-way through loading
  NEMO_EMULATOR_READY_FILE=PATH  rank 0 writes time.time() at which it became able to generate
  NEMO_EMULATOR_NCCL_TIMEOUT=S   ranks != 0 give up waiting after S seconds (default 18000, as NeMo)
  NEMO_EMULATOR_BIND=ADDR        the address rank 0 asks ``MegatronServer.run`` for (default 0.0.0.0, as
                                 NeMo); benchmarks on a shared machine pass 127.0.0.1 so that nothing
                                 leaves loopback

Rank 0 serves through ``MegatronServer(model).run(url, port)`` imported from
``nemo.collections.nlp.modules.common.text_generation_server`` as the real script does: the sandbox
installs this same file as that module (with a ``.pth`` entry, as NeMo's editable install), so a
launcher that patches ``MegatronServer.run`` there patches what this script calls.

Tests use :func:`serve_in_thread` to run the HTTP part in-process on loopback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger("megatron_gpt_eval")

MAX_SENTENCES = 128
ENV_PREFIX = "NEMO_EMULATOR_"
DEFAULT_LOAD_DELAY = 2.0
DEFAULT_TOKEN_SECONDS = 0.0002
DEFAULT_NCCL_TIMEOUT = 18000.0  # NLPDDPStrategy(timeout=timedelta(seconds=18000)) in megatron_gpt_eval.py

# Keys text_generation_server.py knows; anything else is only logged.
API_ALLOWED_KEYS = frozenset(
    {
        "all_probs",
        "sentences",
        "task_ids",
        "tokens_to_generate",
        "temperature",
        "add_BOS",
        "greedy",
        "top_k",
        "top_p",
        "neighbors",
        "repetition_penalty",
        "min_tokens_to_generate",
        "end_strings",
        "compute_logprob",
        "random_seed",
    }
)

# Defaults of conf/megatron_gpt_inference.yaml for the keys the server path reads.
CONFIG_DEFAULTS: dict[str, Any] = {
    "gpt_model_file": None,
    "checkpoint_dir": None,
    "checkpoint_name": None,
    "hparams_file": None,
    "prompts": None,
    "tensor_model_parallel_size": -1,
    "pipeline_model_parallel_size": -1,
    "pipeline_model_parallel_split_rank": -1,
    "expert_model_parallel_size": 1,
    "megatron_amp_O2": False,
    "server": False,
    "port": 5555,
    "web_server": False,
    "web_port": 9889,
    "share": False,
    "username": "test",
    "password": "test2",
    "chat": False,
    "trainer.devices": 1,
    "trainer.num_nodes": 1,
    "trainer.accelerator": "gpu",
    "trainer.logger": False,
    "trainer.precision": 16,
    "trainer.use_distributed_sampler": False,
    "inference.greedy": False,
    "inference.top_k": 0,
    "inference.top_p": 0.9,
    "inference.temperature": 1.0,
    "inference.add_BOS": True,
    "inference.tokens_to_generate": 30,
    "inference.all_probs": False,
    "inference.repetition_penalty": 1.2,
    "inference.min_tokens_to_generate": 0,
    "inference.compute_logprob": False,
    "inference.end_strings": ["<|endoftext|>"],
}
INT_KEYS = frozenset(
    k for k, v in CONFIG_DEFAULTS.items() if isinstance(v, int) and not isinstance(v, bool)
) - {"trainer.precision"}

_VOCAB = (
    "the of and to in a is that for it as with was on be by this are from at or an which have not "
    "NVIDIA GPU model tensor data light silicon dream compute verse night star code fire mind song "
    "bright swift parallel golden thought memory river stone crown kernel wave dawn voice art"
).split()
EOD = "<|endoftext|>"
VOCAB_SIZE = 256000

NOT_FOUND_HTML = (
    "<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n"
    "<p>The requested URL was not found on the server. If you entered the URL manually please check "
    "your spelling and try again.</p>\n"
)
TASK_IDS_MESSAGE = (
    "Input at 'sentences' must by a tuple of two tensors like:"
    "                    (context_tokens_tensor, context_length_tensor) if task ids are given"
)


class ConfigError(Exception):
    """The command line or the checkpoint is unusable; the message reads like NeMo's."""


# --------------------------------------------------------------------------------------------------
# Faults and timing
# --------------------------------------------------------------------------------------------------


class Faults:
    """Timing and failure switches. Script mode reads them from NEMO_EMULATOR_* variables."""

    def __init__(
        self,
        *,
        token_seconds: float = DEFAULT_TOKEN_SECONDS,
        slow_seconds: float = 0.0,
        crash_after: int | None = None,
        hang_after: int | None = None,
        error_after: int | None = None,
        fail_load: bool = False,
        ready_file: str | None = None,
        nccl_timeout: float = DEFAULT_NCCL_TIMEOUT,
    ) -> None:
        self.token_seconds = token_seconds
        self.slow_seconds = slow_seconds
        self.crash_after = crash_after
        self.hang_after = hang_after
        self.error_after = error_after
        self.fail_load = fail_load
        self.ready_file = ready_file
        self.nccl_timeout = nccl_timeout

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str]) -> Faults:
        def num(name: str, default: float) -> float:
            raw = env.get(ENV_PREFIX + name, "").strip()
            if not raw:
                return default
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is not a number") from None

        def count(name: str) -> int | None:
            raw = env.get(ENV_PREFIX + name, "").strip()
            if not raw:
                return None
            if not raw.isdigit():
                raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} must be an integer >= 0")
            return int(raw)

        return cls(
            token_seconds=num("TOKEN_SECONDS", DEFAULT_TOKEN_SECONDS),
            slow_seconds=num("SLOW_SECONDS", 0.0),
            crash_after=count("CRASH_AFTER"),
            hang_after=count("HANG_AFTER"),
            error_after=count("ERROR_AFTER"),
            fail_load=env.get(ENV_PREFIX + "FAIL_LOAD", "").strip().lower() in {"1", "true", "yes", "on"},
            ready_file=env.get(ENV_PREFIX + "READY_FILE") or None,
            nccl_timeout=num("NCCL_TIMEOUT", DEFAULT_NCCL_TIMEOUT),
        )


# --------------------------------------------------------------------------------------------------
# Generation ("the model")
# --------------------------------------------------------------------------------------------------


def _word_stream(seed: bytes):
    """Endless deterministic words from a hash chain of ``seed``."""
    counter = 0
    while True:
        block = hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        for i in range(0, len(block), 2):
            yield _VOCAB[int.from_bytes(block[i : i + 2], "little") % len(_VOCAB)]
        counter += 1


def continuation(
    prompt: str,
    tokens_to_generate: int,
    *,
    min_tokens_to_generate: int = 0,
    end_strings: list[str] | None = None,
    salt: str = "",
) -> tuple[str, int]:
    """Deterministic continuation of ``prompt`` and the number of tokens (words) it generated.

    A token is one word with its leading space. Generation stops after ``tokens_to_generate``
    tokens, when the text ends with one of ``end_strings`` (once ``min_tokens_to_generate`` are
    out), or at a prompt-dependent natural end where the "model" emits ``<|endoftext|>``.
    """
    seed = (salt + "\x00" + prompt).encode()
    natural_end = 8 + hashlib.sha256(b"len" + seed).digest()[0] % 120
    ends = [e for e in (end_strings or [EOD]) if e]
    text = ""
    words = _word_stream(seed)
    generated = 0
    while generated < tokens_to_generate:
        if generated >= max(natural_end, min_tokens_to_generate):
            text += EOD
            generated += 1
            break
        text += " " + next(words)
        generated += 1
        if generated >= min_tokens_to_generate and any((prompt + text).endswith(e) for e in ends):
            break
    return text, generated


def _pieces(text: str) -> list[tuple[str, int]]:
    """SentencePiece-looking pieces (``▁word``) with their character offsets."""
    out = []
    for m in re.finditer(r"\s*(<\|endoftext\|>|\S+?(?=<\|endoftext\|>)|\S+)", text):
        piece = m.group(0)
        out.append(("▁" + piece.lstrip() if piece[:1].isspace() else piece, m.start()))
    return out


def _token_id(piece: str) -> int:
    if piece == EOD:
        return 3
    return 1000 + int.from_bytes(hashlib.sha1(piece.encode()).digest()[:4], "little") % (VOCAB_SIZE - 1000)


def _logprob(piece: str) -> float:
    return -round(
        0.05 + (int.from_bytes(hashlib.md5(piece.encode()).digest()[:2], "little") % 4000) / 1000, 4
    )


def generate_output(sentences: list[str], params: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """NeMo's ``generate()`` output dict for a validated request, and the tokens generated."""
    salt = ""
    if not params["greedy"]:
        seed = params["random_seed"]
        salt = f"seed={seed}" if seed is not None else f"rand={time.time_ns()}"
    out: dict[str, Any] = {"sentences": [], "tokens": [], "logprob": None, "full_logprob": None}
    out["token_ids"], out["offsets"] = [], []
    logprobs, full = [], []
    most = 0
    for prompt in sentences:
        text, n = continuation(
            prompt,
            params["tokens_to_generate"],
            min_tokens_to_generate=params["min_tokens_to_generate"],
            end_strings=params["end_strings"],
            salt=salt,
        )
        most = max(most, n)
        sentence = prompt + text
        pieces = _pieces(sentence)
        if params["add_BOS"]:
            pieces.insert(0, ("<s>", 0))
        out["sentences"].append(sentence)
        out["tokens"].append([p for p, _ in pieces])
        out["token_ids"].append([1 if p == "<s>" else _token_id(p) for p, _ in pieces])
        out["offsets"].append([o for _, o in pieces])
        logprobs.append([_logprob(p) for p, _ in pieces[1:]])
        full.append([[_logprob(p + str(k)) for k in range(4)] for p, _ in pieces[1:]])
    if params["compute_logprob"]:
        out["logprob"] = logprobs
    if params["all_probs"]:
        out["full_logprob"] = full
    else:
        del out["full_logprob"]
    return out, most


# --------------------------------------------------------------------------------------------------
# Request validation: text_generation_server.py MegatronGenerate.put(), same checks, same order
# --------------------------------------------------------------------------------------------------


class _Reply(Exception):
    """Short-circuit a request with ``(status, body)`` like a ``return "...", 400`` in the resource."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)  # NeMo uses type(...) == int/float: bools are rejected


def validate(data: Any) -> tuple[Any, dict[str, Any]]:
    """Return ``(sentences, params)`` or raise :class:`_Reply` (string bodies) / other errors (500)."""
    for key in data.keys():  # AttributeError (-> 500) when the JSON is not an object, as in NeMo
        if key not in API_ALLOWED_KEYS:
            log.error(f"The request key {key} is not allowed")
    sentences = data["sentences"]  # KeyError -> 500
    if len(sentences) > MAX_SENTENCES:
        raise _Reply(400, "Maximum number of sentences is 128")
    if "task_ids" in data:
        raise _Reply(200, TASK_IDS_MESSAGE)

    p: dict[str, Any] = {}
    p["tokens_to_generate"] = v = data.get("tokens_to_generate", 64)
    if not isinstance(v, int) or v < 1:
        raise _Reply(200, "tokens_to_generate must be an integer greater than 0")
    p["all_probs"] = v = data.get("all_probs", False)
    if not isinstance(v, bool):
        raise _Reply(200, "all_probs must be a boolean value")
    p["temperature"] = v = data.get("temperature", 1.0)
    if not _is_number(v) or not 0.0 < v <= 100.0:
        raise _Reply(200, "temperature must be a positive number less than or equal to 100.0")
    p["add_BOS"] = v = data.get("add_BOS", False)
    if not isinstance(v, bool):
        raise _Reply(200, "add_BOS must be a boolean value")
    p["greedy"] = v = data.get("greedy", False)
    if not isinstance(v, bool):
        raise _Reply(200, "greedy must be a boolean value")
    p["top_k"] = v = data.get("top_k", 0)
    if not _is_number(v) or not 0 <= v:
        raise _Reply(200, "top_k must be a positive integer number")
    p["top_p"] = v = data.get("top_p", 0.9)
    if not _is_number(v) or not 0.0 <= v <= 1.0:
        raise _Reply(200, "top_p must be a positive number less than or equal to 1.0")
    p["repetition_penalty"] = v = data.get("repetition_penalty", 1.2)
    if not _is_number(v) or not 1.0 <= v:
        raise _Reply(200, "repetition_penalty must be a positive number no less than 1.0")
    p["end_strings"] = v = data.get("end_strings", [EOD])
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _Reply(200, "expect end_strings to be a list of strings")
    p["min_tokens_to_generate"] = v = data.get("min_tokens_to_generate", 0)
    if not isinstance(v, int) or v < 0:
        raise _Reply(200, "min_tokens_to_generate must be an integer no less than 0")
    p["neighbors"] = v = data.get("neighbors")
    if "neighbors" in data and (not isinstance(v, int) or v < 0):
        raise _Reply(200, "num of neighbors must be an integer no less than 0")
    p["compute_logprob"] = v = data.get("compute_logprob", False)
    if not isinstance(v, bool):
        raise _Reply(200, "compute_logprob must be a boolean value")
    p["random_seed"] = v = data.get("random_seed")
    if v is not None and (not isinstance(v, int) or v < 0):
        raise _Reply(200, "random_seed must be a positive integer number or None")
    return sentences, p


# --------------------------------------------------------------------------------------------------
# Flask's routing of NeMo's app: Flask(__name__, static_url_path='') + flask-restful's /generate
# --------------------------------------------------------------------------------------------------


def _flask_rule_methods(view_methods: Any) -> set[str]:
    """A rule's method set, built by the same steps as Flask 3.0's ``add_url_rule`` and Werkzeug's
    ``Rule``: the same operations on the same strings iterate in the same order as in NeMo's process
    under the same ``PYTHONHASHSEED``, and that order shows in ``Allow`` and picks the 405 body."""
    methods = {item.upper() for item in view_methods}
    required_methods: set[str] = set()
    if "OPTIONS" not in methods:  # provide_automatic_options
        required_methods.add("OPTIONS")
    methods |= required_methods
    rule_methods = {x.upper() for x in methods}
    if "HEAD" not in rule_methods and "GET" in rule_methods:
        rule_methods.add("HEAD")
    return rule_methods


def _resource_methods() -> set[str]:
    methods: set[str] = set()  # flask MethodView.__init_subclass__ for MegatronGenerate (put only)
    methods.add("PUT")
    return methods


# Flask registers the static rule first (in Flask.__init__), then flask-restful adds /generate.
STATIC_METHODS = _flask_rule_methods(("GET",))  # '/<path:filename>', endpoint 'static'
GENERATE_METHODS = _flask_rule_methods(_resource_methods())  # '/generate', flask-restful's resource
_PATH_CONVERTER = re.compile(r"(?P<__werkzeug_0>[^/].*?)\Z")  # Werkzeug's <path:...> part

METHOD_NOT_ALLOWED_HTML = (
    "<!doctype html>\n<html lang=en>\n<title>405 Method Not Allowed</title>\n<h1>Method Not Allowed</h1>\n"
    "<p>The method is not allowed for the requested URL.</p>\n"
)
METHOD_NOT_ALLOWED = "The method is not allowed for the requested URL."
HTML = "text/html; charset=utf-8"


def flask_path(target: str) -> str:
    """The path Werkzeug routes for a request target (its dev server's PATH_INFO, then MapAdapter)."""
    url = urlsplit(target)
    path = f"/{url.netloc}{url.path}" if not url.scheme and url.netloc else url.path
    path = unquote(path)
    return f"/{path.lstrip('/')}" if path else ""


def route(path: str, method: str) -> tuple[str | None, list[str]]:
    """Werkzeug's match: ``("generate" | "static", [])`` for a rule taking ``method`` at ``path``,
    else ``(None, allowed)``: 405 with ``allowed`` in Werkzeug's order, or 404 when it is empty."""
    have_match_for: set[str] = set()
    # Werkzeug tries a second time with merged slashes. These two rules match the same paths either
    # way, but the second pass's updates can resize the set, and so reorder it.
    for _ in range(2):
        if path == "/generate":  # static transitions are tried before the <path:...> one
            if method in GENERATE_METHODS:
                return "generate", []
            have_match_for.update(GENERATE_METHODS)
        if path and _PATH_CONVERTER.match(path[1:]):
            if method in STATIC_METHODS:
                return "static", []
            have_match_for.update(STATIC_METHODS)
    return None, list(have_match_for)


# --------------------------------------------------------------------------------------------------
# The server (rank 0)
# --------------------------------------------------------------------------------------------------


def _utf8(text: str) -> bool:
    """Whether SentencePiece could take ``text`` (a lone surrogate from a JSON escape cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class EmulatorState:
    """What the "model" shares between request threads: the generation lock and the fault state."""

    def __init__(self, faults: Faults, on_crash: Callable[[], None]) -> None:
        self.faults = faults
        self.lock = threading.Lock()  # text_generation_server.py's global lock
        self.stop = threading.Event()  # set only by the in-process handle, to release hung threads
        self.generations = 0
        self.wedged = False
        self.on_crash = on_crash

    def _block_forever(self) -> None:
        while not self.stop.wait(0.5):
            pass

    def generate(self, sentences: Any, params: dict[str, Any]) -> dict[str, Any]:
        """Run one generation under the lock; may crash, hang or wedge as configured."""
        with self.lock:
            f = self.faults
            if self.wedged or (f.hang_after is not None and self.generations >= f.hang_after):
                log.warning("emulator: generation wedged (ranks stuck in a collective); not answering")
                self._block_forever()
                raise ConnectionAbortedError("emulator stopped while wedged")
            if f.crash_after is not None and self.generations >= f.crash_after:
                log.error(
                    "RuntimeError: CUDA error: an illegal memory access was encountered "
                    f"(emulator: NEMO_EMULATOR_CRASH_AFTER={f.crash_after} reached)"
                )
                self.on_crash()
                raise ConnectionAbortedError("emulator crashed")
            if f.error_after is not None and self.generations >= f.error_after:
                raise _Reply(
                    200, f"emulator: NEMO_EMULATOR_ERROR_AFTER={f.error_after} reached; request rejected"
                )
            if (
                not isinstance(sentences, list)
                or not sentences
                or not all(isinstance(s, str) and _utf8(s) for s in sentences)
            ):
                # Real NeMo raises inside generate() after rank 0 broadcast the request: the other
                # ranks stay in the collective, so every later request hangs.
                self.wedged = True
                raise TypeError(
                    "emulator: sentences must be a non-empty list of UTF-8 encodable str "
                    "(NeMo's tokenizer would raise here)"
                )
            start = time.perf_counter()
            output, n_tokens = generate_output(sentences, params)
            delay = f.slow_seconds + n_tokens * f.token_seconds
            if delay > 0 and self.stop.wait(delay):
                raise ConnectionAbortedError("emulator stopped during generation")
            self.generations += 1
            log.info(f"Chat server generation completed in {time.perf_counter() - start} seconds")
            return output


class _Handler(BaseHTTPRequestHandler):
    """Werkzeug's development server (``app.run(threaded=True)``) running NeMo's Flask app."""

    server_version = "Werkzeug/3.0.1"
    sys_version = "Python/3.10.12"
    protocol_version = "HTTP/1.1"  # Werkzeug's, for a threaded server
    server: _EmulatorServer

    def __getattr__(self, name: str) -> Any:
        # Werkzeug hands every method to the app: none gets http.server's 501.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status, HTTPStatus(status).phrase.upper())  # Werkzeug's status: "404 NOT FOUND"
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Connection", "close")  # Werkzeug closes every connection
        self.end_headers()
        if self.command != "HEAD":  # Werkzeug drops the body for REQUEST_METHOD == "HEAD" only
            self.wfile.write(body)

    def _send_html(self, status: int, html: str, allow: list[str] | None = None) -> None:
        """A Werkzeug HTTPException's own page (Flask's handler)."""
        body = html.encode()
        headers = [("Content-Type", HTML)]
        if allow is not None:
            headers.append(("Allow", ", ".join(allow)))
        self._send(status, body, [*headers, ("Content-Length", str(len(body)))])

    def _send_json(
        self, status: int, obj: Any, *, jsonify: bool = False, allow: list[str] | None = None
    ) -> None:
        if jsonify:  # Flask's jsonify: sorted keys, compact, trailing newline
            text = json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"
        else:  # flask-restful's output_json (a resource's return value, or its handle_error)
            text = json.dumps(obj) + "\n"
        body = text.encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if allow is not None:
            headers.append(("Allow", ", ".join(allow)))
        self._send(status, body, headers)

    def _read_body(self) -> bytes:
        """What Werkzeug's request stream holds: chunked, else Content-Length bytes, else nothing."""
        if self.headers.get("Transfer-Encoding", "").strip().lower() == "chunked":
            chunks = []
            while True:
                try:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                except ValueError:
                    break
                if size <= 0:
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        raw = (self.headers.get("Content-Length") or "").strip()
        length = int(raw) if re.fullmatch(r"-?[0-9]+", raw) else 0
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        if self.headers.get("Expect", "").lower().strip() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # Werkzeug's, after http.server's own
        method = self.command.upper()
        path = flask_path(self.path)
        endpoint, allowed = route(path, method)
        if endpoint is None and allowed:
            # flask-restful answers a 405 if the first allowed method routes to its resource.
            if route(path, allowed[0])[0] == "generate":
                self._send_json(405, {"message": METHOD_NOT_ALLOWED}, allow=allowed)
            else:
                self._send_html(405, METHOD_NOT_ALLOWED_HTML, allow=allowed)
        elif method == "OPTIONS" and endpoint is not None:  # Flask's automatic OPTIONS answer
            self._send_html(200, "", allow=route(path, "--")[1])
        elif endpoint == "generate":
            self._put()
        else:  # no rule, or the static rule: there is no static folder
            self._send_html(404, NOT_FOUND_HTML)

    def _put(self) -> None:
        log.info("request IP: " + str(self.client_address[0]))
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
            message = (
                "Did not attempt to load JSON data because the request Content-Type was not "
                "'application/json'."
            )
            self._send_json(415, {"message": message})
            return
        try:
            data = json.loads(self._read_body())
        except ValueError:
            message = "The browser (or proxy) sent a request that this server could not understand."
            self._send_json(400, {"message": message})
            return
        log.info(json.dumps(data))
        try:
            sentences, params = validate(data)
            output = self.server.state.generate(sentences, params)
        except _Reply as reply:
            self._send_json(reply.status, reply.body)
            return
        except ConnectionAbortedError:
            self.close_connection = True
            return
        except Exception:
            log.exception("Exception on /generate [PUT]")
            self._send_json(500, {"message": "Internal Server Error"})
            return
        self._send_json(200, output, jsonify=True)


class _EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a wedged handler thread must not block shutdown

    def __init__(self, address: tuple[str, int], state: EmulatorState, verbose: bool = True) -> None:
        self.state = state
        self.verbose = verbose
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn(), a reverse DNS lookup that can stall for
        # seconds on a cluster node with a bad resolver: skip it, readiness latency matters.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def _write_ready_file(path: str | None) -> None:
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{time.time():.6f}\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# In-process use (tests)
# --------------------------------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmulatorHandle:
    """A running in-process emulator. ``port`` is known at once, even while "loading"."""

    def __init__(self, host: str, port: int, faults: Faults, load_delay: float, verbose: bool) -> None:
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"
        self.generate_url = self.url + "/generate"
        self.ready = threading.Event()
        self.crashed = threading.Event()
        self.load_error: str | None = None
        self.state = EmulatorState(faults, self.crash)
        self._server: _EmulatorServer | None = None
        self._closed = threading.Event()
        self._verbose = verbose
        self._load_delay = load_delay

    @property
    def generations(self) -> int:
        return self.state.generations

    def _start(self) -> None:
        if self._load_delay > 0:
            threading.Thread(target=self._load_then_serve, daemon=True, name="emulator-load").start()
        else:
            self._bind_and_serve()

    def _load_then_serve(self) -> None:
        faults = self.state.faults
        if faults.fail_load:
            if not self._closed.wait(self._load_delay / 2):
                self.load_error = "emulator: NEMO_EMULATOR_FAIL_LOAD=1, load failed"
            return
        if not self._closed.wait(self._load_delay):
            self._bind_and_serve()

    def _bind_and_serve(self) -> None:
        self._server = _EmulatorServer((self.host, self.port), self.state, verbose=self._verbose)
        self.port = int(self._server.server_address[1])
        self.url = f"http://{self.host}:{self.port}"
        self.generate_url = self.url + "/generate"
        threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="emulator-http",
        ).start()
        _write_ready_file(self.state.faults.ready_file)
        self.ready.set()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        return self.ready.wait(timeout)

    def crash(self) -> None:
        """What the process dying looks like from outside: port closed, open connections reset."""
        self.crashed.set()
        threading.Thread(target=self.stop, daemon=True).start()

    def stop(self) -> None:
        self._closed.set()
        self.state.stop.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> EmulatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(
    port: int = 0,
    load_delay: float = 0.0,
    *,
    host: str = "127.0.0.1",
    verbose: bool = False,
    **faults: Any,
) -> EmulatorHandle:
    """Start the HTTP server in this process on ``host`` (loopback by default) and return a handle.

    ``faults`` are :class:`Faults` keywords (``token_seconds`` (default 0 here), ``slow_seconds``,
    ``crash_after``, ``hang_after``, ``error_after``, ``fail_load``, ``ready_file``); environment variables are NOT
    read here. A crash closes the port and resets open connections instead of exiting. With
    ``load_delay`` the port stays closed (connection refused) until the delay is over; a free port is
    picked up front when ``port`` is 0 so that the caller knows where to poll.
    """
    faults.setdefault("token_seconds", 0.0)
    f = Faults(**faults)
    if load_delay > 0 and port == 0:
        port = _free_port(host)
    handle = EmulatorHandle(host, port, f, load_delay, verbose)
    handle._start()
    return handle


# --------------------------------------------------------------------------------------------------
# Script mode: megatron_gpt_eval.py's command line and start-up
# --------------------------------------------------------------------------------------------------


def _parse_value(raw: str) -> Any:
    """A Hydra override value: bools, null, ints, floats, [lists], else the string."""
    low = raw.lower()
    if low in {"true", "false"}:
        return low == "true"
    if low in {"null", "~"}:
        return None
    if re.fullmatch(r"[+-]?\d+", raw):
        return int(raw)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", raw):
        return float(raw)
    if raw.startswith("[") and raw.endswith("]"):
        inner = raw[1:-1].strip()
        return [_parse_value(x.strip().strip("'\"")) for x in inner.split(",")] if inner else []
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Hydra-style ``key=value`` overrides over the inference config's defaults."""
    cfg = dict(CONFIG_DEFAULTS)
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(
                f"Error parsing override '{arg}'\nmissing EQUAL at '<EOF>'\n"
                "See https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details"
            )
        key, raw = arg.split("=", 1)
        appended = key.startswith("+")
        key = key.lstrip("+")
        value = _parse_value(raw)
        if key in INT_KEYS and not isinstance(value, int):
            raise ConfigError(
                f"Error merging override {arg}\nValue '{raw}' could not be converted to Integer\n"
                f"    full_key: {key}"
            )
        if key not in cfg and not appended:
            log.warning(f"emulator: ignoring unknown override '{arg}' (real Hydra would need +{key}=...)")
            continue
        cfg[key] = value
    return cfg


def read_model_config(path: str) -> dict[str, Any]:
    """The top-level ``key: scalar`` lines of ``<checkpoint dir>/model_config.yaml`` (no pyyaml)."""
    if not os.path.exists(path):
        raise ConfigError(f"FileNotFoundError: Can't find {path}")
    config_file = os.path.join(path, "model_config.yaml")
    if not os.path.isdir(path) or not os.path.isfile(config_file):
        raise ConfigError(f"FileNotFoundError: [Errno 2] No such file or directory: '{config_file}'")
    out: dict[str, Any] = {}
    with open(config_file, encoding="utf-8") as fh:
        for line in fh:
            m = re.match(r"^([A-Za-z_][\w.-]*):[ \t]*([^#\n]*?)[ \t]*(#.*)?$", line)
            if m and m.group(2) not in ("", "|", ">"):
                out[m.group(1)] = _parse_value(m.group(2))
    return out


def _check_divisible(model_cfg: dict[str, Any], tp: int, pp: int) -> None:
    checks = [
        ("num_attention_heads", tp, "tensor_model_parallel_size"),
        ("num_query_groups", tp, "tensor_model_parallel_size"),
        ("num_layers", pp, "pipeline_model_parallel_size"),
    ]
    for key, size, size_name in checks:
        value = model_cfg.get(key)
        if isinstance(value, int) and size > 0 and value % size:
            raise ConfigError(f"ValueError: {key} ({value}) must be a multiple of {size_name} ({size}).")


def check_config(cfg: dict[str, Any], env: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    """Every check the real script (and Lightning) makes before loading; returns the model config."""
    devices, nodes = cfg["trainer.devices"], cfg["trainer.num_nodes"]
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    if per_node and per_node.isdigit() and int(per_node) != devices:
        raise ConfigError(
            f"ValueError: You set `devices={devices}` in Lightning, but the number of tasks per node "
            f"configured in SLURM `--ntasks-per-node={per_node}` does not match. "
            f"HINT: Set `devices={per_node}`."
        )
    nnodes = env.get("SLURM_NNODES")
    if nnodes and nnodes.isdigit() and int(nnodes) != nodes:
        raise ConfigError(
            f"ValueError: You set `num_nodes={nodes}` in Lightning, but the number of nodes configured "
            f"in SLURM `--nodes={nnodes}` does not match. HINT: Set `num_nodes={nnodes}`."
        )
    model_file = cfg["gpt_model_file"]
    tp, pp = cfg["tensor_model_parallel_size"], cfg["pipeline_model_parallel_size"]
    model_cfg: dict[str, Any] = {}
    if model_file is not None and (tp < 0 or pp < 0 or cfg["pipeline_model_parallel_split_rank"] < 0):
        model_cfg = read_model_config(str(model_file))
        if not model_cfg.get("mcore_gpt", False):
            tp = model_cfg.get("tensor_model_parallel_size", 1)
            pp = model_cfg.get("pipeline_model_parallel_size", 1)
    ep = max(1, cfg.get("expert_model_parallel_size") or 1)
    if devices * nodes != tp * pp * ep:
        raise ConfigError(
            "AssertionError: devices * num_nodes should equal tensor_model_parallel_size * "
            f"pipeline_model_parallel_size (emulator: trainer.devices={devices} x trainer.num_nodes={nodes} "
            f"= {devices * nodes}, tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} "
            f"= {tp * pp})"
        )
    ntasks = env.get("SLURM_NTASKS")
    if ntasks and ntasks.isdigit() and int(ntasks) != devices * nodes:
        raise ConfigError(
            f"emulator: SLURM_NTASKS={ntasks} but trainer.devices x trainer.num_nodes = {devices * nodes}: "
            "the real job would hang in torch.distributed init until its timeout. Run one task per GPU "
            "(--ntasks-per-node = trainer.devices, --nodes = trainer.num_nodes)."
        )
    if not model_file:
        if cfg["checkpoint_dir"]:
            raise ConfigError(
                "emulator: checkpoint_dir= is not emulated; pass gpt_model_file=<checkpoint dir>"
            )
        raise ConfigError("ValueError: need at least a nemo file or checkpoint dir")
    model_cfg = read_model_config(str(model_file))
    _check_divisible(model_cfg, tp, pp)
    return model_cfg


def _global_rank(env: dict[str, str] | os._Environ[str]) -> int:
    for name in ("SLURM_PROCID", "RANK"):
        raw = env.get(name, "").strip()
        if raw.isdigit():
            return int(raw)
    return 0


def _setup_logging(rank: int) -> None:
    class _NeMoFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            record.levelletter = record.levelname[:1]
            return super().format(record)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _NeMoFormatter(
            f"[NeMo %(levelletter)s %(asctime)s megatron_gpt_eval:%(lineno)d rank{rank}] %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )
    )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _fail(message: str, argv: list[str]) -> int:
    print(f"Error executing job with overrides: {argv!r}", file=sys.stderr)
    print(message, file=sys.stderr)
    print("\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", file=sys.stderr)
    return 1


def _wait_as_peer(rank: int, nccl_timeout: float) -> int:
    """Ranks != 0: sit "in torch.distributed.broadcast" until a signal kills us (default handlers)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    log.info(f"rank {rank}: waiting for rank 0 in torch.distributed.broadcast")
    try:
        time.sleep(nccl_timeout)
    except KeyboardInterrupt:
        return 130
    log.error(
        f"[Rank {rank}] Watchdog caught collective operation timeout: WorkNCCL(OpType=BROADCAST, "
        f"Timeout(ms)={int(nccl_timeout * 1000)}) ran for longer than the timeout."
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ
    rank = _global_rank(env)
    _setup_logging(rank)
    log.warning("emulator: this is a STAND-IN for NeMo's megatron_gpt_eval.py; no model is loaded")
    try:
        faults = Faults.from_env(env)
        cfg = parse_overrides(argv)
        model_cfg = check_config(cfg, env)
        load_delay = float(env.get(ENV_PREFIX + "LOAD_DELAY", "") or DEFAULT_LOAD_DELAY)
    except ConfigError as exc:
        return _fail(str(exc), argv)
    except ValueError as exc:
        return _fail(f"emulator: {exc}", argv)

    model_file = cfg["gpt_model_file"]
    log.info(f"Loading distributed checkpoint from {model_file} ({len(model_cfg)} config keys)")
    if faults.fail_load:
        time.sleep(load_delay / 2)
        log.error(f"emulator: NEMO_EMULATOR_FAIL_LOAD=1: failed to load a shard of {model_file}")
        return _fail(
            "RuntimeError: emulator: simulated checkpoint load failure (NEMO_EMULATOR_FAIL_LOAD=1)", argv
        )
    time.sleep(load_delay)
    log.info(f"Loaded checkpoint from {model_file}")
    print("***************************")
    print({"sentences": ["(emulator warm-up)"], "tokens": [[]], "logprob": None})
    print("***************************", flush=True)

    if not cfg["server"]:
        return 0
    if rank != 0:
        return _wait_as_peer(rank, faults.nccl_timeout)
    return _serve(cfg, faults)


class MegatronServer:
    """Stand-in for ``nemo.collections.nlp.modules.common.text_generation_server.MegatronServer``: built
    from the model (here: the emulator's state), served by ``run(url, port=5000)`` as NeMo's is, so that
    whatever wraps or replaces ``run`` in NeMo (the deploy's ``nemo_launch.py`` binds it to loopback)
    does the same here. The sandbox installs this file a second time as that module (see
    ``sandbox/nemo.py``); ``_serve`` uses the class from there when ``nemo`` is importable."""

    def __init__(self, model: EmulatorState, inference_strategy: Any = None) -> None:
        self.model = model

    def run(self, url: str, port: int = 5000) -> int:
        try:
            server = _EmulatorServer((url, port), self.model, verbose=True)
        except OSError as exc:
            print(f"{exc.strerror or exc}", file=sys.stderr)
            print(
                f"Port {port} is in use by another program. Either identify and stop that program, "
                "or start the server with a different port.",
                file=sys.stderr,
            )
            return 1
        print(
            " * Serving Flask app 'nemo.collections.nlp.modules.common.text_generation_server'",
            file=sys.stderr,
        )
        print(" * Debug mode: off", file=sys.stderr)
        print(
            "WARNING: This is a development server. Do not use it in a production deployment. "
            "Use a production WSGI server instead.",
            file=sys.stderr,
        )
        if url == "0.0.0.0":
            print(" * Running on all addresses (0.0.0.0)", file=sys.stderr)
            print(f" * Running on http://127.0.0.1:{port}", file=sys.stderr)
        else:
            print(f" * Running on http://{url}:{port}", file=sys.stderr)
        print("Press CTRL+C to quit", file=sys.stderr, flush=True)
        _write_ready_file(self.model.faults.ready_file)
        try:
            server.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            return 130
        finally:
            server.server_close()
        return 0


def _server_class() -> type:
    """NeMo's module path when ``nemo`` is importable (the sandbox's nodes and image: this same file,
    installed as that module), else this file's own class (run straight from a checkout)."""
    try:
        from nemo.collections.nlp.modules.common.text_generation_server import (  # type: ignore[import-not-found]
            MegatronServer as server_class,
        )
    except ImportError:
        return MegatronServer
    return server_class


def _serve(cfg: dict[str, Any], faults: Faults) -> int:
    port = int(cfg["port"])
    bind = os.environ.get(ENV_PREFIX + "BIND", "").strip() or "0.0.0.0"

    def crash() -> None:
        sys.stderr.flush()
        os._exit(1)

    # As megatron_gpt_eval.py: server = MegatronServer(model.cuda()); server.run("0.0.0.0", port=cfg.port)
    server = _server_class()(EmulatorState(faults, crash))
    return int(server.run(bind, port=port) or 0)


if __name__ == "__main__":
    sys.exit(main())
