"""Deploy scaling: first and no-change deploy wall time per compute-node count, against the floor.

The floor is the least work any deploy that checks its files must do: one OpenSSH round trip per
host (login + N compute), all hosts in parallel, with the key exchange pyinfra's paramiko uses, whose
command reads what the deploy's read of its paths yields, the leanest way: one ``stat`` of every path
(kind, mode, owner, group, link target; links not followed) and one ``sha256sum`` of the regular files
among those the deploy checksums, picked by the shell's own tests, on the paths the deploy reads on that
host (``host_checks.paths_to_read``, the same lists ``host_checks.read_host`` batches into its one fact
command). It is written here, independently of the deploy's snippet (facts/files.py): a floor that ran
the deploy's own read would hide whatever that read costs. On this machine every node's sshd shares the
same cores, so the floor grows with N; the deploy is judged against the floor measured in the same round.

One round = for every size (rotated each round, so no size always follows the same one): reset
(remove what the deploy placed; the image stays pulled), first deploy, no-change re-deploy, floor.
Rounds repeat ``runs`` times, interleaved, so machine drift hits every size alike. One more
``--debug`` re-deploy per size (untimed, after a deploy at that size: the replica count, so the
login node's files, follows the size) counts the SSH commands each host receives. Every deploy's
peak memory is the pyinfra process's ru_maxrss (``cluster.deploy``).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time

from . import cluster, common

# The key exchange pyinfra's paramiko negotiates. OpenSSH's default (sntrup761x25519, post-quantum)
# costs ~70 ms of client CPU per connection here against ~0 for this one: with it, the floor would
# measure OpenSSH's key exchange on two shared cores, not one round trip per host.
FLOOR_KEX = ("-o", "KexAlgorithms=curve25519-sha256@libssh.org")


class BenchError(RuntimeError):
    """A deploy failed: the numbers would be meaningless, so the part stops and says why."""


def managed_paths(clu) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """role -> (paths the deploy's snapshot stats and checksums, files it only stats) on that role."""
    from nemotron_deploy.deploy import host_checks

    return {
        role: host_checks.paths_to_read(clu, name)
        for role, name in (("login", clu.login[0]), ("compute", clu.compute[0]))
    }


def floor_command(paths: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    """Two processes, whatever the number of paths: ``sha256sum`` of the regular files (not links)
    among the paths to checksum, ``stat`` of every path; run by the login shell sshd starts."""
    hashed, unhashed = paths
    return (
        f"set --; for p in {_quoted(hashed)}; do "
        'if [ -f "$p" ] && [ ! -L "$p" ]; then set -- "$@" "$p"; fi; done; '
        '[ $# -eq 0 ] || sha256sum -- "$@"; '
        f"stat -c '%F %a %U %G %N' -- {_quoted((*hashed, *unhashed))} 2>/dev/null; true"
    )


def _quoted(paths) -> str:
    return " ".join(shlex.quote(p) for p in paths)


def files_checksummed(output: str) -> int:
    return len(re.findall(r"^\\?[0-9a-f]{64}  ", output, re.MULTILINE))


def _with_options(ssh_argv: list[str], options: tuple[str, ...]) -> list[str]:
    return [ssh_argv[0], *options, *ssh_argv[1:]]


def floor(
    sandbox,
    nodes: int,
    paths: dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
    kex: tuple[str, ...] = FLOOR_KEX,
) -> dict:
    """One OpenSSH round trip per host (login + first N compute), all in parallel; wall time."""
    hosts = [(sandbox.login.name, paths["login"])]
    hosts += [(n.name, paths["compute"]) for n in sandbox.compute[:nodes]]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            _with_options(sandbox.ssh_argv(name, floor_command(p)), kex),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, p in hosts
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    wall = time.perf_counter() - t0
    failed = [name for (name, _), proc in zip(hosts, procs, strict=True) if proc.returncode != 0]
    if failed:
        errors = "; ".join(
            err.strip() for (_, err), proc in zip(outputs, procs, strict=True) if proc.returncode
        )
        raise BenchError(f"floor: ssh failed on {failed}: {errors}")
    checksummed = sum(files_checksummed(out) for out, _ in outputs)
    return {"wall": wall, "hosts": len(hosts), "files_checksummed": checksummed}


def count_ssh_commands(output: str) -> dict[str, int]:
    """Host -> commands pyinfra ran on it, from the ``--debug`` log of one deploy."""
    counts: dict[str, int] = {}
    for host in re.findall(r"Running command on (\S+?): ", output):
        counts[host] = counts.get(host, 0) + 1
    return counts


def _deploy(nodes: int, what: str, *extra: str) -> cluster.DeployRun:
    run = cluster.deploy(nodes, *extra)
    if not run.ok:
        raise BenchError(
            f"{what} on {nodes} nodes failed (exit {run.returncode}):\n{cluster.tail(run.output)}"
        )
    return run


def rotated(sizes: list[int], r: int) -> list[int]:
    k = r % len(sizes)
    return sizes[k:] + sizes[:k]


def run(sandbox, sizes: list[int], runs: int = 3, log=print) -> dict:
    """Interleaved rounds over ``sizes``; returns samples, per-size summaries and command counts."""
    clu = cluster.load_cluster()
    paths = managed_paths(clu)
    t0 = time.monotonic()
    with cluster.cron_paused(sandbox):
        return _measure(sandbox, clu, paths, sizes, runs, t0, log)


def _measure(sandbox, clu, paths, sizes: list[int], runs: int, t0: float, log) -> dict:
    # Warm-up at the largest size: pulls the image on every node, builds the health wheels. Nothing
    # of it is measured.
    warm = _deploy(max(sizes), "warm-up deploy")
    log(f"deploy: warm-up at {max(sizes)} nodes {warm.wall:.1f}s")
    samples: list[dict] = []
    for r in range(runs):
        for n in rotated(sizes, r):
            cluster.reset(sandbox, n, clu.settings)
            first = _deploy(n, "first deploy")
            again = _deploy(n, "no-change re-deploy")
            fl = floor(sandbox, n, paths)
            fl_default = floor(sandbox, n, paths, kex=())  # reported only: what the issue measured
            samples.append(
                {
                    "round": r,
                    "nodes": n,
                    "first": first.wall,
                    "first_changed": first.changed,
                    "first_pulled": cluster.op_changed(first.output, "Pull "),
                    "redeploy": again.wall,
                    "redeploy_changed": again.changed,
                    "first_rss": first.peak_rss,
                    "redeploy_rss": again.peak_rss,
                    "floor": fl["wall"],
                    "floor_default_kex": fl_default["wall"],
                    "floor_files": fl["files_checksummed"],
                }
            )
            log(
                f"deploy: round {r + 1}/{runs} {n:>2} nodes: first {first.wall:.2f}s "
                f"({first.changed} changed), re-deploy {again.wall:.2f}s ({again.changed} changed), "
                f"floor {fl['wall']:.2f}s, peak RSS {max(first.peak_rss, again.peak_rss) / 2**20:.0f} MiB"
            )
    commands: dict[int, dict] = {}
    for n in sizes:
        _deploy(n, "deploy at this size")  # from the previous size's files
        dbg = _deploy(n, "--debug re-deploy", "--debug")
        counts = count_ssh_commands(dbg.output)
        commands[n] = {
            "per_host": counts,
            "max": max(counts.values(), default=0),
            "uploads": dbg.output.count("Attempting upload of"),
            "changed": dbg.changed,
        }
        log(f"deploy: {n} nodes, SSH commands per host in a no-change re-deploy: max {commands[n]['max']}")
    summary = {}
    for n in sizes:
        rows = [s for s in samples if s["nodes"] == n]
        summary[n] = {
            key: common.Summary.of([s[key] for s in rows]).as_dict()
            for key in ("first", "redeploy", "floor", "floor_default_kex")
        }
        summary[n]["peak_rss_max"] = max(max(s["first_rss"], s["redeploy_rss"]) for s in rows)
        summary[n]["redeploy_changed_max"] = max((s["redeploy_changed"] or 0) for s in rows)
        summary[n]["first_pulled_max"] = max((s["first_pulled"] or 0) for s in rows)
    return {
        "sizes": sizes,
        "runs": runs,
        "paths": {k: list(v) for k, v in paths.items()},
        "samples": samples,
        "summary": summary,
        "commands": commands,
        "first_deploy_pull": "excluded: measured with the image already pulled on every node",
        "seconds": round(time.monotonic() - t0, 1),
    }
