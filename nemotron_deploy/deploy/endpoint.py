"""The endpoint: HAProxy on the login node in front of every replica, and what it enforces.

`render.render_endpoint(cluster, replicas)` (`nemotron-deploy render --endpoint`) renders two files from `nemotron_deploy/deploy/templates/`:

* ``haproxy.cfg`` (HAProxy 2.6, Debian bookworm's package): one frontend on ``endpoint_port``, one
  backend ``replicas`` with ``server-template`` slots ``r1..rN`` that start disabled; the updater
  (:mod:`nemotron_deploy.service.endpoint_sync`) points them at the replicas' rank-0 nodes through the stats
  socket at run time, without a reload. Each slot takes one request at a time (``maxconn 1``: NeMo's
  server holds one global lock), is health-checked with a real one-token generation (NeMo has no
  health route, and answers 200 with a JSON *string* for errors), and a request whose connection to
  a replica fails or gets no answer is retried on another one.
* ``nemotron_envelope.lua``: refuses, with HTTP 400 and a message naming the limit and the setting,
  what the plan did not size the replicas for (more prompts than ``inference_batch``; log-probs when
  the plan's memory beyond weights + KV cache does not hold their measured peak), and what would
  wedge a replica (``sentences`` that is not a non-empty list of strings).

This module holds the numbers both files are derived from, so the templates, the tests and the
deploy agree. It imports nothing outside the standard library and the package's settings/planner.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from ..planner import Plan
from ..service.endpoint_sync import BACKEND, SLOT_PREFIX
from ..service.endpoint_sync import SOCKET as STATS_SOCKET  # noqa: F401  (render and the CLI use it)
from ..service.endpoint_sync import SPARE_PREFIX as SPARE_PREFIX  # re-exported for the template
from ..settings import ClusterSettings

# Where Debian's haproxy.service reads its configuration, and the runtime API socket it conventionally
# uses (Debian's default haproxy.cfg has the same path). The socket is mode 660, owner/group below:
# whoever runs the updater (the health timer's user) must be in that group.
CONFIG_DIR = "/etc/haproxy"
CONFIG_FILE = "haproxy.cfg"
LUA_FILE = "nemotron_envelope.lua"
# The API keys' hashes (HAProxy map: sha256 hex -> name), root:haproxy 0640.
KEYS_MAP_FILE = "nemotron_api_keys.map"
# TLS: the certificate (world-readable: clients verify against it) and, beside it, its key (HAProxy
# loads <certificate file>.key when the certificate file has no key: ssl-load-extra-files): root:haproxy 0640.
# endpoint_tls = self-signed makes both once; files links them to the operator's.
TLS_CERT_FILE = "nemotron-endpoint.crt"
TLS_KEY_FILE = TLS_CERT_FILE + ".key"
SELF_SIGNED_DAYS = 3650
# What a client at its limit of requests in flight is told to wait (seconds): one of its own requests
# ending frees a place.
RETRY_AFTER_SECONDS = 1
# A request answered a moment ago counts as in flight until HAProxy frees its stream: measured on
# loopback, about 1 in 20 back-to-back requests of one client at its limit met it (tests/local/
# test_endpoint_access.py). A request over the limit by the count is looked at again, every step,
# for this long before its 429.
INFLIGHT_GRACE_MS = 50
INFLIGHT_STEP_MS = 5
# No slot UP but some DOWN (not in maintenance): a replica that failed connections on traffic is
# checked again within a second (fastinter), one whose check failed every second (downinter). A
# request waits this long for one, looking every step, before its 503 "No replica is up".
REPLICA_WAIT_MS = 2000
REPLICA_STEP_MS = 20
# (STATS_SOCKET, with BACKEND, SLOT_PREFIX and the spare slot: from endpoint_sync, above.)
RUN_AS = "haproxy"  # user and group Debian's package creates
# Where an unassigned slot points: nothing listens on port 1, and the slot is in maintenance anyway.
PLACEHOLDER_ADDR = "127.0.0.1"
PLACEHOLDER_PORT = 1

# Measured on one H200 (shared docs, planner-measurements.md): asking for log-probs of every position
# of 8 x 4096 tokens peaks 12.65 GiB above weights + KV cache on one TP-8 rank, and the CUDA context
# takes about 0.67 GiB beyond what PyTorch reserves. The plan leaves runtime_reserve_gib + headroom_gib
# per GPU beyond weights + KV cache.
LOGPROB_PEAK_GIB = 12.7
CUDA_CONTEXT_GIB = 0.7
LOGPROB_NEED_GIB = LOGPROB_PEAK_GIB + CUDA_CONTEXT_GIB

# Margin over the longest generation for the health check (it may wait behind one) and for the
# server side of a request.
CHECK_MARGIN_SECONDS = 30
CONNECT_SECONDS = 5
# The whole request must sit in one buffer: the envelope reads it, and a retry re-sends it. A request
# holds at most inference_batch prompts of up to 4096 tokens; 8 bytes per token covers SentencePiece
# pieces (about 4 characters) with JSON escaping, plus room for the other keys.
BYTES_PER_TOKEN = 8
REQUEST_OVERHEAD_BYTES = 64 * 1024
MIN_BUFSIZE = 64 * 1024


def slot_names(replicas: int) -> list[str]:
    """The server-template slots for `replicas` replicas: r1..rN."""
    return [f"{SLOT_PREFIX}{i}" for i in range(1, replicas + 1)]


def logprob_capacity_gib(plan: Plan) -> float:
    """GPU memory per GPU the plan leaves beyond weights and KV cache (what a prefill may use)."""
    return round(plan.runtime_reserve_gib + plan.headroom_gib, 2)


def logprobs_allowed(plan: Plan) -> bool:
    return logprob_capacity_gib(plan) >= LOGPROB_NEED_GIB


def request_shapes(plan: Plan) -> dict:
    """What the plan's memory covers, as `plan` shows it and the endpoint enforces it."""
    return {
        "max_prompts": plan.batch,
        "max_tokens_per_prompt": plan.seq_length,
        "logprobs_allowed": logprobs_allowed(plan),
        "logprob_need_gib": round(LOGPROB_NEED_GIB, 2),
        "logprob_capacity_gib": logprob_capacity_gib(plan),
    }


