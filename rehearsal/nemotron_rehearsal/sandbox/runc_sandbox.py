#!/usr/bin/python3
"""runc for the sandbox's podman (installed as /usr/local/bin/runc-sandbox on compute nodes).

The docker/podman sbatch asks for `--ulimit memlock=-1` as NVIDIA recommends, and podman then also
raises nofile and nproc. Root on a real node may raise hard limits; this machine denies it (no
CAP_SYS_RESOURCE), so runc would refuse to start the container. This lowers each hard limit the
container asks for to the node's own, says so on stderr (the job's .err), and runs the real runc.
"""

import json
import os
import resource
import sys

RUNC = "/usr/bin/runc"


def clamp(config_path: str) -> None:
    with open(config_path) as f:
        config = json.load(f)
    for limit in config.get("process", {}).get("rlimits", []):
        _, hard = resource.getrlimit(getattr(resource, limit["type"]))
        if hard != resource.RLIM_INFINITY and limit["hard"] > hard:
            print(f"runc-sandbox: {limit['type']} {limit['hard']} lowered to {hard}", file=sys.stderr)
            limit["hard"] = hard
            limit["soft"] = min(limit["soft"], hard)
    with open(config_path, "w") as f:
        json.dump(config, f)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "create" in args and "--bundle" in args:
        clamp(os.path.join(args[args.index("--bundle") + 1], "config.json"))
    os.execv(RUNC, [RUNC, *args])
