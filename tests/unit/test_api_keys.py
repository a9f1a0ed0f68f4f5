"""The endpoint's API keys and access settings: `nemotron-deploy api-key new`, the keys file's validation,
the access settings' validation, what `plan` says, and the preflight's refusal of a haproxy.cfg the
deploy did not write. (The keys at work, in a real HAProxy: tests/local/test_endpoint_access.py.)"""

from __future__ import annotations

import hashlib
import re
import stat

import pytest
from helpers import problems_of, run_main, write_inventory

from nemotron_deploy import api_keys, inventory
from nemotron_deploy.deploy import desired, endpoint, render
from nemotron_deploy.deploy.host_checks import login_problems

# --- api-key new ---------------------------------------------------------------------------------


def test_api_key_new_prints_the_key_once_and_appends_only_its_hash(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert run_main(["api-key", "new", "team-a", "--file", str(keys)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert out == key + "\n", "stdout is the key alone (for a pipe), once"
    assert re.fullmatch(r"nmt-[A-Za-z0-9_-]{43}", key)
    assert key not in err and "team-a" in err and "NEMOTRON_API_KEY" in err
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    text = keys.read_text()
    assert key not in text
    assert f"team-a {hashlib.sha256(key.encode()).hexdigest()}\n" in text
    assert api_keys.read(keys) == [api_keys.ApiKey("team-a", hashlib.sha256(key.encode()).hexdigest())]

    # a second key is appended; the file keeps its mode; keys differ
    assert run_main(["api-key", "new", "team-b", "--file", str(keys)]) == 0
    second = capsys.readouterr().out.strip()
    assert second != key
    assert [k.name for k in api_keys.read(keys)] == ["team-a", "team-b"]
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert keys.read_text().startswith(text)


def test_api_key_new_refuses_a_name_already_there_or_not_a_plain_name(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert run_main(["api-key", "new", "team-a", "--file", str(keys)]) == 0
    before = keys.read_text()
    capsys.readouterr()
    assert run_main(["api-key", "new", "team-a", "--file", str(keys)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "already has a key named team-a" in err
    for bad in ("team a", ".x", "a;b", "é", "x" * 65, "", "a\nb"):
        assert run_main(["api-key", "new", bad, "--file", str(keys)]) == 1, bad
        out, err = capsys.readouterr()
        assert out == "" and "not a plain name" in err, (bad, err)
    assert keys.read_text() == before, "a refused key changed the file"


def test_api_key_new_appends_after_a_last_line_without_newline(tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.write_text(f"old {'a' * 64}")  # hand-edited, no newline at the end
    assert run_main(["api-key", "new", "new", "--file", str(keys)]) == 0
    assert [k.name for k in api_keys.read(keys)] == ["old", "new"]


# --- the keys file, validated with the inventory ----------------------------------------------------


def _with_keys(tmp_path, text: str | None, **settings):
    keys = tmp_path / "my.keys"
    if text is not None:
        keys.write_text(text)
    return write_inventory(
        tmp_path / "inv", "h100", settings={"endpoint_api_keys_file": str(keys), **settings}
    )


def test_the_keys_file_is_read_relative_to_the_inventory(tmp_path):
    path = write_inventory(tmp_path, "h100", settings={"endpoint_api_keys_file": "site.keys"})
    (tmp_path / "site.keys").write_text(f"# comment\n\nalice {'b' * 64}\n")
    cluster = inventory.load(str(path))
    assert cluster.api_keys == [api_keys.ApiKey("alice", "b" * 64)]
    mapped = {f.name: f for f in render.render_endpoint(cluster, 2)}[endpoint.KEYS_MAP_FILE]
    assert mapped.mode == "640" and f"{'b' * 64} alice\n" in mapped.content
    (wanted,) = [f for f in desired.endpoint_files(cluster) if f.path.endswith(endpoint.KEYS_MAP_FILE)]
    assert (wanted.path, wanted.user, wanted.group, wanted.mode) == (
        "/etc/haproxy/nemotron_api_keys.map",
        "root",
        "haproxy",
        "640",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "does not exist: make it, with its first key, with `nemotron-deploy api-key new NAME"),
        (f"alice {'a' * 64}\nalice {'c' * 64}\n", "line 2: the name alice is already on line 1"),
        (f"alice {'a' * 64}\nbob {'a' * 64}\n", "line 2: bob has the same key as line 1"),
        ("alice nmt-thekeyitself\n", "line 1: alice's hash is not 64 lowercase hex digits"),
        (f"alice {'A' * 64}\n", "line 1: alice's hash is not 64 lowercase hex digits"),
        (f"al;ice {'a' * 64}\n", "line 1: 'al;ice' is not a plain name"),
        (f"# ok\nalice {'a' * 64} extra\n", "line 2: expected `NAME <sha256 hex>` (two fields), got 3"),
        (f"empty {hashlib.sha256(b'').hexdigest()}\n", "line 1: empty's hash is the SHA-256 of an empty key"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_line_and_the_fix(tmp_path, text, expected):
    (problem,) = problems_of(_with_keys(tmp_path, text))
    assert problem.field == "endpoint_api_keys_file"
    assert expected in problem.message


def test_api_key_auth_without_a_keys_file_is_refused_naming_the_command(tmp_path):
    path = write_inventory(tmp_path, "h100", settings={"endpoint_api_keys_file": None})
    (problem,) = problems_of(path)
    assert problem.field == "endpoint_api_keys_file"
    assert "nemotron-deploy api-key new NAME --file FILE" in problem.message
    assert "endpoint_auth = 'none'" in problem.message
    # opened on purpose, or no endpoint at all: no keys file needed
    for settings in ({"endpoint_auth": "none"}, {"endpoint": False}):
        opened = write_inventory(
            tmp_path / str(len(settings)), "h100", settings={"endpoint_api_keys_file": None, **settings}
        )
        assert inventory.load(str(opened)).api_keys == []


@pytest.mark.parametrize(
    ("settings", "field", "expected"),
    [
        ({"endpoint_auth": "basic"}, "endpoint_auth", "'api-key' or 'none'"),
        ({"endpoint_tls": "files"}, "endpoint_tls", "needs endpoint_tls_cert and endpoint_tls_key"),
        (
            {"endpoint_tls_cert": "/etc/ssl/x.pem"},
            "endpoint_tls",
            "endpoint_tls = self-signed, which does not use",
        ),
        (
            {"endpoint_tls": "files", "endpoint_tls_cert": "etc/x.pem", "endpoint_tls_key": "/k"},
            "endpoint_tls_cert",
            "absolute path",
        ),
        ({"endpoint_bind": ["login01"]}, "endpoint_bind.0", "is not an IP address"),
        ({"endpoint_bind": []}, "endpoint_bind", "at least 1 item"),
        (
            {"endpoint_metrics_allow": ["10.0.0.1/8"]},
            "endpoint_metrics_allow.0",
            "not a network in CIDR form",
        ),
        ({"endpoint_max_inflight_per_key": 0}, "endpoint_max_inflight_per_key", "greater than or equal to 1"),
    ],
)
def test_access_settings_are_validated(tmp_path, settings, field, expected):
    keys = tmp_path / "k"
    keys.write_text("")
    path = write_inventory(tmp_path, "h100", settings={"endpoint_api_keys_file": str(keys), **settings})
    problems = problems_of(path)  # one per host
    assert {p.field for p in problems} == {field}, problems
    assert expected in problems[0].message, problems[0].message


def test_plan_says_who_may_call_the_endpoint(tmp_path, capsys):
    keys = tmp_path / "k"
    keys.write_text(f"alice {'a' * 64}\nbob {'b' * 64}\n")
    closed = write_inventory(tmp_path / "closed", "h100", settings={"endpoint_api_keys_file": str(keys)})
    assert run_main(["plan", str(closed)]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"endpoint access +API keys only \(2 in .*: alice, bob\); https on 0\.0\.0\.0 port 1424", out
    )
    assert "at most 1 request(s) in flight per key" in out
    opened = write_inventory(
        tmp_path / "open", "h100", settings={"endpoint_auth": "none", "endpoint_tls": "none"}
    )
    assert run_main(["plan", str(opened)]) == 0
    out = capsys.readouterr().out
    assert "OPEN to anyone who can reach it (endpoint_auth = none)" in out
    assert "no TLS: keys and prompts cross the network in clear" in out


def test_settings_lists_the_access_settings(capsys):
    assert run_main(["settings"]) == 0
    out = capsys.readouterr().out
    for name in (
        "endpoint_auth",
        "endpoint_api_keys_file",
        "endpoint_tls",
        "endpoint_tls_cert",
        "endpoint_tls_key",
        "endpoint_bind",
        "endpoint_metrics_allow",
        "endpoint_max_inflight_per_key",
    ):
        assert f"  {name}: " in out, name


# --- preflight: a haproxy.cfg the deploy did not write ---------------------------------------------

READ = {
    "slurm": {"version": "22.05.8"},
    "haproxy": {"service": "systemd", "version": "2.6.12", "apt": True, "running": True, "openssl": True},
    "submit": {"user": "root", "slurm_bin": "/usr/bin", "sudo": True},
    "paths": {},
}


def _login_problems(cluster, config):
    snap = {**READ, "haproxy": {**READ["haproxy"], "config": config}}
    return login_problems(cluster, snap)


def test_preflight_refuses_a_haproxy_cfg_it_did_not_write(tmp_path):
    cluster = inventory.load(str(write_inventory(tmp_path, "h100")))
    foreign = {"first_line": "global", "md5": "1" * 32, "package_md5": "2" * 32}
    (problem,) = _login_problems(cluster, foreign)
    assert "/etc/haproxy/haproxy.cfg here was not written by nemotron-deploy" in problem
    assert "mv /etc/haproxy/haproxy.cfg /etc/haproxy/haproxy.cfg.before-nemotron" in problem
    assert "endpoint = false" in problem
    # its own (the rendered banner), the package's untouched default, or none: no problem
    own = render.render_endpoint(cluster, 1)[0].content.splitlines()[0]
    assert _login_problems(cluster, {"first_line": own, "md5": "1" * 32, "package_md5": "2" * 32}) == []
    assert _login_problems(cluster, {"first_line": "global", "md5": "2" * 32, "package_md5": "2" * 32}) == []
    assert _login_problems(cluster, None) == []
    # a banner-like line in the middle of someone's file does not count: the first line only
    assert _login_problems(cluster, {"first_line": "# my " + own, "md5": "1" * 32, "package_md5": None})
    # with the endpoint off, the file is not the deploy's business
    off = inventory.load(str(write_inventory(tmp_path / "off", "h100", settings={"endpoint": False})))
    assert _login_problems(off, foreign) == []


def test_preflight_wants_openssl_for_a_self_signed_pair_not_yet_made(tmp_path):
    cluster = inventory.load(str(write_inventory(tmp_path, "h100")))
    snap = {**READ, "haproxy": {**READ["haproxy"], "openssl": False, "config": None}}
    (problem,) = login_problems(cluster, snap)
    assert "openssl is not here" in problem
    made = {desired.tls_cert_path(): object(), desired.tls_key_path(): object()}
    assert login_problems(cluster, {**snap, "paths": made}) == []  # made once: never again


def test_preflight_wants_the_tls_files_the_inventory_names(tmp_path):
    settings = {
        "endpoint_tls": "files",
        "endpoint_tls_cert": "/etc/ssl/ep.crt",
        "endpoint_tls_key": "/etc/ssl/ep.key",
    }
    cluster = inventory.load(str(write_inventory(tmp_path, "h100", settings=settings)))
    problems = _login_problems(cluster, None)
    assert [p.split(",")[0] for p in problems] == [
        "endpoint_tls_cert = /etc/ssl/ep.crt",
        "endpoint_tls_key = /etc/ssl/ep.key",
    ]
    links = {(link.path, link.target) for link in desired.endpoint_links(cluster)}
    assert links == {
        ("/etc/haproxy/nemotron-endpoint.crt", "/etc/ssl/ep.crt"),
        ("/etc/haproxy/nemotron-endpoint.crt.key", "/etc/ssl/ep.key"),
    }


def test_an_api_key_pasted_into_inventory_data_is_refused_and_never_printed(tmp_path, capsys):
    key = api_keys.new_key()
    path = write_inventory(tmp_path, "h100", extra=f"job_env = {{'MY_TOKEN': {key!r}}}\n")
    problems = problems_of(path)
    assert {p.field for p in problems} == {"job_env.MY_TOKEN"}
    assert "endpoint API key in plain text" in problems[0].message
    assert key not in "\n".join(map(str, problems))
    assert run_main(["validate", str(path)]) == 1
    assert key not in "".join(capsys.readouterr())
