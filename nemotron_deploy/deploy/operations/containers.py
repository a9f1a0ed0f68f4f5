"""Getting the NeMo container onto the cluster, by runtime.

Credentials: the NGC key is uploaded to a 0600 file in a 0700 directory made for this run, read from
there by the runtime (`--password-stdin`, enroot's netrc file) and never put on a command line, where
`ps` and pyinfra's output would show it. It stays on the node only while the fetch runs: the
directory is removed when the login or the import has read it, and docker/podman log out of the
registry when the pull ends, whether it succeeded or not (their login is a file of its own). Every pull goes to a temporary name first and is renamed when
complete, so an interrupted pull never leaves a half image under the final name.

Each pull or import runs detached on its host and is watched (watched.py): a progress line per host
at least every 20 s, the step fails when nothing moved for `stall_seconds` or it ran past
`timeout_seconds`, and a failed fetch is killed and its partial files removed. A failed fetch also
stops the whole deploy (see `_stop_the_deploy`): the job files must not change on any host while the
image they name is not where they expect it.
"""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FunctionCommand, StringCommand, operation

from ..reachability import UploadCommand
from .watched import Fetch, run_watched

NGC_REGISTRY = "nvcr.io"
NGC_USER = "$oauthtoken"  # NGC's fixed user name for API-key logins


def registry_of(image: str) -> str:
    """`nvcr.io` from `nvcr.io#nvidia/nemo:tag` or `nvcr.io/nvidia/nemo:tag`."""
    first = image.replace("#", "/", 1).split("/", 1)[0]
    return first if ("." in first or ":" in first or first == "localhost") else "docker.io"


def _secret_upload(secret: str, private_dir: str, name: str = "key"):
    """Commands that put `secret` in `private_dir`/`name`: the directory is made 0700 first and the
    upload's temporary file is inside it, so it is never in a world-readable file or on a command line."""
    q_dir = shlex.quote(private_dir)
    yield StringCommand(f"rm -rf {q_dir} && mkdir -m 700 {q_dir}")
    path = f"{private_dir}/{name}"
    yield UploadCommand(StringIO(secret), path, remote_temp_filename=f"{path}.upload")


@operation()
def pull_image(
    runtime: str,
    image: str,
    present: bool,
    ngc_key: str | None = None,
    tls_verify: bool = True,
    login: bool | None = None,
    stall_seconds: float = 600,
    timeout_seconds: float | None = None,
):
    """
    docker/podman: pull `image` on this node unless it is already in local storage, printing progress.

    + runtime: "docker" or "podman"
    + image: reference in docker form (registry/path:tag)
    + present: the snapshot's answer to "is it already here?"
    + ngc_key: API key for nvcr.io (logs in with --password-stdin from a 0600 file first)
    + tls_verify: podman only; False for a plain-HTTP registry such as the sandbox's
    + login: log in with the key first; None: only when the image comes from nvcr.io
    + stall_seconds: fail when the pull made no progress for this long
    + timeout_seconds: fail when the pull takes longer than this; None: no limit

    **Example:**

    .. code:: python

        pull_image(name="Pull NeMo", runtime="podman", image="nvcr.io/nvidia/nemo:24.01.framework",
                   present=False, ngc_key=os.environ.get("NGC_API_KEY"))
    """
    if present:
        return
    tool = shlex.quote(runtime)
    tls = " --tls-verify=false" if runtime == "podman" and not tls_verify else ""
    registry = registry_of(image)
    pull = f"{tool} pull{tls} {shlex.quote(image)}"
    logout = ""
    if ngc_key and (login if login is not None else registry == NGC_REGISTRY):
        private_dir = host.get_temp_filename("nemotron-ngc")
        yield from _secret_upload(ngc_key, private_dir)
        q_dir = shlex.quote(private_dir)
        yield StringCommand(
            f"{tool} login{tls} --username {shlex.quote(NGC_USER)} --password-stdin "
            f"{shlex.quote(registry)} < {q_dir}/key; rc=$?; rm -rf {q_dir}; exit $rc"
        )
        # The login is a file of the runtime's (podman's auth.json, docker's config.json): the key
        # leaves the node with it, when the pull ends or fails.
        logout = f"{tool} logout {shlex.quote(registry)} >/dev/null 2>&1"
        pull = f"{pull}; rc=$?; {logout}; exit $rc"
    # Not --quiet: its "Copying blob" lines are part of the progress shown.
    watch = Fetch(
        what=f"pull of {image}",
        registry=registry,
        command=pull,
        cleanup=logout,
        stall_seconds=stall_seconds,
        timeout_seconds=timeout_seconds,
        **_docker_watch(runtime),
    )
    yield FunctionCommand(_watch, (watch,), {})


def _docker_watch(runtime: str) -> dict[str, str]:
    """podman keeps its blob copies in $TMPDIR (the work dir); docker's daemon does the pull in its
    own temp dir, and its I/O is the progress while it extracts."""
    if runtime != "docker":
        return {}
    return {
        "measure": "du -sb /var/lib/docker/tmp | cut -f1",
        "extra_pids": "pgrep -x dockerd; pgrep -x containerd",
    }


def _watch(state, host, fetch: Fetch) -> None:
    try:
        run_watched(host, fetch)
    except Exception:
        _stop_the_deploy(state)
        raise


