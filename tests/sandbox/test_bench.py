"""Smoke test of the benchmark runner (`python -m bench`): every part, tiny counts, 2 nodes.

The endpoint part needs no sandbox (loopback, no root): its own test runs it alone.

It proves the runner works end to end (deploys over real SSH, the emulator, the registry log, the
report files), not how fast anything is: the numbers are only checked for being sensible. It uses
the session's 2-node sandbox as it is and must leave it that way (no resize, no teardown): the
other sandbox tests of the session run on it. It holds the sandbox lock exclusively while the
runner resets and re-deploys, so a concurrent test session never sees its deploy vanish.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from helpers import REPO
from nemotron_rehearsal import sandbox as sb_api
from nemotron_rehearsal.sandbox import testing

PYTHON = REPO / ".venv" / "bin" / "python"
OUTPUTS = ("README-table.md", "results.csv", "samples.csv", "results.json", "bench.png")


def test_runner_smoke_writes_every_output_with_sensible_numbers(sandbox, tmp_path):
    nodes_before = len(sandbox.compute)
    out = tmp_path / "results"
    argv = [
        str(PYTHON) if PYTHON.exists() else sys.executable,
        "-m",
        "bench",
        "--out",
        str(out),
        "--sizes",
        "2",
        "--runs",
        "1",
    ]
    argv += ["--readiness-starts", "2", "--check-runs", "3", "--seed", "1"]
    argv += ["--endpoint-seconds", "1.5", "--endpoint-requests", "20"]
    # The smoke resets the deploy: no other session may use the sandbox meanwhile. The runner would
    # wait for this session's shared lock, so it is told that its caller holds the lock.
    with sb_api.exclusive_use("benchmark smoke test (resets the deploy)"):
        proc = subprocess.run(
            [*argv, "--lock", "none"], cwd=REPO, capture_output=True, text=True, timeout=600
        )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing or empty"
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert "error" not in results
    assert results["machine"]["cores"] >= 1

    ours, card = results["readiness"]["ours"], results["readiness"]["card"]
    assert ours["errors"] == card["errors"] == 0
    assert ours["summary"]["n"] == card["summary"]["n"] == 2
    assert 0 < ours["summary"]["max"] < 5
    assert card["summary"]["min"] >= 5  # the card's loop always ends with `sleep 5`

    cost = results["check_cost"]
    for variant in ("health", "curl", "bare-python"):
        assert cost[variant]["failures"] == 0
        assert cost[variant]["wall"]["n"] == 3
        assert 0 < cost[variant]["wall"]["median"] < 5
        assert 0 <= cost[variant]["cpu"]["median"] < 5
    assert cost["ratio_wall_vs_bare"] > 0

    deploy = results["deploy"]["summary"]["2"]
    for key in ("first", "redeploy", "floor"):
        assert deploy[key]["n"] == 1 and 0 < deploy[key]["median"] < 300
    assert deploy["redeploy_changed_max"] == 0
    sample = results["deploy"]["samples"][0]
    assert sample["first_changed"] > 0  # the reset really made it a first deploy
    assert sample["floor_files"] > 0
    commands = results["deploy"]["commands"]["2"]
    assert set(commands["per_host"]) == {sandbox.login.name, *sandbox.compute_names[:2]}  # --sizes 2
    assert commands["max"] >= 1

    pyxis, podman, docker = results["registry"]["rows"]
    assert [(r["runtime"], r["nodes"]) for r in (pyxis, podman, docker)] == [
        ("pyxis", 2),
        ("podman", 2),
        ("docker", 2),
    ]
    # pyxis imports once, from the first compute node; podman and docker (each node's own engine)
    # pull on both, about twice the bytes.
    assert pyxis["nodes_pulling"] == 1 and pyxis["blob_bytes"] > 1 << 20
    assert podman["nodes_pulling"] == 2 and 1.8 < podman["blob_bytes"] / pyxis["blob_bytes"] < 2.2
    assert docker["nodes_pulling"] == 2 and 1.8 < docker["blob_bytes"] / pyxis["blob_bytes"] < 2.2

    with open(out / "results.csv", newline="") as fh:
        parts = {r["part"] for r in csv.DictReader(fh)}
    assert parts == {"deploy", "readiness", "check_cost", "endpoint", "registry"}
    table = (out / "README-table.md").read_text()
    assert "| 2 |" in table and "**Targets**" in table and "health --wait" in table

    # The session's sandbox is left as the fixture brought it up, deployed.
    current = sb_api.current()
    assert current is not None and len(current.compute) == nodes_before
    assert sb_api.status()["up"]


def test_larger_sandbox_path_deploys_to_the_first_n_nodes_and_restores(sandbox, tmp_path):
    """The path of the large runs (sandbox resized beyond the session's, the inventory reading the
    sandbox's nodes, NEMOTRON_BENCH_NODES selecting the first N, peak memory), at small counts: the
    sandbox goes to 3 nodes, the deploy part measures 2 and 3, and the sandbox is put back."""
    nodes_before = len(sandbox.compute)
    out = tmp_path / "results"
    argv = [str(PYTHON) if PYTHON.exists() else sys.executable, "-m", "bench", "--out", str(out)]
    argv += ["--parts", "deploy", "--sizes", "2,3", "--runs", "1", "--lock", "none", "--keep-sandbox"]
    # Resized in this process, under its exclusive hold (re-entrant): the runner, told its caller
    # holds the lock, finds 3 nodes and never resizes.
    created_by_tests = testing.CREATED_BY_TESTS.exists()  # a resize is a new sandbox: keep the marker
    with sb_api.exclusive_use("benchmark at 3 nodes (resizes the sandbox)"):
        try:
            sb_api.up(nodes=3)
            proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
        finally:
            sb_api.up(nodes=nodes_before)
            if created_by_tests:
                testing.CREATED_BY_TESTS.touch()
            # Leave it deployed, as the session's other tests expect.
            deploy = [
                str(REPO / ".venv" / "bin" / "pyinfra"),
                "-y",
                "inventories/sandbox.py",
                "deploys/nemotron.py",
            ]
            subprocess.run(deploy, cwd=REPO, capture_output=True, timeout=600, check=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["sandbox_nodes"] == 3
    for n, hosts in (("2", 3), ("3", 4)):
        commands = results["deploy"]["commands"][n]
        assert len(commands["per_host"]) == hosts and commands["max"] == 1, commands
        summary = results["deploy"]["summary"][n]
        assert summary["redeploy_changed_max"] == 0
        assert 20 << 20 < summary["peak_rss_max"] < 1 << 30
    assert "pyinfra peak memory" in (out / "README-table.md").read_text()
    current = sb_api.current()
    assert current is not None and len(current.compute) == nodes_before and sb_api.status()["up"]


def test_endpoint_part_two_replicas_serve_more_than_one(tmp_path):
    """The endpoint part alone (loopback, no root, no sandbox), tiny counts: the result has every
    measurement, the 2-replica rounds really use both slots (and the 1-replica rounds one), and serve
    clearly more than 1; requests through the endpoint are slower than direct ones (they pass
    HAProxy); killing a replica costs at most one request and takes its slot DOWN."""
    out = tmp_path / "results"
    argv = [str(PYTHON) if PYTHON.exists() else sys.executable, "-m", "bench", "--out", str(out)]
    argv += ["--parts", "endpoint", "--endpoint-seconds", "1.5", "--endpoint-requests", "50"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing or empty"
    results = json.loads((out / "results.json").read_text())
    assert "error" not in results and results["parts"] == ["endpoint"]
    ep = results["endpoint"]
    assert ep["config"]["inventory"] == "inventories/h100.py"
    assert "maxconn 1" in ep["config"]["server_line"]

    tp = ep["throughput"]
    assert [r["replicas"] for r in tp["rounds"]] == [1, 2, 2, 1]
    assert tp["errors"] == 0
    for r in tp["rounds"]:
        if r["replicas"] == 1:
            assert r["per_slot"]["r1"] > 0 and r["per_slot"]["r2"] == 0, r
        else:
            assert r["per_slot"]["r1"] > 0 and r["per_slot"]["r2"] > 0, r
    # one replica answers at most 10/s (0.1 s per generation): 2 must clearly beat 1
    assert 5 < tp["rps"]["1"] <= 10.5
    assert tp["ratio"] > 1.5, tp

    lat = ep["latency"]
    assert {"direct", "through"} <= lat["errors"].keys() and not any(lat["errors"].values()), lat["errors"]
    assert lat["direct"]["n"] == lat["through"]["n"] == 50
    assert 0 < lat["direct"]["p50"] < lat["through"]["p50"] < 1
    assert lat["added"]["p50"] == pytest.approx(lat["through"]["p50"] - lat["direct"]["p50"])

    fo = ep["failover"]
    assert fo["failures"] <= 1, fo["failed"]
    assert fo["status_after"] == "down" and 0 <= fo["down_after"] < 5
    assert fo["answers_after_kill"] > 0 and fo["gap"] > 0

    with open(out / "results.csv", newline="") as fh:
        assert {r["part"] for r in csv.DictReader(fh)} == {"endpoint"}
    table = (out / "README-table.md").read_text()
    assert "**Endpoint**" in table and "| 2 vs 1 |" in table and "added by the endpoint" in table
    assert table.count("endpoint") >= 3 and "a replica killed under load" in table
