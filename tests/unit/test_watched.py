"""Long fetches show progress and have bounds (operations/watched.py), run for real in a local shell:
the host is this machine (a stand-in for pyinfra's host that runs commands with `sh -c`), the tools
are stand-ins for podman and enroot that download slowly, stall, or fail, and the intervals are short.

What is checked: a progress line at least every progress interval while the tool runs, naming what is
fetched, the bytes and the last output, with the elapsed time; a stall fails within the stall limit
and names the host, the registry and what was last seen; an overall limit; a failing tool's exit code
and output; and after any failure no process of the fetch is left, nor its work dir, temp storage or
half-written image file. A failed fetch stops the deploy for every host (pyinfra's FAIL_PERCENT).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nemotron_deploy.deploy.operations import containers, watched
from nemotron_deploy.deploy.operations.watched import Fetch, FetchFailed, run_watched

REGISTRY = "registry.example:5000"
IMAGE = f"{REGISTRY}/nvidia/nemo:24.01.framework"
FAST = {"progress_seconds": 1.0, "poll_seconds": 0.2}


class LocalHost:
    """What run_watched uses of a pyinfra host, running commands here."""

    name = "sb-node09"
    print_prefix = "[sb-node09] "

    def __init__(self, bindir: Path):
        self.env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
        self.durations: list[float] = []  # of each command, to bound the gaps on a loaded machine

    def run_shell_command(self, command: str, _timeout=None):
        t0 = time.monotonic()
        try:
            return self._run(command, _timeout)
        finally:
            self.durations.append(time.monotonic() - t0)

    def _run(self, command: str, _timeout=None):
        r = subprocess.run(
            ["sh", "-c", command], capture_output=True, text=True, env=self.env, timeout=_timeout
        )
        return r.returncode == 0, SimpleNamespace(stdout=r.stdout, stderr=r.stderr)


def stand_in(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """(host, work parent, printed lines with their times)."""
    printed: list[tuple[float, str]] = []
    monkeypatch.setattr(
        watched, "print", lambda text: printed.append((time.monotonic(), text)), raising=False
    )
    work = tmp_path / "work"
    work.mkdir()
    yield LocalHost(tmp_path / "bin"), work, printed
    # A test that failed may have left a fetch running: end its session (the stand-ins never end).
    for pid_file in work.glob("*/pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def fetch(work: Path, **kwargs) -> Fetch:
    base = {"what": f"pull of {IMAGE}", "registry": REGISTRY, "command": f"podman pull {IMAGE}"}
    return Fetch(**{**base, "work_parent": str(work), **FAST, **kwargs})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# podman as it behaves against a registry that serves: "Copying blob" lines, blob bytes in $TMPDIR.
SLOW_PODMAN = """
echo "Trying to pull $2..."
echo "Getting image source signatures"
echo "Copying blob sha256:fa255ff69ab5"
i=0
while [ $i -lt 20 ]; do head -c 100000 /dev/zero >> "$TMPDIR/blob"; sleep 0.2; i=$((i+1)); done
echo "Writing manifest to image destination"
"""


def test_progress_lines_come_at_least_every_interval_with_bytes_and_elapsed(env):
    host, work, printed = env
    stand_in(Path(host.env["PATH"].split(":")[0]), "podman", SLOW_PODMAN)
    t0 = time.monotonic()
    run_watched(host, fetch(work, stall_seconds=5), sleep=time.sleep)
    t1 = time.monotonic()

    progress = [(t, text) for t, text in printed if "elapsed" in text]
    assert len(progress) >= 3, printed
    times = [t0, *(t for t, _ in progress), t1]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # At most the interval, one pause between polls and the polls around it (slow on a loaded machine).
    bound = FAST["progress_seconds"] + FAST["poll_seconds"] + 2 * max(host.durations) + 0.2
    assert max(gaps) <= bound, f"a gap of {max(gaps):.2f}s between progress lines (bound {bound:.2f}s)"
    for _, text in progress:
        assert text.startswith(f"[sb-node09] pull of {IMAGE}: "), text
    assert any("Copying blob sha256:fa255ff69ab5" in text for _, text in progress), progress
    assert any(" KiB fetched" in text or " MiB fetched" in text for _, text in progress), progress
    assert "done in" in printed[-1][1]
    assert list(work.iterdir()) == [], "the work dir (podman's temp storage) was left after a pull"


def test_a_stalled_fetch_fails_in_time_names_host_registry_and_last_output_and_leaves_nothing(env, tmp_path):
    host, work, printed = env
    pids = tmp_path / "pids"
    # Like podman against a stopped registry: a temp dir, one line, then nothing (a child waits too)...
    stand_in(
        Path(host.env["PATH"].split(":")[0]),
        "podman",
        f'echo "Trying to pull $2..."; mkdir "$TMPDIR/storage123"; echo x > "$TMPDIR/storage123/blob"\n'
        # ... but keeps reading and writing a few bytes (as podman's Go runtime does: rchar/wchar grow).
        f"sleep 1000 & echo $! >> {pids}; echo $$ >> {pids}; "
        "while :; do echo tick > /dev/null; head -c 10 /dev/zero > /dev/null; sleep 0.1; done",
    )
    t0 = time.monotonic()
    with pytest.raises(FetchFailed) as failed:
        # (the overall limit only so that a missed stall fails the test instead of hanging it)
        run_watched(host, fetch(work, stall_seconds=1.5, timeout_seconds=15), sleep=time.sleep)
    took = time.monotonic() - t0
    assert took < 1.5 + 6, f"the stall was noticed after {took:.1f}s"

    message = str(failed.value)
    assert "sb-node09" in message and f"registry {REGISTRY}" in message, message
    assert "stalled: no progress for" in message and "pull_stall_timeout_seconds=1.5" in message
    assert f'last output "Trying to pull {IMAGE}..."' in message, message
    for pid in map(int, pids.read_text().split()):
        assert not alive(pid), f"process {pid} of the stalled pull is still running"
    assert list(work.iterdir()) == [], "the stalled pull left its work dir (podman's temp storage)"


def test_a_fetch_that_keeps_going_past_the_overall_limit_fails(env):
    host, work, _ = env
    stand_in(
        Path(host.env["PATH"].split(":")[0]),
        "podman",
        'echo "Copying blob sha256:1"; while :; do echo x >> "$TMPDIR/blob"; sleep 0.05; done',
    )
    t0 = time.monotonic()
    with pytest.raises(FetchFailed, match=r"did not finish within pull_timeout_seconds=1\b"):
        run_watched(host, fetch(work, stall_seconds=60, timeout_seconds=1), sleep=time.sleep)
    assert time.monotonic() - t0 < 1 + 8, "the overall limit was noticed late"
    assert list(work.iterdir()) == []


def test_no_overall_limit_by_default_and_a_short_pause_is_not_a_stall(env):
    host, work, _ = env
    stand_in(Path(host.env["PATH"].split(":")[0]), "podman", 'echo one; sleep 0.8; echo two >> "$TMPDIR/x"')
    assert fetch(work).timeout_seconds is None
    run_watched(host, fetch(work, stall_seconds=1.5), sleep=time.sleep)


def test_a_failing_fetch_reports_its_exit_code_and_output(env):
    host, work, _ = env
    stand_in(
        Path(host.env["PATH"].split(":")[0]),
        "podman",
        'echo "Trying to pull $2..."; echo "Error: initializing source: 401 Unauthorized" >&2; exit 125',
    )
    with pytest.raises(FetchFailed) as failed:
        run_watched(host, fetch(work), sleep=time.sleep)
    message = str(failed.value)
    assert f"pull of {IMAGE} on sb-node09 from registry {REGISTRY} failed (exit 125)" in message
    assert "401 Unauthorized" in message
    assert list(work.iterdir()) == []


def test_a_stalled_import_leaves_no_partial_file_nor_scratch_but_keeps_the_cache(env, tmp_path):
    host, work, _ = env
    images, scratch = tmp_path / "images", tmp_path / "scratch"
    images.mkdir()
    (scratch / "cache").mkdir(parents=True)
    (scratch / "cache" / "sha256:layer").write_text("a complete layer from an earlier import")
    # enroot import --output FILE docker://REF: its scratch dir, a half file, then a stalled download.
    stand_in(
        Path(host.env["PATH"].split(":")[0]),
        "enroot",
        'echo "[INFO] Fetching image manifest"; mkdir "$ENROOT_TEMP_PATH/tmp.abc"; echo half > "$3"; '
        "exec sleep 1000",
    )
    target = images / "nemo.sqsh"
    (cmd,) = containers.import_image_file._inner(
        runtime="pyxis", image=f"{REGISTRY}#nvidia/nemo:24.01.framework", target=str(target),
        present=False, tmp_dir=str(scratch),
    )  # fmt: skip
    import_fetch = dataclasses.replace(cmd.args[0], work_parent=str(work), stall_seconds=1.5, **FAST)
    with pytest.raises(FetchFailed) as failed:
        run_watched(host, import_fetch, sleep=time.sleep)
    message = str(failed.value)
    assert f"import of {REGISTRY}#nvidia/nemo" in message and f"registry {REGISTRY}" in message
    assert '"[INFO] Fetching image manifest"' in message, message
    assert list(images.iterdir()) == [], "a half image file was left"
    assert sorted(p.name for p in scratch.iterdir()) == ["cache"], "enroot's scratch was left"
    assert (scratch / "cache" / "sha256:layer").exists()
    assert list(work.iterdir()) == []


def test_import_progress_counts_the_cache_and_the_image_file(env, tmp_path, monkeypatch):
    host, work, printed = env
    scratch, release = tmp_path / "scratch", tmp_path / "release"
    # The stand-in waits (up to 30 s) until a progress line has shown the image file being written.
    stand_in(
        Path(host.env["PATH"].split(":")[0]),
        "enroot",
        'mkdir -p "$ENROOT_CACHE_PATH"; head -c 300000 /dev/zero > "$ENROOT_CACHE_PATH/layer"; '
        'echo "[INFO] Creating squashfs filesystem..."; head -c 200000 /dev/zero > "$3"; '
        f"i=0; while [ ! -e {release} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
    )

    def seen(text: str) -> None:
        printed.append((time.monotonic(), text))
        if re.search(r"\b4[89]\d\.\d KiB fetched", text) and "Creating squashfs" in text:
            release.touch()  # 300000 + 200000 bytes (and the cache dir's own few KiB)

    monkeypatch.setattr(watched, "print", seen, raising=False)
    (cmd,) = containers.import_image_file._inner(
        runtime="pyxis", image=IMAGE, target=str(tmp_path / "x.sqsh"), present=False, tmp_dir=str(scratch)
    )
    run_watched(host, dataclasses.replace(cmd.args[0], work_parent=str(work), **FAST), sleep=time.sleep)
    assert release.exists(), [text for _, text in printed]
    assert (tmp_path / "x.sqsh").exists()


def test_pull_shows_podmans_lines_and_is_watched_with_the_settings():
    (cmd,) = containers.pull_image._inner(
        runtime="podman", image=IMAGE, present=False, tls_verify=False, stall_seconds=20, timeout_seconds=900
    )
    f = cmd.args[0]
    assert f.command == f"podman pull --tls-verify=false {IMAGE}", "--quiet hides the Copying blob lines"
    assert (f.registry, f.stall_seconds, f.timeout_seconds) == (REGISTRY, 20, 900)
    assert f.progress_seconds <= 30
    assert containers.pull_image._inner(runtime="podman", image=IMAGE, present=True) is not None
    assert list(containers.pull_image._inner(runtime="podman", image=IMAGE, present=True)) == []


def test_a_failed_fetch_stops_the_deploy_for_every_host(monkeypatch):
    state = SimpleNamespace(config=SimpleNamespace(FAIL_PERCENT=None))
    monkeypatch.setattr(containers, "run_watched", lambda host, fetch: None)
    containers._watch(state, object(), None)
    assert state.config.FAIL_PERCENT is None, "a pull that worked must not change how failures count"

    def stalls(host, fetch):
        raise FetchFailed("stalled")

    monkeypatch.setattr(containers, "run_watched", stalls)
    with pytest.raises(FetchFailed):
        containers._watch(state, object(), None)
    assert state.config.FAIL_PERCENT == 0
