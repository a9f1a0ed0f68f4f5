"""Reading a host (one SSH command) and checking it before any change: the deploy's preflight.

`preflight.py` checks GPUs from nvidia-smi output (also on its own, on a node); this module asks
every other question the deploy has of a host and turns the answers into one error per host.
"""

from __future__ import annotations

from typing import Any

from ..catalog import ModelSpec
from ..inventory import Cluster
from ..service.preflight import check_gpus
from . import desired, endpoint, openai_config, render, replica_key, rootless
from .errors import DeployError
from .facts.disk import FreeSpace
from .facts.files import ManagedPaths, NodeState, PathChains, ancestors
from .facts.gpus import NvidiaGpus
from .facts.haproxy import Haproxy
from .facts.images import ImagePresent, RootlessPodman
from .facts.model import ModelConfig
from .facts.runtimes import ContainerRuntimes
from .facts.slurm import AccountJobs, JobRecords, ReplicaJobs, SlurmVersion, SubmitContext
from .facts.snapshot import snapshot
from .facts.system import InitSystem, UnitEnabled, UserExists
from .operations import gateway_retired
from .operations.health_timer import STATE_DIR, UNIT, USER_MARK

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
    probes: list[tuple[str, type, tuple]] = [
        ("runtimes", ContainerRuntimes, ()),
        ("service_user", UserExists, (s.service_user,)),
    ]
    if role == "compute":
        probes += [("gpus", NvidiaGpus, ()), ("model", ModelConfig, (s.model_dir,))]
        if rootless.account(s):  # the image goes into the service account's own storage
            probes.append(("rootless", RootlessPodman, (s.service_user, s.image)))
        elif s.container_runtime in ("docker", "podman") or s.pull_runtime in ("docker", "podman"):
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
        # Replicas above `replicas` (a scale-down) are this account's jobs of higher index: read them all.
        probes.append(("account_jobs", AccountJobs, (s.service_user,)))
        if s.state == "stopped":
            names = ",".join(s.replica_job(i) for i in range(1, cluster.plan.replicas + 1))
            probes.append(("replica_jobs", ReplicaJobs, (names, s.service_user)))
        if s.image_file:
            probes.append(("free", FreeSpace, (s.images_dir,)))
    probes.append(("paths", ManagedPaths, paths_to_read(cluster, host.name)))
    probes.append(("chains", PathChains, (tuple(d.path for d in guarded_dirs(cluster, host.name)),)))
    snap = snapshot(host, tuple(probes))
    if "rootless" in snap:  # the same answers as root's image and free-space probes give
        store = snap["rootless"] or {}
        snap["image"], snap["free"] = store.get("present", False), store.get("free")
    return snap


def guarded_dirs(cluster: Cluster, host_name: str) -> list[desired.WantedDir]:
    """The directories this host's deploy makes, or runs what it placed from, that no other account
    may own or control: every guarded one of desired.for_host, the health venv itself, and the
    scratch of the one host that imports the image."""
    s = cluster.settings
    dirs = [d for d in desired.for_host(cluster, host_name).dirs if d.guarded]
    if desired.role(cluster, host_name) == "login":
        dirs.append(desired.WantedDir(s.health_venv, "755", guarded=True))
    elif s.image_file and host_name == cluster.compute[0]:
        dirs.append(desired.WantedDir(s.enroot_tmp_dir or f"{s.deploy_dir}/.import-tmp", "755", guarded=True))
    return dirs


def _setting_of(cluster: Cluster, path: str) -> str:
    """The setting that chose `path`, for the fix in a refusal."""
    s = cluster.settings
    for setting, base in (
        ("enroot_tmp_dir", s.enroot_tmp_dir),
        ("health_venv", s.health_venv),
        ("node_dir", s.node_dir),
        ("shared_dir", s.shared_dir),
    ):
        if base and (path == base or path.startswith(base + "/") or base.startswith(path + "/")):
            return f"choose another {setting}"
    return "fix its owner and mode (the deploy's own fixed path)"


