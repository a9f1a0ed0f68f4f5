"""The endpoint's files (render.render_endpoint) and the updater's logic, without a running HAProxy.

* haproxy.cfg + nemotron_envelope.lua for every shipped inventory (and the sandbox's) pass
  `haproxy -c`, and match the goldens in tests/golden-endpoint/<inventory>/ byte for byte
  (after an intended change: scripts/regen-goldens);
* the configuration says what the design needs (PUT check with `expect rstring`, check timeout above
  max_generation_seconds, maxconn 1, queue timeout and its 503 body, retries, slots, metrics, socket);
* the envelope's limits follow the plan (log-probs refused only where the plan's memory beyond
  weights + KV cache is below the measured peak);
* endpoint_sync sends only the commands a slot needs, maps replica job names to slots, parses
  `show servers state`.

tests/test_endpoint_live.py runs the rendered files in a real HAProxy against NeMo stand-ins.
"""

from __future__ import annotations

import difflib
import re
import subprocess
from pathlib import Path

import pytest
from helpers import A100_40GB_HOSTS, INVENTORIES, REPO, SHIPPED, haproxy, write_inventory
from live_endpoint import make_self_signed

from nemotron_deploy import inventory
from nemotron_deploy.deploy import endpoint, render
from nemotron_deploy.service import endpoint_sync
from nemotron_deploy.service.endpoint_sync import ServerState

GOLDEN_ENDPOINT = Path(__file__).resolve().parents[1] / "golden-endpoint"
WITH_SANDBOX = (*SHIPPED, "sandbox")
ENDPOINT_FILES = (endpoint.CONFIG_FILE, endpoint.LUA_FILE, endpoint.KEYS_MAP_FILE)
GOLDEN_REPLICAS = 2  # scripts/regen-goldens renders the endpoint goldens with --replicas 2


def load(name: str, monkeypatch: pytest.MonkeyPatch) -> inventory.Cluster:
    if name == "sandbox":  # render never connects: don't require the sandbox's bridge
        monkeypatch.setenv("NEMOTRON_DEPLOY_OFFLINE", "1")
    return inventory.load(str(INVENTORIES / f"{name}.py"))


def write_endpoint(cluster: inventory.Cluster, replicas: int, out: Path, **kwargs) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("replica_key", "0" * 64)  # made by the deploy on the login node, never rendered
    for f in render.render_endpoint(cluster, replicas, config_dir=str(out), **kwargs):
        (out / f.name).write_text(f.content)
    if cluster.settings.endpoint_tls != "none":
        make_self_signed(out)
    return out / endpoint.CONFIG_FILE


# 3 nodes of A100 40GB: the plan leaves 6.4 GiB headroom, too little for log-probs.


def a100_40gb(tmp_path: Path) -> inventory.Cluster:
    path = write_inventory(tmp_path, "a100", hosts=A100_40GB_HOSTS, settings={"gpu_type": "A100-40GB"})
    return inventory.load(str(path))


