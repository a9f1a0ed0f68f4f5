"""Preflight: the pure `check_gpus` logic and the `nemotron-deploy preflight` command.

Variants (a missing GPU, an ECC error, a wrong model...) are derived from the real 2 x H200 captures
by editing copies in tmp_path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from nemotron_rehearsal import NVIDIA_SMI_CAPTURES

from nemotron_deploy import cli
from nemotron_deploy.service.nvidia_smi import NVIDIA_SMI_QUERY_ARGV, parse_query_csv, parse_query_xml
from nemotron_deploy.service.preflight import check_gpus

CAPTURES = NVIDIA_SMI_CAPTURES
H200 = {"expect_names": ["NVIDIA H200"], "expect_memory_mib": 143771, "expect_count": 2}


def health_csv() -> str:
    return (CAPTURES / "health-query.csv").read_text()


def edited(text: str, row: int, column: str, value: str) -> str:
    """The CSV capture with one cell of GPU `row` replaced (header names without units)."""
    lines = text.splitlines()
    header = [h.split(" [")[0] for h in lines[0].split(", ")]
    cells = lines[row + 1].split(", ")
    cells[header.index(column)] = value
    lines[row + 1] = ", ".join(cells)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# check_gpus
# --------------------------------------------------------------------------------------------------


def test_real_capture_is_fit():
    gpus = parse_query_csv((CAPTURES / "query-gpu.csv").read_text())
    assert check_gpus(gpus, **H200, min_driver="535.104.05") == []
    assert check_gpus(parse_query_xml((CAPTURES / "q.xml").read_text()), **H200, min_driver="580.95") == []


def test_no_expectations_still_checks_gpu_health():
    assert check_gpus(parse_query_csv(health_csv())) == []


def test_missing_gpu():
    text = "\n".join(health_csv().splitlines()[:2]) + "\n"  # header + GPU 0 only
    problems = check_gpus(parse_query_csv(text), **H200)
    assert len(problems) == 1 and problems[0].startswith("found 1 GPU(s), expected 2")


def test_uncorrected_ecc_error():
    text = edited(health_csv(), 1, "ecc.errors.uncorrected.volatile.total", "3")
    problems = check_gpus(parse_query_csv(text), **H200)
    assert problems == [
        "GPU 1 has 3 uncorrected volatile ECC error(s) since the driver loaded: drain the node and reset "
        "the GPU (nvidia-smi -r) before using it"
    ]


def test_wrong_model_and_memory():
    text = edited(health_csv(), 0, "name", "NVIDIA H100 80GB HBM3")
    text = edited(text, 0, "memory.total", "81559 MiB")
    problems = check_gpus(parse_query_csv(text), **H200)
    assert any(p.startswith("GPU 0 is 'NVIDIA H100 80GB HBM3', expected 'NVIDIA H200'") for p in problems)
    assert any(p.startswith("GPU 0 has 81559 MiB, expected about 143771 MiB") for p in problems)
    assert not any("GPU 1" in p for p in problems)
    # without expectations, two models on one node is still a problem
    assert check_gpus(parse_query_csv(text))[0].startswith("mixed GPU models on one node")


def test_same_mismatch_on_every_gpu_is_one_problem():
    problems = check_gpus(
        parse_query_csv(health_csv()), expect_names=["NVIDIA B200"], expect_memory_mib=183359
    )
    assert problems[0].startswith("GPU 0, 1 are 'NVIDIA H200', expected 'NVIDIA B200'")
    assert problems[1].startswith("GPU 0, 1 have 143771 MiB")
    assert len(problems) == 2


def test_memory_within_tolerance_is_fine():
    text = edited(health_csv(), 0, "memory.total", "143000 MiB")
    assert check_gpus(parse_query_csv(text), **H200) == []


def test_row_remapping_and_retired_pages():
    text = edited(health_csv(), 0, "remapped_rows.failure", "Yes")
    text = edited(text, 1, "remapped_rows.pending", "Yes")
    text = edited(text, 1, "retired_pages.pending", "Yes")
    problems = check_gpus(parse_query_csv(text), **H200)
    assert len(problems) == 3
    assert "GPU 0 had a row-remapping failure" in problems[0]
    assert "GPU 1 has retired pages pending" in problems[1]
    assert "GPU 1 has row remapping pending" in problems[2]


def test_driver_version_is_compared_numerically():
    gpus = parse_query_csv((CAPTURES / "query-gpu.csv").read_text())  # driver 580.159.04
    assert check_gpus(gpus, min_driver="580.95.05") == []  # 159 > 95, though "159" < "95" as text
    assert check_gpus(gpus, min_driver="580.159.04") == []
    problems = check_gpus(gpus, min_driver="590.1")
    assert problems == ["NVIDIA driver 580.159.04 is older than the required 590.1: upgrade the driver"]
    # the health query has no driver column: say so instead of passing silently
    assert "no driver version" in check_gpus(parse_query_csv(health_csv()), min_driver="535")[0]


def test_every_problem_is_reported_at_once():
    text = "\n".join(edited(health_csv(), 0, "name", "NVIDIA A100-SXM4-80GB").splitlines()[:2]) + "\n"
    text = edited(text, 0, "ecc.errors.uncorrected.volatile.total", "1")
    text = edited(text, 0, "memory.total", "81920 MiB")
    problems = check_gpus(parse_query_csv(text), **H200, min_driver="999")
    assert len(problems) == 5  # count, model, memory, ECC, and no driver column to check
    assert problems[0].startswith("found 1 GPU(s)")
    assert problems[1].startswith("GPU 0 is 'NVIDIA A100-SXM4-80GB'")
    assert problems[2].startswith("GPU 0 has 81920 MiB")
    assert problems[3].startswith("GPU 0 has 1 uncorrected")
    assert problems[4].startswith("nvidia-smi reports no driver version")


def test_no_gpus():
    assert "lists no GPU" in check_gpus([])[0]


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str]:
    """`nemotron-deploy preflight ARGV...` (the command line that has the GPU catalog)."""
    code = cli.main(["preflight", *argv])
    out, err = capsys.readouterr()
    return code, out + err


def test_ok_from_csv_with_the_catalog(capsys):
    code, out = run(
        capsys,
        "--from-csv",
        str(CAPTURES / "query-gpu.csv"),
        "--expect-gpu",
        "H200-141GB",
        "--expect-count",
        "2",
        "--min-driver",
        "535.104.05",
    )
    assert code == 0
    assert out == "PREFLIGHT OK - 2 x NVIDIA H200 (143771 MiB), driver 580.159.04 | gpus=2;;;0\n"


def test_critical_from_xml_lists_every_reason(capsys, tmp_path):
    xml = (CAPTURES / "q.xml").read_text()
    xml = xml.replace(
        "<dram_uncorrectable>0</dram_uncorrectable>", "<dram_uncorrectable>5</dram_uncorrectable>", 1
    )
    path = tmp_path / "q.xml"
    path.write_text(xml)
    code, out = run(capsys, "--from-xml", str(path), "--expect-gpu", "H100-80GB-SXM", "--expect-count", "8")
    assert code == 2
    assert out.startswith("PREFLIGHT CRITICAL - 4 problems: found 2 GPU(s), expected 8")
    for text in (
        "'NVIDIA H100 80GB HBM3'",
        "expected about 81559 MiB",
        "GPU 0 (00000000:00:06.0) has 5 uncorrected",
    ):
        assert text in out
    assert out.count("\n") == 1


def test_json_output(capsys, tmp_path):
    path = tmp_path / "h.csv"
    path.write_text(edited(health_csv(), 1, "remapped_rows.failure", "Yes"))
    code, out = run(capsys, "--from-csv", str(path), "--json", "--expect-count", "2")
    data = json.loads(out)
    assert code == 2 == data["exit_code"] and data["status"] == "CRITICAL"
    assert len(data["problems"]) == 1 and "row-remapping failure" in data["problems"][0]
    assert [g["index"] for g in data["gpus"]] == [0, 1] and data["gpus"][1]["remapped_rows_failure"] is True
    assert data["expect"]["count"] == 2 and data["source"] == str(path)


def test_local_catalog_fixture(capsys, tmp_path):
    catalog = tmp_path / "gpus.yaml"
    catalog.write_text("H200-TEST:\n  smi_names: ['NVIDIA H200']\n  memory_mib: 143771\n")
    args = ["--from-csv", str(CAPTURES / "health-query.csv"), "--catalog", str(catalog)]
    assert run(capsys, *args, "--expect-gpu", "H200-TEST")[0] == 0
    code, out = run(capsys, *args, "--expect-gpu", "H100")
    assert code == 3 and "unknown GPU type 'H100' (known: H200-TEST)" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--from-csv", "/nonexistent/x.csv"],
        ["--from-csv", str(CAPTURES / "L.txt")],
        ["--from-xml", str(CAPTURES / "nvidia-smi.txt")],
        ["--min-driver", "latest", "--from-csv", str(CAPTURES / "query-gpu.csv")],
        ["--expect-count", "many"],
        ["--from-csv", "a", "--from-xml", "b"],
    ],
)
def test_usage_errors_are_unknown(capsys, argv):
    assert run(capsys, *argv)[0] == 3


def fake_nvidia_smi(tmp_path: Path, body: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\n{body}\n')
    script.chmod(0o755)
    return bindir


def test_runs_the_canonical_query(capsys, tmp_path, monkeypatch):
    answer = tmp_path / "answer.csv"
    answer.write_text((CAPTURES / "query-gpu.csv").read_text())
    bindir = fake_nvidia_smi(tmp_path, f"cat {answer}")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    code, out = run(capsys, "--expect-gpu", "H200-141GB", "--expect-count", "2")
    assert code == 0, out
    assert (tmp_path / "argv").read_text().split() == list(NVIDIA_SMI_QUERY_ARGV[1:])


def test_failing_driver_is_critical(capsys, tmp_path, monkeypatch):
    message = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    bindir = fake_nvidia_smi(tmp_path, f'echo "{message}"; exit 9')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    code, out = run(capsys)
    assert code == 2
    assert out.startswith("PREFLIGHT CRITICAL - 1 problem: nvidia-smi failed (exit 9): " + message)


def test_missing_nvidia_smi_is_critical(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out = run(capsys, "--expect-count", "8")
    assert code == 2 and "nvidia-smi not found" in out
