"""State of many paths in one command: type, mode, owner, group and sha256 of each.

Both facts here read their paths in a constant number of processes per host, whatever the number of
paths: the shell's own tests (builtins, no fork) pick which paths to hand a tool, then one `find`
(or `stat`) describes all of them and one `sha256sum` hashes every regular file that must be
hashed. The tools print NUL-separated fields, so a name with spaces, a newline or any byte but NUL
comes back whole; every path must be absolute (`find` would read `-x` or `(` as part of its
expression). Each tool's list ends with `/`, which exists everywhere: no record for it means the tool
is missing or not GNU's, and the read stops the deploy instead of reporting every path as absent.
"""

from __future__ import annotations

import shlex
import stat
from dataclasses import dataclass

from .base import ProbeFact

FOUND = "@@found"  # the line after which a fact's output is NUL-separated records
SENTINEL = "/"  # the last path each tool is given: a record for it proves the tool ran as GNU's


_KINDS = {stat.S_IFDIR: "directory", stat.S_IFLNK: "link", stat.S_IFREG: "file"}


class ReadError(ValueError):
    """The host could not describe its paths (a tool missing or not GNU's): the read is not to be
    trusted, so the deploy stops (``snapshot`` names the host)."""


def quoted_paths(paths: tuple[str, ...]) -> str:
    for p in paths:
        if not p.startswith("/"):
            raise ValueError(
                f"{p!r}: the host read takes absolute paths only (find would read it as an option)"
            )
    return " ".join(shlex.quote(p) for p in paths)


def nul_fields(output: list[str]) -> list[str] | None:
    """The NUL-separated fields after the FOUND line (the names may hold newlines: pyinfra split
    them into lines, joined again here), or None when that line is missing."""
    if FOUND not in output:
        return None
    blob = "\n".join(output[output.index(FOUND) + 1 :])
    fields = blob.split("\0")
    return fields[:-1]  # what follows the last NUL is the closing newline


