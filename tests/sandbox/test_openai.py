"""The OpenAI front door as deployed on the sandbox: HAProxy answers /v1/models and sends the POSTs
to the replicas, whose fronts (inside the job's container, the stand-in image's sentencepiece, the
checkpoint directory's tokenizer) translate; reached from this host over the cluster network with the
official ``openai`` library, TLS verified against the deployed certificate, the sandbox's API key.

* Base (the sandbox inventory): models, completions (text, usage by the checkpoint directory's
  SentencePiece file, finish_reason), streaming, errors as openai's exception classes, the per-key
  counters; the translation runs in the job, as the service user, behind the replica key (an
  unprivileged user calling a replica's node directly gets 401); a re-deploy changes nothing.
* Instruct (model = nemotron-4-340b-instruct, its own checkpoint directory): chat, streaming chat.
"""

from __future__ import annotations

import json
import shlex
import ssl

import httpx
import openai
import pytest
import sentencepiece
from nemotron_rehearsal import sandbox as sb_api
from nemotron_rehearsal.emulator import EOD, continuation
from nemotron_rehearsal.sandbox import nemo
from sshutil import (
    ENDPOINT,
    JOB_NAME,
    PORT,
    RECORDS_DIR,
    SERVICE_USER,
    cancel_jobs,
    deploy_ok,
    endpoint_cert,
    pyinfra,
    rehearsal_key,
    reset_deploy,
    results_table,
    ssh,
    wait_for,
)

from nemotron_deploy import catalog
from nemotron_deploy.deploy.operations import gateway_retired

BASE = "nemotron-4-340b-base"
INSTRUCT = "nemotron-4-340b-instruct"


def client(key: str | None = None) -> openai.OpenAI:
    context = ssl.create_default_context(cafile=str(endpoint_cert()))
    return openai.OpenAI(
        base_url=f"{ENDPOINT}/v1",
        api_key=key or rehearsal_key(),
        max_retries=0,
        timeout=60,
        http_client=httpx.Client(verify=context, trust_env=False),
    )


def tokens(sandbox, text: str, model_dir) -> int:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / nemo.TOKENIZER_NAME))
    return len(sp.encode(text))


@pytest.fixture(scope="module")
def served(sandbox):
    """The sandbox inventory deployed from nothing with submit=true (the checkpoints get their stand-in
    tokenizer): the jobs' fronts translate from their first start."""
    nemo.install_model(sandbox)
    with sb_api.exclusive_use("OpenAI front door tests (submit and cancel jobs)"):
        reset_deploy(sandbox)
        run = pyinfra("--data", "submit=true", timeout=400)
        assert run.rc == 0, run.describe()
        wait_for(lambda: _models_ok(), 60, "the endpoint to answer /v1/models", interval=1)
        wait_for(_generates, 90, "the replicas to serve through the endpoint", interval=1)
        yield run
        cancel_jobs(sandbox)


def _generates() -> bool:
    """A completion through the endpoint (the slots come UP with their first passing check)."""
    try:
        return bool(client().completions.create(model=_served_model(), prompt="ready?", max_tokens=1).choices)
    except openai.APIStatusError as exc:
        if exc.status_code == 503:
            return False
        raise


def _served_model() -> str:
    return client().models.list().data[0].id


def _models_ok() -> bool:
    try:
        return [m.id for m in client().models.list().data] == [BASE]
    except openai.APIError:
        return False


# A keyless POST /v1/completions to a replica's node, as someone on the cluster could send it.
CALL = """
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=20)
body = json.dumps({"model": "nemotron-4-340b-base", "prompt": "Skip the endpoint?", "max_tokens": 2})
conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
reply = conn.getresponse()
print(reply.status, reply.read().decode()[:300])
"""


def test_the_replicas_fronts_translate_in_the_job_behind_the_replica_key(sandbox, served):
    """Nothing translates on the login node; on a replica's node the front runs with --openai as the
    service user (the job's process), and an unprivileged user there or on the login node gets 401
    for /v1/completions: the translation is no way around the endpoint's keys."""
    login = ssh(sandbox, sandbox.login_host, "ps -e -o args=").stdout
    assert "replica_front" not in login and "gateway" not in login, login
    with open(f"{RECORDS_DIR}/{JOB_NAME}.job.json") as f:
        node = json.load(f)["node"]
    fronts = [
        line.split(None, 1)
        for line in ssh(sandbox, node, "ps -e -o user=,args=").stdout.splitlines()
        if "nemotron_deploy.service.replica_front" in line
    ]
    assert fronts and all(user == SERVICE_USER and "--openai" in args for user, args in fronts), fronts
    address = sandbox.node(node).address
    for where in (sandbox.login_host, node):
        command = f"runuser -u nobody -- python3 -c {shlex.quote(CALL)} {address} {PORT}"
        status, _, body = ssh(sandbox, where, command).stdout.strip().partition(" ")
        assert status == "401" and "replica_key_missing" in body, (where, status, body)


def test_the_per_key_counters(sandbox, served):
    """Requests and tokens per API key name and route, from HAProxy (this host is not in
    endpoint_metrics_allow: the sandbox's key reads them)."""
    out = client().completions.create(model=BASE, prompt="Count me:", max_tokens=3, temperature=0)
    context = ssl.create_default_context(cafile=str(endpoint_cert()))
    with httpx.Client(verify=context, trust_env=False) as http:
        text = http.get(
            f"{ENDPOINT}/metrics/openai", headers={"Authorization": f"Bearer {rehearsal_key()}"}
        ).text
    counters = {
        line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"
    }
    completions = [
        k
        for k in counters
        if k.startswith("nemotron_openai_completion_tokens_total{") and 'route="completions"' in k
    ]
    assert completions and sum(counters[k] for k in completions) >= out.usage.completion_tokens, text
    assert any(k.startswith("nemotron_openai_requests_total{") for k in counters), text


