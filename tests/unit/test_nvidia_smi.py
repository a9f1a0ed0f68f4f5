"""nvidia-smi parsing against the real captures of a 2 x H200 host (rehearsal/nemotron_rehearsal/sandbox/nvidia_smi_captures/h200-x2/)."""

from __future__ import annotations

import csv
import re

import pytest
from nemotron_rehearsal import NVIDIA_SMI_CAPTURES

from nemotron_deploy.service.nvidia_smi import (
    NVIDIA_SMI_QUERY,
    NVIDIA_SMI_QUERY_FIELDS,
    QUERY_COMMAND,
    GpuInfo,
    NvidiaSmiParseError,
    parse_query_csv,
    parse_query_xml,
    version_tuple,
)

CAPTURES = NVIDIA_SMI_CAPTURES
UUIDS = ["GPU-6f63702a-74e5-3c6a-73cf-fa81fee82a9f", "GPU-27771d49-33aa-a84b-baff-7e69ee768833"]


def capture(name: str) -> str:
    return (CAPTURES / name).read_text()


def captured_fields(name: str) -> list[str]:
    """The field names a capture's command asked for, from COMMANDS.md (what really ran)."""
    for line in capture("COMMANDS.md").splitlines():
        if line.startswith(f"| {name} |"):
            return re.search(r"--query-gpu=([^ ]+)", line).group(1).split(",")
    raise AssertionError(f"{name} not in COMMANDS.md")


def test_every_field_of_the_canonical_query_was_seen_in_a_real_capture():
    seen = set(captured_fields("query-gpu.csv")) | set(captured_fields("health-query.csv"))
    assert set(NVIDIA_SMI_QUERY_FIELDS) <= seen, set(NVIDIA_SMI_QUERY_FIELDS) - seen
    assert QUERY_COMMAND == NVIDIA_SMI_QUERY
    assert NVIDIA_SMI_QUERY == "nvidia-smi --query-gpu=" + ",".join(NVIDIA_SMI_QUERY_FIELDS) + " --format=csv"


def test_query_gpu_csv():
    gpus = parse_query_csv(capture("query-gpu.csv"))
    assert gpus == [
        GpuInfo(
            index=0,
            name="NVIDIA H200",
            uuid=UUIDS[0],
            pci_bus_id="00000000:00:06.0",
            memory_total_mib=143771,
            driver_version="580.159.04",
            ecc_mode="Enabled",
            ecc_uncorrected_volatile=0,
        ),
        GpuInfo(
            index=1,
            name="NVIDIA H200",
            uuid=UUIDS[1],
            pci_bus_id="00000000:00:07.0",
            memory_total_mib=143771,
            driver_version="580.159.04",
            ecc_mode="Enabled",
            ecc_uncorrected_volatile=0,
        ),
    ]
    assert gpus.driver_version == "580.159.04" and gpus.errors == []
    assert gpus[0].raw["power.draw"] == "77.39 W"  # every column is kept raw


def test_health_query_csv_with_na_and_yes_no():
    gpus = parse_query_csv(capture("health-query.csv"))
    assert len(gpus) == 2
    g = gpus[1]
    assert (g.index, g.name, g.memory_total_mib, g.ecc_uncorrected_volatile) == (1, "NVIDIA H200", 143771, 0)
    assert g.retired_pages_pending is None  # "[N/A]": H200 has no page retirement
    assert g.remapped_rows_pending is False and g.remapped_rows_failure is False
    assert g.uuid is None and g.driver_version is None  # columns this query did not ask for
    assert gpus.driver_version is None


def test_lines_as_a_pyinfra_fact_gets_them():
    assert parse_query_csv(capture("health-query.csv").splitlines()) == parse_query_csv(
        capture("health-query.csv")
    )


def test_noheader_nounits_with_explicit_fields():
    gpus = parse_query_csv(capture("query-name-mem.csv"), fields=["name", "memory.total"])
    rows = [(g.index, g.name, g.memory_total_mib) for g in gpus]
    assert rows == [(0, "NVIDIA H200", 143771), (1, "NVIDIA H200", 143771)]
    with pytest.raises(NvidiaSmiParseError, match="noheader"):
        parse_query_csv(capture("query-name-mem.csv"))


def canonical_answer(rows: list[dict[str, str]]) -> str:
    """What nvidia-smi prints for NVIDIA_SMI_QUERY: header with units, values with units."""
    units = {"memory.total": " [MiB]"}
    lines = [", ".join(f + units.get(f, "") for f in NVIDIA_SMI_QUERY_FIELDS)]
    lines += [", ".join(row[f] for f in NVIDIA_SMI_QUERY_FIELDS) for row in rows]
    return "\n".join(lines) + "\n"


