"""The steps of `deploys/nemotron.py`, one function each; the deploy file just calls them in order.

Order matters: the inventory is validated, then every host is read (one SSH command each) and
checked, and only then are operations added. pyinfra prepares every host before executing anything,
so any failed check stops the deploy before a single change is made.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent.lock
from pyinfra.api.exceptions import PyinfraError

from . import render, wheelhouse
from .catalog import ModelSpec
from .facts.disk import FreeSpace
from .facts.files import ManagedPaths, PathState
from .facts.gpus import NvidiaGpus
from .facts.images import ImagePresent
from .facts.model import ModelConfig
from .facts.runtimes import ContainerRuntimes
from .facts.slurm import SlurmVersion
from .facts.snapshot import snapshot
from .facts.system import InitSystem, UserExists
from .inventory import Cluster, InventoryError, load
from .operations import containers, files, health, slurm
from .preflight import check_gpus

ROOT = ("root", "root")
# Model facts that must match between the checkpoint and the plan (a wrong path dies after hours).
ARCHITECTURE_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
)


class DeployError(PyinfraError):
    """Stops the deploy before any change; the message says what is wrong and what to change."""


_clusters: dict[int, Cluster] = {}


def validated_cluster(inventory: Any) -> Cluster:
    """The inventory, validated once per run (every host, every setting) and sized."""
    key = id(inventory)
    if key not in _clusters:
        try:
            _clusters[key] = load(_inventory_path(), inventory=inventory)
        except InventoryError as exc:
            raise DeployError(
                "the inventory is invalid; nothing was changed:\n  " + "\n  ".join(map(str, exc.problems))
            ) from None
    return _clusters[key]


def _inventory_path() -> str:
    """The inventory file pyinfra was given: its first positional argument that is a .py file.

    (pyinfra keeps no record of it, and the deploy runs in greenlets where click's context is gone.)
    """
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg.endswith(".py") and Path(arg).is_file() and (i == 0 or args[i - 1] != "--config"):
            return arg
    raise DeployError(
        "deploys/nemotron.py needs an inventory file: pyinfra inventories/<name>.py deploys/nemotron.py"
    )


def role(host: Any, cluster: Cluster) -> str:
    return "login" if host.name in cluster.login else "compute"


@dataclass
class Wanted:
    """What one host should have: directories and files, from one place so checks and ops agree."""

    dirs: list[tuple[str, str, str, str]] = field(default_factory=list)
    files: list[tuple[str, str | bytes, str]] = field(default_factory=list)  # path, content, mode

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple([d[0] for d in self.dirs] + [f[0] for f in self.files])


def ngc_key(cluster: Cluster) -> str | None:
    """The NGC key from the environment variable or file the inventory names; never from data."""
    s = cluster.settings
    if s.ngc_api_key_file:
        key_file = Path(s.ngc_api_key_file)
        try:
            if key_file.stat().st_mode & 0o077:
                raise DeployError(
                    f"ngc_api_key_file {key_file} is readable by other users: `chmod 600 {key_file}` first"
                )
            return key_file.read_text().strip() or None
        except OSError as exc:
            raise DeployError(
                f"ngc_api_key_file {s.ngc_api_key_file}: {exc.strerror}; fix the path or unset it"
            ) from None
    return os.environ.get(s.ngc_api_key_env or "", "").strip() or None


def _health_paths(cluster: Cluster) -> dict[str, str]:
    s = cluster.settings
    return {"wheels": f"{s.health_venv}-wheels", "marker": f"{s.health_venv}-wheels/installed.sha256"}


_artifacts: dict[int, tuple[list[render.RenderedFile], str, list[tuple[str, bytes]]]] = {}


_artifacts_lock = gevent.lock.BoundedSemaphore()


def artifacts(cluster: Cluster) -> tuple[list[render.RenderedFile], str, list[tuple[str, bytes]]]:
    """Rendered job files and health-check wheels, made once per run (not once per host).

    pyinfra prepares hosts in parallel greenlets: the lock makes the others wait for the first build.
    """
    key = id(cluster)
    with _artifacts_lock:
        if key in _artifacts:
            return _artifacts[key]
        digest, wheels = wheelhouse.build()
        _artifacts[key] = (render.render(cluster), digest, [(w.name, w.read_bytes()) for w in wheels])
        return _artifacts[key]


def health_units(cluster: Cluster, init_system: str | None) -> dict[str, str]:
    s = cluster.settings
    command = health.check_command(s.health_venv, s.job_name, s.port, s.prometheus_textfile_dir)
    if init_system == "systemd":
        return health.systemd_units(s.health_user, command, s.health_interval_seconds, s.job_name)
    return health.cron_entry(s.health_user, command, s.health_interval_seconds)


def wanted(host: Any, cluster: Cluster, init_system: str | None = None) -> Wanted:
    s = cluster.settings
    w = Wanted()
    job_files, _, wheels = artifacts(cluster)
    compute_files = [f for f in job_files if f.role == "compute"]
    if role(host, cluster) == "compute":
        if not s.scripts_on_shared_storage:
            w.dirs += [(s.node_dir, "755", *ROOT), (s.scripts_dir, "755", *ROOT)]
            w.files += [(f"{s.scripts_dir}/{f.name}", f.content, f.mode) for f in compute_files]
        return w

    w.dirs += [
        (s.deploy_dir, "755", *ROOT),
        (s.jobs_dir, "755", *ROOT),
        # Jobs run as whoever submits them; sticky so they can't remove each other's logs.
        (s.logs_dir, "1777", *ROOT),
    ]
    if s.image_file:
        w.dirs.append((s.images_dir, "755", *ROOT))
    if s.scripts_on_shared_storage:
        w.dirs.append((s.scripts_dir, "755", *ROOT))
        w.files += [(f"{s.scripts_dir}/{f.name}", f.content, f.mode) for f in compute_files]
    w.files += [(f"{s.jobs_dir}/{f.name}", f.content, f.mode) for f in job_files if f.role == "login"]

    hp = _health_paths(cluster)
    w.dirs += [
        (str(Path(s.health_venv).parent), "755", *ROOT),
        (hp["wheels"], "755", *ROOT),
        (health.STATE_DIR, "750", s.health_user, s.health_user),
        (s.prometheus_textfile_dir, "775", "root", s.health_user),
    ]
    w.files += [(f"{hp['wheels']}/{name}", data, "644") for name, data in wheels]
    w.files += [(path, text, "644") for path, text in health_units(cluster, init_system).items()]
    return w


def read_host(host: Any, cluster: Cluster) -> dict[str, Any]:
    """Everything the deploy needs from this host, in one SSH command."""
    s = cluster.settings
    probes: list[tuple[str, type, tuple]] = [("runtimes", ContainerRuntimes, ())]
    if role(host, cluster) == "compute":
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
            ("health_user", UserExists, (s.health_user,)),
        ]
        if s.image_file:
            probes.append(("free", FreeSpace, (s.images_dir,)))
    paths = list(wanted(host, cluster, "systemd").paths)
    if s.image_file:
        creds = _enroot_credentials_path(cluster)
        paths += [s.image_file, creds, creds.rsplit("/", 1)[0]]
    if role(host, cluster) == "login":
        # The init system is only known after this read: list the cron entry beside the systemd units.
        paths += [
            *health_units(cluster, "cron"),
            f"{s.health_venv}/bin/python",
            _health_paths(cluster)["marker"],
        ]
    elif s.container_runtime == "host":
        paths.append(s.eval_script)
    probes.append(("paths", ManagedPaths, (tuple(dict.fromkeys(paths)),)))
    return snapshot(host, tuple(probes))


def preflight(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Stop the deploy, before any change, if this host can't run the job as planned."""
    s = cluster.settings
    if s.skip_preflight:
        return
    problems: list[str] = []
    runtimes = snap["runtimes"]
    if role(host, cluster) == "login":
        if not snap["slurm"]:
            problems.append(
                "Slurm's sbatch is not installed here: the login node must be able to submit jobs"
            )
    else:
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
        problems += _model_problems(cluster, snap["model"])
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
    free = snap.get("free")
    if free is not None and free < s.min_free_gib and not _image_present(cluster, snap):
        problems.append(
            f"only {free} GiB free where the image goes; need {s.min_free_gib} GiB (min_free_gib)"
        )
    if problems:
        raise DeployError(
            f"preflight failed on {host.name} ({role(host, cluster)}); nothing was changed:\n  - "
            + "\n  - ".join(problems)
            + "\n(fix the node or the inventory; `--data skip_preflight=true` skips these checks)"
        )


def _model_problems(cluster: Cluster, config: dict) -> list[str]:
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


def _image_present(cluster: Cluster, snap: dict[str, Any]) -> bool:
    s = cluster.settings
    if s.image_file:
        return s.image_file in snap["paths"]
    return bool(snap.get("image"))


def ensure_files(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Directories and files (scripts, sbatch, health units, wheels) with explicit owners and modes."""
    s = cluster.settings
    if role(host, cluster) == "login":  # owns the health check's directories
        health.ensure_user(name=f"User {s.health_user}", username=s.health_user, exists=snap["health_user"])
    want = wanted(host, cluster, snap.get("init"))
    current: dict[str, PathState] = snap["paths"]
    files.managed_directories(name="Directories", dirs=want.dirs, current=current)
    files.managed_files(
        name="Job files" if role(host, cluster) == "compute" else "Job files, health-check wheels and timer",
        files=[(path, content, mode, *ROOT) for path, content, mode in want.files],
        current=current,
    )


def pull_container(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Get the image where the job will look for it, once, by the inventory's runtime."""
    s = cluster.settings
    runtime = s.pull_runtime or s.container_runtime
    if role(host, cluster) == "compute" and runtime in ("docker", "podman"):
        containers.pull_image(
            name=f"Pull {s.image} ({runtime})",
            runtime=runtime,
            image=s.image,
            present=bool(snap.get("image")),
            ngc_key=ngc_key(cluster),
            tls_verify=s.registry_tls_verify,
            login=s.registry_login,
        )
    elif s.image_file and host.name == cluster.compute[0]:
        # One host imports for the whole cluster, onto shared storage.
        key = ngc_key(cluster)
        creds = None
        if key and runtime == "pyxis" and containers.registry_of(s.image) == containers.NGC_REGISTRY:
            creds = _enroot_credentials_path(cluster)
            files.managed_directories(
                name="enroot config", dirs=[(f"{s.node_dir}/enroot", "700", *ROOT)], current=snap["paths"]
            )
            files.managed_files(
                name="enroot credentials (0600)",
                files=[(creds, containers.enroot_credentials(key), "600", *ROOT)],
                current=snap["paths"],
                secret=True,
            )
        containers.import_image_file(
            name=f"Import {s.image} ({runtime})",
            runtime=runtime,
            image=s.image,
            target=s.image_file,
            present=s.image_file in snap["paths"],
            tmp_dir=s.enroot_tmp_dir or f"{s.deploy_dir}/.import-tmp",
            credentials_path=creds,
        )


def _enroot_credentials_path(cluster: Cluster) -> str:
    return f"{cluster.settings.node_dir}/enroot/.credentials"


def install_health_check(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """The unprivileged user, the venv with this package, and the timer (files come from ensure_files)."""
    if role(host, cluster) != "login":
        return
    s = cluster.settings
    hp = _health_paths(cluster)
    _, digest, wheels = artifacts(cluster)
    marker_ok = snap["paths"].get(hp["marker"])
    health.ensure_venv(
        name=f"Health-check venv {s.health_venv}",
        venv=s.health_venv,
        python_present=f"{s.health_venv}/bin/python" in snap["paths"],
        wheels=[f"{hp['wheels']}/{name}" for name, _ in wheels],
        installed=marker_ok is not None and marker_ok.sha256 == files.sha256_of(digest),
        marker=hp["marker"],
        digest=digest,
    )
    unit_changed = any(
        snap["paths"].get(path) is None or snap["paths"][path].sha256 != files.sha256_of(text)
        for path, text in health_units(cluster, snap.get("init")).items()
    )
    health.enable_timer(name="Enable the health timer", kind=snap.get("init") or "cron", changed=unit_changed)


def submit(host: Any, cluster: Cluster) -> None:
    """Only with `--data submit=true`: submit unless already queued, then wait until it generates."""
    s = cluster.settings
    if not s.submit or role(host, cluster) != "login":
        return
    command = " ".join(
        [
            f"{s.health_venv}/bin/python",
            "-m",
            "nemotron_deploy.health",
            "--wait",
            "--progress-lines",
            "--slurm-job",
            s.job_name,
            "--port",
            str(s.port),
            "--budget",
            str(s.health_startup_budget_seconds),
        ]
    )
    smoke = s.mode == "smoke"  # the job ends by itself after one call: wait for its end instead
    slurm.submit_and_wait(
        name=f"Submit {s.job_name} and wait until it "
        + ("completes its smoke test" if smoke else "generates"),
        sbatch_path=f"{s.jobs_dir}/nemotron.sbatch",
        job_name=s.job_name,
        health_command=command,
        until_done=smoke,
        budget_seconds=s.health_startup_budget_seconds + 600,
    )
