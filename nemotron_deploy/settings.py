"""The settings an inventory gives each host (pyinfra `host.data`), as one pydantic schema.

Every value that ends up in a shell script is either constrained here to characters that cannot
break out of a quoted word, or rejected with a message that names the field and the fix. Secrets
never live in inventory data: the NGC key comes from an environment variable or a file.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from . import catalog
from .catalog import GpuType, ModelSpec

DEFAULT_IMAGE = "nvcr.io/nvidia/nemo:24.01.framework"

# Characters a value may carry into a shell script or a Slurm directive. No whitespace, quotes,
# `$`, backticks, `;&|<>()`, globs, backslashes or newlines.
SAFE_VALUE = re.compile(r"^[A-Za-z0-9._:/@%+=,#-]*$")
# Paths also end up in Hydra overrides (`,` and `=` are syntax there) and in container mount
# lists (`:` separates fields there), so they get the narrower set.
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]*$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$|^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
# --name=value or --flag: the options the sbatch file passes through as `#SBATCH` lines.
SBATCH_OPTION = re.compile(r"^--[a-z][a-z0-9-]*(=[A-Za-z0-9._:/@%+=,-]+)?$")
IMAGE_TAG = re.compile(r"(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|@sha256:[0-9a-f]{64})$")
# New-style keys start nvapi-; legacy ones are ~84 base64 characters (never a path: no leading /).
NGC_KEY_LIKE = re.compile(r"^(nvapi-[A-Za-z0-9_-]{20,}|(?!/)[A-Za-z0-9+/]{80,}={0,2})$")
SECRET_FIELD_NAMES = {"ngc_api_key", "ngc_key", "ngc_password", "ngc_token", "registry_password", "api_key"}

# Host data keys that belong to pyinfra itself (connectors, sudo, ...), not to this schema.
PYINFRA_KEY_PREFIXES = ("ssh_", "winrm_", "docker_", "local_", "chroot_", "_")

RUNTIMES_WITH_IMAGE_FILE = {"pyxis": ".sqsh", "apptainer": ".sif"}


def _safe_value(value: str) -> str:
    if not SAFE_VALUE.match(value):
        bad = sorted({c for c in value if not SAFE_VALUE.match(c)})
        raise ValueError(
            f"contains {''.join(bad)!r}, which could break a shell script; "
            "use only letters, digits and . _ : / @ % + = , # -"
        )
    return value


def _safe_name(value: str) -> str:
    if not SAFE_NAME.match(value):
        raise ValueError("must start with a letter or digit and contain only letters, digits, '.', '_', '-'")
    return value


def _absolute_path(value: str) -> str:
    path = PurePosixPath(value)
    if not path.is_absolute():
        raise ValueError(
            f"must be an absolute path (the cluster resolves relative paths differently); e.g. /{value}"
        )
    if not SAFE_PATH.match(value):
        bad = sorted({c for c in value if not SAFE_PATH.match("/" + c)})
        raise ValueError(
            f"contains {''.join(bad)!r}, which could break a shell script, a Hydra override or a mount "
            "list; use only letters, digits and . _ / @ + -"
        )
    if ".." in path.parts or str(path) != value:
        raise ValueError(
            f"must be a normalised absolute path without '..', '//' or a trailing '/'; e.g. {path}"
        )
    return value


def _env_name(value: str) -> str:
    if not ENV_NAME.match(value):
        raise ValueError(
            "must be an environment variable name (letters, digits, '_', not starting with a digit)"
        )
    return value


# Directories no setting may hand over to the deploy: it creates the directories it owns and sets
# their owner and mode, which on one of these would break the machine. (Directories it only uses, such
# as model_dir or nemo_dir, may be anywhere.)
SYSTEM_DIRS = frozenset(
    {
        "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lost+found", "/media", "/mnt", "/opt", "/proc",
        "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp",
        "/usr", "/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/include", "/usr/share", "/usr/src",
        "/usr/local", "/usr/local/bin", "/usr/local/sbin", "/usr/local/etc", "/usr/local/include",
        "/usr/local/share", "/usr/local/src",
        "/var", "/var/lib", "/var/log", "/var/cache", "/var/tmp", "/var/spool", "/var/run", "/var/lock",
        "/var/opt", "/var/mail", "/var/local", "/var/backups",
        "/etc/systemd", "/etc/systemd/system", "/etc/cron.d", "/etc/default",
    }
)  # fmt: skip
# /lib, /lib32, /lib64, /libx32, /usr/lib*, /usr/local/lib*; and anything in the kernel's filesystems.
SYSTEM_DIR_PATTERN = re.compile(r"^(/usr(/local)?)?/lib(32|64|x32)?$|^/(proc|sys|dev)(/|$)")
# A valid minimum NVIDIA driver version, as nvidia-smi prints it: 535.104.05, 390.157, or just 535.
DRIVER_VERSION = re.compile(r"^\d+(\.\d+){0,3}$")


def is_system_dir(path: str) -> bool:
    return path in SYSTEM_DIRS or bool(SYSTEM_DIR_PATTERN.match(path))


def _owned_dir(example: str, how: str):
    """A directory the deploy creates and owns (`how`): never a system directory."""

    def check(value: str) -> str:
        if is_system_dir(value):
            raise ValueError(
                f"{value} is a system directory, and the deploy owns this one ({how}), so it would "
                f"take {value} over; use a directory of its own, e.g. {example}"
            )
        return value

    return AfterValidator(check)


def _health_venv(value: str) -> str:
    """The deploy owns the venv and the directory it is in (root, 755)."""
    parent = str(PurePosixPath(value).parent)
    for path, what in ((value, "the venv"), (parent, "the venv's parent directory")):
        if is_system_dir(path):
            raise ValueError(
                f"{path} is a system directory, and the deploy owns {what} (creates it, owner root, "
                f"mode 755), so it would take {path} over; put the venv in a directory of its own, "
                "e.g. /opt/nemotron-deploy/health-venv"
            )
    return value


def _shared_dir(value: str) -> str:
    if value == "/":
        raise ValueError(
            "/ is not a shared filesystem: the deploy keeps job files, logs and images in "
            "<shared_dir>/nemotron-deploy, which the login and compute nodes must all see; name the "
            "shared filesystem's directory, e.g. /lustre/nemotron"
        )
    return value


def _driver_version(value: str) -> str:
    if not DRIVER_VERSION.match(value):
        raise ValueError(
            "must be a dotted numeric NVIDIA driver version as nvidia-smi prints it, e.g. 535.104.05 "
            "(the lowest driver the compute nodes may run)"
        )
    return value


def _health_user(value: str) -> str:
    if value == "root":
        raise ValueError(
            "the health check runs every minute as this user and must not run as root: it needs no "
            "privilege (it only calls the server and writes metrics), and a fault in it would then "
            "act as root; use the default, nemotron-health (the deploy creates it)"
        )
    return value


SafeValue = Annotated[str, AfterValidator(_safe_value)]
SafeName = Annotated[str, AfterValidator(_safe_name)]
AbsPath = Annotated[str, AfterValidator(_absolute_path)]
EnvName = Annotated[str, AfterValidator(_env_name)]


def _slurm_time(value: str) -> str:
    if not SLURM_TIME.match(value):
        raise ValueError("must be a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    return value


def _sbatch_option(value: str) -> str:
    if not SBATCH_OPTION.match(value):
        raise ValueError(
            "must be one long sbatch option, '--name' or '--name=value', value of letters, digits "
            "and . _ : / @ % + = , -; e.g. --qos=high"
        )
    return value


class ClusterSettings(BaseModel):
    """Everything a deploy needs to know about one cluster; one instance per host's data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- what runs where
    model: str = Field("nemotron-4-340b", description="model key in the catalog (models.yaml)")
    gpu_type: str = Field(description="GPU type key in the catalog (gpus.yaml), e.g. H100-80GB-SXM")
    gpus_per_node: int | None = Field(None, gt=0, description="GPUs per compute node; default: the type's")
    tensor_parallel: int | None = Field(None, gt=0, description="pin TP instead of planning it")
    pipeline_parallel: int | None = Field(None, gt=0, description="pin PP instead of planning it")
    inference_batch: int = Field(8, gt=0, description="sequences of 4096 tokens whose KV cache must fit")
    runtime_reserve_gib: float = Field(6.0, ge=0, description="per-GPU allowance for CUDA/NCCL/activations")

    # --- Slurm
    job_name: SafeName = "nemotron-340b"
    slurm_account: SafeName | None = None
    slurm_partition: SafeName | None = None
    slurm_time_limit: Annotated[str, AfterValidator(_slurm_time)] = "04:00:00"
    slurm_exclusive: bool = True
    gpu_request: Literal["gpus-per-node", "gres"] = "gpus-per-node"
    extra_sbatch_options: list[Annotated[str, AfterValidator(_sbatch_option)]] = []
    job_env: dict[EnvName, SafeValue] = Field(
        default_factory=lambda: {
            "NCCL_DEBUG": "WARN",
            "NCCL_ASYNC_ERROR_HANDLING": "1",
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        },
        description="environment exported to every task (NCCL settings and the like)",
    )
    mode: Literal["serve", "smoke"] = "serve"

    # --- paths on the cluster
    model_dir: AbsPath = Field(description="the checkpoint directory (holds model_config.yaml)")
    shared_dir: Annotated[AbsPath, AfterValidator(_shared_dir)] = Field(
        description="shared filesystem root for job files, logs and images"
    )
    node_dir: Annotated[AbsPath, _owned_dir("/opt/nemotron-deploy", "creates it, owner root, mode 755")] = (
        "/opt/nemotron-deploy"
    )
    scripts_on_shared_storage: bool = False
    nemo_dir: AbsPath = "/opt/NeMo"
    python: AbsPath = "/usr/bin/python3"

    # --- container
    container_runtime: Literal["pyxis", "docker", "podman", "apptainer", "host"] = "pyxis"
    container_image: SafeValue | None = None
    pull_runtime: Literal["docker", "podman"] | None = Field(
        None,
        description="also pull the image with this tool on every compute node (the sandbox: host + podman)",
    )
    registry_tls_verify: bool = True
    registry_login: bool | None = Field(
        None, description="log in to the image's registry with the NGC key; default: only for nvcr.io"
    )
    ngc_api_key_env: EnvName | None = "NGC_API_KEY"
    ngc_api_key_file: AbsPath | None = None
    enroot_tmp_dir: AbsPath | None = None
    min_driver_version: Annotated[str, AfterValidator(_driver_version)] = "535.104.05"
    min_free_gib: int = Field(60, ge=0, description="free space needed where the image goes")

    # --- server
    port: int = Field(1424, ge=1024, le=65535)

    # --- scheduled health check (login node)
    health_user: Annotated[SafeName, AfterValidator(_health_user)] = "nemotron-health"
    health_venv: Annotated[AbsPath, AfterValidator(_health_venv)] = "/opt/nemotron-deploy/health-venv"
    health_interval_seconds: int = Field(60, ge=10)
    prometheus_textfile_dir: Annotated[
        AbsPath,
        _owned_dir(
            "/var/lib/prometheus/node-exporter", "creates it, owner root, group the health user, mode 775"
        ),
    ] = "/var/lib/prometheus/node-exporter"
    health_startup_budget_seconds: int = Field(2700, ge=60)

    # --- deploy switches (`--data skip_preflight=true`, `--data submit=true`)
    skip_preflight: bool = False
    submit: bool = False

    @model_validator(mode="after")
    def _check_against_catalog(self) -> ClusterSettings:
        gpu = catalog.gpu_type(self.gpu_type)  # raises with the known types
        catalog.model(self.model)
        if self.gpus_per_node is not None and self.gpus_per_node not in gpu.gpus_per_node:
            raise ValueError(
                f"gpus_per_node={self.gpus_per_node} is not a node size {gpu.key} comes in; "
                f"use one of {gpu.gpus_per_node}"
            )
        if self.container_image is not None:
            check_image(self.container_image, self.container_runtime)
        return self

    # --- derived values: one place, so templates and the deploy agree
    @property
    def gpu(self) -> GpuType:
        return catalog.gpu_type(self.gpu_type)

    @property
    def model_spec(self) -> ModelSpec:
        return catalog.model(self.model)

    @property
    def node_gpus(self) -> int:
        return self.gpus_per_node or self.gpu.default_gpus_per_node

    @property
    def image(self) -> str:
        """The image reference in the form the runtime expects (pyxis wants `registry#path`)."""
        if self.container_image:
            return self.container_image
        return DEFAULT_IMAGE.replace("/", "#", 1) if self.container_runtime == "pyxis" else DEFAULT_IMAGE

    @property
    def eval_script(self) -> str:
        return f"{self.nemo_dir}/examples/nlp/language_modeling/megatron_gpt_eval.py"

    @staticmethod
    def container_storage_dir(runtime: str) -> str:
        return "/var/lib/docker" if runtime == "docker" else "/var/lib/containers"

    @property
    def deploy_dir(self) -> str:
        return f"{self.shared_dir}/nemotron-deploy"

    @property
    def scripts_dir(self) -> str:
        base = self.deploy_dir if self.scripts_on_shared_storage else self.node_dir
        return f"{base}/scripts"

    @property
    def jobs_dir(self) -> str:
        return f"{self.deploy_dir}/jobs"

    @property
    def logs_dir(self) -> str:
        return f"{self.deploy_dir}/logs"

    @property
    def images_dir(self) -> str:
        return f"{self.deploy_dir}/images"

    @property
    def image_file(self) -> str | None:
        """Where pyxis/apptainer keep the imported image: named after the reference, never reused."""
        suffix = RUNTIMES_WITH_IMAGE_FILE.get(self.container_runtime)
        if suffix is None:
            return None
        name = re.sub(r"[^A-Za-z0-9._-]+", "+", self.image.replace("#", "/"))
        return f"{self.images_dir}/{name}{suffix}"


