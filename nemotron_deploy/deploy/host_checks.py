"""Reading a host (one SSH command) and checking it before any change: the deploy's preflight.

`preflight.py` checks GPUs from nvidia-smi output (also on its own, on a node); this module asks
every other question the deploy has of a host and turns the answers into one error per host.
"""

from __future__ import annotations

from typing import Any

from ..catalog import ModelSpec
from ..inventory import Cluster
from ..service.preflight import check_gpus
from . import desired, endpoint, render
from .errors import DeployError
from .facts.disk import FreeSpace
from .facts.files import ManagedPaths
from .facts.gpus import NvidiaGpus
from .facts.haproxy import Haproxy
from .facts.images import ImagePresent
from .facts.model import ModelConfig
from .facts.runtimes import ContainerRuntimes
from .facts.slurm import JobRecords, ReplicaJobs, SlurmVersion, SubmitContext
from .facts.snapshot import snapshot
from .facts.system import InitSystem, UnitEnabled, UserExists
from .operations.health_timer import UNIT

# The endpoint's configuration needs http-check send/expect with bodies and retry-on (2.2+), and is
# tested with Debian bookworm's 2.6.
MIN_HAPROXY = "2.4"
MIN_HAPROXY_TUPLE = (2, 4)

# Model facts that must match between the checkpoint and the plan (a wrong path dies after hours).
ARCHITECTURE_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
)


def read_host(host: Any, cluster: Cluster) -> dict[str, Any]:
    """Everything the deploy needs from this host, in one SSH command."""
    s = cluster.settings
    role = desired.role(cluster, host.name)
    probes: list[tuple[str, type, tuple]] = [("runtimes", ContainerRuntimes, ())]
    if role == "compute":
        probes += [("gpus", NvidiaGpus, ()), ("model", ModelConfig, (s.model_dir,))]
        if s.container_runtime in ("docker", "podman") or s.pull_runtime in ("docker", "podman"):
            runtime = s.pull_runtime or s.container_runtime
            probes += [
                ("image", ImagePresent, (runtime, s.image)),
                ("free", FreeSpace, (s.container_storage_dir(runtime),)),
            ]
    else:
        probes += [
            ("slurm", SlurmVersion, ()),
            ("init", InitSystem, ()),
            ("timer_enabled", UnitEnabled, (f"{UNIT}.timer",)),
            ("health_user", UserExists, (s.health_user,)),
            ("haproxy", Haproxy, ()),
            ("submit", SubmitContext, ()),
        ]
        records = tuple(s.job_record(i) for i in range(1, cluster.plan.replicas + 1))
        probes.append(("records", JobRecords, (records,)))
        if s.state == "stopped":
            names = ",".join(s.replica_job(i) for i in range(1, cluster.plan.replicas + 1))
            probes.append(("replica_jobs", ReplicaJobs, (names,)))
        if s.image_file:
            probes.append(("free", FreeSpace, (s.images_dir,)))
    probes.append(("paths", ManagedPaths, paths_to_read(cluster, host.name)))
    return snapshot(host, tuple(probes))


