"""The local sandbox cluster (`sudo nemotron-deploy sandbox up`): one login node and N compute nodes in
network namespaces on this machine, reached over SSH as root with the sandbox's own key and
known_hosts (strict host key checking). Settings for this inventory: group_data/sandbox.py.

NEMOTRON_SANDBOX_NODES (default 2) lists that many compute nodes; bring the sandbox up with the same
number: `nemotron-deploy sandbox up --nodes $NEMOTRON_SANDBOX_NODES`.
"""

import os

from nemotron_rehearsal.sandbox import layout as _layout
from nemotron_rehearsal.sandbox import netns as _netns

_sandbox = _layout.plan(int(os.environ.get("NEMOTRON_SANDBOX_NODES", "2")))

# Without the sandbox's bridge, 10.213.0.x would follow the default route off this machine: refuse to
# hand pyinfra these addresses then. (`nemotron-deploy validate/plan/render` never connect.)
if not os.environ.get("NEMOTRON_DEPLOY_OFFLINE") and not _netns.bridge_exists():
    raise RuntimeError(
        "the sandbox cluster is not up, so its hosts can't be reached: run "
        "`sudo .venv/bin/nemotron-deploy sandbox up` first (or `scripts/rehearse`)"
    )


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

compute = [(node.name, _ssh(node)) for node in _sandbox.compute]
