"""Getting the NeMo container onto the cluster, by runtime.

Credentials: the NGC key is uploaded to a 0600 file in a 0700 directory made for this run, read from
there by the runtime (`--password-stdin`, enroot's netrc file) and never put on a command line, where
`ps` and pyinfra's output would show it. It stays on the node only while the fetch runs: the
directory is removed when the login or the import has read it, and docker/podman log out of the
registry when the pull ends, whether it succeeded or not (their login is a file of its own). Every pull goes to a temporary name first and is renamed when
complete, so an interrupted pull never leaves a half image under the final name.

podman runs the job's container rootless as service_user: its pull (login, logout) runs as that
account, into the account's own storage (rootless.py), the key still redirected from root's file.

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

from ...settings import NGC_REGISTRY
from ...settings import image_registry as registry_of
from .. import rootless
from ..reachability import UploadCommand
from .watched import Fetch, run_watched

NGC_USER = "$oauthtoken"  # NGC's fixed user name for API-key logins
ACCOUNT_TMP_ENV = 'TMPDIR="$W.account"'  # the account's temp dir for a rootless pull (see pull_image)


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
    as_user: str | None = None,
):
    """
    docker/podman: pull `image` on this node unless it is already in local storage, printing progress.

    + runtime: "docker" or "podman"
    + image: reference in docker form (registry/path:tag)
    + present: the snapshot's answer to "is it already here?"
    + ngc_key: API key for nvcr.io (logs in with --password-stdin from a 0600 file first)
    + tls_verify: False for a plain-HTTP registry such as the sandbox's (podman: --tls-verify=false);
      refused together with a login (the key would go to a registry nobody verified)
    + login: log in with the key first; None: only when the image comes from nvcr.io
    + stall_seconds: fail when the pull made no progress for this long
    + timeout_seconds: fail when the pull takes longer than this; None: no limit
    + as_user: podman only: log in, pull and log out as this account (rootless.as_account), into its
      own storage, with a temp dir of its own beside the watcher's root-only work dir

    **Example:**

    .. code:: python

        pull_image(name="Pull NeMo", runtime="podman", image="nvcr.io/nvidia/nemo:24.01.framework",
                   present=False, ngc_key=os.environ.get("NGC_API_KEY"))
    """
    if present:
        return
    tool = shlex.quote(runtime)
    as_user = as_user if runtime == "podman" else None

    def run(args: str, env: str = "") -> str:
        command = f"{tool} {args}"
        return rootless.as_account(as_user, command, env) if as_user else command

    registry = registry_of(image)
    key_sent = bool(ngc_key) and (login if login is not None else registry == NGC_REGISTRY)
    if key_sent and not tls_verify:
        raise ValueError(
            f"pull_image: no login to {registry} with tls_verify=False (the key would go unverified)"
        )
    tls = ""
    if runtime == "podman" and not tls_verify:
        tls = " --tls-verify=false"
    elif runtime == "podman" and key_sent:
        # Explicit: a registries.conf entry marking this registry `insecure` must not carry the key.
        tls = " --tls-verify=true"
    pull = run(f"pull{tls} {shlex.quote(image)}", ACCOUNT_TMP_ENV if as_user else "")
    logout = ""
    if key_sent:
        if runtime == "docker":  # before the key is on the node
            yield FunctionCommand(_refuse_an_insecure_engine_registry, (registry,), {})
        private_dir = host.get_temp_filename("nemotron-ngc")
        yield from _secret_upload(ngc_key, private_dir)
        q_dir = shlex.quote(private_dir)
        # Root's shell opens the 0600 key file for the runtime's stdin: the account never reads it.
        yield StringCommand(
            run(f"login{tls} --username {shlex.quote(NGC_USER)} --password-stdin {shlex.quote(registry)}")
            + f" < {q_dir}/key; rc=$?; rm -rf {q_dir}; exit $rc"
        )
        # The login is a file of the runtime's (podman's auth.json, docker's config.json): the key
        # leaves the node with it, when the pull ends or fails.
        logout = f"{run('logout ' + shlex.quote(registry))} >/dev/null 2>&1"
        pull = f"{pull}; rc=$?; {logout}; exit $rc"
    extra: dict[str, str] = _docker_watch(runtime)
    if as_user:
        # The watcher's work dir $W is root's (0700): podman's blob copies go to a dir of the account's
        # beside it (a name the work dir's, so a failed pull's cleanup finds it), measured there.
        pull = (
            f'mkdir -m 700 "$W.account" && chown {shlex.quote(as_user)} "$W.account" && '
            f'( {pull} ); rc=$?; rm -rf "$W.account"; exit $rc'
        )
        extra = {"measure": 'du -sb "$W.account" 2>/dev/null | cut -f1'}
        cleanup = f'{logout + "; " if logout else ""}rm -rf "$W.account"'
    else:
        cleanup = logout
    # Not --quiet: its "Copying blob" lines are part of the progress shown.
    watch = Fetch(
        what=f"pull of {image}",
        registry=registry,
        command=pull,
        cleanup=cleanup,
        stall_seconds=stall_seconds,
        timeout_seconds=timeout_seconds,
        **extra,
    )
    yield FunctionCommand(_watch, (watch,), {})


def docker_secure_check(registry: str) -> str:
    """What the engine says of `registry`: "false" when its daemon.json lists it in
    `insecure-registries` (it would then log in over unverified TLS or plain HTTP), else "true" or
    nothing. (A registry that is insecure only through `insecure-registries` CIDRs is not seen.)"""
    template = '{{with index .RegistryConfig.IndexConfigs "' + registry + '"}}{{.Secure}}{{end}}'
    return f"docker info --format {shlex.quote(template)}"


def _refuse_an_insecure_engine_registry(state, host, registry: str) -> None:
    """docker has no --tls-verify: the engine decides. Refuse the login, and stop the deploy as a
    failed pull does, when this node's engine does not verify the registry."""
    ok, out = host.run_shell_command(docker_secure_check(registry))
    if ok and out.stdout.strip() != "false":
        return
    _stop_the_deploy(state)
    why = "lists it in insecure-registries" if ok else f"could not be asked ({out.stderr.strip()})"
    raise RuntimeError(
        f"no docker login to {registry} on {host.name}: the engine there {why}, so the NGC key would go "
        f"unverified. Remove {registry} from insecure-registries in /etc/docker/daemon.json and put its "
        f"CA in /etc/docker/certs.d/{registry}/ca.crt, or send it no key (registry_login = false)"
    )


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
      for this import and removed with it, and is held to https), or None for anonymous pulls
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
            # https only, whatever the node's enroot.conf allows (ENROOT_ALLOW_HTTP): the key never
            # goes over plain HTTP. The environment wins over enroot.conf, and "no" unsets it.
            env += f" ENROOT_CONFIG_PATH={shlex.quote(config_dir)} ENROOT_ALLOW_HTTP=no"
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
