"""The one "never deployed" reset (nemotron_rehearsal.sandbox.reset) that the tests and the bench use:
it removes what a deploy places, named from the product's own constants, and it is valid shell."""

from __future__ import annotations

import shlex
import subprocess

from helpers import INVENTORIES
from nemotron_rehearsal.sandbox import reset

from nemotron_deploy import inventory
from nemotron_deploy.deploy import desired, endpoint
from nemotron_deploy.deploy.operations import health_timer


def test_the_login_script_removes_every_place_a_deploy_writes_outside_the_images():
    settings = inventory.load(str(INVENTORIES / "h100.py")).settings
    script = reset.login_script(settings)
    for path in (
        settings.node_dir,
        health_timer.STATE_DIR,
        health_timer.METRICS_DIR,
        desired.DEPLOY_STATE_DIR,  # root's started file and the check's lock (the bench's copy missed it)
        desired.SUDOERS_FILE,
        f"{endpoint.CONFIG_DIR}/{endpoint.KEYS_MAP_FILE}",
        f"{endpoint.CONFIG_DIR}/{endpoint.REPLICA_KEY_MAP_FILE}",  # the replica key (its shared copy: deploy_dir)
        f"{endpoint.CONFIG_DIR}/{endpoint.TLS_KEY_FILE}",
        f"/etc/cron.d/{health_timer.UNIT}",
    ):
        assert shlex.quote(path) in script, path
    assert f" {settings.health_user}" in script.split("for u in", 1)[1].split(";", 1)[0]
    assert 'userdel "$u"' in script
    assert "! -name images" in script  # the imported image stays
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    assert reset.compute_command(settings) == ["rm", "-rf", settings.node_dir]
