"""Registry traffic: bytes the sandbox registry serves for one deploy that fetches the image.

For each runtime and node count: make the image absent (pyxis: remove the file imported into shared
storage; podman/docker: ``podman rmi``/``docker rmi`` on compute nodes 1..N), remember the end of the registry's access log
(``Sandbox.registry_access_log``, Apache combined format, one line per request with the bytes sent),
run the deploy, and add up the new lines that come from those N nodes' addresses (traffic from anyone
else in the same seconds is not counted). The deploy's other files are in place, so the fetch is the
only change; its wall time is the import (pyxis) or the slowest node's pull (podman, docker).

pyxis imports once for the cluster (target: 1x the image, whatever the node count); podman and docker
pull on every node, for comparison. docker's engines (one per compute node) are started for its rows
and stopped after them unless they were running already.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from . import cluster, common

LINE = re.compile(r'^(\S+) \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')
RUNTIMES = ("pyxis", "podman", "docker")  # what inventories/group_data/sandbox.py can fetch with


def parse(text: str) -> list[dict]:
    """Access-log lines -> {client, method, path, status, bytes}."""
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            client, method, path, status, size = m.groups()
            out.append(
                {
                    "client": client,
                    "method": method,
                    "path": path,
                    "status": int(status),
                    "bytes": 0 if size == "-" else int(size),
                }
            )
    return out


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode("utf-8", "replace")


def traffic(entries: list[dict], clients: set[str]) -> dict:
    mine = [e for e in entries if e["client"] in clients]
    per_client: dict[str, int] = {}
    for e in mine:
        per_client[e["client"]] = per_client.get(e["client"], 0) + e["bytes"]
    return {
        "bytes": sum(e["bytes"] for e in mine),
        "requests": len(mine),
        "blob_bytes": sum(e["bytes"] for e in mine if "/blobs/" in e["path"]),
        "manifest_bytes": sum(e["bytes"] for e in mine if "/manifests/" in e["path"]),
        "per_node": common.Summary.of([float(v) for v in per_client.values()]).as_dict(),
        "nodes_pulling": len(per_client),
    }


def run(sandbox, sizes: list[int], log=print) -> dict:
    """Bytes served per deploy for each size and each runtime the sandbox can fetch with."""
    found = cluster.runtimes(sandbox)
    out: dict = {"runtimes_found": found, "rows": [], "image_bytes": None}
    t0 = time.monotonic()
    for runtime in RUNTIMES:
        settings = cluster.load_cluster(runtime).settings
        out.setdefault("images", {})[runtime] = settings.image
        with cluster.engines(sandbox, runtime, log=log):
            _measure(sandbox, runtime, settings, sizes, out, log)
    cluster.deploy(max(sizes))  # leave the sandbox on its default runtime
    one = [r["bytes"] for r in out["rows"] if r["runtime"] == "pyxis"]
    out["image_bytes"] = min(one) if one else None
    out["not_measured"] = [r for r in found if r not in ("podman", "docker", "enroot")]
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _measure(sandbox, runtime: str, settings, sizes: list[int], out: dict, log) -> None:
    access_log = Path(sandbox.registry_access_log)
    cluster.deploy(max(sizes), runtime=runtime)  # converge this runtime's job files first
    for n in sizes:
        cluster.remove_images(sandbox, n, settings)
        offset = _log_size(access_log)
        run_ = cluster.deploy(n, runtime=runtime)
        if not run_.ok:
            raise RuntimeError(f"{runtime} deploy on {n} nodes failed:\n{cluster.tail(run_.output)}")
        time.sleep(0.3)  # the registry writes its access log line after the response
        entries = parse(_read_from(access_log, offset))
        row = {"runtime": runtime, "nodes": n, "deploy_wall": run_.wall, "changed": run_.changed}
        row.update(traffic(entries, {node.address for node in sandbox.compute[:n]}))
        out["rows"].append(row)
        log(
            f"registry: {runtime} {n:>2} nodes: {row['bytes']} bytes in {row['requests']} requests "
            f"({row['nodes_pulling']} nodes fetched), deploy with fetch {run_.wall:.2f}s"
        )
