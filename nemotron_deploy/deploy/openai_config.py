"""The endpoint's OpenAI API: its routes, and the config every replica's front translates with.

Where the translation runs, and why there: on each replica's front (``service/replica_front.py``,
``service/openai/``), which every request already passes. HAProxy answers ``GET /v1/models`` itself
and sends the two POST routes to the replicas' backend like ``PUT /generate`` (the same queue, one
request per replica, retries only of a request no replica answered), so the OpenAI API adds no hop.
A translator on the login node (tried first: HAProxy -> translator -> HAProxy's internal listener ->
replica) added two hops and measured +4 ms at p99 over ``PUT /generate``; its floor, a relay that only
forwarded, was +3.6 ms. Lua in HAProxy was not an option for the translation itself: 2.6's Lua has no
JSON library of its own, ``core.httpclient`` retries a failing request (four generations), and the
tokenizer (SentencePiece) is at hand only in Python, which NeMo's container has, with the tokenizer
file beside the checkpoint. HAProxy's Lua only counts: requests, tokens (the front's
``X-Nemotron-Usage`` header, removed there) and errors per API key name and route.
"""

from __future__ import annotations

import json
import posixpath
import re

from ..service.openai.translator import ROUTES as TRANSLATED

# Each route: its name (the per-key counters' `route` label) and its method. HAProxy answers the GET;
# the POSTs are the ones the replicas' fronts translate (their names are the translator's).
ROUTES = {"/v1/models": ("models", "GET"), **{path: (name, "POST") for path, name in TRANSLATED.items()}}
METRICS_PATH = "/metrics/openai"  # HAProxy's Lua counters, through the endpoint's /metrics rule
CONFIG_FILE = "nemotron_openai.json"  # one of the job's files, beside nemo_inference.sh


def enabled(cluster) -> bool:
    return bool(cluster.settings.endpoint_openai)


def tokenizer_path(cluster) -> str:
    """The checkpoint's tokenizer as the job's container sees it (model_dir is mounted at its path)."""
    s = cluster.settings
    if s.tokenizer_file:
        return str(s.tokenizer_file)
    name = s.model_spec.tokenizer_file or "tokenizer.model"
    return posixpath.join(str(s.model_dir), name)


def tokenizer_mount(cluster) -> str | None:
    """A read-only mount for a tokenizer_file outside model_dir (None: model_dir's mount holds it)."""
    path = tokenizer_path(cluster)
    if path.startswith(str(cluster.settings.model_dir).rstrip("/") + "/"):
        return None
    return f"{path}:{path}:ro"


def config(cluster, *, tokenizer: str | None = None) -> dict:
    """The replica front's translation config (see service/openai/translator.py)."""
    from . import endpoint

    s, plan = cluster.settings, cluster.plan
    spec = s.model_spec
    return {
        "model": spec.openai_id,
        "context_length": plan.seq_length,
        "tokenizer": tokenizer or tokenizer_path(cluster),
        "max_prompts": s.inference_batch,
        "logprobs_allowed": endpoint.logprobs_allowed(plan),
        "chat_template": dict(spec.chat_template) if spec.chat_template else None,
        "chat_stop": list(spec.chat_stop),
    }


def config_text(cluster, **kwargs) -> str:
    return json.dumps(config(cluster, **kwargs), indent=2, sort_keys=True) + "\n"


def models_body(cluster) -> str:
    """``GET /v1/models`` as HAProxy answers it: a log-format string (``created`` is the time asked)."""
    model = cluster.settings.model_spec.openai_id
    if not re.fullmatch(r"[A-Za-z0-9._:/-]+", model):  # it goes into HAProxy's config, single-quoted
        raise ValueError(f"the model's served name {model!r} may hold only letters, digits and ._:/-")
    entry = {
        "id": model,
        "object": "model",
        "created": "CREATED",
        "owned_by": "nvidia",
        "max_model_len": cluster.plan.seq_length,
    }
    text = json.dumps({"object": "list", "data": [entry]}, separators=(",", ":"))
    return text.replace('"CREATED"', "%[date]")