def _describe(st: NodeState) -> str:
    return f"{st.kind}, owner {st.user}, mode {st.mode:o}"


def directory_problems(cluster: Cluster, snap: dict[str, Any], dirs: list[desired.WantedDir]) -> list[str]:
    """Refusals, before any change, of a directory the deploy would adopt, or a parent it would go
    through, that another account controls (a link, another owner, writable by others): such an
    account would own what root then writes and runs there. The rules:

    - a managed directory: not a link; owned by root or its intended owner; not writable by group or
      others unless that is its intended mode (or a mode an earlier release gave it);
    - each parent up to /: a link only if root's; owned by root or the deploying user; writable by
      others only if sticky (/tmp, a 1777 scratch) and the entry below it on the way is ours.
    """
    chains = snap.get("chains") or PathChains.default()
    states: dict[str, NodeState] = chains["paths"]
    me = chains.get("user") or "root"
    managed = {d.path for d in dirs}
    problems: list[str] = []
    seen: set[str] = set()
    for d in dirs:
        fix = _setting_of(cluster, d.path)
        st = states.get(d.path)
        if st is not None:
            owners = {"root", d.user}
            why = None
            if st.kind == "link":
                why = "is a symbolic link"
            elif st.kind != "directory":
                why = "is not a directory"
            elif st.user not in owners and not (st.user == "UNKNOWN" and d.user != "root" and d.adopt):
                # (An owner with no account left, for a directory the deploy re-owns to an account it
                # manages: what a removed health user leaves behind; no account can act as it.)
                why = f"is owned by {st.user}, not {' or '.join(sorted(owners))}"
            elif st.mode & 0o022 and f"{st.mode:o}" not in (d.mode, *d.legacy_modes):
                why = "is writable by other accounts"
            if why:
                problems.append(
                    f"{d.path} ({_describe(st)}) {why}: the deploy would adopt it and write there as root; "
                    f"remove it, or {fix}"
                )
        below = d.path
        for parent in ancestors(d.path):
            child, below = below, parent
            if parent in managed or parent in seen:
                continue
            pst = states.get(parent)
            if pst is None:
                continue
            seen.add(parent)
            why = None
            if pst.kind == "link":
                if pst.user != "root":
                    why = f"is a symbolic link owned by {pst.user}"
            elif pst.user not in ("root", me):
                why = f"is owned by {pst.user}, not root or {me} (the deploying user)"
            elif pst.mode & 0o002:
                cst = states.get(child)
                ours = {"root", me} | ({d.user} if child == d.path else set())
                if not pst.mode & 0o1000:
                    why = "is writable by every account and not sticky"
                elif cst is not None and (cst.kind == "link" or cst.user not in ours):
                    seen.discard(parent)  # another entry below it may be ours
                    problems.append(
                        f"{child} ({_describe(cst)}) is in {parent} ({_describe(pst)}), which every "
                        f"account may write, and is not the deploy's (root's or {d.user}'s): it could "
                        f"take over what root writes and runs below it; remove it, or {fix}"
                    )
                    break
            if why:
                problems.append(
                    f"{d.path}: its parent {parent} ({_describe(pst)}) {why}, so another account controls "
                    f"what the deploy makes below it; {fix}"
                )
                break
    return problems


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
        # Its presence only: it lives in a directory the health user can write, so root never reads it.
        unhashed += (desired.earlier_started_file(),)
        # An earlier release's OpenAI gateway, to retire: its unit or init script.
        unhashed += gateway_retired.FOUND_BY
        # TLS files: their presence only (never a private key's bytes, not even hashed).
        # (With endpoint_tls = files the deploy's paths are links, read with the other paths.)
        tls = {
            "self-signed": [desired.tls_cert_path(), desired.tls_key_path()],
            "files": [s.endpoint_tls_cert, s.endpoint_tls_key],
        }.get(s.endpoint_tls, [])
        unhashed = (*unhashed, *(p for p in tls if p))
        # The replica key's copies: stat only, never their bytes (not even hashed).
        unhashed = (*unhashed, *replica_key.paths(cluster))
    else:
        if s.container_runtime == "host":
            paths.append(s.eval_script)
        if openai_config.enabled(cluster):
            # The tokenizer the replica's front loads: its presence only (the checkpoint's file).
            unhashed += (openai_config.tokenizer_path(cluster),)
    return tuple(dict.fromkeys(paths)), unhashed


