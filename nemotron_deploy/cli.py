"""`nemotron-deploy`: plan, render and validate inventories; list settings; check health; run the sandbox.

Exit codes: 0 success, 1 a check failed (invalid inventory, plan refused), 2 usage error.
`health` and `preflight` follow the Nagios plugin convention (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
Subcommands that run on cluster nodes (health, preflight) import nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2

# Subcommands implemented by their own module's main(argv); imported only when used.
DELEGATED: dict[str, tuple[str, str]] = {
    "health": (
        "nemotron_deploy.service.health",
        "poll the server until it generates; Nagios/JSON/Prometheus check",
    ),
    "preflight": (
        "nemotron_deploy.service.preflight",
        "check this node's GPUs with nvidia-smi (Nagios exit codes)",
    ),
    "sandbox": ("nemotron_rehearsal.sandbox.cli", "a local Slurm cluster in network namespaces (root)"),
}


def _load_cluster(path: str, model_config: str | None = None):
    from .catalog import CatalogError, ModelSpec
    from .inventory import load

    spec = None
    if model_config:
        try:
            spec = ModelSpec.from_model_config(model_config)
        except CatalogError as exc:
            raise SystemExit(_fail(str(exc), EXIT_USAGE)) from None
    return load(path, model_spec=spec)


def _fail(message: str, code: int) -> int:
    print(f"nemotron-deploy: {message}", file=sys.stderr)
    return code


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    from .deploy import endpoint
    from .inventory import InventoryError

    try:
        cluster = _load_cluster(args.inventory, args.model_config)
    except InventoryError as exc:
        return _fail(f"cannot plan {args.inventory}:\n{exc}", EXIT_INVALID)
    p = cluster.plan
    shapes = endpoint.request_shapes(p)
    changes = _replica_changes(cluster)
    if args.json:
        print(
            json.dumps(
                {**p.as_dict(), "requests": shapes, "access": endpoint.access(cluster), **changes}, indent=2
            )
        )
        return EXIT_OK
    rows = [
        ("model", f"{p.model} ({p.parameters_billion} B parameters)"),
        ("gpu", f"{p.gpu} ({p.usable_memory_gib} GiB usable)"),
        ("nodes per replica", f"{p.nodes} x {p.gpus_per_node} GPUs"),
        (
            "tensor parallel",
            str(p.tensor_parallel) + (" (crosses NVLink domains)" if p.tp_crosses_nvlink else ""),
        ),
        ("pipeline parallel", str(p.pipeline_parallel)),
        (
            "replicas",
            f"{p.replicas} of the {p.replica_capacity} that the {p.nodes_available} compute nodes hold, "
            "each its own Slurm job behind the endpoint",
        ),
        (
            "per-GPU memory",
            f"{p.per_gpu_memory_gib} GiB = weights {p.weights_per_gpu_gib} + KV cache "
            f"{p.kv_cache_per_gpu_gib} (batch {p.batch} x {p.seq_length} tokens) "
            f"+ reserve {p.runtime_reserve_gib}",
        ),
        ("headroom", f"{p.headroom_gib} GiB per GPU"),
        (
            "requests covered",
            f"up to {shapes['max_prompts']} prompts of up to {p.seq_length} tokens each; log-probs "
            f"(all_probs, compute_logprob): "
            + ("allowed" if shapes["logprobs_allowed"] else "refused by the endpoint (HTTP 400)")
            + f" (they need {shapes['logprob_need_gib']} GiB per GPU beyond weights + KV cache; "
            f"the plan leaves {shapes['logprob_capacity_gib']})",
        ),
        ("endpoint access", endpoint.access_summary(cluster)),
        (
            "runs as",
            f"{cluster.settings.service_user} (service_user, never root): every replica's job, NeMo and "
            f"its containers; the scheduled check as {cluster.settings.health_user}",
        ),
        ("openai api", _openai_summary(cluster)),
        ("scale-down", changes["scale_down"]["summary"]),
        ("rollout", changes["rollout"]["summary"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return EXIT_OK


def _openai_summary(cluster) -> str:
    from .deploy import openai_config

    s, spec = cluster.settings, cluster.settings.model_spec
    if s.endpoint is False or not openai_config.enabled(cluster):
        return "off (endpoint_openai = false)" if s.endpoint is not False else "no endpoint"
    routes = "/v1/models, /v1/completions" + (", /v1/chat/completions" if spec.chat_template else "")
    chat = "" if spec.chat_template else " (a base model: no chat)"
    return f"{routes} as model {spec.openai_id!r}{chat}; translated on each replica's front, usage by {openai_config.tokenizer_path(cluster)}"


def _replica_changes(cluster) -> dict:
    """What a deploy does to replicas above `replicas`, and how a rollout chooses its path: `plan`
    reads no cluster, so it says the rule; the deploy's read names the jobs (`pyinfra ... --dry`)."""
    s, p = cluster.settings, cluster.plan
    first = s.replica_job(p.replicas + 1)
    partition = s.slurm_partition or "Slurm's default"
    return {
        "scale_down": {
            "keeps": [s.replica_job(i) for i in range(1, p.replicas + 1)],
            "cancels_from": first,
            "summary": f"a deploy cancels the submitting account's jobs {first} and above, if any run "
            f"(replicas = {p.replicas}), after draining their endpoint slots into maintenance; "
            "`pyinfra ... --dry` names them",
        },
        "rollout": {
            "partition": s.slurm_partition,
            "nodes_per_replica": p.nodes,
            "gpus_per_node": p.gpus_per_node,
            "summary": f"surge (new job beside the old) when Slurm has {p.nodes} idle node(s) with "
            f"{p.gpus_per_node} GPUs in partition {partition}, else drain-and-replace; asked at each replica",
        },
    }


