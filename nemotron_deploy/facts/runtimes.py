"""Which container runtimes a node has: enroot + pyxis, docker, podman, apptainer."""

from __future__ import annotations

from .base import ProbeFact

# pyxis adds --container-image to srun; without it, `srun --container-image` fails at job start.
_SNIPPET = r"""for tool in enroot docker podman apptainer srun; do
  if command -v "$tool" >/dev/null 2>&1; then
    case "$tool" in
      enroot) echo "enroot=$(enroot version 2>/dev/null | head -n1)" ;;
      srun) if srun --help 2>/dev/null | grep -q -- --container-image; then echo pyxis=yes; else echo pyxis=no; fi ;;
      *) echo "$tool=$("$tool" --version 2>/dev/null | head -n1)" ;;
    esac
  fi
done"""


class ContainerRuntimes(ProbeFact):
    """{"enroot": "3.4.1", "pyxis": "yes", "podman": "podman version 4.3.1", ...}: present tools only."""

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
