"""Slurm's client tools on a node (`sbatch --version`)."""

from __future__ import annotations

from .base import ProbeFact


class SlurmVersion(ProbeFact):
    """ "22.05.8" from `slurm 22.05.8`; `None` where sbatch is absent."""

    def snippet(self) -> str:
        return "if command -v sbatch >/dev/null 2>&1; then sbatch --version; else echo @@missing; fi"

    def process(self, output: list[str]) -> str | None:
        for line in output:
            if line.startswith("slurm"):
                return line.split()[-1]
        return None
