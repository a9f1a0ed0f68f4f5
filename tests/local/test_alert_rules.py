"""The shipped Prometheus alert rules: promtool accepts them and their unit tests pass, every alert is
complete (for, severity, what broke and what to do), every metric they use is a documented one, and
the deploy installs them on the login node when `prometheus_rules_dir` is set.

promtool comes from Debian's `prometheus` package, which scripts/setup installs: without it these
tests fail (never skip) and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import INVENTORIES, REPO

from nemotron_deploy import inventory
from nemotron_deploy.deploy import desired
from nemotron_deploy.deploy.operations import health_timer
from nemotron_deploy.service import alerts

RULES = REPO / "nemotron_deploy" / "service" / "alerts" / alerts.RULES_NAME
RULE_TESTS = REPO / "tests" / "prometheus" / "nemotron.rules.test.yml"
ALERTS = {
    "NemotronReplicaDown": "warning",
    "NemotronAllReplicasDown": "critical",
    "NemotronEndpointQueueSaturated": "warning",
    "NemotronReplicaRestartsCapped": "critical",
    "NemotronHealthCheckStale": "critical",
    "NemotronReplicaStale": "warning",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: run scripts/setup (it installs Debian's `prometheus` package, which "
            "provides promtool; its Prometheus server stays disabled)",
            pytrace=False,
        )
    return path


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_promtool_check_rules(promtool):
    result = run_promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool):
    # Run from the test file's directory: its rule_files path is relative to it.
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _rules() -> list[dict]:
    (group,) = yaml.safe_load(RULES.read_text())["groups"]
    assert group["name"] == "nemotron"
    return group["rules"]


def test_every_alert_is_there_and_complete():
    rules = _rules()
    assert {r["alert"]: r["labels"]["severity"] for r in rules} == ALERTS
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name} has no for:"
        assert set(rule["annotations"]) == {"summary", "description"}, name
        description = rule["annotations"]["description"]
        # What to do: at least one command the on-call engineer can run, in backticks.
        assert re.search(r"`(nemotron-deploy|pyinfra|squeue|systemctl|journalctl) [^`]+`", description), name


def test_the_commands_the_runbook_names_are_in_the_rules():
    text = RULES.read_text()
    for command in (
        "nemotron-deploy health --slurm-job {{ $labels.deployment }} --replicas N",
        "squeue --name {{ $labels.deployment }}-{{ $labels.replica }}",
        "journalctl -u nemotron-health",
        health_timer.metrics_path(),
        "--data rollout=true",
    ):
        assert command in text, command


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    firing, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == set(ALERTS) and quiet == set(ALERTS), (firing, quiet)


# --- metric names ----------------------------------------------------------------------------------

PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or strings)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|`[^`]*`', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1) not in PROMQL_WORDS:  # followed by ( : a function
            names.add(m.group(1))
    return names


def template_queries(text: str) -> list[str]:
    """The PromQL of `printf "..." ... | query` calls in an annotation template."""
    found = re.findall(r'printf (?:`([^`]*)`|"((?:[^"\\]|\\.)*)")', text)
    return [(raw or quoted).replace("%q", '""').replace("%s", "") for raw, quoted in found]


def test_metric_name_extraction():
    assert metric_names('max by (instance, job) (a_b{x="y"}) == 0 or c unless on (z) d[1d]') == {
        "a_b",
        "c",
        "d",
    }
    assert metric_names('time() - max_over_time(m{file=~"(.*/)?n\\\\.prom"}[1d]) > 300') == {"m"}
    assert template_queries('{{ with printf `x_y{a="%s"}` $labels.a | query }}') == ['x_y{a=""}']
    assert template_queries('{{ with printf "x_z{a=%q}" $labels.a | query }}') == ['x_z{a=""}']


def test_every_metric_the_rules_use_is_documented():
    used: dict[str, set[str]] = {}
    for rule in _rules():
        names = metric_names(rule["expr"])
        for text in rule["annotations"].values():
            for query in template_queries(text):
                names |= metric_names(query)
        used[rule["alert"]] = names
        assert names, f"{rule['alert']}: no metric found in {rule['expr']!r}"
    undocumented = {alert: names - set(alerts.METRICS) for alert, names in used.items()}
    assert not any(undocumented.values()), (
        f"metrics not in nemotron_deploy.service.alerts.METRICS (renamed?): {undocumented}"
    )
    assert set().union(*used.values()) >= {
        "nemotron_replica_up",
        "nemotron_replicas_up",
        "nemotron_endpoint_queue_length",
        "nemotron_endpoint_replicas",
        "nemotron_replica_restart_capped",
        "nemotron_replica_stale",
        "node_textfile_mtime_seconds",
    }


# --- the threshold follows the health interval ------------------------------------------------------


def test_shipped_rules_are_for_the_default_interval():
    assert alerts.rules() == alerts.default_rules() == RULES.read_text()
    assert alerts.stale_after_seconds(alerts.DEFAULT_HEALTH_INTERVAL_SECONDS) == 300


def test_rules_refuse_a_shipped_file_whose_threshold_they_cannot_find(monkeypatch):
    shipped = RULES.read_text()
    for changed in (
        shipped.replace('"} > 300\n', '"} > 3000\n'),
        shipped.replace('"} > 300\n', '"} >= 300\n'),
    ):
        assert changed != shipped
        monkeypatch.setattr(alerts, "default_rules", lambda text=changed: text)
        with pytest.raises(RuntimeError, match="NemotronHealthCheckStale"):
            alerts.rules(120)


def test_rules_for_another_interval_scale_the_staleness_threshold(promtool, tmp_path):
    text = alerts.rules(health_interval_seconds=120)
    assert text != RULES.read_text()
    (stale,) = [
        r for r in yaml.safe_load(text)["groups"][0]["rules"] if r["alert"] == "NemotronHealthCheckStale"
    ]
    assert '"} > 600' in stale["expr"] and "> 300" not in stale["expr"]
    path = tmp_path / alerts.RULES_NAME
    path.write_text(text)
    result = run_promtool(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the deploy installs them -------------------------------------------------------------------------


def _login_state(monkeypatch, **data):
    cluster = inventory.load(str(INVENTORIES / "h100.py"), override_data=data)
    # The wheels and job files are not what this is about (building them needs pip and an index).
    monkeypatch.setattr(
        desired, "artifacts", lambda c: desired.Artifacts([], "0", [("installer-0.whl", b"")], "")
    )
    return desired.for_host(cluster, cluster.login[0])


def test_rules_not_installed_by_default(monkeypatch):
    want = _login_state(monkeypatch)
    assert not [f for f in want.files if f.path.endswith(alerts.RULES_NAME)]


def test_rules_installed_in_prometheus_rules_dir(monkeypatch):
    want = _login_state(
        monkeypatch, prometheus_rules_dir="/etc/prometheus/rules.d", health_interval_seconds=30
    )
    (rules,) = [f for f in want.files if f.path.endswith(alerts.RULES_NAME)]
    assert (rules.path, rules.mode, rules.user, rules.group) == (
        "/etc/prometheus/rules.d/nemotron.rules.yml",
        "644",
        "root",
        "root",
    )
    assert rules.content == alerts.rules(30) and "> 150" in rules.content
    (rules_dir,) = [d for d in want.dirs if d.path == "/etc/prometheus/rules.d"]
    assert rules_dir.adopt is False  # created if absent, never re-owned
