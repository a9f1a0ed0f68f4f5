"""Free space where a path will live (its nearest existing parent, so it works before mkdir)."""

from __future__ import annotations

import shlex

from .base import ProbeFact


class FreeSpace(ProbeFact):
    """Free GiB on the filesystem that holds (or will hold) `path`; `None` if df fails."""

    def snippet(self, path: str) -> str:
        return (
            f'p={shlex.quote(path)}; while [ ! -e "$p" ] && [ "$p" != / ]; do p=$(dirname "$p"); done; '
            'df -Pk "$p" | tail -n 1'
        )

    def process(self, output: list[str]) -> float | None:
        for line in output:
            fields = line.split()
            if len(fields) >= 6 and fields[3].isdigit():
                return round(int(fields[3]) / 1024**2, 1)
        return None
