"""The upgrade from the last release before the package's layout change (nemotron_deploy/<x>.py ->
nemotron_deploy/deploy/... and nemotron_deploy/service/...) on the sandbox: a deploy of that release
with its own package, then a deploy of this tree over it.

What is checked: the old deploy installs a scheduled check that names `nemotron_deploy.health` and
gives a result; the new deploy succeeds over it and a second one changes nothing; the cron entry then
names `nemotron_deploy.service.health`, runs as its user, gives a result and writes the metrics; and
the old command line (an operator's own monitoring, or cron between the venv's reinstall and the
entry's rewrite) still gives a result, through the one-release shim (nemotron_deploy/health.py).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from nemotron_rehearsal import sandbox as sb_api
from prometheus_client.parser import text_string_to_metric_families
from sshutil import (
    CRON_FILE,
    DEPLOY_SHARED,
    HEALTH_METRICS_DIR,
    HEALTH_STATE_DIR,
    HEALTH_USER,
    HEALTH_VENV,
    LOGS_DIR,
    NODE_DIR,
    RECORDS_DIR,
    REPO,
    SHARED,
    TEXTFILE_DIR,
    Run,
    cancel_jobs,
    clean_env,
    console_script,
    deploy_ok,
    reset_deploy,
    results_table,
    ssh,
)

# The last release before the layout change: its scheduled check runs `-m nemotron_deploy.health`.
OLD_RELEASE = "d405f12"
OLD_STARTED = f"{HEALTH_STATE_DIR}/started.json"  # where that release kept the started file
NEW_STARTED = "/var/lib/nemotron-deploy/started.json"
OLD_MODULE = "nemotron_deploy.health"
NEW_MODULE = "nemotron_deploy.service.health"
RESULTS = (0, 1, 2)  # OK, WARNING, CRITICAL: a result; UNKNOWN (3) or a traceback is a broken check


@pytest.fixture(autouse=True)
def _alone(sandbox):
    """The test resets the deploy: no other user of the sandbox runs meanwhile (sandbox/locks.py)."""
    with sb_api.exclusive_use("upgrade test (reset the deploy, deploy the old release)"):
        yield


def export_release(commit: str, dest: Path) -> Path:
    """The tree of `commit` (no .git) in `dest`; fails the test when the clone lacks that commit."""
    known = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True, timeout=30
    )
    if known.returncode != 0:
        pytest.fail(
            f"the upgrade test needs the clone's history: commit {commit} (the last release before the "
            "layout change) is not in it (a shallow clone? `git fetch --unshallow`)",
            pytrace=False,
        )
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], capture_output=True, timeout=60, check=True
    )
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, timeout=60, check=True)
    return dest


def deploy_tree(tree: Path, *args: str, timeout: float = 300) -> Run:
    """`pyinfra -y inventories/sandbox.py deploys/nemotron.py` from `tree`, with `tree`'s package
    first on the path (its deploy, its wheel for the login node)."""
    env = clean_env(PYTHONPATH=str(tree))
    which = subprocess.run(
        [
            str(Path(console_script("pyinfra")).parent / "python"),
            "-c",
            "import nemotron_deploy; print(nemotron_deploy.__file__)",
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert which.stdout.strip() == str(tree / "nemotron_deploy" / "__init__.py"), (
        f"the deploy of {tree} would import another package: {which.stdout}{which.stderr}"
    )
    return deploy_ok(*args, cwd=tree, env=env, timeout=timeout)


def cron_entry(sandbox) -> tuple[str, str]:
    """(user, command) of the login node's one cron entry for the scheduled check."""
    text = ssh(sandbox, sandbox.login_host, f"cat {CRON_FILE}").stdout
    entries = [line for line in text.splitlines() if line and not re.match(r"#|[A-Z_]+=", line)]
    assert len(entries) == 1, f"{CRON_FILE}:\n{text}"
    fields = entries[0].split(" ", 6)
    return fields[5], fields[6].removesuffix(" >/dev/null 2>&1")


