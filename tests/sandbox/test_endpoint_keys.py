"""The endpoint on the sandbox's login node, closed to strangers: the sandbox inventory's deploy with
API keys on (the keys file `sandbox up` makes, with its one key "rehearsal") and a self-signed
certificate made on the login node.

* what the deploy installs, and who can read it (the map and the private key: haproxy's group only);
* an unprivileged local user of the login node (`runuser -u nobody`) gets 401 without a key, and a
  generation with one (curl, and the deployed `health --endpoint`), the key always passed on stdin,
  never on a command line;
* a re-deploy changes nothing and keeps the certificate;
* a haproxy.cfg the deploy did not write stops the deploy before any host changes.
"""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest
from nemotron_rehearsal import sandbox as sb_api
from sshutil import (
    ENDPOINT_CERT,
    HEALTH_VENV,
    cancel_jobs,
    deploy_ok,
    endpoint_put,
    endpoint_slots,
    op_statuses,
    pyinfra,
    rehearsal_key,
    results_table,
    ssh,
    wait_for,
)

KEYS_MAP = "/etc/haproxy/nemotron_api_keys.map"
CONFIG = "/etc/haproxy/haproxy.cfg"
LOCAL = "https://127.0.0.1:1424/generate"
BODY = json.dumps({"sentences": ["Hello from nobody:"], "tokens_to_generate": 4, "greedy": True})


@pytest.fixture(scope="module")
def served(sandbox):
    """The sandbox inventory deployed with submit=true: replicas generate behind the endpoint."""
    with sb_api.exclusive_use("endpoint key tests (submit and cancel jobs)"):
        cancel_jobs(sandbox)
        run = pyinfra("--data", "submit=true", timeout=300)
        assert run.rc == 0, run.describe()
        # The deploy returns with the endpoint serving: its last step waited until every slot was UP.
        waited = op_statuses(run.output, "Endpoint: wait until it serves")
        assert waited.pop(sandbox.login_host) == "Success", run.output[-3000:]
        assert set(waited.values()) == {"Skipped"}, waited  # the compute nodes have no endpoint
        slots = endpoint_slots(sandbox)
        assert {name: slots[name][1] for name in ("r1", "r2")} == {"r1": "up", "r2": "up"}, slots
        yield run
        cancel_jobs(sandbox)


def _as_nobody(sandbox, command: str, stdin: str | None = None):
    return ssh(sandbox, sandbox.login_host, f"runuser -u nobody -- {command}", check=False, input=stdin)


def _curl(extra: str = "") -> str:
    return (
        f"curl -sS --noproxy '*' --cacert {ENDPOINT_CERT} -o - -w '\\n%{{http_code}}' -X PUT "
        f"-H 'Content-Type: application/json' {extra} --data {shlex.quote(BODY)} {LOCAL}"
    )


def test_the_deploy_installs_the_keys_and_the_certificate_for_haproxy_only(sandbox, served):
    key = rehearsal_key()
    assert key not in served.output, "the API key appeared in the deploy's output"
    modes = ssh(
        sandbox,
        sandbox.login_host,
        f"stat -c '%n %U:%G %a' {KEYS_MAP} {ENDPOINT_CERT} {ENDPOINT_CERT}.key",
    ).stdout.split("\n")
    assert modes[:3] == [
        f"{KEYS_MAP} root:haproxy 640",
        f"{ENDPOINT_CERT} root:root 644",
        f"{ENDPOINT_CERT}.key root:haproxy 640",
    ]
    mapped = ssh(sandbox, sandbox.login_host, f"cat {KEYS_MAP}").stdout
    assert f"{hashlib.sha256(key.encode()).hexdigest()} rehearsal\n" in mapped and key not in mapped
    # nobody reads the certificate, never the map or the private key
    assert _as_nobody(sandbox, f"cat {ENDPOINT_CERT}").returncode == 0
    for secret in (KEYS_MAP, f"{ENDPOINT_CERT}.key"):
        denied = _as_nobody(sandbox, f"cat {secret}")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, secret


