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


@dataclass(frozen=True)
class NodeState:
    """One path as `stat` sees it without following a link: kind, mode, owner."""

    path: str
    kind: str  # "directory", "link", "file", "other"
    mode: int  # permission bits with set-id and sticky
    uid: int
    user: str


def ancestors(path: str) -> list[str]:
    """The path's parents, nearest first, up to and including /."""
    found = []
    while path not in ("/", ""):
        path = path.rsplit("/", 1)[0] or "/"
        found.append(path)
    return found


class PathChains(ProbeFact):
    """{"user": who the deploy runs as, "paths": {path: NodeState}} of each path and every parent of it
    up to / (links not followed; paths that don't exist are absent): what the preflight needs to tell
    whether a directory the deploy manages, or any parent of it, is another account's."""

    def snippet(self, paths: tuple[str, ...]) -> str:
        every = dict.fromkeys(p for path in paths for p in (path, *ancestors(path)))
        quoted = " ".join(shlex.quote(p) for p in every)
        return (
            'echo "@user $(id -un)"; '
            f'for p in {quoted}; do if [ -e "$p" ] || [ -L "$p" ]; then '
            "stat -c '%F|%f|%u|%U|%n' -- \"$p\"; fi; done"
        )

    def process(self, output: list[str]) -> dict:
        kinds = {"directory": "directory", "symbolic link": "link", "regular file": "file"}
        user, states = None, {}
        for line in output:
            if line.startswith("@user "):
                user = line[len("@user ") :].strip()
                continue
            fields = line.split("|", 4)
            if len(fields) != 5:
                continue
            kind, raw_mode, uid, name, path = fields
            try:
                mode, number = int(raw_mode, 16) & 0o7777, int(uid)
            except ValueError:
                continue
            states[path] = NodeState(path, kinds.get(kind, "other"), mode, number, name)
        return {"user": user, "paths": states}

    @staticmethod
    def default() -> dict:
        return {"user": None, "paths": {}}
