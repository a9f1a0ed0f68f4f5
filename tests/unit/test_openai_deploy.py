"""What the deploy installs for the OpenAI gateway on the login node, and what its preflight refuses."""

from __future__ import annotations

import json

from helpers import write_inventory

from nemotron_deploy import inventory
from nemotron_deploy.deploy import desired, host_checks, openai_gateway, render

GW = openai_gateway


def cluster(tmp_path, **settings):
    return inventory.load(str(write_inventory(tmp_path, "h100", settings=settings)))


def login_state(c, init: str):
    return desired.for_host(c, c.login_host, desired.Login(init=init))


def test_the_login_node_gets_the_gateway_config_unit_and_socket_directory(tmp_path):
    c = cluster(
        tmp_path, model="nemotron-4-340b-instruct", model_dir="/lustre/models/Nemotron-4-340B-Instruct"
    )
    want = login_state(c, "systemd")
    files = {f.path: f for f in want.files}
    config = json.loads(files[f"{GW.CONFIG_DIR}/{GW.CONFIG_FILE}"].content)
    assert config["model"] == "nemotron-4-340b-instruct"
    assert config["tokenizer"] == "/lustre/models/Nemotron-4-340B-Instruct/nemotron_2_256k.model"
    assert config["chat_template"]["generation"] == "<extra_id_1>Assistant\n"
    assert config["chat_stop"] == ["<extra_id_1>", "\x11", "<extra_id_1>User"]
    assert config["listen"] == f"unix:{GW.SOCKET}" and config["upstream"] == f"unix:{GW.INTERNAL_SOCKET}"
    unit = files[GW.SYSTEMD_UNIT].content
    assert (
        f"User={GW.USER}" in unit and "Restart=always" in unit and f"ReadWritePaths={GW.SOCKET_DIR}" in unit
    )
    assert GW.INIT_SCRIPT not in files
    dirs = {d.path: d for d in want.dirs}
    sock = dirs[GW.SOCKET_DIR]
    assert (sock.mode, sock.user, sock.group) == ("2750", GW.USER, "haproxy")
    # where systemd does not run: the init script (restart loop as the gateway's user) instead
    cron = {f.path: f for f in login_state(c, "cron").files}
    assert GW.SYSTEMD_UNIT not in cron and cron[GW.INIT_SCRIPT].mode == "755"
    assert f"--chuid {GW.USER}:{GW.USER}" in cron[GW.INIT_SCRIPT].content


def test_haproxy_routes_the_openai_paths_to_the_gateway_and_its_internal_listener_to_the_replicas(tmp_path):
    cfg = render.render_endpoint(cluster(tmp_path), 2)[0].content
    assert "acl openai_route path /v1/models /v1/completions /v1/chat/completions" in cfg
    assert f"server gateway unix@{GW.SOCKET} check" in cfg
    assert f"bind unix@{GW.INTERNAL_SOCKET} mode 660 user haproxy group {GW.USER}" in cfg
    # the key's name for the gateway's metrics comes from HAProxy only
    assert "http-request del-header X-Nemotron-Key" in cfg


def test_endpoint_openai_false_installs_nothing_of_it(tmp_path):
    c = cluster(tmp_path, endpoint_openai=False)
    want = login_state(c, "systemd")
    assert not [f for f in want.files if f.path.startswith(GW.CONFIG_DIR) or f.path == GW.SYSTEMD_UNIT]
    assert GW.SOCKET_DIR not in {d.path for d in want.dirs}
    cfg = render.render_endpoint(c, 2)[0].content
    assert "/v1/" not in cfg and "nemotron_internal" not in cfg


def test_preflight_wants_the_tokenizer_on_the_login_node(tmp_path):
    c = cluster(tmp_path, endpoint=True)
    snap = {"paths": {}, "haproxy": {"service": "systemd"}}
    (problem,) = host_checks.gateway_problems(c, snap)
    assert "/lustre/models/Nemotron-4-340B-Base/nemotron_2_256k.model" in problem
    assert "tokenizer_file" in problem and "endpoint_openai = false" in problem
    assert host_checks.gateway_problems(c, {**snap, "paths": {GW.tokenizer_path(c): object()}}) == []
    moved = cluster(tmp_path / "moved", endpoint=True, tokenizer_file="/srv/tok/nemotron_2_256k.model")
    assert GW.tokenizer_path(moved) == "/srv/tok/nemotron_2_256k.model"


def test_preflight_refuses_a_gateway_account_the_deploy_did_not_make(tmp_path):
    c = cluster(tmp_path)
    foreign = {"gateway_user": {"uid": "1001", "gecos": "Someone"}}
    (problem,) = host_checks.gateway_user_problems(c, foreign)
    assert GW.USER in problem and "did not create it" in problem
    assert host_checks.gateway_user_problems(c, {"gateway_user": {"uid": "999", "gecos": GW.USER_MARK}}) == []
    assert host_checks.gateway_user_problems(c, {"gateway_user": None}) == []
