"""Moved to :mod:`nemotron_deploy.service.rollout`; this shim goes away in the next release.

``python -m nemotron_deploy.rollout`` (the earlier layout's path) runs the new module's ``main`` with
the same arguments and exits with its code, printing nothing of its own.
"""

import sys

from nemotron_deploy.service.rollout import main

if __name__ == "__main__":
    sys.exit(main())
