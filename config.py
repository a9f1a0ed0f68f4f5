"""pyinfra's own config for this repository's deploys: pyinfra reads ./config.py from the directory
it runs in (the repository's root, as every command in the README runs), before its inventory and
before it makes its pools of parallel hosts.

PARALLEL: every host at once. pyinfra's default is 20 x this machine's CPUs (40 on 2 cores), so a
cluster of more hosts is connected, read and checked in waves: at 64 compute nodes (65 hosts) on 2
cores, one read per host in two waves cost 0.05-0.15 s of a ~2.5 s no-change re-deploy (README,
Benchmarks). The cap is pyinfra's own for this process's open-files limit (3 per host). The deploy
file can't set it: pyinfra has made its pools by the time it runs. `pyinfra --parallel N` still
overrides it.
"""

from pyinfra import config
from pyinfra.api.state import MAX_PARALLEL

config.PARALLEL = MAX_PARALLEL
