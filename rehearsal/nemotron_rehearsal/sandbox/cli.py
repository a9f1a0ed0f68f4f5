"""`nemotron-deploy sandbox up [--docker]|down|status|docker-stop`: the local Slurm cluster in network namespaces (root).

Exit codes: 0 success, 1 the sandbox failed (message says what and where to look), 2 usage error.
`status` exits 0 when the sandbox is up and healthy, 1 otherwise (so scripts can test it).
"""

from __future__ import annotations

import argparse
import json
import sys

from .proc import SandboxError


def _print_status(report: dict) -> None:
    if not report["nodes"]:
        extra = f" (leftover namespaces: {', '.join(report['leftovers'])})" if report.get("leftovers") else ""
        print(f"sandbox: not up{extra}")
        return
    print(f"sandbox: {'up' if report['up'] else 'DEGRADED'}  state dir {report['state_dir']}")
    print(f"  ssh: ssh -i {report['ssh_key']} -o UserKnownHostsFile={report['known_hosts']} root@<address>")
    print(f"  registry: {report['registry']} (TLS: {report.get('registry_tls')})  image: {report['image']}")
    print(f"  shared dir: {report['shared_dir']}  GPUs per node: {report['gpus_per_node']}")
    for n in report["nodes"]:
        daemons = " ".join(f"{d}{'' if ok else '(DOWN)'}" for d, ok in n["daemons"].items())
        slurm = f"  slurm:{n['slurm_state']}" if n["slurm_state"] else ""
        running = "running" if n["init_pid"] else "STOPPED"
        print(f"  {n['name']:<10} {n['address']:<12} {n['role']:<8} {running:<8} {daemons}{slurm}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nemotron-deploy sandbox",
        description="A local Slurm GPU cluster (login + compute nodes in Linux namespaces) to test deploys. "
        "Needs root on Debian/Ubuntu; installs the Debian packages it needs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="create the sandbox (or check that it is up)")
    p_up.add_argument("--nodes", type=int, default=2, help="compute nodes (default 2)")
    p_up.add_argument("--gpus-per-node", type=int, default=8, help="fake GPUs per compute node (default 8)")
    p_up.add_argument(
        "--docker",
        action="store_true",
        help="also start a Docker engine on every compute node (the docker runtime's path; implied by "
        "NEMOTRON_SANDBOX_RUNTIME=docker)",
    )
    sub.add_parser("docker-stop", help="stop the compute nodes' Docker engines (their images stay)")
    sub.add_parser("down", help="remove the sandbox and everything it created")
    p_status = sub.add_parser("status", help="report nodes, addresses and daemons")
    p_status.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    from . import cluster

    def log(message: str) -> None:
        print(f"sandbox: {message}", file=sys.stderr, flush=True)

    try:
        if args.command == "up":
            try:
                sandbox = cluster.up(
                    nodes=args.nodes,
                    gpus_per_node=args.gpus_per_node,
                    log=log,
                    docker=True if args.docker else None,
                )
            except ValueError as exc:
                parser.error(str(exc))
            for n in sandbox.nodes:
                print(f"{n.name}\t{n.address}\t{n.role}")
            return 0
        if args.command == "down":
            cluster.down(log=log)
            return 0
        if args.command == "docker-stop":
            cluster.stop_docker()
            return 0
        report = cluster.status()
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            _print_status(report)
        return 0 if report["up"] else 1
    except SandboxError as exc:
        print(f"nemotron-deploy sandbox {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
