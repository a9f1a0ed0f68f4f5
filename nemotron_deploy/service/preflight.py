"""``nemotron-deploy preflight``: is this GPU node fit to hold its share of Nemotron-4-340B?

Run on a GPU node before (or instead of) waiting in the queue to find out: it reads ``nvidia-smi``
(or a saved capture), then checks the GPU count, model, memory, driver version, uncorrected ECC
errors, pending page retirements and row-remapping state, the checks DeepOps' node health check
makes. It prints OK or CRITICAL with every problem found, in the Nagios plugin convention
(0 OK, 2 CRITICAL, 3 UNKNOWN for usage errors).

The pure logic is :func:`check_gpus`, so that the deploy can run the same checks on the output of
its pyinfra fact. Keep this module light: no pydantic; the GPU catalog (``catalog/gpus.yaml``) is
read with pyyaml only when ``--expect-gpu`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .nagios import CRITICAL, OK, STATUS_NAMES, UNKNOWN, WARNING  # noqa: F401  (the check's codes)
from .nvidia_smi import (
    NVIDIA_SMI_QUERY,
    NVIDIA_SMI_QUERY_ARGV,
    GpuInfo,
    GpuList,
    NvidiaSmiParseError,
    parse_query_csv,
    parse_query_xml,
    version_tuple,
)

PROG = "nemotron-deploy preflight"
CATALOG = Path(__file__).resolve().parents[1] / "catalog" / "gpus.yaml"  # nemotron_deploy/catalog/
MEMORY_TOLERANCE = 0.02  # drivers and board variants shift memory.total by a few hundred MiB
NVIDIA_SMI_TIMEOUT = 60.0  # nvidia-smi can hang for minutes on a wedged GPU


class UsageError(Exception):
    """Bad arguments or an unusable catalog: UNKNOWN (3)."""


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


def _label(gpu: GpuInfo) -> str:
    return f"GPU {gpu.index}" + (f" ({gpu.pci_bus_id})" if gpu.pci_bus_id else "")


def _memory_mismatch(gpu: GpuInfo, expected: int, tolerance: float) -> str | None:
    if gpu.memory_total_mib is None:
        return "none"
    return str(gpu.memory_total_mib) if abs(gpu.memory_total_mib - expected) > tolerance * expected else None


def _group(gpus: Sequence[GpuInfo], key: Callable[[GpuInfo], str | None]) -> list[tuple[str, str]]:
    """``[(value, "GPU 0, 1, 3")]`` for GPUs whose ``key`` is not None: one problem per distinct value."""
    groups: dict[str, list[str]] = {}
    for g in gpus:
        value = key(g)
        if value is not None:
            groups.setdefault(value, []).append(str(g.index))
    return [(value, "GPU " + ", ".join(idx)) for value, idx in groups.items()]


def check_gpus(
    gpus: Sequence[GpuInfo],
    expect_names: Sequence[str] | None = None,
    expect_memory_mib: int | None = None,
    expect_count: int | None = None,
    min_driver: str | None = None,
    *,
    memory_tolerance: float = MEMORY_TOLERANCE,
) -> list[str]:
    """Every problem with this node's GPUs, each a sentence saying what is wrong and what to do.

    An empty list means fit. ``None`` expectations are not checked; health checks (ECC, retired
    pages, row remapping) always are. Values nvidia-smi reports as ``[N/A]`` are not problems: H100
    and H200 have no page retirement (row remapping replaced it).
    """
    problems: list[str] = []
    if not gpus:
        problems.append(
            "nvidia-smi lists no GPU: check that the NVIDIA driver is loaded (lsmod | grep nvidia) "
            "and that the job was given GPUs (--gpus-per-node / --gres=gpu:N)"
        )
    if expect_count is not None and len(gpus) != expect_count:
        problems.append(
            f"found {len(gpus)} GPU(s), expected {expect_count}: a missing GPU may have fallen off the bus "
            "(look for Xid 79 in dmesg) or the allocation is smaller than planned"
        )
    wanted = {_norm(n) for n in expect_names or []}
    names = sorted({g.name or "?" for g in gpus})
    if not wanted and len(names) > 1:
        problems.append(
            f"mixed GPU models on one node ({', '.join(names)}): tensor parallelism needs one model"
        )
    if wanted:
        for name, group in _group(gpus, lambda g: g.name if _norm(g.name or "") not in wanted else None):
            problems.append(
                f"{group} {'is' if ',' not in group else 'are'} {name!r}, expected "
                f"{' or '.join(repr(n) for n in expect_names or [])}: wrong node type for this inventory"
            )
    if expect_memory_mib is not None:
        for mib, group in _group(gpus, lambda g: _memory_mismatch(g, expect_memory_mib, memory_tolerance)):
            problems.append(
                f"{group}: nvidia-smi reports no memory.total (GPU in a bad state?)"
                if mib == "none"
                else f"{group} {'has' if ',' not in group else 'have'} {mib} MiB, expected about "
                f"{expect_memory_mib} MiB: wrong GPU variant, or MIG/partitioning is enabled"
            )
    for g in gpus:
        label = _label(g)
        if g.ecc_uncorrected_volatile:
            problems.append(
                f"{label} has {g.ecc_uncorrected_volatile} uncorrected volatile ECC error(s) since the driver "
                "loaded: drain the node and reset the GPU (nvidia-smi -r) before using it"
            )
        if g.retired_pages_pending:
            problems.append(
                f"{label} has retired pages pending: reset the GPU or reboot the node to retire them"
            )
        if g.remapped_rows_failure:
            problems.append(
                f"{label} had a row-remapping failure: the GPU needs replacement (RMA); drain the node"
            )
        if g.remapped_rows_pending:
            problems.append(f"{label} has row remapping pending: reset the GPU or reboot the node")
    if min_driver:
        need = version_tuple(min_driver)
        for version in sorted({g.driver_version or "" for g in gpus}):
            if not version:
                problems.append("nvidia-smi reports no driver version: cannot check --min-driver")
            elif version_tuple(version) < need:
                problems.append(
                    f"NVIDIA driver {version} is older than the required {min_driver}: upgrade the driver"
                )
    return problems


def load_gpu_type(key: str, catalog: Path = CATALOG) -> tuple[list[str], int]:
    """``(smi_names, memory_mib)`` of a GPU type in the catalog (pyyaml imported only here)."""
    try:
        import yaml
    except ImportError:
        raise UsageError(
            "--expect-gpu needs pyyaml (pip install pyyaml), or pass --expect-name/--expect-memory-mib"
        ) from None
    try:
        data = yaml.safe_load(catalog.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read the GPU catalog {catalog}: {exc.strerror or exc}") from None
    table = data.get("gpus", data) if isinstance(data, dict) else {}
    entry = table.get(key) if isinstance(table, dict) else None
    if not isinstance(entry, dict):
        known = ", ".join(sorted(table)) if isinstance(table, dict) else "none"
        raise UsageError(f"unknown GPU type {key!r} (known: {known}); add it to {catalog}")
    names, memory = entry.get("smi_names"), entry.get("memory_mib")
    if not isinstance(names, list) or not isinstance(memory, int):
        raise UsageError(f"{catalog}: entry {key!r} needs smi_names (list) and memory_mib (int)")
    return [str(n) for n in names], memory


def read_nvidia_smi(timeout: float = NVIDIA_SMI_TIMEOUT) -> tuple[GpuList | None, list[str]]:
    """Run the canonical query. Returns the report (None if unusable) and problems running it."""
    try:
        res = subprocess.run(
            list(NVIDIA_SMI_QUERY_ARGV), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        return None, [
            "nvidia-smi not found: this is not a GPU node, or the NVIDIA driver utilities are not installed"
        ]
    except subprocess.TimeoutExpired:
        return None, [
            f"nvidia-smi did not answer within {timeout:g}s: a GPU or the driver is wedged; drain the node"
        ]
    problems = []
    output = (res.stdout or "").strip()
    if res.returncode != 0:
        message = " ".join((output or res.stderr or "").split())[:300]
        problems.append(f"nvidia-smi failed (exit {res.returncode}): {message or 'no output'}")
    try:
        report = parse_query_csv(output) if output else None
    except NvidiaSmiParseError:
        report = None
    return report, problems


def _summary(report: GpuList) -> str:
    if not report:
        return "no GPUs"
    names = sorted({g.name or "?" for g in report})
    mem = sorted({g.memory_total_mib for g in report if g.memory_total_mib})
    text = f"{len(report)} x {'/'.join(names)}"
    if mem:
        text += f" ({'/'.join(str(m) for m in mem)} MiB)"
    if report.driver_version:
        text += f", driver {report.driver_version}"
    return text


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            self.print_usage(sys.stderr)
            self.exit(UNKNOWN, f"{self.prog}: error: {message}\n")

    p = Parser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Check this node's GPUs with nvidia-smi: count, model, memory, driver version, uncorrected\n"
            "ECC errors, pending page retirement and row remapping. Prints OK or CRITICAL with every\n"
            f"problem found.\n\nnvidia-smi query run: {NVIDIA_SMI_QUERY}"
        ),
        epilog=(
            "exit codes: 0 OK, 2 CRITICAL (problems found, or nvidia-smi missing/failing), 3 UNKNOWN (usage)\n\n"
            "examples:\n"
            f"  {prog} --expect-gpu H200-141GB --expect-count 8 --min-driver 535.104\n"
            f"  {prog} --from-csv saved.csv --json"
        ),
    )
    p.add_argument("--expect-gpu", metavar="TYPE", help="GPU type key of catalog/gpus.yaml, e.g. H200-141GB")
    p.add_argument("--expect-count", type=int, metavar="N", help="number of GPUs this node must show")
    p.add_argument(
        "--expect-name", action="append", metavar="NAME", help="accepted nvidia-smi name (repeatable)"
    )
    p.add_argument(
        "--expect-memory-mib", type=int, metavar="MIB", help="memory.total each GPU must show (+-2%%)"
    )
    p.add_argument("--min-driver", metavar="VER", help="lowest acceptable driver version, e.g. 535.104.05")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--from-csv", metavar="FILE", help="read saved output of the query above instead of running it"
    )
    src.add_argument("--from-xml", metavar="FILE", help="read saved `nvidia-smi -q -x` output instead")
    p.add_argument("--catalog", type=Path, default=CATALOG, help=argparse.SUPPRESS)
    return p


def _read_source(opts: argparse.Namespace) -> tuple[GpuList | None, list[str], str]:
    if opts.from_csv or opts.from_xml:
        path = opts.from_csv or opts.from_xml
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            report = parse_query_csv(text) if opts.from_csv else parse_query_xml(text)
        except NvidiaSmiParseError as exc:
            raise UsageError(f"{path}: {exc}") from None
        return report, [], os.path.abspath(path)
    report, problems = read_nvidia_smi()
    return report, problems, NVIDIA_SMI_QUERY


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``nemotron-deploy preflight``."""
    parser = build_parser(prog)
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else UNKNOWN
    try:
        names = list(opts.expect_name or [])
        memory = opts.expect_memory_mib
        if opts.expect_gpu:
            cat_names, cat_memory = load_gpu_type(opts.expect_gpu, opts.catalog)
            names = names or cat_names
            memory = memory if memory is not None else cat_memory
        if opts.min_driver:
            try:
                version_tuple(opts.min_driver)
            except ValueError as exc:
                raise UsageError(f"--min-driver: {exc}") from None
        report, problems, source = _read_source(opts)
    except UsageError as exc:
        print(f"PREFLIGHT UNKNOWN - {exc}")
        return UNKNOWN
    if report is not None:
        problems += [f"nvidia-smi: {line}" for line in report.errors]
        problems += check_gpus(report, names or None, memory, opts.expect_count, opts.min_driver)
    elif not problems:
        problems.append("nvidia-smi printed nothing that could be parsed")
    status = CRITICAL if problems else OK
    if opts.json:
        print(
            json.dumps(
                {
                    "status": STATUS_NAMES[status],
                    "exit_code": status,
                    "problems": problems,
                    "source": source,
                    "driver_version": report.driver_version if report else None,
                    "gpus": [g.as_dict() for g in report] if report else [],
                    "expect": {
                        "gpu": opts.expect_gpu,
                        "names": names or None,
                        "memory_mib": memory,
                        "count": opts.expect_count,
                        "min_driver": opts.min_driver,
                    },
                },
                sort_keys=True,
            )
        )
    elif problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        print(f"PREFLIGHT CRITICAL - {count}: " + "; ".join(problems))
    else:
        assert report is not None
        print(f"PREFLIGHT OK - {_summary(report)} | gpus={len(report)};;;0")
    return status


if __name__ == "__main__":
    sys.exit(main())
