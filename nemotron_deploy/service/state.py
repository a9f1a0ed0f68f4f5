"""The check's state across runs: a small JSON file per target (or one for every replica) that keeps
the consecutive busy probes (busy escalates from WARNING to CRITICAL) and the last success.

Runs on the cluster (login nodes, and inside the job's container): standard library only.
"""

from __future__ import annotations

import json
import os
import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def default_state_file(target_key: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", target_key).strip("_") or "default"
    return os.path.join(base, "nemotron-deploy", f"health-{slug}.json")


def load_state(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(path: str | None, state: dict[str, Any]) -> str | None:
    """Write the state atomically; returns an error message instead of failing the check."""
    if not path:
        return None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(tmp, path)
    except OSError as exc:
        return f"cannot write state file {path}: {exc.strerror or exc}"
    return None
