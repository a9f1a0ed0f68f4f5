"""Long fetches (image pulls and imports) run in the background on the host and are watched from here.

The tool runs detached (`setsid`) in a work directory of its own on the host; one SSH command every
few seconds reads its exit code, how many bytes it has written so far, the I/O counters of its
process tree and the last line of its output. From that the deploy prints a progress line per host
at least every `progress_seconds`, fails the step when nothing moved for `stall_seconds` (a registry
that accepts connections and answers nothing) or the whole fetch took longer than `timeout_seconds`,
and after any failure kills the process tree and removes what the fetch left (its work directory,
where docker/podman's temporary storage goes, and whatever `cleanup` names).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent

# A progress line per host at least this often (operators watch 15-30 GB pulls for many minutes).
# Tests shorten it with NEMOTRON_DEPLOY_PROGRESS_SECONDS; it is never longer than 30 s.
PROGRESS_SECONDS = min(float(os.environ.get("NEMOTRON_DEPLOY_PROGRESS_SECONDS") or 20), 30.0)
# How often the host is asked how the fetch is doing (after a quicker start: 0.25 s, doubling).
POLL_SECONDS = 5.0
FIRST_POLL_SECONDS = 0.25
# Where the work directory goes on the host: a disk, not /tmp (podman's blob copies land in it).
WORK_PARENT = "/var/tmp"
# The longest an SSH poll may take; a host that stops answering fails the step instead of hanging.
POLL_COMMAND_TIMEOUT = 120


class FetchFailed(RuntimeError):
    """The fetch failed, stalled or ran out of time; the message says where, from where and what was seen."""


@dataclass(frozen=True)
class Fetch:
    """What to run and how to watch it. Shell snippets may use $W, the work directory on the host."""

    what: str  # "pull of IMAGE", "import of IMAGE"
    registry: str
    command: str  # the fetch itself, run with TMPDIR=$W/tmp
    measure: str = 'du -sb "$W/tmp" 2>/dev/null | cut -f1'  # prints the bytes fetched so far
    extra_pids: str = ""  # prints more PIDs whose I/O counts as progress (e.g. dockerd)
    cleanup: str = ""  # after a failure, once the process tree is gone
    stall_seconds: float = 600
    timeout_seconds: float | None = None
    progress_seconds: float = PROGRESS_SECONDS
    poll_seconds: float = POLL_SECONDS
    work_parent: str = WORK_PARENT


@dataclass
class Seen:
    rc: int | None = None
    bytes: int = 0
    io: int = 0
    lines: int = 0
    last: str = ""

    def signature(self) -> tuple[int, int, int]:
        return self.bytes, self.io, self.lines


def start_script(fetch: Fetch) -> str:
    """Start the fetch detached in a new work dir; prints the work dir once the fetch's PID is known."""
    runner = (
        'echo $$ > "$W/pid.tmp" && mv "$W/pid.tmp" "$W/pid"; '
        'TMPDIR="$W/tmp" sh -c "$1" > "$W/log" 2>&1 < /dev/null; '
        'echo $? > "$W/rc.tmp"; mv "$W/rc.tmp" "$W/rc"'
    )
    return (
        f"W=$(mktemp -d {shlex.quote(fetch.work_parent)}/nemotron-fetch.XXXXXX) || exit 1; "
        'export W; mkdir "$W/tmp" || exit 1; '
        f"setsid sh -c {shlex.quote(runner)} nemotron-fetch {shlex.quote(fetch.command)} "
        "< /dev/null > /dev/null 2>&1 & "
        'i=0; while [ ! -s "$W/pid" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; '
        '[ -s "$W/pid" ] || { echo "the fetch did not start" >&2; exit 1; }; echo "$W"'
    )


def poll_script(fetch: Fetch, work: str) -> str:
    """One look at the fetch: rc (empty while it runs), bytes, io of its processes, log lines, last line."""
    return (
        f'W={shlex.quote(work)}; export W; P=$(cat "$W/pid" 2>/dev/null); '
        'echo "rc=$(cat "$W/rc" 2>/dev/null)"; '
        f"echo \"bytes=$( ( {fetch.measure} ) 2>/dev/null | awk '{{s+=$1}} END {{print s+0}}')\"; "
        f'pids="$([ -n "$P" ] && pgrep -s "$P") $( ( {fetch.extra_pids or ":"} ) 2>/dev/null)"; '
        # Storage I/O only: a Go program blocked on a socket still reads and writes a few bytes
        # (rchar/wchar) every second; extracting layers writes to disk.
        'echo "io=$(for p in $pids; do cat /proc/$p/io; done 2>/dev/null '
        "| awk '/^(read_bytes|write_bytes):/ {s+=$2} END {print s+0}')\"; "
        'echo "lines=$(wc -l < "$W/log" 2>/dev/null || echo 0)"; '
        'echo "last=$(tail -c 4000 "$W/log" 2>/dev/null | tr "\\r" "\\n" | grep -v "^[[:space:]]*$" | tail -n 1)"'
    )


