"""A fake Slurm for the tests: `squeue`, `scontrol`, `sacct`, `scancel` and `sinfo` executables on PATH
that answer from a JSON file like Slurm 22.05 would (`sinfo` prints the file's "sinfo" text, e.g. a
capture of the sandbox's real one; `scancel --user --name` removes those jobs). The `slurm` fixture (conftest.py) puts them first on PATH."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# What `scontrol show job -o 4242` prints on Slurm 22.05 (one line; fields in this order).
SCONTROL_LINE = (
    "JobId={job_id} JobName={name} UserId=alice(1000) GroupId=alice(1000) MCS_label=N/A Priority=4294901759 "
    "Nice=0 Account=(null) QOS=normal JobState={state} Reason={reason} Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode={exit_code} RunTime=00:00:12 TimeLimit=UNLIMITED TimeMin=N/A "
    "SubmitTime=2026-11-27T16:00:00 EligibleTime=2026-11-27T16:00:00 AccrueTime=2026-11-27T16:00:00 "
    "StartTime=2026-11-27T16:00:01 EndTime=Unknown Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-27T16:00:01 Scheduler=Main Partition=gpu AllocNode:Sid=login01:31337 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList={nodelist} BatchHost=127.0.0.1 NumNodes=2 NumCPUs=16 "
    "NumTasks=16 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=16,node=2,billing=16,gres/gpu=16 Socks/Node=* "
    "NtasksPerN:B:S:C=8:0:*:* CoreSpec=* MinCPUsNode=8 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) "
    "DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) "
    "Command=/home/alice/nemotron.sbatch WorkDir=/home/alice StdErr={stderr} StdIn=/dev/null "
    "StdOut=/home/alice/nemotron-{job_id}.out Power= TresPerNode=gres:gpu:8"
)

FAKE_SLURM = """\
#!{python}
# Fake squeue/scontrol/sacct/scancel/sinfo: answers from {config} like Slurm 22.05 would.
import json, os, sys
config_path = {config!r}
cfg = json.load(open(config_path))
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(config_path + ".calls", "a") as log:
    log.write(tool + " " + " ".join(args) + "\\n")
jobs = cfg.get("jobs", {{}})
if cfg.get("down") and tool in ("squeue", "scontrol") and "hostnames" not in args:
    print("slurm_load_jobs error: Unable to contact slurm controller (connect failure)", file=sys.stderr)
    sys.exit(1)

def job_state(job_id, job):
    calls = cfg.setdefault("calls", {{}})
    calls[job_id] = calls.get(job_id, 0) + 1
    json.dump(cfg, open(config_path, "w"))
    later = job.get("then")
    if later and calls[job_id] > later["after_calls"]:
        return dict(job, **later["job"])
    return job

def option(flag, long):
    if flag in args:
        return args[args.index(flag) + 1]
    return next((a.split("=", 1)[1] for a in args if a.startswith(long + "=")), None)

if tool == "squeue":
    name, user = option("-n", "--name"), option("-u", "--user")
    with_name = option("-o", "--format") == "%i %T %j"
    for job_id, job in jobs.items():
        if (name is None or job["name"] == name) and (user is None or job.get("user", user) == user):
            print(job_id, job_state(job_id, job)["state"], *([job["name"]] if with_name else []))
elif tool == "scancel":
    name, user = option("-n", "--name"), option("-u", "--user")
    cfg["jobs"] = {{
        job_id: job for job_id, job in jobs.items()
        if not (job["name"] == name and job.get("user", user) == user)
    }}
    json.dump(cfg, open(config_path, "w"))
elif tool == "sinfo":
    if "sinfo" not in cfg:
        print("sinfo: error: Unable to contact slurm controller (connect failure)", file=sys.stderr)
        sys.exit(1)
    print(cfg["sinfo"], end="")
elif tool == "scontrol" and args[:2] == ["show", "hostnames"]:
    if args[2] not in cfg.get("hostnames", {{}}):
        print("scontrol: fatal: Could not establish a configuration source", file=sys.stderr)
        sys.exit(1)
    print("\\n".join(cfg["hostnames"][args[2]]))
elif tool == "scontrol" and args[:3] == ["show", "job", "-o"]:
    job_id = args[3]
    if job_id not in jobs:
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        sys.exit(1)
    job = job_state(job_id, jobs[job_id])
    print({line!r}.format(job_id=job_id, **job))
elif tool == "sacct":
    job_id = args[args.index("-j") + 1]
    if "sacct" not in cfg:
        print("Slurm accounting storage is disabled", file=sys.stderr)
        sys.exit(1)
    print(cfg["sacct"].get(job_id, ""))
else:
    sys.exit("fake slurm: unexpected call " + " ".join(sys.argv))
"""


class FakeSlurm:
    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.config = root / "slurm.json"
        self.set({})
        script = FAKE_SLURM.format(python=sys.executable, config=str(self.config), line=SCONTROL_LINE)
        for tool in ("squeue", "scontrol", "sacct", "scancel", "sinfo"):
            (self.bin / tool).write_text(script)
            (self.bin / tool).chmod(0o755)

    def set(self, cfg: dict) -> None:
        self.config.write_text(json.dumps(cfg))

    def calls(self) -> list[str]:
        path = Path(str(self.config) + ".calls")
        return path.read_text().splitlines() if path.exists() else []


def job(state: str, nodelist: str = "127.0.0.[1-2]", reason: str = "None", **kw) -> dict:
    return {
        "name": "nemotron",
        "state": state,
        "reason": reason,
        "nodelist": nodelist,
        "exit_code": kw.pop("exit_code", "0:0"),
        "stderr": kw.pop("stderr", "/home/alice/nemotron-4242.err"),
        **kw,
    }
