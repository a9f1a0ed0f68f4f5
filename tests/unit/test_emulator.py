"""The NeMo server stand-in must answer exactly like megatron_gpt_eval.py + text_generation_server.py.

In-process tests use `serve_in_thread` on 127.0.0.1; script-mode tests copy the file verbatim to a
temporary `megatron_gpt_eval.py` and run it with Debian's /usr/bin/python3 in isolated mode, as the
sandbox does on its fake compute nodes.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import model_card_client
from nemotron_rehearsal import EMULATOR as EMULATOR_FILE
from nemotron_rehearsal.emulator import continuation, serve_in_thread

EMULATOR = EMULATOR_FILE
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
JSON = {"Content-Type": "application/json"}

NEMOTRON_CONFIG = """\
mcore_gpt: true
tensor_model_parallel_size: 8
pipeline_model_parallel_size: 2
encoder_seq_length: 4096
num_layers: 96
hidden_size: 18432
num_attention_heads: 96
num_query_groups: 8  # head dim 192
tokenizer:
  library: sentencepiece
  model: nemo:nemotron_2_256k.model
"""


def request(
    port: int,
    method: str,
    path: str = "/generate",
    body: object = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=JSON if headers is None else headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def generate(port: int, body: object, **kw) -> tuple[int, object]:
    status, _, data = request(port, "PUT", "/generate", body, **kw)
    return status, json.loads(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # e.g. reset while the listening socket is being closed: ask again
        return False
    return False


def wait_until(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


@pytest.fixture
def emu():
    handle = serve_in_thread()
    yield handle
    handle.stop()


# --------------------------------------------------------------------------------------------------
# HTTP protocol
# --------------------------------------------------------------------------------------------------


# test_emulator_parity.py checks every answer against NeMo's own app; these say what it does.
@pytest.mark.parametrize("method", ["GET", "PUT", "POST"])
def test_root_is_flask_404(emu, method):
    status, headers, body = request(emu.port, method, "/", {"sentences": ["x"]})
    assert status == 404
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"<title>404 Not Found</title>" in body


@pytest.mark.parametrize("path", ["/health", "/v1/completions", "/generate/"])
def test_other_paths_are_the_static_route(emu, path):
    # Flask(__name__, static_url_path='') serves '/<path:filename>' for GET/HEAD/OPTIONS: with no
    # static folder a GET is 404, and any other method is 405.
    status, _, body = request(emu.port, "GET", path)
    assert status == 404 and b"<title>404 Not Found</title>" in body
    status, headers, body = request(emu.port, "PUT", path, {"sentences": ["x"]})
    assert status == 405 and b"<title>405 Method Not Allowed</title>" in body
    assert set(headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


def test_generate_get_is_the_static_route_404(emu):
    assert request(emu.port, "GET", "/generate")[0] == 404


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_generate_is_put_only(emu, method):
    status, headers, body = request(emu.port, method, "/generate", {"sentences": ["x"]})
    assert status == 405
    assert set(headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS", "PUT"}
    # flask-restful's JSON or Flask's HTML, as the order of Allow (a set's, per hash seed) decides.
    if headers["Allow"].startswith(("PUT", "OPTIONS")):
        assert json.loads(body) == {"message": "The method is not allowed for the requested URL."}
    else:
        assert b"<title>405 Method Not Allowed</title>" in body


def test_success_shape_and_determinism(emu):
    body = {"sentences": ["Write a poem", "Hello"], "tokens_to_generate": 5, "greedy": True}
    status, out = generate(emu.port, body)
    assert status == 200
    assert set(out) == {"sentences", "tokens", "logprob", "token_ids", "offsets"}
    assert out["logprob"] is None
    assert [s.startswith(p) for s, p in zip(out["sentences"], body["sentences"], strict=True)] == [True, True]
    for sentence, tokens, ids, offsets in zip(
        out["sentences"], out["tokens"], out["token_ids"], out["offsets"], strict=True
    ):
        assert len(tokens) == len(ids) == len(offsets)
        assert all(isinstance(i, int) for i in ids)
        assert offsets == sorted(offsets) and offsets[-1] < len(sentence)
    # tokens_to_generate counts words: 5 new words after the prompt
    assert len(out["sentences"][0][len("Write a poem") :].split()) == 5
    assert generate(emu.port, body) == (200, out)


def test_compute_logprob_and_all_probs(emu):
    status, out = generate(
        emu.port, {"sentences": ["abc"], "tokens_to_generate": 3, "compute_logprob": True, "all_probs": True}
    )
    assert status == 200
    assert len(out["logprob"][0]) == len(out["tokens"][0]) - 1
    assert len(out["full_logprob"][0]) == len(out["tokens"][0]) - 1


def test_end_strings_stop_generation(emu):
    _, full = generate(emu.port, {"sentences": ["Once upon"], "tokens_to_generate": 6, "greedy": True})
    third_word = full["sentences"][0].split()[4]
    _, cut = generate(
        emu.port,
        {
            "sentences": ["Once upon"],
            "tokens_to_generate": 6,
            "greedy": True,
            "end_strings": [" " + third_word],
        },
    )
    assert cut["sentences"][0].endswith(" " + third_word)
    assert len(cut["sentences"][0]) <= len(full["sentences"][0])


def test_generation_ends_naturally_with_endoftext():
    text, n = continuation(
        "Write a poem on NVIDIA in the style of Shakespeare", 1024, min_tokens_to_generate=1
    )
    assert text.endswith("<|endoftext|>") and 8 < n < 1024


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tokens_to_generate": 0}, "tokens_to_generate must be an integer greater than 0"),
        ({"tokens_to_generate": "5"}, "tokens_to_generate must be an integer greater than 0"),
        ({"all_probs": 1}, "all_probs must be a boolean value"),
        ({"temperature": 0}, "temperature must be a positive number less than or equal to 100.0"),
        ({"temperature": True}, "temperature must be a positive number less than or equal to 100.0"),
        ({"add_BOS": "no"}, "add_BOS must be a boolean value"),
        ({"greedy": None}, "greedy must be a boolean value"),
        ({"top_k": -1}, "top_k must be a positive integer number"),
        ({"top_p": 1.5}, "top_p must be a positive number less than or equal to 1.0"),
        ({"repetition_penalty": 0.5}, "repetition_penalty must be a positive number no less than 1.0"),
        ({"end_strings": "<|endoftext|>"}, "expect end_strings to be a list of strings"),
        ({"end_strings": [1]}, "expect end_strings to be a list of strings"),
        ({"min_tokens_to_generate": -1}, "min_tokens_to_generate must be an integer no less than 0"),
        ({"neighbors": -2}, "num of neighbors must be an integer no less than 0"),
        ({"compute_logprob": "yes"}, "compute_logprob must be a boolean value"),
        ({"random_seed": -1}, "random_seed must be a positive integer number or None"),
        # NeMo checks in this order: the first failing key wins
        ({"tokens_to_generate": 0, "temperature": 0}, "tokens_to_generate must be an integer greater than 0"),
    ],
)
def test_validation_errors_are_200_with_a_json_string(emu, extra, message):
    status, out = generate(emu.port, {"sentences": ["x"], **extra})
    assert (status, out) == (200, message)


def test_task_ids_need_tensors(emu):
    status, out = generate(emu.port, {"sentences": ["x"], "task_ids": [0]})
    assert status == 200 and out.startswith("Input at 'sentences' must by a tuple of two tensors")


def test_unknown_keys_are_only_logged(emu):
    assert generate(emu.port, {"sentences": ["x"], "tokens_to_generate": 1, "max_tokens": 3})[0] == 200


def test_sentence_limit_is_128_with_status_400(emu):
    assert generate(emu.port, {"sentences": ["x"] * 129, "tokens_to_generate": 1}) == (
        400,
        "Maximum number of sentences is 128",
    )
    status, out = generate(emu.port, {"sentences": ["x"] * 128, "tokens_to_generate": 1})
    assert status == 200 and len(out["sentences"]) == 128


def test_missing_sentences_and_non_object_json_are_500(emu):
    assert generate(emu.port, {"tokens_to_generate": 1}) == (500, {"message": "Internal Server Error"})
    assert generate(emu.port, ["x"]) == (500, {"message": "Internal Server Error"})
    status, _, _ = request(emu.port, "PUT", raw=b"{not json")
    assert status == 400
    status, _, _ = request(
        emu.port, "PUT", raw=b'{"sentences": ["x"]}', headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    # none of these reached the model: it still generates
    assert generate(emu.port, {"sentences": ["x"], "tokens_to_generate": 1})[0] == 200


def test_an_exception_inside_generation_wedges_the_server(emu):
    # sentences that are not strings crash generate() after rank 0 broadcast: 500, then every
    # later request hangs (the other ranks are stuck in a collective), while / still answers.
    assert generate(emu.port, {"sentences": [1, 2], "tokens_to_generate": 1})[0] == 500
    with pytest.raises(TimeoutError):
        generate(emu.port, {"sentences": ["x"], "tokens_to_generate": 1}, timeout=0.5)
    assert request(emu.port, "GET", "/")[0] == 404


def test_one_lock_serialises_generation():
    with serve_in_thread(slow_seconds=0.4) as h:
        done: list[float] = []
        start = time.monotonic()

        def one() -> None:
            assert generate(h.port, {"sentences": ["x"], "tokens_to_generate": 1})[0] == 200
            done.append(time.monotonic() - start)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(done) == 2
        first, second = sorted(done)
        assert first >= 0.38 and second >= 0.78, done  # the second waited for the first
        assert h.generations == 2


def test_token_seconds_make_big_requests_hold_the_lock():
    with serve_in_thread(token_seconds=0.01) as h:
        t0 = time.monotonic()
        generate(h.port, {"sentences": ["x"], "tokens_to_generate": 5, "greedy": True})
        small = time.monotonic() - t0
        t0 = time.monotonic()
        generate(h.port, {"sentences": ["x"], "tokens_to_generate": 60, "min_tokens_to_generate": 60})
        big = time.monotonic() - t0
        # Lower bounds only (60 tokens x 10 ms): a loaded machine makes both slower, never faster.
        assert big >= 0.6 and big > small, (small, big)


def test_hang_after_accepts_but_never_answers():
    with serve_in_thread(hang_after=1) as h:
        assert generate(h.port, {"sentences": ["x"], "tokens_to_generate": 1})[0] == 200
        with pytest.raises(TimeoutError):
            generate(h.port, {"sentences": ["x"], "tokens_to_generate": 1}, timeout=0.5)
        assert request(h.port, "PUT", "/")[0] == 404  # the port is open, Flask still routes


def test_crash_after_closes_the_port_in_process():
    with serve_in_thread(crash_after=1) as h:
        assert generate(h.port, {"sentences": ["x"], "tokens_to_generate": 1})[0] == 200
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            generate(h.port, {"sentences": ["x"], "tokens_to_generate": 1})
        assert wait_until(lambda: refused(h.port), 5)


def test_load_delay_keeps_the_port_closed(tmp_path):
    ready_file = tmp_path / "ready"
    t0 = time.time()
    with serve_in_thread(load_delay=0.5, ready_file=str(ready_file)) as h:
        assert refused(h.port)  # loading: nothing listens, not even a 404
        assert h.wait_ready(5)
        assert request(h.port, "GET", "/")[0] == 404
        assert generate(h.port, {"sentences": ["x"], "tokens_to_generate": 1})[0] == 200
        assert float(ready_file.read_text()) >= t0 + 0.45


# --------------------------------------------------------------------------------------------------
# Script mode (what srun runs on the fake nodes)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def script(tmp_path: Path) -> Path:
    target = tmp_path / "NeMo" / "megatron_gpt_eval.py"
    target.parent.mkdir()
    shutil.copyfile(EMULATOR, target)  # verbatim, far from the package: must be self-contained
    return target


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "Nemotron-4-340B-Base"
    (d / "model_weights").mkdir(parents=True)
    (d / "model_config.yaml").write_text(NEMOTRON_CONFIG)
    return d


def args(model: Path, port: int, tp: int = 8, pp: int = 2, devices: int = 8, nodes: int = 2) -> list[str]:
    return [
        f"gpt_model_file={model}",
        f"tensor_model_parallel_size={tp}",
        f"pipeline_model_parallel_size={pp}",
        "pipeline_model_parallel_split_rank=0",
        f"trainer.devices={devices}",
        f"trainer.num_nodes={nodes}",
        "trainer.precision=bf16",
        "server=True",
        "web_server=False",
        f"port={port}",
    ]


def run_script(script: Path, argv: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEMO_EMULATOR_", "RANK"))}
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-I", str(script), *argv],
        env={**clean, "NEMO_EMULATOR_LOAD_DELAY": "0.3", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def finish(proc: subprocess.Popen, timeout: float = 10) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def test_tp_times_pp_must_match_devices_times_nodes(script, model):
    rc, output = finish(run_script(script, args(model, free_port(), tp=8, pp=2, devices=8, nodes=1)))
    assert rc == 1
    assert (
        "devices * num_nodes should equal tensor_model_parallel_size * pipeline_model_parallel_size" in output
    )
    assert "Error executing job with overrides" in output


def test_slurm_ntasks_must_match_the_world_size(script, model):
    rc, output = finish(
        run_script(script, args(model, free_port()), {"SLURM_NTASKS": "8", "SLURM_PROCID": "3"})
    )
    assert rc == 1 and "SLURM_NTASKS=8" in output


def test_lightning_checks_tasks_per_node(script, model):
    env = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2"}
    rc, output = finish(run_script(script, args(model, free_port()), env))
    assert rc == 1 and "HINT: Set `devices=4`" in output


def test_checkpoint_dir_must_exist_and_hold_model_config(script, tmp_path, model):
    rc, output = finish(run_script(script, args(tmp_path / "nope", free_port())))
    assert rc == 1 and "Can't find" in output
    (model / "model_config.yaml").unlink()
    rc, output = finish(run_script(script, args(model, free_port())))
    assert rc == 1 and "model_config.yaml" in output


def test_tp_must_divide_query_groups(script, model):
    rc, output = finish(run_script(script, args(model, free_port(), tp=16, pp=1, devices=8, nodes=2)))
    assert rc == 1 and "num_query_groups (8) must be a multiple of tensor_model_parallel_size (16)" in output


def test_rank0_loads_then_serves_and_dies_on_sigterm(script, model, tmp_path):
    port = free_port()
    ready = tmp_path / "ready"
    t0 = time.time()
    proc = run_script(
        script,
        [*args(model, port), "foo.bar=1"],
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "NEMO_EMULATOR_READY_FILE": str(ready)},
    )
    try:
        assert refused(port)  # loading
        assert wait_until(lambda: ready.exists(), 10)
        assert float(ready.read_text()) >= t0 + 0.25
        assert request(port, "GET", "/")[0] == 404
        status, out = generate(port, {"sentences": ["Hello"], "tokens_to_generate": 2})
        assert status == 200 and out["sentences"][0].startswith("Hello ")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc, output = finish(proc)
    assert rc != 0
    assert "ignoring unknown override 'foo.bar=1'" in output
    assert '"PUT /generate HTTP/1.1" 200' in output  # werkzeug-style access log


def test_other_ranks_block_without_serving_and_exit_fast_on_sigterm(script, model):
    port = free_port()
    proc = run_script(script, args(model, port), {"SLURM_PROCID": "5", "SLURM_NTASKS": "16"})
    try:
        line = ""
        while "waiting for rank 0" not in line:  # loaded, now "in torch.distributed.broadcast"
            line = proc.stderr.readline()
            assert line, "the rank exited instead of waiting for rank 0"
        assert proc.poll() is None and refused(port)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
        assert time.monotonic() - t0 < 1.0
    finally:
        proc.kill()
        proc.communicate()


def _listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses a TCP socket listens on at `port` (/proc/net/tcp, state 0A)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, _, hexport = local.partition(":")
        if state == "0A" and int(hexport, 16) == port:
            out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out


@pytest.mark.parametrize("bind", [None, "127.0.0.1"])
def test_rank0_listens_on_every_address_unless_told_otherwise(script, model, tmp_path, bind):
    """As NeMo, 0.0.0.0; NEMO_EMULATOR_BIND=127.0.0.1 (benchmarks) keeps it on loopback."""
    port = free_port()
    ready = tmp_path / "ready"
    env = {"NEMO_EMULATOR_READY_FILE": str(ready), **({"NEMO_EMULATOR_BIND": bind} if bind else {})}
    proc = run_script(script, args(model, port, tp=1, pp=1, devices=1, nodes=1), env)
    try:
        assert wait_until(lambda: ready.exists(), 10)
        assert _listening_addresses(port) == {bind or "0.0.0.0"}
        assert generate(port, {"sentences": ["Hi"], "tokens_to_generate": 1})[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc, output = finish(proc)
    expected = "Running on all addresses (0.0.0.0)" if bind is None else f"Running on http://{bind}:{port}"
    assert expected in output


def test_fail_load_dies_before_listening(script, model):
    port = free_port()
    rc, output = finish(run_script(script, args(model, port), {"NEMO_EMULATOR_FAIL_LOAD": "1"}))
    assert rc == 1 and "NEMO_EMULATOR_FAIL_LOAD" in output
    assert refused(port)


def test_crash_after_kills_rank0(script, model):
    port = free_port()
    proc = run_script(script, args(model, port), {"NEMO_EMULATOR_CRASH_AFTER": "1"})
    try:
        assert wait_until(lambda: not refused(port), 10)
        assert generate(port, {"sentences": ["x"], "tokens_to_generate": 1})[0] == 200
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            generate(port, {"sentences": ["x"], "tokens_to_generate": 1})
        assert proc.wait(5) == 1
    finally:
        proc.kill()
        proc.communicate()


# --------------------------------------------------------------------------------------------------
# The model card's own client
# --------------------------------------------------------------------------------------------------


def test_model_card_client_runs_unchanged_against_the_emulator(tmp_path):
    call_server = model_card_client()  # skips unless NEMOTRON_MODEL_CARD_CLIENT is set (.ci/run sets it)
    try:
        import requests  # noqa: F401
    except ImportError:
        pytest.fail("this test needs `requests` (the model card's client uses it): pip install requests")
    # call_server.py hardcodes localhost:1424; wait for the port if another test run holds it
    handle = None
    deadline = time.monotonic() + 15
    while handle is None:
        try:
            handle = serve_in_thread(port=1424)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        result = subprocess.run(
            [sys.executable, str(call_server)], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    finally:
        handle.stop()
    assert result.returncode == 0, result.stderr
    prompt = "Write a poem on NVIDIA in the style of Shakespeare"
    end_strings = ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]
    expected, _ = continuation(prompt, 1024, min_tokens_to_generate=1, end_strings=end_strings)
    assert result.stdout == f"{prompt}\n{expected}\n"
    assert handle.generations == 1
