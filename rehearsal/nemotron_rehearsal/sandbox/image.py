"""A NeMo-shaped stand-in for `nvcr.io/nvidia/nemo:24.01.framework`, built offline from this host's files.

It is NOT the NeMo container; it has what a job needs of it, at the same paths, so that the job runs
inside the container and nothing from the host leaks in:
 1. userland: bash, dash as /bin/sh, the few tools the job scripts call, Python 3 with its standard
    library (no tests), sentencepiece (as NeMo's image has it), the shared libraries they load (found
    with ldd), /etc/passwd and /etc/group, and Debian 12's merged-/usr links;
 2. NeMo: the stand-in server (emulator.py) at
    /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py and, again, as the module NeMo's
    script imports its server from (nemo.collections.nlp.modules.common.text_generation_server, under
    /opt/NeMo/nemo, importable through a .pth file as NeMo's editable install makes it), a README
    saying what this is, and a fixed 1 MiB payload so that pulls move a known number of bytes;
and the environment NeMo's image sets (NVIDIA_VISIBLE_DEVICES=all among it).

It is written as an OCI layout (skopeo pushes it as Docker v2 schema 2: enroot sends no OCI Accept
header, and Debian's registry 2.8 then refuses an OCI manifest). File times, owners, order and gzip
headers are fixed, so one host builds the same digest at every `up`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from .layout import NODE_EMULATOR_PATH

PAYLOAD_BYTES = 1 << 20
EPOCH = 1704067200  # 2024-01-01, fixed for reproducible digests
README = b"""\
This is the nemotron-deploy sandbox's stand-in for nvcr.io/nvidia/nemo:24.01.framework.
It is not NVIDIA software and contains no NeMo: a minimal userland, Python's standard library and a
protocol emulator of NeMo's text-generation server at the path NeMo's image has it.
"""
# What NeMo's image sets (docker inspect nvcr.io/nvidia/nemo:24.01.framework), that a job can notice.
ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "NVIDIA_VISIBLE_DEVICES=all",
    "NVIDIA_DRIVER_CAPABILITIES=compute,utility,video",
    "PYTHONIOENCODING=utf-8",
    "LC_ALL=C.UTF-8",
]
# What the job's scripts run inside the container (nemo_inference.sh, the health zipapp, call_server).
TOOLS = (
    "bash", "dash", "env", "date", "hostname", "sleep", "touch", "cat", "id", "mkdir", "rm", "ls",
    "grep", "sed", "head", "tail", "uname", "true", "false",
)  # fmt: skip
# Debian's Python (the nodes run it too), whatever interpreter runs the sandbox code.
PYTHON = Path(os.path.realpath("/usr/bin/python3"))
# Parts of the standard library no job imports (and the static library, 25 MB of it).
STDLIB_SKIP = {
    "test", "__pycache__", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "site-packages", "dist-packages",
}  # fmt: skip
MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


class _Tree:
    """Members of one layer: path -> (mode, bytes) for files, ("dir",) and ("link", target)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple] = {}

    def add_dirs(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), ("dir",))

    def add_file(self, rel: str, data: bytes, mode: int) -> None:
        self.add_dirs(rel)
        self.entries[rel] = ("file", mode, data)

    def add_link(self, rel: str, target: str) -> None:
        self.add_dirs(rel)
        self.entries[rel] = ("link", target)

    def add_host_path(self, path: str) -> None:
        """A host file with every symlink on its way (in dirs and in the name), as the host has them."""
        p = Path(path)
        parent = Path(os.path.realpath(p.parent))
        rel = str(parent / p.name).lstrip("/")
        if rel in self.entries:
            return
        full = Path("/") / rel
        if full.is_symlink():
            target = os.readlink(full)
            self.add_link(rel, target)
            self.add_host_path(str(full.parent / target) if not target.startswith("/") else target)
        elif full.is_file():
            self.add_file(rel, full.read_bytes(), full.stat().st_mode & 0o7777)

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in sorted(self.entries):
                entry = self.entries[rel]
                info = tarfile.TarInfo(rel)
                info.mtime, info.uname, info.gname = EPOCH, "root", "root"
                if entry[0] == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif entry[0] == "link":
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry[1], 0o777
                    tar.addfile(info)
                else:
                    info.mode, info.size = entry[1], len(entry[2])
                    tar.addfile(info, io.BytesIO(entry[2]))
        return buf.getvalue()


def _shared_libraries(paths: list[str]) -> set[str]:
    """Every library the ELF files in `paths` load, as ldd finds them on this host."""
    libs: set[str] = set()
    for chunk in range(0, len(paths), 200):
        out = subprocess.run(["ldd", *paths[chunk : chunk + 200]], capture_output=True, text=True).stdout
        libs.update(re.findall(r"(/\S+\.so[\w.]*) \(0x", out))
    return libs


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"\x7fELF"


