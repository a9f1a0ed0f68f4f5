"""What each host should have: directories, files and links, from one place so that the snapshot read
(host_checks.read_host) and the operations (deploy.ensure_files) agree on every path.

Ownership rule: the deploy sets owner and mode on directories it creates, and on existing ones only
where it owns them by name (`adopt`). Where it needs to write into a directory someone else owns
(node_exporter's textfile dir), it places a link it owns there, never changes the directory.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import gevent.lock

from ..inventory import Cluster
from ..service import alerts, slurm
from . import endpoint as endpoint_mod
from . import render, wheelhouse
from .operations import health_timer


@dataclass(frozen=True)
class WantedDir:
    path: str
    mode: str  # octal, e.g. "755"
    user: str = "root"
    group: str = "root"
    adopt: bool = False  # ours by name: fix owner and mode even if it existed before the deploy
    # Held to the shared-cluster rules before any change (host_checks.directory_problems): not a link,
    # owned by root or `user`, not writable by others, every parent safe. Off for the system's own
    # directories the deploy only creates if absent (/etc/haproxy, node_exporter's, sudoers.d).
    guarded: bool = False
    # Modes an earlier release of the deploy gave this directory (the logs' 1777): adopted and fixed.
    legacy_modes: tuple[str, ...] = ()


@dataclass(frozen=True)
class WantedFile:
    path: str
    content: str | bytes
    mode: str
    user: str = "root"
    group: str = "root"


@dataclass(frozen=True)
class WantedLink:
    path: str
    target: str


@dataclass
class HostState:
    dirs: list[WantedDir] = field(default_factory=list)
    files: list[WantedFile] = field(default_factory=list)
    links: list[WantedLink] = field(default_factory=list)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(x.path for x in [*self.dirs, *self.files, *self.links])


@dataclass(frozen=True)
class Artifacts:
    """Made once per run, not once per host: the rendered job files and the health-check wheels."""

    job_files: list[render.RenderedFile]
    wheels_digest: str
    wheels: list[tuple[str, bytes]]  # (file name, bytes), the installer's wheel among them
    installer: str  # file name of pypa's installer wheel (installs the others; not installed itself)


_artifacts: dict[str, Artifacts] = {}
_artifacts_lock = gevent.lock.BoundedSemaphore()  # pyinfra prepares hosts in greenlets: the rest wait


def artifacts(cluster: Cluster) -> Artifacts:
    with _artifacts_lock:
        if cluster.key not in _artifacts:
            digest, wheels = wheelhouse.build()
            _artifacts[cluster.key] = Artifacts(
                render.render(cluster),
                digest,
                [(w.name, w.read_bytes()) for w in wheels],
                next(w.name for w in wheels if w.name.startswith("installer-")),
            )
        return _artifacts[cluster.key]


def owned_by_name(path: str) -> bool:
    """A directory named for this project (/opt/nemotron-deploy, ...) is ours to own."""
    return "nemotron" in PurePosixPath(path).name


def role(cluster: Cluster, host_name: str) -> str:
    return "login" if host_name in cluster.login else "compute"


def wheels_dir(cluster: Cluster) -> str:
    return f"{cluster.settings.health_venv}-wheels"


def wheels_marker(cluster: Cluster) -> str:
    return f"{wheels_dir(cluster)}/installed.sha256"


def enroot_credentials(cluster: Cluster) -> str:
    """Where releases before 0.2 kept enroot's credentials between deploys (removed when found)."""
    return f"{cluster.settings.node_dir}/enroot/.credentials"


def endpoint_on(cluster: Cluster, snap: dict) -> bool:
    """The `endpoint` setting, or by default: wherever the login node can run HAProxy as a service."""
    s = cluster.settings
    if s.endpoint is not None:
        return s.endpoint
    return bool((snap.get("haproxy") or {}).get("service"))