def cmd_render(args: argparse.Namespace) -> int:
    from .deploy import endpoint, render
    from .inventory import InventoryError

    try:
        cluster = _load_cluster(args.inventory)
    except InventoryError as exc:
        return _fail(f"not rendering {args.inventory}:\n{exc}", EXIT_INVALID)
    if args.endpoint:
        user, _, group = (args.run_as or endpoint.RUN_AS).partition(":")
        group = group or user
        files = render.render_endpoint(
            cluster,
            args.replicas or cluster.plan.replicas,
            # As the deploy installs it: a slot per replica the nodes hold (unless --replicas says).
            slots=None if args.replicas else cluster.plan.replica_capacity,
            config_dir=args.config_dir or endpoint.CONFIG_DIR,
            stats_socket=args.stats_socket or endpoint.STATS_SOCKET,
            bind_address=args.bind,
            run_as=user,
            run_group=group,
            socket_group=args.socket_group or group,
        )
    else:
        files = render.render(cluster)
    for path in render.write(files, args.out):
        print(path)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from .inventory import InventoryError, load

    results = []
    for path in args.inventories:
        try:
            cluster = load(path)
            results.append(
                {
                    "inventory": path,
                    "valid": True,
                    "hosts": len(cluster.login) + len(cluster.compute),
                    "plan": cluster.plan.as_dict(),
                    "problems": [],
                }
            )
        except InventoryError as exc:
            results.append(
                {"inventory": path, "valid": False, "problems": [p.as_dict() for p in exc.problems]}
            )
    if args.json:
        print(json.dumps({"valid": all(r["valid"] for r in results), "inventories": results}, indent=2))
    else:
        for r in results:
            if r["valid"]:
                p = r["plan"]
                print(
                    f"ok       {r['inventory']}: {r['hosts']} hosts, {p['nodes']} x {p['gpus_per_node']} "
                    f"{p['gpu']}, TP {p['tensor_parallel']} x PP {p['pipeline_parallel']}, "
                    f"{p['replicas']} replica(s)"
                )
            else:
                print(f"INVALID  {r['inventory']}:")
                for problem in r["problems"]:
                    host = f"host {problem['host']}: " if problem["host"] else ""
                    fld = f"{problem['field']}" if problem["field"] else ""
                    val = f" = {problem['value']!r}" if problem["value"] is not None else ""
                    print(
                        f"  - {host}{fld}{val}: {problem['message']}"
                        if fld
                        else f"  - {host}{problem['message']}"
                    )
    return EXIT_OK if all(r["valid"] for r in results) else EXIT_INVALID


