"""What this project knows about Slurm, in one place: job states, `scontrol`/`squeue`/`sacct` output,
hostlists, and the job record that stands in for `squeue` where Slurm hides other users' jobs.

Standard library only, imported lazily where it costs: the health check imports this every minute on
login nodes and inside the job's container.
"""

from __future__ import annotations

import errno
import json
import os
import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any

# Job states (squeue %T / scontrol JobState names). A job in any of these has not ended: a second job
# of that name must not be submitted beside it, and a health check must not call it gone.
PENDING_STATES = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
)
# Ending: its processes are being torn down (a new job may be submitted once it has left).
ENDING_STATES = frozenset({"COMPLETING", "STAGE_OUT"})
ACTIVE_STATES = (
    PENDING_STATES | ENDING_STATES | frozenset({"RUNNING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"})
)
# States in which the job holds its nodes and rank 0 may serve.
ALLOCATED_STATES = ACTIVE_STATES - PENDING_STATES


class SlurmError(Exception):
    """Slurm could not be asked (command missing, controller unreachable): UNKNOWN."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class JobInfo:
    """What Slurm says about the job (``scontrol show job -o``, else ``sacct``, else nothing)."""

    __slots__ = ("job_id", "name", "state", "reason", "nodelist", "node", "stderr", "exit_code", "source")

    def __init__(self, job_id: str, **kw: Any) -> None:
        self.job_id = job_id
        self.name: str | None = kw.get("name")
        self.state: str = kw.get("state") or "UNKNOWN"
        self.reason: str | None = kw.get("reason")
        self.nodelist: str | None = kw.get("nodelist")
        self.node: str | None = kw.get("node")
        self.stderr: str | None = kw.get("stderr")
        self.exit_code: str | None = kw.get("exit_code")
        self.source: str = kw.get("source", "scontrol")

    @property
    def active(self) -> bool:
        # A recorded job's state is hidden from us: the probe of its node decides.
        return self.state in ACTIVE_STATES or self.source == "record"

    def describe(self) -> str:
        text = f"job {self.job_id}" + (f" ({self.name})" if self.name else "") + f" is {self.state}"
        extras = []
        if self.reason and self.reason not in ("None", "(null)"):
            extras.append(f"reason {self.reason}")
        if self.exit_code and not self.active and self.exit_code != "0:0":
            extras.append(f"exit code {self.exit_code}")
        if self.source == "untrusted":
            return f"no job named {self.name!r} that this user may see, and its record is not trusted: {self.reason}"
        if self.source == "record":
            return f"job {self.job_id} ({self.name}) is {self.reason}; rank 0 runs on {self.node}"
        if self.source == "gone":
            text = (
                f"no job named {self.name!r} in the queue"
                if self.job_id == "?"
                else f"job {self.job_id} is no longer in the queue (and sacct has no record of it)"
            )
        return text + (f" ({', '.join(extras)})" if extras else "")

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def _run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a Slurm command; missing command or timeout -> :class:`SlurmError`."""
    import shutil
    import subprocess

    if shutil.which(argv[0]) is None:
        raise SlurmError(
            f"{argv[0]} not found on PATH: run this on a Slurm login node, or give --host/--url instead "
            "of --slurm-job",
            missing=True,
        )
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer within {timeout:g}s (slurmctld busy?)") from None