def unescape_sha256sum(name: str) -> str:
    """GNU sha256sum's name escaping (a line that starts with a backslash): \\\\, \\n and \\r."""
    out, i = [], 0
    while i < len(name):
        if name[i] == "\\" and i + 1 < len(name):
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(name[i + 1], name[i + 1]))
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def parse_sha256sum(lines: list[str]) -> dict[str, str]:
    """{path: hex digest} from `sha256sum` lines (`HASH  name`, or `\\HASH  escaped name`)."""
    digests = {}
    for line in lines:
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        digest, sep, name = body[:64], body[64:66], body[66:]
        if len(digest) != 64 or sep not in ("  ", " *") or not name:
            continue
        try:
            int(digest, 16)
        except ValueError:
            continue
        digests[unescape_sha256sum(name) if escaped else name] = digest.lower()
    return digests


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
    its presence matters; checksumming it on every node at every deploy would read it N times.

    What each path reads as (links never followed): a link is "link" with its target in `sha256`
    (mode, user, group "-"); a regular file is "file" with its digest (None if it could not be
    read); a directory is "directory"; anything else is "other" (mode, user, group "-"). An unhashed
    path is "file" only if it is a regular file (not a link), else "other" if it resolves (`-e`),
    else absent. An owner or group with no name reads as its number (find's %u), where the loop this
    replaced read "UNKNOWN" (stat's %U): either differs from every name the deploy wants. Two
    processes per host, whatever the number of paths: `sha256sum` and `find` (module docstring)."""

    def snippet(self, paths: tuple[str, ...], unhashed: tuple[str, ...] = ()) -> str:
        lines = []
        if paths:
            lines += [
                "set --",
                f"for p in {quoted_paths(paths)}; do "
                'if [ -f "$p" ] && [ ! -L "$p" ]; then set -- "$@" "$p"; fi; done',
                'if [ $# -gt 0 ]; then sha256sum -- "$@" 2>/dev/null; echo "@@hashed $?"; fi',
            ]
        lines += [f"echo {FOUND}", "set --"]
        if unhashed:
            # Tagged for the parser, which is not handed the arguments; a link counts if it resolves.
            lines.append(
                f"for p in {quoted_paths(unhashed)}; do "
                'if [ -e "$p" ]; then set -- "$@" "$p"; printf \'u\\0%s\\0\' "$p"; fi; done'
            )
        listed = f"{quoted_paths(paths)} " if paths else ""
        lines += [
            f'find {listed}"$@" {SENTINEL} -maxdepth 0 '
            "-printf 's\\0%y\\0%m\\0%u\\0%g\\0%l\\0%p\\0' 2>/dev/null",
            "echo",
        ]
        return "\n".join(lines)

    def process(self, output: list[str]) -> dict[str, PathState]:
        for line in output:
            if line.startswith("@@hashed ") and line.split()[1] in ("126", "127"):
                raise ReadError(
                    "sha256sum (GNU coreutils) is missing: the deploy checksums its files with it"
                )
        fields = nul_fields(output)
        if fields is None:
            raise ReadError("the read of the managed paths printed nothing: is this a POSIX shell?")
        digests = parse_sha256sum(output[: output.index(FOUND)])
        unhashed, records, i = set(), [], 0
        while i < len(fields):
            tag = fields[i]
            if tag == "u" and i + 1 < len(fields):
                unhashed.add(fields[i + 1])
                i += 2
            elif tag == "s" and i + 6 < len(fields):
                records.append(fields[i + 1 : i + 7])
                i += 7
            else:
                raise ReadError(
                    f"unexpected output from the read of the managed paths: {fields[i : i + 3]!r}"
                )
        if not records or records[-1][5] != SENTINEL:
            raise ReadError(
                "find printed nothing for /: the deploy reads its files with GNU find's -printf "
                "(findutils); install it"
            )
        states = {}
        for kind, mode, user, group, target, path in records[:-1]:
            if path in unhashed:
                state = (
                    PathState(path, "file", mode, user, group)
                    if kind == "f"
                    else PathState(path, "other", "-", "-", "-")
                )
            elif kind == "l":
                state = PathState(path, "link", "-", "-", "-", target)
            elif kind == "f":
                state = PathState(path, "file", mode, user, group, digests.get(path))
            elif kind == "d":
                state = PathState(path, "directory", mode, user, group)
            else:
                state = PathState(path, "other", "-", "-", "-")
            states[path] = state
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
        every = tuple(dict.fromkeys(p for path in paths for p in (path, *ancestors(path))))
        lines = ['echo "@user $(id -un)"', "set --"]
        if every:
            lines.append(
                f"for p in {quoted_paths(every)}; do "
                'if [ -e "$p" ] || [ -L "$p" ]; then set -- "$@" "$p"; fi; done'
            )
        # One stat for every path (a stat per path forked once per parent of every directory).
        lines += [
            f"echo {FOUND}",
            f"stat --printf '%f\\0%u\\0%U\\0%n\\0' -- \"$@\" {SENTINEL} 2>/dev/null",
            "echo",
        ]
        return "\n".join(lines)

    def process(self, output: list[str]) -> dict:
        user = next((line[len("@user ") :].strip() for line in output if line.startswith("@user ")), None)
        fields = nul_fields(output)
        if fields is None or len(fields) % 4 or not fields or fields[-1] != SENTINEL:
            raise ReadError(
                "stat printed nothing for /: the deploy checks who owns its directories with GNU "
                "stat's --printf (coreutils); install it"
            )
        states = {}
        for i in range(0, len(fields), 4):
            raw_mode, uid, name, path = fields[i : i + 4]
            try:
                bits, number = int(raw_mode, 16), int(uid)
            except ValueError as exc:
                raise ReadError(f"unexpected output from stat for {path!r}: {raw_mode!r} {uid!r}") from exc
            states[path] = NodeState(
                path, _KINDS.get(stat.S_IFMT(bits), "other"), bits & 0o7777, number, name
            )
        return {"user": user, "paths": states}

    @staticmethod
    def default() -> dict:
        return {"user": None, "paths": {}}
