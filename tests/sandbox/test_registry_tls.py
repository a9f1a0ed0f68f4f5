"""The sandbox's TLS registry (sandbox/registry_tls.py): the plain-HTTP registry's images over HTTPS,
with a certificate from a sandbox CA that the nodes trust and the host does not. The deploy's logins
(the NGC key) go there, verified: tests/sandbox/test_deploy.py (pyxis, podman), test_docker.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from nemotron_rehearsal.sandbox import registry_tls
from sshutil import TLS_REGISTRY, ssh

V2S2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST = f"https://{TLS_REGISTRY}/v2/nvidia/nemo/manifests/24.01.framework"


def _curl(*args: str) -> str:
    return "curl -sS -o /dev/null -w '%{http_code}' " + " ".join(args)


@pytest.mark.parametrize("node", ["sb-login", "sb-node01"])
def test_the_nodes_verify_the_registry_with_their_own_trust(sandbox, node):
    """curl (what enroot fetches with) inside a node: the system bundle there has the sandbox CA, and
    the registry serves the image the inventory names, in the form enroot asks for."""
    got = ssh(sandbox, node, _curl("-I", "-H", f"'Accept: {V2S2}'", MANIFEST), check=False)
    assert (got.returncode, got.stdout) == (0, "200"), f"{node}: {got.stdout}{got.stderr}"


def test_podman_and_docker_find_the_ca_in_the_nodes_certs_dirs(sandbox):
    ca = registry_tls.CA_CERT.read_text()
    for node in sandbox.compute_names:
        for tool in ("containers", "docker"):
            got = ssh(sandbox, node, f"cat /etc/{tool}/certs.d/{TLS_REGISTRY}/ca.crt", check=False).stdout
            assert got == ca, f"{node}: /etc/{tool}/certs.d/{TLS_REGISTRY}/ca.crt is not the sandbox CA"


def test_the_host_does_not_trust_the_sandbox_ca(sandbox):
    """Only the nodes' /etc overlays carry the CA: the host's own trust store is left alone."""
    host = subprocess.run(["sh", "-c", _curl(f"https://{TLS_REGISTRY}/v2/")], capture_output=True, text=True)
    assert host.returncode == 60, f"the host verified the sandbox registry: {host.stdout}{host.stderr}"
    ca_body = "".join(registry_tls.CA_CERT.read_text().splitlines()[1:-1])
    assert ca_body not in "".join(Path("/etc/ssl/certs/ca-certificates.crt").read_text().splitlines())


def test_the_tls_registry_is_read_only(sandbox):
    """It shares the plain registry's storage: only the plain one is pushed to (by `sandbox up`)."""
    got = ssh(
        sandbox, "sb-node01", _curl("-X", "POST", f"https://{TLS_REGISTRY}/v2/nvidia/nemo/blobs/uploads/")
    )
    assert got.stdout != "202", "the TLS registry accepted an upload"
