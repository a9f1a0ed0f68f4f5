"""The sandbox's TLS registry: the same images as the plain-HTTP one (registry.py), over HTTPS that the
nodes verify, for what must never go unverified: a login with the NGC key (the deploy refuses to send
it to a registry with `registry_tls_verify = false`).

A second docker-registry on the login node, port 5443, serving the first one's storage read-only (only
the plain-HTTP instance is pushed to). Its certificate is signed by a sandbox CA that `sandbox up`
makes once with openssl and keeps under the state dir. The CA is trusted inside the nodes only, in
their /etc overlays, never in the host's trust store:
 - the system CA bundle (/etc/ssl/certs/ca-certificates.crt: what enroot's curl reads), the host's
   bundle plus the sandbox CA;
 - /etc/containers/certs.d/<host:port>/ca.crt for podman;
 - /etc/docker/certs.d/<host:port>/ca.crt for docker (the engine reads it at each pull).
The inventory selects it with NEMOTRON_SANDBOX_REGISTRY=tls (inventories/group_data/sandbox.py).
"""

from __future__ import annotations

import http.client
import ssl
import subprocess
from pathlib import Path

from . import nodes
from .layout import LOGIN_ADDRESS, LOGIN_NAME, STATE_DIR, Node, Sandbox
from .proc import SandboxError, tail, wait_until
from .registry import REGISTRY_DIR

TLS_PORT = 5443
TLS_REGISTRY = f"{LOGIN_ADDRESS}:{TLS_PORT}"
TLS_DIR = STATE_DIR / "registry-tls"
CA_CERT = TLS_DIR / "ca.crt"
CA_KEY = TLS_DIR / "ca.key"
SERVER_CERT = TLS_DIR / "server.crt"
SERVER_KEY = TLS_DIR / "server.key"
CONFIG = TLS_DIR / "config.yml"
ACCESS_LOG = TLS_DIR / "access.log"
LOG = TLS_DIR / "registry.log"
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
NODE_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CERT_DAYS = 3650


def config_yaml() -> str:
    return f"""\
# The nemotron-deploy sandbox's TLS registry (generated): the plain-HTTP registry's storage, read-only.
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {REGISTRY_DIR / "data"}
  maintenance:
    uploadpurging:
      enabled: false
    readonly:
      enabled: true
http:
  addr: {TLS_REGISTRY}
  tls:
    certificate: {SERVER_CERT}
    key: {SERVER_KEY}
"""


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SandboxError(f"openssl {args[0]} failed (exit {result.returncode}): {result.stderr.strip()}")


def _certs_valid() -> bool:
    """The CA and the server certificate exist, the server's is the CA's, for the login's address,
    and neither expires within a day."""
    if not all(p.is_file() for p in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)):
        return False
    checks = [
        ["verify", "-CAfile", str(CA_CERT), "-verify_ip", LOGIN_ADDRESS, str(SERVER_CERT)],
        ["x509", "-checkend", "86400", "-noout", "-in", str(CA_CERT)],
        ["x509", "-checkend", "86400", "-noout", "-in", str(SERVER_CERT)],
    ]
    return all(subprocess.run(["openssl", *c], capture_output=True).returncode == 0 for c in checks)


def ensure_certs() -> None:
    """The sandbox CA and the registry's server certificate (its address and name), made once: kept
    while valid, so nodes and tests trust the same CA across `up`s. Keys 0600, in a 0700 dir."""
    TLS_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    TLS_DIR.chmod(0o700)
    if _certs_valid():
        return
    days = str(CERT_DAYS)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(CA_KEY), "-out", str(CA_CERT), "-days", days,
        "-subj", "/CN=nemotron-deploy sandbox CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    csr = TLS_DIR / "server.csr"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(SERVER_KEY), "-out", str(csr), "-subj", f"/CN={LOGIN_NAME}",
    )  # fmt: skip
    ext = TLS_DIR / "server.ext"
    ext.write_text(
        f"subjectAltName=IP:{LOGIN_ADDRESS},DNS:{LOGIN_NAME}\n"
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(CA_CERT), "-CAkey", str(CA_KEY), "-CAcreateserial",
        "-out", str(SERVER_CERT), "-days", days, "-extfile", str(ext),
    )  # fmt: skip
    for path in (CA_KEY, SERVER_KEY):
        path.chmod(0o600)
    csr.unlink()
    ext.unlink()
    if not _certs_valid():
        raise SandboxError(f"the sandbox CA made in {TLS_DIR} does not verify its registry certificate")


def trust_files() -> dict[str, str]:
    """Node /etc files that make the sandbox CA trusted inside a node (and nowhere else)."""
    ca = CA_CERT.read_text()
    bundle = HOST_BUNDLE.read_text() if HOST_BUNDLE.is_file() else ""
    return {
        NODE_BUNDLE: f"{bundle.rstrip()}\n# nemotron-deploy sandbox CA (the nodes' copy only)\n{ca}".lstrip(),
        f"/etc/containers/certs.d/{TLS_REGISTRY}/ca.crt": ca,
        f"/etc/docker/certs.d/{TLS_REGISTRY}/ca.crt": ca,
    }


def prepare(sandbox: Sandbox) -> None:
    """Before the nodes start: the CA and certificate, the registry's config, the nodes' trust."""
    ensure_certs()
    CONFIG.write_text(config_yaml())
    files = trust_files()
    for node in sandbox.nodes:
        for path, text in files.items():
            target = nodes.host_path(node, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


def refresh(sandbox: Sandbox) -> None:
    """Bring a running sandbox up to date (an older `up` made no TLS registry): the same files, written
    from inside each node (its /etc is a mounted overlay) only where they differ; the registry started
    if it does not answer."""
    ensure_certs()
    if not CONFIG.is_file() or CONFIG.read_text() != config_yaml():
        CONFIG.write_text(config_yaml())
    write = 'mkdir -p "${1%/*}" && cat > "$1.tmp" && mv "$1.tmp" "$1"'
    files = trust_files()
    for node in sandbox.nodes:
        for path, text in files.items():
            if nodes.run_in(node, ["cat", path], check=False).stdout != text:
                nodes.run_in(node, ["sh", "-c", write, "sh", path], input=text, what=f"writing {path}")
    if not answers():
        start(sandbox.login)


def answers() -> bool:
    """GET /v2/ over HTTPS, verified with the sandbox CA against the login's address: 200."""
    if not CA_CERT.is_file():
        return False
    context = ssl.create_default_context(cafile=str(CA_CERT))
    conn = http.client.HTTPSConnection(LOGIN_ADDRESS, TLS_PORT, timeout=2, context=context)
    try:
        conn.request("GET", "/v2/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start(login: Node, timeout: float = 15) -> None:
    nodes.start_daemon(
        login, ["/usr/bin/docker-registry", "serve", str(CONFIG)], LOG, foreground=True, stdout=ACCESS_LOG
    )
    wait_until(
        answers, timeout=timeout, what=f"docker-registry (TLS) on {TLS_REGISTRY}", hint=lambda: tail(LOG)
    )
