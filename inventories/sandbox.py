"""The local sandbox cluster (`sudo nemotron-deploy sandbox up`): one login node and N compute nodes in
network namespaces on this machine, reached over SSH as root with the sandbox's own key and
known_hosts (strict host key checking). Settings for this inventory: group_data/sandbox.py.

NEMOTRON_SANDBOX_NODES (default 2) lists that many compute nodes; bring the sandbox up with the same
number: `nemotron-deploy sandbox up --nodes $NEMOTRON_SANDBOX_NODES`.
"""

import os

from nemotron_deploy.sandbox import layout as _layout

_sandbox = _layout.plan(int(os.environ.get("NEMOTRON_SANDBOX_NODES", "2")))


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
