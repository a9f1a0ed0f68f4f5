"""Room for one more replica, from Slurm (service/room.py), and the rollout's choice of path from it.

`tests/fixtures/sinfo/*.txt` are captures of the sandbox's real Slurm 22.05.8, `sinfo -h -N -o '%n %P
%t %G'` (4 compute nodes of 8 GPUs, partition gpu, the default):
- idle.txt: nothing running;
- drain-mix.txt: sb-node02 set DRAIN with scontrol, a job holding all 8 GPUs of sb-node01 with one
  CPU (so Slurm calls the node `mix`, not `alloc`: a `mix` node may have no GPU left), a job holding
  2 GPUs of sb-node03, sb-node04 idle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nemotron_deploy.service import rollout, room

CAPTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sinfo"
IDLE = (CAPTURES / "idle.txt").read_text()
DRAIN_MIX = (CAPTURES / "drain-mix.txt").read_text()


@pytest.mark.parametrize(
    ("gres", "gpus"),
    [
        ("gpu:8", 8),
        ("gpu:h100:8", 8),
        ("gpu:h100:8(S:0-1)", 8),
        ("gpu:a100:4(S:0),gpu:h100:4(S:1)", 8),
        ("gpu:h100:4(S:0,1),mps:400", 4),
        ("gpu", 1),
        ("(null)", 0),
        ("mps:200", 0),
    ],
)
def test_gpu_count_reads_slurms_gres_forms(gres, gpus):
    assert room.gpu_count(gres) == gpus


def test_the_captures_parse_into_nodes_states_and_gpus():
    assert room.parse_sinfo(DRAIN_MIX, "gpu") == {
        "sb-node01": room.Node("sb-node01", "mix", 8),
        "sb-node02": room.Node("sb-node02", "drain", 8),
        "sb-node03": room.Node("sb-node03", "mix", 8),
        "sb-node04": room.Node("sb-node04", "idle", 8),
    }
    # No partition named: Slurm's default one (the `*`); another partition's nodes are not ours.
    assert set(room.parse_sinfo(IDLE, None)) == {"sb-node01", "sb-node02", "sb-node03", "sb-node04"}
    assert room.parse_sinfo(IDLE, "debug") == {}


def test_idle_nodes_with_the_gpus_make_room_for_a_replica():
    found = room.room(IDLE, "gpu", 2, 8)
    assert found.fits and found.idle == ("sb-node01", "sb-node02", "sb-node03", "sb-node04")
    assert found.why() == (
        "surge: 4 idle nodes with 8 gpu in partition gpu (sb-node01, sb-node02, sb-node03, sb-node04), "
        "a replica needs 2"
    )


def test_drained_and_mixed_nodes_are_not_room():
    """Only sb-node04 is idle: one node, a replica needs 2 -> drain-and-replace, saying so."""
    found = room.room(DRAIN_MIX, "gpu", 2, 8)
    assert not found.fits and found.idle == ("sb-node04",)
    assert (
        found.why()
        == "drain-and-replace: 1 idle node with 8 gpu in partition gpu (sb-node04), a replica needs 2"
    )
    assert room.room(DRAIN_MIX, None, 1, 8).fits  # a one-node replica fits on sb-node04, default partition


def test_idle_nodes_with_too_few_gpus_are_named_and_not_counted():
    text = "n1 gpu* idle gpu:4\nn2 gpu* idle gpu:4\nn3 big idle gpu:8\n"
    found = room.room(text, None, 1, 8)
    assert not found.fits and found.short_of_gpus == ("n1", "n2")
    assert "partition gpu" in found.why() and "too few GPUs: n1, n2" in found.why()


def rollout_opts(slurm_bin: str, **kw) -> argparse.Namespace:
    base = {
        "surge": False,
        "slurm_bin": slurm_bin,
        "partition": "gpu",
        "nodes_per_replica": 2,
        "gpus_per_node": 8,
    }
    return argparse.Namespace(**{**base, **kw})


def test_the_rollout_asks_slurm_and_surges_only_with_room(slurm):
    slurm.set({"sinfo": IDLE})
    assert rollout.choose_path(rollout_opts(str(slurm.bin))) == (
        True,
        "surge: 4 idle nodes with 8 gpu in partition gpu (sb-node01, sb-node02, sb-node03, sb-node04), "
        "a replica needs 2",
    )
    assert slurm.calls() == ["sinfo -h -N -o %n %P %t %G -p gpu"]
    slurm.set({"sinfo": DRAIN_MIX})
    surge, why = rollout.choose_path(rollout_opts(str(slurm.bin)))
    assert not surge and why.startswith("drain-and-replace: 1 idle node with 8 gpu in partition gpu")


def test_the_rollout_drains_when_slurm_cannot_be_asked(slurm):
    slurm.set({})  # sinfo fails as with the controller down
    surge, why = rollout.choose_path(rollout_opts(str(slurm.bin)))
    assert not surge
    assert why.startswith("drain-and-replace: cannot ask Slurm for idle nodes (")
    assert "Unable to contact slurm controller" in why


def test_surge_by_hand_skips_slurm(slurm):
    assert rollout.choose_path(rollout_opts(str(slurm.bin), surge=True))[0]
    assert slurm.calls() == []


FOUR_NODES = 'login = ["login01"]\ncompute = ["gpu-001", "gpu-002", "gpu-003", "gpu-004"]\n'


def test_the_deploy_hands_the_rollout_the_plans_shape_not_a_surge_verdict(tmp_path):
    from helpers import write_inventory

    from nemotron_deploy.deploy import desired
    from nemotron_deploy.inventory import load

    path = write_inventory(tmp_path, "h100", hosts=FOUR_NODES, settings={"replicas": 1})
    cluster = load(str(path))
    assert (cluster.plan.replicas, cluster.plan.replica_capacity) == (1, 2)  # the plan "has room"
    argv = desired.rollout_command(cluster, desired.Login()).split()
    assert "--surge" not in argv
    assert argv[argv.index("--nodes-per-replica") + 1] == "2"
    assert argv[argv.index("--gpus-per-node") + 1] == "8"
    assert argv[argv.index("--partition") + 1] == "batch"


def test_a_surge_job_left_pending_is_seen_as_such(slurm, monkeypatch):
    """The rollout's guard for a race with other work: a job still PENDING after the bound (True),
    one that Slurm starts meanwhile (False)."""
    from fake_slurm import job

    monkeypatch.setattr(rollout, "POLL", 0.01)
    slurm.set({"jobs": {"7": job("PENDING", reason="Resources")}})
    assert rollout.left_pending("7", 0.1)
    started = job("PENDING", then={"after_calls": 2, "job": {"state": "RUNNING"}})
    slurm.set({"jobs": {"8": started}})
    assert not rollout.left_pending("8", 5)