def cmd_settings(args: argparse.Namespace) -> int:
    import textwrap

    from .settings import reference

    rows = reference()
    if args.json:
        print(json.dumps({"settings": rows}, indent=2))
        return EXIT_OK
    group = None
    for row in rows:
        if row["group"] != group:
            print(("\n" if group is not None else "") + row["group"])
            group = row["group"]
        default = "required" if row["required"] else f"default {row['default']!r}"
        print(f"  {row['name']}: {row['type']}, {default}")
        print(textwrap.fill(row["description"], width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return EXIT_OK


def cmd_api_key(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import api_keys

    try:
        key = api_keys.add(Path(args.file), args.name)
    except api_keys.KeysFileError as exc:
        return _fail(str(exc), EXIT_INVALID)
    print(key)
    print(
        f"nemotron-deploy: {args.name}'s key is above, shown once (only its hash went into {args.file}): "
        "give it to its user, who sends it as `Authorization: Bearer <key>` (call_server.py and "
        "`nemotron-deploy health` read it from NEMOTRON_API_KEY). Re-deploy to install it.",
        file=sys.stderr,
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemotron-deploy",
        description="Deploy NVIDIA Nemotron-4-340B-Base for inference with NeMo on Slurm GPU clusters. "
        "The deploy itself is `pyinfra INVENTORY deploys/nemotron.py`.",
        epilog="Exit codes: 0 ok, 1 invalid/refused, 2 usage error; health and preflight use Nagios codes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("plan", help="size a replica for an inventory's GPUs (nodes, TP, PP, memory)")
    p.add_argument("inventory", help="pyinfra inventory file, e.g. inventories/h100.py")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--model-config", metavar="PATH", help="size this checkpoint's model_config.yaml instead")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "render", help="write the job files (or, with --endpoint, HAProxy's) the deploy installs"
    )
    p.add_argument("inventory")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the files into")
    g = p.add_argument_group("the endpoint's files (haproxy.cfg and its Lua request envelope)")
    g.add_argument(
        "--endpoint", action="store_true", help="write the endpoint's files instead of the job files"
    )
    g.add_argument("--replicas", type=_positive_int, metavar="N", help="replica slots (default: the plan's)")
    g.add_argument("--config-dir", metavar="DIR", help="where haproxy.cfg finds the Lua file (/etc/haproxy)")
    g.add_argument(
        "--stats-socket", metavar="PATH", help="HAProxy's runtime API socket (/run/haproxy/admin.sock)"
    )
    g.add_argument(
        "--bind", default="", metavar="ADDR", help="the one address to listen on (default: endpoint_bind)"
    )
    g.add_argument(
        "--run-as",
        metavar="USER[:GROUP]",
        help="HAProxy's user and group, and its stats socket's owner (haproxy:haproxy)",
    )
    g.add_argument("--socket-group", metavar="GROUP", help="the stats socket's group (as --run-as)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="validate inventories, every host and setting (for CI)")
    p.add_argument("inventories", nargs="+", metavar="INVENTORY")
    p.add_argument("--json", action="store_true", help="one JSON object with every problem")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "settings",
        help="every inventory setting: type, default and what it is for",
        description="Every setting an inventory's group_data may set (nemotron_deploy/settings.py), "
        "grouped as in the schema, with its type, default and description.",
    )
    p.add_argument("--json", action="store_true", help="print the settings as JSON (for tools)")
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("api-key", help="make API keys for the endpoint (a keys file of their hashes)")
    keys = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    k = keys.add_parser(
        "new",
        help="print a new key once and append NAME <its sha256> to the keys file",
        description="Make a new API key for the endpoint: print it once on stdout, and append `NAME "
        "<sha256 of the key>` to FILE (created 0600 if missing). No key is stored anywhere; set "
        "endpoint_api_keys_file = FILE in the inventory and re-deploy to install it.",
    )
    k.add_argument("name", metavar="NAME", help="who the key is for: letters, digits, . _ - (e.g. team-a)")
    k.add_argument("--file", required=True, metavar="KEYS", help="the keys file (endpoint_api_keys_file)")
    k.set_defaults(func=cmd_api_key)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        try:
            module = importlib.import_module(DELEGATED[argv[0]][0])
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("nemotron_rehearsal"):
                raise
            # The sandbox is the rehearsal, installed from a clone only: clusters never get it.
            return _fail(
                f"'{argv[0]}' needs the rehearsal package, which is not installed: run scripts/setup "
                "in a clone of nemotron-deploy (it installs ./rehearsal beside the product)",
                EXIT_USAGE,
            )
        run: Callable[..., int] = module.main
        if argv[0] == "preflight":  # the check is stdlib-only; the catalog (pydantic) is looked up here
            from .catalog import smi_expectations

            return run(argv[1:], gpu_catalog=smi_expectations)
        return run(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
