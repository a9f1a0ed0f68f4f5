"""The settings an inventory gives each host (pyinfra `host.data`), as one pydantic schema.

Every value that ends up in a shell script is either constrained here to characters that cannot
break out of a quoted word, or rejected with a message that names the field and the fix. Secrets
never live in inventory data: the NGC key comes from an environment variable or a file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import PurePosixPath
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from . import catalog
from .catalog import GpuType, ModelSpec
from .service import slurm

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
# The endpoint's API keys (nemotron_deploy.api_keys): only their hashes belong anywhere.
API_KEY_LIKE = re.compile(r"^nmt-[A-Za-z0-9_-]{20,}$")
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


# A plain POSIX account name (what useradd accepts by default, at most 32 characters).
ACCOUNT_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Words sudoers gives a meaning of their own in a user or Runas list.
SUDO_RESERVED = frozenset({"all"})
# Directories any local user may write into: nothing the deploy owns, nor its parent, may live there
# (another user could create it first, or a link of that name, and own what root then runs).
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/run/user")


def account_name(what: str, default: str):
    """A validator for a setting naming a local account that sudoers, systemd and cron will name
    (health_user, service_user): a plain POSIX user name, never a word sudo treats
    specially (ALL, %group, +netgroup, #uid, !negation, an ALL-CAPS alias) (root: each setting's own rule)."""

    def check(value: str) -> str:
        if value.lower() in SUDO_RESERVED or value.isupper() or value[:1] in "%+#!":
            raise ValueError(
                f"{value!r} means something else to sudo (ALL, %group, +netgroup, #uid, !negation "
                f"and ALL-CAPS aliases are sudoers syntax): the sudo rule for {what} would then apply "
                f"to other users; use a plain user name, e.g. {default}"
            )
        if not ACCOUNT_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a plain POSIX user name: lower-case letters, digits, '_' and '-', "
                f"starting with a letter or '_', at most 32 characters; e.g. {default}"
            )
        return value

    return AfterValidator(check)


