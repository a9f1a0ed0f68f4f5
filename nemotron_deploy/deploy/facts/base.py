"""The shape shared by our facts: a shell snippet that always exits 0, and a parser of its stdout."""

from __future__ import annotations

from typing import Any

from pyinfra.api import FactBase


class ProbeFact(FactBase):
    """A fact whose command can be batched with others (see snapshot.py).

    `snippet(*args)` is POSIX sh that prints the fact's raw output and never fails; `process`
    parses those lines. Missing tools are reported in the output, not as a failed command.
    """

    abstract = True

    def snippet(self, *args: Any) -> str:
        raise NotImplementedError

    def command(self, *args: Any) -> str:
        return f"{{ {self.snippet(*args)}\n}} 2>&1; true"