def trusted_records(cluster: Cluster, snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{path: record} of the login node's job records that pass the check's own test: a regular file
    of the submitting account (or root) that no one else may write, naming one of the inventory's
    compute nodes. The deploy (root) acts on no other: it cancels the jobs records name."""
    owners = {"root", desired.records_owner(desired.Login.of(cluster, snap))[0]}
    allowed = set(desired.nodes_text(cluster).split())
    trusted = {}
    for path, rec in (snap.get("records") or {}).items():
        try:
            private = not int(str(rec.get("_mode")), 8) & 0o022
        except ValueError:
            private = False
        if rec.get("_owner") in owners and private and str(rec.get("node")) in allowed:
            trusted[path] = rec
    return trusted


def health_user_problems(cluster: Cluster, snap: dict[str, Any]) -> list[str]:
    """An existing health_user the deploy did not create is refused (unless health_user_existing):
    it would get the state directories, the sudo rule and the endpoint socket's group. The deploy's
    own: marked in its GECOS field, or (made by an earlier release, unmarked) owning the check's state
    directory."""
    s = cluster.settings
    account = snap.get("health_user")
    if account is None or s.health_user_existing or account.get("gecos") == USER_MARK:
        return []
    state = snap["paths"].get(STATE_DIR)
    if state is not None and state.kind == "directory" and state.user == s.health_user:
        return []  # an earlier release's (it is marked now)
    return [
        f"health_user {s.health_user} already exists (uid {account.get('uid')}, GECOS "
        f"{account.get('gecos')!r}) and the deploy did not create it: it would get the check's state "
        "directories, the sudo rule that submits and cancels the replicas, and the endpoint socket's "
        "group; choose another health_user (the deploy creates it), or set health_user_existing = true "
        "if that account is meant for this check alone"
    ]


# service_user's UID on each host read so far in this run ({id(cluster): {host: uid or None}}): Slurm
# runs a job with the UID it was submitted with, so the account must be the same one everywhere.
_service_uids: dict[int, dict[str, str | None]] = {}


def service_user_problems(cluster: Cluster, host_name: str, snap: dict[str, Any]) -> list[str]:
    """service_user's UID here against the hosts read before this one (the later host of a pair names
    the difference). Missing on the login node is fine: the deploy creates it there."""
    name = cluster.settings.service_user
    account = snap.get("service_user")
    uid = account.get("uid") if account else None
    seen = _service_uids.setdefault(id(cluster), {})
    earlier = {h: u for h, u in seen.items() if h != host_name and u is not None}
    seen[host_name] = uid
    if uid is None:
        return []  # the login node: created there; a compute node: compute_problems says so
    differ = sorted(f"{u} on {h}" for h, u in earlier.items() if u != uid)
    if not differ:
        return []
    return [
        f"service_user {name} has UID {uid} here but {', '.join(differ[:5])}"
        + (f" (and {len(differ) - 5} more)" if len(differ) > 5 else "")
        + ": Slurm runs each replica with the UID it was submitted with, which would be another account "
        f"here; make {name} one account on every node (your directory service, or the same useradd "
        "--uid everywhere), or set service_user to an account the nodes share"
    ]


def tokenizer_problems(cluster: Cluster, snap: dict[str, Any]) -> list[str]:
    """The OpenAI routes need the checkpoint's tokenizer where the job's container sees it."""
    if not openai_config.enabled(cluster):
        return []
    tokenizer = openai_config.tokenizer_path(cluster)
    if snap["paths"].get(tokenizer) is None:
        return [
            f"the checkpoint's tokenizer {tokenizer} is not on this node: each replica's front counts the "
            "OpenAI API's usage with it; point model_dir at the whole checkpoint, set tokenizer_file to "
            "where the nodes see it, or set endpoint_openai = false"
        ]
    return []


def check_host(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Stop the deploy, before any change, if this host can't run the job as planned."""
    s = cluster.settings
    role = desired.role(cluster, host.name)
    # Not skipped by skip_preflight: these keep other accounts from owning what root writes and runs.
    unsafe = directory_problems(cluster, snap, guarded_dirs(cluster, host.name))
    unsafe += service_user_problems(cluster, host.name, snap)
    if role == "login":
        unsafe += health_user_problems(cluster, snap)
    if unsafe:
        raise DeployError(
            f"refused on {host.name} ({role}): another account could control what the deploy would run "
            "as root; nothing was changed on any host:\n  - " + "\n  - ".join(unsafe)
        )
    if s.skip_preflight:
        return
    problems = (
        login_problems(cluster, snap)
        if role == "login"
        else compute_problems(cluster, snap) + tokenizer_problems(cluster, snap)
    )
    free = snap.get("free")
    if free is not None and free < s.min_free_gib and not image_present(cluster, snap):
        store = (snap.get("rootless") or {}).get("graph_root")
        where = f" ({store}, {s.service_user}'s podman storage)" if store else ""
        problems.append(
            f"only {free} GiB free where the image goes{where}; need {s.min_free_gib} GiB (min_free_gib)"
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
    account = snap.get("service_user")
    s = cluster.settings
    if s.container_runtime == "docker" and account and "docker" not in account.get("groups", []):
        problems.append(
            f"service_user {s.service_user} is not in the docker group on this login node: Slurm gives a "
            "job the groups its controller sees, so the job's `docker run` would be refused on every "
            f"node; add it here as on the compute nodes (usermod -aG docker {s.service_user})"
        )
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
    account = snap.get("service_user")
    if account is None:
        problems.append(
            f"service_user {s.service_user} does not exist here: every replica's job runs as it on the "
            "compute nodes; create it with the UID it has on the login node (your directory service, or "
            "useradd --uid), or set service_user to an account the nodes share"
        )
    elif s.container_runtime == "docker" and "docker" not in account.get("groups", []):
        problems.append(
            f"service_user {s.service_user} is not in the docker group here, and the job's `docker run` "
            f"runs as it: add it (usermod -aG docker {s.service_user}; note that the docker group can "
            "act as root on this node), or use container_runtime = pyxis, podman or apptainer"
        )
    if account is not None and rootless.account(s):
        problems += rootless_problems(cluster, snap.get("rootless"), account)
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


def rootless_problems(cluster: Cluster, store: dict | None, account: dict) -> list[str]:
    """What the service account's rootless podman lacks here (the job's `podman run` runs as it)."""
    s = cluster.settings
    user, uid = s.service_user, account.get("uid")
    store = store or {}
    problems = []
    missing = [f"/etc/sub{kind}id" for kind in ("u", "g") if not store.get(f"sub{kind}id")]
    if missing:
        problems.append(
            f"service_user {user} has no subordinate ID range in {' nor '.join(missing)} here, and the "
            "job's podman runs rootless as it (its container's users map into that range): add one, "
            f"the same on every node (usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}, "
            "or your directory service's subid ranges)"
        )
    found = store.get("runtime_dir")
    if found != f"{user} 700":
        what = f"is {found.replace(' ', ', mode ')} (owner, mode)" if found else "does not exist"
        problems.append(
            f"/run/user/{uid}, the runtime dir of {user}'s rootless podman (its run root and lock files, "
            f"shared by the deploy's pull and the job's run), {what} here: `loginctl enable-linger {user}` "
            "makes it, owned by the account and 0700, at every boot"
        )
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
