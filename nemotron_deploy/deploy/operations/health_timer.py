"""The scheduled health check on the login node: its own venv, an unprivileged user, a timer.

systemd (service + timer) where systemd runs, a cron.d entry elsewhere; both run the single check
every `health_interval_seconds` and write Prometheus textfile metrics for node_exporter.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from pyinfra.api import StringCommand, operation

UNIT = "nemotron-health"
STATE_DIR = "/var/lib/nemotron-health"  # the check's state file: private to the health user
# The check writes its metrics here (atomically: temp file + rename in a directory it owns); the
# deploy links node_exporter's textfile dir to the file instead of re-owning that directory.
METRICS_DIR = "/var/lib/nemotron-health-metrics"
METRICS_FILE = "nemotron.prom"


def metrics_path() -> str:
    return f"{METRICS_DIR}/{METRICS_FILE}"


@dataclass(frozen=True)
class Replacement:
    """The check's part in keeping the service up (settings restart_policy and friends)."""

    sbatch: str
    submit_as: str
    slurm_bin: str
    started_file: str
    unhealthy_after: int
    backoff_max: int
    max_per_day: int
    startup_budget: int

    def argv(self) -> list[str]:
        return [
            "--restart-policy", "always",
            "--sbatch", self.sbatch,
            "--submit-as", self.submit_as,
            "--slurm-bin", self.slurm_bin,
            "--started-file", self.started_file,
            "--unhealthy-restart-after", str(self.unhealthy_after),
            "--restart-backoff-max", str(self.backoff_max),
            "--max-restarts-per-day", str(self.max_per_day),
            "--budget", str(self.startup_budget),
        ]  # fmt: skip


def check_command(
    *,
    venv: str,
    job_name: str,
    replicas: int,
    port: int,
    records_dir: str,
    endpoint_socket: str | None,
    job_user: str | None = None,
    nodes_file: str | None = None,
    lock_file: str | None = None,
    replica_key_file: str | None = None,
    replacement: Replacement | None = None,
    stopped: bool = False,
) -> list[str]:
    """The single check the timer runs: every replica (<job_name>-r1..rN), the endpoint's slots
    pointed at them when there is an endpoint, dead replicas replaced with `replacement`; Nagios
    exit codes, metrics for the textfile collector."""
    command = [
        f"{venv}/bin/python",
        "-m",
        "nemotron_deploy.service.health",
        "--slurm-job",
        job_name,
        "--replicas",
        str(replicas),
        "--records-dir",
        records_dir,
        "--port",
        str(port),
    ]
    if job_user:  # only its jobs (squeue -u) and the records it wrote are believed
        command += ["--job-user", job_user]
    if nodes_file:  # a record naming any node outside the cluster is not believed
        command += ["--nodes-file", nodes_file]
    if lock_file:  # in root's directory: root (the rollout) opens it too
        command += ["--lock-file", lock_file]
    if replica_key_file:  # each replica's front forwards only requests with the replica key
        command += ["--replica-key-file", replica_key_file]
    if endpoint_socket:
        command += ["--endpoint-socket", endpoint_socket]
    if stopped:
        command.append("--stopped")
    elif replacement is not None:
        command += replacement.argv()
    return command + [
        "--prometheus-textfile",
        metrics_path(),
        "--state-file",
        f"{STATE_DIR}/state.json",
    ]


def systemd_units(*, user: str, command: list[str], interval: int, job_name: str) -> dict[str, str]:
    exec_start = " ".join(shlex.quote(a) for a in command)
    service = f"""# Installed by nemotron-deploy. Run by {UNIT}.timer.
[Unit]
Description=Nemotron-4-340B health check (Slurm job {job_name})
After=network-online.target

[Service]
Type=oneshot
User={user}
Environment=PATH=/usr/local/bin:/usr/bin:/bin
ExecStart={exec_start}
# Nagios WARNING/CRITICAL/UNKNOWN are check results, not a broken unit.
SuccessExitStatus=1 2 3
"""
    timer = f"""# Installed by nemotron-deploy.
[Unit]
Description=Run the Nemotron-4-340B health check every {interval}s

[Timer]
OnBootSec={interval}
OnUnitActiveSec={interval}
AccuracySec=1s

[Install]
WantedBy=timers.target
"""
    return {f"/etc/systemd/system/{UNIT}.service": service, f"/etc/systemd/system/{UNIT}.timer": timer}


