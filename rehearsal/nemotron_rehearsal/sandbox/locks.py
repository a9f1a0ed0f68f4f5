"""A lock that lets several users of one machine share the sandbox: concurrent test sessions, a
benchmark, a developer's CLI.

 - Changing the sandbox (an `up` that creates or resizes it, `down`) holds the lock exclusively, so
   two `up`s never race to create the same namespaces and nobody tears it down under a user.
 - A test session holds it shared for as long as it uses the sandbox (testing.session_sandbox). A
   test that injects faults other sessions would trip over (a node powered off, sshd stopped) holds
   it exclusively meanwhile: `with exclusive_use("why"): ...`.
A process holding the shared lock that needs the exclusive one gives up the shared one, waits for the
exclusive one, and takes the shared one back afterwards (never upgrade in place: two sessions doing
that at once would wait for each other forever).
The lock file lives in /run/lock (a tmpfs on normal systems), outside the state dir that `down`
deletes; it is an empty file and is left in place, as lock files are.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .proc import SandboxError

LOCK_FILE = Path("/run/lock/nemotron-sandbox.lock")
DEFAULT_TIMEOUT = 900.0


class _Handle:
    """One open file description of the lock file (flock locks belong to it)."""

    def __init__(self) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def take(
        self, exclusive: bool, timeout: float, what: str, on_wait: Callable[[str], None] | None = None
    ) -> bool:
        """Take the lock; poll up to `timeout` s. With timeout 0, return False instead of raising."""
        flag = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(self.fd, flag | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if timeout == 0:
                    return False
                if not waited and on_wait:
                    on_wait(f"waiting for other users of the sandbox to finish before I {what} ({LOCK_FILE})")
                waited = True
                if time.monotonic() >= deadline:
                    raise SandboxError(
                        f"waited {timeout:.0f}s for the sandbox lock {LOCK_FILE} to {what}: another test "
                        "session or command is using the sandbox; wait for it to finish, or stop it"
                    ) from None
                time.sleep(0.1)

    def drop(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


class _State:
    session: _Handle | None = None  # this process's shared hold (test sessions)
    session_users = 0
    exclusive_depth = 0


_state = _State()


def hold_shared(what: str = "use the sandbox", timeout: float = DEFAULT_TIMEOUT) -> None:
    """Hold the lock shared for this process until the matching `release_shared` (counted, so nested
    fixtures in one process can each hold it)."""
    if _state.session is None:
        handle = _Handle()
        handle.take(False, timeout, what)
        _state.session = handle
    _state.session_users += 1


@contextmanager
def shared_use(what: str = "use the sandbox", timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Context manager: hold the lock shared meanwhile (e.g. a benchmark run), so no test session
    resizes or removes the sandbox under it."""
    hold_shared(what, timeout)
    try:
        yield
    finally:
        release_shared()


def release_shared() -> None:
    if _state.session is None:
        return
    _state.session_users -= 1
    if _state.session_users <= 0:
        _state.session.drop()
        _state.session.close()
        _state.session = None
        _state.session_users = 0


@contextmanager
def _exclusive(what: str, timeout: float, on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
    if _state.exclusive_depth:  # re-entrant: up() calling down(), a test wrapping node_down()
        _state.exclusive_depth += 1
        try:
            yield True
        finally:
            _state.exclusive_depth -= 1
        return
    session = _state.session
    handle = session or _Handle()
    if session:
        session.drop()
    try:
        got = handle.take(True, timeout, what, on_wait)
        if got:
            _state.exclusive_depth = 1
        try:
            yield got
        finally:
            _state.exclusive_depth = 0
            if got:
                handle.drop()
    finally:
        if session:
            session.take(False, DEFAULT_TIMEOUT, "take back the shared lock")
        else:
            handle.close()


def exclusive_use(
    what: str = "change the sandbox",
    timeout: float = DEFAULT_TIMEOUT,
    on_wait: Callable[[str], None] | None = None,
):
    """Context manager: hold the lock exclusively (waiting for other users to finish); re-entrant."""
    return _exclusive(what, timeout, on_wait)


def try_exclusive(what: str = "change the sandbox"):
    """Context manager yielding True while holding the lock exclusively, or False at once if anyone
    else holds it."""
    return _exclusive(what, 0)
