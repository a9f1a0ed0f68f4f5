"""The OpenAI gateway on the login node: where it lives, who runs it, and its config.

Why a separate small service (and not Lua in HAProxy): HAProxy 2.6's Lua has no JSON library of its own
and its ``core.httpclient`` retries a failed request (4 identical PUTs were measured against a failing
backend: for NeMo, four generations), and 4 s is its default service timeout; the translation needs
the checkpoint's SentencePiece tokenizer, which only Python has at hand. So: a stdlib HTTP server
(``service/openai/``) run by systemd as an unprivileged user, restarted on failure, health-checked by
HAProxy, reachable only by HAProxy through Unix sockets in both directions:

* HAProxy -> gateway: ``SOCKET`` in ``SOCKET_DIR`` (the gateway user's, group haproxy, 0750);
* gateway -> HAProxy: ``INTERNAL_SOCKET``, an internal frontend (mode 0660, group of the gateway user)
  into the replicas' backend (one request per replica, the queue, the envelope), never retried by
  the gateway.

No other account on the login node can reach either socket, so no one can skip the API keys.
"""

from __future__ import annotations

import json
import posixpath

USER = "nemotron-gateway"  # its own account and group; HAProxy's group reads its socket directory
UNIT = "nemotron-gateway"
STATE_DIR = "/var/lib/nemotron-gateway"
SOCKET_DIR = f"{STATE_DIR}/run"
SOCKET = f"{SOCKET_DIR}/gateway.sock"
INTERNAL_SOCKET = "/run/haproxy/nemotron-internal.sock"
CONFIG_DIR = "/etc/nemotron-gateway"
CONFIG_FILE = "gateway.json"
BACKEND = "nemotron_gateway"
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")
METRICS_PATH = "/metrics/openai"  # the gateway's counters, through the endpoint's /metrics rule


def enabled(cluster) -> bool:
    return bool(cluster.settings.endpoint_openai)


def tokenizer_path(cluster) -> str:
    s = cluster.settings
    if s.tokenizer_file:
        return str(s.tokenizer_file)
    name = s.model_spec.tokenizer_file or "tokenizer.model"
    return posixpath.join(str(s.model_dir), name)


def config(
    cluster,
    *,
    listen: str = f"unix:{SOCKET}",
    upstream: str = f"unix:{INTERNAL_SOCKET}",
    tokenizer: str | None = None,
    timeout_seconds: int,
) -> dict:
    """The gateway's JSON config for this inventory (see service/openai/gateway.py)."""
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
        "listen": listen,
        "upstream": upstream,
        "timeout_seconds": timeout_seconds,
    }


def config_text(cluster, **kwargs) -> str:
    return json.dumps(config(cluster, **kwargs), indent=2, sort_keys=True) + "\n"
