#!/usr/bin/env python3
"""``nemotron-deploy health`` (also ``python -m nemotron_deploy.service.health``): is the Nemotron
server able to generate? The command line of the health check for NeMo's ``megatron_gpt_eval.py``
server; the check itself is in the modules it imports:

* single check (default), for timers and monitoring (check.check_once): the probe (probe.py, one
  real generation), Nagios plugin exit codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), one summary
  line with perfdata or ``--json`` (outcome.py), a state file that turns a persistent ``busy``
  (generation lock held, or wedged ranks) from WARNING into CRITICAL and keeps the last success
  time (state.py), and an optional Prometheus textfile (metrics.py);
* ``--wait``, for start-up (check.wait_ready): polls until the server generates, within a start-up
  budget; with a Slurm job it fails at once when the job is no longer alive;
* ``--endpoint URL``: the same single check through the endpoint (HAProxy in front of the
  replicas), labelled ``endpoint``; its own answers are read (probe.classify_endpoint);
* ``--slurm-job NAME --replicas N``: every replica job ``NAME-r<i>`` and the endpoint's slots, one
  verdict (fleet.py, which declares its own options; replacement.py those for replacing dead
  replicas).

Runs every minute on login nodes and inside the job's container (the zipapp render.health_zipapp
builds from service/), so it imports only the standard library at import time (``prometheus_client``
only when a textfile is written).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import fleet, replacement
from .check import (
    DEFAULT_BUSY_CRITICAL_AFTER,
    DEFAULT_JOB_CHECK_INTERVAL,
    DEFAULT_STARTUP_TIMEOUT,
    PROGRESS_LINE_SECONDS,
    Target,
    run_check,
)
from .metrics import write_textfile
from .nagios import UNKNOWN
from .options import UsageError, parse_duration, positive
from .outcome import REASONS, Outcome
from .probe import (
    API_KEY_ENV,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PORT,
    DEFAULT_PROMPT,
    DEFAULT_TIMEOUT,
    Access,
    api_key_from,
    use_replica_key_file,
)
from .state import default_state_file, load_state

PROG = "nemotron-deploy health"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """Usage errors are UNKNOWN (3) for Nagios, not argparse's 2 (which would read CRITICAL)."""
        self.print_usage(sys.stderr)
        self.exit(UNKNOWN, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    reasons = "\n".join(f"  {code:16s} {text}" for code, text in REASONS.items())
    p = _Parser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Check that the Nemotron NeMo server can generate: PUT /generate with one short prompt\n"
            "and tokens_to_generate=1. A TCP connect or an HTTP 404 is not readiness.\n\n"
            "Default mode: one check, Nagios exit codes and output. --wait: poll until ready (start-up)."
        ),
        epilog=(
            "exit codes: 0 OK, 1 WARNING (busy), 2 CRITICAL, 3 UNKNOWN (usage, Slurm or internal error)\n\n"
            f"reason codes:\n{reasons}\n\n"
            "examples:\n"
            f"  {prog} --host node001                      # one check of node001:1424\n"
            f"  {prog} --slurm-job nemotron --json         # the job's first node, JSON output\n"
            f"  {prog} --slurm-job 4242 --wait             # start-up: wait, fail fast if the job dies\n"
            f"  {prog} --wait --host 127.0.0.1 --port 1424 --server-pid $SERVER_PID   # in the job\n"
            f"  {prog} --url http://node001:1424 --prometheus-textfile /var/lib/node_exporter/nemotron.prom\n"
            f"  NEMOTRON_API_KEY=... {prog} --endpoint https://login01:1424 --ca-file /etc/haproxy/nemotron-endpoint.crt\n"
            "      # one generation through the endpoint (HAProxy), with an API key, over its TLS\n"
            f"  {prog} --slurm-job nemotron-340b --replicas 2 --endpoint-socket /run/haproxy/admin.sock\n"
            "      # every replica job nemotron-340b-r1..r2, and point the endpoint's slots at them"
        ),
    )
    where = p.add_argument_group("target (one of)")
    one = where.add_mutually_exclusive_group()
    one.add_argument("--url", help="server URL, e.g. http://node001:1424 (a /generate path is accepted)")
    one.add_argument("--host", help="server host name or address")
    one.add_argument(
        "--endpoint",
        metavar="URL",
        help="the endpoint (HAProxy in front of the replicas), e.g. https://login01:1424: one generation "
        "through it, with the API key in $NEMOTRON_API_KEY; its 503s read as busy / no_replica, its "
        "envelope's 400 as envelope_refused, its 401 as unauthorized",
    )
    one.add_argument(
        "--slurm-job",
        metavar="NAME|ID",
        help="probe the first node of this Slurm job (digits = job id, else the newest job of that name that squeue shows you: all jobs, or only your own where Slurm sets PrivateData=jobs; see --job-record)",
    )
    where.add_argument(
        "--port", type=int, help=f"server port with --host/--slurm-job (default {DEFAULT_PORT})"
    )
    where.add_argument(
        "--job-record",
        metavar="PATH",
        help="with --slurm-job NAME: the record the job's batch script writes (job id, first node), read "
        "when squeue shows no such job to this user, as on clusters with PrivateData=jobs",
    )
    where.add_argument(
        "--job-user",
        metavar="USER",
        help="the account that submits the jobs: a job name is looked up among its jobs only (squeue -u; "
        "another user may name a job the same), and only records it (or root) owns are read "
        "(default: records of the user running the check)",
    )
    where.add_argument(
        "--nodes-file",
        metavar="PATH",
        help="root's list of the cluster's compute nodes, one a line: a job record naming any other "
        "node is not trusted (untrusted_record)",
    )
    where.add_argument(
        "--job-id",
        help="with --url/--host: also watch this Slurm job and fail as soon as it is no longer alive",
    )

    where.add_argument(
        "--replica-key-file",
        metavar="PATH",
        help="send the replica key in this file to replicas (each replica's front refuses requests "
        "without it; the deploy keeps it in /var/lib/nemotron-deploy/replica.key on the login node); "
        "not needed for NeMo's own port on 127.0.0.1",
    )

    ac = p.add_argument_group("the endpoint's access (--endpoint)")
    ac.add_argument(
        "--ca-file",
        metavar="PATH",
        help="with --endpoint https://...: verify its certificate against this one (endpoint_tls = "
        "self-signed: /etc/haproxy/nemotron-endpoint.crt on the login node); default: the system's CAs",
    )
    ac.add_argument(
        "--api-key-file",
        metavar="PATH",
        help=f"with --endpoint: read the API key from this file (first line; - for standard input) "
        f"instead of ${API_KEY_ENV}; never give the key itself as an argument",
    )

    fleet.add_arguments(p)
    replacement.add_arguments(p)

    pr = p.add_argument_group("probe")
    pr.add_argument(
        "--connect-timeout",
        type=positive(float),
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help=f"TCP connect timeout in seconds (default {DEFAULT_CONNECT_TIMEOUT:g})",
    )
    pr.add_argument(
        "--timeout",
        type=positive(float),
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the reply once connected; none is 'busy' (default {DEFAULT_TIMEOUT:g})",
    )
    pr.add_argument("--prompt", default=DEFAULT_PROMPT, help="the probe's prompt (default: %(default)r)")

    wt = p.add_argument_group("start-up (--wait)")
    wt.add_argument("--wait", action="store_true", help="poll until the server generates (start-up mode)")
    wt.add_argument(
        "--startup-timeout",
        "--budget",
        dest="startup_timeout",
        type=parse_duration,
        default=DEFAULT_STARTUP_TIMEOUT,
        metavar="DURATION",
        help="start-up budget, e.g. 2700, 45m, 1h (default 45m; with --slurm-job, counted from job start)",
    )
    wt.add_argument(
        "--server-pid",
        "--watch-pid",
        dest="server_pid",
        type=int,
        metavar="PID",
        help="fail at once when this process (the server) exits",
    )
    wt.add_argument(
        "--job-check-interval",
        type=positive(float),
        default=DEFAULT_JOB_CHECK_INTERVAL,
        metavar="S",
        help=f"seconds between Slurm job state checks (default {DEFAULT_JOB_CHECK_INTERVAL:g})",
    )
    wt.add_argument("--no-progress", action="store_true", help="no progress line even on a terminal")
    wt.add_argument(
        "--progress-lines",
        action="store_true",
        help=f"progress as plain lines (on each change, else every {PROGRESS_LINE_SECONDS} s) even when "
        "stderr is not a terminal",
    )

    out = p.add_argument_group("output and state")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of the Nagios line")
    out.add_argument(
        "--state-file",
        metavar="PATH",
        help="remembers consecutive busy probes and the last success "
        "(default $XDG_STATE_HOME/nemotron-deploy/health-<target>.json, else ~/.local/state/...)",
    )
    out.add_argument("--no-state-file", action="store_true", help="keep no state between runs")
    out.add_argument(
        "--busy-critical-after",
        type=positive(int),
        default=DEFAULT_BUSY_CRITICAL_AFTER,
        metavar="N",
        help="busy is WARNING, and CRITICAL from the N-th busy check in a row (default %(default)s)",
    )
    out.add_argument(
        "--prometheus-textfile",
        metavar="PATH",
        help="also write metrics for node_exporter's textfile collector (atomic, mode 0644)",
    )
    return p


