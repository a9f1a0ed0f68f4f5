"""The sandbox cluster: a login node and N GPU compute nodes in Linux namespaces on this machine.

Each node is a network + UTS + mount + PID namespace on the private bridge nsbr0 (10.213.0.0/24),
with its own hostname, address, sshd and node-local directories; together they run munge, Slurm
(slurmctld on sb-login, slurmd with fake gres/gpu on sb-node01..), a docker-registry holding a tiny
stand-in of the NeMo image, an `nvidia-smi` stand-in answering from real H200 captures, and NeMo's
server emulator at the path the NeMo container uses, and on demand a Docker engine per compute
node (docker.py). Needs root on Debian/Ubuntu.

    from nemotron_rehearsal import sandbox
    sb = sandbox.up(nodes=2, gpus_per_node=8)   # seconds; returns at once if already up
    subprocess.run(sb.ssh_argv("sb-login", "sinfo"))
    sandbox.start_docker()                      # the compute nodes' Docker engines, on demand
    sandbox.down()

CLI: `nemotron-deploy sandbox up|down|status`. Pytest: `testing.session_sandbox()`.
"""

from .cluster import (
    PAUSE_CRON,
    RESUME_CRON,
    clear_gpu_faults,
    current,
    down,
    logs,
    node_down,
    node_run,
    node_up,
    set_gpu_faults,
    start_docker,
    start_node_sshd,
    status,
    stop_docker,
    stop_node_sshd,
    up,
)
from .layout import Node, Sandbox
from .locks import exclusive_use, shared_use
from .proc import SandboxError

__all__ = [
    "PAUSE_CRON",
    "RESUME_CRON",
    "Node",
    "Sandbox",
    "SandboxError",
    "clear_gpu_faults",
    "current",
    "down",
    "exclusive_use",
    "logs",
    "node_down",
    "node_run",
    "node_up",
    "set_gpu_faults",
    "shared_use",
    "start_docker",
    "start_node_sshd",
    "status",
    "stop_docker",
    "stop_node_sshd",
    "up",
]