def run_scheduled(sandbox, user: str, command: str) -> tuple[int, str, str, str]:
    """Run `command` as `user` on the login node, as cron does: (exit code, stdout, stderr, metrics
    textfile's text, written afresh by this run)."""
    textfile = command.split("--prometheus-textfile ", 1)[1].split(" ", 1)[0]
    marker = "@@nemotron-upgrade-test@@"
    result = ssh(
        sandbox,
        sandbox.login_host,
        f"rm -f {textfile}; su -s /bin/sh {user} -c {shlex.quote(command)}; echo {marker}$?; cat {textfile}",
        check=False,
        timeout=120,
    )
    out, sep, rest = result.stdout.partition(marker)
    assert sep, f"the check did not finish (rc {result.returncode}):\n{result.stdout}{result.stderr}"
    code, _, metrics = rest.partition("\n")
    return int(code), out, result.stderr, metrics


def assert_result(what: str, code: int, out: str, err: str) -> None:
    assert code in RESULTS and "Traceback" not in err, f"{what}: rc {code}\n{out}{err}"
    assert out.startswith("NEMOTRON "), f"{what}: not a Nagios line:\n{out}{err}"


# What the deploy places, per host, compared between a fresh deploy and an upgrade: every path with
# its type, mode, owner and link target, and each file's digest. The check's own state and metrics
# (the contents of its two directories), the jobs' records and the images are not the deploy's.
_PLACED = (NODE_DIR, DEPLOY_SHARED, CRON_FILE, TEXTFILE_DIR, "/etc/haproxy", "/etc/sudoers.d/nemotron-health")
_PRUNE = (f"{DEPLOY_SHARED}/images", LOGS_DIR, RECORDS_DIR)
_DIR_ONLY = (HEALTH_STATE_DIR, HEALTH_METRICS_DIR)


def placed(sandbox) -> dict[str, list[str]]:
    """{host: sorted lines `path|type|mode|user|group|link target|sha256 prefix`} of what the deploy
    placed (one SSH command a host)."""
    prune = " -o ".join(f"-path {shlex.quote(p)}" for p in (*_PRUNE, "*/__pycache__"))
    show = (
        # show [find options] PATH...: the paths that exist, listed as above
        'show() { opts=$1; shift; for p in "$@"; do [ -e "$p" ] || [ -L "$p" ] || continue; '
        f"find \"$p\" $opts \\( {prune} \\) -prune -o -printf '%p|%y|%m|%u|%g|%l\\n'; done | sort | "
        "while IFS= read -r line; do p=${line%%|*}; "
        'if [ -f "$p" ] && [ ! -L "$p" ]; then echo "$line|$(sha256sum < "$p" | cut -c1-16)"; '
        'else echo "$line|"; fi; done; }; '
    )
    found = {}
    for node in (sandbox.login_host, *sandbox.compute_names):
        if node == sandbox.login_host:
            command = show + f"show '' {' '.join(_PLACED)}; show '-maxdepth 0' {' '.join(_DIR_ONLY)}"
        else:
            command = show + f"show '' {NODE_DIR}"
        lines = ssh(sandbox, node, command).stdout.splitlines()
        # What is made on the login node, new by each first deploy (MADE_ON_HOST): compare that it is
        # there with its owner and mode, not its bytes.
        found[node] = [
            line.rsplit("|", 1)[0] + "|" if line.split("|", 1)[0] in MADE_ON_HOST else line for line in lines
        ]
    return found


# Secrets made on the login node, new ones by each first deploy: the TLS pair and the replica key.
MADE_ON_HOST = (
    "/etc/haproxy/nemotron-endpoint.crt",
    "/etc/haproxy/nemotron-endpoint.crt.key",
    "/etc/haproxy/nemotron_replica_key.map",
    "/var/lib/nemotron-deploy/replica.key",
    f"{SHARED}/nemotron-deploy/replica.key",
)


