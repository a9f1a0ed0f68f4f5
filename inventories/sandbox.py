"""The local sandbox cluster (`sudo nemotron-deploy sandbox up`): one login node and N compute nodes in
network namespaces on this machine, reached over SSH as root with the sandbox's own key and
known_hosts (strict host key checking). Settings for this inventory: group_data/sandbox.py.

The compute nodes are the ones the running sandbox has (its state file, written by `sandbox up
--nodes N`): nothing to keep in step with the size it was brought up with. When it is down, reading
the inventory for validation only (`nemotron-deploy validate/plan/render`, which set
NEMOTRON_DEPLOY_OFFLINE and never connect) gives the default layout of 2 compute nodes.

NEMOTRON_BENCH_NODES=N (the benchmark's, `python -m bench`): list only the first N compute nodes, so
one large sandbox serves every size of the benchmark.
"""

import os

from nemotron_rehearsal.sandbox import layout as _layout
from nemotron_rehearsal.sandbox import netns as _netns

_offline = bool(os.environ.get("NEMOTRON_DEPLOY_OFFLINE"))
# Without the sandbox's bridge, 10.213.0.x would follow the default route off this machine: refuse to
# hand pyinfra these addresses then. (`nemotron-deploy validate/plan/render` never connect.)
_sandbox = _layout.read_state() if _netns.bridge_exists() else None
if _sandbox is None:
    if not _offline:
        raise RuntimeError(
            "the sandbox cluster is not up, so its hosts can't be reached: run "
            "`sudo .venv/bin/nemotron-deploy sandbox up` first (or `scripts/rehearse`)"
        )
    _sandbox = _layout.plan()

_compute = _sandbox.compute
if os.environ.get("NEMOTRON_BENCH_NODES"):
    _first = int(os.environ["NEMOTRON_BENCH_NODES"])
    if not 1 <= _first <= len(_compute):
        raise RuntimeError(
            f"NEMOTRON_BENCH_NODES={_first}, but the sandbox has {len(_compute)} compute nodes: bring it "
            f"up with `sandbox up --nodes {_first}` (or more)"
        )
    _compute = _compute[:_first]


def _ssh(node):
    return {
        "ssh_hostname": node.address,
        "ssh_user": "root",
        "ssh_key": str(_sandbox.ssh_key),
        "ssh_known_hosts_file": str(_sandbox.known_hosts),
        "ssh_strict_host_key_checking": "yes",
        "ssh_allow_agent": False,
        "ssh_look_for_keys": False,
    }


login = [(_sandbox.login.name, _ssh(_sandbox.login))]

compute = [(node.name, _ssh(node)) for node in _compute]
