"""Room for one more replica, asked of Slurm now: the rollout's choice between surge (start the new job
beside the old one) and drain-and-replace (take the old one out first).

The plan knows how many replicas the inventory's nodes hold, not what else runs on the partition: on
a partition shared with other work, a surge job submitted because "the plan leaves room" can wait
PENDING for hours. So the rollout asks, before each replica:

    sinfo -h -N -p <partition> -o '%n %P %t %G'

(one line per node: name, partition with ``*`` for the default one, compact state, configured
generic resources) and counts the nodes that are ``idle`` (no job at all on them; ``mix`` may have
every GPU taken, as a one-CPU job holding all 8 GPUs shows) and have at least the GPUs per node the
plan needs. One more replica fits when that count is at least the plan's nodes per replica. Other
states (``drain``, ``alloc``, ``mix``, ``idle*`` not responding, ``idle~`` powered off, a
reservation's ``resv``/``maint``) never count: drain-and-replace is the safe path when unsure.

Standard library only (runs from the login node's venv).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from .slurm import SlurmError

SINFO_FORMAT = "%n %P %t %G"
# %t's compact state of a node with no job on it, responding, powered on, in no reservation.
IDLE = "idle"


def gpu_count(gres: str) -> int:
    """The GPUs a node has, from sinfo's %G: ``gpu:8``, ``gpu:h100:8``, ``gpu:h100:8(S:0-1)``,
    ``gpu:a100:4,gpu:h100:4`` (8), ``gpu`` (1), ``(null)`` or other resources only (0)."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.strip().split(":")
        if parts[0] != "gpu":
            continue
        total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


@dataclass(frozen=True)
class Node:
    name: str
    state: str
    gpus: int


def parse_sinfo(text: str, partition: str | None) -> dict[str, Node]:
    """`sinfo -h -N -o '%n %P %t %G'` -> {node: Node} of `partition` (None: the default one, ``*``)."""
    nodes: dict[str, Node] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 4:
            continue
        name, part, state, gres = fields
        if (part.rstrip("*") == partition) if partition else part.endswith("*"):
            nodes[name] = Node(name, state, gpu_count(gres))
    return nodes


@dataclass(frozen=True)
class Room:
    """What Slurm has idle now against what one more replica needs."""

    partition: str
    nodes_needed: int
    gpus_per_node: int
    idle: tuple[str, ...]  # idle nodes with enough GPUs
    short_of_gpus: tuple[str, ...] = ()  # idle nodes with fewer GPUs than a replica needs per node

    @property
    def fits(self) -> bool:
        return len(self.idle) >= self.nodes_needed

    def why(self) -> str:
        n = len(self.idle)
        have = f"{n} idle node{'' if n == 1 else 's'} with {self.gpus_per_node} gpu in partition {self.partition}"
        if n:
            have += f" ({', '.join(self.idle)})"
        if self.short_of_gpus:
            have += f"; idle with too few GPUs: {', '.join(self.short_of_gpus)}"
        need = f"a replica needs {self.nodes_needed}"
        return f"surge: {have}, {need}" if self.fits else f"drain-and-replace: {have}, {need}"


def room(text: str, partition: str | None, nodes_needed: int, gpus_per_node: int) -> Room:
    """Room from sinfo's output (parse_sinfo's format)."""
    nodes = parse_sinfo(text, partition)
    idle = [n for n in nodes.values() if n.state == IDLE]
    return Room(
        partition=partition or (_default_partition(text) or ["(default)"])[0],
        nodes_needed=nodes_needed,
        gpus_per_node=gpus_per_node,
        idle=tuple(sorted(n.name for n in idle if n.gpus >= gpus_per_node)),
        short_of_gpus=tuple(sorted(n.name for n in idle if n.gpus < gpus_per_node)),
    )


def _default_partition(text: str) -> list[str]:
    rows = (line.split() for line in text.splitlines())
    return [f[1].rstrip("*") for f in rows if len(f) == 4 and f[1].endswith("*")]


def sinfo_argv(slurm_bin: str, partition: str | None) -> list[str]:
    argv = [f"{slurm_bin}/sinfo", "-h", "-N", "-o", SINFO_FORMAT]
    return argv + (["-p", partition] if partition else [])


def ask_slurm(slurm_bin: str, partition: str | None, nodes_needed: int, gpus_per_node: int) -> Room:
    """Room now; SlurmError when sinfo can't be run or fails (the caller then drains)."""
    argv = sinfo_argv(slurm_bin, partition)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmError(f"`{' '.join(argv)}` could not run: {exc}") from exc
    if res.returncode != 0:
        raise SlurmError(f"`{' '.join(argv)}` failed: {(res.stderr or res.stdout).strip()}")
    return room(res.stdout, partition, nodes_needed, gpus_per_node)
