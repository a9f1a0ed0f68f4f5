"""Fake GPUs on compute nodes: dummy device files for Slurm's gres, and the `nvidia-smi` stand-in.

Nothing here pretends to compute. The device files are character devices with NVIDIA's major number
(195, like /dev/nvidiaN) in the node-local /opt/nemotron-sandbox/dev, only so that Slurm's gres/gpu
has files to hand out (opening them fails: no driver). `nvidia-smi` (nvidia_smi.py) prints the real
captures in nvidia_smi_captures/ widened to the node's GPU count, and obeys a per-node fault file
that tests write with `set_gpu_faults` to simulate a missing GPU, ECC errors, the wrong model or a
driver that isn't loaded. On the node's PATH, `nvidia-smi` is a small shell front that repeats a
healthy answer the stand-in already gave for the same arguments (see FRONT), else runs the stand-in.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from . import nodes
from .layout import NODE_DEV_DIR, NODE_GPU_FAULTS, NODE_NVIDIA_SMI_CONFIG, NODE_SANDBOX_DIR, Node
from .proc import SandboxError

HERE = Path(__file__).resolve().parent
STAND_IN = HERE / "nvidia_smi.py"
CAPTURES = HERE / "nvidia_smi_captures" / "h200-x2"
NODE_CAPTURES = f"{NODE_SANDBOX_DIR}/nvidia-smi-captures/h200-x2"
NODE_STAND_IN = f"{NODE_SANDBOX_DIR}/nvidia_smi.py"
NODE_ANSWERS = f"{NODE_SANDBOX_DIR}/nvidia-smi-answers"
NVIDIA_MAJOR = 195
NVIDIA_CTL_MINOR = 255


def front(*, faults: str, answers: str, stand_in: str, python: str = "/usr/bin/python3") -> str:
    """The node's `nvidia-smi`: repeats the answer the stand-in kept for the same arguments while no
    fault is injected, else runs the stand-in. Every sandbox node shares this machine's two cores:
    Python's start-up (~50 ms of CPU) on every GPU query is a rehearsal cost that a real node doesn't
    put on its neighbours; the front costs a few ms."""
    return f"""#!/bin/sh
# nvidia-smi STAND-IN front for the nemotron-deploy sandbox: NOT NVIDIA software, talks to no GPU.
if [ ! -e {faults} ]; then
    answer={answers}/$(printf '%s\\n' "$@" | md5sum | cut -d' ' -f1)
    [ -f "$answer" ] && exec cat "$answer"
fi
exec {python} {stand_in} "$@"
"""


FRONT = front(faults=NODE_GPU_FAULTS, answers=NODE_ANSWERS, stand_in=NODE_STAND_IN)


def _mknod(path: Path, major: int, minor: int) -> None:
    path.unlink(missing_ok=True)
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    path.chmod(0o666)  # mknod's mode is filtered by the umask


def install(node: Node, gpus: int) -> None:
    """Device files, the stand-in on the node's PATH, its config and captures (node must be stopped
    or running: everything goes to node-private bind-mounted dirs)."""
    dev = nodes.host_path(node, NODE_DEV_DIR)
    dev.mkdir(parents=True, exist_ok=True)
    for i in range(gpus):
        _mknod(dev / f"nvidia{i}", NVIDIA_MAJOR, i)
    _mknod(dev / "nvidiactl", NVIDIA_MAJOR, NVIDIA_CTL_MINOR)

    if not (CAPTURES / "q.xml").is_file():
        raise SandboxError(
            f"the nvidia-smi captures are missing from the installed package ({CAPTURES}): install "
            "nemotron-deploy from a checkout (pip install -e .) or with its package data"
        )
    captures = nodes.host_path(node, NODE_CAPTURES)
    shutil.rmtree(captures, ignore_errors=True)
    shutil.copytree(CAPTURES, captures)
    config = {"gpus": gpus, "captures": NODE_CAPTURES, "faults": NODE_GPU_FAULTS, "cache": NODE_ANSWERS}
    nodes.install_file(node, NODE_NVIDIA_SMI_CONFIG, json.dumps(config, indent=1).encode() + b"\n")
    install_stand_in(node)  # always writes, so the answers kept for the earlier config go


def install_stand_in(node: Node, *, only_if_changed: bool = False) -> None:
    """The stand-in and its front; the answers it kept are dropped when either changed."""
    programs = {NODE_STAND_IN: STAND_IN.read_bytes(), "/usr/local/bin/nvidia-smi": FRONT.encode()}
    wrote = [
        nodes.install_file(node, path, content, 0o755, only_if_changed=only_if_changed)
        for path, content in programs.items()
    ]
    if any(wrote):  # after the writes: an answer the old stand-in kept meanwhile goes too
        shutil.rmtree(nodes.host_path(node, NODE_ANSWERS), ignore_errors=True)


def set_gpu_faults(
    node: Node,
    *,
    gpus: int | None = None,
    ecc_uncorrected: dict[int, int] | None = None,
    name: str | None = None,
    driver_failure: bool = False,
) -> None:
    """Make the node's nvidia-smi report a fault (see nvidia_smi.py); takes effect on the next call."""
    faults: dict = {}
    if gpus is not None:
        faults["gpus"] = gpus
    if ecc_uncorrected:
        faults["ecc_uncorrected"] = {str(k): v for k, v in ecc_uncorrected.items()}
    if name:
        faults["name"] = name
    if driver_failure:
        faults["driver_failure"] = True
    nodes.install_file(node, NODE_GPU_FAULTS, json.dumps(faults, indent=1).encode() + b"\n")


def clear_gpu_faults(node: Node) -> None:
    nodes.host_path(node, NODE_GPU_FAULTS).unlink(missing_ok=True)
