"""One meaning of a Slurm job state everywhere (health, submit), the job record that stands in for
squeue under PrivateData=jobs, and the deploy decisions that depend on what a host reports."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
from fake_slurm import FakeSlurm, job
from helpers import INVENTORIES
from helpers import run_health as run
from nemotron_rehearsal.emulator import serve_in_thread

from nemotron_deploy import inventory
from nemotron_deploy.deploy.facts.slurm import SlurmVersion
from nemotron_deploy.deploy.host_checks import login_problems
from nemotron_deploy.deploy.operations import health_timer
from nemotron_deploy.deploy.operations.submit import submit_decision
from nemotron_deploy.service import slurm


@pytest.fixture
def emu():
    handle = serve_in_thread()
    yield handle
    handle.stop()


# --- job states ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["SUSPENDED", "COMPLETING", "REQUEUED", "CONFIGURING", "STOPPED"])
def test_a_job_in_a_not_ended_state_is_not_gone(state, emu, slurm_fake, capsys):
    """Before: health counted only PENDING/RUNNING/CONFIGURING/COMPLETING, so a SUSPENDED job was
    reported gone (and `--wait` gave up on it)."""
    slurm_fake.set({"jobs": {"4242": job(state)}, "hostnames": {"127.0.0.[1-2]": ["127.0.0.1"]}})
    code, out, _ = run(
        capsys, "--slurm-job", "nemotron", "--port", str(emu.port), "--json", "--no-state-file"
    )
    data = json.loads(out)
    assert data["reason"] != "job_gone", data
    if state in slurm.ALLOCATED_STATES:
        assert code == 0 and data["job"]["node"] == "127.0.0.1"


def test_squeue_filter_and_states_agree():
    rows = slurm.active_rows("12 COMPLETED\n10 SUSPENDED\n11 COMPLETING\n9 CANCELLED\n13 PENDING\n")
    assert rows == [("10", "SUSPENDED"), ("11", "COMPLETING"), ("13", "PENDING")]


@pytest.mark.parametrize(
    ("rows", "decision"),
    [
        ([], ("submit", [])),
        ([("7", "RUNNING")], ("reuse", ["7"])),
        ([("7", "SUSPENDED")], ("reuse", ["7"])),
        # Before: squeue -t PENDING,RUNNING,CONFIGURING missed it and a second job went in beside it.
        ([("7", "COMPLETING")], ("wait", ["7"])),
        ([("7", "COMPLETING"), ("8", "PENDING")], ("reuse", ["8"])),
    ],
)
def test_submit_decision(rows, decision):
    assert submit_decision(rows) == decision


# --- PrivateData=jobs: the job record ----------------------------------------------------------------


def _record(tmp_path, **fields) -> str:
    path = tmp_path / "nemotron.job.json"
    path.write_text(json.dumps({"job_id": "4242", "job_name": "nemotron", "node": "127.0.0.1", **fields}))
    return str(path)


def test_a_job_squeue_hides_is_found_by_its_record(emu, slurm_fake, capsys, tmp_path):
    slurm_fake.set({"jobs": {}})  # what squeue shows the health user under PrivateData=jobs
    record = _record(tmp_path)
    code, out, _ = run(
        capsys, "--slurm-job", "nemotron", "--job-record", record, "--port", str(emu.port), "--json",
        "--no-state-file",
    )  # fmt: skip
    data = json.loads(out)
    assert code == 0 and data["reason"] == "ok", data
    assert data["job"]["job_id"] == "4242" and data["job"]["source"] == "record"
    assert "PrivateData" in data["job"]["reason"]


def test_without_a_record_a_hidden_job_is_gone(slurm_fake, capsys, tmp_path):
    slurm_fake.set({"jobs": {}})
    missing = str(tmp_path / "none.job.json")
    code, out, _ = run(
        capsys, "--slurm-job", "nemotron", "--job-record", missing, "--json", "--no-state-file"
    )
    assert code == 2 and json.loads(out)["reason"] == "job_gone"


def test_a_record_for_another_job_name_is_ignored(slurm_fake, capsys, tmp_path):
    slurm_fake.set({"jobs": {}})
    record = _record(tmp_path, job_name="other")
    code, out, _ = run(capsys, "--slurm-job", "nemotron", "--job-record", record, "--json", "--no-state-file")
    assert code == 2 and json.loads(out)["reason"] == "job_gone"


@pytest.fixture
def slurm_fake(tmp_path, monkeypatch):
    fake = FakeSlurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{fake.bin}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "_FIRST_NODE", {})
    return fake


# --- what a host reports -----------------------------------------------------------------------------


def _commands(op, **kwargs) -> list[str]:
    return [str(c) for c in op._inner(**kwargs)]


def test_a_disabled_timer_is_enabled_again_though_its_units_did_not_change():
    """Before: enabled only when its unit files changed in this run."""
    assert _commands(health_timer.enable_timer, kind="systemd", units_changed=False, enabled=False) == [
        "systemctl enable --now nemotron-health.timer"
    ]
    assert _commands(health_timer.enable_timer, kind="systemd", units_changed=False, enabled=True) == []
    assert _commands(health_timer.enable_timer, kind="systemd", units_changed=True, enabled=True) == [
        "systemctl daemon-reload",
        "systemctl enable --now nemotron-health.timer",
    ]
    assert _commands(health_timer.enable_timer, kind="cron", units_changed=True, enabled=False) == []


def test_a_broken_sbatch_stops_the_deploy():
    """Before: the fact's error dict counted as 'sbatch present'."""
    broken = SlurmVersion().process(
        ["sbatch: error: s_p_parse_file: unable to read /etc/slurm/slurm.conf", "@@rc=1"]
    )
    cluster = inventory.load(str(INVENTORIES / "h100.py"))
    no_endpoint = {
        "haproxy": {"service": None, "version": None, "apt": False, "running": False},
        "submit": {"user": "root", "slurm_bin": "/usr/bin", "sudo": True},
    }
    (problem,) = login_problems(cluster, {"slurm": broken, **no_endpoint})
    assert "sbatch is installed but fails" in problem and "slurm.conf" in problem
    assert login_problems(cluster, {"slurm": None, **no_endpoint})
    assert not login_problems(cluster, {"slurm": {"version": "22.05.8"}, **no_endpoint})


