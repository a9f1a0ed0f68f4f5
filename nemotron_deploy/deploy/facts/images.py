"""Whether a container image is already present in a node's docker/podman storage."""

from __future__ import annotations

import shlex

from ..rootless import as_account
from .base import ProbeFact


class ImagePresent(ProbeFact):
    """True when `<runtime> image inspect REF` finds the image locally (no registry traffic)."""

    def snippet(self, runtime: str, image: str) -> str:
        tool = shlex.quote(runtime)
        return (
            f"if {tool} image inspect --format '{{{{.Id}}}}' {shlex.quote(image)} >/dev/null 2>&1; "
            "then echo present; else echo absent; fi"
        )

    def process(self, output: list[str]) -> bool:
        return output[-1:] == ["present"]


class RootlessPodman(ProbeFact):
    """What the service account's rootless podman needs and has on a compute node, in one read:
    {"subuid": bool, "subgid": bool, "runtime_dir": "<owner> <mode>" or None, "present": bool,
    "graph_root": its storage or None, "free": GiB free there or None}. The image and the storage are
    the account's own (rootless.as_account); root's podman storage is another one."""

    def snippet(self, user: str, image: str) -> str:
        q = shlex.quote(user)
        podman = lambda args: as_account(user, f"podman {args}")  # noqa: E731
        # getsubids asks every subid source (files, SSSD); without it, /etc/subuid by name or UID.
        subids = (
            "for kind in u g; do if command -v getsubids >/dev/null 2>&1; then "
            f"n=$(if [ $kind = g ]; then getsubids -g {q}; else getsubids {q}; fi 2>/dev/null | grep -c .); "
            f'else n=$(grep -cE "^({q}|$uid):" /etc/sub${{kind}}id 2>/dev/null); fi; echo "sub${{kind}}id=${{n:-0}}"; done'
        )
        exists = podman("image exists " + shlex.quote(image))
        graph_root = podman("info --format '{{.Store.GraphRoot}}'")
        body = (
            f"{subids}; "
            'echo "runtime_dir=$(stat -c \'%U %a\' "/run/user/$uid" 2>/dev/null)"; '
            f"if {exists} >/dev/null 2>&1; "
            "then echo present=yes; else echo present=no; fi; "
            f"g=$( {graph_root} 2>/dev/null | tail -n 1); "
            'echo "graph_root=$g"; p=${g:-/nonexistent}; '
            'while [ ! -e "$p" ] && [ "$p" != / ]; do p=$(dirname "$p"); done; '
            '[ -z "$g" ] || echo "df=$(df -Pk "$p" | tail -n 1)"'
        )
        # (No `exit`: the snippet runs in the one shell of the host's whole read.)
        return f"if uid=$(id -u {q} 2>/dev/null); then {body}; else echo @@nouser; fi"

    def process(self, output: list[str]) -> dict | None:
        if "@@nouser" in output:
            return None
        seen = dict(line.split("=", 1) for line in output if "=" in line)
        df = seen.get("df", "").split()
        return {
            "subuid": seen.get("subuid", "0").strip() not in ("", "0"),
            "subgid": seen.get("subgid", "0").strip() not in ("", "0"),
            "runtime_dir": seen.get("runtime_dir") or None,
            "present": seen.get("present") == "yes",
            "graph_root": seen.get("graph_root") or None,
            "free": round(int(df[3]) / 1024**2, 1) if len(df) >= 6 and df[3].isdigit() else None,
        }
