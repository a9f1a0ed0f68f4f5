"""The endpoint's OpenAI-compatible front door, translated on each replica's front.

HAProxy (after the API key, TLS and per-key limits) answers ``GET /v1/models`` itself and sends
``POST /v1/completions`` and ``POST /v1/chat/completions`` to the replicas like ``PUT /generate``
(one request per replica, the same queue and retries); the replica's front
(``service/replica_front.py``) checks the request against what NeMo and the plan allow, makes exactly
one ``PUT /generate`` to NeMo on 127.0.0.1 and shapes NeMo's answer as OpenAI's, with usage counted by
the checkpoint's own SentencePiece tokenizer.

One module per concern: :mod:`.errors` (OpenAI's error shape), :mod:`.protocol` (request validation
and the NeMo body), :mod:`.chat` (the model's prompt template), :mod:`.shaping` (responses, SSE),
:mod:`.tokenizer`, :mod:`.translator` (one request, end to end, and its config).
Standard library only at import time; ``sentencepiece`` is imported where the tokenizer loads.
"""
