"""The endpoint's HAProxy on the login node: installed (which version), installable, run by what."""

from __future__ import annotations

import re

from .base import ProbeFact

CONFIG = (
    "/etc/haproxy/haproxy.cfg"  # deploy.endpoint's CONFIG_DIR/CONFIG_FILE (facts import no deploy module)
)


class Haproxy(ProbeFact):
    """{"version": "2.6.12" or None (not installed), "apt": bool (apt-get can install it),
    "service": "systemd" | "sysv" | None (what can run it as a service), "running": bool,
    "openssl": bool (openssl is here, to make a self-signed certificate),
    "config": None (no /etc/haproxy/haproxy.cfg) or {"first_line": its first line, "md5": its md5,
    "package_md5": the md5 the haproxy package shipped it with (dpkg's conffile record) or None}}.

    The config's first line and checksums tell the deploy's own file (its generated banner) and the
    package's untouched default from a file someone else wrote, which the deploy must not overwrite.

    "sysv" is a host without systemd whose /etc/init.d scripts are run by hand or by its init (Debian's
    haproxy package ships /etc/init.d/haproxy); the sandbox's login node is one.
    """

    def snippet(self) -> str:
        return (
            "b=$(command -v haproxy || { [ -x /usr/sbin/haproxy ] && echo /usr/sbin/haproxy; }); "
            'if [ -n "$b" ]; then echo "version=$("$b" -v 2>/dev/null | head -n 1)"; fi; '
            "if command -v apt-get >/dev/null 2>&1; then echo apt=yes; fi; "
            "if command -v openssl >/dev/null 2>&1; then echo openssl=yes; fi; "
            "if [ -d /run/systemd/system ]; then echo service=systemd; "
            "systemctl is-active --quiet haproxy && echo running=yes; "
            "elif [ -d /etc/init.d ]; then echo service=sysv; "
            # The init script's own test (a haproxy process for each pid in its pidfile), not its
            # `status`: the script exits 0 for every action while haproxy.cfg is missing.
            "p=/var/run/haproxy.pid; [ -f $p ] && while read -r pid; do "
            'ps -o comm= -p "$pid" | grep -q haproxy && echo running=yes && break; done < $p; '
            "fi; "
            f"c={CONFIG}; if [ -f $c ]; then "
            'echo "cfg_first=$(head -n 1 $c | head -c 300)"; '
            'echo "cfg_md5=$(md5sum < $c | cut -d " " -f 1)"; '
            "echo \"cfg_pkg_md5=$(dpkg-query -W -f='${Conffiles}' haproxy 2>/dev/null | "
            "awk -v c=$c '$1 == c {print $2}')\"; "
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
            "openssl": seen.get("openssl") == "yes",
            "config": {
                "first_line": seen.get("cfg_first", ""),
                "md5": seen.get("cfg_md5"),
                "package_md5": seen.get("cfg_pkg_md5") or None,
            }
            if "cfg_md5" in seen
            else None,
        }