def _not_world_writable(value: str) -> str:
    """A directory the deploy owns must not live in a directory every user may write into."""
    for base in WORLD_WRITABLE_DIRS:
        if value == base or value.startswith(base + "/"):
            raise ValueError(
                f"{value} is under {base}, where every user may create files: another user could "
                "create it (or a link of that name) before the deploy does and own what root then "
                "runs from it; use a directory only root can write, e.g. /opt/nemotron-deploy/..."
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


def _service_user(value: str) -> str:
    if value == "root":
        raise ValueError(
            "the replicas' jobs are submitted as this user, so NeMo and its containers run as it on "
            "every compute node; as root, any fault in the server (or anything its requests reach) acts "
            "as root on the cluster: use an unprivileged account that resolves to the same UID on the "
            "login and compute nodes, e.g. the default, nemotron"
        )
    return value


def _bind_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address: the endpoint binds addresses, e.g. 0.0.0.0 (every IPv4 "
            "address), :: (every IPv6 one) or the login node's cluster-network address"
        ) from None
    return value


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(
            f"{value!r} is not a network in CIDR form ({exc}); e.g. 10.0.0.0/8 or 127.0.0.1/32"
        ) from None
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


# The groups `nemotron-deploy settings` lists the settings in: the `# --- ...` comments of the model.
RUNS = {"group": "what runs where"}
SLURM = {"group": "Slurm"}
PATHS = {"group": "paths on the cluster"}
CONTAINER = {"group": "container"}
SERVER = {"group": "server"}
ENDPOINT = {"group": "endpoint (login node)"}
HEALTH = {"group": "scheduled health check (login node)"}
KEEP_UP = {"group": "keeping the service up (login node)"}
SWITCHES = {"group": "deploy switches"}


class ClusterSettings(BaseModel):
    """Everything a deploy needs to know about one cluster; one instance per host's data.

    Every field has a description (what it is, its unit, when to change it) and a group (the
    `# --- ...` comments below); `nemotron-deploy settings [--json]` prints them with types and defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- what runs where
    model: str = Field(
        "nemotron-4-340b",
        description="The model to serve: a key of nemotron_deploy/catalog/models.yaml, which gives its "
        "size for planning. Change it only to deploy another model the catalog knows.",
        json_schema_extra=RUNS,
    )
    gpu_type: str = Field(
        description="The compute nodes' GPU type: a key of nemotron_deploy/catalog/gpus.yaml, e.g. "
        "H100-80GB-SXM. Required; the plan sizes the job for it and preflight checks nvidia-smi agrees.",
        json_schema_extra=RUNS,
    )
    gpus_per_node: int | None = Field(
        None,
        gt=0,
        description="GPUs in each compute node (a count). Default: the GPU type's usual node size; set "
        "it when your nodes have another size the type comes in.",
        json_schema_extra=RUNS,
    )
    tensor_parallel: int | None = Field(
        None,
        gt=0,
        description="Tensor-parallel size (GPUs each layer is split over). Default: planned from GPU "
        "memory; pin it only to reproduce a known layout.",
        json_schema_extra=RUNS,
    )
    pipeline_parallel: int | None = Field(
        None,
        gt=0,
        description="Pipeline-parallel size (stages, each on its own GPUs). Default: planned from GPU "
        "memory; pin it only to reproduce a known layout (the sandbox pins 2 to run multi-node jobs).",
        json_schema_extra=RUNS,
    )
    replicas: int | None = Field(
        None,
        ge=1,
        description="How many replicas to run, each its own Slurm job (<job_name>-r1, -r2, ...) behind "
        "the endpoint (a count). Default: every whole replica the compute nodes hold; set it to leave "
        "nodes for other work.",
        json_schema_extra=RUNS,
    )
    inference_batch: int = Field(
        8,
        gt=0,
        description="Sequences of 4096 tokens whose KV cache must fit beside the weights (a count). "
        "Raise it for more concurrent requests; the plan may then need more nodes.",
        json_schema_extra=RUNS,
    )
    runtime_reserve_gib: float = Field(
        6.0,
        ge=0,
        description="GPU memory kept per GPU for CUDA, NCCL and activations (GiB). Raise it if the "
        "planned layout runs out of GPU memory.",
        json_schema_extra=RUNS,
    )

    # --- Slurm
    job_name: SafeName = Field(
        "nemotron-340b",
        description="The Slurm job name (sbatch --job-name); the health check and submit find the job "
        "by it. Change it to run two deployments on one cluster.",
        json_schema_extra=SLURM,
    )
    slurm_account: SafeName | None = Field(
        None,
        description="The Slurm account to charge (sbatch --account). Default: none (your default "
        "account); set it if your site requires one.",
        json_schema_extra=SLURM,
    )
    slurm_partition: SafeName | None = Field(
        None,
        description="The Slurm partition with the GPU nodes (sbatch --partition). Default: none (the "
        "cluster's default partition).",
        json_schema_extra=SLURM,
    )
    slurm_time_limit: Annotated[str, AfterValidator(_slurm_time)] = Field(
        "04:00:00",
        description="The job's time limit (sbatch --time): MM, HH:MM:SS, D-HH:MM:SS and Slurm's other "
        "forms. The server stops when it ends; raise it to serve longer.",
        json_schema_extra=SLURM,
    )
    slurm_exclusive: bool = Field(
        True,
        description="Ask for whole nodes (sbatch --exclusive). Turn it off only where GPU nodes are "
        "shared between jobs and Slurm isolates GPUs.",
        json_schema_extra=SLURM,
    )
    gpu_request: Literal["gpus-per-node", "gres"] = Field(
        "gpus-per-node",
        description="How the sbatch file asks for GPUs: --gpus-per-node=N, or --gres=gpu:N. Use gres "
        "on clusters whose older gres setup rejects --gpus-per-node.",
        json_schema_extra=SLURM,
    )
    extra_sbatch_options: list[Annotated[str, AfterValidator(_sbatch_option)]] = Field(
        [],
        description="Extra #SBATCH lines, one long option each ('--name=value' or '--flag'), e.g. "
        "['--qos=inference']. Set it for what your site needs (QoS, constraints, reservation).",
        json_schema_extra=SLURM,
    )
    job_env: dict[EnvName, SafeValue] = Field(
        default_factory=lambda: {
            "NCCL_DEBUG": "WARN",
            "NCCL_ASYNC_ERROR_HANDLING": "1",
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        },
        description="Environment variables (name: value) exported to every task of the job. Replaces "
        "the defaults; set it to tune NCCL for your fabric (e.g. NCCL_IB_HCA), keeping the defaults.",
        json_schema_extra=SLURM,
    )
    mode: Literal["serve", "smoke"] = Field(
        "serve",
        description="serve: the job keeps serving until its time limit; smoke: it makes one "
        "call_server.py call and ends (a quick end-to-end check of a new cluster).",
        json_schema_extra=SLURM,
    )
    service_user: Annotated[
        str, account_name("the replicas' jobs", "nemotron"), AfterValidator(_service_user)
    ] = Field(
        "nemotron",
        description="The unprivileged account every replica's job is submitted as: NeMo and its "
        "containers run as it, and only it writes the job records the check trusts. It must resolve to "
        "the same UID on the login and every compute node (LDAP/SSSD on most clusters; the deploy "
        "creates it on the login node where missing, and preflight names each node where it is missing "
        "or differs). Never root; not the health_user.",
        json_schema_extra=SLURM,
    )

    # --- paths on the cluster
    model_dir: AbsPath = Field(
        description="The checkpoint directory (holds model_config.yaml), on storage every compute node "
        "sees; mounted read-only into the job. Required.",
        json_schema_extra=PATHS,
    )
    shared_dir: Annotated[AbsPath, AfterValidator(_shared_dir)] = Field(
        description="A directory on the filesystem the login and compute nodes share; the deploy keeps "
        "job files, logs and imported images in <shared_dir>/nemotron-deploy. Required.",
        json_schema_extra=PATHS,
    )
    node_dir: Annotated[
        AbsPath,
        _owned_dir("/opt/nemotron-deploy", "creates it, owner root, mode 755"),
        AfterValidator(_not_world_writable),
    ] = Field(
        "/opt/nemotron-deploy",
        description="A directory the deploy creates and owns (root, mode 755) on every compute node, "
        "for the job scripts. Change it if your site installs software elsewhere; never a system "
        "directory.",
        json_schema_extra=PATHS,
    )
    scripts_on_shared_storage: bool = Field(
        False,
        description="Put the job scripts once in <shared_dir>/nemotron-deploy/scripts instead of in "
        "node_dir on every compute node. Turn it on to leave the compute nodes' disks untouched.",
        json_schema_extra=PATHS,
    )
    nemo_dir: AbsPath = Field(
        "/opt/NeMo",
        description="Where NeMo is, in the container (or on the host with container_runtime host); the "
        "job runs its examples/nlp/language_modeling/megatron_gpt_eval.py. Change it for an image that "
        "installs NeMo elsewhere.",
        json_schema_extra=PATHS,
    )
    python: AbsPath = Field(
        "/usr/bin/python3",
        description="The Python interpreter that runs NeMo's server, the health check and "
        "call_server.py inside the job. Change it if the image's python3 is elsewhere.",
        json_schema_extra=PATHS,
    )

    # --- container
    container_runtime: Literal["pyxis", "docker", "podman", "apptainer", "host"] = Field(
        "pyxis",
        description="How the job runs the NeMo container: pyxis (srun --container-image), docker, "
        "podman, apptainer, or host (NeMo installed on the nodes). Use what your cluster has.",
        json_schema_extra=CONTAINER,
    )
    container_image: SafeValue | None = Field(
        None,
        description=f"The NeMo image, pinned by tag or digest; pyxis wants '#' after the registry. "
        f"Default: {DEFAULT_IMAGE} (in pyxis form for pyxis). Change it for a mirror or a newer NeMo.",
        json_schema_extra=CONTAINER,
    )
    pull_runtime: Literal["docker", "podman"] | None = Field(
        None,
        description="Also pull the image with this tool on every compute node. Default: none (the "
        "runtime pulls); the sandbox uses podman with container_runtime host.",
        json_schema_extra=CONTAINER,
    )
    registry_tls_verify: bool = Field(
        True,
        description="Check the registry's TLS certificate when pulling. Turn it off only for a "
        "registry on a trusted private network (the sandbox's plain-HTTP registry), and never with a "
        "login: validate and the deploy refuse to send the NGC key to a registry they don't verify.",
        json_schema_extra=CONTAINER,
    )
    registry_login: bool | None = Field(
        None,
        description="Log in to the image's registry with the NGC key. Default: only for nvcr.io; true for "
        "a private mirror that takes the same key, false to never log in.",
        json_schema_extra=CONTAINER,
    )
    pull_stall_timeout_seconds: int = Field(
        600,
        ge=5,
        description="Fail the image pull or import on a host when it made no progress (bytes, output, "
        "disk I/O) for this long (seconds): a registry that accepts connections but answers nothing.",
        json_schema_extra=CONTAINER,
    )
    pull_timeout_seconds: int | None = Field(
        None,
        ge=1,
        description="Fail the image pull or import when it takes longer than this in all (seconds), "
        "progress or not. Default: no limit (a 15-30 GB NeMo image can take long on a slow link).",
        json_schema_extra=CONTAINER,
    )
    ngc_api_key_env: EnvName | None = Field(
        "NGC_API_KEY",
        description="The environment variable, on the machine you deploy from, that holds the NGC key. "
        "Change it if your key lives in another variable; the key itself never goes in an inventory.",
        json_schema_extra=CONTAINER,
    )
    ngc_api_key_file: AbsPath | None = Field(
        None,
        description="A 0600 file, on the machine you deploy from, holding the NGC key; used instead of "
        "ngc_api_key_env. Default: none.",
        json_schema_extra=CONTAINER,
    )
    enroot_tmp_dir: AbsPath | None = Field(
        None,
        description="Scratch space for importing the image with enroot or apptainer (tens of GiB). "
        "Default: <shared_dir>/nemotron-deploy/.import-tmp; set it to a faster disk with room.",
        json_schema_extra=CONTAINER,
    )
    min_driver_version: Annotated[str, AfterValidator(_driver_version)] = Field(
        "535.104.05",
        description="The lowest NVIDIA driver version preflight accepts on compute nodes, dotted as "
        "nvidia-smi prints it. Raise it when a newer image needs a newer driver.",
        json_schema_extra=CONTAINER,
    )
    min_free_gib: int = Field(
        60,
        ge=0,
        description="Free space preflight requires where the image goes (GiB): container storage for "
        "docker/podman, the images directory for pyxis/apptainer. Raise it for a bigger image.",
        json_schema_extra=CONTAINER,
    )

    # --- server
    port: int = Field(
        1424,
        ge=1024,
        le=65535,
        description="The TCP port NeMo's server listens on, on the job's first node (the model card "
        "uses 1424). Change it if another service holds it.",
        json_schema_extra=SERVER,
    )

    max_generation_seconds: int = Field(
        300,
        ge=10,
        description="The longest one generation may take (seconds). The endpoint's health check and "
        "server timeouts are derived from it (a check waits behind a generation in flight). Raise it "
        "for long outputs (tokens_to_generate in the thousands) on slow replicas.",
        json_schema_extra=SERVER,
    )

    # --- endpoint (login node)
    endpoint: bool | None = Field(
        None,
        description="Run the endpoint (HAProxy on the login node, in front of every replica). Default: "
        "on where the login node can run it as a service; false to leave the login node alone.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_port: int = Field(
        1424,
        ge=1024,
        le=65535,
        description="The TCP port the endpoint listens on, on the login node (the model card's client "
        "uses 1424). Change it if another service on the login node holds it.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_queue_seconds: int = Field(
        120,
        ge=1,
        description="How long a request may wait in the endpoint for a free replica (seconds; each "
        "replica serves one request at a time); then it gets 503 saying the replicas are busy.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_check_seconds: int = Field(
        5,
        ge=1,
        description="How often the endpoint health-checks each replica with a one-token generation "
        "(seconds). Lower it to notice a failed replica sooner; raise it to load replicas less.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_auth: Literal["api-key", "none"] = Field(
        "api-key",
        description="Who may call the endpoint. api-key: only requests with `Authorization: Bearer <key>` "
        "for a key in endpoint_api_keys_file (others get 401); none: anyone who can reach the port "
        "(`nemotron-deploy plan` then says the endpoint is open).",
        json_schema_extra=ENDPOINT,
    )
    endpoint_api_keys_file: str | None = Field(
        None,
        description="The API keys file on the operator's machine (relative paths: from the inventory "
        "file's directory): one `NAME <sha256 hex of the key>` per line, written by `nemotron-deploy "
        "api-key new NAME --file FILE`. It holds no secret; the deploy installs the hashes as HAProxy's "
        "map (root:haproxy 0640). Required with endpoint_auth = api-key.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_tls: Literal["self-signed", "files", "none"] = Field(
        "self-signed",
        description="TLS on the endpoint's port. self-signed: the deploy makes a key pair once on the "
        "login node (the key never leaves it) and leaves the certificate at "
        "/etc/haproxy/nemotron-endpoint.crt for clients to verify against; files: your certificate "
        "and key (endpoint_tls_cert, endpoint_tls_key); none: plain HTTP (API keys cross the network "
        "in clear: only where TLS ends in front of the login node, or on a trusted network).",
        json_schema_extra=ENDPOINT,
    )
    endpoint_tls_cert: AbsPath | None = Field(
        None,
        description="With endpoint_tls = files: the certificate (PEM, chain after it) on the login node.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_tls_key: AbsPath | None = Field(
        None,
        description="With endpoint_tls = files: its private key (PEM) on the login node; keep it 0600.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_bind: list[Annotated[str, AfterValidator(_bind_address)]] = Field(
        ["0.0.0.0"],
        min_length=1,
        description="The login node's addresses the endpoint listens on (IP addresses; 0.0.0.0 = every "
        "IPv4 address, :: = every IPv6 one). Narrow it to the cluster network's address.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_metrics_allow: list[Annotated[str, AfterValidator(_cidr)]] = Field(
        ["127.0.0.1/32", "::1/128"],
        description="Client networks (CIDRs) that may read GET /metrics (HAProxy's Prometheus exporter) "
        "without an API key; any other client needs a valid key. Add your Prometheus server's address.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_max_inflight_per_key: int | None = Field(
        None,
        ge=1,
        description="Requests one API key may have in the endpoint at once, running or queued (a count); "
        "beyond it 429 with Retry-After. Default: the replica count (one key may keep every replica busy "
        "but never queue ahead of another key). Set replicas - 1 to always keep one replica for others.",
        json_schema_extra=ENDPOINT,
    )
    endpoint_openai: bool = Field(
        True,
        description="Serve the OpenAI-compatible API on the endpoint's port too (GET /v1/models, POST "
        "/v1/completions, POST /v1/chat/completions for a model with a chat template), behind the same "
        "keys, TLS and limits: HAProxy answers /v1/models, and each replica's front translates a request "
        "to one PUT /generate (with the checkpoint's tokenizer, in the job's container). false: PUT "
        "/generate only.",
        json_schema_extra=ENDPOINT,
    )
    tokenizer_file: AbsPath | None = Field(
        None,
        description="The checkpoint's SentencePiece tokenizer as the compute nodes see it (each replica's "
        "front counts the OpenAI API's usage with it and decodes token-id prompts; outside model_dir it is "
        "mounted into the job's container read-only). Default: <model_dir>/<the catalog's tokenizer_file "
        "for the model>.",
        json_schema_extra=ENDPOINT,
    )

    # --- scheduled health check (login node)
    health_user: Annotated[
        str, account_name("the health check", "nemotron-health"), AfterValidator(_health_user)
    ] = Field(
        "nemotron-health",
        description="The unprivileged user the scheduled health check runs as; the deploy creates it "
        "(marked 'nemotron-deploy health check' in its GECOS field) and refuses an existing account it "
        "did not create. A plain POSIX user name; change it only to follow a site naming rule; never "
        "root, ALL or a system account.",
        json_schema_extra=HEALTH,
    )
    health_user_existing: bool = Field(
        False,
        description="Let the deploy use a health_user account that already exists and that it did not "
        "create (it then gets the state directories, the sudo rule and the endpoint socket's group). "
        "Set it only for an account made for this check alone, never for a system account (slurm, "
        "munge, nobody).",
        json_schema_extra=HEALTH,
    )
    health_venv: Annotated[AbsPath, AfterValidator(_health_venv), AfterValidator(_not_world_writable)] = (
        Field(
            "/opt/nemotron-deploy/health-venv",
            description="The venv the deploy creates and owns, with its parent directory, on the login node "
            "for the health check. Change it if your site installs software elsewhere.",
            json_schema_extra=HEALTH,
        )
    )
    health_interval_seconds: int = Field(
        60,
        ge=10,
        description="How often the scheduled health check runs (seconds). Raise it to load the server "
        "less; lower it for faster alerts.",
        json_schema_extra=HEALTH,
    )
    prometheus_textfile_dir: Annotated[
        AbsPath,
        _owned_dir(
            "/var/lib/prometheus/node-exporter", "creates it, owner root, group the health user, mode 775"
        ),
    ] = Field(
        "/var/lib/prometheus/node-exporter",
        description="node_exporter's textfile-collector directory on the login node, where the check "
        "writes nemotron.prom; the deploy creates and owns it. Set it to your node_exporter's "
        "--collector.textfile.directory.",
        json_schema_extra=HEALTH,
    )
    prometheus_rules_dir: AbsPath | None = Field(
        None,
        description="Where Prometheus loads rule files on the login node (e.g. /etc/prometheus/rules.d, "
        "matched by a rule_files entry of prometheus.yml): the deploy installs nemotron.rules.yml, the "
        "alerts for these replicas and this health check, there (0644; the directory created if absent, "
        "never re-owned). Default: none, not installed.",
        json_schema_extra=HEALTH,
    )
    health_startup_budget_seconds: int = Field(
        2700,
        ge=60,
        description="How long the job and submit wait for a new server to generate (seconds); loading "
        "340B parameters takes long. Raise it for slow storage.",
        json_schema_extra=HEALTH,
    )

    # --- keeping the service up (login node): the scheduled check replaces dead replicas
    state: Literal["running", "stopped"] = Field(
        "running",
        description="running: the replicas should run (the check replaces dead ones); stopped: the "
        "deploy cancels every replica and the check replaces none. The one way to stop the service: "
        "set it in group_data (or pass --data state=stopped on every deploy).",
        json_schema_extra=KEEP_UP,
    )
    restart_policy: Literal["always", "never"] | None = Field(
        None,
        description="always: the scheduled check submits a replica again when its job is gone or its "
        "server failed the check for unhealthy_restart_after_seconds; never: it only reports. "
        "Default: always in serve mode, never in smoke mode.",
        json_schema_extra=KEEP_UP,
    )
    unhealthy_restart_after_seconds: int = Field(
        600,
        ge=60,
        description="How long a running replica's server may fail the check before it is replaced "
        "(seconds; never within its start-up budget). Raise it if replicas recover on their own.",
        json_schema_extra=KEEP_UP,
    )
    restart_backoff_max_seconds: int = Field(
        1800,
        ge=60,
        description="The longest wait between two replacements of one replica (seconds): the first is at "
        "once, then the wait doubles from the check's interval up to this.",
        json_schema_extra=KEEP_UP,
    )
    max_restarts_per_day: int = Field(
        10,
        ge=1,
        description="Replacements of one replica in 24 hours after which the check stops replacing it and "
        "reports CRITICAL restart_capped (a replica that dies again and again needs a person).",
        json_schema_extra=KEEP_UP,
    )

    # --- deploy switches (`--data skip_preflight=true`, `--data submit=true`)
    skip_preflight: bool = Field(
        False,
        description="Skip the node checks (GPUs, driver, runtimes, model, free space) before deploying. "
        "For one run only (`--data skip_preflight=true`), when you know a check is wrong.",
        json_schema_extra=SWITCHES,
    )
    submit: bool = Field(
        False,
        description="After deploying, submit the job (unless it is queued) and wait until it "
        "generates. For one run (`--data submit=true`); by default the deploy only installs.",
        json_schema_extra=SWITCHES,
    )

    rollout: bool = Field(
        False,
        description="Replace the replicas that run an earlier deploy's files, one at a time (new job, "
        "wait until it generates, swap it in the endpoint, drain and cancel the old). For one run "
        "(`--data rollout=true`); without it the deploy only says which replicas are stale.",
        json_schema_extra=SWITCHES,
    )

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
        if self.endpoint_tls == "files" and not (self.endpoint_tls_cert and self.endpoint_tls_key):
            raise ValueError(
                "endpoint_tls = files needs endpoint_tls_cert and endpoint_tls_key (paths on the login "
                "node); set both, or use endpoint_tls = self-signed"
            )
        if self.endpoint_tls != "files" and (self.endpoint_tls_cert or self.endpoint_tls_key):
            raise ValueError(
                f"endpoint_tls_cert / endpoint_tls_key are set but endpoint_tls = {self.endpoint_tls}, "
                "which does not use them: set endpoint_tls = files, or remove them"
            )
        if self.service_user == self.health_user:
            raise ValueError(
                f"service_user and health_user are both {self.service_user!r}: the check (which also "
                "holds the endpoint's runtime socket) would then write the job records it trusts; use "
                "two accounts (defaults: service_user = nemotron, health_user = nemotron-health)"
            )
        if not self.registry_tls_verify and self.registry_login is True:
            raise ValueError(_UNVERIFIED_LOGIN.format(why="registry_login = true", registry=self.registry))
        if not self.registry_tls_verify and self.ngc_api_key_file and self.logs_in_to_registry:
            raise ValueError(
                _UNVERIFIED_LOGIN.format(
                    why=f"ngc_api_key_file is set (the key goes to {self.registry})", registry=self.registry
                )
            )
        if self.submit and self.state == "stopped":
            raise ValueError(
                "submit=true with state=stopped: a stopped service submits nothing; start it with "
                "--data state=running --data submit=true (and remove state = 'stopped' from group_data)"
            )
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
    def registry(self) -> str:
        """The registry the image comes from (`nvcr.io` for `nvcr.io#nvidia/nemo:tag`)."""
        return image_registry(self.image)

    @property
    def logs_in_to_registry(self) -> bool:
        """The deploy sends the NGC key to the image's registry (when it has one): registry_login, by
        default only for nvcr.io."""
        return self.registry_login if self.registry_login is not None else self.registry == NGC_REGISTRY

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
        """The jobs' output (NeMo logs every request's prompts): readable by the submitting account only."""
        return f"{self.deploy_dir}/logs"

    @property
    def records_dir(self) -> str:
        """Where each replica's batch script records its job id and first node: writable only by the
        account that submits the jobs (the checks trust no record another account could write)."""
        return f"{self.deploy_dir}/records"

    @property
    def replica_key_file(self) -> str:
        """The replica key where the jobs read it (shared storage): each replica's front forwards only
        requests that carry it. Made once by the deploy, readable by the submitting account alone."""
        return f"{self.deploy_dir}/replica.key"

    @property
    def replaces_replicas(self) -> bool:
        """The scheduled check replaces dead replicas: restart_policy, by default on in serve mode."""
        policy = self.restart_policy or ("always" if self.mode == "serve" else "never")
        return policy == "always" and self.state == "running"

    def replica_job(self, index: int) -> str:
        """The Slurm job name of replica `index` (1-based): <job_name>-r<index>."""
        return slurm.replica_job_name(self.job_name, index)

    def job_record(self, index: int) -> str:
        """Where replica `index`'s batch script records its job id and first node, for checks that
        squeue hides the job from (Slurm's PrivateData=jobs)."""
        return slurm.record_path(self.records_dir, self.replica_job(index))

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


_VALIDATOR_TYPES = {
    _safe_value: "str",
    _safe_name: "name",
    _absolute_path: "path",
    _env_name: "env var name",
    _slurm_time: "Slurm time",
    _sbatch_option: "sbatch option",
    _driver_version: "version",
}


def _type_name(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """A reader's name for a field's type: `int (> 0) | None`, `path`, `'serve' | 'smoke'`."""
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        metadata = [*extra, *metadata]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a, metadata) for a in args if a is not type(None)) + (
            " | None" if type(None) in args else ""
        )
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    name = getattr(annotation, "__name__", str(annotation))
    bounds = {}
    for item in metadata:
        func = getattr(item, "func", None)
        if func in _VALIDATOR_TYPES:
            name = _VALIDATOR_TYPES[func]
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(item, attr, None) is not None:
                bounds[sign] = getattr(item, attr)
    if ">=" in bounds and "<=" in bounds:
        return f"{name} ({bounds['>=']}..{bounds['<=']})"
    if bounds:
        return f"{name} ({', '.join(f'{sign} {value}' for sign, value in bounds.items())})"
    return name