def test_the_inventory_file_is_the_one_pyinfra_loaded(monkeypatch, tmp_path):
    """Not guessed from sys.argv: from the file group pyinfra adds and the code pyinfra executed."""
    from pyinfra_cli import util

    from nemotron_deploy.deploy import steps as deploy

    inv = tmp_path / "inv" / "mycluster.py"
    codes = {
        str(inv): None,
        str(tmp_path / "inv" / "group_data" / "mycluster.py"): None,
        str(tmp_path / "inv" / "group_data" / "all.py"): None,
        "deploys/nemotron.py": None,
    }
    monkeypatch.setattr(util, "PYTHON_CODES", codes)
    monkeypatch.setattr(sys, "argv", ["pyinfra", "--config", "x.py", "other.py"])
    inventory = SimpleNamespace(groups={"login": [], "compute": [], "mycluster": []})
    assert deploy.inventory_file(inventory) == str(inv)


def test_the_endpoint_is_refused_by_preflight_where_haproxy_cannot_run():
    """Missing and not installable, too old, or no service manager: each names the fix, before any
    change (endpoint = false is always offered)."""
    from nemotron_deploy.deploy.host_checks import endpoint_problems

    def problem(**haproxy):
        (text,) = endpoint_problems({"version": None, "apt": False, "service": "systemd", **haproxy})
        assert "endpoint = false" in text
        return text

    assert "HAProxy is not installed and apt-get is not here to install it" in problem()
    assert "HAProxy 2.2.9 is too old" in problem(version="2.2.9")
    assert "neither systemd nor /etc/init.d" in problem(service=None, version="2.6.12")
    assert endpoint_problems({"version": None, "apt": True, "service": "sysv"}) == []  # apt installs it
    assert endpoint_problems({"version": "2.6.12", "apt": False, "service": "systemd"}) == []


def test_endpoint_off_means_no_endpoint_problems_and_no_files(tmp_path):
    from helpers import write_inventory

    from nemotron_deploy.deploy import desired

    nothing = {
        "slurm": {"version": "22.05.8"},
        "haproxy": {"service": None, "version": None, "apt": False},
        "submit": {"user": "root", "slurm_bin": "/usr/bin", "sudo": True},
    }
    on = inventory.load(str(write_inventory(tmp_path / "on", "h100")))
    off = inventory.load(str(write_inventory(tmp_path / "off", "h100", settings={"endpoint": False})))
    forced = inventory.load(str(write_inventory(tmp_path / "forced", "h100", settings={"endpoint": True})))
    assert login_problems(on, nothing) == []  # default: no service manager, so no endpoint
    assert login_problems(off, nothing) == []
    assert login_problems(forced, nothing), "endpoint = true on a host that cannot run it"
    login = on.login[0]
    no_endpoint = desired.Login(endpoint=False)
    assert not any("/etc/haproxy" in p for p in desired.for_host(off, login, no_endpoint).paths)
    assert "/etc/haproxy/haproxy.cfg" in desired.for_host(on, login, desired.Login(endpoint=True)).paths


def test_replacing_replicas_needs_sudo_on_the_login_node(tmp_path):
    """The check runs as the health user and replaces replicas as the deploy's user: through sudo."""
    from helpers import write_inventory

    read = {
        "slurm": {"version": "22.05.8"},
        "haproxy": {"service": None, "version": None, "apt": False},
        "submit": {"user": "root", "slurm_bin": "/usr/bin", "sudo": False},
    }
    (problem,) = login_problems(inventory.load(str(write_inventory(tmp_path / "a", "h100"))), read)
    assert "sudo is not installed here: install it, or set restart_policy = never" in problem
    never = inventory.load(str(write_inventory(tmp_path / "b", "h100", settings={"restart_policy": "never"})))
    assert login_problems(never, read) == []
