"""A tiny stand-in for the `nvidia/nemo:24.01.framework` image, built without any network.

It is written directly as an OCI image layout (one gzip layer, a config, a manifest, an index), which
skopeo then pushes to the sandbox registry. It is NOT the NeMo container: it holds a README saying
so and a fixed 1 MiB payload, so that pulls move a measurable number of bytes. Everything (file
times, gzip header, payload) is fixed, so the digest is the same on every machine and every `up`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

PAYLOAD_BYTES = 1 << 20
EPOCH = 1704067200  # 2024-01-01, fixed for reproducible digests
README = b"""\
This is the nemotron-deploy sandbox's stand-in for nvcr.io/nvidia/nemo:24.01.framework.
It is not NVIDIA software and contains no NeMo: only this file and a fixed payload, so that
pulls from the sandbox registry move a known number of bytes.
"""


def _payload(size: int) -> bytes:
    """Deterministic, incompressible bytes (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode, data in (
            ("opt/", 0o755, None),
            ("opt/nemotron-sandbox-image/", 0o755, None),
            ("opt/nemotron-sandbox-image/README", 0o644, README),
            ("opt/nemotron-sandbox-image/payload.bin", 0o644, _payload(PAYLOAD_BYTES)),
        ):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime, info.mode, info.uname, info.gname = EPOCH, mode, "root", "root"
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def write_oci_layout(layout: Path, tag: str) -> str:
    """Write the image as an OCI layout at `layout` (tagged `tag`); return the manifest digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    tar = _layer_tar()
    gz = gzip.compress(tar, compresslevel=6, mtime=0)
    layer_digest = _blob(layout, gz)
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"org.opencontainers.image.description": "nemotron-deploy sandbox stand-in, not NeMo"},
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(tar).hexdigest()}"]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "nemotron-deploy sandbox"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _blob(layout, config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": len(gz),
            }
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = _blob(layout, manifest_bytes)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return manifest_digest
