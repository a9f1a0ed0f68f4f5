"""The OpenAI gateway an earlier release ran on the login node, retired: each replica's front
translates now (deploy/openai_config.py says why).

A deploy that finds the gateway's unit or init script stops it and removes its files and its account
(only the account that release made: marked in its GECOS field), once; nothing is left for a later
deploy to find, so the next one does nothing here.
"""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand, operation

UNIT = "nemotron-gateway"
USER = "nemotron-gateway"
USER_MARK = "nemotron-deploy openai gateway"  # that release's GECOS mark on the account it made
SYSTEMD_UNIT = f"/etc/systemd/system/{UNIT}.service"
INIT_SCRIPT = f"/etc/init.d/{UNIT}"
PIDFILE = f"/run/{UNIT}.pid"
CONFIG_DIR = "/etc/nemotron-gateway"
STATE_DIR = "/var/lib/nemotron-gateway"  # its sockets' directory (the gateway's own) inside
FOUND_BY = (SYSTEMD_UNIT, INIT_SCRIPT)


def script() -> str:
    """Stop it (either init system); end the marked account's processes and remove it; remove the
    config (root's), and the state directory only once no such account exists (its sockets' directory
    was the account's: root never acts on what another account can write); the unit or init script
    last, so that a failure before leaves them for the next deploy to find and finish."""
    q = shlex.quote
    return "; ".join(
        [
            f"if [ -f {q(SYSTEMD_UNIT)} ]; then systemctl disable --now {UNIT} >/dev/null 2>&1 || true; fi",
            f"if [ -x {q(INIT_SCRIPT)} ]; then {q(INIT_SCRIPT)} stop >/dev/null 2>&1 || true; fi",
            f'if [ "$(getent passwd {USER} | cut -d: -f5)" = {q(USER_MARK)} ]; then '
            f"pkill -KILL -u {USER} 2>/dev/null; i=0; while pgrep -u {USER} >/dev/null && [ $i -lt 50 ]; "
            f"do sleep 0.1; i=$((i + 1)); done; userdel {USER} || exit 1; fi",
            f"rm -rf {q(CONFIG_DIR)}",
            f"if ! getent passwd {USER} >/dev/null; then rm -rf {q(STATE_DIR)}; fi",
            f"rm -f {q(INIT_SCRIPT)} {q(PIDFILE)}",
            f"if [ -f {q(SYSTEMD_UNIT)} ]; then rm -f {q(SYSTEMD_UNIT)}; systemctl daemon-reload; fi",
        ]
    )


@operation()
def retire():
    """
    Stop and remove the earlier release's OpenAI gateway: its service, files and marked account.

    .. code:: python

        retire(name="Retire the earlier OpenAI gateway")
    """
    yield StringCommand(script())