def test_upgrade_from_the_old_layout_keeps_the_scheduled_check_running(sandbox, tmp_path):
    old_tree = export_release(OLD_RELEASE, tmp_path / "old")
    login = sandbox.login_host
    # What a first deploy of this tree places, to compare the upgraded nodes with.
    reset_deploy(sandbox)
    deploy_tree(REPO)
    fresh = placed(sandbox)
    # A login node the new layout has never seen: nothing deployed (as a first deploy finds it).
    reset_deploy(sandbox)
    try:
        # 1. The old release, deployed with its own package.
        deploy_tree(old_tree)
        user, old_command = cron_entry(sandbox)
        assert user == HEALTH_USER
        assert f" -m {OLD_MODULE} " in old_command, old_command
        code, out, err, _ = run_scheduled(sandbox, user, old_command)
        assert_result("the old release's scheduled check", code, out, err)
        # A started service: the old release's submit kept its started file in the health user's
        # state dir (written here as it wrote it, not by submitting: no replica needs to run).
        ssh(sandbox, login, f"""printf '%s\\n' '{{"at": 1, "jobs": {{}}}}' > {OLD_STARTED}""")

        # 2. This tree over it: converges, and a second run changes nothing.
        first = deploy_tree(REPO)
        assert results_table(first.output)["Grand total"]["Success"] != "-", first.describe()
        again = deploy_tree(REPO)
        total = results_table(again.output)["Grand total"]
        assert total["Success"] == "-" and total["Error"] == "-", (
            f"a second run changed things:\n{again.describe()}"
        )
        # The service stays started: the check finds the started file where it now looks (root's own
        # directory), or it would replace no dead replica until the next submit. Root left the old
        # file alone (it never writes in the health user's directory).
        stats = ssh(sandbox, login, f"stat -c '%U %a' {NEW_STARTED}; cat {OLD_STARTED}").stdout.splitlines()
        assert stats[0] == "root 644", stats
        assert stats[1] == '{"at": 1, "jobs": {}}', stats
        ssh(sandbox, login, f"rm -f {OLD_STARTED} {NEW_STARTED}")
        # Nothing of the old release left, nothing missing: the nodes are as a first deploy leaves them.
        upgraded = placed(sandbox)
        for node, lines in fresh.items():
            missing = sorted(set(lines) - set(upgraded[node]))
            extra = sorted(set(upgraded[node]) - set(lines))
            assert not missing and not extra, (
                f"{node} after the upgrade is not as a first deploy leaves it: missing {missing}, extra {extra}"
            )

        # 3. The cron entry names the new module, runs as its user, gives a result, writes metrics.
        user, new_command = cron_entry(sandbox)
        assert user == HEALTH_USER
        assert f" -m {NEW_MODULE} " in new_command and OLD_MODULE + " " not in new_command, new_command
        code, out, err, metrics = run_scheduled(sandbox, user, new_command)
        assert_result("the new scheduled check", code, out, err)
        samples = {s.name: s for f in text_string_to_metric_families(metrics) for s in f.samples}
        assert "nemotron_check_status" in samples, metrics
        assert samples["nemotron_check_status"].value == code

        # The venv was rebuilt from the new wheel (no module of the old layout left in it), and the
        # old command line still gives the same result, through the shim.
        probe = (
            "import importlib.util as u, nemotron_deploy.health as h; "
            "print(u.find_spec('nemotron_deploy.fleet'), 'next release' in h.__doc__)"
        )
        leftover = ssh(sandbox, login, f"{HEALTH_VENV}/bin/python -B -c {shlex.quote(probe)}").stdout.split()
        assert leftover == ["None", "True"], f"the login node's venv still has the old layout: {leftover}"
        old_code, old_out, old_err, _ = run_scheduled(sandbox, user, old_command)
        assert_result("the old command line after the upgrade", old_code, old_out, old_err)
        assert old_code == code and old_out.split(" - ")[0] == out.split(" - ")[0], (old_out, out)
    finally:
        # The check may have submitted replacements for the replicas it found dead.
        cancel_jobs(sandbox)
