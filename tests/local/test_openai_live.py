"""The OpenAI front door for real: the official ``openai`` library, LangChain's OpenAI classes and curl
against the rendered HAProxy (keys, limits, /v1/models, the Lua counters) + replica fronts that
translate (``python -m ...replica_front --openai``, with a real SentencePiece model: the sandbox's
stand-in for the checkpoint's) + NeMo stand-ins behind them, all on loopback. Usage is checked against
the tokenizer, texts against the stand-in's continuation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import sentencepiece
from live_endpoint import HOST, Endpoint, Replica, cluster_with, replica, running_endpoint
from nemotron_rehearsal.emulator import EOD, continuation

from nemotron_deploy import catalog

INSTRUCT = "nemotron-4-340b-instruct"
BASE_ID = "nemotron-4-340b-base"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Iterator[tuple[Endpoint, Replica]]:
    tmp = tmp_path_factory.mktemp("base")
    rep = replica()
    try:
        with running_endpoint(cluster_with(tmp), 1, tmp / "ep", openai=True) as ep, ep.front(rep) as port:
            ep.sync(r1=(HOST, port))
            ep.wait_status("r1", "up")
            yield ep, rep
    finally:
        rep.handle.stop()


@pytest.fixture(scope="module")
def instruct(tmp_path_factory) -> Iterator[tuple[Endpoint, Replica]]:
    tmp = tmp_path_factory.mktemp("instruct")
    rep = replica()
    try:
        inv = cluster_with(tmp, model=INSTRUCT)
        with running_endpoint(inv, 1, tmp / "ep", openai=True) as ep, ep.front(rep) as port:
            ep.sync(r1=(HOST, port))
            ep.wait_status("r1", "up")
            yield ep, rep
    finally:
        rep.handle.stop()


def client(ep: Endpoint, key: str = "client") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ep.url}/v1", api_key=ep.keys.get(key, key), max_retries=0, timeout=30)


def sp(ep: Endpoint) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=ep.tokenizer)


def count(ep: Endpoint, text: str) -> int:
    return len(sp(ep).encode(text))


def test_models_lists_the_deployed_model(base):
    ep, _ = base
    models = client(ep).models.list()
    assert [m.id for m in models.data] == [BASE_ID]
    assert models.data[0].model_extra["max_model_len"] == 4096


def test_completion_text_usage_and_length(base):
    """max_tokens below the stand-in's natural end: the text is its greedy continuation, finish_reason
    "length", completion_tokens == max_tokens, prompt_tokens by the tokenizer."""
    ep, rep = base
    prompt = "Deploying a large model, step one:"
    out = client(ep).completions.create(model=BASE_ID, prompt=prompt, max_tokens=5, temperature=0)
    expected, generated = continuation(prompt, 5)
    assert generated == 5
    choice = out.choices[0]
    assert choice.text == expected
    assert choice.finish_reason == "length"
    assert choice.index == 0
    assert out.object == "text_completion" and out.model == BASE_ID and out.id.startswith("cmpl-")
    assert out.usage.prompt_tokens == count(ep, prompt)
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    assert prompt in rep.requests


def test_completion_that_ends_reports_stop(base):
    """The stand-in's natural end (EOS) before max_tokens: "stop", the EOS string left out, and the
    tokens it generated (EOS included) counted."""
    ep, _ = base
    prompt = "A short poem about GPUs"
    expected, generated = continuation(prompt, 1000)
    assert expected.endswith(EOD) and generated < 1000
    out = client(ep).completions.create(model=BASE_ID, prompt=prompt, max_tokens=1000, temperature=0)
    assert out.choices[0].text == expected[: -len(EOD)]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == generated == count(ep, expected)


def test_stop_strings_n_echo_and_a_list_of_prompts(base):
    ep, _ = base
    prompts = ["first prompt", "second prompt"]
    full, _ = continuation(prompts[0], 40)
    stop = full.split()[3]  # the 4th generated word: the text stops before it
    out = client(ep).completions.create(
        model=BASE_ID, prompt=prompts, max_tokens=40, temperature=0, stop=[stop], n=2, echo=True
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    first = out.choices[0]
    assert first.text == prompts[0] + full[: full.index(stop)]
    assert first.finish_reason == "stop"
    assert out.choices[1].text == first.text  # greedy: both samples of a prompt agree
    assert out.choices[2].text.startswith(prompts[1])


def test_token_id_prompts_are_decoded_with_the_tokenizer(base):
    ep, _ = base
    text = "the GPU model"
    ids = sp(ep).encode(text)
    out = client(ep).completions.create(model=BASE_ID, prompt=ids, max_tokens=3, temperature=0)
    assert out.choices[0].text == continuation(text, 3)[0]
    with pytest.raises(openai.BadRequestError) as err:
        client(ep).completions.create(model=BASE_ID, prompt=[10**9], max_tokens=3)
    assert err.value.body["param"] == "prompt"


def test_logprobs_are_the_chosen_tokens(base):
    ep, _ = base
    out = client(ep).completions.create(
        model=BASE_ID, prompt="hello there", max_tokens=3, temperature=0, logprobs=1
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3
    assert all(isinstance(v, float) and v < 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text


def test_streaming_completion(base):
    ep, _ = base
    prompt = "stream me"
    chunks = list(
        client(ep).completions.create(model=BASE_ID, prompt=prompt, max_tokens=4, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == continuation(prompt, 4)[0]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == count(ep, prompt)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "tail"}, "suffix"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4096}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"n": 9}, "n"),
        ({"logprobs": 6}, "logprobs"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(base, params, param):
    ep, rep = base
    before = list(rep.requests)
    with pytest.raises(openai.BadRequestError) as err:
        client(ep).completions.create(model=BASE_ID, prompt="x", **params)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param, err.value.body
    assert err.value.body["type"] == "invalid_request_error"
    assert rep.requests == before  # nothing reached the replica


def test_zero_penalties_empty_logit_bias_and_user_are_accepted(base):
    """What LangChain sends by default."""
    ep, _ = base
    out = client(ep).completions.create(
        model=BASE_ID, prompt="x", max_tokens=2, presence_penalty=0, frequency_penalty=0, logit_bias={},
        best_of=1, user="someone", temperature=0.7, top_p=0.95, seed=7,
    )  # fmt: skip
    assert out.choices[0].finish_reason == "length"


def test_errors_are_openai_exceptions(base):
    ep, _ = base
    with pytest.raises(openai.AuthenticationError) as err:
        client(ep, key="wrong-key").completions.create(model=BASE_ID, prompt="x", max_tokens=2)
    assert err.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as nf:
        client(ep).completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as chat:
        client(ep).chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "hi"}])
    assert chat.value.body["code"] == "no_chat_template"


def test_a_200_with_an_error_string_becomes_400(base):
    """NeMo refuses with HTTP 200 and a JSON string: the client gets a 400 carrying NeMo's message."""
    ep, rep = base
    from nemotron_rehearsal import emulator

    generate = rep.handle.state.generate

    def refusing(sentences, params):
        if sentences != ["ping"]:
            raise emulator._Reply(200, "tokens_to_generate must be an integer greater than 0")
        return generate(sentences, params)

    rep.handle.state.generate = refusing
    try:
        with pytest.raises(openai.BadRequestError) as err:
            client(ep).completions.create(model=BASE_ID, prompt="x", max_tokens=2)
    finally:
        rep.handle.state.generate = generate
    assert "tokens_to_generate must be" in err.value.body["message"]


