"""One SSH command per host that gathers every fact the deploy needs.

pyinfra's stock operations read one fact per file; at 16 nodes that is most of a re-deploy's time.
`HostSnapshot` runs the snippets of several ProbeFacts in one shell, separated by marker lines, and
hands each fact its own lines to parse.
"""

from __future__ import annotations

from typing import Any

from .base import ProbeFact

MARKER = "@@@nemotron-section "


class HostSnapshot(ProbeFact):
    """`host.get_fact(HostSnapshot, probes=((name, FactClass, args), ...))` -> {name: parsed value}."""

    def command(self, probes: tuple[tuple[str, type[ProbeFact], tuple[Any, ...]], ...]) -> str:
        parts = [f"echo '{MARKER}{name}'; {{ {cls().snippet(*args)}\n}} 2>&1" for name, cls, args in probes]
        return "\n".join(parts) + "\ntrue"

    def process_sections(self, probes, output: list[str]) -> dict[str, Any]:
        sections: dict[str, list[str]] = {}
        current = None
        for line in output:
            if line.startswith(MARKER):
                current = line[len(MARKER) :]
                sections[current] = []
            elif current is not None:
                sections[current].append(line)
        return {name: cls().process(sections.get(name, [])) for name, cls, _ in probes}

    def process(self, output: list[str]) -> list[str]:
        # pyinfra doesn't hand process() the fact's arguments; `snapshot()` splits the sections.
        return output


def snapshot(host, probes: tuple[tuple[str, type[ProbeFact], tuple[Any, ...]], ...]) -> dict[str, Any]:
    """Read all `probes` on `host` in one command; {name: what that fact's process() returns}."""
    from ..errors import DeployError
    from .files import ReadError

    lines = host.get_fact(HostSnapshot, probes=probes)
    address = host.data.get("ssh_hostname") or host.name
    if lines is None:  # the read itself failed: pyinfra logged why (e.g. the connection dropped)
        raise DeployError(
            f"{host.name} ({address}): could not read the host over SSH (see the error above); "
            "nothing was changed on any host: fix the host or leave it out (--limit), then re-run"
        )
    try:
        return HostSnapshot().process_sections(probes, lines)
    except ReadError as exc:  # a tool the read needs is missing: its answer would be wrong, not empty
        raise DeployError(
            f"{host.name} ({address}): {exc}; nothing was changed on any host: fix the host or leave "
            "it out (--limit), then re-run"
        ) from None
