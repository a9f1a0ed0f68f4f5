"""Slurm's client tools on a node (`sbatch --version`)."""

from __future__ import annotations

from .base import ProbeFact


class SlurmVersion(ProbeFact):
    """{"version": "22.05.8"} from `slurm-wlm 22.05.8`; {"error": "..."} when sbatch is installed but
    can't run (e.g. it finds no slurm.conf); `None` where sbatch is absent."""

    def snippet(self) -> str:
        return 'if command -v sbatch >/dev/null 2>&1; then sbatch --version || echo "@@rc=$?"; else echo @@missing; fi'

    def process(self, output: list[str]) -> dict[str, str] | None:
        if output == ["@@missing"]:
            return None
        for line in output:
            if line.startswith("slurm") and len(line.split()) == 2:
                return {"version": line.split()[-1]}
        message = " ".join(line for line in output if not line.startswith("@@rc="))
        return {"error": message[-300:] or "sbatch --version failed"}
