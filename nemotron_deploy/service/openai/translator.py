"""One OpenAI request, on the replica's front: checked, sent to NeMo as one ``PUT /generate``, and its
answer shaped as OpenAI's, with usage counted by the checkpoint's own tokenizer.

The front (``service/replica_front.py``) calls :meth:`Translator.reply` with the request's body and a
function that makes the one ``PUT /generate`` to NeMo on 127.0.0.1. That function raises
:class:`Unanswered` when NeMo refuses the connection or drops it: the front then closes the client's
connection without an answer, so that HAProxy sends the request to another replica, exactly as for
``PUT /generate`` (a request NeMo answered is never sent again).

The config (JSON, one of the job's files, rendered by the deploy: ``deploy/openai_config.py``)::

    {"model": "nemotron-4-340b-instruct", "context_length": 4096, "tokenizer": "/models/.../x.model",
     "max_prompts": 8, "logprobs_allowed": true, "chat_template": {...} or null, "chat_stop": [...]}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import protocol, shaping
from .errors import ApiError

ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}
# The answer's token counts for the endpoint's per-key metrics ("<prompt> <completion>"): HAProxy
# reads and removes it (the client never sees it).
USAGE_HEADER = "X-Nemotron-Usage"


class Unanswered(Exception):
    """NeMo did not answer (refused or dropped the connection): the request may go to another replica."""


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def load_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def nemo_answer(status: int, text: str) -> dict[str, Any]:
    """NeMo's answer (a JSON object with sentences), or ApiError in OpenAI's terms."""
    if status == 200:
        try:
            answer = json.loads(text)
        except ValueError:
            raise ApiError(
                502, "The model server's answer was not JSON", code="bad_upstream_answer"
            ) from None
        if isinstance(answer, dict) and "sentences" in answer:
            return answer
        # NeMo's way of refusing a request: HTTP 200 with a JSON string.
        raise ApiError(400, f"The model server refused the request: {_message(text)}", code="invalid_request")
    raise ApiError(
        502, f"The model server failed this request (HTTP {status}): {_message(text)}", code="upstream_error"
    )


def _message(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    return value if isinstance(value, str) else text.strip()[:500]


class Translator:
    """The deployment's limits and tokenizer; :meth:`reply` answers one request."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.limits = protocol.Limits(
            model=config["model"],
            context_length=int(config["context_length"]),
            max_prompts=int(config["max_prompts"]),
            logprobs_allowed=bool(config["logprobs_allowed"]),
            chat_template=config.get("chat_template"),
            chat_stop=tuple(config.get("chat_stop") or ()),
        )
        self.tokenizer_path = str(config["tokenizer"])
        self.tokenizer = None
        self.tokenizer_error = ""

    def load_tokenizer(self) -> bool:
        """Load the checkpoint's tokenizer (at the front's start); False, with the reason kept, if it
        can't be: the replica still serves ``PUT /generate``, and the OpenAI routes answer 503 naming it."""
        from .tokenizer import Tokenizer

        try:
            self.tokenizer = Tokenizer(self.tokenizer_path)
        except Exception as exc:  # OSError, ImportError (no sentencepiece), sentencepiece's own errors
            self.tokenizer_error = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def reply(self, route: str, raw: bytes, generate: Callable[[bytes], tuple[int, str]]) -> Reply:
        try:
            return self._reply(route, raw, generate)
        except ApiError as err:
            headers = [("Retry-After", "1")] if err.status in (429, 503) else []
            return Reply(err.status, err.body(), headers=headers)
        except Unanswered:
            raise
        except Exception as exc:  # a bug here: the client still gets OpenAI's shape, the log the cause
            print(f"replica front: {route}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return Reply(
                500, ApiError(500, "The replica's front failed on this request (see the job's log)").body()
            )

    def _reply(self, route: str, raw: bytes, generate: Callable[[bytes], tuple[int, str]]) -> Reply:
        if self.tokenizer is None:
            raise ApiError(
                503,
                f"This replica cannot load the model's tokenizer {self.tokenizer_path} ({self.tokenizer_error}): "
                "PUT /generate still works; see the job's log",
                code="tokenizer_unavailable",
            )
        build = protocol.chat if route == "chat.completions" else protocol.completion
        job = build(_json_body(raw), self.limits, self.tokenizer)
        status, text = generate(json.dumps(job.body).encode())
        answer = nemo_answer(status, text)
        body, usage = shaping.response(job, self.limits.model, answer, self.tokenizer)
        counts = [(USAGE_HEADER, f"{usage['prompt_tokens']} {usage['completion_tokens']}")]
        if job.stream:
            return Reply(
                200, shaping.sse(body), "text/event-stream", [("Cache-Control", "no-cache"), *counts]
            )
        return Reply(200, json.dumps(body).encode() + b"\n", headers=counts)


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(
            400, "The request body must be one JSON object in UTF-8", code="invalid_json"
        ) from None
