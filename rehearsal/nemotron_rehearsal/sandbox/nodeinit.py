#!/usr/bin/python3
"""Init process of one sandbox node: PID 1 of the node's PID namespace. Standard library only.

It is started (by nodes.py) as
    setsid -f nsenter --net=/run/netns/<ns> unshare --uts --mount --pid --fork --propagation private \
        /usr/bin/python3 nodeinit.py <spec.json>
so it already sits in the node's network namespace and in fresh UTS, mount and PID namespaces.
It then gives the node its identity (hostname, a /proc of its own, private directories bound over the
paths that differ per node), writes its host-visible PID and a ready marker, and stays alive:
 - as the namespaces' anchor: every daemon of the node is started later with
   `nsenter --target <this pid> --mount --uts --net --pid`, and sees what this process set up;
 - as the reaper of orphans (daemons that double-fork end up as its children);
 - as the node's power switch: when it exits, the kernel kills every process of the PID namespace
   (daemons, Slurm job tasks, ssh sessions), and the mount namespace disappears with them.
It runs the host's /usr/bin/python3, not a virtualenv, because it hides /root, /opt and /tmp.
"""

import json
import os
import signal
import subprocess
import sys


def mount(args, what):
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"nodeinit: {what} failed: mount {' '.join(args)}: {result.stderr.strip()}")


def apply(entry):
    """One entry of the spec's "mounts" list."""
    kind, target = entry["kind"], entry["target"]
    if kind == "proc":
        mount(["-t", "proc", "proc", target], f"mounting /proc on {target}")
    elif kind == "overlay":
        opts = f"lowerdir={target},upperdir={entry['upper']},workdir={entry['work']}"
        mount(["-t", "overlay", "overlay", "-o", opts, target], f"overlaying {target}")
    elif kind == "bind":
        opts = ["-o", "ro"] if entry.get("readonly") else []
        mount(["--bind", *opts, entry["source"], target], f"binding {entry['source']} on {target}")
    elif kind == "dev":
        private_dev(entry)
    else:
        sys.exit(f"nodeinit: unknown mount kind {kind!r}")


DEV_MARK = ".nemotron-sandbox-node"  # in a node's own /dev: made by private_dev


def private_dev(entry):
    """A /dev of the node's own, so the node has what a real GPU node has at its usual paths without
    touching the host's /dev (which every node and the host share): the host's entries, each bound
    from the host's (directories with what is mounted in them: pts, shm); an mqueue filesystem at
    /dev/mqueue (rootless podman's --ipc=host binds it in, and this host has none); and the node's
    fake GPU device files (entry["devices"], e.g. nvidia0) at /dev/<name>, where rootless runc binds
    each CDI device from. Built in a staging dir, then moved over /dev at once."""
    stage, devices = entry["stage"], entry["devices"]
    os.makedirs(stage, exist_ok=True)
    mount(["-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", stage], f"mounting a tmpfs on {stage}")
    sources = [(name, f"/dev/{name}") for name in sorted(os.listdir("/dev")) if name != "mqueue"]
    sources += [(name, f"{devices}/{name}") for name in sorted(os.listdir(devices))]
    for name, source in sources:
        target = f"{stage}/{name}"
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
            continue
        if os.path.isdir(source):
            os.mkdir(target)
        else:
            open(target, "w").close()
        mount(["--rbind", source, target], f"binding {source} into the node's /dev")
    os.mkdir(f"{stage}/mqueue")
    mount(["-t", "mqueue", "mqueue", f"{stage}/mqueue"], "mounting /dev/mqueue")
    open(f"{stage}/{DEV_MARK}", "w").close()
    mount(["--move", stage, "/dev"], "moving the node's /dev in place")


def reap_forever():
    """Wait for signals: reap orphans on SIGCHLD, exit (taking the whole node down) on TERM/INT/HUP."""
    stop = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    while True:
        sig = signal.sigwait(stop | {signal.SIGCHLD})
        if sig in stop:
            os._exit(0)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    # /proc is still the host's here, so /proc/self is our PID as the host sees it.
    host_pid = int(os.readlink("/proc/self"))
    with open("/proc/sys/kernel/hostname", "w") as f:  # per UTS namespace
        f.write(spec["hostname"])
    for entry in spec["mounts"]:
        apply(entry)
    os.chdir("/")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    tmp = spec["pid_file"] + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{host_pid}\n")
    os.rename(tmp, spec["pid_file"])
    print(f"nodeinit: {spec['hostname']} ready, host pid {host_pid}", flush=True)
    reap_forever()


if __name__ == "__main__":
    if sys.argv[1] == "--dev":  # a running node gets its own /dev (nodes.ensure_private_dev)
        private_dev(json.loads(sys.argv[2]))
    else:
        main(sys.argv[1])