@dataclass(frozen=True)
class Login:
    """What the login node's read says that its files depend on."""

    init: str = "systemd"  # systemd units, or a cron entry
    endpoint: bool = True
    submit_as: str = "nemotron"  # service_user: every replica's job is submitted (and replaced) as it
    submit_group: str = "nemotron"  # that account's primary group (its own, where the deploy makes it)
    slurm_bin: str = "/usr/bin"  # where sbatch and scancel are
    deploy_user: str = "root"  # who the deploy's commands run as (it becomes submit_as to submit)

    @classmethod
    def of(cls, cluster: Cluster, snap: dict) -> Login:
        ctx = snap.get("submit") or {}
        account = snap.get("service_user") or {}
        s = cluster.settings
        return cls(
            init=snap.get("init") or "cron",
            endpoint=endpoint_on(cluster, snap),
            submit_as=s.service_user,
            submit_group=account.get("group") or s.service_user,
            slurm_bin=ctx.get("slurm_bin") or "/usr/bin",
            deploy_user=ctx.get("user") or "root",
        )


def endpoint_files(cluster: Cluster) -> list[WantedFile]:
    """haproxy.cfg, the Lua envelope and the API keys' map, for the plan's replicas; the socket's group
    is the health user's, so the scheduled check can point the slots at the replicas. The map is
    readable by HAProxy's group only (root:haproxy 0640)."""
    rendered = render.render_endpoint(
        cluster,
        cluster.plan.replicas,
        slots=cluster.plan.replica_capacity,
        socket_group=cluster.settings.health_user,
    )
    return [
        WantedFile(
            f"{endpoint_mod.CONFIG_DIR}/{f.name}",
            f.content,
            f.mode,
            group=endpoint_mod.RUN_AS if f.name == endpoint_mod.KEYS_MAP_FILE else "root",
        )
        for f in rendered
    ]


def tls_cert_path() -> str:
    return f"{endpoint_mod.CONFIG_DIR}/{endpoint_mod.TLS_CERT_FILE}"


def tls_key_path() -> str:
    return f"{endpoint_mod.CONFIG_DIR}/{endpoint_mod.TLS_KEY_FILE}"


def endpoint_links(cluster: Cluster) -> list[WantedLink]:
    """endpoint_tls = files: the certificate and key where haproxy.cfg names them, as links to the
    operator's files (HAProxy reads them as root when it starts or reloads)."""
    s = cluster.settings
    if s.endpoint_tls != "files":
        return []
    assert s.endpoint_tls_cert and s.endpoint_tls_key  # settings refuse files without both
    return [WantedLink(tls_cert_path(), s.endpoint_tls_cert), WantedLink(tls_key_path(), s.endpoint_tls_key)]


def sync_command(cluster: Cluster, login: Login) -> str:
    """The scheduled check, run once now as its user: it points the endpoint's slots at the replicas."""
    argv = ["runuser", "-u", cluster.settings.health_user, "--", *health_check_command(cluster, login)]
    return " ".join(shlex.quote(a) for a in argv)


def serving_wait_command(cluster: Cluster, within: int = 60) -> str:
    """As the check's user: wait until HAProxy has every replica's slot UP (its check, a generation,
    passed), so the deploy ends with an endpoint that serves; exit 1 naming the slots that are not."""
    s = cluster.settings
    argv = [
        "runuser", "-u", s.health_user, "--",
        f"{s.health_venv}/bin/python", "-m", "nemotron_deploy.service.endpoint_sync",
        "--socket", endpoint_mod.STATS_SOCKET,
        "--within", str(within),
    ]  # fmt: skip
    for slot in endpoint_mod.slot_names(cluster.plan.replicas):
        argv += ["--wait-up", slot]
    return " ".join(shlex.quote(a) for a in argv)


