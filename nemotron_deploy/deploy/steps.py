"""The steps of `deploys/nemotron.py`, one function each; the deploy file just calls them in order.

Order matters: the inventory is validated, then every host is read (one SSH command each) and
checked, and only then are operations added. pyinfra prepares every host before executing anything,
so any failed check stops the deploy before a single change is made. What each host should have is
`desired.py`; the reads and checks are `host_checks.py` (all in `nemotron_deploy/deploy/`).
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path
from typing import Any

from pyinfra import logger
from pyinfra.operations import apt
from pyinfra.operations import files as pyinfra_files

from ..inventory import Cluster, InventoryError, load
from ..service import scale_down as scale
from ..service.slurm import ENDING_STATES
from . import desired, host_checks, replica_key, rootless
from .errors import DeployError
from .facts.snapshot import snapshot
from .facts.system import UserExists
from .operations import accounts, containers, endpoint, files, gateway_retired, health_timer, submit

# One validation per pyinfra Inventory object, dropped with it (an id() could be reused).
_clusters: weakref.WeakKeyDictionary[Any, Cluster] = weakref.WeakKeyDictionary()


def validated_cluster(inventory: Any) -> Cluster:
    """The inventory, validated once per run (every host, every setting) and sized."""
    if inventory not in _clusters:
        try:
            cluster = load(inventory_file(inventory), inventory=inventory)
        except InventoryError as exc:
            raise DeployError(
                "the inventory is invalid; nothing was changed:\n  " + "\n  ".join(map(str, exc.problems))
            ) from None
        # Before any host is read or changed (and for every host: not cached when refused).
        refuse_key_to_unverified_registry(cluster)
        _clusters[inventory] = cluster
        # pyinfra's process is short-lived, and what it holds by now (modules, the inventory, this
        # validation) lives until it exits: take it out of the garbage collector's sight, so that
        # each collection, and the one at exit, walks only what the run adds (~0.1 s of a deploy).
        gc.freeze()
    return _clusters[inventory]


def inventory_file(inventory: Any) -> str:
    """The inventory file this pyinfra run loaded.

    pyinfra puts every host of an inventory file in a group named after the file (`h100` for
    inventories/h100.py) and keeps the code of every file it executed; the inventory is the one of
    those files that has that name and is not group data.
    """
    from pyinfra_cli.util import PYTHON_CODES

    groups = set(inventory.groups) - {"login", "compute", "all"}
    candidates = sorted(
        {
            str(Path(name))
            for name in PYTHON_CODES
            if Path(name).stem in groups and Path(name).parent.name != "group_data"
        }
    )
    if len(candidates) != 1:
        raise DeployError(
            "deploys/nemotron.py needs an inventory file (pyinfra inventories/<name>.py "
            f"deploys/nemotron.py); this run's inventory came from {candidates or 'no file'}"
        )
    return candidates[0]


def ngc_key(cluster: Cluster) -> str | None:
    """The NGC key from the environment variable or file the inventory names; never from data.

    Refused (DeployError) when the deploy would send it to a registry whose TLS it does not verify."""
    refuse_key_to_unverified_registry(cluster)
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


def refuse_key_to_unverified_registry(cluster: Cluster) -> None:
    """Stop the deploy, before any change, when it would log in to the image's registry with the NGC
    key without verifying that registry's TLS. validate refuses what the inventory alone shows
    (registry_login = true, ngc_api_key_file); a key in the environment is only known here."""
    s = cluster.settings
    if s.registry_tls_verify or not s.logs_in_to_registry:
        return
    env = s.ngc_api_key_env or ""
    if s.ngc_api_key_file or os.environ.get(env, "").strip():
        source = f"ngc_api_key_file {s.ngc_api_key_file}" if s.ngc_api_key_file else f"${env}"
        raise DeployError(
            f"refusing to send the NGC key (from {source}) to {s.registry}: registry_tls_verify = false, "
            f"so nothing verifies who answers there; nothing was changed. Either verify TLS (give the "
            f"compute nodes {s.registry}'s CA: /etc/docker/certs.d/{s.registry}/ca.crt, "
            f"/etc/containers/certs.d/{s.registry}/ca.crt, the system CA bundle for enroot; then remove "
            f"registry_tls_verify = false), or send it no key (registry_login = false, or unset ${env} "
            f"and ngc_api_key_file for this deploy)"
        )


def ensure_files(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Directories, files and links (scripts, sbatch, health units, wheels) with explicit owners; on
    the login node, then the health check's venv from those wheels, when they changed."""
    s = cluster.settings
    login = desired.role(cluster, host.name) == "login"
    if login and snap.get("service_user") is None:
        accounts.service_user(
            name=f"Service account {s.service_user}",
            username=s.service_user,
            uid=_compute_uid(cluster, s.service_user),
        )
    if login:  # owns the health check's directories
        account = snap["health_user"]
        marked = account is None or account.get("gecos") == health_timer.USER_MARK or s.health_user_existing
        if account is None or not marked:
            health_timer.ensure_user(
                name=f"User {s.health_user}",
                username=s.health_user,
                exists=account is not None,
                marked=marked,
            )
    want = desired.for_host(cluster, host.name, desired.Login.of(cluster, snap) if login else None)
    venv = _health_venv(cluster, snap) if login else ()
    if not venv and files.tree_in_place(want.dirs, want.files, want.links, snap["paths"]):
        return  # no operation where the read shows nothing to do (pyinfra lists the host as Skipped)
    # One operation, one shell command per host (after one upload): every operation is a barrier
    # across hosts, and on a large cluster each round of commands costs about an SSH round trip.
    # The login node's venv install rides in it, so it overlaps the compute nodes' uploads.
    files.managed_tree(
        name=f"Job files, health-check wheels, venv {s.health_venv} and timer" if login else "Job files",
        dirs=want.dirs,
        files=want.files,
        links=want.links,
        current=snap["paths"],
        then=venv,
    )