def cron_entry(*, user: str, command: list[str], interval: int) -> dict[str, str]:
    minutes = max(1, round(interval / 60))
    schedule = "*" if minutes == 1 else f"*/{minutes}"
    line = " ".join(shlex.quote(a) for a in command)
    return {
        f"/etc/cron.d/{UNIT}": (
            "# Installed by nemotron-deploy: the Nemotron-4-340B health check (Nagios exit codes,\n"
            "# metrics in the node_exporter textfile directory).\n"
            "PATH=/usr/local/bin:/usr/bin:/bin\n"
            f"{schedule} * * * * {user} {line} >/dev/null 2>&1\n"
        )
    }


# The GECOS field of the account the deploy creates: how a later deploy tells it from someone else's.
USER_MARK = "nemotron-deploy health check"


@operation()
def ensure_user(username: str, exists: bool, marked: bool = True):
    """
    Create an unprivileged system user (no login shell, no home), marked as the deploy's in its GECOS
    field, unless it exists; mark an existing one the preflight found to be the deploy's (an earlier
    release made it unmarked) with `marked=False`.

    **Example:**

    .. code:: python

        ensure_user(name="Health user", username="nemotron-health", exists=False)
    """
    q = shlex.quote(username)
    if not exists:
        yield StringCommand(
            f"useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "
            f"--comment {shlex.quote(USER_MARK)} {q}"
        )
    elif not marked:
        yield StringCommand(f"usermod --comment {shlex.quote(USER_MARK)} {q}")


def venv_install(venv: str, wheels: list[str], installer: str, marker: str, digest: str) -> StringCommand:
    """
    The command that creates `venv` and installs the uploaded wheels into it, offline.

    ``python3 -m venv --clear --without-pip`` (no pip bootstrap: that was most of a first deploy's
    fixed cost) and pypa's ``installer``, run from its uploaded wheel (``PYTHONPATH=<wheel>``: a
    pure-Python wheel is importable as is) and not installed into the venv. ``--clear`` starts from
    an empty venv on every change, as pip's --force-reinstall did, with no file of an older version
    left behind. Needs no pip and no python3-venv/ensurepip on the login node. The deploy runs it in
    the login node's file operation, right after the wheels are in place (``managed_tree(then=)``).

    **Example:**

    .. code:: python

        venv_install(venv="/opt/nemotron-deploy/health-venv",
                     wheels=[".../nemotron_deploy-0.1.0-py3-none-any.whl"],
                     installer=".../installer-1.1.0-py3-none-any.whl",
                     marker=".../installed.sha256", digest="ab12...")
    """
    q = shlex.quote(venv)
    files = " ".join(shlex.quote(w) for w in wheels)
    return StringCommand(
        f"python3 -m venv --clear --without-pip {q} && "
        f"PYTHONPATH={shlex.quote(installer)} {q}/bin/python -m installer --compile-bytecode 0 {files} "
        f"&& printf %s {shlex.quote(digest)} > {shlex.quote(marker)}"
    )


@operation()
def enable_timer(kind: str, units_changed: bool, enabled: bool):
    """
    systemd: reload after the units changed, and enable + start the timer whenever it is not
    enabled (a run that failed after uploading the units, or an admin who disabled it). cron reads
    /etc/cron.d by itself: nothing to do.

    **Example:**

    .. code:: python

        enable_timer(name="Enable timer", kind="systemd", units_changed=False, enabled=False)
    """
    if kind != "systemd":
        return
    if units_changed:
        yield StringCommand("systemctl daemon-reload")
    if units_changed or not enabled:
        yield StringCommand(f"systemctl enable --now {UNIT}.timer")
