"""Small facts about a host's system: its init system, whether a user exists."""

from __future__ import annotations

import shlex

from .base import ProbeFact


class InitSystem(ProbeFact):
    """ "systemd" when systemd is PID 1 (its runtime dir exists), else "cron" (use /etc/cron.d)."""

    def snippet(self) -> str:
        return "if [ -d /run/systemd/system ]; then echo systemd; else echo cron; fi"

    def process(self, output: list[str]) -> str:
        return "systemd" if output[-1:] == ["systemd"] else "cron"


class UserExists(ProbeFact):
    """{"uid": ..., "gecos": ..., "group": primary group's name, "groups": [every group]} when `name`
    is a user here (local or from the directory service), else None. The GECOS field tells an account
    the deploy made (desired.HEALTH_USER_MARK) from another."""

    def snippet(self, name: str) -> str:
        q = shlex.quote(name)
        return f'getent passwd {q} && echo "@@groups $(id -gn {q}) $(id -Gn {q})" || echo @@none'

    def process(self, output: list[str]) -> dict | None:
        found = None
        for line in output:
            fields = line.split(":")
            if found is None and len(fields) >= 7:
                found = {"uid": fields[2], "gecos": fields[4], "group": fields[0], "groups": []}
            elif found is not None and line.startswith("@@groups "):
                names = line.split()[1:]
                found["group"], found["groups"] = (names[0], names[1:]) if names else (found["group"], [])
        return found


class UnitEnabled(ProbeFact):
    """True when systemd has `unit` enabled; False when it is disabled, masked, or unknown (no
    systemctl, or no such unit). Read every run so a timer an admin disabled is noticed."""

    def snippet(self, unit: str) -> str:
        return (
            f"if command -v systemctl >/dev/null 2>&1; then systemctl is-enabled {shlex.quote(unit)}; "
            "else echo missing; fi"
        )

    def process(self, output: list[str]) -> bool:
        return output[-1:] == ["enabled"]