def capture_rows() -> list[dict[str, str]]:
    """Per-GPU values of the canonical fields, taken from the two real CSV captures."""
    rows = []
    for name in ("query-gpu.csv", "health-query.csv"):
        table = list(csv.reader(capture(name).splitlines(), skipinitialspace=True))
        header = [re.sub(r" \[.*\]$", "", h) for h in table[0]]
        for i, values in enumerate(table[1:]):
            if len(rows) <= i:
                rows.append({})
            rows[i].update(zip(header, values, strict=True))
    return rows


def test_canonical_query_answer_built_from_the_captures():
    gpus = parse_query_csv(canonical_answer(capture_rows()))
    assert [g.uuid for g in gpus] == UUIDS
    assert all(g.driver_version == "580.159.04" and g.memory_total_mib == 143771 for g in gpus)
    assert all(g.remapped_rows_failure is False and g.retired_pages_pending is None for g in gpus)


@pytest.mark.parametrize(
    "odd", ["[N/A]", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]", ""]
)
def test_bracketed_non_values_are_none(odd):
    rows = capture_rows()
    rows[0]["ecc.errors.uncorrected.volatile.total"] = odd
    rows[0]["memory.total"] = odd
    rows[0]["remapped_rows.failure"] = odd
    g = parse_query_csv(canonical_answer(rows))[0]
    assert (g.ecc_uncorrected_volatile, g.memory_total_mib, g.remapped_rows_failure) == (None, None, None)


def test_error_lines_from_a_lost_gpu_are_kept():
    text = capture("query-gpu.csv") + (
        "Unable to determine the device handle for GPU0000:CA:00.0: Unknown Error\n"
    )
    gpus = parse_query_csv(text)
    assert len(gpus) == 2
    assert gpus.errors == ["Unable to determine the device handle for GPU0000:CA:00.0: Unknown Error"]


def test_missing_columns_read_as_none():
    gpus = parse_query_csv("name, memory.total [MiB]\nNVIDIA H200, 143771 MiB\n")
    assert gpus[0].index == 0 and gpus[0].uuid is None and gpus[0].ecc_uncorrected_volatile is None


def test_xml_matches_the_csv_capture():
    xml_gpus = parse_query_xml(capture("q.xml"))
    csv_gpus = parse_query_csv(capture("query-gpu.csv"))
    assert xml_gpus.driver_version == "580.159.04"
    for x, c in zip(xml_gpus, csv_gpus, strict=True):
        assert (x.index, x.name, x.uuid, x.pci_bus_id, x.memory_total_mib) == (
            c.index,
            c.name,
            c.uuid,
            c.pci_bus_id,
            c.memory_total_mib,
        )
        assert (x.driver_version, x.ecc_mode, x.ecc_uncorrected_volatile) == ("580.159.04", "Enabled", 0)
        assert x.retired_pages_pending is None  # <pending_retirement>N/A</pending_retirement>
        assert x.remapped_rows_pending is False and x.remapped_rows_failure is False


def second_gpu_block(xml: str) -> tuple[int, int]:
    start = xml.index('<gpu id="00000000:00:07.0">')
    return start, xml.index("</gpu>", start)


def test_xml_ecc_errors_and_row_remapping_on_one_gpu():
    xml = capture("q.xml")
    start, end = second_gpu_block(xml)
    block = xml[start:end]
    block = block.replace(
        "<dram_uncorrectable>0</dram_uncorrectable>", "<dram_uncorrectable>2</dram_uncorrectable>", 1
    )
    block = block.replace(
        "<remapped_row_failure>No</remapped_row_failure>", "<remapped_row_failure>Yes</remapped_row_failure>"
    )
    gpus = parse_query_xml(xml[:start] + block + xml[end:])
    assert gpus[0].ecc_uncorrected_volatile == 0 and gpus[1].ecc_uncorrected_volatile == 2
    assert gpus[1].remapped_rows_failure is True and gpus[0].remapped_rows_failure is False


def test_xml_legacy_ecc_layout():
    xml = capture("q.xml")
    start, end = second_gpu_block(xml)
    block = re.sub(
        r"<volatile>.*?</volatile>",
        "<volatile><single_bit><total>4</total></single_bit><double_bit><total>1</total></double_bit></volatile>",
        xml[start:end],
        count=1,
        flags=re.S,
    )
    assert parse_query_xml(xml[:start] + block + xml[end:])[1].ecc_uncorrected_volatile == 1


def test_not_nvidia_smi_output_is_a_parse_error():
    with pytest.raises(NvidiaSmiParseError):
        parse_query_xml("<html/>")
    with pytest.raises(NvidiaSmiParseError):
        parse_query_xml("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
    with pytest.raises(NvidiaSmiParseError):
        parse_query_csv("")


def test_version_tuple_compares_numerically():
    assert version_tuple("580.159.04") == (580, 159, 4)
    assert version_tuple("535.9") < version_tuple("535.10")
    assert version_tuple("580.159.04") > version_tuple("580.95.05")
    with pytest.raises(ValueError):
        version_tuple("latest")
