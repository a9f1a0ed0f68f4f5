"""Which container runtimes a node has: enroot + pyxis, docker, podman, apptainer."""

from __future__ import annotations

from .base import ProbeFact

# pyxis adds --container-image to srun; without it, `srun --container-image` fails at job start.
# Presence is all the deploy needs: the tools' paths, not their versions (`enroot version` and
# `podman --version` cost 30-40 ms of CPU each, on every node, on every run).
_SNIPPET = r"""for tool in enroot docker podman apptainer; do
  path=$(command -v "$tool" 2>/dev/null) && echo "$tool=$path"
done
if command -v srun >/dev/null 2>&1; then
  if srun --help 2>/dev/null | grep -q -- --container-image; then echo pyxis=yes; else echo pyxis=no; fi
fi"""


class ContainerRuntimes(ProbeFact):
    """{"enroot": "/usr/bin/enroot", "pyxis": "yes", "podman": "/usr/bin/podman", ...}: present tools only."""

    def snippet(self) -> str:
        return _SNIPPET

    def process(self, output: list[str]) -> dict[str, str]:
        found = {}
        for line in output:
            name, sep, value = line.partition("=")
            if sep and name in {"enroot", "docker", "podman", "apptainer", "pyxis"}:
                found[name] = value.strip()
        return found

    @staticmethod
    def default() -> dict[str, str]:
        return {}
