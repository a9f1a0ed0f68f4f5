"""The job-record trust test (service/slurm.py RecordTrust): the scheduled check, and the rollout as
root, act only on a record that is a regular file of the submitting account (or root), opened
without following a link, no one else may write, in a directory no one else may write, naming one of
the inventory's compute nodes. Real files; a foreign owner is made with os.chown when the tests run
as root, and is the test's own uid against an expected root otherwise."""

from __future__ import annotations

import json
import os
import pwd

import pytest

from nemotron_deploy.service.slurm import RecordTrust, open_trusted, read_record

RECORD = {"job_id": "4242", "job_name": "svc-r1", "node": "gpu-001", "user": "x", "started": 1, "files": "ab"}


@pytest.fixture
def records(tmp_path):
    d = tmp_path / "records"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def write(path, data=RECORD, mode=0o644):
    path.write_text(json.dumps(data) + "\n")
    path.chmod(mode)
    return str(path)


def me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def foreign(path) -> RecordTrust:
    """A trust whose account did not write `path`: as root, the file is given to nobody; as another
    user, the file stays the tester's and the trusted account is root."""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return RecordTrust("root")


def test_the_submitting_accounts_record_is_trusted(records):
    path = write(records / "svc-r1.job.json")
    assert RecordTrust(me()).read(path) == (RECORD, None)
    assert read_record(path) == RECORD  # default: this process's user


def test_a_record_another_account_owns_is_not_trusted(records):
    path = write(records / "svc-r1.job.json")
    rec, why = foreign(path).read(path)
    assert rec is None
    assert "is owned by" in why and "not root" in why, why
    assert read_record(path, foreign(path)) is None


def test_a_symlinked_record_is_not_followed(records, tmp_path):
    target = write(tmp_path / "elsewhere.json")
    link = records / "svc-r1.job.json"
    link.symlink_to(target)
    rec, why = RecordTrust(me()).read(str(link))
    assert rec is None and "symbolic link" in why, why


def test_a_record_others_may_write_is_not_trusted(records):
    path = write(records / "svc-r1.job.json", mode=0o666)
    rec, why = RecordTrust(me()).read(path)
    assert rec is None and "writable by other accounts" in why, why


def test_a_record_in_a_directory_others_may_write_is_not_trusted(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scratch.chmod(0o1777)
    path = write(scratch / "svc-r1.job.json")
    rec, why = RecordTrust(me()).read(path)
    assert rec is None and "which other accounts may write" in why, why


def test_a_fifo_is_not_a_record_and_does_not_hang(records):
    path = records / "svc-r1.job.json"
    os.mkfifo(path)
    rec, why = RecordTrust(me()).read(str(path))
    assert rec is None and "not a regular file" in why, why


def test_a_record_naming_a_node_outside_the_cluster_is_not_trusted(records, tmp_path):
    nodes = tmp_path / "jobs"
    nodes.mkdir(mode=0o755)
    nodes.chmod(0o755)
    listing = nodes / "compute-nodes"
    listing.write_text("gpu-001\ngpu-002\n")
    listing.chmod(0o644)
    ok = write(records / "svc-r1.job.json")
    bad = write(records / "svc-r2.job.json", dict(RECORD, job_name="svc-r2", node="10.0.0.66"))
    # The node list must be root's: as another user the test's own list is refused, which is the rule.
    trust = RecordTrust(me(), str(listing))
    if os.geteuid() == 0:
        assert trust.read(ok) == (RECORD, None)
        rec, why = trust.read(bad)
        assert rec is None and "names node '10.0.0.66'" in why and "compute nodes" in why, why
    else:
        rec, why = trust.read(ok)
        assert rec is None and "node list" in why and "is owned by" in why, why


def test_a_node_list_that_is_a_link_trusts_no_node(records, tmp_path):
    real = tmp_path / "real-list"
    real.write_text("gpu-001\n")
    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o755)
    jobs.chmod(0o755)
    (jobs / "compute-nodes").symlink_to(real)
    path = write(records / "svc-r1.job.json")
    rec, why = RecordTrust(me(), str(jobs / "compute-nodes")).read(path)
    assert rec is None and "symbolic link" in why, why


def test_an_absent_record_is_no_record_and_no_complaint(records):
    assert RecordTrust(me()).read(str(records / "none.job.json")) == (None, None)
    with pytest.raises(FileNotFoundError):
        open_trusted(str(records / "none.job.json"), os.geteuid())


def test_an_unknown_job_user_is_a_usage_error():
    with pytest.raises(ValueError, match="no such user"):
        RecordTrust("no-such-user-xyz")