def test_an_unprivileged_user_gets_401_without_a_key_and_a_generation_with_one(sandbox, served):
    """`runuser -u nobody` on the login node: curl with the deployed certificate and no key gets 401
    (the JSON error); with the key (a header read from stdin) the replicas generate; so does the
    deployed health check, its key on stdin (--api-key-file -)."""
    refused = _as_nobody(sandbox, _curl())
    assert refused.returncode == 0, refused.stderr
    text, status = refused.stdout.rsplit("\n", 1)
    assert status == "401", refused.stdout
    assert json.loads(text)["error"]["code"] == "invalid_api_key"

    header = f"Authorization: Bearer {rehearsal_key()}\n"
    served_ = _as_nobody(sandbox, _curl("-H @-"), stdin=header)
    assert served_.returncode == 0, served_.stderr
    text, status = served_.stdout.rsplit("\n", 1)
    assert status == "200", served_.stdout
    assert json.loads(text)["sentences"][0].startswith("Hello from nobody:")

    check = _as_nobody(
        sandbox,
        f"{HEALTH_VENV}/bin/python -m nemotron_deploy.service.health --endpoint https://127.0.0.1:1424 "
        f"--ca-file {ENDPOINT_CERT} --api-key-file - --no-state-file",
        stdin=rehearsal_key() + "\n",
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("NEMOTRON OK - generated 1 token")

    # and from this host, over the cluster network, as any client there
    status, text = endpoint_put({"sentences": ["From the network:"], "tokens_to_generate": 4})
    assert status == 200, text
    status, text = endpoint_put({"sentences": ["Wrong key:"]}, key="nmt-wrong")
    assert status == 401, text


def test_a_redeploy_changes_nothing_and_keeps_the_certificate(sandbox, served):
    cert = ssh(sandbox, sandbox.login_host, f"sha256sum {ENDPOINT_CERT} {ENDPOINT_CERT}.key").stdout
    run = deploy_ok()
    table = results_table(run.output)
    assert table["Grand total"]["Success"] == "-", f"a second run changed things:\n{run.output[-3000:]}"
    assert ssh(sandbox, sandbox.login_host, f"sha256sum {ENDPOINT_CERT} {ENDPOINT_CERT}.key").stdout == cert
    assert endpoint_put({"sentences": ["After the re-deploy:"], "tokens_to_generate": 4})[0] == 200


def test_the_deploy_refuses_a_haproxy_cfg_it_did_not_write(sandbox, served):
    """Someone's own haproxy.cfg on the login node: the deploy stops in its preflight, naming the file
    and how to hand it over, and changes nothing (the file, HAProxy's process). Moved aside, the
    next deploy takes HAProxy over again."""
    foreign = "# the site's own HAProxy\nglobal\n    daemon\n"
    pid = ssh(sandbox, sandbox.login_host, "cat /run/haproxy.pid").stdout
    ssh(sandbox, sandbox.login_host, f"cp -p {CONFIG} {CONFIG}.ours && cat > {CONFIG}", input=foreign)
    try:
        run = pyinfra(timeout=300)
        assert run.rc != 0, run.describe()
        assert f"{CONFIG} here was not written by nemotron-deploy" in run.output, run.output[-3000:]
        assert f"mv {CONFIG} {CONFIG}.before-nemotron" in run.output and "endpoint = false" in run.output
        assert "nothing was changed" in run.output
        assert ssh(sandbox, sandbox.login_host, f"cat {CONFIG}").stdout == foreign
        assert ssh(sandbox, sandbox.login_host, "cat /run/haproxy.pid").stdout == pid
        # handed over as the message says: moved aside, the deploy writes its own again
        ssh(sandbox, sandbox.login_host, f"mv {CONFIG} {CONFIG}.before-nemotron")
        deploy_ok()
        assert ssh(sandbox, sandbox.login_host, f"head -n 1 {CONFIG}").stdout.startswith(
            "# Generated by nemotron-deploy"
        )
    finally:
        ssh(
            sandbox,
            sandbox.login_host,
            f"if ! head -n 1 {CONFIG} | grep -q '^# Generated by nemotron-deploy'; then mv -f {CONFIG}.ours {CONFIG}; "
            f"fi; rm -f {CONFIG}.ours {CONFIG}.before-nemotron",
        )
    # the reload put the slots in maintenance; the deploy's sync and HAProxy's first checks bring them back
    wait_for(
        lambda: endpoint_put({"sentences": ["Ours again:"], "tokens_to_generate": 4})[0] == 200,
        60,
        "the endpoint to serve again after the reload",
        interval=1,
    )