def test_chat_on_instruct_renders_the_template(instruct):
    ep, rep = instruct
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Name a GPU"}]
    out = client(ep).chat.completions.create(model=INSTRUCT, messages=messages, max_tokens=6, temperature=0)
    prompt = "<extra_id_0>System\n\n<extra_id_1>User\nName a GPU\n<extra_id_1>Assistant\n"
    assert rep.requests[-1] == prompt
    expected, _ = continuation(prompt, 6, end_strings=[EOD, *catalog.model(INSTRUCT).chat_stop])
    assert out.choices[0].message.content == expected
    assert out.choices[0].message.role == "assistant"
    assert out.object == "chat.completion" and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == count(ep, prompt)
    assert out.usage.completion_tokens == 6
    streamed = list(
        client(ep).chat.completions.create(
            model=INSTRUCT, messages=messages, max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    assert streamed[-1].choices[0].finish_reason == "length" and streamed[-1].usage.completion_tokens == 6


def test_langchain(base, instruct):
    from langchain_openai import ChatOpenAI, OpenAI

    ep, _ = base
    llm = OpenAI(
        model=BASE_ID,
        base_url=f"{ep.url}/v1",
        api_key=ep.keys["client"],
        max_tokens=4,
        temperature=0,
        max_retries=0,
    )
    assert llm.invoke("LangChain says") == continuation("LangChain says", 4)[0]
    results = llm.generate(["a", "b", "c"])
    assert len(results.generations) == 3
    assert results.llm_output["token_usage"]["completion_tokens"] == 12
    iep, _ = instruct
    chat = ChatOpenAI(
        model=INSTRUCT,
        base_url=f"{iep.url}/v1",
        api_key=iep.keys["client"],
        max_tokens=4,
        temperature=0,
        max_retries=0,
    )
    reply = chat.invoke("Hello")
    assert reply.content and reply.usage_metadata["output_tokens"] == 4
    assert "".join(c.content for c in chat.stream("Hello")) == reply.content


def test_curl_and_the_per_key_metrics(base):
    ep, _ = base
    curl = shutil.which("curl")
    assert curl, "curl is needed (scripts/setup installs it)"
    body = json.dumps({"model": BASE_ID, "prompt": "curl", "max_tokens": 2, "temperature": 0})
    out = subprocess.run(
        [curl, "-sS", "-H", "@-", "-H", "Content-Type: application/json", "-d", body, f"{ep.url}/v1/completions"],
        input=f"Authorization: Bearer {ep.keys['client']}\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    answer = json.loads(out.stdout)
    assert answer["choices"][0]["text"] == continuation("curl", 2)[0]
    status, _, text = ep.request("GET", "/metrics/openai", key=None)  # from 127.0.0.1: allowed
    assert status == 200, text
    assert 'nemotron_openai_requests_total{key="client",route="completions"}' in text
    assert 'nemotron_openai_completion_tokens_total{key="client",route="completions"}' in text
    status, _, _ = ep.request("GET", "/metrics/openai", key=None, source="127.0.0.2")
    assert status in (401, 403)
    # NeMo's own route still works beside it.
    status, text = ep.put({"sentences": ["plain"], "tokens_to_generate": 2, "greedy": True})
    assert status == 200 and json.loads(text)["sentences"][0].startswith("plain")


def test_no_replica_is_a_503(tmp_path):
    with running_endpoint(cluster_with(tmp_path), 1, tmp_path / "ep", openai=True) as ep:
        with pytest.raises(openai.InternalServerError) as err:
            client(ep).completions.create(model=BASE_ID, prompt="x", max_tokens=2)
    assert err.value.status_code == 503
    assert "No replica is up" in err.value.body["message"]


def test_the_deployed_call_server_chats_with_an_instruct_model(instruct, tmp_path):
    """call_server.py rendered for an instruct inventory: --chat wraps the prompt in the catalog's
    template and prints the reply up to the first end string; for a base model --chat is refused."""
    ep, rep = instruct
    import sys

    from helpers import write_inventory

    for model, name in ((INSTRUCT, "instruct"), ("nemotron-4-340b", "base")):
        inv = write_inventory(tmp_path / name, "h100", settings={"model": model})
        rendered = subprocess.run(
            [sys.executable, "-m", "nemotron_deploy.cli", "render", str(inv), "--out", str(tmp_path / f"{name}-files")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert rendered.returncode == 0, rendered.stderr
    argv = [sys.executable, str(tmp_path / "instruct-files" / "call_server.py"), "--host", HOST, "--port",
            str(rep.port), "--tokens", "6", "--chat", "--prompt", "Which GPU?", "--json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    prompt = "<extra_id_0>System\n\n<extra_id_1>User\nWhich GPU?\n<extra_id_1>Assistant\n"
    assert rep.requests[-1] == prompt
    expected, _ = continuation(prompt, 6, end_strings=[EOD, *catalog.model(INSTRUCT).chat_stop])
    assert json.loads(done.stdout) == [expected.split(EOD)[0]]
    argv[1] = str(tmp_path / "base-files" / "call_server.py")
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--chat needs a chat model" in refused.stderr


def _counter(metrics: str, series: str) -> int:
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return int(line.split()[-1])
    return 0


def test_routes_methods_and_the_fronts_token_counts(base):
    """Exact routes (405 with Allow, 404 in OpenAI's shape, both answered by HAProxy), and each answer's
    token counts go from the replica's front to the per-key counters, never to the client."""
    ep, _ = base
    status, headers, text = ep.request("GET", "/v1/completions")
    assert (status, headers.get("allow")) == (405, "POST"), text
    status, headers, _ = ep.request("POST", "/v1/models", {})
    assert (status, headers.get("allow")) == (405, "GET")
    status, _, text = ep.request("POST", "/v1/embeddings", {"model": BASE_ID, "input": "x"})
    assert status == 404 and json.loads(text)["error"]["code"] == "not_found"
    status, _, _ = ep.request("GET", "/v1/models", key=None)
    assert status == 401
    series = '{key="client",route="completions"}'
    _, _, before = ep.request("GET", "/metrics/openai", key=None)
    body = {"model": BASE_ID, "prompt": "count these tokens", "max_tokens": 3, "temperature": 0}
    status, headers, text = ep.request("POST", "/v1/completions", body)
    assert status == 200, text
    assert "x-nemotron-usage" not in headers
    usage = json.loads(text)["usage"]
    _, _, after = ep.request("GET", "/metrics/openai", key=None)
    for name, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
        metric = f"nemotron_openai_{name}_tokens_total{series}"
        assert _counter(after, metric) - _counter(before, metric) == usage[field], (name, after)
    requests = f"nemotron_openai_requests_total{series}"
    assert _counter(after, requests) - _counter(before, requests) == 1


@contextmanager
def one_held_request(tmp_path: Path, **settings) -> Iterator[tuple[Endpoint, Replica, dict]]:
    """One slow replica behind its front, and a /v1/completions (key "client") it is generating:
    yields once that request reached the replica; its answer lands in the dict's "answer"."""
    import threading

    from live_endpoint import wait_for

    a = replica(slow_seconds=5.0)
    try:
        with running_endpoint(cluster_with(tmp_path, **settings), 1, tmp_path / "ep", openai=True) as ep:
            with ep.front(a) as port:
                ep.sync(r1=(HOST, port))
                ep.wait_status("r1", "up", timeout=20)
                held: dict = {}
                body = {"model": BASE_ID, "prompt": "hold it", "max_tokens": 1, "temperature": 0}
                first = threading.Thread(
                    target=lambda: held.update(answer=ep.request("POST", "/v1/completions", body))
                )
                first.start()
                wait_for(lambda: "hold it" in a.requests, 10, "the first request to reach the replica")
                yield ep, a, held
                first.join(30)
                assert held["answer"][0] == 200, held
    finally:
        a.handle.stop()


def _second(ep: Endpoint, key: str) -> tuple[int, dict, dict]:
    body = {"model": BASE_ID, "prompt": "one more", "max_tokens": 1, "temperature": 0}
    status, headers, text = ep.request("POST", "/v1/completions", body, key=key)
    return status, headers, json.loads(text)["error"]


def test_the_queue_timeout_is_a_503_in_openais_shape_counted_per_key(tmp_path):
    """A second /v1/completions waits endpoint_queue_seconds (1) and gets HAProxy's own 503, in
    OpenAI's shape on this route (NeMo's JSON string on PUT /generate), with Retry-After, and counted
    as an error of its key and route."""
    with one_held_request(tmp_path, endpoint_queue_seconds=1) as (ep, a, held):
        status, headers, error = _second(ep, "health")
        assert "answer" not in held, "the first request was answered before the second's 503"
        assert (status, error["code"], headers.get("retry-after")) == (503, "replicas_busy", "1"), error
        assert "endpoint_queue_seconds" in error["message"] and "one more" not in a.requests
        _, _, metrics = ep.request("GET", "/metrics/openai", key=None)
        assert 'nemotron_openai_errors_total{key="health",route="completions",status="503"} 1' in metrics


def test_a_key_over_its_limit_gets_429_counted_per_key(tmp_path):
    """endpoint_max_inflight_per_key = 1: while a key's request is held, its next is a 429 (OpenAI's
    shape, from HAProxy), counted as an error of that key and route."""
    with one_held_request(tmp_path, endpoint_max_inflight_per_key=1) as (ep, _, held):
        status, _, error = _second(ep, "client")
        assert "answer" not in held, "the first request was answered before the 429"
        assert (status, error["code"]) == (429, "rate_limit_exceeded"), error
        _, _, metrics = ep.request("GET", "/metrics/openai", key=None)
        assert 'nemotron_openai_errors_total{key="client",route="completions",status="429"} 1' in metrics
