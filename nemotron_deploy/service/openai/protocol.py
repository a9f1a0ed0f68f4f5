"""OpenAI request -> one NeMo ``PUT /generate`` body, refusing (400, naming the field) what NeMo
1.22/1.23 can't honour or would answer with its 200-with-a-string error.

NeMo's own checks (text_generation_server.py): tokens_to_generate an int >= 1; 0 < temperature <= 100
(0 is greedy: sent as ``greedy: true`` with no temperature); 0 <= top_p <= 1; repetition_penalty >= 1
(always 1.0 here: OpenAI has no such knob); booleans real bools; random_seed an int >= 0; at most 128
sentences (the plan's inference_batch is lower). ``tests/unit/test_openai_protocol.py`` sends every
body this builds, at the edges, to NeMo's own Flask app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .chat import render
from .errors import ApiError, invalid

EOD = "<|endoftext|>"
DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for completions
MAX_LOGPROBS = 5  # OpenAI's limit for completions' logprobs
NEMO_MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class Limits:
    """What this deployment allows: the model, its context, the plan's envelope."""

    model: str
    context_length: int
    max_prompts: int  # inference_batch: NeMo sentences per request
    logprobs_allowed: bool
    chat_template: dict[str, str] | None = None
    chat_stop: tuple[str, ...] = ()


@dataclass
class Job:
    """One request, translated: the NeMo body and what shaping the answer needs."""

    kind: str  # "completion" or "chat"
    prompts: list[str]  # one per NeMo sentence (each prompt repeated n times)
    body: dict[str, Any]
    max_tokens: int
    stops: list[str]  # cut the text at the first of these (OpenAI leaves the stop string out)
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    stream: bool = False
    prompt_tokens: list[int] = field(default_factory=list)  # per sentence


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _optional(data: dict, key: str, default: Any) -> Any:
    v = data.get(key)
    return default if v is None else v


def _check_model(data: dict, limits: Limits) -> None:
    model = data.get("model")
    if not isinstance(model, str):
        raise invalid("model", f"model is required: this endpoint serves {limits.model!r}")
    if model != limits.model:
        raise ApiError(
            404,
            f"The model {model!r} does not exist here: this endpoint serves {limits.model!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _unsupported(data: dict) -> None:
    """Fields NeMo 24.01 can't honour: refused unless they are their no-op value."""
    for key in ("presence_penalty", "frequency_penalty"):
        v = data.get(key)
        if v is not None and (not _is_number(v) or v != 0):
            raise invalid(key, f"{key} is not supported by NeMo's server here: send 0 or leave it out")
    bias = data.get("logit_bias")
    if bias is not None and bias != {}:
        raise invalid(
            "logit_bias", "logit_bias is not supported by NeMo's server here: send {} or leave it out"
        )
    best_of = data.get("best_of")
    if best_of is not None and best_of != 1:
        raise invalid(
            "best_of", "best_of > 1 is not supported: NeMo's server returns one sequence per prompt"
        )
    if data.get("suffix") not in (None, ""):
        raise invalid("suffix", "suffix is not supported: NeMo's server only continues a prompt")
    for key in ("tools", "functions", "response_format"):
        if data.get(key) not in (None, [], {"type": "text"}):
            raise invalid(key, f"{key} is not supported by this endpoint")


def _sampling(data: dict, limits: Limits, body: dict[str, Any]) -> None:
    temperature = _optional(data, "temperature", 1.0)
    if not _is_number(temperature) or not 0 <= temperature <= NEMO_MAX_TEMPERATURE:
        raise invalid(
            "temperature", f"temperature must be a number from 0 to {NEMO_MAX_TEMPERATURE:g} (0: greedy)"
        )
    top_p = _optional(data, "top_p", 1.0)
    if not _is_number(top_p) or not 0 <= top_p <= 1:
        raise invalid("top_p", "top_p must be a number from 0 to 1")
    body["greedy"] = temperature == 0
    if temperature != 0:
        body["temperature"] = float(temperature)
    body["top_p"] = float(top_p)
    body["top_k"] = 0
    body["repetition_penalty"] = 1.0
    body["add_BOS"] = False
    body["all_probs"] = False
    seed = data.get("seed")
    if seed is not None:
        if not _is_int(seed) or seed < 0:
            raise invalid("seed", "seed must be an integer >= 0 (NeMo's random_seed)")
        body["random_seed"] = seed


def _stops(data: dict, extra: tuple[str, ...]) -> list[str]:
    stop = data.get("stop")
    if stop is None:
        given: list[str] = []
    elif isinstance(stop, str):
        given = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        given = list(stop)
    else:
        raise invalid("stop", "stop must be a string or a list of strings")
    ends = [EOD, *extra, *(s for s in given if s)]
    return list(dict.fromkeys(ends))


def _count(data: dict, key: str, default: int, low: int) -> int:
    v = _optional(data, key, default)
    if not _is_int(v) or v < low:
        raise invalid(key, f"{key} must be an integer >= {low}")
    return v


def _common(data: Any, limits: Limits) -> tuple[dict, dict[str, Any], int, bool]:
    if not isinstance(data, dict):
        raise invalid(None, "The request body must be a JSON object")
    _check_model(data, limits)
    _unsupported(data)
    body: dict[str, Any] = {}
    _sampling(data, limits, body)
    n = _count(data, "n", 1, 1)
    stream = _optional(data, "stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", "stream must be true or false")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "user must be a string")
    return data, body, n, stream


