#!/usr/bin/python3
"""nvidia-container-runtime-hook STAND-IN for the sandbox's compute nodes: NOT NVIDIA software.

Installed as /usr/local/bin/nvidia-container-runtime-hook on compute nodes only (node-private), so
that the docker runtime's `docker run --gpus=all` works unchanged. Docker 20.10 (moby
daemon/nvidia_linux.go) registers its "nvidia" device driver only when this name is on dockerd's
PATH at start; `--gpus` then sets NVIDIA_VISIBLE_DEVICES in the container's environment and adds
`<this path> prestart` as an OCI prestart hook. runc runs it after the container's mounts are set up
and before pivot_root, with the container's state (its pid, its bundle) on stdin.

The real hook hands the work to `nvidia-container-cli configure`, which bind-mounts the GPUs' device
nodes (and the driver's libraries and tools) into the container's rootfs and allows the devices in
its device cgroup. This does the device part for the node's fake GPUs (opt/nemotron-sandbox/dev,
what Slurm's gres hands out): for each GPU NVIDIA_VISIBLE_DEVICES names ("all", or indices) and for
nvidiactl, an empty file at <rootfs>/dev/<name> with the node's device node bound over it, and
"c 195:<minor> rw" in the container's devices cgroup (cgroup v1). There is no driver to mount.
"void", "none" or an empty value: no device, as the real hook. Each run is logged to
/var/log/nvidia-container-runtime-hook.log in the node.
"""

import json
import os
import re
import subprocess
import sys
import time

DEV_DIR = "/opt/nemotron-sandbox/dev"
LOG = "/var/log/nvidia-container-runtime-hook.log"


def log(message):
    with open(LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")


def fail(message):
    log(f"error: {message}")
    sys.exit(f"nvidia-container-runtime-hook (sandbox stand-in): {message}")


def environment(process):
    """The container process's environment; the last of a name wins (docker appends its own)."""
    env = {}
    for item in process.get("env") or []:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def devices(visible):
    """[(name, minor)] of the node's GPUs `visible` names, plus nvidiactl."""
    if visible in ("", "void", "none"):
        return []
    gpus = sorted(
        (int(m.group(1)) for n in os.listdir(DEV_DIR) if (m := re.fullmatch(r"nvidia(\d+)", n))),
    )
    if visible != "all":
        wanted = [int(v) for v in visible.split(",") if v.strip()]
        unknown = [i for i in wanted if i not in gpus]
        if unknown:
            fail(f"NVIDIA_VISIBLE_DEVICES={visible}: no GPU {unknown} on this node (it has {gpus})")
        gpus = wanted
    chosen = [f"nvidia{i}" for i in gpus] + ["nvidiactl"]
    return [(name, os.minor(os.stat(f"{DEV_DIR}/{name}").st_rdev)) for name in chosen]


def devices_cgroup(pid):
    for line in open(f"/proc/{pid}/cgroup"):
        _, controllers, path = line.rstrip("\n").split(":", 2)
        if "devices" in controllers.split(","):
            return f"/sys/fs/cgroup/devices{path}"
    return None  # cgroup v2 only: the real hook attaches a BPF program; not rehearsed here


def prestart():
    state = json.load(sys.stdin)
    pid, bundle = state["pid"], state["bundle"]
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    rootfs = os.path.join(bundle, config["root"]["path"])  # an absolute root.path stays as it is
    visible = environment(config.get("process") or {}).get("NVIDIA_VISIBLE_DEVICES", "")
    chosen = devices(visible)
    # In the container's mount namespace (rootfs not yet its /): a file to bind each device over.
    script = "".join(
        f': > "$1/dev/{name}" && mount --bind {DEV_DIR}/{name} "$1/dev/{name}" || exit 1\n'
        for name, _ in chosen
    )
    if script:
        run = subprocess.run(
            ["nsenter", f"--target={pid}", "--mount", "--", "sh", "-c", script, "sh", rootfs],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            fail(f"mounting the devices into {rootfs} failed: {run.stderr.strip()}")
        cgroup = devices_cgroup(pid)
        if cgroup:
            for _, minor in chosen:
                with open(f"{cgroup}/devices.allow", "w") as f:
                    f.write(f"c 195:{minor} rw\n")
    names = " ".join(name for name, _ in chosen) or "none"
    log(f"container {state.get('id', '?')} pid {pid}: NVIDIA_VISIBLE_DEVICES={visible!r}: {names}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["prestart"]:
        # poststart/poststop: nothing to undo (the mounts go with the container's namespace).
        sys.exit(0)
    prestart()
