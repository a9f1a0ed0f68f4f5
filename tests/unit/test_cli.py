"""The `nemotron-deploy` command line: help, plan output, exit codes (0 ok, 1 invalid/refused, 2 usage)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import INVENTORIES, REPO, SHIPPED, run_main, write_inventory

PLAN_KEYS = {
    "gpu",
    "nodes",
    "gpus_per_node",
    "tensor_parallel",
    "pipeline_parallel",
    "replicas",
    "per_gpu_memory_gib",
    "headroom_gib",
}


def _executable() -> str:
    """The installed console script: beside the running Python (the venv), else on PATH."""
    found = shutil.which("nemotron-deploy", path=str(Path(sys.executable).parent)) or shutil.which(
        "nemotron-deploy"
    )
    if found is None:
        pytest.fail("the nemotron-deploy console script is not installed (pip install -e .)")
    return found


def test_entry_point_help():
    """The installed console script, as an operator runs it."""
    result = subprocess.run([_executable(), "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for command in ("plan", "render", "validate", "settings", "health", "preflight"):
        assert command in result.stdout
    assert "Exit codes: 0 ok, 1 invalid/refused, 2 usage error" in result.stdout


def test_entry_point_usage_error_exits_2():
    result = subprocess.run(
        [_executable(), "frobnicate"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


@pytest.mark.parametrize("command", ["plan", "render", "validate"])
def test_subcommand_help(command, capsys):
    assert run_main([command, "--help"]) == 0
    assert f"usage: nemotron-deploy {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["plan"],
        ["plan", "inventories/h100.py", "--frobnicate"],
        ["render", "inventories/h100.py"],  # --out is required
        ["validate"],
    ],
    ids=[
        "no-command",
        "unknown-command",
        "plan-no-inventory",
        "plan-unknown-flag",
        "render-no-out",
        "validate-none",
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert run_main(argv) == 2
    assert "usage: nemotron-deploy" in capsys.readouterr().err


def test_missing_model_config_is_a_usage_error(tmp_path, capsys):
    argv = ["plan", "--model-config", str(tmp_path / "nope.yaml"), str(INVENTORIES / "h100.py")]
    assert run_main(argv) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, expected",
    [
        ("h100", {"gpu": "H100-80GB-SXM", "nodes": 2, "tensor_parallel": 8, "pipeline_parallel": 2}),
        ("h200", {"gpu": "H200-141GB", "nodes": 1, "tensor_parallel": 8, "pipeline_parallel": 1}),
        ("a100", {"gpu": "A100-80GB", "nodes": 2, "tensor_parallel": 8, "pipeline_parallel": 2}),
    ],
)
def test_plan_json(name, expected, capsys):
    assert run_main(["plan", "--json", str(INVENTORIES / f"{name}.py")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert PLAN_KEYS <= set(plan)
    assert {k: plan[k] for k in expected} == expected
    assert plan["gpus_per_node"] == 8 and plan["replicas"] == 1
    assert isinstance(plan["per_gpu_memory_gib"], float) and isinstance(plan["headroom_gib"], float)
    assert plan["per_gpu_memory_gib"] + plan["headroom_gib"] == pytest.approx(
        plan["usable_memory_gib"], abs=0.02
    )
    assert plan["headroom_gib"] > 0


def test_plan_text(capsys):
    assert run_main(["plan", str(INVENTORIES / "h100.py")]) == 0
    out = capsys.readouterr().out
    assert "nodes per replica  2 x 8 GPUs" in out
    assert "tensor parallel    8\n" in out
    assert "pipeline parallel  2\n" in out
    assert "replicas           1 of the 1 that the 2 compute nodes hold" in out
    assert "requests covered   up to 8 prompts of up to 4096 tokens each; log-probs" in out
    assert "nemotron-4-340b (341.0 B parameters)" in out


def test_plan_on_an_invalid_inventory_exits_1_with_the_problem(tmp_path, capsys):
    path = write_inventory(tmp_path, "h100", settings={"port": 80})
    assert run_main(["plan", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cannot plan {path}" in captured.err
    assert "port = 80" in captured.err and "1024" in captured.err


def test_plan_refused_exits_1_saying_what_is_needed(tmp_path, capsys):
    path = write_inventory(tmp_path, "h100", hosts='login = ["login01"]\ncompute = ["gpu01"]\n')
    assert run_main(["plan", "--json", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "needs 2 compute node(s)" in captured.err and "inventory has 1" in captured.err


def test_render_on_an_invalid_inventory_exits_1_and_writes_nothing(tmp_path, capsys):
    path = write_inventory(tmp_path / "inv", "h100", settings={"gpu_type": "H100"})
    out = tmp_path / "out"
    assert run_main(["render", str(path), "--out", str(out)]) == 1
    assert "not rendering" in capsys.readouterr().err
    assert not out.exists()


def test_validate_mixed_exits_1(tmp_path, capsys):
    bad = write_inventory(tmp_path, "h100", settings={"tensor_parallel": 3})
    assert run_main(["validate", *(str(INVENTORIES / f"{n}.py") for n in SHIPPED), str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.count("ok       ") == 3
    assert f"INVALID  {bad}:" in out
    assert "  - tensor_parallel: tensor_parallel=3 is impossible" in out


def test_validate_missing_file_is_invalid(tmp_path, capsys):
    assert run_main(["validate", str(tmp_path / "nope.py")]) == 1
    assert "no such inventory file" in capsys.readouterr().out
