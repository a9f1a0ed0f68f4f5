"""Prometheus alert rules for a deployment, shipped as package data: `nemotron.rules.yml` beside this file.

The deploy installs them on the login node when `prometheus_rules_dir` is set (desired.for_host), with
the health-check staleness threshold scaled to `health_interval_seconds` (:func:`rules`). They are
linted and unit-tested with promtool (tests/local/test_alert_rules.py, tests/prometheus/).
"""

from __future__ import annotations

import re
from importlib.resources import files

from .. import metrics

RULES_NAME = "nemotron.rules.yml"

METRICS: dict[str, str] = {m.name: m.help for m in (*metrics.CONTRACT, *metrics.NODE_EXPORTER)}
"""Every metric the alert rules may use, with its HELP text: the metrics contract (metrics.CONTRACT,
what the scheduled health check writes to node_exporter's textfile directory; node_exporter adds
`instance` and `job`) and node_exporter's own about that file. tests/local/test_alert_rules.py fails
when a rule names a metric not listed here, so a metric renamed on one side breaks the tests instead
of silencing an alert."""

DEFAULT_HEALTH_INTERVAL_SECONDS = 60
STALE_AFTER_CHECKS = 5  # the textfile is stale when not rewritten for 5 check intervals (300 s at 60 s)
_STALE_EXPR = 'time() - node_textfile_mtime_seconds{file=~"(.*/)?nemotron\\\\.prom"} > '
_STALE_THRESHOLD = re.compile(re.escape(_STALE_EXPR) + r"(\d+)$", re.M)


def default_rules() -> str:
    """The rules file as shipped (for the default 60 s health interval)."""
    return files(__package__).joinpath(RULES_NAME).read_text(encoding="utf-8")


def stale_after_seconds(health_interval_seconds: int) -> int:
    return STALE_AFTER_CHECKS * health_interval_seconds


def rules(health_interval_seconds: int = DEFAULT_HEALTH_INTERVAL_SECONDS) -> str:
    """The rules file for a deployment whose check runs every `health_interval_seconds`: the same as
    shipped but for NemotronHealthCheckStale's threshold, 5 intervals (300 s at the 60 s default)."""
    text = default_rules()
    default = str(stale_after_seconds(DEFAULT_HEALTH_INTERVAL_SECONDS))
    if _STALE_THRESHOLD.findall(text) != [default]:
        raise RuntimeError(
            f"{RULES_NAME}: expected NemotronHealthCheckStale's `{_STALE_EXPR}{default}` exactly once"
        )
    threshold = _STALE_EXPR + str(stale_after_seconds(health_interval_seconds))
    return _STALE_THRESHOLD.sub(lambda _: threshold, text)
