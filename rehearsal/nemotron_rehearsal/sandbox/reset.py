"""The sandbox's nodes as no deploy has touched them: one definition of "never deployed", for the
tests' reset and the bench's (each kept its own list, and every change to what a deploy places had
to be made twice; the bench's had missed root's state directory and the endpoint's keys and TLS pair).

Read from the product's own names, so a path the deploy starts to place is removed here too. The
images stay (podman's and docker's, and pyxis's imported file under the shared dir): pulling and
importing are measured and tested on their own. Jobs are the caller's to cancel first (their logs
live in the shared dir removed here).
"""

from __future__ import annotations

import shlex
from typing import Any


def login_script(settings: Any) -> str:
    """The shell script that makes the login node never deployed: HAProxy installed but stopped with
    the package's config only, no health user, none of the deploy's files or directories."""
    from nemotron_deploy.deploy import desired, endpoint
    from nemotron_deploy.deploy.operations import health_timer

    removed = [
        settings.node_dir,
        f"/etc/cron.d/{health_timer.UNIT}",
        health_timer.STATE_DIR,
        health_timer.METRICS_DIR,
        desired.DEPLOY_STATE_DIR,
        desired.SUDOERS_FILE,
        *(
            f"{endpoint.CONFIG_DIR}/{name}"
            for name in (
                endpoint.CONFIG_FILE,
                endpoint.LUA_FILE,
                endpoint.KEYS_MAP_FILE,
                endpoint.REPLICA_KEY_MAP_FILE,
                endpoint.TLS_CERT_FILE,
                endpoint.TLS_KEY_FILE,
            )
        ),
    ]
    if settings.prometheus_textfile_dir:
        removed.append(settings.prometheus_textfile_dir)
    accounts = shlex.quote(settings.health_user)
    return (
        # The shared dir's deploy tree but its images.
        f"find {shlex.quote(settings.deploy_dir)} -mindepth 1 -maxdepth 1 ! -name images "
        "-exec rm -rf {} + 2>/dev/null; "
        "/etc/init.d/haproxy stop >/dev/null 2>&1; "
        f"rm -rf {' '.join(shlex.quote(p) for p in removed)}; "
        f"for u in {accounts}; do "
        'if id "$u" >/dev/null 2>&1; then userdel "$u"; fi; '
        'if getent group "$u" >/dev/null; then groupdel "$u"; fi; done; true'
    )


def compute_command(settings: Any) -> list[str]:
    """The argv that makes a compute node never deployed (its node-local directory gone)."""
    return ["rm", "-rf", settings.node_dir]
