"""The replica's own port (issue 18): no cluster user can skip the endpoint by calling a replica's node.

NeMo's server listens on every address of its node; the job now runs it through nemo_launch.py
(bound to the node's 127.0.0.1) behind a front on the node's own address, same port, that forwards
only requests carrying the replica key. Here, for real (2 replicas on the sandbox's 4 nodes, pyxis,
the stand-in server at NeMo's module path): an unprivileged user on the login node, and any user on
another compute node, gets 401/403 from a replica's port and reaches no server; nobody but the
accounts that need it can read the key; the endpoint, the scheduled check and the replica's own
node (the model card's client calls localhost) still get generations. On a tree without the front,
the keyless request from another host is answered 200 by NeMo itself, and these tests fail.
"""

from __future__ import annotations

import csv
import io
import json
import shlex

import pytest
from nemotron_rehearsal import sandbox as sb_api
from sshutil import (
    CRON_FILE,
    DEPLOY_SHARED,
    DEPLOY_STATE_DIR,
    HEALTH_USER,
    HEALTH_VENV,
    JOB_BASE,
    PORT,
    RECORDS_DIR,
    cancel_jobs,
    endpoint_put,
    pyinfra,
    reset_deploy,
    ssh,
    wait_for,
)

R1, R2 = f"{JOB_BASE}-r1", f"{JOB_BASE}-r2"
SOCKET = "/run/haproxy/admin.sock"
SHARED_KEY = f"{DEPLOY_SHARED}/replica.key"
PROBE_KEY = f"{DEPLOY_STATE_DIR}/replica.key"
HAPROXY_MAP = "/etc/haproxy/nemotron_replica_key.map"
HEADER = "X-Nemotron-Replica-Key"
DEPLOY_OUTPUT: list[str] = []  # what the fixture's deploy (the one that made the key) printed

# A client of a replica's port: PUT /generate, the key (if any) from standard input, never argv.
CALL = f"""
import http.client, json, sys
host, port = sys.argv[1], int(sys.argv[2])
key = sys.stdin.read().strip()
headers = {{"Content-Type": "application/json"}}
if key:
    headers["{HEADER}"] = key
conn = http.client.HTTPConnection(host, port, timeout=20)
try:
    conn.request("PUT", "/generate", body=json.dumps({{"sentences": ["Open door?"], "tokens_to_generate": 2}}),
                 headers=headers)
    reply = conn.getresponse()
    print(reply.status, reply.read().decode()[:300])
except OSError as exc:
    print("error", type(exc).__name__, exc)
"""


def call(sandbox, node: str, target: str, *, user: str = "nobody", key: str = "") -> tuple[str, str]:
    """(status or "error", body) of a PUT /generate from `node` as `user` to target:PORT."""
    command = f"runuser -u {user} -- python3 -c {shlex.quote(CALL)} {shlex.quote(target)} {PORT}"
    out = ssh(sandbox, node, command, input=key + "\n").stdout.strip()
    status, _, body = out.partition(" ")
    return status, body


def generated(body: str) -> bool:
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and "sentences" in answer


def replica_node(sandbox, job: str) -> tuple[str, str]:
    """(name, address) of the replica's first node, from its job record."""
    with open(f"{RECORDS_DIR}/{job}.job.json") as f:
        name = json.load(f)["node"]
    return name, sandbox.node(name).address


def _servers(sandbox) -> dict[str, str]:
    script = (
        f"from nemotron_deploy.service import endpoint_sync as e; print(e.command({SOCKET!r}, 'show stat'))"
    )
    text = ssh(
        sandbox,
        sandbox.login_host,
        f"runuser -u {HEALTH_USER} -- {HEALTH_VENV}/bin/python -c {shlex.quote(script)}",
    ).stdout.lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return {
        r["svname"]: r["status"] for r in rows if r["pxname"] == "replicas" and r["svname"].startswith("r")
    }


@pytest.fixture(scope="module")
def serving(sandbox):
    """From a never-deployed sandbox (so this deploy makes the replica key), both replicas submitted by
    the deploy (--data submit=true) and UP in the endpoint."""
    with sb_api.exclusive_use("replica-port tests (reset the deploy, submit and cancel jobs)"):
        reset_deploy(sandbox)
        run = pyinfra("--data", "submit=true", timeout=300)
        assert run.rc == 0, run.describe()
        DEPLOY_OUTPUT.append(run.output)
        wait_for(
            lambda: _servers(sandbox) == {"r1": "UP", "r2": "UP"}, 60, "both replicas UP in the endpoint"
        )
        yield sandbox
        cancel_jobs(sandbox)