# --- haproxy -c and goldens ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_SANDBOX)
def test_haproxy_accepts_the_rendered_config(name, tmp_path, monkeypatch):
    cluster = load(name, monkeypatch)
    replicas = max(cluster.plan.replicas, 2)
    cfg = write_endpoint(cluster, replicas, tmp_path, stats_socket=str(tmp_path / "admin.sock"))
    result = subprocess.run([haproxy(), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"haproxy -c failed for {name}:\n{result.stdout}{result.stderr}"
    assert "Configuration file is valid" in result.stdout + result.stderr


@pytest.mark.parametrize("filename", ENDPOINT_FILES)
@pytest.mark.parametrize("name", WITH_SANDBOX)
def test_endpoint_render_matches_golden(name, filename, monkeypatch):
    cluster = load(name, monkeypatch)
    # 2 slots whatever the plan says (the sandbox's replicas follow NEMOTRON_SANDBOX_NODES)
    rendered = {f.name: f.content for f in render.render_endpoint(cluster, GOLDEN_REPLICAS)}
    golden = (GOLDEN_ENDPOINT / name / filename).read_text()
    if rendered[filename] != golden:
        diff = "".join(
            difflib.unified_diff(
                golden.splitlines(keepends=True),
                rendered[filename].splitlines(keepends=True),
                f"tests/golden-endpoint/{name}/{filename}",
                "rendered",
            )
        )
        pytest.fail(
            f"rendered {filename} differs from the golden (if intended: scripts/regen-goldens):\n{diff}"
        )


def test_render_leaves_the_job_files_alone(monkeypatch):
    """render() is unchanged: the endpoint's files come only from render_endpoint()."""
    cluster = load("h100", monkeypatch)
    names = {f.name for f in render.render(cluster)}
    assert not names & set(ENDPOINT_FILES)
    files = render.render_endpoint(cluster, 2)
    assert [(f.name, f.mode, f.role, f.directory(cluster)) for f in files] == [
        (endpoint.CONFIG_FILE, "644", "endpoint", "/etc/haproxy"),
        (endpoint.LUA_FILE, "644", "endpoint", "/etc/haproxy"),
        (endpoint.KEYS_MAP_FILE, "640", "endpoint", "/etc/haproxy"),
    ]


def test_regen_goldens_writes_the_endpoint_goldens():
    text = (REPO / "scripts" / "regen-goldens").read_text()
    assert (
        "golden-endpoint" in text
        and f'render --endpoint "${{inventory}}" --replicas {GOLDEN_REPLICAS}' in text
    )


# --- what the configuration says ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def h100_cfg() -> str:
    cluster = inventory.load(str(INVENTORIES / "h100.py"))
    return {f.name: f.content for f in render.render_endpoint(cluster, 3)}[endpoint.CONFIG_FILE]


def test_config_health_check_is_a_real_generation(h100_cfg):
    assert "http-check send meth PUT uri /generate" in h100_cfg
    assert '"tokens_to_generate":1' in h100_cfg
    assert "    http-check expect rstring '^\\{.*\"sentences\"\\s*:'\n" in h100_cfg
    # The check may wait behind the longest generation (max_generation_seconds 300 by default).
    check = int(re.search(r"timeout check (\d+)s", h100_cfg).group(1))
    assert check > 300


def test_config_one_request_per_replica_bounded_queue_and_retries(h100_cfg):
    assert re.search(
        r"^\s+server-template r 1-3 127\.0\.0\.1:1 disabled check .*maxconn 1 observe layer4 error-limit 1 on-error sudden-death$",
        h100_cfg,
        re.M,
    )
    # A slot whose check failed is checked every second: it is back a second after it generates again.
    assert re.search(r"^\s+server-template r 1-3 .* downinter 1s ", h100_cfg, re.M)
    assert "timeout queue 120s" in h100_cfg
    # The 503 after the queue: NeMo's JSON string for PUT /generate, OpenAI's shape for its routes (Lua).
    assert re.search(r"http-error status 503 .*lf-string \"%\[lua\.nemotron_busy\]\"", h100_cfg)
    lua = {f.name: f.content for f in render.render_endpoint(inventory.load(str(INVENTORIES / "h100.py")), 3)}
    assert 'local MSG_BUSY = "The replicas are busy' in lua[endpoint.LUA_FILE]
    assert "retry-on conn-failure empty-response" in h100_cfg
    assert "option redispatch 1" in h100_cfg
    assert re.search(r"^\s+retries 4$", h100_cfg, re.M)


def test_config_metrics_socket_and_port(h100_cfg):
    assert (
        "http-request use-service prometheus-exporter if { path /metrics } { method GET } metrics_network "
        "|| { path /metrics } { method GET } key_ok"
    ) in h100_cfg
    assert "acl metrics_network src 127.0.0.1/32 ::1/128" in h100_cfg
    assert "stats socket /run/haproxy/admin.sock mode 660 user haproxy group haproxy level admin" in h100_cfg
    assert re.search(
        r"^\s+bind 0\.0\.0\.0:1424 ssl crt /etc/haproxy/nemotron-endpoint\.crt alpn http/1\.1$",
        h100_cfg,
        re.M,
    )
    assert "option http-buffer-request" in h100_cfg
    assert "lua-load /etc/haproxy/nemotron_envelope.lua" in h100_cfg


def test_settings_drive_the_config(tmp_path):
    settings = {
        "endpoint_port": 2424,
        "max_generation_seconds": 900,
        "endpoint_queue_seconds": 7,
        "endpoint_check_seconds": 2,
        "inference_batch": 4,
    }
    cluster = inventory.load(str(write_inventory(tmp_path, "h200", settings=settings)))
    files = {f.name: f.content for f in render.render_endpoint(cluster, 1, bind_address="127.0.0.1")}
    cfg, lua = files[endpoint.CONFIG_FILE], files[endpoint.LUA_FILE]
    assert "bind 127.0.0.1:2424" in cfg
    assert "timeout check 930s" in cfg and "timeout server 930s" in cfg
    assert "timeout queue 7s" in cfg and "timeout client 937s" in cfg
    assert "inter 2s" in cfg and "server-template r 1-1 " in cfg
    assert "local MAX_SENTENCES = 4 " in lua


def test_logprobs_allowed_only_where_the_plan_holds_their_peak(tmp_path, monkeypatch):
    for name in WITH_SANDBOX:  # H100/H200/A100-80: 30+ GiB beyond weights + KV cache
        cluster = load(name, monkeypatch)
        assert endpoint.logprobs_allowed(cluster.plan), name
        lua = {f.name: f.content for f in render.render_endpoint(cluster, 1)}[endpoint.LUA_FILE]
        assert "local LOGPROBS_ALLOWED = true " in lua
    small = a100_40gb(tmp_path)
    assert small.plan.headroom_gib == pytest.approx(6.42)
    assert endpoint.logprob_capacity_gib(small.plan) < endpoint.LOGPROB_NEED_GIB
    lua = {f.name: f.content for f in render.render_endpoint(small, 1)}[endpoint.LUA_FILE]
    assert "local LOGPROBS_ALLOWED = false " in lua
    assert "runtime_reserve_gib to 13.4" in lua


def test_bufsize_holds_the_largest_request():
    cluster = inventory.load(str(INVENTORIES / "h100.py"))
    size = endpoint.request_bufsize(cluster.settings, 4096)
    assert size >= 8 * 4096 * 8 and size & (size - 1) == 0


def test_no_replicas_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="at least one replica"):
        render.render_endpoint(load("h100", monkeypatch), 0)


# --- endpoint_sync's logic ---------------------------------------------------------------------------

SHOW = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 replicas 1 r1 10.0.0.5 2 0 1 1 40 15 3 1 6 0 0 0 - 1424 - 0 0 - - 0
3 replicas 2 r2 127.0.0.1 0 5 1 1 40 1 0 0 14 0 0 0 - 1 - 0 0 - - 0
3 replicas 3 r3 10.0.0.7 0 1 1 1 40 1 0 0 14 0 0 0 - 1424 - 0 0 - - 0
3 replicas 4 r4 10.0.0.8 2 4 1 1 40 15 3 1 6 0 0 0 - 1424 - 0 0 - - 0
3 replicas 5 r5 10.0.0.9 2 12 1 1 40 15 3 1 6 0 0 0 - 1424 - 0 0 - - 0

"""


def test_parse_servers_state():
    state = endpoint_sync.parse_servers_state(SHOW)
    assert state["r1"] == ServerState("r1", "10.0.0.5", 1424, 2, 0)
    assert state["r1"].status == "up" and not state["r1"].in_maintenance
    assert state["r2"].status == "maint" and state["r3"].status == "maint"
    # 0x04 only records the config's `disabled`: it stays after `state ready`
    assert state["r4"].status == "up" and state["r5"].status == "drain"
    with pytest.raises(endpoint_sync.SyncError):
        endpoint_sync.parse_servers_state("Unknown command\n")


def test_plan_commands_touch_only_slots_that_differ():
    current = endpoint_sync.parse_servers_state(SHOW)
    same = {"r1": ("10.0.0.5", 1424), "r2": (None, 1424), "r3": (None, 1424), "r4": ("10.0.0.8", 1424)}
    assert endpoint_sync.plan_commands(current, same) == []
    changed = {
        "r1": (None, 1424),
        "r2": ("10.0.0.6", 1424),
        "r3": ("10.0.0.7", 1424),
        "r5": ("10.0.0.9", 1424),
    }
    assert endpoint_sync.plan_commands(current, changed) == [
        "set server replicas/r1 state maint",
        "set server replicas/r2 addr 10.0.0.6 port 1424",
        "set server replicas/r2 state drain",
        "set server replicas/r2 health down",
        "set server replicas/r2 state ready",
        "set server replicas/r3 state drain",
        "set server replicas/r3 health down",
        "set server replicas/r3 state ready",
        "set server replicas/r5 state ready",
    ]
    # A slot that serves (r4 UP) or drains (r5) and moves: DOWN before its new address, so that no
    # request goes there before a check passed.
    moved = {"r4": ("10.0.0.10", 1424), "r5": ("10.0.0.11", 1424)}
    assert endpoint_sync.plan_commands(current, moved) == [
        "set server replicas/r4 health down",
        "set server replicas/r4 addr 10.0.0.10 port 1424",
        "set server replicas/r5 health down",
        "set server replicas/r5 addr 10.0.0.11 port 1424",
        "set server replicas/r5 state ready",
    ]
    with pytest.raises(endpoint_sync.SyncError, match="no slot"):
        endpoint_sync.plan_commands(current, {"r9": ("10.0.0.9", 1424)})


def test_replica_jobs_map_to_slots():
    assert endpoint_sync.replica_job_name("nemotron-340b", 2) == "nemotron-340b-r2"
    assert endpoint_sync.slot_for_job("nemotron-340b", "nemotron-340b-r2") == "r2"
    assert endpoint_sync.slot_for_job("nemotron-340b", "nemotron-340b") is None
    assert endpoint_sync.slot_for_job("nemotron-340b", "other-r1") is None
    assert endpoint_sync.slot_for_job("nemo.x", "nemoAx-r1") is None  # the name is literal, not a regex
    nodes = {"nemotron-340b-r1": "gpu03", "nemotron-340b-r2": None, "nemotron-340b-r7": "gpu09"}
    assert endpoint_sync.desired_from_nodes("nemotron-340b", 3, nodes, 1424) == {
        "r1": ("gpu03", 1424),
        "r2": (None, 1424),
        "r3": (None, 1424),
    }


def test_resolve_and_cli_arguments():
    assert endpoint_sync.resolve("127.0.0.1") == "127.0.0.1"
    assert endpoint_sync.resolve("localhost") in ("127.0.0.1", "::1")
    assert endpoint_sync.resolve("nemotron-endpoint-test.invalid") is None
    assert endpoint_sync._slot_arg("r1=gpu01:1424") == ("r1", ("gpu01", 1424))
    assert endpoint_sync._slot_arg("r2=-") == ("r2", (None, None))
    for bad in ("r1", "x1=gpu01:1424", "r1=gpu01", "r1=gpu01:0", "r0=-"):
        with pytest.raises(Exception, match="SLOT=HOST:PORT"):
            endpoint_sync._slot_arg(bad)


def test_sync_fails_clearly_without_haproxy(tmp_path, capsys):
    code = endpoint_sync.main(["--socket", str(tmp_path / "none.sock"), "--set", "r1=127.0.0.1:1"])
    assert code == 2
    assert "stats socket" in capsys.readouterr().err