def request_bufsize(settings: ClusterSettings, seq_length: int) -> int:
    """tune.bufsize: a power of two that holds the largest request the plan allows."""
    need = settings.inference_batch * seq_length * BYTES_PER_TOKEN + REQUEST_OVERHEAD_BYTES
    size = MIN_BUFSIZE
    while size < need:
        size *= 2
    return size


@dataclass(frozen=True)
class Limits:
    """Everything the two endpoint files are rendered from (besides the settings)."""

    replicas: int
    slots: list[str]
    backend: str
    max_sentences: int
    logprobs_allowed: bool
    logprob_capacity_gib: float
    logprob_need_gib: float
    bufsize: int
    check_timeout_s: int
    server_timeout_s: int
    client_timeout_s: int
    connect_timeout_s: int
    retries: int
    max_inflight_per_key: int


def limits(settings: ClusterSettings, plan: Plan, replicas: int) -> Limits:
    if replicas < 1:
        raise ValueError(f"the endpoint needs at least one replica slot, got {replicas}")
    check = settings.max_generation_seconds + CHECK_MARGIN_SECONDS
    return Limits(
        replicas=replicas,
        slots=slot_names(replicas),
        backend=BACKEND,
        max_sentences=settings.inference_batch,
        logprobs_allowed=logprobs_allowed(plan),
        logprob_capacity_gib=logprob_capacity_gib(plan),
        logprob_need_gib=LOGPROB_NEED_GIB,
        bufsize=request_bufsize(settings, plan.seq_length),
        check_timeout_s=check,
        server_timeout_s=check,
        # A client waits through the queue and then the generation without sending anything.
        client_timeout_s=settings.endpoint_queue_seconds + check,
        connect_timeout_s=CONNECT_SECONDS,
        # A dead replica can take two tries (an empty response, then a refused connection that marks
        # it down), then the request queues for the others: room for that and one more failure.
        retries=max(3, replicas + 1),
        max_inflight_per_key=max_inflight_per_key(settings, replicas),
    )