def test_another_user_on_the_login_node_cannot_call_a_replica_directly(serving):
    sandbox = serving
    name, address = replica_node(sandbox, R1)
    status, body = call(sandbox, sandbox.login_host, address)
    assert status == "401", f"a keyless request from the login node to {name}:{PORT} got {status} {body}"
    assert "replica_key_missing" in body and not generated(body)
    status, body = call(sandbox, sandbox.login_host, address, key="0" * 64)
    assert status == "403" and "replica_key_invalid" in body, (status, body)


def test_a_user_on_another_compute_node_cannot_call_a_replica_directly(serving):
    sandbox = serving
    r1_node, address = replica_node(sandbox, R1)
    other = next(n for n in sandbox.compute_names if n != r1_node)
    for user in ("nobody", "root"):  # not even root elsewhere: it has no key
        status, body = call(sandbox, other, address, user=user)
        assert status == "401", f"{user} on {other} -> {r1_node}:{PORT}: {status} {body}"


def test_nemo_listens_on_its_nodes_loopback_only(serving):
    """On the replica's node: NeMo (the stand-in, through nemo_launch.py) on 127.0.0.1, the front on
    the node's own address; nothing on every address (0.0.0.0) any more."""
    sandbox = serving
    name, address = replica_node(sandbox, R1)
    tcp = ssh(sandbox, name, "cat /proc/net/tcp").stdout.splitlines()[1:]
    listening = set()
    for line in tcp:
        local, state = line.split()[1], line.split()[3]
        hexaddr, _, hexport = local.partition(":")
        if state == "0A" and int(hexport, 16) == PORT:
            listening.add(".".join(str(b) for b in bytes.fromhex(hexaddr)[::-1]))
    assert listening == {"127.0.0.1", address}, listening
    # The model card's client calls localhost:1424 on the replica's node: NeMo itself answers it.
    status, body = call(sandbox, name, "127.0.0.1", user="root")
    assert status == "200" and generated(body), (status, body)


def test_only_the_accounts_that_need_the_key_can_read_it(serving):
    sandbox = serving
    login = sandbox.login_host
    stats = ssh(sandbox, login, f"stat -c '%U:%G %a %F' {SHARED_KEY} {PROBE_KEY} {HAPROXY_MAP}").stdout.split(
        "\n"
    )
    submitter = ssh(sandbox, login, f"stat -c '%U:%G' {RECORDS_DIR}").stdout.strip()
    assert stats[0] == f"{submitter} 400 regular file", stats
    assert stats[1] == f"root:{HEALTH_USER} 640 regular file", stats
    assert stats[2] == "root:haproxy 640 regular file", stats
    for path in (SHARED_KEY, PROBE_KEY, HAPROXY_MAP):
        attempt = ssh(sandbox, login, f"runuser -u nobody -- cat {path}", check=False)
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, path
    # The three copies hold one key, and it is what the replica's front takes.
    key = ssh(sandbox, login, f"cat {PROBE_KEY}").stdout.strip()
    assert ssh(sandbox, login, f"cat {SHARED_KEY}").stdout.strip() == key
    assert ssh(sandbox, login, f"cat {HAPROXY_MAP}").stdout.strip() == f"replica {key}"
    _, address = replica_node(sandbox, R1)
    status, body = call(sandbox, login, address, user="root", key=key)
    assert status == "200" and generated(body), (status, body)
    # Not in what the deploy printed, nor on the check's command line.
    assert DEPLOY_OUTPUT and all(key not in out for out in DEPLOY_OUTPUT)
    assert key not in ssh(sandbox, login, f"cat {CRON_FILE}").stdout


def test_the_endpoint_and_the_scheduled_check_still_reach_every_replica(serving):
    sandbox = serving
    answers = [
        endpoint_put({"sentences": [f"Through the endpoint {i}:"], "tokens_to_generate": 2}) for i in range(6)
    ]
    assert all(status == 200 and generated(text) for status, text in answers), answers
    cron = ssh(sandbox, sandbox.login_host, f"cat {CRON_FILE}").stdout
    command = cron.splitlines()[-1].split(f" {HEALTH_USER} ", 1)[1].removesuffix(" >/dev/null 2>&1")
    assert "--replica-key-file" in command
    out = ssh(sandbox, sandbox.login_host, f"runuser -u {HEALTH_USER} -- {command}", check=False).stdout
    assert "r1 OK" in out and "r2 OK" in out, out
    assert _servers(sandbox) == {"r1": "UP", "r2": "UP"}
