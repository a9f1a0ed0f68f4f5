"""Command-line pieces the check's option groups share (health.py's own, fleet.add_arguments,
replacement.add_arguments): argument types and the usage error.

Runs on the cluster (login nodes, and inside the job's container): standard library only.
"""

from __future__ import annotations

import argparse
import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class UsageError(Exception):
    """Bad arguments: UNKNOWN (3), with a message that says what to pass instead."""


def positive(kind: type) -> Any:
    def conv(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    return conv


def parse_duration(text: str) -> float:
    """``2700``, ``45m``, ``1h30m``, ``90s``, ``0.5`` -> seconds."""
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return float(raw)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", raw)
    if not parts or "".join(n + u for n, u in parts) != raw:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use seconds or e.g. 45m, 1h30m, 90s")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
