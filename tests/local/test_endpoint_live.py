"""The endpoint for real: the rendered haproxy.cfg + Lua envelope in Debian's HAProxy (`haproxy -db`, on
127.0.0.1 free ports, a temporary stats socket), in front of NeMo stand-ins (emulator.serve_in_thread)
on loopback, slots pointed at them by endpoint_sync through the runtime API. Nothing here leaves
127.0.0.1. HAProxy must be installed (scripts/setup does): missing, these tests fail, never skip.

The files are rendered by `python -m nemotron_deploy.deploy.endpoint` in a subprocess: loading an inventory
runs pyinfra's CLI, which monkey-patches threading with gevent, and the stand-ins' threads must not
straddle that.

What each test proves is in its docstring. Every wait is bounded in time and count.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import A100_40GB_HOSTS, model_card_client
from live_endpoint import (
    HOST,
    Endpoint,
    Replica,
    ask,
    cluster_with,
    replica,
    running_endpoint,
    wait_for,
)
from nemotron_rehearsal import emulator
from nemotron_rehearsal.emulator import continuation, serve_in_thread

from nemotron_deploy.service import endpoint_sync


@pytest.fixture
def two(tmp_path) -> Iterator[tuple[Endpoint, Replica, Replica]]:
    """An endpoint with two slots, both pointed at a running stand-in and UP. One key sends all the
    traffic of these tests (queueing, failover): its limit of requests in flight is above it."""
    a, b = replica(slow_seconds=0.05), replica(slow_seconds=0.05)
    try:
        with running_endpoint(
            cluster_with(tmp_path, endpoint_max_inflight_per_key=16), 2, tmp_path / "ep"
        ) as ep:
            ep.sync(r1=(HOST, a.port), r2=(HOST, b.port))
            ep.wait_status("r1", "up")
            ep.wait_status("r2", "up")
            yield ep, a, b
    finally:
        a.handle.stop()
        b.handle.stop()


def test_both_replicas_serve_through_the_endpoint(two):
    """Requests through the endpoint reach both replicas and come back as NeMo's answers; /metrics is
    HAProxy's Prometheus exporter."""
    ep, a, b = two
    results: list[tuple[int, str]] = []

    def client(i: int) -> None:
        results.append(ep.put(ask(f"prompt {i}")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [s for s, _ in results] == [200] * 8, results
    for _, text in results:
        assert json.loads(text)["sentences"][0].startswith("prompt ")
    assert a.requests and b.requests, (a.requests, b.requests)
    assert sorted(a.requests + b.requests) == sorted(f"prompt {i}" for i in range(8))
    status, _, metrics = ep.request("GET", "/metrics", key=None)  # from 127.0.0.1: allowed without a key
    assert status == 200
    assert 'haproxy_server_status{proxy="replicas",server="r1",state="UP"} 1' in metrics
    # and healthy replicas stay in rotation check after check (inter 1 s, fall 2)
    time.sleep(3.5)
    assert {n: s.status for n, s in ep.state().items()} == {"r1": "up", "r2": "up", "u1": "maint"}, (
        ep.log.read_text()
    )


def test_a_replica_still_loading_gets_no_traffic(tmp_path):
    """A slot pointed at a replica whose port is not open yet (NeMo loading) stays DOWN, so requests go
    to the replica that serves; once the loading one generates, its first check brings it UP."""
    a = replica()
    loading = None
    try:
        with running_endpoint(cluster_with(tmp_path), 2, tmp_path / "ep") as ep:
            loading = serve_in_thread(load_delay=3.0)
            ep.sync(r1=(HOST, a.port), r2=(HOST, loading.port))
            status = ep.state()["r2"].status
            assert not loading.ready.is_set(), "the stand-in finished loading too early for this test"
            assert status == "down"
            ep.wait_status("r1", "up")
            for i in range(6):
                status, text = ep.put(ask(f"early {i}"))
                assert status == 200, text
            assert not loading.ready.is_set(), "the stand-in finished loading too early for this test"
            assert ep.state()["r2"].status == "down"
            assert loading.generations == 0
            ep.wait_status("r2", "up", timeout=15)
    finally:
        a.handle.stop()
        if loading is not None:
            loading.stop()


def test_a_replica_answering_200_with_an_error_string_is_taken_out(two):
    """A replica whose server answers 200 with a JSON string (NeMo's way of failing) goes DOWN; the
    other keeps serving every request."""
    ep, a, b = two

    def broken(sentences, params):
        raise emulator._Reply(200, "tokens_to_generate must be an integer greater than 0")

    b.handle.state.generate = broken
    ep.wait_status("r2", "down", timeout=10)
    assert ep.state()["r1"].status == "up"
    before = len(a.requests)
    for i in range(4):
        status, text = ep.put(ask(f"after {i}"))
        assert status == 200, text
    assert len(a.requests) == before + 4


def test_killing_a_replica_costs_at_most_one_client_request(two):
    """Under a steady stream of requests (2 clients), one replica dies (port closed, connections reset):
    at most one client request fails, and the endpoint keeps answering from the other replica."""
    ep, a, b = two
    total, kill_at = 60, 20
    failures: list[str] = []
    done = threading.Event()
    sent = [0]
    lock = threading.Lock()
    late_ok = [0]

    def client() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= total:
                    return
                sent[0] += 1
                n = sent[0]
            if n == kill_at:
                b.handle.crash()
            try:
                status, text = ep.put(ask(f"stream {n}"), timeout=20)
            except OSError as exc:
                failures.append(f"{n}: {exc!r}")
                continue
            if status != 200:
                failures.append(f"{n}: {status} {text[:200]}")
            elif n > kill_at + 10:
                with lock:
                    late_ok[0] += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(70)
    done.set()
    assert sent[0] == total
    assert len(failures) <= 1, (failures[:2], ep.log.read_text()[-3000:])
    assert late_ok[0] >= total - kill_at - 10 - len(failures)
    ep.wait_status("r2", "down", timeout=10)
    assert ep.put(ask("after the kill"))[0] == 200


def test_one_refused_connection_does_not_take_the_serving_replica_out(two):
    """r2 is drained (a rollout's window: r1 alone serves) and r1 refuses one connection (its slot
    points at a closed port for that one try, as a lost connection would): the request is retried and
    answered, r1 stays UP, and the requests right after it are answered too. With `on-error
    mark-down`, that one error put r1 DOWN until its next check, a second later: with no other
    replica up, the endpoint answered every request 503 "No replica is up" meanwhile."""
    ep, a, b = two
    endpoint_sync.command(ep.socket, "set server replicas/r2 state drain")
    ep.wait_status("r2", "drain")
    closed = socket.socket()
    closed.bind((HOST, 0))  # a port nothing listens on (bound, so that nobody else takes it)
    try:
        endpoint_sync.command(ep.socket, f"set server replicas/r1 addr {HOST} port {closed.getsockname()[1]}")
        first: list[tuple[int, str]] = []
        sender = threading.Thread(target=lambda: first.append(ep.put(ask("refused once"), timeout=20)))
        sender.start()

        def refused() -> bool:
            return int(endpoint_sync.backend_stat(ep.socket)["r1"]["hanafail"] or 0) >= 1

        wait_for(refused, 10, "r1's connection to be refused")
        endpoint_sync.command(ep.socket, f"set server replicas/r1 addr {HOST} port {a.port}")
        seen = {ep.state()["r1"].status}
        after = []
        for i in range(10):  # about a second of requests after the error
            after.append(ep.put(ask(f"after the refusal {i}")))
            seen.add(ep.state()["r1"].status)
        sender.join(30)
    finally:
        closed.close()
    assert first and first[0][0] == 200, first
    assert [status for status, _ in after] == [200] * 10, [t for st, t in after if st != 200][:2]
    assert seen == {"up"}, (seen, ep.log.read_text()[-2000:])


def test_a_request_meeting_no_replica_up_waits_for_one_that_is_down(two):
    """r2 drained, r1 refuses two connections in a row (a dead replica's sign): r1 is DOWN, and the
    endpoint has no replica UP. A request then waits (the envelope's nemotron_wait_for_replica) while
    a slot is DOWN rather than in maintenance, and is answered once r1's next check (within a
    second) brings it back, instead of 503 "No replica is up" at once."""
    ep, a, b = two
    endpoint_sync.command(ep.socket, "set server replicas/r2 state drain")
    ep.wait_status("r2", "drain")
    closed = socket.socket()
    closed.bind((HOST, 0))
    try:
        endpoint_sync.command(ep.socket, f"set server replicas/r1 addr {HOST} port {closed.getsockname()[1]}")
        refused = threading.Thread(target=lambda: ep.put(ask("refused twice"), timeout=20))
        refused.start()
        ep.wait_status("r1", "down", timeout=10)
        endpoint_sync.command(ep.socket, f"set server replicas/r1 addr {HOST} port {a.port}")
        started = time.monotonic()
        status, text = ep.put(ask("while none is up"))
        waited = time.monotonic() - started
        refused.join(30)
    finally:
        closed.close()
    assert status == 200, text
    assert ep.state()["r1"].status == "up"
    assert 0.05 < waited < 3, f"answered after {waited:.2f} s"


def test_envelope_refuses_too_many_prompts_before_any_replica(two):
    """More prompts than inference_batch (8), or sentences that would wedge NeMo: 400 with a message
    naming the limit and the setting, and no replica sees the request. Log-probs pass on H100 (the
    plan holds their peak)."""
    ep, a, b = two
    status, text = ep.put({"sentences": [f"too many {i}" for i in range(9)], "tokens_to_generate": 1})
    assert status == 400
    message = json.loads(text)
    assert "at most 8 prompts" in message and "inference_batch" in message and "has 9" in message
    for bad in ({"sentences": "a string"}, {"sentences": []}, {"sentences": ["ok", 3]}):
        status, text = ep.put(bad)
        assert status == 400 and "non-empty list of strings" in json.loads(text), (bad, text)
    assert not [p for p in a.requests + b.requests if p.startswith("too many") or p == "ok"]
    assert not a.handle.state.wedged and not b.handle.state.wedged
    # exactly the limit passes, and so do log-probs where the plan allows them
    status, text = ep.put({"sentences": [f"eight {i}" for i in range(8)], "tokens_to_generate": 1})
    assert status == 200, text
    assert ep.put(ask("logprobs ok", all_probs=True, compute_logprob=True))[0] == 200


def test_envelope_refuses_logprobs_where_the_plan_cannot_hold_them(tmp_path):
    """On the A100 40GB plan (6.4 GiB headroom) all_probs / compute_logprob = true get 400 naming the
    memory and runtime_reserve_gib, even spelled with a JSON escape; false passes."""
    small = cluster_with(tmp_path, "a100", A100_40GB_HOSTS, gpu_type="A100-40GB")
    a = replica()
    try:
        with running_endpoint(small, 1, tmp_path / "ep") as ep:
            ep.sync(r1=(HOST, a.port))
            ep.wait_status("r1", "up")
            for key in ("all_probs", "compute_logprob"):
                status, text = ep.put(ask(f"lp {key}", **{key: True}))
                assert status == 400, text
                message = json.loads(text)
                assert key in message and "runtime_reserve_gib" in message and "GiB" in message
            escaped = b'{"sentences": ["lp escaped"], "\\u0061ll_probs": true}'
            assert ep.put(escaped)[0] == 400
            assert ep.put(ask("lp off", all_probs=False))[0] == 200
            assert a.requests == ["lp off"]
    finally:
        a.handle.stop()


def test_queue_timeout_answers_503_saying_the_replicas_are_busy(tmp_path):
    """One replica, busy for 3 s: a second request waits endpoint_queue_seconds (1) and gets 503 with
    the busy message; the first one is answered."""
    a = replica(slow_seconds=3.0)
    try:
        with running_endpoint(cluster_with(tmp_path, endpoint_queue_seconds=1), 2, tmp_path / "ep") as ep:
            ep.sync(r1=(HOST, a.port))
            ep.wait_status("r1", "up", timeout=20)
            results: dict[str, tuple[int, str]] = {}

            def client(name: str) -> None:
                results[name] = ep.put(ask(name), timeout=30)

            first = threading.Thread(target=client, args=("first",))
            first.start()
            time.sleep(0.3)
            started = time.monotonic()
            client("second")
            waited = time.monotonic() - started
            first.join(30)
            assert results["first"][0] == 200
            status, text = results["second"]
            assert status == 503, text
            assert "replicas are busy" in json.loads(text) and "endpoint_queue_seconds" in json.loads(text)
            assert waited < 3, f"the 503 came after {waited:.1f} s, not after the 1 s queue timeout"
            assert "second" not in a.requests
    finally:
        a.handle.stop()


def test_no_replica_up_answers_503_at_once(tmp_path):
    with running_endpoint(cluster_with(tmp_path), 2, tmp_path / "ep") as ep:
        status, text = ep.put(ask("nobody"))
        assert status == 503 and "No replica is up" in json.loads(text)


def test_updater_changes_slots_at_run_time_without_reload(tmp_path):
    """endpoint_sync points a slot elsewhere and takes one out at run time: same HAProxy process (no
    reload), traffic follows; a second apply with the same wishes sends no command."""
    a, b = replica(), replica()
    try:
        with running_endpoint(cluster_with(tmp_path), 2, tmp_path / "ep") as ep:
            pid = ep.proc.pid
            assert {n: s.status for n, s in ep.state().items()} == {
                "r1": "maint",
                "r2": "maint",
                "u1": "maint",
            }
            sent = ep.sync(r1=(HOST, a.port), r2=(None, 0))
            assert sent == [
                f"set server replicas/r1 addr {HOST} port {a.port}",
                "set server replicas/r1 state drain",
                "set server replicas/r1 health down",
                "set server replicas/r1 state ready",
            ]
            assert ep.sync(r1=(HOST, a.port), r2=(None, 0)) == []
            ep.wait_status("r1", "up")
            assert ep.put(ask("to a"))[0] == 200 and a.requests == ["to a"]
            # the replica moved: same slot, new address (by name, resolved by the updater)
            sent = ep.sync(r1=("localhost", b.port), r2=(None, 0))
            assert sent == [
                "set server replicas/r1 health down",  # no request to b before a check passed there
                f"set server replicas/r1 addr 127.0.0.1 port {b.port}",
            ]
            wait_for(lambda: ep.state()["r1"].port == b.port, 5, "r1's new port")
            ep.wait_status("r1", "up")
            assert ep.put(ask("to b"))[0] == 200 and b.requests == ["to b"]
            # both, then none
            assert ep.sync(r1=(HOST, b.port), r2=(HOST, a.port)) == [
                f"set server replicas/r2 addr {HOST} port {a.port}",
                "set server replicas/r2 state drain",
                "set server replicas/r2 health down",
                "set server replicas/r2 state ready",
            ]
            ep.wait_status("r2", "up")
            assert ep.sync(r1=(None, 0), r2=(None, 0)) == [
                "set server replicas/r1 state maint",
                "set server replicas/r2 state maint",
            ]
            assert ep.sync(r1=(None, 0), r2=(None, 0)) == []
            assert ep.put(ask("nobody"))[0] == 503
            # a name that does not resolve leaves its slot in maintenance
            assert ep.sync(r1=("nemotron-endpoint-test.invalid", 1424)) == []
            assert ep.proc.poll() is None and ep.proc.pid == pid
            # the CLI does the same
            cli = subprocess.run(
                [sys.executable, "-m", "nemotron_deploy.service.endpoint_sync", "--socket", ep.socket,
                 "--set", f"r1={HOST}:{a.port}", "--set", "r2=-", "--show"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert cli.stdout.splitlines()[:4] == [
                f"set server replicas/r1 addr {HOST} port {a.port}",
                "set server replicas/r1 state drain",
                "set server replicas/r1 health down",
                "set server replicas/r1 state ready",
            ]
            assert "r2 127.0.0.1:" in cli.stdout and "maint" in cli.stdout
            assert ep.proc.pid == pid and ep.proc.poll() is None
    finally:
        a.handle.stop()
        b.handle.stop()


def test_wait_up_returns_once_the_check_passed_and_names_the_slot_that_never_comes_up(tmp_path):
    """`endpoint_sync --wait-up` (the deploy's last step after a submit): a slot pointed at a replica
    that generates is UP when it returns 0, and the endpoint serves at once; a slot pointed at a port
    where nothing answers makes it exit 1 after its bound, naming that slot, its address and state."""
    a = replica()
    dead = socket.socket()
    dead.bind((HOST, 0))  # a port that is bound and never listens: the check's connection is refused
    try:
        with running_endpoint(cluster_with(tmp_path), 2, tmp_path / "ep") as ep:
            sync = [sys.executable, "-m", "nemotron_deploy.service.endpoint_sync", "--socket", ep.socket]
            ready = subprocess.run(
                [*sync, "--set", f"r1={HOST}:{a.port}", "--wait-up", "r1", "--within", "30"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert ready.returncode == 0, ready.stderr
            assert ep.state()["r1"].status == "up"
            assert ep.put(ask("at once"))[0] == 200 and a.requests == ["at once"]

            port = dead.getsockname()[1]
            never = subprocess.run(
                [*sync, "--set", f"r2={HOST}:{port}", "--wait-up", "r1", "--wait-up", "r2", "--within", "3"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert never.returncode == 1, never.stderr
            assert f"not UP in the endpoint after 3s: r2 ({HOST}:{port}, down)" in never.stderr
            assert "r1 (" not in never.stderr
    finally:
        dead.close()
        a.handle.stop()


def test_model_card_client_is_answered_through_an_open_endpoint(tmp_path):
    """The model card's unchanged call_server.py (it calls localhost:1424, no key, no TLS) gets its
    answer through an endpoint opened on purpose (endpoint_auth = none, endpoint_tls = none) listening
    on 1424, from a replica behind it. (The default endpoint refuses it: test_endpoint_access.py.)"""
    call_server = model_card_client()  # skips unless NEMOTRON_MODEL_CARD_CLIENT is set (.ci/run sets it)
    wait_for(lambda: _port_free(1424), 15, "port 1424 to be free (another test run holds it)", 0.2)
    a = replica()
    try:
        inv = cluster_with(tmp_path, endpoint_port=1424, endpoint_auth="none")
        with running_endpoint(inv, 2, tmp_path / "ep") as ep:
            ep.sync(r1=(HOST, a.port))
            ep.wait_status("r1", "up")
            result = subprocess.run(
                [sys.executable, str(call_server)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "NO_PROXY": "*"},
            )
    finally:
        a.handle.stop()
    assert result.returncode == 0, result.stderr
    prompt = "Write a poem on NVIDIA in the style of Shakespeare"
    end_strings = ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]
    expected, _ = continuation(prompt, 1024, min_tokens_to_generate=1, end_strings=end_strings)
    assert result.stdout == f"{prompt}\n{expected}\n"
    assert a.requests == [prompt]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True
