"""Parse what ``nvidia-smi`` really prints: its ``--query-gpu`` CSV and its ``-q -x`` XML.

Why a parser of our own: the deploy's pyinfra fact and ``nemotron-deploy preflight`` both need the
same typed view of a node's GPUs, and nvidia-smi's output has traps that a naive split misses:
units inside values (``143771 MiB``), units in the CSV header (``memory.total [MiB]``), bracketed
non-values (``[N/A]``, ``[Not Supported]``, ``[Unknown Error]``), ``Yes``/``No`` booleans, and
error lines mixed into the output when a GPU has fallen off the bus. Every field name and format
here was checked against the real captures in ``rehearsal/nemotron_rehearsal/sandbox/nvidia_smi_captures/h200-x2/``.

Standard library only, so that it can run on a bare GPU node.
"""

from __future__ import annotations

import csv
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

# The one query the deploy's fact and preflight run. Every field appears in the real captures
# (query-gpu.csv / health-query.csv): on H100/H200, retired_pages.pending is "[N/A]" (page
# retirement was replaced by row remapping) and must not be read as a problem.
NVIDIA_SMI_QUERY_FIELDS: tuple[str, ...] = (
    "index",
    "name",
    "uuid",
    "pci.bus_id",
    "memory.total",
    "driver_version",
    "ecc.mode.current",
    "ecc.errors.uncorrected.volatile.total",
    "retired_pages.pending",
    "remapped_rows.pending",
    "remapped_rows.failure",
)
NVIDIA_SMI_QUERY_ARGV: tuple[str, ...] = (
    "nvidia-smi",
    "--query-gpu=" + ",".join(NVIDIA_SMI_QUERY_FIELDS),
    "--format=csv",
)
NVIDIA_SMI_QUERY = " ".join(NVIDIA_SMI_QUERY_ARGV)
QUERY_COMMAND = NVIDIA_SMI_QUERY  # the name the deploy's pyinfra fact imports
NVIDIA_SMI_XML_ARGV: tuple[str, ...] = ("nvidia-smi", "-q", "-x")

# nvidia-smi prints these instead of a value; all mean "no value".
_NOT_A_VALUE = re.compile(r"^\[.*\]$|^N/A$")


class NvidiaSmiParseError(ValueError):
    """The text is not nvidia-smi output of the expected kind; the message says what was seen."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as nvidia-smi reports it. ``None`` means nvidia-smi printed no value (``[N/A]``...)."""

    index: int | None
    name: str | None
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total_mib: int | None = None
    driver_version: str | None = None
    ecc_mode: str | None = None
    ecc_uncorrected_volatile: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    raw: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "pci_bus_id": self.pci_bus_id,
            "memory_total_mib": self.memory_total_mib,
            "driver_version": self.driver_version,
            "ecc_mode": self.ecc_mode,
            "ecc_uncorrected_volatile": self.ecc_uncorrected_volatile,
            "retired_pages_pending": self.retired_pages_pending,
            "remapped_rows_pending": self.remapped_rows_pending,
            "remapped_rows_failure": self.remapped_rows_failure,
        }


class GpuList(list[GpuInfo]):
    """The GPUs of one nvidia-smi run, in index order: a plain list of :class:`GpuInfo`, plus the
    driver version (when all GPUs agree) and the lines that were not GPU rows (nvidia-smi's errors,
    e.g. "Unable to determine the device handle for GPU0000:CA:00.0: Unknown Error")."""

    def __init__(
        self, gpus: Iterable[GpuInfo] = (), driver_version: str | None = None, errors: Iterable[str] = ()
    ) -> None:
        super().__init__(gpus)
        self.driver_version = driver_version
        self.errors = list(errors)


# --------------------------------------------------------------------------------------------------
# Value conversion
# --------------------------------------------------------------------------------------------------


