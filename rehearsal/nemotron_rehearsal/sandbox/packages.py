"""Preconditions of the host: root, a Debian-like system, and the Debian packages the sandbox runs.

Packages are checked with one `dpkg-query` call and only the missing ones are installed, so a second
`up` costs a few milliseconds here. Installing starts no host services (a temporary policy-rc.d, the
Debian way): the sandbox starts its own copies of the daemons inside the node namespaces.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .proc import SandboxError, run

# Debian package -> why the sandbox needs it.
REQUIRED_PACKAGES: dict[str, str] = {
    "iproute2": "ip netns / bridge / veth",
    "util-linux": "unshare, nsenter, setsid, setpriv",
    "mount": "mount (bind and overlay mounts inside the nodes)",
    "procps": "ps and friends inside the nodes",
    "openssh-server": "sshd on every node",
    "openssh-sftp-server": "sftp subsystem (pyinfra uploads files over sftp)",
    "openssh-client": "ssh-keygen and ssh",
    "munge": "Slurm authentication",
    "slurmctld": "Slurm controller on the login node",
    "slurmd": "Slurm node daemon on compute nodes",
    "slurm-client": "srun, sbatch, squeue, scancel, sinfo",
    "docker-registry": "the image registry on the login node",
    "podman": "image pulls on compute nodes, and the jobs of the podman runtime",
    "runc": "podman's OCI runtime on the nodes (crun refuses this host's hybrid cgroup layout)",
    "catatonit": "podman run --init, which the podman sbatch uses",
    "skopeo": "pushes the sandbox's NeMo stand-in image to the registry",
    "python3": "the node init process, the nvidia-smi stand-in and the NeMo emulator",
    "cron": "cron on the login node (deploys may install /etc/cron.d jobs there)",
}


def check_host() -> None:
    """Fail with a clear message unless we are root on Linux with apt/dpkg (Debian, Ubuntu)."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        raise SandboxError("the sandbox needs Linux with network namespaces")
    if os.geteuid() != 0:
        raise SandboxError(
            "the sandbox needs root (it creates network namespaces, a bridge and mounts): "
            "run it with sudo, e.g. `sudo nemotron-deploy sandbox up`"
        )
    if not (shutil.which("dpkg-query") and shutil.which("apt-get")):
        raise SandboxError("the sandbox supports Debian/Ubuntu hosts only (dpkg-query and apt-get not found)")


def missing_packages(packages: list[str] | None = None) -> list[str]:
    wanted = list(packages or REQUIRED_PACKAGES)
    result = run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *wanted],
        check=False,
        what="dpkg-query",
    )
    installed = {line.split()[0] for line in result.stdout.splitlines() if line.split()[1:] == ["installed"]}
    return [p for p in wanted if p not in installed]


def ensure_packages(log=print, required: dict[str, str] | None = None) -> list[str]:
    """Install whatever of `required` (REQUIRED_PACKAGES) is missing; return the list that was installed."""
    missing = missing_packages(list(required or REQUIRED_PACKAGES))
    if not missing:
        return []
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], env=env, timeout=600, what="apt-get update")
    # Keep the packages' maintainer scripts from starting host copies of sshd, munged, slurmd and
    # docker-registry (Debian's policy-rc.d convention), unless the host already has a policy.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text(
            "#!/bin/sh\n# nemotron-deploy sandbox: installing packages, start no services\nexit 101\n"
        )
        policy.chmod(0o755)
    try:
        run(
            ["apt-get", "install", "-y", "--no-install-recommends", *missing],
            env=env,
            timeout=1800,
            what=f"apt-get install {' '.join(missing)}",
        )
    finally:
        if ours:
            policy.unlink(missing_ok=True)
    still = missing_packages(missing)
    if still:
        raise SandboxError(f"apt-get reported success but these packages are still missing: {still}")
    keep_host_services_off(missing)
    return missing


# Services a package enables for the host's boot (or socket activation) that the sandbox runs in its
# nodes only: disabled after the install, and stopped if this host's systemd started them anyway.
# docker.io pulls in containerd, whose service it enables too.
HOST_SERVICES_OFF = {"docker.io": ("docker.socket", "docker.service", "containerd.service")}


def keep_host_services_off(installed: list[str]) -> None:
    units = [u for pkg in installed for u in HOST_SERVICES_OFF.get(pkg, ())]
    if not units or not shutil.which("systemctl"):
        return
    run(["systemctl", "disable", "--quiet", *units], check=False, what="systemctl disable")
    if Path("/run/systemd/system").is_dir():
        run(["systemctl", "stop", *units], check=False, what="systemctl stop")