# What root writes for the check on the login node lives in a directory only root writes: root never
# creates, opens or renames a file in a directory the health user (or anyone else) can write.
DEPLOY_STATE_DIR = "/var/lib/nemotron-deploy"
# The replica key for the scheduled check's probes (the health user): root's directory,
# root:<health_user> 0640 (deploy.replica_key makes it). The deploy's wait and the rollout, which run
# as the submitting account (or root), read the shared copy (settings.replica_key_file).
REPLICA_PROBE_KEY_FILE = f"{DEPLOY_STATE_DIR}/replica.key"


def started_file() -> str:
    """Written by the deploy's submit (replica job ids, time): the check replaces replicas only once
    the service was started, and counts those jobs as starting while Slurm hides them."""
    return f"{DEPLOY_STATE_DIR}/started.json"


def earlier_started_file() -> str:
    """Where releases before the layout change kept the started file: in the health user's own state
    directory, which root must no longer write into (an upgrade writes started_file() instead)."""
    return f"{health_timer.STATE_DIR}/started.json"


def lock_file() -> str:
    """The lock the scheduled check (the health user) and the rollout (root) share: made by the deploy
    in root's directory (group: the health user), opened by both without following a link."""
    return f"{DEPLOY_STATE_DIR}/check.lock"


def nodes_file(cluster: Cluster) -> str:
    """root's list of the inventory's compute nodes: a job record naming any other node is not trusted."""
    return f"{cluster.settings.jobs_dir}/compute-nodes"


def nodes_text(cluster: Cluster) -> str:
    """Each compute node's inventory name and its short form (Slurm's node names are often short)."""
    names = dict.fromkeys(n for host in cluster.compute for n in (host, host.split(".", 1)[0]))
    return "".join(f"{n}\n" for n in names)


def records_owner(login: Login) -> tuple[str, str]:
    """(user, group) of the job records directory: the account that submits the jobs (service_user),
    the one place that decides it."""
    return login.submit_as, login.submit_group


def health_check_command(cluster: Cluster, login: Login) -> list[str]:
    s = cluster.settings
    return health_timer.check_command(
        venv=s.health_venv,
        job_name=s.job_name,
        replicas=cluster.plan.replicas,
        port=s.port,
        records_dir=s.records_dir,
        job_user=records_owner(login)[0],
        nodes_file=nodes_file(cluster),
        lock_file=lock_file(),
        replica_key_file=REPLICA_PROBE_KEY_FILE,
        endpoint_socket=endpoint_mod.STATS_SOCKET if login.endpoint else None,
        replacement=health_timer.Replacement(
            sbatch=f"{s.jobs_dir}/nemotron.sbatch",
            submit_as=login.submit_as,
            slurm_bin=login.slurm_bin,
            started_file=started_file(),
            unhealthy_after=s.unhealthy_restart_after_seconds,
            backoff_max=s.restart_backoff_max_seconds,
            max_per_day=s.max_restarts_per_day,
            startup_budget=s.health_startup_budget_seconds,
        )
        if s.replaces_replicas
        else None,
        stopped=s.state == "stopped",
    )


def health_units(cluster: Cluster, login: Login) -> dict[str, str]:
    s = cluster.settings
    command = health_check_command(cluster, login)
    if login.init == "systemd":
        return health_timer.systemd_units(
            user=s.health_user, command=command, interval=s.health_interval_seconds, job_name=s.job_name
        )
    return health_timer.cron_entry(user=s.health_user, command=command, interval=s.health_interval_seconds)


