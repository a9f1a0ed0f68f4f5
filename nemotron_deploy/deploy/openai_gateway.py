"""The OpenAI gateway on the login node: where it lives, who runs it, and its config.

Why a separate small service (and not Lua in HAProxy): HAProxy 2.6's Lua has no JSON library of its own
and its ``core.httpclient`` retries a failed request (4 identical PUTs were measured against a failing
backend: for NeMo, four generations), and 4 s is its default service timeout; the translation needs
the checkpoint's SentencePiece tokenizer, which only Python has at hand. So: a stdlib HTTP server
(``service/openai/``) run by systemd as an unprivileged user, restarted on failure, health-checked by
HAProxy, reachable only by HAProxy through Unix sockets in both directions:

* HAProxy -> gateway: ``SOCKET`` in ``SOCKET_DIR`` (the gateway user's, group haproxy, 2750: the
  socket inherits group haproxy);
* gateway -> HAProxy: ``INTERNAL_SOCKET`` (same directory), an internal frontend (0660, the gateway's group)
  into the replicas' backend (one request per replica, the queue, the envelope), never retried by
  the gateway.

No other account on the login node can reach either socket, so no one can skip the API keys.
"""

from __future__ import annotations

import json
import posixpath
import shlex

USER = "nemotron-gateway"  # its own account and group; HAProxy's group reads its socket directory
UNIT = "nemotron-gateway"
STATE_DIR = "/var/lib/nemotron-gateway"
SOCKET_DIR = f"{STATE_DIR}/run"
SOCKET = f"{SOCKET_DIR}/gateway.sock"
# HAProxy binds it as root, before dropping privileges, in the gateway's directory (setgid haproxy),
# owned haproxy, group nemotron-gateway, 0660: only the gateway connects.
INTERNAL_SOCKET = f"{SOCKET_DIR}/internal.sock"
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


# The GECOS field of the account the deploy creates (a later deploy tells it from someone else's).
USER_MARK = "nemotron-deploy openai gateway"
SYSTEMD_UNIT = f"/etc/systemd/system/{UNIT}.service"
INIT_SCRIPT = f"/etc/init.d/{UNIT}"
PIDFILE = f"/run/{UNIT}.pid"


def command(venv: str, config: str = f"{CONFIG_DIR}/{CONFIG_FILE}") -> list[str]:
    return [f"{venv}/bin/python", "-m", "nemotron_deploy.service.openai.gateway", "--config", config]


def systemd_unit(venv: str) -> str:
    exec_start = " ".join(shlex.quote(a) for a in command(venv))
    return f"""# Installed by nemotron-deploy: the endpoint's OpenAI-compatible gateway (HAProxy routes /v1/* here).
[Unit]
Description=Nemotron OpenAI-compatible gateway (nemotron-deploy)
After=network.target

[Service]
User={USER}
Group={USER}
ExecStart={exec_start}
Restart=always
RestartSec=1
UMask=0117
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={SOCKET_DIR}

[Install]
WantedBy=multi-user.target
"""


def init_script(
    venv: str, *, user: str | None = USER, pidfile: str = PIDFILE, config: str = f"{CONFIG_DIR}/{CONFIG_FILE}"
) -> str:
    """Where systemd does not run: start-stop-daemon runs a loop, as the gateway's user, that restarts
    the gateway 1 s after it exits (systemd's Restart=always); stop ends the loop's process group
    (the loop and the gateway: tests/local/test_openai_live.py runs it)."""
    chuid = f"--chuid {user}:{user} " if user else ""  # None: as whoever runs it (tests as a user)
    loop = "while :; do " + " ".join(shlex.quote(a) for a in command(venv, config)) + "; sleep 1; done"
    return f"""#!/bin/sh
### BEGIN INIT INFO
# Provides:          {UNIT}
# Required-Start:    $network $remote_fs
# Required-Stop:     $network $remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Nemotron OpenAI-compatible gateway (nemotron-deploy)
### END INIT INFO
# Installed by nemotron-deploy.
PIDFILE={shlex.quote(pidfile)}
running() {{ [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }}
case "$1" in
  start)
    running && exit 0
    umask 0117
    start-stop-daemon --start --quiet --background --make-pidfile --pidfile "$PIDFILE" \
      {chuid}--startas /bin/sh -- -c {shlex.quote(loop)}
    ;;
  stop)
    # start-stop-daemon's --background made a new session before its last fork: the loop's process
    # group is its session's, read from /proc (fields after the command name: state ppid pgrp).
    if running; then
      pgrp=$(sed 's/.*) //' "/proc/$(cat "$PIDFILE")/stat" | cut -d' ' -f3)
      kill -TERM "-$pgrp" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    ;;
  restart|force-reload)
    "$0" stop; sleep 0.2; "$0" start
    ;;
  status)
    if running; then echo "{UNIT} is running"; else echo "{UNIT} is not running"; exit 3; fi
    ;;
  *)
    echo "Usage: $0 {{start|stop|restart|status}}" >&2; exit 2
    ;;
esac
"""
