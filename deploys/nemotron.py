"""Deploy Nemotron-4-340B-Base for inference with NeMo on a Slurm cluster.

    pyinfra inventories/h100.py deploys/nemotron.py            # plan, confirm, apply
    pyinfra inventories/h100.py deploys/nemotron.py --dry      # show what would change (not with -y:
                                                               # -y skips pyinfra's change detection)
    pyinfra -y inventories/h100.py deploys/nemotron.py --data submit=true

Checks come first: a bad inventory or a node that can't run the job stops the deploy before any
host is changed. Re-running with nothing changed reports no changes. The steps live in
nemotron_deploy/deploy/ (steps.py, host_checks.py, desired.py); this file is the checklist.
"""

from pyinfra import host, inventory, state

from nemotron_deploy.deploy import host_checks, reachability
from nemotron_deploy.deploy import steps as deploy

# 1. Validate the inventory: every host, every setting, and the sizing plan.
cluster = deploy.validated_cluster(inventory)

# 1b. A host that can't be reached (at the start or mid-deploy) fails alone; the run ends by naming
#     each one, its address and what failed, and how to keep Slurm off it (drain, or fix and re-run).
reachability.report_unreachable_hosts(state, cluster)

# 2. Read this host in one SSH command: GPUs, runtimes, Slurm, model dir, every managed path.
snapshot = host_checks.read_host(host, cluster)

# 3. Preflight: GPU model/count/memory/driver, the checkpoint's architecture, runtimes, disk.
host_checks.check_host(host, cluster, snapshot)

# 4. The NeMo container where the job will look for it (per node, or once on shared storage).
deploy.pull_container(host, cluster, snapshot)

# 5. The endpoint's HAProxy on the login node, if missing (Debian's package), before its config.
deploy.install_endpoint(host, cluster, snapshot)

# 6. Job files: call_server.py, nemo_inference.sh, the health check on the nodes; the sbatch file,
#    the endpoint's haproxy.cfg and request envelope, the health check's user, wheels, venv and
#    timer or cron entry on the login node. A host whose files are in place gets no operation.
deploy.ensure_files(host, cluster, snapshot)

# 6b. The replica key (made once on the login node): each replica's front forwards only requests
#     that carry it (the endpoint's, the scheduled check's); NeMo itself listens on 127.0.0.1.
deploy.ensure_replica_key(host, cluster, snapshot)

# 7. The scheduled health check on the login node: its systemd timer enabled (cron needs nothing).
deploy.install_health_check(host, cluster, snapshot)

# 7b. An earlier release's OpenAI gateway on the login node: stopped and removed (the fronts translate).
deploy.retire_gateway(host, cluster, snapshot)

# 7c. Replicas above `replicas` (it was lowered): drained out of the endpoint, then cancelled.
deploy.scale_down(host, cluster, snapshot)

# 8. The endpoint: started, or reloaded if its files changed, its slots pointed at the replicas.
deploy.run_endpoint(host, cluster, snapshot)

# 9. Replicas still on an earlier deploy's files: say which; with --data rollout=true, replace them
#    one at a time (new job, wait until it generates, swap it in the endpoint, drain, cancel the old).
deploy.roll_out(host, cluster, snapshot)

# 10. Only with --data submit=true: submit every replica not queued (one Slurm job each), wait until
#     all generate, then put them in the endpoint and wait until it serves. With state=stopped: cancel
#     them all instead.
deploy.submit_job(host, cluster, snapshot)
