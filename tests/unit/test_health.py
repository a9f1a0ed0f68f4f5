"""The health check: every probe outcome, Nagios/JSON output, state, textfile, --wait and Slurm.

Servers run on 127.0.0.1 only: the emulator in-process, or tiny stdlib HTTP servers that answer like
something other than NeMo. Slurm is faked by executables on PATH that print what Slurm 22.05 prints.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import pty
import select
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_slurm import SCONTROL_LINE, job
from nemotron_rehearsal.emulator import serve_in_thread
from prometheus_client.parser import text_string_to_metric_families

from nemotron_deploy.service import health, rollout
from nemotron_deploy.service import probe as probe_mod
from nemotron_deploy.service.metrics import SINGLE_CHECK
from nemotron_deploy.service.outcome import REASONS
from nemotron_deploy.service.slurm import expand_hostlist, parse_scontrol_record

SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def emu():
    handle = serve_in_thread()
    yield handle
    handle.stop()


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's canned (status, content type, body)."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, ctype, body = self.server.canned  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def canned():
    """Start an HTTP server answering (status, content_type, body); returns its port."""
    servers = []

    def start(status: int, body: bytes, ctype: str = "application/json") -> int:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
        server.canned = (status, ctype, body)  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def probe(port: int, **kw) -> probe_mod.ProbeResult:
    kw.setdefault("timeout", 5.0)
    return probe_mod.probe("127.0.0.1", port, **kw)


# --------------------------------------------------------------------------------------------------
# Probe outcomes
# --------------------------------------------------------------------------------------------------


def test_ok_against_the_emulator(emu):
    result = probe(emu.port)
    assert (result.reason, result.http_status) == ("ok", 200)
    assert result.message.startswith("generated 1 token in ")
    assert emu.generations == 1  # a real generation, not a port check


def test_refused():
    assert probe(free_port()).reason == "refused"


def test_unresolvable():
    result = probe_mod.probe("nemotron-health-test.invalid", 1424, connect_timeout=3)
    assert result.reason == "unresolvable"
    assert "nemotron-health-test.invalid" in result.message


def test_connect_timeout_on_a_full_listen_backlog():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    try:
        for _ in range(16):  # fill the accept queue until the kernel stops answering SYNs
            c = socket.socket()
            c.settimeout(0.2)
            held.append(c)
            try:
                c.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.fail("the listen backlog never filled up")
        result = probe(port, connect_timeout=0.3)
        assert result.reason == "connect_timeout"
        assert result.duration < 2
    finally:
        for c in held:
            c.close()
        listener.close()


class _Plain404(http.server.BaseHTTPRequestHandler):
    def do_PUT(self) -> None:
        self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("handler", [_Plain404, http.server.SimpleHTTPRequestHandler])
def test_not_nemo_for_a_plain_http_server(handler):
    # a 404 from a plain http.server, or the stdlib file server's 501 for PUT: not NeMo
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        result = probe(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert result.reason == "not_nemo"
    assert result.http_status in (404, 501)


def test_not_nemo_for_405_and_for_a_non_http_service(canned):
    assert probe(canned(405, b'{"message": "The method is not allowed for the requested URL."}')).reason == (
        "not_nemo"
    )

    class Banner(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Banner)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        assert probe(server.server_address[1]).reason == "not_nemo"
    finally:
        server.shutdown()
        server.server_close()


def test_rejected_shows_nemos_message(emu, canned):
    result = probe(emu.port, payload={"sentences": ["x"], "tokens_to_generate": 0})
    assert result.reason == "rejected"
    assert "tokens_to_generate must be an integer greater than 0" in result.message
    port = canned(200, b'"temperature must be a positive number less than or equal to 100.0"\n')
    assert probe(port).reason == "rejected"


def test_http_error_for_400_and_500(emu):
    too_many = probe(emu.port, payload={"sentences": ["x"] * 129, "tokens_to_generate": 1})
    assert (too_many.reason, too_many.http_status) == ("http_error", 400)
    assert "Maximum number of sentences is 128" in too_many.message
    no_sentences = probe(emu.port, payload={"tokens_to_generate": 1})
    assert (no_sentences.reason, no_sentences.http_status) == ("http_error", 500)


def test_invalid_json_and_bad_shape(canned):
    assert probe(canned(200, b"<html>hello</html>", "text/html")).reason == "invalid_json"
    assert probe(canned(200, b'{"sentences": ["a", "b"]}')).reason == "bad_shape"
    assert probe(canned(200, b'{"text": "a"}')).reason == "bad_shape"
    assert probe(canned(200, b'["a"]')).reason == "bad_shape"


def test_busy_when_the_lock_is_held():
    with serve_in_thread(slow_seconds=3) as h:
        result = probe(h.port, timeout=0.3)
    assert result.reason == "busy"
    assert 0.25 < result.duration < 2


def test_busy_when_ranks_are_wedged():
    with serve_in_thread(hang_after=0) as h:
        assert probe(h.port, timeout=0.3).reason == "busy"


def test_disconnected_when_the_server_crashes_mid_request():
    with serve_in_thread(crash_after=0) as h:
        assert probe(h.port).reason == "disconnected"


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, b'{"sentences": ["Paris is"], "tokens": [["a"]]}', "ok"),
        (200, b'"greedy must be a boolean value"', "rejected"),
        (200, b"not json", "invalid_json"),
        (200, b'{"sentences": "x"}', "bad_shape"),
        (200, b"null", "bad_shape"),
        (400, b'"Maximum number of sentences is 128"', "http_error"),
        (503, b"<h1>Service Unavailable</h1>", "http_error"),
        (404, b"", "not_nemo"),
        (405, b"", "not_nemo"),
        (302, b"", "not_nemo"),
    ],
)
def test_classify_response(status, body, reason):
    assert probe_mod.classify_response(status, body, 0.01, "http://x:1/generate").reason == reason


# --------------------------------------------------------------------------------------------------
# Single check: Nagios output, JSON, state file, textfile
# --------------------------------------------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = health.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ok_line_and_perfdata(emu, capsys, tmp_path):
    code, out, _ = run(
        capsys, "--host", "127.0.0.1", "--port", str(emu.port), "--state-file", str(tmp_path / "s")
    )
    assert code == 0
    line = out.strip()
    assert line.startswith("NEMOTRON OK - generated 1 token in ")
    summary, perf = line.split(" | ")
    assert perf.split()[0].startswith("probe_duration=") and perf.split()[0].endswith("s;;;0")


def test_critical_line_for_refused(capsys, tmp_path):
    port = free_port()
    code, out, _ = run(capsys, "--url", f"http://127.0.0.1:{port}", "--state-file", str(tmp_path / "s"))
    assert code == 2
    assert out.startswith("NEMOTRON CRITICAL - refused: connection refused")


def test_json_shape(emu, capsys, tmp_path):
    code, out, _ = run(capsys, "--url", f"{emu.url}/generate", "--json", "--state-file", str(tmp_path / "s"))
    data = json.loads(out)
    assert code == 0 == data["exit_code"]
    assert {
        "status",
        "exit_code",
        "reason",
        "message",
        "url",
        "duration_seconds",
        "timestamp",
        "job",
        "consecutive_busy",
        "last_success_timestamp",
    } <= set(data)
    assert (data["status"], data["reason"], data["url"]) == ("OK", "ok", f"{emu.url}/generate")
    assert data["job"] is None and data["duration_seconds"] > 0
    assert abs(data["timestamp"] - time.time()) < 10


def metrics(path: Path) -> dict[str, list]:
    families = text_string_to_metric_families(path.read_text())
    return {f.name: f.samples for f in families}


def test_busy_escalates_and_last_success_persists(capsys, tmp_path):
    state = tmp_path / "state.json"
    prom = tmp_path / "textfile" / "nemotron.prom"
    prom.parent.mkdir()
    with serve_in_thread() as good:
        base = ["--host", "127.0.0.1", "--port", str(good.port), "--state-file", str(state)]
        assert run(capsys, *base, "--prometheus-textfile", str(prom))[0] == 0
        port = good.port
    last_success = json.loads(state.read_text())["last_success"]
    with serve_in_thread(port=port, hang_after=0):  # same target, now wedged
        args = [*base, "--timeout", "0.3", "--busy-critical-after", "3", "--prometheus-textfile", str(prom)]
        codes = [run(capsys, *args) for _ in range(3)]
    assert [c for c, _, _ in codes] == [1, 1, 2]
    assert codes[0][1].startswith("NEMOTRON WARNING - busy:")
    assert codes[2][1].startswith("NEMOTRON CRITICAL - busy:") and "3 times in a row" in codes[2][1]

    m = metrics(prom)
    assert set(m) == {metric.name for metric in SINGLE_CHECK}  # the contract, no more, no less
    assert m["nemotron_up"][0].value == 0
    assert m["nemotron_probe_status"][0].value == 2
    assert m["nemotron_probe_consecutive_busy"][0].value == 3
    assert m["nemotron_last_success_timestamp_seconds"][0].value == pytest.approx(last_success)
    reasons = {s.labels["reason"]: s.value for s in m["nemotron_probe_reason"]}
    assert reasons["busy"] == 1 and sum(reasons.values()) == 1
    assert set(reasons) == set(REASONS)
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert sorted(p.name for p in prom.parent.iterdir()) == ["nemotron.prom"]  # no temp file left

    with serve_in_thread(port=port):  # healthy again: the busy count resets
        assert run(capsys, *base, "--prometheus-textfile", str(prom))[0] == 0
    m = metrics(prom)
    assert m["nemotron_up"][0].value == 1 and m["nemotron_probe_consecutive_busy"][0].value == 0
    assert m["nemotron_probe_duration_seconds"][0].value > 0
    assert m["nemotron_last_success_timestamp_seconds"][0].value > last_success
    assert m["nemotron_up"][0].labels == {"target": f"127.0.0.1:{port}"}


def test_default_state_file_is_under_xdg_state_home(emu, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert run(capsys, "--host", "127.0.0.1", "--port", str(emu.port))[0] == 0
    files = list((tmp_path / "nemotron-deploy").iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["consecutive_busy"] == 0


def test_unwritable_textfile_is_unknown(emu, capsys, tmp_path):
    bad = tmp_path / "missing-dir" / "x.prom"
    code, out, _ = run(
        capsys,
        "--host",
        "127.0.0.1",
        "--port",
        str(emu.port),
        "--no-state-file",
        "--prometheus-textfile",
        str(bad),
    )
    assert code == 3 and "cannot write" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--url", "http://h:1424", "--port", "1"],
        ["--url", "https://h:1424"],
        ["--host", "h", "--startup-timeout", "soon"],
        ["--host", "h", "--timeout", "0"],
        ["--host", "h", "--url", "http://h"],
        ["--slurm-job", "x", "--job-id", "1"],
    ],
)
def test_usage_errors_are_unknown(argv, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 3
    assert "error:" in err


def test_help_is_exit_0_and_names_the_cli(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert out.startswith("usage: nemotron-deploy health")
    assert "busy" in out and "--wait" in out


# --------------------------------------------------------------------------------------------------
# --wait (start-up mode)
# --------------------------------------------------------------------------------------------------


def test_wait_returns_soon_after_the_server_can_generate(capsys, tmp_path):
    ready_file = tmp_path / "ready"
    with serve_in_thread(load_delay=1.0, ready_file=str(ready_file)) as h:
        code, out, _ = run(
            capsys,
            "--wait",
            "--host",
            "127.0.0.1",
            "--port",
            str(h.port),
            "--startup-timeout",
            "20",
            "--json",
        )
        returned = time.time()
    data = json.loads(out)
    assert code == 0 and data["reason"] == "ok" and data["mode"] == "wait"
    assert data["attempts"] > 2  # it polled through the refused phase
    latency = returned - float(ready_file.read_text())
    assert 0 <= latency < 1.0, f"readiness noticed {latency:.3f}s after the server could generate"


def test_wait_gives_up_at_the_budget(capsys):
    t0 = time.monotonic()
    code, out, _ = run(capsys, "--wait", "--host", "127.0.0.1", "--port", str(free_port()), "--budget", "0.6")
    assert code == 2
    assert out.startswith("NEMOTRON CRITICAL - startup_timeout:") and "last: refused" in out
    assert 0.5 < time.monotonic() - t0 < 3


def test_wait_fails_fast_when_the_server_process_exits(capsys):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.4)"])
    try:
        t0 = time.monotonic()
        code, out, _ = run(
            capsys, "--wait", "--host", "127.0.0.1", "--port", str(free_port()), "--watch-pid", str(proc.pid)
        )
        assert code == 2 and "server_exited" in out
        assert time.monotonic() - t0 < 3  # an unreaped (zombie) child counts as exited
    finally:
        proc.wait()


def test_wait_shows_progress_on_a_terminal_only():
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "nemotron_deploy.service.health",
        "--wait",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [*argv, "--budget", "1"], stderr=slave, stdout=subprocess.PIPE, text=True, timeout=20
        )
        os.close(slave)
        slave = -1
        # The process has exited: drain what it wrote. Don't wait for EOF (EIO): whether the slave
        # counts as closed depends on the session (a CI runner without a terminal keeps it open).
        chunks = []
        while select.select([master], [], [], 0.5)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        tty_err = b"".join(chunks).decode()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 2
    assert "\x1b[K" in tty_err and "attempts" in tty_err and "refused" in tty_err
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("NEMOTRON CRITICAL - startup_timeout")
    quiet = subprocess.run([*argv, "--budget", "0.5"], capture_output=True, text=True, timeout=20)
    assert quiet.stderr == "" and quiet.stdout.startswith("NEMOTRON CRITICAL")


def test_the_shipped_zipapp_runs_alone(emu, tmp_path):
    """What rank 0 runs inside the container, where this package is not installed (-I: no site)."""
    from nemotron_deploy.deploy import render

    lone = tmp_path / render.HEALTH_APP
    lone.write_bytes(render.health_zipapp())
    result = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-I",
            str(lone),
            "--wait",
            "--host",
            "127.0.0.1",
            "--port",
            str(emu.port),
            "--budget",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("NEMOTRON OK - ready after")


def test_import_is_light():
    code = (
        "import sys, nemotron_deploy.service.health as h; "
        "heavy = {'pyinfra', 'pydantic', 'yaml', 'jinja2', 'prometheus_client', 'requests', 'subprocess'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------------------------------


def test_parse_scontrol_record():
    line = SCONTROL_LINE.format(
        name="nemotron",
        job_id=4242,
        state="RUNNING",
        reason="None",
        exit_code="0:0",
        nodelist="gpu[01-02]",
        stderr="/x/e.err",
    )
    rec = parse_scontrol_record(line)
    assert rec["JobId"] == "4242" and rec["JobState"] == "RUNNING" and rec["NodeList"] == "gpu[01-02]"
    assert rec["TRES"] == "cpu=16,node=2,billing=16,gres/gpu=16"
    assert rec["AllocNode:Sid"] == "login01:31337" and rec["StdErr"] == "/x/e.err" and rec["Power"] == ""


@pytest.mark.parametrize(
    ("expr", "nodes"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu-a[9-10],login1", ["gpu-a9", "gpu-a10", "login1"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
        ("single", ["single"]),
    ],
)
def test_expand_hostlist(expr, nodes):
    assert expand_hostlist(expr) == nodes


def test_slurm_job_by_name_probes_the_first_node(emu, slurm, capsys):
    slurm.set({"jobs": {"4242": job("RUNNING")}, "hostnames": {"127.0.0.[1-2]": ["127.0.0.1", "127.0.0.2"]}})
    code, out, _ = run(
        capsys, "--slurm-job", "nemotron", "--port", str(emu.port), "--json", "--no-state-file"
    )
    data = json.loads(out)
    assert code == 0 and data["reason"] == "ok"
    assert data["job"]["job_id"] == "4242" and data["job"]["node"] == "127.0.0.1"
    assert data["job"]["state"] == "RUNNING"
    calls = slurm.calls()
    assert "squeue -h -t all -n nemotron -o %i %T" in calls
    assert "scontrol show hostnames 127.0.0.[1-2]" in calls


def test_slurm_job_falls_back_to_local_hostlist_expansion(emu, slurm, capsys):
    slurm.set({"jobs": {"4242": job("RUNNING", nodelist="127.0.0.[1,5-6]")}})  # show hostnames fails
    code, out, _ = run(capsys, "--slurm-job", "4242", "--port", str(emu.port), "--json", "--no-state-file")
    assert code == 0, out
    assert json.loads(out)["job"]["node"] == "127.0.0.1"
    assert "scontrol show hostnames 127.0.0.[1,5-6]" in slurm.calls()


def test_pending_job_is_critical_without_probing(slurm, capsys):
    slurm.set({"jobs": {"4242": job("PENDING", nodelist="(null)", reason="Resources")}})
    code, out, _ = run(capsys, "--slurm-job", "nemotron", "--no-state-file")
    assert code == 2
    assert out.startswith(
        "NEMOTRON CRITICAL - job_pending: job 4242 (nemotron) is PENDING (reason Resources)"
    )


def test_missing_squeue_is_unknown(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out, _ = run(capsys, "--slurm-job", "nemotron", "--no-state-file")
    assert code == 3 and "squeue not found" in out


def test_wait_fails_fast_when_the_job_fails_and_shows_its_stderr(slurm, capsys, tmp_path):
    err = tmp_path / "nemotron-4242.err"
    err.write_text("".join(f"stderr line {i:02d}\n" for i in range(1, 31)))
    running = job("RUNNING", stderr=str(err))
    failed = {"state": "FAILED", "reason": "NonZeroExitCode", "exit_code": "1:0"}
    slurm.set({"jobs": {"4242": {**running, "then": {"after_calls": 3, "job": failed}}}})
    t0 = time.monotonic()
    code, out, _ = run(
        capsys, "--slurm-job", "nemotron", "--port", str(free_port()), "--wait", "--job-check-interval", "0.2"
    )
    elapsed = time.monotonic() - t0
    assert code == 2
    first, *rest = out.splitlines()
    assert first.startswith("NEMOTRON CRITICAL - job_gone: job 4242 (nemotron) is FAILED")
    assert "NonZeroExitCode" in first and "exit code 1:0" in first
    assert rest[0] == f"--- last 20 lines of {err} ---"
    assert rest[1:] == [f"stderr line {i:02d}" for i in range(11, 31)]
    assert elapsed < 3, f"took {elapsed:.2f}s to notice the failed job"
    # the job was looked up by name once, then followed by id
    assert sum(c.startswith("squeue") for c in slurm.calls()) == 1


def test_the_rollout_waits_with_the_start_up_wait(emu, slurm, capsys):
    """rollout._generates: the --wait of `health --slurm-job ID`, as a function, its line on stdout."""
    slurm.set({"jobs": {"4242": job("RUNNING", nodelist="127.0.0.1")}})
    opts = argparse.Namespace(port=emu.port, budget=10.0)
    assert rollout._generates(opts, "4242")
    assert capsys.readouterr().out.startswith("NEMOTRON OK - ready after")
    slurm.set({"jobs": {}})
    assert not rollout._generates(opts, "4242")
    assert capsys.readouterr().out.startswith("NEMOTRON CRITICAL - job_gone")


def test_wait_fails_fast_when_the_job_vanished(slurm, capsys):
    slurm.set({"jobs": {}})  # scontrol: invalid job id; sacct: accounting disabled
    t0 = time.monotonic()
    code, out, _ = run(capsys, "--slurm-job", "4242", "--wait", "--json")
    data = json.loads(out)
    assert code == 2 and data["reason"] == "job_gone"
    assert "no longer in the queue" in data["message"]
    assert time.monotonic() - t0 < 3


def test_vanished_job_state_comes_from_sacct_when_there_is_accounting(slurm, capsys):
    slurm.set({"jobs": {}, "sacct": {"4242": "4242|nemotron|CANCELLED by 1000|0:15|127.0.0.[1-2]"}})
    code, out, _ = run(capsys, "--slurm-job", "4242", "--wait")
    assert code == 2 and "job 4242 (nemotron) is CANCELLED" in out


def test_a_name_with_no_job_is_critical(slurm, capsys):
    slurm.set({"jobs": {}})
    code, out, _ = run(capsys, "--slurm-job", "nemotron", "--no-state-file")
    assert code == 2 and "no job named 'nemotron' in the queue" in out


def test_job_id_watch_with_a_fixed_host(emu, slurm, capsys):
    slurm.set({"jobs": {"77": job("RUNNING", nodelist="elsewhere[1-2]")}})
    code, out, _ = run(
        capsys, "--host", "127.0.0.1", "--port", str(emu.port), "--job-id", "77", "--no-state-file"
    )
    assert code == 0, out
    slurm.set({"jobs": {"77": job("TIMEOUT", reason="TimeLimit", exit_code="0:15")}})
    code, out, _ = run(
        capsys, "--host", "127.0.0.1", "--port", str(emu.port), "--job-id", "77", "--no-state-file"
    )
    assert code == 2 and "job 77 (nemotron) is TIMEOUT" in out


def test_unreachable_slurm_controller_is_unknown(slurm, capsys):
    slurm.set({"down": True})
    code, out, _ = run(capsys, "--slurm-job", "nemotron", "--no-state-file")
    assert code == 3 and "Unable to contact slurm controller" in out
    code, out, _ = run(
        capsys, "--slurm-job", "4242", "--wait", "--budget", "0.5", "--job-check-interval", "0.1"
    )
    assert code == 3 and out.startswith("NEMOTRON UNKNOWN - slurm_error: no answer from Slurm")


def test_progress_lines_for_logs_when_not_a_terminal():
    """pyinfra and Slurm job logs aren't terminals: --progress-lines still says what it waits for."""
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemotron_deploy.service.health",
            "--wait",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--budget",
            "1",
            "--progress-lines",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines and lines[0].startswith(f"waiting for 127.0.0.1:{port}") and "refused" in lines[0]
    assert "\x1b" not in proc.stderr, "plain lines, no terminal control codes"
    assert len(lines) <= 3, "one line per change (or per 15 s), not one per poll"
    assert proc.stdout.startswith("NEMOTRON CRITICAL - startup_timeout")