def as_account(user: str | None, argv: list[str]) -> list[str]:
    """`argv` run as `user` (the service account the replicas are submitted as): as is where this
    process already is that user, runuser where it is root, else `sudo -n -u` (the deploy's sudo rule
    lets the health user run exactly the replicas' sbatch and scancel commands so)."""
    import pwd

    me = pwd.getpwuid(os.geteuid()).pw_name
    if not user or user == me:
        return argv
    if os.geteuid() == 0:
        return ["runuser", "-u", user, "--", *argv]
    return ["sudo", "-n", "-u", user, *argv]


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parse one ``scontrol show job -o`` line into ``{"JobId": ..., "JobState": ...}``.

    Values may contain ``=`` (``TRES=cpu=16,node=2``) and, for some keys, spaces; a new field starts
    only where whitespace is followed by ``Key=``.
    """
    fields: dict[str, str] = {}
    matches = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/.]*)=", line.strip()))
    text = line.strip()
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        fields[m.group(1)] = text[m.end() : end].strip()
    return fields


def _hostlist_split(expr: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in expr:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    parts.append(cur)
    return [p for p in parts if p]


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist (``gpu[01-03,07],login1``) like ``scontrol show hostnames`` does."""
    out: list[str] = []
    for part in _hostlist_split(expr.strip()):
        m = re.search(r"\[([^\]]*)\]", part)
        if not m:
            out.append(part)
            continue
        prefix, suffix = part[: m.start()], part[m.end() :]
        for rng in m.group(1).split(","):
            lo, _, hi = rng.partition("-")
            if not hi:
                out.extend(expand_hostlist(prefix + lo + suffix))
                continue
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                out.extend(expand_hostlist(f"{prefix}{n:0{width}d}{suffix}"))
    return out


_FIRST_NODE: dict[str, str | None] = {}  # --wait asks every few seconds; an allocation's nodes don't change


def first_node(nodelist: str) -> str | None:
    """The first node of an allocation: where global rank 0, hence the HTTP server, runs.

    ``scontrol show hostnames`` is the authority; the local expansion is the fallback for a login
    node whose scontrol cannot expand (no slurm.conf).
    """
    if not nodelist or nodelist in ("(null)", "None"):
        return None
    if nodelist not in _FIRST_NODE:
        node = None
        try:
            res = _run(["scontrol", "show", "hostnames", nodelist], timeout=10)
            if res.returncode == 0 and res.stdout.strip():
                node = res.stdout.split()[0]
        except SlurmError:
            pass
        if node is None:
            nodes = expand_hostlist(nodelist)
            node = nodes[0] if nodes else None
        _FIRST_NODE[nodelist] = node
    return _FIRST_NODE[nodelist]


def find_job_id(name: str, user: str | None = None) -> str | None:
    """The id of the job called ``name`` (of ``user`` only, when given: another account may submit a
    job of the same name): an active one first, the newest among equals."""
    argv = ["squeue", "-h", "-t", "all", "-n", name, "-o", "%i %T"]
    if user:
        argv[1:1] = ["-u", user]
    res = _run(argv)
    if res.returncode != 0:
        raise SlurmError(f"{' '.join(argv[:-2])} failed: {(res.stderr or res.stdout).strip()}")
    rows = [line.split() for line in res.stdout.splitlines() if line.strip()]
    if not rows:
        return None

    return max(rows, key=lambda row: (len(row) > 1 and row[1] in ACTIVE_STATES, _job_number(row[0])))[0]


def _expand_output_pattern(path: str, info: dict[str, str], job_id: str) -> str:
    """Expand the %-patterns sbatch allows in --error paths, in case scontrol shows them raw."""
    if "%" not in path:
        return path
    user = re.sub(r"\(.*\)$", "", info.get("UserId", ""))
    table = {
        "j": job_id,
        "J": job_id,
        "x": info.get("JobName", ""),
        "u": user,
        "A": info.get("ArrayJobId", job_id),
        "a": info.get("ArrayTaskId", ""),
        "N": info.get("BatchHost", ""),
        "%": "%",
    }
    return re.sub(r"%(%|[0-9]*[jJxuAaN])", lambda m: table.get(m.group(1)[-1], m.group(0)), path)


def _sacct_state(job_id: str) -> JobInfo | None:
    """State of a job that left slurmctld's memory, if accounting is there to tell."""
    import shutil

    if shutil.which("sacct") is None:
        return None
    res = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,JobName,State,ExitCode,NodeList"])
    if res.returncode != 0:
        return None
    for line in res.stdout.splitlines():
        cols = line.split("|")
        if len(cols) >= 4 and cols[0].split("+")[0] == job_id and cols[2]:
            return JobInfo(
                job_id,
                name=cols[1] or None,
                state=cols[2].split()[0],
                exit_code=cols[3] or None,
                nodelist=cols[4] if len(cols) > 4 else None,
                source="sacct",
            )
    return None


