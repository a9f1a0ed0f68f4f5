"""``python -m bench``: run every benchmark and write the results (see ``--help``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import check_cost, cluster, common, deploy_scaling, endpoint, readiness, registry, report

PARTS = ("readiness", "check", "endpoint", "deploy", "registry")
SANDBOX_PARTS = ("deploy", "registry")
REGISTRY_MAX_NODES = 16
DEFAULT_OUT = common.REPO / "bench" / "results"

DESCRIPTION = """\
Benchmarks of nemotron-deploy. Writes README-table.md (paste-ready for the README's performance
section), results.csv, samples.csv, results.json and bench.png into --out.

parts (--parts, default all):
  readiness  --readiness-starts emulator starts (random load delay, loopback, own port each):
             time from "can generate" (NEMO_EMULATOR_READY_FILE) to the return of
             `python -m nemotron_deploy.service.health --wait`, and of the model card's curl loop + sleep 5
  check      one single check vs curl vs a bare stdlib Python probe: wall + CPU, --check-runs each;
             import time of nemotron_deploy.service.health
  endpoint   HAProxy with the endpoint config rendered from inventories/h100.py (2 slots) in front of
             emulator processes on loopback: requests/s of 8 clients with 1 and 2 replicas (0.1 s per
             generation, rounds 1,2,2,1 of --endpoint-seconds); latency added by the endpoint (p50,
             p99 of --endpoint-requests sequential requests, direct vs through, interleaved); one
             replica SIGKILLed under load (4 clients): failed requests, gap, time to slot DOWN;
             sustained load (2 clients back to back, replicas rolled again and again): failed
             requests; one refused connection on the only serving replica: failed requests
  deploy     first deploy (after a reset, image already pulled) and no-change re-deploy for each of
             --sizes compute nodes, --runs interleaved rounds, next to the floor (one OpenSSH round
             trip per host that stats + checksums every managed path); SSH commands per host in a
             no-change re-deploy (pyinfra --debug); peak memory of the pyinfra process
  registry   bytes the sandbox registry serves for one deploy that pulls the image, per size up to 16

The deploy and registry parts need root and the sandbox: it is brought up with max(--sizes) compute
nodes if it has fewer (one sandbox for all sizes: NEMOTRON_BENCH_NODES makes the inventory list the
first N nodes), and put back to the size it had afterwards (--keep-sandbox leaves it as is). They leave the sandbox deployed.
"""

EPILOG = """\
examples:
  sudo .venv/bin/python -m bench                      # everything: about 7 minutes (6-9) on 2 cores
  sudo bench/run                                      # the same, from any directory
  .venv/bin/python -m bench --parts readiness,check   # loopback only, no root, about 1 minute
  .venv/bin/python -m bench --parts endpoint          # loopback only, no root, about 1 minute
  sudo .venv/bin/python -m bench --sizes 2 --runs 1 --readiness-starts 2 --check-runs 3 --out /tmp/b
"""


def _csv_ints(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 2,4,8,16") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: node counts must be >= 1")
    return values


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}: choose from {','.join(PARTS)}")
    return [p for p in PARTS if p in parts]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    p.add_argument(
        "--parts", type=_parts, default=list(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    p.add_argument(
        "--sizes",
        type=_csv_ints,
        default=[2, 4, 8, 16, 32, 64, 128],
        help="compute node counts (default 2,4,8,16,32,64,128; the registry part uses those up to 16)",
    )
    p.add_argument("--runs", type=int, default=3, help="interleaved deploy rounds per size (default 3)")
    p.add_argument("--readiness-starts", type=int, default=20, help="emulator starts per waiter (default 20)")
    p.add_argument(
        "--delay",
        type=float,
        nargs=2,
        default=(0.5, 3.0),
        metavar=("MIN", "MAX"),
        help="emulator load delay range in seconds (default 0.5 3)",
    )
    p.add_argument(
        "--check-runs", type=int, default=30, help="runs of each single-check variant (default 30)"
    )
    p.add_argument(
        "--endpoint-seconds",
        type=float,
        default=5.0,
        help="endpoint part: seconds per throughput round (4 rounds) and of load after the kill; the "
        "sustained load runs max(10, 4x this) (default 5)",
    )
    p.add_argument(
        "--endpoint-requests",
        type=int,
        default=1000,
        help="endpoint part: latency samples per path, direct and through the endpoint (default 1000)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for the load delays (default: random)")
    p.add_argument(
        "--lock",
        choices=("exclusive", "none"),
        default="exclusive",
        help="sandbox lock for the deploy and registry parts: exclusive (default) waits for test "
        "sessions to finish and keeps new ones out meanwhile (a reset under a running test breaks it, "
        "and its traffic would skew the numbers); none: the caller holds it (tests/test_bench.py)",
    )
    p.add_argument(
        "--keep-sandbox", action="store_true", help="leave the sandbox at the size the benchmark used"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if min(args.runs, args.readiness_starts, args.check_runs, args.endpoint_requests) < 1:
        parser().error("--runs, --readiness-starts, --check-runs and --endpoint-requests must be >= 1")
    if args.endpoint_seconds < 1:
        parser().error("--endpoint-seconds must be >= 1")
    os.chdir(common.REPO)  # the inventory and deploy paths are relative to the repository
    needs_sandbox = any(p in SANDBOX_PARTS for p in args.parts)
    if needs_sandbox and os.geteuid() != 0:
        print(
            "the deploy and registry parts need root (the sandbox): run with sudo, or --parts readiness,check,endpoint"
        )
        return 2
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    results: dict = {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": common.machine(),
        "parts": args.parts,
    }
    before: int | None = None
    resized = False
    try:
        if "readiness" in args.parts:
            results["readiness"] = readiness.run(args.readiness_starts, *args.delay, seed=args.seed, log=log)
        if "check" in args.parts:
            results["check_cost"] = check_cost.run(args.check_runs, log=log)
        if "endpoint" in args.parts:
            results["endpoint"] = endpoint.run(args.endpoint_seconds, args.endpoint_requests, log=log)
        if needs_sandbox:
            with cluster.sandbox_lock(args.lock, log=log):
                try:
                    common.compile_package()  # deploys run with the bytecode beside the sources
                    sandbox, before = cluster.ensure_nodes(max(args.sizes), log=log)
                    resized = before != len(sandbox.compute)
                    results["sandbox_nodes"] = len(sandbox.compute)
                    if "deploy" in args.parts:
                        results["deploy"] = deploy_scaling.run(sandbox, args.sizes, args.runs, log=log)
                    if "registry" in args.parts:
                        # Bytes served grow linearly per node (podman) or not at all (pyxis): the
                        # small sizes show it; podman pulling on 128 nodes would only add minutes.
                        small = [n for n in args.sizes if n <= REGISTRY_MAX_NODES] or [min(args.sizes)]
                        results["registry"] = registry.run(sandbox, small, log=log)
                finally:
                    if resized and not args.keep_sandbox:
                        cluster.restore(before, log=log)
    except Exception as exc:  # noqa: BLE001 - say which part broke, keep what was measured
        log(f"benchmark failed: {type(exc).__name__}: {exc}")
        results["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        common.cleanup()
    results["total_seconds"] = time.monotonic() - t0
    paths = report.write(results, args.out)
    print()
    print(paths["table"].read_text())
    for name, path in paths.items():
        print(f"{name:>8}: {path}")
    return 1 if "error" in results else 0


if __name__ == "__main__":
    sys.exit(main())
