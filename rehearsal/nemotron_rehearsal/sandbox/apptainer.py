"""Real Apptainer on the sandbox's compute nodes, for the `apptainer` runtime's path.

scripts/setup builds Apptainer 1.4.5 from rehearsal/vendor/ unless one is installed (a site's own is
used as it is): `apptainer` in /usr/local/bin, its configuration in /etc/apptainer, its starter in
/usr/local/libexec/apptainer. What the nodes need to run it the way a cluster does:
 - the program: /usr/local/bin is node-private, so `apptainer` is copied into each compute node, as
   enroot is (its starter and configuration files are found by the paths built into it);
 - one sandbox-only setting, in the node's /etc overlay (/etc/apptainer/apptainer.conf: the host's
   own file with one line changed), so the host's configuration and a real cluster never see it:
   `root default capabilities = no`. Apptainer's default (`full`) has a root container ask for every
   capability, and this machine's bounding set lacks CAP_SYS_RESOURCE (the same limit docker's runc
   shim works around), so every `apptainer exec` as root failed in the starter with
   "Requesting capability set 0x000001ffffffffff while permitted capability set is
   0x000001fffeffffff". Only the deploy's `apptainer pull` runs as root now; NeMo needs no capability.
 - a FUSE device the job's unprivileged user can open, node-private: the jobs run as service_user,
   and unprivileged Apptainer (user namespaces, no setuid starter) mounts the SIF with squashfuse_ll,
   which opens /dev/fuse. Every distribution's /dev/fuse is 0666; this machine's (made by the
   container it runs in, shared by the nodes) is 0600, so every rank failed at start with
   "squashfuse_ll exited: fuse: failed to open /dev/fuse: Permission denied" (exit 255). The node
   gets its own device file (10,229, 0666) in its private dev dir, bind-mounted over /dev/fuse in its
   mount namespace only: the host's /dev/fuse is untouched.
The sandbox registry is plain HTTP: the sandbox inventory's `registry_tls_verify = False` makes the
deploy's own `apptainer pull --no-https` (what a site with such a registry writes), nothing here.

All of it is written at `up` and refreshed on a running sandbox (refresh), so a sandbox brought up
before Apptainer was installed gets it at the next `up` without a restart.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

from . import nodes
from .layout import NODE_DEV_DIR, Node, Sandbox

NODE_CONF = "/etc/apptainer/apptainer.conf"
FUSE_MAJOR, FUSE_MINOR = 10, 229
NODE_FUSE = f"{NODE_DEV_DIR}/fuse"
# In the node: bind its own 0666 FUSE device over /dev/fuse unless that is already open to everyone.
BIND_FUSE = '[ "$(stat -c %a /dev/fuse)" = 666 ] || mount --bind "$1" /dev/fuse'
# The line, with the sandbox's comment above it if it is there already (applying twice changes nothing).
ROOT_CAPS = re.compile(r"^(?:# nemotron-deploy sandbox .*\n(?:#.*\n)?)?root default capabilities = .*$", re.M)
SANDBOX_ROOT_CAPS = (
    "# nemotron-deploy sandbox (generated): this machine's bounding set lacks CAP_SYS_RESOURCE, which\n"
    "# `full` asks for; the starter then refuses every root container.\n"
    "root default capabilities = no"
)


def find() -> Path | None:
    """The host's apptainer, or None (the sandbox runs without it; an apptainer deploy then fails its
    preflight, naming the node that lacks it)."""
    found = shutil.which("apptainer", path="/usr/local/bin:/usr/bin:/bin")
    return Path(found) if found else None


def sandbox_conf(host_conf: str) -> str:
    """The host's apptainer.conf with the sandbox's one setting (module docstring)."""
    if not ROOT_CAPS.search(host_conf):
        return host_conf.rstrip("\n") + "\n\n" + SANDBOX_ROOT_CAPS + "\n"
    return ROOT_CAPS.sub(SANDBOX_ROOT_CAPS, host_conf, count=1)


def install(node: Node, apptainer: Path) -> None:
    """Programs into the node's /usr/local/bin (if that is where they live), its apptainer.conf into
    the node's /etc overlay, each only when it differs from what the node has; its own FUSE device
    over /dev/fuse (module docstring)."""
    if apptainer.parent == Path("/usr/local/bin"):
        _copy_program(apptainer, nodes.host_path(node, "/usr/local/bin/apptainer"))
    conf = Path(NODE_CONF)
    if conf.is_file():
        text = sandbox_conf(conf.read_text())
        if _node_file(node, NODE_CONF) != text:
            write = 'mkdir -p "${1%/*}" && cat > "$1.tmp" && chmod 644 "$1.tmp" && mv "$1.tmp" "$1"'
            nodes.run_in(node, ["sh", "-c", write, "sh", NODE_CONF], input=text, what=f"writing {NODE_CONF}")
    fuse = nodes.host_path(node, NODE_FUSE)
    if not fuse.is_char_device() or fuse.stat().st_mode & 0o777 != 0o666:
        fuse.parent.mkdir(parents=True, exist_ok=True)
        fuse.unlink(missing_ok=True)
        os.mknod(fuse, stat.S_IFCHR | 0o666, os.makedev(FUSE_MAJOR, FUSE_MINOR))
        fuse.chmod(0o666)  # mknod's mode is filtered by the umask
    nodes.run_in(
        node, ["sh", "-c", BIND_FUSE, "sh", NODE_FUSE], what=f"/dev/fuse for the jobs on {node.name}"
    )


def _copy_program(program: Path, target: Path) -> None:
    """Copy a program (tens of MB) atomically, unless the node has it already (same size and mtime:
    every `up` checks, and reading both files each time would cost more than the copy's check)."""
    source = program.stat()
    if target.is_file() and (target.stat().st_size, target.stat().st_mtime_ns) == (
        source.st_size,
        source.st_mtime_ns,
    ):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copy2(program, tmp)
    tmp.rename(target)


def _node_file(node: Node, path: str) -> str | None:
    """A file as the node sees it (its /etc is an overlay: read through the node)."""
    result = nodes.run_in(node, ["cat", path], check=False)
    return result.stdout if result.returncode == 0 else None


def refresh(sandbox: Sandbox) -> None:
    """Install (or bring up to date) Apptainer on every compute node, if the host has it."""
    apptainer = find()
    if apptainer is None:
        return
    for node in sandbox.compute:
        install(node, apptainer)