def query_job(job_id: str) -> JobInfo:
    """Current state of ``job_id``; a job Slurm no longer knows comes back with state ``GONE``."""
    res = _run(["scontrol", "show", "job", "-o", job_id])
    text = (res.stderr or "") + (res.stdout or "")
    if res.returncode != 0 or not res.stdout.strip():
        if "Invalid job id" in text or (res.returncode == 0 and not res.stdout.strip()):
            return _sacct_state(job_id) or JobInfo(job_id, state="GONE", source="gone")
        raise SlurmError(f"scontrol show job {job_id} failed: {text.strip() or f'exit {res.returncode}'}")
    info = parse_scontrol_record(res.stdout.strip().splitlines()[0])
    nodelist = info.get("NodeList")
    state = (info.get("JobState") or "UNKNOWN").split()[0]
    stderr = info.get("StdErr") or info.get("StdOut")
    return JobInfo(
        info.get("JobId", job_id),
        name=info.get("JobName"),
        state=state,
        reason=info.get("Reason"),
        nodelist=nodelist,
        node=first_node(nodelist) if nodelist and state in ALLOCATED_STATES else None,
        stderr=_expand_output_pattern(stderr, info, job_id) if stderr else None,
        exit_code=info.get("ExitCode"),
    )


def active_rows(squeue_output: str) -> list[tuple[str, str]]:
    """`squeue -o '%i %T'` lines -> [(job id, state)] of jobs that have not ended, oldest first."""
    rows = [line.split() for line in squeue_output.splitlines() if len(line.split()) == 2]
    return sorted(((r[0], r[1]) for r in rows if r[1] in ACTIVE_STATES), key=lambda r: _job_number(r[0]))


def _job_number(job_id: str) -> int:
    digits = re.match(r"\d+", job_id)
    return int(digits.group(0)) if digits else 0


# --------------------------------------------------------------------------------------------------
# The job record: what the batch script writes about itself where every user may read it, because
# sites with `PrivateData=jobs` show a job only to its owner (and operators), not to the health user.
# --------------------------------------------------------------------------------------------------


REPLICA_SUFFIX = "-r"


def replica_job_name(job_name: str, index: int) -> str:
    """The Slurm job name of replica `index` (1-based) of a deployment: <job_name>-r<index>."""
    return f"{job_name}{REPLICA_SUFFIX}{index}"


def record_path(records_dir: str, job_name: str) -> str:
    return os.path.join(records_dir, f"{job_name}.job.json")


def read_record(path: str | None, trust: RecordTrust | None = None) -> dict[str, Any] | None:
    """The record's fields (job_id, job_name, node, user, started), or None if absent, unreadable or
    not trusted (see :class:`RecordTrust`; default: written by this process's user)."""
    if not path:
        return None
    return (trust or RecordTrust()).read(path)[0]


class UntrustedFile(Exception):
    """A file the checks would act on that another account could have written; the message says why."""


def open_trusted(path: str, owner_uid: int, *, what: str = "file", limit: int = 1 << 20) -> bytes:
    """The bytes of ``path``, if it is a regular file owned by ``owner_uid`` (or root), opened without
    following a link, that no other account may write, in a directory no other account may write.
    FileNotFoundError when absent; UntrustedFile (the reason) otherwise."""
    import pwd
    import stat

    def who(uid: int) -> str:
        try:
            return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
        except KeyError:
            return f"uid {uid}"

    owners = {0, owner_uid}
    expected = " or ".join(who(u) for u in sorted(owners))
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise UntrustedFile(f"{what} {path} is a symbolic link: not followed") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFile(f"{what} {path} is not a regular file")
        if st.st_uid not in owners:
            raise UntrustedFile(f"{what} {path} is owned by {who(st.st_uid)}, not {expected}")
        if st.st_mode & 0o022:
            raise UntrustedFile(f"{what} {path} is writable by other accounts (mode {st.st_mode & 0o7777:o})")
        dst = os.stat(directory)
        if dst.st_uid not in owners or dst.st_mode & 0o022:
            raise UntrustedFile(
                f"{what} {path} is in {directory} (owner {who(dst.st_uid)}, mode {dst.st_mode & 0o7777:o}), "
                "which other accounts may write"
            )
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)[:limit]
    finally:
        os.close(fd)


