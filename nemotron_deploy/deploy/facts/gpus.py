"""GPUs on a node, from `nvidia-smi`'s CSV query (parsed by nemotron_deploy.service.nvidia_smi)."""

from __future__ import annotations

from ...service.nvidia_smi import QUERY_COMMAND, parse_query_csv
from .base import ProbeFact


class NvidiaGpus(ProbeFact):
    """The node's GPUs as `nvidia_smi.GpuInfo` records; `None` when nvidia-smi is absent.

    A failing nvidia-smi (driver not loaded, a GPU fallen off the bus) comes back as
    `{"error": "<what it printed>"}` so preflight can say what happened.
    """

    def snippet(self) -> str:
        return f'if command -v nvidia-smi >/dev/null 2>&1; then {QUERY_COMMAND} || echo "@@rc=$?"; else echo @@missing; fi'

    def process(self, output: list[str]):
        if output == ["@@missing"]:
            return None
        if any(line.startswith("@@rc=") for line in output):
            return {"error": " ".join(line for line in output if not line.startswith("@@rc="))[:500]}
        try:
            return parse_query_csv(output)
        except ValueError as exc:
            return {"error": f"unparseable nvidia-smi output: {exc}"}
