"""podman as the service account: the job's `podman run` runs rootless as service_user, so the image
must be in that account's own storage. The deploy pulls (and logs in), checks presence and measures
free space as that account, never as root (root's storage is another one, which the job never sees).

Every such command runs as the account from whoever runs the deploy's shell (root: runuser; the
account itself: as is; another user: sudo -n, so a missing rule fails instead of asking), in `/`
(root's working directory is closed to it), with XDG_RUNTIME_DIR pinned to /run/user/<uid>: podman
keeps its run root and libpod's temporary directory there and records both in its database, so the
deploy's podman and the job's must agree on them. Inherited, root's /run/user/0 would be refused, and
podman's fallback (under $TMPDIR) would differ between the pull (its own temp dir) and the job.
"""

from __future__ import annotations

import shlex

from .operations.accounts import run_as


def account(settings) -> str | None:
    """The account whose podman storage the job reads (service_user), or None: docker pulls into its
    daemon as root, and a `pull_runtime` podman beside another runtime keeps root's storage."""
    runtime = settings.pull_runtime or settings.container_runtime
    if runtime == "podman" and settings.container_runtime == "podman":
        return settings.service_user
    return None


def runtime_dir(user: str) -> str:
    """Shell word: the account's runtime dir (what logind makes for a lingering user)."""
    return f'"/run/user/$(id -u {shlex.quote(user)})"'


def as_account(user: str, command: str, env: str = "") -> str:
    """Shell: `command` run as `user` with its podman environment (`env`: more NAME=value words), in
    `/`, the shell deciding how to become it (accounts.run_as). A subshell, so a redirection after it
    (the key on stdin) is made by the caller's shell."""
    extra = f" {env}" if env else ""
    return run_as(user, f"env XDG_RUNTIME_DIR={runtime_dir(user)}{extra} {command}", cwd="/")