def _value(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if not text or _NOT_A_VALUE.match(text) else text


def _int(text: str | None) -> int | None:
    """``143771 MiB`` / ``143771`` / ``0`` -> int; ``[N/A]`` and anything odd -> None."""
    value = _value(text)
    if value is None:
        return None
    m = re.match(r"^(-?\d+)(\s*[A-Za-z%()]+)?$", value)
    return int(m.group(1)) if m else None


def _bool(text: str | None) -> bool | None:
    value = _value(text)
    if value is None:
        return None
    low = value.lower()
    if low in {"yes", "true", "enabled", "active"}:
        return True
    if low in {"no", "false", "disabled", "not active"}:
        return False
    return None


def _header_name(column: str) -> str:
    """``memory.total [MiB]`` -> ``memory.total``."""
    return re.sub(r"\s*\[[^\]]*\]\s*$", "", column.strip())


def _gpu_from_fields(values: dict[str, str], index_fallback: int, driver: str | None = None) -> GpuInfo:
    index = _int(values.get("index"))
    return GpuInfo(
        index=index if index is not None else index_fallback,
        name=_value(values.get("name")),
        uuid=_value(values.get("uuid")),
        pci_bus_id=_value(values.get("pci.bus_id")),
        memory_total_mib=_int(values.get("memory.total")),
        driver_version=_value(values.get("driver_version")) or driver,
        ecc_mode=_value(values.get("ecc.mode.current")),
        ecc_uncorrected_volatile=_int(values.get("ecc.errors.uncorrected.volatile.total")),
        retired_pages_pending=_bool(values.get("retired_pages.pending")),
        remapped_rows_pending=_bool(values.get("remapped_rows.pending")),
        remapped_rows_failure=_bool(values.get("remapped_rows.failure")),
        raw=dict(values),
    )


# --------------------------------------------------------------------------------------------------
# CSV (--query-gpu=... --format=csv[,noheader][,nounits])
# --------------------------------------------------------------------------------------------------


def parse_query_csv(text: str | Iterable[str], fields: Sequence[str] | None = None) -> GpuList:
    """Parse ``nvidia-smi --query-gpu=... --format=csv`` output.

    With a header line (``--format=csv``), columns are matched by name, so any subset or order of
    fields works and missing columns read as ``None``. For ``noheader`` output pass ``fields`` in
    the order of the query. Lines that don't have the header's number of columns (nvidia-smi's own
    error messages, e.g. "Unable to determine the device handle for GPU...") go to ``errors``.
    ``text`` is the whole output or its lines (what a pyinfra fact receives).
    """
    lines = text.splitlines() if isinstance(text, str) else list(text)
    rows = [r for r in csv.reader(lines, skipinitialspace=True) if r and any(c.strip() for c in r)]
    if fields is None:
        if not rows:
            raise NvidiaSmiParseError("empty output: expected a CSV header line from nvidia-smi --format=csv")
        header = [_header_name(c) for c in rows[0]]
        if "name" not in header and "index" not in header and "uuid" not in header:
            raise NvidiaSmiParseError(
                "no CSV header with index/name/uuid in nvidia-smi output "
                f"(first line: {','.join(rows[0])!r}); for --format=csv,noheader pass the query's field list"
            )
        rows = rows[1:]
    else:
        header = [_header_name(f) for f in fields]
    gpus: list[GpuInfo] = []
    errors: list[str] = []
    for row in rows:
        if len(row) != len(header):
            errors.append(", ".join(row).strip())
            continue
        values = {name: cell.strip() for name, cell in zip(header, row, strict=True)}
        gpus.append(_gpu_from_fields(values, len(gpus)))
    drivers = {g.driver_version for g in gpus if g.driver_version}
    return GpuList(gpus, driver_version=drivers.pop() if len(drivers) == 1 else None, errors=errors)


# --------------------------------------------------------------------------------------------------
# XML (-q -x)
# --------------------------------------------------------------------------------------------------


def _text(node: ET.Element | None, path: str) -> str | None:
    if node is None:
        return None
    found = node.find(path)
    return found.text if found is not None and found.text is not None else None


def _xml_uncorrected_volatile(gpu: ET.Element) -> int | None:
    """Sum of volatile uncorrectable ECC counters, across nvidia-smi's XML layouts.

    Drivers before ~R550 print ``volatile/double_bit/total``; newer ones (the 580 capture) print
    ``volatile/{sram_uncorrectable_parity,sram_uncorrectable_secded,dram_uncorrectable}``.
    """
    volatile = gpu.find("ecc_errors/volatile")
    if volatile is None:
        return None
    legacy = _text(volatile, "double_bit/total")
    if legacy is not None:
        return _int(legacy)
    values = [_int(child.text) for child in volatile if "uncorrectable" in child.tag]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def parse_query_xml(text: str | bytes) -> GpuList:
    """Parse ``nvidia-smi -q -x``. GPUs are numbered in document order, which is nvidia-smi's index."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise NvidiaSmiParseError(f"not nvidia-smi -q -x XML: {exc}") from None
    if root.tag != "nvidia_smi_log":
        raise NvidiaSmiParseError(
            f"not nvidia-smi -q -x XML: root element is <{root.tag}>, not <nvidia_smi_log>"
        )
    driver = _value(_text(root, "driver_version"))
    gpus = []
    for i, gpu in enumerate(root.findall("gpu")):
        values = {
            "name": _text(gpu, "product_name") or "",
            "uuid": _text(gpu, "uuid") or "",
            "pci.bus_id": _text(gpu, "pci/pci_bus_id") or gpu.get("id", ""),
            "memory.total": _text(gpu, "fb_memory_usage/total") or "",
            "ecc.mode.current": _text(gpu, "ecc_mode/current_ecc") or "",
            "retired_pages.pending": _text(gpu, "retired_pages/pending_retirement") or "",
            "remapped_rows.pending": _text(gpu, "remapped_rows/remapped_row_pending") or "",
            "remapped_rows.failure": _text(gpu, "remapped_rows/remapped_row_failure") or "",
        }
        info = _gpu_from_fields(values, i, driver)
        gpus.append(replace(info, ecc_uncorrected_volatile=_xml_uncorrected_volatile(gpu)))
    return GpuList(gpus, driver_version=driver)


def version_tuple(version: str) -> tuple[int, ...]:
    """``580.159.04`` -> ``(580, 159, 4)`` for numeric comparison (``535.9`` < ``535.10``)."""
    parts = re.findall(r"\d+", version)
    if not parts:
        raise ValueError(f"{version!r} is not a dotted version number like 535.104.05")
    return tuple(int(p) for p in parts)