def max_inflight_per_key(settings: ClusterSettings, replicas: int) -> int:
    """endpoint_max_inflight_per_key, by default the replica count: one key may keep every replica busy
    but never queue behind them, so another key's request is first in line for the next free one."""
    return settings.endpoint_max_inflight_per_key or replicas


def access(cluster) -> dict:
    """Who may call the endpoint, as `plan` shows it."""
    s = cluster.settings
    return {
        "auth": s.endpoint_auth,
        "api_keys": [k.name for k in cluster.api_keys],
        "api_keys_file": s.endpoint_api_keys_file,
        "tls": s.endpoint_tls,
        "bind": list(s.endpoint_bind),
        "port": s.endpoint_port,
        "metrics_allow": list(s.endpoint_metrics_allow),
        "max_inflight_per_key": max_inflight_per_key(s, cluster.plan.replicas),
    }


def access_summary(cluster) -> str:
    a = access(cluster)
    s = cluster.settings
    if s.endpoint is False:
        return "no endpoint (endpoint = false)"
    scheme = "http" if a["tls"] == "none" else "https"
    where = f"{scheme} on {', '.join(a['bind'])} port {a['port']}"
    tls = {
        "none": "no TLS: keys and prompts cross the network in clear",
        "self-signed": f"TLS with a self-signed certificate made on the login node ({CONFIG_DIR}/{TLS_CERT_FILE})",
        "files": f"TLS with {s.endpoint_tls_cert}",
    }[a["tls"]]
    if a["auth"] == "none":
        return (
            f"OPEN to anyone who can reach it (endpoint_auth = none); {where}; {tls}; /metrics from "
            f"{', '.join(a['metrics_allow']) or 'nowhere'}"
        )
    names = ", ".join(a["api_keys"]) or "none yet: every request gets 401 until you add one"
    return (
        f"API keys only ({len(a['api_keys'])} in {a['api_keys_file']}: {names}); {where}; {tls}; at most "
        f"{a['max_inflight_per_key']} request(s) in flight per key; /metrics from "
        f"{', '.join(a['metrics_allow']) or 'nowhere'} or with a key"
    )


def self_signed_script(
    cert: str, key: str, *, names: list[str], addresses: list[str], user: str, group: str, days: int
) -> str:
    """POSIX sh that makes the endpoint's key pair where it runs (the key never leaves that host):
    the key `user`:`group` 0640 (HAProxy's group only), the certificate 0644, owned by whoever runs
    it (root, in the deploy), for clients to verify against. Names the certificate for the host's own names and addresses (hostname, hostname -f,
    hostname -I), localhost, and `names`/`addresses` (the inventory's name and address of the host).
    Each file lands by rename, the key first; the deploy runs it only while either file is missing."""
    q = shlex.quote
    extra_dns = " ".join(q(n) for n in names)
    extra_ip = " ".join(q(a) for a in addresses)
    return (
        "set -e; umask 077; d=$(mktemp -d); "
        "cn=$(hostname -f 2>/dev/null || hostname); "
        'san="DNS:localhost,IP:127.0.0.1"; '
        f'for n in $(hostname) $(hostname -f 2>/dev/null || true) {extra_dns}; do san="$san,DNS:$n"; done; '
        f'for a in $(hostname -I 2>/dev/null || true) {extra_ip}; do san="$san,IP:$a"; done; '
        f"if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days {int(days)} "
        '-subj "/CN=$cn" -addext "subjectAltName=$san" -keyout "$d/key" -out "$d/crt" 2>"$d/err"; then '
        'cat "$d/err" >&2; rm -rf "$d"; exit 1; fi; '
        f'install -o {q(user)} -g {q(group)} -m 640 "$d/key" {q(key + ".nemotron-new")}; '
        f"mv -f {q(key + '.nemotron-new')} {q(key)}; "
        f'install -m 644 "$d/crt" {q(cert + ".nemotron-new")}; '
        f"mv -f {q(cert + '.nemotron-new')} {q(cert)}; "
        'rm -rf "$d"'
    )