def test_completions_usage_and_finish_reason(sandbox, served):
    prompt = "The sandbox says:"
    out = client().completions.create(model=BASE, prompt=prompt, max_tokens=5, temperature=0)
    assert out.choices[0].text == continuation(prompt, 5)[0]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == tokens(sandbox, prompt, sandbox.model_dir)
    assert out.usage.completion_tokens == 5
    long_prompt = "Until the end:"
    expected, generated = continuation(long_prompt, 1000)
    done = client().completions.create(model=BASE, prompt=long_prompt, max_tokens=1000, temperature=0)
    assert done.choices[0].text == expected[: -len(EOD)] and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == generated
    chunks = list(
        client().completions.create(model=BASE, prompt=prompt, max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5


def test_errors_are_openai_exceptions_with_their_status(sandbox, served):
    with pytest.raises(openai.AuthenticationError):
        client("nmt-wrong").completions.create(model=BASE, prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as bad:
        client().completions.create(model=BASE, prompt="x", max_tokens=2, presence_penalty=1)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as chat:
        client().chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}])
    assert chat.value.body["code"] == "no_chat_template"
    with pytest.raises(openai.NotFoundError):
        client().completions.create(model=INSTRUCT, prompt="x", max_tokens=2)


def test_a_redeploy_changes_nothing(sandbox, served):
    run = deploy_ok()
    table = results_table(run.output)
    assert table["Grand total"]["Success"] == "-", f"a second run changed things:\n{run.output[-3000:]}"
    assert _models_ok()


# An earlier release's gateway as it ran where systemd does not (the sandbox's login node): its marked
# account, its directories, an init script whose service runs as that account.
PLANT_GATEWAY = f"""
useradd --system --no-create-home --shell /usr/sbin/nologin --comment {shlex.quote(gateway_retired.USER_MARK)} {gateway_retired.USER}
mkdir -p {gateway_retired.CONFIG_DIR} {gateway_retired.STATE_DIR}/run
echo '{{}}' > {gateway_retired.CONFIG_DIR}/gateway.json
chown {gateway_retired.USER}:haproxy {gateway_retired.STATE_DIR}/run && chmod 2750 {gateway_retired.STATE_DIR}/run
cat > {gateway_retired.INIT_SCRIPT} <<'SCRIPT'
#!/bin/sh
case "$1" in
  start) start-stop-daemon --start --background --make-pidfile --pidfile {gateway_retired.PIDFILE} \\
           --chuid {gateway_retired.USER} --exec /bin/sleep -- 86401 ;;
  stop) start-stop-daemon --stop --quiet --pidfile {gateway_retired.PIDFILE} --remove-pidfile; true ;;
esac
SCRIPT
chmod 755 {gateway_retired.INIT_SCRIPT} && {gateway_retired.INIT_SCRIPT} start
"""


def test_an_earlier_releases_gateway_is_retired_once(sandbox, served):
    """A login node that ran the earlier release's gateway: the deploy stops it, removes its account
    and files; the next deploy finds nothing to do."""
    login = sandbox.login_host
    ssh(sandbox, login, PLANT_GATEWAY)
    planted = lambda: ssh(sandbox, login, "pgrep -f 'sleep 86401'", check=False).returncode == 0  # noqa: E731
    wait_for(planted, 10, "the planted gateway")
    run = deploy_ok()
    assert "Retire the earlier release's OpenAI gateway" in run.output, run.output[-3000:]
    left = ssh(
        sandbox,
        login,
        f"id {gateway_retired.USER}; ls -d {gateway_retired.CONFIG_DIR} {gateway_retired.STATE_DIR} "
        f"{gateway_retired.INIT_SCRIPT} {gateway_retired.PIDFILE}; pgrep -f 'sleep 86401'",
        check=False,
    )
    assert left.stdout.strip() == "", left.stdout
    again = deploy_ok()
    assert results_table(again.output)["Grand total"]["Success"] == "-", again.output[-3000:]


def test_instruct_chat(sandbox, served):
    instruct_dir = sandbox.model_dir.parent / nemo.INSTRUCT_NAME
    cancel_jobs(sandbox)
    try:
        deploy_ok(
            "--data",
            "submit=true",
            "--data",
            f"model={INSTRUCT}",
            "--data",
            f"model_dir={instruct_dir}",
            timeout=400,
        )

        def ready() -> bool:
            try:
                return [m.id for m in client().models.list().data] == [INSTRUCT]
            except openai.APIError:
                return False

        wait_for(ready, 60, "the endpoint to name the instruct model", interval=1)
        wait_for(_generates, 90, "the instruct replicas to serve through the endpoint", interval=1)
        messages = [{"role": "user", "content": "Which GPU?"}]
        out = client().chat.completions.create(model=INSTRUCT, messages=messages, max_tokens=6, temperature=0)
        prompt = "<extra_id_0>System\n\n<extra_id_1>User\nWhich GPU?\n<extra_id_1>Assistant\n"
        stops = [EOD, *catalog.model(INSTRUCT).chat_stop]
        assert out.choices[0].message.content == continuation(prompt, 6, end_strings=stops)[0]
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == tokens(sandbox, prompt, instruct_dir)
        streamed = list(
            client().chat.completions.create(
                model=INSTRUCT, messages=messages, max_tokens=6, temperature=0, stream=True
            )
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            == out.choices[0].message.content
        )
    finally:
        cancel_jobs(sandbox)
        deploy_ok(timeout=400)  # back to the sandbox inventory's model for the next tests
