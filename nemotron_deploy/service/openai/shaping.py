"""NeMo's answer -> OpenAI's response (and its Server-Sent Events form).

NeMo's ``sentences[i]`` is the whole sequence: the prompt, the generation, and the end string it
stopped on. The text is what follows the prompt, cut at the first stop string (OpenAI leaves it out).
``finish_reason``: NeMo stops only at an end string (EOS among them) or after tokens_to_generate
tokens, so a generation that did not end on a stop string ran out of tokens: "length"; else "stop".
Usage is counted with the checkpoint's tokenizer: the prompt as sent, and the generation as NeMo
returned it (end string included, as it was generated).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from .errors import ApiError
from .protocol import Job

EOS_ID = 3  # Nemotron's <|endoftext|> id (also its padding of rows that ended early)


def _generated(job: Job, sentence: str, prompt: str, ids: list[int] | None, tokenizer) -> str:
    if sentence.startswith(prompt):
        return sentence[len(prompt) :]
    # NeMo decoded prompt + generation as one sequence, and the prompt's text did not survive the
    # round trip: decode the generated ids alone (the prompt's count by the same tokenizer).
    if ids is not None:
        gen = [i for i in ids[tokenizer.count(prompt) :]]
        while len(gen) > 1 and gen[-1] == EOS_ID and gen[-2] == EOS_ID:
            gen.pop()
        return tokenizer.decode(gen, "sentences")
    return sentence


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not hits:
        return text, False
    return text[: min(hits)], True


def choices(job: Job, answer: dict[str, Any], tokenizer) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One choice per sentence (index = prompt i * n + j), and usage."""
    sentences = answer.get("sentences")
    if not isinstance(sentences, list) or len(sentences) != len(job.prompts):
        raise ApiError(
            502, "The replica's answer had no sentences for this request", code="bad_upstream_answer"
        )
    token_ids = answer.get("token_ids") or [None] * len(sentences)
    logprob = answer.get("logprob")
    out, completion_tokens = [], 0
    for i, (prompt, sentence) in enumerate(zip(job.prompts, sentences, strict=True)):
        if not isinstance(sentence, str):
            raise ApiError(
                502, "The replica's answer had a sentence that is not text", code="bad_upstream_answer"
            )
        generated = _generated(job, sentence, prompt, token_ids[i], tokenizer)
        count = tokenizer.count(generated)
        completion_tokens += count
        text, stopped = _cut(generated, job.stops)
        finish = "stop" if stopped or count < job.max_tokens else "length"
        choice: dict[str, Any] = {"index": i, "finish_reason": finish}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = None
        else:
            choice["text"] = prompt + text if job.echo else text
            choice["logprobs"] = (
                _logprobs(job, answer, i, prompt, count) if job.logprobs is not None and logprob else None
            )
        out.append(choice)
    prompt_tokens = sum(job.prompt_tokens)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return out, usage


def _logprobs(job: Job, answer: dict[str, Any], i: int, prompt: str, count: int) -> dict[str, Any]:
    """OpenAI's completions logprobs from NeMo's: only the chosen token's log-prob exists
    (``logprob`` covers tokens 1..L-1), so top_logprobs is null."""
    tokens = [t.replace("\u2581", " ") for t in answer.get("tokens", [[]])[i]]
    lps = [None, *answer["logprob"][i]]
    offsets = list(answer.get("offsets", [[]])[i]) or [0] * len(tokens)
    if not job.echo:
        keep = max(0, min(count, len(tokens)))
        start = len(tokens) - keep
        tokens, lps = tokens[start:], lps[start:]
        offsets = [max(0, o - len(prompt)) for o in offsets[start:]]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}


def response(
    job: Job, model: str, answer: dict[str, Any], tokenizer
) -> tuple[dict[str, Any], dict[str, int]]:
    listed, usage = choices(job, answer, tokenizer)
    chat = job.kind == "chat"
    body = {
        "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": listed,
        "usage": usage,
    }
    if chat:
        body["system_fingerprint"] = None
    return body, usage


def sse(body: dict[str, Any]) -> bytes:
    """The whole answer as OpenAI's stream (NeMo 24.01 cannot stream): per choice one content chunk,
    then one final chunk with its finish_reason (usage on the last), then ``data: [DONE]``."""
    chat = body["object"] == "chat.completion"
    base = {"id": body["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": body["created"], "model": body["model"]}  # fmt: skip
    events: list[dict[str, Any]] = []
    for c in body["choices"]:
        if chat:
            delta = {"role": "assistant", "content": c["message"]["content"]}
            events.append(
                {
                    **base,
                    "choices": [
                        {"index": c["index"], "delta": delta, "logprobs": None, "finish_reason": None}
                    ],
                }
            )
        else:
            events.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": c["index"],
                            "text": c["text"],
                            "logprobs": c["logprobs"],
                            "finish_reason": None,
                        }
                    ],
                }
            )
    for k, c in enumerate(body["choices"]):
        last = k == len(body["choices"]) - 1
        end: dict[str, Any] = {"index": c["index"], "finish_reason": c["finish_reason"], "logprobs": None}
        end.update({"delta": {}} if chat else {"text": ""})
        event = {**base, "choices": [end]}
        if last:
            event["usage"] = body["usage"]
        events.append(event)
    lines = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    return b"".join(lines) + b"data: [DONE]\n\n"