def sudoers(cluster: Cluster, login: Login) -> str | None:
    """The one sudo rule the check needs to replace replicas as the deploy's user: exactly scancel and
    sbatch of each replica's job name (no wildcard). None when not needed (no replacement, or the check
    already runs as that user)."""
    s = cluster.settings
    if not s.replaces_replicas:
        return None
    sbatch = f"{s.jobs_dir}/nemotron.sbatch"
    lines = []
    for i in range(1, cluster.plan.replicas + 1):
        name = s.replica_job(i)
        lines.append(f"{login.slurm_bin}/scancel --user={login.submit_as} --name={name}")
        lines.append(f"{login.slurm_bin}/sbatch --parsable --job-name={name} {sbatch}")
    commands = ", \\\n    ".join(lines)
    return (
        "# Installed by nemotron-deploy: the scheduled health check may replace the service's replica\n"
        f"# jobs ({s.job_name}-r1..r{cluster.plan.replicas}) as {login.submit_as} (service_user), the account they run as; nothing else.\n"
        f"Cmnd_Alias NEMOTRON_REPLICAS = \\\n    {commands}\n"
        f"{s.health_user} ALL=({login.submit_as}) NOPASSWD: NEMOTRON_REPLICAS\n"
    )


SUDOERS_FILE = "/etc/sudoers.d/nemotron-health"


def files_digest(cluster: Cluster) -> str:
    """The digest the rendered sbatch names (of every job file this deploy installs)."""
    sbatch = next(f for f in artifacts(cluster).job_files if f.name == "nemotron.sbatch")
    digest = slurm.files_digest_in(str(sbatch.content))
    if digest is None:
        raise RuntimeError(
            "the rendered sbatch names no FILES_DIGEST (nemotron_deploy/deploy/templates/nemotron.sbatch.j2)"
        )
    return digest


def rollout_command(cluster: Cluster, login: Login) -> str:
    s = cluster.settings
    argv = [
        f"{s.health_venv}/bin/python", "-m", "nemotron_deploy.service.rollout",
        "--slurm-job", s.job_name,
        "--replicas", str(cluster.plan.replicas),
        "--sbatch", f"{s.jobs_dir}/nemotron.sbatch",
        "--records-dir", s.records_dir,
        "--nodes-file", nodes_file(cluster),
        "--port", str(s.port),
        "--slurm-bin", login.slurm_bin,
        "--budget", str(s.health_startup_budget_seconds),
        "--drain-timeout", str(s.max_generation_seconds + 30),
        "--lock", lock_file(),
        "--submit-as", login.submit_as,
        # The shared copy: the submitting account's (or root's), like the rollout's own submits.
        "--replica-key-file", s.replica_key_file,
    ]  # fmt: skip
    if login.endpoint:
        argv += ["--endpoint-socket", endpoint_mod.STATS_SOCKET]
    # Surge or drain-and-replace is Slurm's to say at each replica (idle nodes in the partition), not
    # the plan's: the partition may be shared with other work.
    argv += [
        "--nodes-per-replica",
        str(cluster.plan.nodes),
        "--gpus-per-node",
        str(cluster.plan.gpus_per_node),
    ]
    if s.slurm_partition:
        argv += ["--partition", s.slurm_partition]
    return " ".join(shlex.quote(a) for a in argv)


def scale_down_command(cluster: Cluster, login: Login) -> str:
    """Cancel the submitting account's replicas above `replicas`, their slots first in maintenance."""
    s = cluster.settings
    argv = [
        f"{s.health_venv}/bin/python", "-m", "nemotron_deploy.service.scale_down",
        "--slurm-job", s.job_name,
        "--replicas", str(cluster.plan.replicas),
        "--user", login.submit_as,
        "--slurm-bin", login.slurm_bin,
        "--drain-timeout", str(s.max_generation_seconds + 30),
        "--lock", lock_file(),
    ]  # fmt: skip
    if login.endpoint:
        argv += ["--endpoint-socket", endpoint_mod.STATS_SOCKET]
    return " ".join(shlex.quote(a) for a in argv)


