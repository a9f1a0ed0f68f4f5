"""Where everything of the sandbox lives: names, addresses, paths, and the dataclasses describing it.

One sandbox per machine: the bridge, subnet and state dir are fixed so that every tool (tests, the
inventory file, the CLI, a second `up`) finds the same cluster without being told where it is.
The subnet 10.213.0.0/24 is private and unusual enough not to collide with a site network.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_DIR = Path("/var/lib/nemotron-sandbox")
SHARED_DIR = STATE_DIR / "shared"  # the cluster's "shared filesystem": same path on every node
STATE_FILE = STATE_DIR / "state.json"
# The endpoint's API keys for the sandbox inventory (group_data/sandbox.py): `up` makes the file with
# one key, "rehearsal", whose key it keeps beside it (root, 0600) for scripts/rehearse and the tests.
ENDPOINT_DIR = STATE_DIR / "endpoint"
API_KEYS_FILE = ENDPOINT_DIR / "api-keys"
REHEARSAL_KEY_NAME = "rehearsal"
REHEARSAL_KEY_FILE = ENDPOINT_DIR / "rehearsal.key"

BRIDGE = "nsbr0"
SUBNET_PREFIX = "10.213.0"
PREFIX_LEN = 24
BRIDGE_ADDRESS = f"{SUBNET_PREFIX}.1"
LOGIN_NAME = "sb-login"
LOGIN_ADDRESS = f"{SUBNET_PREFIX}.2"
COMPUTE_BASE_OCTET = 10  # compute node i (1-based) is 10.213.0.(10+i)
MAX_COMPUTE_NODES = 128  # 10.213.0.11 .. 10.213.0.138
NETNS_PREFIX = "nsb-"  # network namespace and host-side veth are both named nsb-<short name>

REGISTRY_PORT = 5000
IMAGE_PATH = "nvidia/nemo:24.01.framework"
PARTITION = "gpu"
UNPRIVILEGED_USER = "nemotron"

MODEL_NAME = "Nemotron-4-340B-Base"
# Paths as seen INSIDE the nodes (node-local unless under SHARED_DIR).
NODE_SANDBOX_DIR = "/opt/nemotron-sandbox"  # per-node sandbox files: fake devices, nvidia-smi config
NODE_DEV_DIR = f"{NODE_SANDBOX_DIR}/dev"
NODE_GPU_FAULTS = f"{NODE_SANDBOX_DIR}/gpu-faults.json"
NODE_NVIDIA_SMI_CONFIG = f"{NODE_SANDBOX_DIR}/nvidia-smi.json"
NODE_NEMO_DIR = "/opt/NeMo"
NODE_EMULATOR_PATH = f"{NODE_NEMO_DIR}/examples/nlp/language_modeling/megatron_gpt_eval.py"


def compute_name(index: int) -> str:
    """Host name (and Slurm NodeName) of compute node `index` (1-based): sb-node01, sb-node02, ..."""
    return f"sb-node{index:02d}"


def compute_address(index: int) -> str:
    return f"{SUBNET_PREFIX}.{COMPUTE_BASE_OCTET + index}"


def netns_name(hostname: str) -> str:
    """`sb-node01` -> `nsb-node01` (also the host-side veth name: at most 15 characters)."""
    return NETNS_PREFIX + hostname.removeprefix("sb-")


@dataclass(frozen=True)
class Node:
    """One namespaced host. `local_dir` is on the real host; it backs the node's private paths."""

    name: str
    address: str
    role: str  # "login" or "compute"
    netns: str
    local_dir: Path

    @property
    def veth(self) -> str:
        return self.netns


@dataclass(frozen=True)
class Sandbox:
    """A running (or planned) sandbox cluster. Everything a test or a deploy needs to reach it."""

    login: Node
    compute: tuple[Node, ...]
    gpus_per_node: int
    state_dir: Path = STATE_DIR
    shared_dir: Path = SHARED_DIR
    ssh_key: Path = STATE_DIR / "ssh" / "id_ed25519"
    known_hosts: Path = STATE_DIR / "ssh" / "known_hosts"
    registry: str = f"{LOGIN_ADDRESS}:{REGISTRY_PORT}"
    image: str = f"{LOGIN_ADDRESS}:{REGISTRY_PORT}/{IMAGE_PATH}"
    registry_access_log: Path = STATE_DIR / "registry" / "access.log"
    slurm_conf_dir: Path = STATE_DIR / "slurm"  # bind-mounted read-only at /etc/slurm in every node
    model_dir: Path = SHARED_DIR / "models" / MODEL_NAME
    partition: str = PARTITION
    user: str = "root"
    unprivileged_user: str = UNPRIVILEGED_USER
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.login, *self.compute)

    @property
    def login_host(self) -> str:
        return self.login.name

    @property
    def login_address(self) -> str:
        return self.login.address

    @property
    def compute_names(self) -> list[str]:
        return [n.name for n in self.compute]

    @property
    def compute_addresses(self) -> list[str]:
        return [n.address for n in self.compute]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if name in (n.name, n.address):
                return n
        raise KeyError(f"no sandbox node {name!r}; nodes are {[n.name for n in self.nodes]}")

    def ssh_argv(self, node: str, *command: str) -> list[str]:
        """An `ssh` command line reaching `node` (name or address) as root with the sandbox key."""
        return [
            "ssh",
            "-i",
            str(self.ssh_key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            f"{self.user}@{self.node(node).address}",
            *command,
        ]

    def to_json(self) -> dict:
        data = asdict(self)
        data["nodes"] = [asdict(n) for n in self.nodes]
        return json.loads(json.dumps(data, default=str))

    @classmethod
    def from_json(cls, data: dict) -> Sandbox:
        def node(d: dict) -> Node:
            return Node(d["name"], d["address"], d["role"], d["netns"], Path(d["local_dir"]))

        return cls(
            login=node(data["login"]),
            compute=tuple(node(d) for d in data["compute"]),
            gpus_per_node=int(data["gpus_per_node"]),
            timings=dict(data.get("timings", {})),
        )


def read_state() -> Sandbox | None:
    """The sandbox the state file describes (written by `up`), or None without one. It may not be
    running: `cluster.status()` says whether it is; the bridge's presence is the cheap hint."""
    try:
        return Sandbox.from_json(json.loads(STATE_FILE.read_text()))
    except (OSError, ValueError, KeyError):
        return None


def plan(nodes: int = 2, gpus_per_node: int = 8) -> Sandbox:
    """The sandbox layout for `nodes` compute nodes (nothing is created)."""
    if not 1 <= nodes <= MAX_COMPUTE_NODES:
        raise ValueError(f"--nodes must be between 1 and {MAX_COMPUTE_NODES}, got {nodes}")
    if not 1 <= gpus_per_node <= 16:
        raise ValueError(f"--gpus-per-node must be between 1 and 16, got {gpus_per_node}")

    def make(name: str, address: str, role: str) -> Node:
        return Node(name, address, role, netns_name(name), STATE_DIR / "nodes" / name)

    login = make(LOGIN_NAME, LOGIN_ADDRESS, "login")
    compute = tuple(make(compute_name(i), compute_address(i), "compute") for i in range(1, nodes + 1))
    return Sandbox(login=login, compute=compute, gpus_per_node=gpus_per_node)
