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
    """True when `name` is a user here (local or from the directory service)."""

    def snippet(self, name: str) -> str:
        return f"if id -u {shlex.quote(name)} >/dev/null 2>&1; then echo yes; else echo no; fi"

    def process(self, output: list[str]) -> bool:
        return output[-1:] == ["yes"]


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