def check_image(image: str, runtime: str) -> None:
    """Reject image references each runtime would misread (the field notes' 401s)."""
    if not IMAGE_TAG.search(image.rsplit("/", 1)[-1].rsplit("#", 1)[-1]):
        raise ValueError(
            f"container_image {image!r} has no tag or digest; pin one, e.g. {DEFAULT_IMAGE} "
            "(':latest' drifts under a running cluster)"
        )
    if runtime == "pyxis":
        first = image.split("/", 1)[0]
        if "#" not in image and "/" in image and ("." in first or ":" in first or first == "localhost"):
            fixed = image.replace("/", "#", 1)
            raise ValueError(
                f"container_image {image!r} is in docker form; pyxis/enroot needs '#' between the "
                f"registry and the path, or it looks on Docker Hub and fails with 401: use {fixed!r}"
            )
    elif "#" in image:
        raise ValueError(
            f"container_image {image!r} uses the pyxis/enroot '#' form; {runtime} needs "
            f"{image.replace('#', '/', 1)!r}"
        )


def split_host_data(data: dict) -> tuple[dict, dict]:
    """(our settings, pyinfra's own keys) from a host's merged data."""
    ours, theirs = {}, {}
    for key, value in data.items():
        (theirs if key.startswith(PYINFRA_KEY_PREFIXES) else ours)[key] = value
    return ours, theirs
