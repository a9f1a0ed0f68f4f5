"""The OpenAI translation (service/openai/protocol.py, chat.py, shaping.py), held against
NeMo's own request validation: every OpenAI field that maps to a NeMo field is sent at its edge values,
and every body the translation builds is PUT to NeMo's own Flask app (tests/nemo_reference.py, the
vendored text_generation_server.py of nemo_toolkit 1.23.0), which must accept it (a JSON object with
sentences, not its 200-with-a-string refusal). What NeMo would refuse, the translation refuses first with
400 naming the OpenAI field."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import nemo_reference
import pytest
from nemotron_rehearsal import tokenizer as stand_in

from nemotron_deploy import catalog
from nemotron_deploy.service.openai import chat, protocol, shaping
from nemotron_deploy.service.openai.errors import ApiError
from nemotron_deploy.service.openai.tokenizer import Tokenizer

BASE = protocol.Limits(
    model="nemotron-4-340b-base", context_length=4096, max_prompts=8, logprobs_allowed=True
)
SPEC = catalog.model("nemotron-4-340b-instruct")
INSTRUCT = protocol.Limits(
    model="nemotron-4-340b-instruct",
    context_length=4096,
    max_prompts=8,
    logprobs_allowed=True,
    chat_template=dict(SPEC.chat_template),
    chat_stop=SPEC.chat_stop,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(str(stand_in.train(tmp_path_factory.mktemp("tok") / "tokenizer.model")))


@pytest.fixture(scope="module")
def nemo(tmp_path_factory) -> Iterator[int]:
    problem = nemo_reference.missing_requirements()
    if problem:
        pytest.fail(problem)
    with nemo_reference.start(tmp_path_factory.mktemp("nemo") / "nemo.log") as port:
        yield port


def put(port: int, body: dict) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("PUT", "/generate", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def completion(tok, **fields) -> protocol.Job:
    return protocol.completion({"model": BASE.model, "prompt": "hello", **fields}, BASE, tok)


ACCEPTED = [
    {},
    {"temperature": 0},
    {"temperature": 1e-9},
    {"temperature": 2},
    {"temperature": 100},
    {"temperature": None},
    {"top_p": 0},
    {"top_p": 1},
    {"top_p": 0.5},
    {"max_tokens": 1},
    {"max_tokens": "the rest of the context"},  # prompt + max_tokens == 4096 exactly
    {"seed": 0},
    {"seed": 2**31},
    {"n": 8},
    {"stop": "x"},
    {"stop": ["a", "b", "c", "d"]},
    {"stop": []},
    {"stop": [""]},
    {"logprobs": 0},
    {"logprobs": 5},
    {"echo": True},
    {"prompt": ["a", "b"]},
    {"prompt": [5, 6, 7]},
    {"prompt": [[5], [6, 7]]},
    {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "best_of": 1,
        "user": "u",
        "suffix": None,
    },
]


@pytest.mark.parametrize("fields", ACCEPTED, ids=[json.dumps(f)[:60] for f in ACCEPTED])
def test_every_body_the_translation_builds_is_accepted_by_nemo(nemo, tok, fields):
    if fields.get("max_tokens") == "the rest of the context":
        fields = {"max_tokens": 4096 - tok.count("hello")}
    job = completion(tok, **fields)
    status, answer = put(nemo, job.body)
    assert status == 200 and isinstance(answer, dict) and "sentences" in answer, (job.body, answer)
    assert len(answer["sentences"]) == len(job.prompts)
    assert job.body["repetition_penalty"] == 1.0 and job.body["add_BOS"] is False and job.body["top_k"] == 0
    assert protocol.EOD in job.body["end_strings"]


def test_temperature_zero_is_greedy_without_a_temperature(tok):
    job = completion(tok, temperature=0)
    assert job.body["greedy"] is True and "temperature" not in job.body
    assert completion(tok, temperature=0.5).body["temperature"] == 0.5


REFUSED = [
    ({"temperature": -0.1}, "temperature", {"temperature": -0.1}),
    ({"temperature": 100.5}, "temperature", {"temperature": 100.5}),
    ({"temperature": True}, "temperature", {"temperature": True}),
    ({"top_p": 1.01}, "top_p", {"top_p": 1.01}),
    ({"top_p": -0.01}, "top_p", {"top_p": -0.01}),
    ({"max_tokens": 0}, "max_tokens", {"tokens_to_generate": 0}),
    ({"max_tokens": 1.5}, "max_tokens", {"tokens_to_generate": 1.5}),
    ({"seed": -1}, "seed", {"random_seed": -1}),
    ({"seed": 1.0}, "seed", {"random_seed": 1.0}),
    ({"echo": "yes"}, "echo", {"compute_logprob": "yes"}),
    ({"stop": ["a", 1]}, "stop", {"end_strings": ["a", 1]}),
]


@pytest.mark.parametrize(
    ("fields", "param", "nemo_body"), REFUSED, ids=[r[1] + json.dumps(r[0]) for r in REFUSED]
)
def test_what_nemo_refuses_the_translation_refuses_first(nemo, tok, fields, param, nemo_body):
    """NeMo answers the same value, mapped naively, with its 200-with-a-string: the translation says 400
    and names the OpenAI field instead."""
    with pytest.raises(ApiError) as err:
        completion(tok, **fields)
    assert (err.value.status, err.value.param) == (400, param)
    status, answer = put(nemo, {"sentences": ["hello"], **nemo_body})
    assert status == 200 and isinstance(answer, str), answer


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 4096}, "max_tokens"),  # prompt + max_tokens beyond the context
        ({"n": 9}, "n"),  # 9 sentences > inference_batch 8
        ({"prompt": ["a"] * 9}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [256000]}, "prompt"),
        ({"presence_penalty": 0.1}, "presence_penalty"),
        ({"logit_bias": {"1": 1}}, "logit_bias"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "s"}, "suffix"),
        ({"logprobs": 6}, "logprobs"),
        ({"stream": "yes"}, "stream"),
        ({"model": None}, "model"),
    ],
)
def test_what_nemo_cannot_honour_is_a_400_naming_the_field(tok, fields, param):
    with pytest.raises(ApiError) as err:
        completion(tok, **fields)
    assert (err.value.status, err.value.param) == (400, param)
    body = json.loads(err.value.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_another_model_is_404(tok):
    with pytest.raises(ApiError) as err:
        completion(tok, model="gpt-4o")
    assert (err.value.status, err.value.code) == (404, "model_not_found")


def test_logprobs_refused_where_the_plan_does_not_hold_them(tok):
    limits = protocol.Limits(model=BASE.model, context_length=4096, max_prompts=8, logprobs_allowed=False)
    with pytest.raises(ApiError) as err:
        protocol.completion({"model": BASE.model, "prompt": "x", "logprobs": 1}, limits, tok)
    assert err.value.param == "logprobs"
    assert (
        protocol.completion({"model": BASE.model, "prompt": "x"}, limits, tok).body["compute_logprob"]
        is False
    )


def test_the_instruct_template_is_the_model_cards(nemo, tok):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
    ]
    assert chat.render(INSTRUCT.chat_template, messages) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello.\n"
        "<extra_id_1>User\nWhy?\n<extra_id_1>Assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert chat.render(INSTRUCT.chat_template, with_system).startswith(
        "<extra_id_0>System\nBe brief.\n<extra_id_1>User"
    )
    job = protocol.chat({"model": INSTRUCT.model, "messages": messages, "temperature": 0}, INSTRUCT, tok)
    assert job.body["end_strings"] == ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]
    assert job.max_tokens == 4096 - tok.count(job.prompts[0])
    status, answer = put(nemo, job.body)
    assert status == 200 and "sentences" in answer


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "assistant", "content": "x"}], "messages"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            "messages[2].role",
        ),
    ],
)
def test_chat_messages_the_template_cannot_render(tok, messages, param):
    with pytest.raises(ApiError) as err:
        protocol.chat({"model": INSTRUCT.model, "messages": messages}, INSTRUCT, tok)
    assert err.value.param == param


def test_a_base_model_has_no_chat(tok):
    with pytest.raises(ApiError) as err:
        protocol.chat({"model": BASE.model, "messages": [{"role": "user", "content": "x"}]}, BASE, tok)
    assert err.value.code == "no_chat_template"


def _answer(prompt: str, generated: str) -> dict:
    return {
        "sentences": [prompt + generated],
        "tokens": [[]],
        "logprob": None,
        "token_ids": [[]],
        "offsets": [[]],
    }


@pytest.mark.parametrize(
    ("generated", "max_tokens", "text", "finish"),
    [
        (" the GPU", 2, " the GPU", "length"),  # ran out of tokens
        (" the<|endoftext|>", 5, " the", "stop"),  # EOS before max_tokens
        (" the<|endoftext|>", 2, " the", "stop"),  # EOS as the last allowed token: still a stop
        (" the model data", 3, " the model", "stop"),  # a client stop string, left out
    ],
)
def test_text_and_finish_reason(tok, generated, max_tokens, text, finish):
    job = completion(tok, max_tokens=max_tokens, stop=" data")
    body, usage = shaping.response(job, BASE.model, _answer("hello", generated), tok)
    assert body["choices"][0]["text"] == text
    assert body["choices"][0]["finish_reason"] == finish
    assert usage["completion_tokens"] == tok.count(generated)
    assert usage["prompt_tokens"] == tok.count("hello")


def test_sse_ends_with_done_and_usage_on_the_final_chunk(tok):
    job = completion(tok, max_tokens=2, stream=True)
    body, _ = shaping.response(job, BASE.model, _answer("hello", " the GPU"), tok)
    events = shaping.sse(body).decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert chunks[0]["choices"][0]["text"] == " the GPU" and chunks[0]["choices"][0]["finish_reason"] is None
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def test_the_stand_in_tokenizer_counts_the_emulators_words(tok):
    """The sandbox's tokenizer agrees with the emulator's tokens, as a checkpoint's with NeMo."""
    from nemotron_rehearsal.emulator import continuation

    for prompt in ("a", "b c", "Write"):
        text, generated = continuation(prompt, 300)
        assert tok.count(text) == generated


def test_catalog_instruct_sizes_as_base():
    base, instruct = catalog.model("nemotron-4-340b"), catalog.model("nemotron-4-340b-instruct")
    assert base.parameter_count == instruct.parameter_count
    assert base.openai_id == "nemotron-4-340b-base" and instruct.openai_id == "nemotron-4-340b-instruct"
    assert base.chat_template is None and instruct.chat_template is not None