def paths_to_read(cluster: Cluster, host_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(paths to stat and checksum, files to stat only) on this host: what it should hold, and what
    tells its state (the venv, the timer of either init system, the image)."""
    s = cluster.settings
    role = desired.role(cluster, host_name)
    paths = list(desired.for_host(cluster, host_name).paths)
    unhashed: tuple[str, ...] = ()
    if s.image_file:
        creds = desired.enroot_credentials(cluster)
        paths += [creds, creds.rsplit("/", 1)[0]]
        unhashed = (s.image_file,)  # its presence only: never read the image's bytes
    if role == "login":
        # The init system is only known after this read: list the cron entry beside the systemd units.
        paths += [
            *desired.health_units(cluster, desired.Login(init="cron")),
            desired.SUDOERS_FILE,
            desired.started_file(),
            f"{s.health_venv}/bin/python",
            desired.wheels_marker(cluster),
        ]
        # TLS files: their presence only (never a private key's bytes, not even hashed).
        # (With endpoint_tls = files the deploy's paths are links, read with the other paths.)
        tls = {
            "self-signed": [desired.tls_cert_path(), desired.tls_key_path()],
            "files": [s.endpoint_tls_cert, s.endpoint_tls_key],
        }.get(s.endpoint_tls, [])
        unhashed = (*unhashed, *(p for p in tls if p))
    elif s.container_runtime == "host":
        paths.append(s.eval_script)
    return tuple(dict.fromkeys(paths)), unhashed


def check_host(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Stop the deploy, before any change, if this host can't run the job as planned."""
    s = cluster.settings
    if s.skip_preflight:
        return
    role = desired.role(cluster, host.name)
    problems = login_problems(cluster, snap) if role == "login" else compute_problems(cluster, snap)
    free = snap.get("free")
    if free is not None and free < s.min_free_gib and not image_present(cluster, snap):
        problems.append(
            f"only {free} GiB free where the image goes; need {s.min_free_gib} GiB (min_free_gib)"
        )
    if problems:
        raise DeployError(
            f"preflight failed on {host.name} ({role}); nothing was changed:\n  - "
            + "\n  - ".join(problems)
            + "\n(fix the node or the inventory; `--data skip_preflight=true` skips these checks)"
        )


def login_problems(cluster: Cluster, snap: dict[str, Any]) -> list[str]:
    problems = []
    slurm = snap["slurm"]
    if slurm is None:
        problems.append("Slurm's sbatch is not installed here: the login node must be able to submit jobs")
    elif "error" in slurm:
        problems.append(
            f"sbatch is installed but fails: {slurm['error']}; fix the Slurm client here "
            "(slurm.conf, munge) so that `sbatch --version` works"
        )
    if desired.endpoint_on(cluster, snap):
        problems += endpoint_problems(snap["haproxy"])
        problems += endpoint_file_problems(cluster, snap)
    login = desired.Login.of(cluster, snap)
    if desired.sudoers(cluster, login) and not (snap.get("submit") or {}).get("sudo"):
        problems.append(
            f"the scheduled check replaces dead replicas as {login.submit_as} (the user this deploy "
            f"submits as) through sudo, and sudo is not installed here: install it, or set "
            "restart_policy = never"
        )
    return problems


def endpoint_problems(haproxy: dict[str, Any]) -> list[str]:
    off = "or set endpoint = false to run without the endpoint"
    if haproxy["service"] is None:
        return [
            "endpoint = true, but this login node has neither systemd nor /etc/init.d scripts to run "
            f"HAProxy as a service: run the login node under systemd, {off}"
        ]
    version = haproxy["version"]
    if version is None and not haproxy["apt"]:
        return [
            "HAProxy is not installed and apt-get is not here to install it: install HAProxy "
            f"{MIN_HAPROXY} or newer (Debian/Ubuntu package haproxy), {off}"
        ]
    if version is not None and tuple(map(int, version.split(".")[:2])) < MIN_HAPROXY_TUPLE:
        return [
            f"HAProxy {version} is too old for the endpoint (it needs {MIN_HAPROXY} or newer: http-check "
            f"send with a body, retry-on, Lua 5.3): upgrade the haproxy package, {off}"
        ]
    return []


def endpoint_file_problems(cluster: Cluster, snap: dict[str, Any]) -> list[str]:
    """An /etc/haproxy/haproxy.cfg the deploy did not write (nor the package: its untouched default),
    which the deploy would overwrite; TLS files the inventory names that are not on the login node."""
    problems: list[str] = []
    paths = snap.get("paths") or {}
    path = f"{endpoint.CONFIG_DIR}/{endpoint.CONFIG_FILE}"
    config = snap["haproxy"].get("config")
    if config is not None and not is_own_config(config):
        problems.append(
            f"{path} here was not written by nemotron-deploy (its first line is not the generated "
            f"banner '# {render.BANNER_PREFIX} ...') and is not the haproxy package's default, so the "
            f"deploy would overwrite someone's HAProxy configuration. To hand HAProxy over to the deploy, "
            f"move the file aside (mv {path} {path}.before-nemotron) and re-run; to keep it, set "
            "endpoint = false in group_data (the deploy then leaves HAProxy alone)"
        )
    s = cluster.settings
    have_pair = desired.tls_cert_path() in paths and desired.tls_key_path() in paths
    if s.endpoint_tls == "self-signed" and not have_pair and not snap["haproxy"].get("openssl"):
        problems.append(
            "endpoint_tls = self-signed, and openssl is not here to make the key pair: install "
            "openssl (Debian package openssl), or use endpoint_tls = files with your certificate"
        )
    if s.endpoint_tls == "files":
        for setting, file in (
            ("endpoint_tls_cert", s.endpoint_tls_cert),
            ("endpoint_tls_key", s.endpoint_tls_key),
        ):
            if file not in paths:
                problems.append(
                    f"{setting} = {file}, which is not on this login node: put the file there (HAProxy "
                    "reads it when it starts), or use endpoint_tls = self-signed"
                )
    return problems


def is_own_config(config: dict[str, Any]) -> bool:
    """The deploy's own haproxy.cfg (its banner first), or the package's untouched default."""
    if config["first_line"].startswith(f"# {render.BANNER_PREFIX} "):
        return True
    return config["package_md5"] is not None and config["md5"] == config["package_md5"]


def compute_problems(cluster: Cluster, snap: dict[str, Any]) -> list[str]:
    s = cluster.settings
    problems: list[str] = []
    runtimes = snap["runtimes"]
    gpus = snap["gpus"]
    if gpus is None:
        problems.append("nvidia-smi not found: this is not a GPU node with NVIDIA's driver installed")
    elif isinstance(gpus, dict):
        problems.append(f"nvidia-smi failed: {gpus['error']}")
    else:
        problems += check_gpus(
            gpus,
            expect_names=s.gpu.smi_names,
            expect_memory_mib=s.gpu.memory_mib,
            expect_count=s.node_gpus,
            min_driver=s.min_driver_version,
        )
    problems += model_problems(cluster, snap["model"])
    runtime = s.pull_runtime or s.container_runtime
    if s.container_runtime == "pyxis" and (not runtimes.get("enroot") or runtimes.get("pyxis") != "yes"):
        problems.append(
            "pyxis is not usable here (need enroot and srun --container-image): install pyxis on every "
            "node and restart slurmd, or set container_runtime to one this node has "
            f"({', '.join(sorted(runtimes)) or 'none found'})"
        )
    elif runtime in ("docker", "podman", "apptainer") and runtime not in runtimes:
        problems.append(f"{runtime} is not installed here; install it or change container_runtime")
    if s.container_runtime == "host" and s.eval_script not in snap["paths"]:
        problems.append(f"container_runtime is host but {s.eval_script} does not exist here")
    return problems


def model_problems(cluster: Cluster, config: dict) -> list[str]:
    s = cluster.settings
    where = f"model_dir {s.model_dir}"
    if "error" in config and len(config) == 1:
        return [
            f"{where}: {config['error']}; point model_dir at the checkpoint the job will mount (the directory holding model_config.yaml)"
        ]
    try:
        found = ModelSpec.from_mapping(config, key="checkpoint")
    except ValueError as exc:
        return [f"{where}: model_config.yaml can't be read as a GPT config: {exc}"]
    expected = s.model_spec
    diffs = [
        f"{k} {getattr(found, k)} (planned {getattr(expected, k)})"
        for k in ARCHITECTURE_KEYS
        if getattr(found, k) != getattr(expected, k)
    ]
    if diffs:
        return [f"{where} holds a different model than planned ({s.model}): " + ", ".join(diffs)]
    return []


def image_present(cluster: Cluster, snap: dict[str, Any]) -> bool:
    s = cluster.settings
    if s.image_file:
        return s.image_file in snap["paths"]
    return bool(snap.get("image"))
