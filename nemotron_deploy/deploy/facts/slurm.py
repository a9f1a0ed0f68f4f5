"""Slurm's client tools on a node (`sbatch --version`)."""

from __future__ import annotations

import shlex

from ...service.slurm import active_rows
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


class SubmitContext(ProbeFact):
    """Who submits jobs here and with what: {"user": "root", "slurm_bin": "/usr/bin", "sudo": True}.
    The scheduled check replaces replicas as the same user, through sudo."""

    def snippet(self) -> str:
        return (
            'echo "user=$(id -un)"; echo "group=$(id -gn)"; s=$(command -v sbatch) && echo "slurm_bin=${s%/*}"; '
            "if command -v sudo >/dev/null 2>&1; then echo sudo=yes; fi"
        )

    def process(self, output: list[str]) -> dict:
        seen = dict(line.split("=", 1) for line in output if "=" in line)
        return {
            "user": seen.get("user"),
            "group": seen.get("group"),
            "slurm_bin": seen.get("slurm_bin"),
            "sudo": seen.get("sudo") == "yes",
        }


class ReplicaJobs(ProbeFact):
    """[(job id, state)] of `user`'s jobs named `names` (comma-separated; another account may name a
    job the same: never counted); [] when squeue is missing or fails."""

    def snippet(self, names: str, user: str) -> str:
        return (
            f"squeue -h -t all -u {shlex.quote(user)} -n {shlex.quote(names)} -o '%i %T' 2>/dev/null || true"
        )

    def process(self, output: list[str]) -> list[tuple[str, str]]:
        return active_rows("\n".join(output))


class JobRecords(ProbeFact):
    """{path: the record (dict)} of the job records among `paths` that are regular files (not links),
    each with its owner and mode as "_owner" and "_mode" (what each replica's batch script wrote: job
    id, first node, the files digest it started with). Whether to believe one is the caller's test
    (host_checks.trusted_records)."""

    def snippet(self, paths: tuple[str, ...]) -> str:
        return (
            "".join(
                f"if [ -f {shlex.quote(p)} ] && [ ! -L {shlex.quote(p)} ]; then "
                f"printf '%s %s %s\\n' $(stat -c '%U %a' {shlex.quote(p)}) {shlex.quote(p)}; "
                f"head -n 1 {shlex.quote(p)}; echo; fi; "
                for p in paths
            )
            + "true"
        )

    def process(self, output: list[str]) -> dict:
        import json

        records, head = {}, None
        for line in output:
            if not line.strip():
                continue
            if head is None:
                head = line.split(" ", 2)
                continue
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            if isinstance(value, dict) and len(head) == 3:
                value["_owner"], value["_mode"] = head[0], head[1]
                records[head[2]] = value
            head = None
        return records