def _compute_uid(cluster: Cluster, name: str) -> str | None:
    """The account's UID on the first compute node, to make it the same on the login node (an extra
    read, only on the run that creates the account)."""
    from pyinfra import state

    node = state.inventory.get_host(cluster.compute[0], None) if cluster.compute else None
    if node is None:
        return None
    account = snapshot(node, (("account", UserExists, (name,)),))["account"]
    return account.get("uid") if account else None


def _health_venv(cluster: Cluster, snap: dict[str, Any]) -> tuple[Any, ...]:
    """The venv install command, if the venv is missing or its wheels changed; else nothing."""
    s = cluster.settings
    built = desired.artifacts(cluster)
    marker = snap["paths"].get(desired.wheels_marker(cluster))
    installed = marker is not None and marker.sha256 == files.sha256_of(built.wheels_digest)
    if installed and f"{s.health_venv}/bin/python" in snap["paths"]:
        return ()
    wheels = desired.wheels_dir(cluster)
    return (
        health_timer.venv_install(
            venv=s.health_venv,
            wheels=[f"{wheels}/{name}" for name, _ in built.wheels if name != built.installer],
            installer=f"{wheels}/{built.installer}",
            marker=desired.wheels_marker(cluster),
            digest=built.wheels_digest,
        ),
    )


