"""Running commands and waiting for things, with errors that say what failed and what to look at.

Every command is an argument list (never a shell string), so node names and paths can't be
misinterpreted. Waiting is always polling with a deadline: a daemon that comes up in 50 ms costs
50 ms, and one that never comes up fails with its log instead of hanging.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class SandboxError(RuntimeError):
    """Something in the sandbox failed; the message says what and what to do about it."""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    env: dict[str, str] | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv`, capture its output; on failure raise SandboxError with the command's stderr."""
    try:
        # gevent's subprocess (patched in when pyinfra is imported) refuses stdin= beside input=,
        # even stdin=None: pass exactly one of them.
        feed = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env, **feed)
    except FileNotFoundError as exc:
        raise SandboxError(f"{what or argv[0]}: command not found: {argv[0]} ({exc})") from None
    except subprocess.TimeoutExpired:
        raise SandboxError(f"{what or argv[0]}: timed out after {timeout:.0f}s: {' '.join(argv)}") from None
    if check and result.returncode != 0:
        raise SandboxError(
            f"{what or argv[0]} failed (exit {result.returncode}): {' '.join(argv)}\n"
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float,
    what: str,
    hint: Callable[[], str] | None = None,
    interval: float = 0.02,
    max_interval: float = 0.25,
) -> object:
    """Poll `predicate` until it returns something truthy; SandboxError naming `what` on timeout.

    The interval starts small and backs off, so fast things are noticed fast and slow things
    don't burn the CPU. `hint` is called only on failure (e.g. to attach a daemon's log tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = hint() if hint else ""
            raise SandboxError(
                f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{extra}" if extra else "")
            )
        time.sleep(interval)
        interval = min(interval * 1.5, max_interval)


def tail(path: Path | str, lines: int = 20) -> str:
    """The last `lines` lines of a log file, labelled, or a note that it doesn't exist."""
    p = Path(path)
    try:
        text = p.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {p}: {exc.strerror})"
    body = "\n".join(text.splitlines()[-lines:])
    return f"--- last {lines} lines of {p} ---\n{body}"


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def kill_and_wait(pids: Sequence[int], *, timeout: float = 10, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to every pid, then wait until all of them are gone."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    wait_until(
        lambda: not any(pid_alive(p) for p in pids),
        timeout=timeout,
        what=f"processes {list(pids)} to exit",
    )