# True while a process of session $P is alive (a zombie whose parent is gone does not count).
LIVE = (
    'live() { for p in $(pgrep -s "$P"); do '
    's=$(sed "s/.*) //" /proc/$p/stat 2>/dev/null | cut -c1); '
    '[ -n "$s" ] && [ "$s" != Z ] && return 0; done; return 1; }; '
)


def stop_script(fetch: Fetch, work: str) -> str:
    """Kill the fetch's process tree (TERM, then KILL), run the cleanup and remove the work dir."""
    return (
        f'W={shlex.quote(work)}; export W; P=$(cat "$W/pid" 2>/dev/null); {LIVE}'
        'if [ -n "$P" ]; then kill -TERM "-$P" 2>/dev/null; i=0; '
        "while live && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done; "
        'kill -KILL "-$P" 2>/dev/null; i=0; '
        "while live && [ $i -lt 25 ]; do sleep 0.2; i=$((i+1)); done; fi; "
        f"{fetch.cleanup + '; ' if fetch.cleanup else ''}"
        'rm -rf "$W"'
    )


def parse_seen(stdout: str) -> Seen:
    seen = Seen()
    for line in stdout.splitlines():
        key, _, value = line.partition("=")
        if key == "rc" and value.strip():
            seen.rc = int(value)
        elif key in ("bytes", "io", "lines") and value.strip().isdigit():
            setattr(seen, key, int(value))
        elif key == "last":
            seen.last = value.strip()
    return seen


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(seen: Seen) -> str:
    last = f'"{seen.last[:200]}"' if seen.last else "no output yet"
    return f"{human_bytes(seen.bytes)} fetched (total not known until done), last output {last}"


def run_watched(
    host,
    fetch: Fetch,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = gevent.sleep,
) -> None:
    """Run `fetch` on `host` and watch it (see the module docstring); raises FetchFailed."""
    where = f"{fetch.what} on {host.name} from registry {fetch.registry}"

    def shell(command: str):
        return host.run_shell_command(command, _timeout=POLL_COMMAND_TIMEOUT)

    ok, out = shell(start_script(fetch))
    if not ok:
        raise FetchFailed(f"{where} could not start: {(out.stderr or out.stdout).strip()}")
    work = out.stdout.strip().splitlines()[-1]
    started = last_change = last_print = clock()
    seen = Seen()
    signature = None
    polls = 0
    try:
        while True:
            ok, out = shell(poll_script(fetch, work))
            now = clock()
            if not ok:
                raise FetchFailed(
                    f"{where}: could not read its progress: {(out.stderr or out.stdout).strip()}"
                )
            seen = parse_seen(out.stdout)
            if seen.rc is not None:
                break
            if seen.signature() != signature:
                signature, last_change = seen.signature(), now
            elapsed = now - started
            if now - last_change >= fetch.stall_seconds:
                raise FetchFailed(
                    f"{where} stalled: no progress for {human_seconds(now - last_change)} "
                    f"(pull_stall_timeout_seconds={fetch.stall_seconds:g}); after {human_seconds(elapsed)}: "
                    f"{describe(seen)}"
                )
            if fetch.timeout_seconds is not None and elapsed >= fetch.timeout_seconds:
                raise FetchFailed(
                    f"{where} did not finish within pull_timeout_seconds={fetch.timeout_seconds:g}; "
                    f"after {human_seconds(elapsed)}: {describe(seen)}"
                )
            if now - last_print >= fetch.progress_seconds:
                print(f"{host.print_prefix}{fetch.what}: {describe(seen)}, {human_seconds(elapsed)} elapsed")
                last_print = now
            # Look again soon at first (a small image is done in a second or two), then every
            # poll_seconds: a 20 GB pull is watched with one SSH command per host every 5 s.
            sleep(min(fetch.poll_seconds, fetch.progress_seconds, FIRST_POLL_SECONDS * 2**polls))
            polls += 1
        if seen.rc != 0:
            ok, out = shell(f"tail -n 20 {shlex.quote(work)}/log")
            raise FetchFailed(
                f"{where} failed (exit {seen.rc}) after {human_seconds(clock() - started)}:\n"
                + (out.stdout.strip() if ok else seen.last)
            )
    except BaseException as exc:
        ok, out = shell(stop_script(fetch, work))
        if not ok and isinstance(exc, FetchFailed):
            raise FetchFailed(
                f"{exc}\n(stopping it on {host.name} failed too: {(out.stderr or out.stdout).strip()})"
            ) from None
        if isinstance(exc, FetchFailed):
            raise FetchFailed(
                f"{exc}\nIt was stopped and its partial files removed on {host.name}."
            ) from None
        raise
    shell(f"rm -rf {shlex.quote(work)}")
    print(f"{host.print_prefix}{fetch.what}: done in {human_seconds(clock() - started)}")
