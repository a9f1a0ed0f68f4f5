"""Getting the NeMo container onto the cluster, by runtime.

Credentials: the NGC key is uploaded to a 0600 file of the deploying user, read from there by the
runtime (`--password-stdin`, enroot's netrc file) and never put on a command line, where `ps` and
pyinfra's output would show it. Every pull goes to a temporary name first and is renamed when
complete, so an interrupted pull never leaves a half image under the final name.
"""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import StringCommand, operation

from ..reachability import UploadCommand

NGC_REGISTRY = "nvcr.io"
NGC_USER = "$oauthtoken"  # NGC's fixed user name for API-key logins


def registry_of(image: str) -> str:
    """`nvcr.io` from `nvcr.io#nvidia/nemo:tag` or `nvcr.io/nvidia/nemo:tag`."""
    first = image.replace("#", "/", 1).split("/", 1)[0]
    return first if ("." in first or ":" in first or first == "localhost") else "docker.io"


def _secret_upload(key: str, private_dir: str):
    """Commands that put `key` in `private_dir`/key: the directory is made 0700 first and the upload's
    temporary file is inside it, so the key is never in a world-readable file or on a command line."""
    q_dir = shlex.quote(private_dir)
    yield StringCommand(f"rm -rf {q_dir} && mkdir -m 700 {q_dir}")
    path = f"{private_dir}/key"
    yield UploadCommand(StringIO(key), path, remote_temp_filename=f"{path}.upload")


@operation()
def pull_image(
    runtime: str,
    image: str,
    present: bool,
    ngc_key: str | None = None,
    tls_verify: bool = True,
    login: bool | None = None,
):
    """
    docker/podman: pull `image` on this node unless it is already in local storage.

    + runtime: "docker" or "podman"
    + image: reference in docker form (registry/path:tag)
    + present: the snapshot's answer to "is it already here?"
    + ngc_key: API key for nvcr.io (logs in with --password-stdin from a 0600 file first)
    + tls_verify: podman only; False for a plain-HTTP registry such as the sandbox's
    + login: log in with the key first; None: only when the image comes from nvcr.io

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
    if ngc_key and (login if login is not None else registry == NGC_REGISTRY):
        private_dir = host.get_temp_filename("nemotron-ngc")
        yield from _secret_upload(ngc_key, private_dir)
        q_dir = shlex.quote(private_dir)
        yield StringCommand(
            f"{tool} login{tls} --username {shlex.quote(NGC_USER)} --password-stdin "
            f"{shlex.quote(registry)} < {q_dir}/key; rc=$?; rm -rf {q_dir}; exit $rc"
        )
    yield StringCommand(f"{tool} pull{tls} --quiet {shlex.quote(image)}")


@operation()
def import_image_file(
    runtime: str,
    image: str,
    target: str,
    present: bool,
    tmp_dir: str,
    credentials_path: str | None = None,
):
    """
    pyxis (enroot) or apptainer: import `image` once into a world-readable file on shared storage.

    + runtime: "pyxis" (squashfs via `enroot import`) or "apptainer" (SIF via `apptainer pull`)
    + image: the inventory's reference (`nvcr.io#nvidia/nemo:tag` for pyxis)
    + target: the final file, named after the reference so a new tag never reuses an old file
    + present: the snapshot saw `target` already
    + tmp_dir: enroot/apptainer scratch on a disk with room (their defaults fill /tmp and /run)
    + credentials_path: enroot's netrc file (already placed, 0600) or None for anonymous pulls

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
    # Scratch of this import only (layers, unpacked rootfs: tens of GB), removed whatever happens.
    if runtime == "pyxis":
        env = 'ENROOT_TEMP_PATH="$work" ENROOT_CACHE_PATH="$work/cache"'
        if credentials_path:
            env += f" ENROOT_CONFIG_PATH={shlex.quote(credentials_path.rsplit('/', 1)[0])}"
        fetch = f"{env} enroot import --output {q_partial} {shlex.quote('docker://' + image)}"
    else:
        docker_ref = image.replace("#", "/", 1)
        fetch = (
            f'APPTAINER_TMPDIR="$work" APPTAINER_CACHEDIR="$work/cache" apptainer pull {q_partial} '
            + shlex.quote("docker://" + docker_ref)
        )
    # 0644: pyxis refuses a 0600 squashfs with "Invalid image format".
    yield StringCommand(
        f"mkdir -p {q_tmp} && mkdir -p -m 755 {q_dir} && rm -f {q_partial} "
        f"&& work=$(mktemp -d {q_tmp}/import.XXXXXX) "
        f"&& {{ {fetch} && chmod 644 {q_partial} && mv -f {q_partial} {q_target}; rc=$?; "
        f'rm -rf "$work"; [ $rc = 0 ] || rm -f {q_partial}; exit $rc; }}'
    )


def enroot_credentials(ngc_key: str, registry: str = NGC_REGISTRY) -> str:
    """enroot's netrc line for `registry` (the content of a 0600 file, never a command line).

    netrc names a machine without its port."""
    return f"machine {registry.rsplit(':', 1)[0]} login {NGC_USER} password {ngc_key}\n"