def _finish(job: Job, limits: Limits, tokenizer) -> Job:
    """Counts, the envelope and the context, then the body's sentences."""
    total = len(job.prompts)
    if total > limits.max_prompts:
        raise invalid(
            "n" if job.n > 1 else "prompt",
            f"This endpoint takes at most {limits.max_prompts} prompts x n per request (the plan sized each "
            f"replica for inference_batch = {limits.max_prompts}); this request makes {total}. Split it.",
        )
    job.prompt_tokens = [tokenizer.count(p) for p in job.prompts]
    longest = max(job.prompt_tokens)
    if longest + job.max_tokens > limits.context_length:
        raise invalid(
            "max_tokens",
            f"This model's context is {limits.context_length} tokens: the prompt has {longest} and max_tokens "
            f"asks for {job.max_tokens} more. Shorten the prompt or lower max_tokens.",
            code="context_length_exceeded",
        )
    if job.body.get("compute_logprob") and not limits.logprobs_allowed:
        raise invalid(
            "logprobs",
            "Log-probs are refused here: the plan leaves too little GPU memory for them (see nemotron-deploy "
            "plan; raise runtime_reserve_gib in the inventory).",
        )
    job.body["sentences"] = job.prompts
    job.body["tokens_to_generate"] = job.max_tokens
    return job


def completion(data: Any, limits: Limits, tokenizer) -> Job:
    """``POST /v1/completions``."""
    data, body, n, stream = _common(data, limits)
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [tokenizer.decode(prompt, "prompt")]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
        prompts = [tokenizer.decode(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    else:
        raise invalid(
            "prompt", "prompt must be a string, a list of strings, or token ids (a list of ints, or of lists)"
        )
    max_tokens = _count(data, "max_tokens", DEFAULT_MAX_TOKENS, 1)
    echo = _optional(data, "echo", False)
    if not isinstance(echo, bool):
        raise invalid("echo", "echo must be true or false")
    logprobs = data.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise invalid("logprobs", f"logprobs must be an integer from 0 to {MAX_LOGPROBS}")
    body["compute_logprob"] = logprobs is not None
    body["end_strings"] = stops = _stops(data, ())
    job = Job(
        "completion",
        [p for p in prompts for _ in range(n)],
        body,
        max_tokens,
        stops,
        n,
        echo,
        logprobs,
        stream,
    )
    return _finish(job, limits, tokenizer)


def chat(data: Any, limits: Limits, tokenizer) -> Job:
    """``POST /v1/chat/completions``: only for a model whose catalog entry has a chat template."""
    data, body, n, stream = _common(data, limits)
    if limits.chat_template is None:
        raise invalid(
            "model",
            f"{limits.model} is a base model with no chat template: use /v1/completions, or deploy "
            'nemotron-4-340b-instruct (model = "nemotron-4-340b-instruct" in the inventory)',
            code="no_chat_template",
        )
    prompt = render(limits.chat_template, data.get("messages"))
    key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _count(data, key, 0, 1) if data.get(key) is not None else None
    if data.get("logprobs") not in (None, False):
        raise invalid("logprobs", "logprobs are not supported on chat completions here: use /v1/completions")
    body["compute_logprob"] = False
    body["end_strings"] = stops = _stops(data, limits.chat_stop)
    if max_tokens is None:  # OpenAI's default: what the context leaves
        max_tokens = max(1, limits.context_length - tokenizer.count(prompt))
    job = Job("chat", [prompt] * n, body, max_tokens, stops, n, False, None, stream)
    return _finish(job, limits, tokenizer)