def for_host(cluster: Cluster, host_name: str, login: Login | None = None) -> HostState:
    """`login`: the login node's read (default: every path the login node may get, for the read)."""
    s = cluster.settings
    want = HostState()
    job_files = artifacts(cluster).job_files
    compute_files = [
        WantedFile(f"{s.scripts_dir}/{f.name}", f.content, f.mode) for f in job_files if f.role == "compute"
    ]
    if role(cluster, host_name) == "compute":
        if not s.scripts_on_shared_storage:
            want.dirs += [
                WantedDir(s.node_dir, "755", adopt=owned_by_name(s.node_dir), guarded=True),
                WantedDir(s.scripts_dir, "755", adopt=True, guarded=True),
            ]
            want.files += compute_files
        return want

    login = login or Login(submit_as=s.service_user, submit_group=s.service_user)
    submitter, submitter_group = records_owner(login)
    want.dirs += [
        WantedDir(s.deploy_dir, "755", adopt=True, guarded=True),
        WantedDir(s.jobs_dir, "755", adopt=True, guarded=True),
        # The jobs' output (NeMo logs every prompt): the submitting account's alone. Earlier releases
        # made it 1777 for every user: fixed on the next deploy.
        WantedDir(
            s.logs_dir, "700", submitter, submitter_group, adopt=True, guarded=True, legacy_modes=("1777",)
        ),
        # Job records: only the submitting account writes them; the check may read them.
        WantedDir(s.records_dir, "755", submitter, submitter_group, adopt=True, guarded=True),
    ]
    if s.image_file:
        want.dirs.append(WantedDir(s.images_dir, "755", adopt=True, guarded=True))
    if s.scripts_on_shared_storage:
        want.dirs.append(WantedDir(s.scripts_dir, "755", adopt=True, guarded=True))
        want.files += compute_files
    want.files += [
        WantedFile(f"{s.jobs_dir}/{f.name}", f.content, f.mode) for f in job_files if f.role == "login"
    ]
    want.files.append(WantedFile(nodes_file(cluster), nodes_text(cluster), "644"))

    venv_parent = str(PurePosixPath(s.health_venv).parent)
    user = s.health_user
    want.dirs += [
        WantedDir(venv_parent, "755", adopt=owned_by_name(venv_parent), guarded=True),
        WantedDir(wheels_dir(cluster), "755", adopt=True, guarded=True),
        WantedDir(health_timer.STATE_DIR, "750", user, user, adopt=True, guarded=True),
        WantedDir(health_timer.METRICS_DIR, "755", user, user, adopt=True, guarded=True),
        WantedDir(DEPLOY_STATE_DIR, "755", adopt=True, guarded=True),
        WantedDir(s.prometheus_textfile_dir, "755"),  # node_exporter's: created if absent, never re-owned
    ]
    want.files.append(WantedFile(lock_file(), "", "660", "root", user))
    want.links.append(
        WantedLink(f"{s.prometheus_textfile_dir}/{health_timer.METRICS_FILE}", health_timer.metrics_path())
    )
    if s.prometheus_rules_dir:
        if s.prometheus_rules_dir not in {d.path for d in want.dirs}:
            want.dirs.append(WantedDir(s.prometheus_rules_dir, "755"))  # Prometheus's: never re-owned
        want.files.append(
            WantedFile(
                f"{s.prometheus_rules_dir}/{alerts.RULES_NAME}",
                alerts.rules(s.health_interval_seconds),
                "644",
            )
        )
    want.files += [
        WantedFile(f"{wheels_dir(cluster)}/{name}", data, "644") for name, data in artifacts(cluster).wheels
    ]
    want.files += [WantedFile(path, text, "644") for path, text in health_units(cluster, login).items()]
    rule = sudoers(cluster, login)
    if rule:
        # sudo's include dir: created if absent (mode as Debian's package has it), never re-owned.
        want.dirs.append(WantedDir(str(PurePosixPath(SUDOERS_FILE).parent), "750"))
        want.files.append(WantedFile(SUDOERS_FILE, rule, "440"))
    if login.endpoint:
        # /etc/haproxy is the package's: created if absent (before the install), never re-owned.
        want.dirs.append(WantedDir(endpoint_mod.CONFIG_DIR, "755"))
        want.files += endpoint_files(cluster)
        want.links += endpoint_links(cluster)
    return want