def pull_container(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Get the image where the job will look for it, once, by the inventory's runtime."""
    s = cluster.settings
    runtime = s.pull_runtime or s.container_runtime
    if desired.role(cluster, host.name) == "compute" and runtime in ("docker", "podman"):
        if snap.get("image"):
            return  # present: no operation on this node (as for files; a call costs each host ~5 ms)
        containers.pull_image(
            name=f"Pull {s.image} ({runtime})",
            runtime=runtime,
            image=s.image,
            present=False,  # returned above when it is
            ngc_key=ngc_key(cluster),
            tls_verify=s.registry_tls_verify,
            login=s.registry_login,
            stall_seconds=s.pull_stall_timeout_seconds,
            timeout_seconds=s.pull_timeout_seconds,
            as_user=rootless.account(s),  # podman: where the job's rootless `podman run` looks
        )
    elif s.image_file and host.name == cluster.compute[0]:
        # One host imports for the whole cluster, onto shared storage.
        login = s.logs_in_to_registry
        present = s.image_file in snap["paths"]
        leftover = desired.enroot_credentials(cluster)
        if leftover in snap["paths"]:  # an earlier release kept the key here between deploys
            pyinfra_files.directory(
                name="Old enroot credentials removed (the key leaves the node)",
                path=leftover.rsplit("/", 1)[0],
                present=False,
            )
        containers.import_image_file(
            name=f"Import {s.image} ({runtime})",
            runtime=runtime,
            image=s.image,
            target=s.image_file,
            present=present,
            tmp_dir=s.enroot_tmp_dir or f"{s.deploy_dir}/.import-tmp",
            ngc_key=ngc_key(cluster) if runtime == "pyxis" and login and not present else None,
            tls_verify=s.registry_tls_verify,
            stall_seconds=s.pull_stall_timeout_seconds,
            timeout_seconds=s.pull_timeout_seconds,
        )


def install_health_check(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """The timer enabled (its user, files and venv come from ensure_files)."""
    if desired.role(cluster, host.name) != "login":
        return
    units_changed = any(
        snap["paths"].get(path) is None or snap["paths"][path].sha256 != files.sha256_of(text)
        for path, text in desired.health_units(cluster, desired.Login.of(cluster, snap)).items()
    )
    health_timer.enable_timer(
        name="Enable the health timer",
        kind=snap.get("init") or "cron",
        units_changed=units_changed,
        enabled=bool(snap.get("timer_enabled")),
    )


def retire_gateway(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """The OpenAI gateway an earlier release ran on the login node: stopped and removed, once (each
    replica's front translates now)."""
    if desired.role(cluster, host.name) != "login":
        return
    if any(snap["paths"].get(path) is not None for path in gateway_retired.FOUND_BY):
        gateway_retired.retire(
            name="Retire the earlier release's OpenAI gateway (the replicas' fronts translate now)"
        )


def ensure_replica_key(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """The replica key on the login node (made once; its copies re-owned if the read shows otherwise):
    after the files (its directories, the health user) and HAProxy's install (its group)."""
    if desired.role(cluster, host.name) != "login" or replica_key.in_place(cluster, snap):
        return
    endpoint.replica_key(
        name="Replica key: the secret each replica's front asks of the endpoint and the check",
        script=replica_key.script(cluster, desired.Login.of(cluster, snap)),
    )


def extra_replicas(cluster: Cluster, snap: dict[str, Any]) -> dict[int, list[tuple[str, str]]]:
    """{index: [(job id, state)]} of this account's replica jobs above `replicas` still to cancel."""
    listing = "\n".join(snap.get("account_jobs") or [])
    return scale.to_cancel(scale.extra_replicas(listing, cluster.settings.job_name, cluster.plan.replicas))


def scale_down(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Replicas above `replicas` (the setting was lowered): out of the endpoint (drained, then in
    maintenance) and cancelled, before HAProxy reloads with the new settings. No operation when the
    read found none: a second deploy changes nothing."""
    if desired.role(cluster, host.name) != "login":
        return
    extra = extra_replicas(cluster, snap)
    if not extra:
        return
    s = cluster.settings
    jobs = ", ".join(
        f"{s.replica_job(i)} (job {', '.join(job_id for job_id, _ in rows)})" for i, rows in extra.items()
    )
    submit.scale_down(
        name=f"Scale down to {cluster.plan.replicas} replica(s): cancel {jobs}, slots in maintenance",
        command=desired.scale_down_command(cluster, desired.Login.of(cluster, snap)),
    )


def install_endpoint(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """HAProxy on the login node (Debian's package), before its configuration is written."""
    if desired.role(cluster, host.name) != "login" or not desired.endpoint_on(cluster, snap):
        return
    if snap["haproxy"]["version"] is None:
        apt.packages(name="Install HAProxy (the endpoint)", packages=["haproxy"], present=True)


def run_endpoint(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Start HAProxy, or reload it when its files changed; then point its slots at the replicas."""
    if desired.role(cluster, host.name) != "login" or not desired.endpoint_on(cluster, snap):
        return
    paths = snap["paths"]
    changed = any(files.content_differs(f, paths.get(f.path)) for f in desired.endpoint_files(cluster))
    changed = changed or any(
        paths.get(link.path) is None or paths[link.path].sha256 != link.target
        for link in desired.endpoint_links(cluster)
    )
    # A key made (or re-owned) just now by ensure_replica_key: HAProxy reads its map only at a (re)load.
    changed = changed or not replica_key.in_place(cluster, snap)
    if cluster.settings.endpoint_tls == "self-signed":
        present = desired.tls_cert_path() in paths and desired.tls_key_path() in paths
        endpoint.self_signed_certificate(
            name="Endpoint: its self-signed TLS certificate (made once, here)",
            script=self_signed_script(host, cluster),
            present=present,
        )
        changed = changed or not present
    endpoint.ensure_running(
        name=f"Endpoint: HAProxy on port {cluster.settings.endpoint_port}",
        service=snap["haproxy"]["service"],
        running=snap["haproxy"]["running"],
        config_changed=changed,
        # Replicas write their records as they start: with none, the check would find nothing to
        # put in a slot (0.4 s of a first deploy at 32 replicas); the scheduled check runs anyway.
        sync_command=desired.sync_command(cluster, desired.Login.of(cluster, snap))
        if host_checks.trusted_records(cluster, snap)
        else None,
    )


def self_signed_script(host: Any, cluster: Cluster) -> str:
    """The key pair's script, naming the certificate also for the inventory's name and address of
    the login node (what clients are likely to call it)."""
    import ipaddress

    from . import endpoint as endpoint_files

    names, addresses = [], []
    for value in dict.fromkeys([host.name, host.data.get("ssh_hostname") or host.name]):
        try:
            addresses.append(str(ipaddress.ip_address(value)))
        except ValueError:
            names.append(value)
    return endpoint_files.self_signed_script(
        desired.tls_cert_path(),
        desired.tls_key_path(),
        names=names,
        addresses=addresses,
        user="root",
        group=endpoint_files.RUN_AS,
        days=endpoint_files.SELF_SIGNED_DAYS,
    )


def stale_replicas(cluster: Cluster, snap: dict[str, Any]) -> list[tuple[int, dict]]:
    """[(replica index, its job record)] of replicas whose job started with other files than this
    deploy installs (the digest in the rendered sbatch)."""
    s = cluster.settings
    digest = desired.files_digest(cluster)
    records = host_checks.trusted_records(cluster, snap)
    return [
        (i, rec)
        for i in range(1, cluster.plan.replicas + 1)
        if (rec := records.get(s.job_record(i))) is not None and rec.get("files") != digest
    ]


def roll_out(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Say which replicas run an earlier deploy's files; with `--data rollout=true`, replace them one
    at a time (nemotron_deploy.service.rollout on the login node, as the user the deploy submits as)."""
    s = cluster.settings
    if desired.role(cluster, host.name) != "login" or s.state == "stopped":
        return
    stale = stale_replicas(cluster, snap)
    if not stale:
        return
    if not s.rollout:
        for i, rec in stale:
            logger.warning(
                f"{host.print_prefix}replica r{i} (job {rec.get('job_id')} on {rec.get('node')}) still runs the "
                "files of an earlier deploy: roll it out with --data rollout=true (the scheduled check "
                "reports it as WARNING stale)"
            )
        return
    login = desired.Login.of(cluster, snap)
    submit.roll_out(
        name=f"Roll out the new files to {', '.join(f'r{i}' for i, _ in stale)}, one replica at a time",
        command=desired.rollout_command(cluster, login),
    )


def submit_job(host: Any, cluster: Cluster, snap: dict[str, Any]) -> None:
    """Only with `--data submit=true`: submit every replica not already queued (one Slurm job each),
    wait until all generate, then point the endpoint at them at once. With state=stopped: cancel
    every replica instead (the one way to stop the service: the check then replaces none)."""
    s = cluster.settings
    if desired.role(cluster, host.name) != "login":
        return
    login = desired.Login.of(cluster, snap)
    if s.state == "stopped":
        live = [job_id for job_id, state in snap["replica_jobs"] if state not in ENDING_STATES]
        present = desired.started_file() in snap["paths"]
        submit.stop_replicas(
            name=f"Stop the service: cancel {s.job_name}-r1..r{cluster.plan.replicas}",
            live_jobs=live,
            started_file=desired.started_file(),
            started_file_present=present,
        )
        if login.endpoint and (live or present):
            endpoint.sync_now(
                name="Endpoint: take the replicas out", command=desired.sync_command(cluster, login)
            )
        return
    if desired.started_file() not in snap["paths"] and desired.earlier_started_file() in snap["paths"]:
        # An upgrade of a started service: without the file where the check now looks, it would
        # replace no dead replica until the next `--data submit=true`.
        submit.mark_started(
            name="Service started (file moved to root's state directory)", started_file=desired.started_file()
        )
    if not s.submit:
        return
    smoke = s.mode == "smoke"  # the job ends by itself after one call: wait for its end instead
    # A smoke test runs one replica: it proves the job files, not the serving capacity.
    names = [s.replica_job(i) for i in range(1, (1 if smoke else cluster.plan.replicas) + 1)]
    submit.submit_and_wait(
        name=f"Submit {', '.join(names)} and wait until "
        + ("it completes its smoke test" if smoke else "every replica generates"),
        sbatch_path=f"{s.jobs_dir}/nemotron.sbatch",
        job_names=names,
        submit_as=login.submit_as,
        deploy_user=login.deploy_user,
        health_commands={
            name: submit.wait_command(
                venv=s.health_venv,
                job_name=name,
                port=s.port,
                budget=s.health_startup_budget_seconds,
                job_user=login.submit_as,
                nodes_file=desired.nodes_file(cluster),
                replica_key_file=s.replica_key_file,  # the submitting account's (or root's) copy
            )
            for name in names
        },
        until_done=smoke,
        budget_seconds=s.health_startup_budget_seconds + 600,
        started_file=None if smoke else desired.started_file(),
    )
    if not smoke and login.endpoint:
        endpoint.sync_now(
            name="Endpoint: point its slots at the replicas", command=desired.sync_command(cluster, login)
        )
        endpoint.serving(
            name="Endpoint: wait until it serves (every slot UP)",
            command=desired.serving_wait_command(cluster),
        )
