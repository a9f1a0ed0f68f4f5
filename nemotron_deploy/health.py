"""Moved to :mod:`nemotron_deploy.service.health`; this shim goes away in the next release.

A login node upgraded from the earlier layout may still run ``python -m nemotron_deploy.health``
(its timer or cron entry before the re-deploy rewrites it, or an operator's own monitoring): this
runs the new module's ``main`` with the same arguments and exits with its code, printing nothing of
its own (Nagios parses the check's stdout).
"""

import sys

from nemotron_deploy.service.health import main

if __name__ == "__main__":
    sys.exit(main())