def _parse_url(url: str, option: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url if "://" in url else "http://" + url)
    if option == "--endpoint" and parts.scheme not in ("http", "https"):
        raise UsageError(f"{url}: the endpoint speaks https:// (or http:// with endpoint_tls = none)")
    if option != "--endpoint" and parts.scheme != "http":
        raise UsageError(f"{url}: NeMo's server speaks plain http://, not {parts.scheme}://")
    if parts.path not in ("", "/", "/generate"):
        raise UsageError(f"{url}: give the server's base URL (the probe always uses /generate)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise UsageError(f"{url}: invalid port") from None
    if not parts.hostname:
        raise UsageError(f"{url}: no host in the URL")
    if parts.port is None and option == "--endpoint":
        raise UsageError(f"{url}: give the endpoint's port (its endpoint_port setting), e.g. :1424")
    return parts.hostname, port


def _target_from_args(opts: argparse.Namespace) -> Target:
    for option in (*fleet.REPLICAS_ONLY, *replacement.REPLICAS_ONLY):
        if getattr(opts, option):
            raise UsageError(f"--{option.replace('_', '-')} goes with --slurm-job NAME --replicas N")
    if opts.url or opts.endpoint:
        option, url = ("--url", opts.url) if opts.url else ("--endpoint", opts.endpoint)
        if opts.port is not None:
            raise UsageError(f"--port goes with --host or --slurm-job; put the port in {option} instead")
        host, port = _parse_url(url, option)
        if not opts.endpoint:
            if opts.ca_file or opts.api_key_file:
                raise UsageError("--ca-file and --api-key-file go with --endpoint (replicas take no key)")
            return Target(host, port, None, opts.job_id)
        tls = url.startswith("https://")
        if opts.ca_file and not tls:
            raise UsageError(f"--ca-file is for an https:// endpoint; {url} is plain http")
        try:
            key = api_key_from(key_file=opts.api_key_file)
        except OSError as exc:
            raise UsageError(f"--api-key-file {opts.api_key_file}: {exc.strerror or exc}") from None
        access = Access(tls=tls, ca_file=opts.ca_file, api_key=key)
        return Target(host, port, None, opts.job_id, endpoint=True, access=access)
    if opts.ca_file or opts.api_key_file:
        raise UsageError("--ca-file and --api-key-file go with --endpoint URL (replicas take no key)")
    port = opts.port if opts.port is not None else DEFAULT_PORT
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port")
    if opts.host:
        return Target(opts.host, port, None, opts.job_id)
    if opts.slurm_job:
        if opts.job_id:
            raise UsageError("--job-id is for --host/--url; --slurm-job already names the job")
        return Target(
            None,
            port,
            opts.slurm_job,
            None,
            record=opts.job_record,
            trust=fleet.record_trust(opts),
            job_user=opts.job_user,
        )
    raise UsageError(
        "say what to check: --url URL, --host HOST [--port P], --slurm-job NAME|ID [--replicas N] or "
        "--endpoint URL"
    )


def _emit(out: Outcome, opts: argparse.Namespace) -> None:
    if opts.json:
        print(json.dumps(out.as_dict(), sort_keys=True))
    else:
        print(out.nagios())
    sys.stdout.flush()


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``nemotron-deploy health`` and ``python -m nemotron_deploy.service.health``."""
    parser = build_parser(prog)
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (3): return, don't exit the caller
        return exc.code if isinstance(exc.code, int) else UNKNOWN
    try:
        use_replica_key_file(opts.replica_key_file)
    except (OSError, ValueError) as exc:
        parser.print_usage(sys.stderr)
        print(
            f"{prog}: error: --replica-key-file {opts.replica_key_file}: {getattr(exc, 'strerror', None) or exc}",
            file=sys.stderr,
        )
        return UNKNOWN
    if opts.replicas is not None:
        return fleet.main(opts, parser, prog)
    try:
        target = _target_from_args(opts)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return UNKNOWN
    opts.state_path = None
    if not opts.wait and not opts.no_state_file:
        opts.state_path = opts.state_file or default_state_file(target.key())
    out = run_check(opts, target)
    if opts.prometheus_textfile:
        state = out.extra.get("state") or load_state(opts.state_path)
        try:
            write_textfile(opts.prometheus_textfile, out, state, target.metric_label())
        except OSError as exc:
            out.long_lines.append(f"error: cannot write {opts.prometheus_textfile}: {exc}")
            out.extra["textfile_error"] = str(exc)
            out.status = UNKNOWN
    out.extra.pop("state", None)
    _emit(out, opts)
    return out.status


if __name__ == "__main__":
    sys.exit(main())
