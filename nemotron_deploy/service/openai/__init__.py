"""The endpoint's OpenAI-compatible front door: a small stdlib translator on the login node.

HAProxy (after the API key, TLS and per-key limits) sends ``GET /v1/models``, ``POST /v1/completions``
and ``POST /v1/chat/completions`` to this gateway over a Unix socket; the gateway checks the request
against what NeMo and the plan allow, makes exactly one ``PUT /generate`` to HAProxy's internal
listener (one request per replica, no retry that re-runs a generation) and shapes NeMo's answer as
OpenAI's, with usage counted by the checkpoint's own SentencePiece tokenizer.

One module per concern: :mod:`.errors` (OpenAI's error shape), :mod:`.protocol` (request validation
and the NeMo body), :mod:`.chat` (the model's prompt template), :mod:`.shaping` (responses, SSE),
:mod:`.tokenizer`, :mod:`.upstream` (the one PUT), :mod:`.gateway` (the HTTP server, its config).
Standard library only at import time; ``sentencepiece`` is imported where the tokenizer loads.
"""