def reference() -> list[dict[str, Any]]:
    """Every setting in the model's order: name, group, type, default, required, description."""
    rows = []
    for name, info in ClusterSettings.model_fields.items():
        required = info.is_required()
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        rows.append(
            {
                "name": name,
                "group": extra.get("group"),
                "type": _type_name(info.annotation, info.metadata),
                "default": None if required else info.get_default(call_default_factory=True),
                "required": required,
                "description": info.description,
            }
        )
    return rows


NGC_REGISTRY = "nvcr.io"

# The key is a password: over a connection whose certificate nobody checks, whoever answers for the
# registry's address (a spoofed name, an ARP neighbour, a plain-HTTP listener) receives it.
_UNVERIFIED_LOGIN = (
    "{why} with registry_tls_verify = false: the deploy would send the NGC key to {registry} without "
    "verifying its TLS certificate, to whoever answers there. Either verify TLS (give the compute "
    "nodes the registry's CA: /etc/docker/certs.d/{registry}/ca.crt, /etc/containers/certs.d/"
    "{registry}/ca.crt, the system CA bundle for enroot; then remove registry_tls_verify = false), "
    "or send no key to this registry (registry_login = false, and unset ngc_api_key_file and the "
    "key's environment variable)"
)


def image_registry(image: str) -> str:
    """`nvcr.io` from `nvcr.io#nvidia/nemo:tag` or `nvcr.io/nvidia/nemo:tag` (Docker Hub without one)."""
    first = image.replace("#", "/", 1).split("/", 1)[0]
    return first if ("." in first or ":" in first or first == "localhost") else "docker.io"


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