class RecordTrust:
    """Which job records the checks act on: a record is trusted only if the account that submits the
    jobs (``owner``; default this process's user) or root wrote it (:func:`open_trusted`), and, with
    ``nodes_file`` (root's list of the inventory's compute nodes, one a line), only if the node it
    names is one of them. Anyone else's record could point the endpoint, or a root `scancel`, anywhere."""

    def __init__(self, owner: str | None = None, nodes_file: str | None = None) -> None:
        import pwd

        if owner is None:
            self.uid = os.geteuid()
            try:
                self.owner = pwd.getpwuid(self.uid).pw_name
            except KeyError:
                self.owner = str(self.uid)
        else:
            try:
                self.uid = pwd.getpwnam(owner).pw_uid
            except KeyError:
                raise ValueError(f"--job-user {owner}: no such user here") from None
            self.owner = owner
        self.nodes_file = nodes_file
        self._nodes: frozenset[str] | str | None = None  # the nodes, or why they can't be trusted

    def nodes(self) -> frozenset[str] | str | None:
        """The allowed nodes (None: no list given, any node), or the reason the list is not usable."""
        if self.nodes_file is None:
            return None
        if self._nodes is None:
            try:
                text = open_trusted(self.nodes_file, 0, what="node list").decode("utf-8", "replace")
                self._nodes = frozenset(line.strip() for line in text.splitlines() if line.strip())
            except FileNotFoundError:
                self._nodes = f"node list {self.nodes_file} is missing"
            except (OSError, UntrustedFile) as exc:
                self._nodes = str(exc)
        return self._nodes

    def read(self, path: str) -> tuple[dict[str, Any] | None, str | None]:
        """(record, None) for a trusted record; (None, why) for one that is there but not trusted;
        (None, None) when there is none (absent, unreadable or not a record)."""
        try:
            data = json.loads(open_trusted(path, self.uid, what="job record", limit=65536))
        except FileNotFoundError:
            return None, None
        except UntrustedFile as exc:
            return None, str(exc)
        except (OSError, ValueError):
            return None, None
        if not isinstance(data, dict) or not str(data.get("job_id", "")).isdigit() or not data.get("node"):
            return None, None
        nodes = self.nodes()
        if isinstance(nodes, str):
            return None, f"job record {path}: {nodes}, so no node can be trusted"
        if nodes is not None and str(data["node"]) not in nodes:
            return None, (
                f"job record {path} names node {str(data['node'])[:100]!r}, which is not one of the "
                f"cluster's compute nodes ({self.nodes_file})"
            )
        return data, None


FILES_DIGEST_PREFIX = "readonly FILES_DIGEST="  # the sbatch's line naming its job files' digest


def files_digest_in(sbatch_text: str) -> str | None:
    """The digest of the job files an sbatch names (render.py writes it; its job records carry it)."""
    for line in sbatch_text.splitlines():
        if line.startswith(FILES_DIGEST_PREFIX):
            return line[len(FILES_DIGEST_PREFIX) :].strip()
    return None


def files_digest(sbatch: str) -> str | None:
    """The digest of the job files the deploy installed last, as the sbatch file at `sbatch` states it."""
    try:
        with open(sbatch, encoding="utf-8") as fh:
            return files_digest_in(fh.read())
    except OSError:
        return None