def userland() -> _Tree:
    tree = _Tree()
    for name, target in MERGED_USR.items():
        tree.add_link(name, target)
    for sub in ("usr/sbin", "usr/lib64", "tmp", "proc", "sys", "dev", "run", "root", "var/tmp", "etc"):
        tree.entries.setdefault(sub, ("dir",))
        tree.add_dirs(sub + "/x")
    tree.add_file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        0o644,
    )
    tree.add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)
    binaries = [shutil.which(t, path="/usr/bin:/bin") for t in TOOLS]
    missing = [t for t, b in zip(TOOLS, binaries, strict=True) if b is None]
    if missing:
        raise FileNotFoundError(f"the stand-in image needs {', '.join(missing)} from this host")
    elf = [str(b) for b in binaries if b]
    for b in elf:
        tree.add_host_path(str(b))
    tree.add_link("usr/bin/sh", "dash")
    version = PYTHON.name  # python3.11: its standard library is /usr/lib/python3.11
    tree.add_host_path(str(PYTHON))
    tree.add_link("usr/bin/python3", PYTHON.name)
    tree.add_link("usr/bin/python", PYTHON.name)
    elf.append(str(PYTHON))
    stdlib = Path("/usr/lib") / version
    for path in sorted(stdlib.rglob("*")):
        rel_parts = path.relative_to(stdlib).parts
        if any(part in STDLIB_SKIP for part in rel_parts) or rel_parts[0].startswith("config-"):
            continue
        if path.is_symlink() or path.is_file():
            tree.add_host_path(str(path))
            if path.suffix == ".so" and not path.is_symlink() and _is_elf(path):
                elf.append(str(path))
    elf += _add_sentencepiece(tree, version)
    for lib in sorted(_shared_libraries(elf)):
        if "/site-packages/" not in lib:  # the wheel's own libraries: in the image beside it ($ORIGIN)
            tree.add_host_path(lib)
    tree.add_host_path("/lib64/ld-linux-x86-64.so.2")
    return tree


def _add_sentencepiece(tree: _Tree, version: str) -> list[str]:
    """NeMo's image has sentencepiece (the replica's front loads the checkpoint's tokenizer with it):
    this interpreter's copy (a dev dependency), into the image's dist-packages; its ELF files."""
    import sysconfig

    import sentencepiece

    if sysconfig.get_python_version() != version.removeprefix("python"):
        raise RuntimeError(
            f"the stand-in image's Python is {version}, this interpreter is "
            f"{sysconfig.get_python_version()}: run the sandbox with the {version} venv (scripts/setup)"
        )
    package = Path(sentencepiece.__file__).parent
    site = package.parent
    target = f"usr/local/lib/{version}/dist-packages"
    elf = []
    for path in sorted([*package.rglob("*"), *site.glob("sentencepiece.libs/*")]):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        tree.add_file(f"{target}/{path.relative_to(site).as_posix()}", path.read_bytes(), 0o644)
        if _is_elf(path):
            elf.append(str(path))
    return elf


# NeMo's package, as far as megatron_gpt_eval.py's server needs it: the emulator (which holds the
# MegatronServer stand-in) at the module path NeMo's script imports it from.
NEMO_SERVER_MODULE = "nemo/collections/nlp/modules/common/text_generation_server.py"
NEMO_PACKAGE_INIT = (
    b'"""nemotron-deploy sandbox: stand-in package, not NeMo (see /opt/nemotron-sandbox-image/README)."""\n'
)


def nemo_package(emulator: bytes) -> dict[str, bytes]:
    """{path under /, without the leading slash: bytes} of the stand-in `nemo` package in NeMo's tree."""
    root = NODE_EMULATOR_PATH.lstrip("/").split("/examples/", 1)[0]  # opt/NeMo
    files = {}
    parts = NEMO_SERVER_MODULE.split("/")
    for depth in range(1, len(parts)):
        files[f"{root}/{'/'.join(parts[:depth])}/__init__.py"] = NEMO_PACKAGE_INIT
    files[f"{root}/{NEMO_SERVER_MODULE}"] = emulator
    return files


def nemo_path_entry() -> tuple[str, bytes]:
    """The .pth file that puts NeMo's tree on the image's sys.path (pip install -e does the same)."""
    version = PYTHON.name  # python3.11
    root = NODE_EMULATOR_PATH.split("/examples/", 1)[0]
    return f"usr/local/lib/{version}/dist-packages/nemo_toolkit.pth", f"{root}\n".encode()


def nemo(emulator: bytes) -> _Tree:
    tree = _Tree()
    tree.add_file(NODE_EMULATOR_PATH.lstrip("/"), emulator, 0o755)
    for rel, data in nemo_package(emulator).items():
        tree.add_file(rel, data, 0o644)
    tree.add_file(*nemo_path_entry(), 0o644)
    tree.add_file("opt/nemotron-sandbox-image/README", README, 0o644)
    tree.add_file("opt/nemotron-sandbox-image/payload.bin", _payload(PAYLOAD_BYTES), 0o644)
    return tree


def _payload(size: int) -> bytes:
    """Deterministic, incompressible bytes (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def write_oci_layout(layout: Path, tag: str, emulator: bytes) -> str:
    """Write the image as an OCI layout at `layout` (tagged `tag`); return the manifest digest."""
    shutil.rmtree(layout, ignore_errors=True)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    layers, diff_ids = [], []
    for tree in (userland(), nemo(emulator)):
        tar = tree.tar()
        gz = gzip.compress(tar, compresslevel=6, mtime=0)
        diff_ids.append(f"sha256:{hashlib.sha256(tar).hexdigest()}")
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": _blob(layout, gz),
                "size": len(gz),
            }
        )
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ENV,
            "WorkingDir": "/workspace",
            "Labels": {"org.opencontainers.image.description": "nemotron-deploy sandbox stand-in, not NeMo"},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "nemotron-deploy sandbox"}]
        * len(layers),
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
        "layers": layers,
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
