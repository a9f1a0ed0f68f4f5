"""State of many paths in one command: type, mode, owner, group and sha256 of each."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .base import ProbeFact


@dataclass(frozen=True)
class PathState:
    path: str
    kind: str  # "file", "directory", "link" (not followed: `sha256` holds its target), "other"
    mode: str  # octal, e.g. "755"
    user: str
    group: str
    sha256: str | None = None


class ManagedPaths(ProbeFact):
    """{path: PathState}; paths that don't exist are absent from the dict. Files in `unhashed` are
    stat-ed but not read (sha256 None): a container image is tens of GB on shared storage, and only
    its presence matters; checksumming it on every node at every deploy would read it N times."""

    def snippet(self, paths: tuple[str, ...], unhashed: tuple[str, ...] = ()) -> str:
        quoted = " ".join(shlex.quote(p) for p in paths)
        loop = (
            f"for p in {quoted}; do "
            'if [ -L "$p" ]; then printf \'L - - - %s %s\\n\' "$(readlink "$p")" "$p"; '
            "elif [ -f \"$p\" ]; then printf 'F %s %s %s ' $(stat -c '%a %U %G' \"$p\"); "
            "sha256sum \"$p\" | cut -d' ' -f1 | tr '\\n' ' '; printf '%s\\n' \"$p\"; "
            'elif [ -d "$p" ]; then printf \'D %s %s %s - %s\\n\' $(stat -c \'%a %U %G\' "$p") "$p"; '
            'elif [ -e "$p" ]; then printf \'O - - - - %s\\n\' "$p"; fi; done'
        )
        if not unhashed:
            return loop
        quoted = " ".join(shlex.quote(p) for p in unhashed)
        return loop + (
            f"\nfor p in {quoted}; do "
            'if [ -f "$p" ] && [ ! -L "$p" ]; then printf \'F %s %s %s - %s\\n\' $(stat -c \'%a %U %G\' "$p") "$p"; '
            'elif [ -e "$p" ]; then printf \'O - - - - %s\\n\' "$p"; fi; done'
        )

    def process(self, output: list[str]) -> dict[str, PathState]:
        kinds = {"F": "file", "D": "directory", "L": "link", "O": "other"}
        states = {}
        for line in output:
            fields = line.split(" ", 5)
            if len(fields) != 6 or fields[0] not in kinds:
                continue
            kind, mode, user, group, digest, path = fields
            states[path] = PathState(path, kinds[kind], mode, user, group, None if digest == "-" else digest)
        return states

    @staticmethod
    def default() -> dict[str, PathState]:
        return {}
