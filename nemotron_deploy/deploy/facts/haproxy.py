"""The endpoint's HAProxy on the login node: installed (which version), installable, run by what."""

from __future__ import annotations

import re

from .base import ProbeFact


class Haproxy(ProbeFact):
    """{"version": "2.6.12" or None (not installed), "apt": bool (apt-get can install it),
    "service": "systemd" | "sysv" | None (what can run it as a service), "running": bool}.

    "sysv" is a host without systemd whose /etc/init.d scripts are run by hand or by its init (Debian's
    haproxy package ships /etc/init.d/haproxy); the sandbox's login node is one.
    """

    def snippet(self) -> str:
        return (
            "b=$(command -v haproxy || { [ -x /usr/sbin/haproxy ] && echo /usr/sbin/haproxy; }); "
            'if [ -n "$b" ]; then echo "version=$("$b" -v 2>/dev/null | head -n 1)"; fi; '
            "if command -v apt-get >/dev/null 2>&1; then echo apt=yes; fi; "
            "if [ -d /run/systemd/system ]; then echo service=systemd; "
            "systemctl is-active --quiet haproxy && echo running=yes; "
            "elif [ -d /etc/init.d ]; then echo service=sysv; "
            # The init script's own test (a haproxy process for each pid in its pidfile), not its
            # `status`: the script exits 0 for every action while haproxy.cfg is missing.
            "p=/var/run/haproxy.pid; [ -f $p ] && while read -r pid; do "
            'ps -o comm= -p "$pid" | grep -q haproxy && echo running=yes && break; done < $p; '
            "fi"
        )

    def process(self, output: list[str]) -> dict:
        seen = dict(line.split("=", 1) for line in output if "=" in line)
        version = re.search(r"version (\d+\.\d+(?:\.\d+)?)", seen.get("version", ""))
        return {
            "version": version.group(1) if version else None,
            "apt": seen.get("apt") == "yes",
            "service": seen.get("service"),
            "running": seen.get("running") == "yes",
        }