def _stop_the_deploy(state) -> None:
    """Fail the deploy after this operation, on every host, not only this one.

    pyinfra drops a failed host and goes on with the others; the job files come after the pull
    (deploys/nemotron.py), and they must not change anywhere while a node lacks the image. pyinfra
    checks FAIL_PERCENT once every host has finished this operation: at 0 it stops the run there
    ("Over 0% of hosts failed"). Only a failed fetch sets it, so an unreachable host still leaves
    the others to finish.
    """
    state.config.FAIL_PERCENT = 0


@operation()
def import_image_file(
    runtime: str,
    image: str,
    target: str,
    present: bool,
    tmp_dir: str,
    ngc_key: str | None = None,
    tls_verify: bool = True,
    stall_seconds: float = 600,
    timeout_seconds: float | None = None,
):
    """
    pyxis (enroot) or apptainer: import `image` once into a world-readable file on shared storage.

    + runtime: "pyxis" (squashfs via `enroot import`) or "apptainer" (SIF via `apptainer pull`)
    + image: the inventory's reference (`nvcr.io#nvidia/nemo:tag` for pyxis)
    + target: the final file, named after the reference so a new tag never reuses an old file
    + present: the snapshot saw `target` already
    + tmp_dir: enroot/apptainer scratch on a disk with room (their defaults fill /tmp and /run)
    + ngc_key: the registry's key for pyxis (enroot reads it from a netrc file in a 0700 directory made
      for this import and removed with it), or None for anonymous pulls
    + tls_verify: apptainer only (`--no-https` when False: no certificate check, plain HTTP allowed,
      as podman's `--tls-verify=false`); enroot takes it from its own enroot.conf (ENROOT_ALLOW_HTTP)
    + stall_seconds: fail when the import made no progress for this long
    + timeout_seconds: fail when the import takes longer than this; None: no limit

    **Example:**

    .. code:: python

        import_image_file(name="Import NeMo", runtime="pyxis", image="nvcr.io#nvidia/nemo:24.01.framework",
                          target="/lustre/images/nvcr.io+nvidia+nemo+24.01.framework.sqsh",
                          present=False, tmp_dir="/lustre/.enroot-tmp")
    """
    if present:
        return
    partial = f"{target}.partial"
    q_tmp, q_partial, q_target = shlex.quote(tmp_dir), shlex.quote(partial), shlex.quote(target)
    # The images dir is the login node's to own (desired.py); on a first deploy this step comes first.
    q_dir = shlex.quote(target.rsplit("/", 1)[0])
    forget = ""  # removes the key's directory: when the import ends, and after a failed one
    if runtime == "pyxis":
        env = 'ENROOT_TEMP_PATH="$S" ENROOT_CACHE_PATH="$S/cache"'
        if ngc_key:
            config_dir = host.get_temp_filename("nemotron-enroot")
            yield from _secret_upload(
                enroot_credentials(ngc_key, registry_of(image)), config_dir, ".credentials"
            )
            env += f" ENROOT_CONFIG_PATH={shlex.quote(config_dir)}"
            forget = f"rm -rf {shlex.quote(config_dir)}; "
        fetch = f"{env} enroot import --output {q_partial} {shlex.quote('docker://' + image)}"
    else:
        docker_ref = image.replace("#", "/", 1)
        fetch = (
            'APPTAINER_TMPDIR="$S" APPTAINER_CACHEDIR="$S/cache" apptainer pull'
            + ("" if tls_verify else " --no-https")
            + f" {q_partial} "
            + shlex.quote("docker://" + docker_ref)
        )
    # 0644: pyxis refuses a 0600 squashfs with "Invalid image format". This import's scratch (layers, the unpacked rootfs: tens of GB) on the disk tmp_dir names, one
    # directory per import (named after the watcher's work dir $W), removed whatever happens.
    scratch = f"S={q_tmp}/import.${{W##*/}}; "
    command = (
        f'{scratch}mkdir -p -m 755 {q_dir} && mkdir -p "$S" && rm -f {q_partial} '
        f"&& {{ {fetch} && chmod 644 {q_partial} && mv -f {q_partial} {q_target}; "
        f'rc=$?; {forget}rm -rf "$S"; [ $rc = 0 ] || rm -f {q_partial}; exit $rc; }}'
    )
    watch = Fetch(
        what=f"import of {image}",
        registry=registry_of(image),
        command=command,
        # Layers downloaded into the scratch dir, then the image file as it is written.
        measure=f'{scratch}du -sb "$S" 2>/dev/null | cut -f1; stat -c %s {q_partial} 2>/dev/null',
        # Left by a failed import: the half-written file and the scratch dir.
        cleanup=f'{scratch}{forget}rm -f {q_partial}; rm -rf "$S"',
        stall_seconds=stall_seconds,
        timeout_seconds=timeout_seconds,
    )
    yield FunctionCommand(_watch, (watch,), {})


def enroot_credentials(ngc_key: str, registry: str = NGC_REGISTRY) -> str:
    """enroot's netrc line for `registry` (the content of a 0600 file, never a command line).

    netrc names a machine without its port."""
    return f"machine {registry.rsplit(':', 1)[0]} login {NGC_USER} password {ngc_key}\n"
