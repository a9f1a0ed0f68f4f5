"""The outputs: ``README-table.md`` (paste-ready), ``results.csv`` (summaries), ``samples.csv`` (every
measurement), ``results.json`` (everything) and ``bench.png`` (one panel per part).

Targets are evaluated here, from numbers of this one run only, and a missed target is printed as
missed with the measured value: the table is meant to go into the README as is.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .common import Summary

# Issue 13's targets: no-change re-deploy / floor by node count, first deploy / floor, peak memory.
RE_DEPLOY_FLOOR_LIMITS = {16: 1.5, 64: 1.3}
FIRST_FLOOR_LIMITS = {64: 2.0}
MEMORY_NODES = 128
MEMORY_LIMIT = 300 * 2**20  # bytes, the pyinfra process's peak RSS
SSH_COMMANDS_LIMIT = 1
READINESS_P95_LIMIT = 1.0
PYXIS_BYTES_LIMIT = 1.05  # one import for the cluster: the image once (plus a few manifest reads)
CHECK_COST_LIMIT = 1.5
ENDPOINT_RATIO_LIMIT = 1.8  # requests/s with 2 replicas over 1, at least
ENDPOINT_ADDED_P99_LIMIT = 0.005  # seconds the endpoint may add at p99, at most
OPENAI_ADDED_P99_LIMIT = 0.002  # seconds /v1/completions may add over PUT /generate at p99, at most
FAILOVER_FAILURES_LIMIT = 1  # client requests that may fail when a replica dies under load


def _s(x: float) -> str:
    """Seconds, with as many digits as the size deserves."""
    if x != x:
        return "n/a"
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1000:.0f} ms" if x >= 0.1 else f"{x * 1000:.1f} ms"


def _cell(summary: dict) -> str:
    if not summary.get("n"):
        return "n/a"
    if summary["n"] == 1:
        return _s(summary["median"])
    return f"{_s(summary['median'])} ({_s(summary['min'])}–{_s(summary['max'])})"


def _bytes(n: float) -> str:
    if n != n:
        return "n/a"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _ms(x: float) -> str:
    """A signed difference in milliseconds: "+0.42 ms"."""
    return "n/a" if x != x else f"{x * 1000:+.2f} ms"


def _ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def _x(r: float) -> str:
    return "n/a" if r != r else f"{r:.2f}x"


def _marked(r: float, limit: float | None) -> str:
    """A ratio, with its target where there is one: "1.21x (≤1.3x met)"."""
    if limit is None:
        return _x(r)
    return f"{_x(r)} (≤{limit:g}x {'met' if r <= limit else '**missed**'})"


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------


def targets(results: dict) -> list[dict]:
    """Every target of the issue with its measured value and whether this run met it."""
    out: list[dict] = []
    dep = results.get("deploy")
    if dep:
        summ = dep["summary"]
        for key, what, limits in (
            ("redeploy", "no-change re-deploy", RE_DEPLOY_FLOOR_LIMITS),
            ("first", "first deploy (image present)", FIRST_FLOOR_LIMITS),
        ):
            for n, limit in limits.items():
                if n not in summ:
                    continue
                r = _ratio(summ[n][key]["median"], summ[n]["floor"]["median"])
                out.append(
                    {
                        "target": f"{what} at {n} nodes within {limit:g}x the floor",
                        "measured": f"{_x(r)} ({_s(summ[n][key]['median'])} vs {_s(summ[n]['floor']['median'])})",
                        "met": r <= limit,
                    }
                )
        worst = max(c["max"] for c in dep["commands"].values())
        uploads = max(c["uploads"] for c in dep["commands"].values())
        out.append(
            {
                "target": f"{SSH_COMMANDS_LIMIT} SSH command per host in a no-change re-deploy, no upload",
                "measured": f"{worst} (max over hosts and sizes; {uploads} file uploads)",
                "met": worst <= SSH_COMMANDS_LIMIT and uploads == 0,
            }
        )
        hi = max(dep["sizes"])
        rss = summ[hi].get("peak_rss_max")
        if rss:
            note = "" if hi >= MEMORY_NODES else f" ({MEMORY_NODES} not run: measured at {hi})"
            out.append(
                {
                    "target": f"pyinfra's peak memory at {MEMORY_NODES} nodes under {_bytes(MEMORY_LIMIT)}{note}",
                    "measured": f"{_bytes(rss)} at {hi} nodes (max over its deploys)",
                    "met": rss < MEMORY_LIMIT and hi >= MEMORY_NODES,
                }
            )
    rd = results.get("readiness")
    if rd:
        p95 = rd["ours"]["summary"]["p95"]
        out.append(
            {
                "target": f"readiness latency p95 <= {READINESS_P95_LIMIT:g} s (health --wait)",
                "measured": f"{_s(p95)} ({rd['ours']['errors']} failed starts)",
                "met": p95 <= READINESS_P95_LIMIT and rd["ours"]["errors"] == 0,
            }
        )
    cc = results.get("check_cost")
    if cc:
        r = cc["ratio_wall_vs_bare"]
        out.append(
            {
                "target": f"one check within {CHECK_COST_LIMIT:g}x the bare Python probe (wall)",
                "measured": f"{_x(r)} wall, {_x(cc['ratio_cpu_vs_bare'])} CPU",
                "met": r <= CHECK_COST_LIMIT and cc["health"]["failures"] == 0,
            }
        )
    ep = results.get("endpoint")
    if ep:
        tp, lat, fo = ep["throughput"], ep["latency"], ep["failover"]
        r = tp["ratio"]
        out.append(
            {
                "target": f"endpoint: 2 replicas serve >= {ENDPOINT_RATIO_LIMIT:g}x the requests/s of 1",
                "measured": f"{_x(r)} ({tp['rps']['2']:.1f} vs {tp['rps']['1']:.1f} req/s, "
                f"{tp['errors']} failed requests)",
                "met": r >= ENDPOINT_RATIO_LIMIT and tp["errors"] == 0,
            }
        )
        added = lat["added"]["p99"]
        failed = sum(lat["errors"].values())
        out.append(
            {
                "target": f"endpoint adds <= {_s(ENDPOINT_ADDED_P99_LIMIT)} at p99",
                "measured": f"{_ms(added)} at p99, {_ms(lat['added']['p50'])} at p50 ({failed} failed requests)",
                "met": added <= ENDPOINT_ADDED_P99_LIMIT and failed == 0,
            }
        )
        if "openai_added" in lat:
            added = lat["openai_added"]["p99"]
            out.append(
                {
                    "target": f"/v1/completions adds <= {_s(OPENAI_ADDED_P99_LIMIT)} over PUT /generate at p99",
                    "measured": f"{_ms(added)} at p99, {_ms(lat['openai_added']['p50'])} at p50 "
                    f"({lat['errors']['openai']} failed requests)",
                    "met": added <= OPENAI_ADDED_P99_LIMIT and lat["errors"]["openai"] == 0,
                }
            )
        otp = ep.get("openai_throughput")
        if otp:
            out.append(
                {
                    "target": f"/v1/completions: 2 replicas serve >= {ENDPOINT_RATIO_LIMIT:g}x the requests/s of 1",
                    "measured": f"{_x(otp['ratio'])} ({otp['rps']['2']:.1f} vs {otp['rps']['1']:.1f} req/s, "
                    f"{otp['errors']} failed requests)",
                    "met": otp["ratio"] >= ENDPOINT_RATIO_LIMIT and otp["errors"] == 0,
                }
            )
        out.append(
            {
                "target": f"a replica killed under load: <= {FAILOVER_FAILURES_LIMIT} failed client request",
                "measured": f"{fo['failures']} of {fo['requests']} failed; slot DOWN after {_s(fo['down_after'])}",
                "met": fo["failures"] <= FAILOVER_FAILURES_LIMIT,
            }
        )
        su, ro = ep.get("sustained"), ep.get("refused_once")
        if su:
            out.append(
                {
                    "target": "sustained load while replicas are rolled: no failed client request",
                    "measured": f"{su['failures']} of {su['requests']} failed ({su['rps']:.0f} req/s, "
                    f"{su['rolls']} rolls)",
                    "met": su["failures"] == 0,
                }
            )
        if ro:
            out.append(
                {
                    "target": "one refused connection on the only serving replica: no failed request",
                    "measured": f"{ro['failures']} of {ro['requests']} failed; slot not UP for "
                    f"{_s(ro['slot_not_up_seconds'])}",
                    "met": ro["failures"] == 0,
                }
            )
    rg = results.get("registry")
    pyxis = [row for row in (rg or {}).get("rows", []) if row["runtime"] == "pyxis"]
    if pyxis and rg.get("image_bytes"):
        worst = max(row["bytes"] / rg["image_bytes"] for row in pyxis)
        sizes = ", ".join(str(row["nodes"]) for row in pyxis)
        out.append(
            {
                "target": f"pyxis: the registry serves 1x the image per deploy, whatever the node count ({sizes})",
                "measured": f"at most {_x(worst)} of {_bytes(rg['image_bytes'])}",
                "met": worst <= PYXIS_BYTES_LIMIT,
            }
        )
    return out


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Measured by `{results['command']}` on {results['date']}: {m['cores']} cores, "
        f"{m['memory_gib']} GiB RAM ({m['cpu']}), Python {m['python']}; median (min–max) unless noted; "
        f"the runner took {results['total_seconds']:.0f} s.",
        "",
    ]
    dep = results.get("deploy")
    if dep:
        lines += [
            f"**Deploy scaling** on the sandbox cluster (login + N compute nodes, real OpenSSH), "
            f"{dep['runs']} run(s) per size, interleaved. First deploy: after removing what the deploy "
            "placed, with the image already pulled (pull excluded). Floor: one OpenSSH round trip per "
            "host, all hosts in parallel, with the key exchange pyinfra's paramiko negotiates "
            "(curve25519), running the deploy's stat + sha256sum loop over every path it reads (the "
            "image only stat-ed). Every sshd shares this machine's cores, so the floor grows with N. "
            "Beside it, reported only: the same round trips with OpenSSH's default key exchange "
            "(sntrup761x25519, ~70 ms of client CPU per host here), the floor as issue 13 measured it.",
            "",
            "| compute nodes | first deploy | no-change re-deploy | floor | first / floor "
            "| re-deploy / floor | SSH commands per host (re-deploy) | pyinfra peak memory "
            "| floor, OpenSSH's default key exchange |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for n in dep["sizes"]:
            s = dep["summary"][n]
            c = dep["commands"][n]
            ratio = _ratio(s["redeploy"]["median"], s["floor"]["median"])
            first = _ratio(s["first"]["median"], s["floor"]["median"])
            lim_r, lim_f = RE_DEPLOY_FLOOR_LIMITS.get(n), FIRST_FLOOR_LIMITS.get(n)
            lines.append(
                f"| {n} | {_cell(s['first'])} | {_cell(s['redeploy'])} | {_cell(s['floor'])} "
                f"| {_marked(first, lim_f)} | {_marked(ratio, lim_r)} | {c['max']} "
                f"| {_bytes(s.get('peak_rss_max', float('nan')))} "
                f"| {_cell(s['floor_default_kex'])} |"
            )
        pulled = {n: dep["summary"][n].get("first_pulled_max", 0) for n in dep["sizes"]}
        if any(pulled.values()):
            lines.append(
                f"\nWarning: some first deploys pulled the image (nodes pulling, by size: {pulled}): "
                "their times include a pull (was the image removed during the run?)."
            )
        changed = {n: dep["summary"][n]["redeploy_changed_max"] for n in dep["sizes"]}
        if any(changed.values()):
            lines.append(
                f"\nWarning: some re-deploys changed something (operations changed, by size: {changed}); "
                "they were not no-change runs (was the code or the cluster modified during the run?)."
            )
        lines.append("")
    rd = results.get("readiness")
    if rd:
        lo, hi = rd["delay_range"]
        lines += [
            f"**Readiness latency**: {rd['starts']} emulator starts per waiter, random load delay "
            f"{lo:g}–{hi:g} s, loopback; time from the moment the server can generate to the moment "
            "the waiter returns.",
            "",
            "| waiter | median | p95 | min–max | failed |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        names = {
            "ours": "`nemotron-deploy health --wait`",
            "card": "model card: `curl -X PUT` every 10 s, then `sleep 5`",
        }
        for kind in ("ours", "card"):
            s = rd[kind]["summary"]
            lines.append(
                f"| {names[kind]} | {_s(s['median'])} | {_s(s['p95'])} | {_s(s['min'])}–{_s(s['max'])} "
                f"| {rd[kind]['errors']} |"
            )
        lines.append("")
    cc = results.get("check_cost")
    if cc:
        bare = cc["bare-python"]
        lines += [
            f"**Check cost**: one single check against a healthy emulator, {cc['runs']} runs each, "
            "round-robin; CPU = user + system of the process.",
            "",
            "| probe | wall | CPU | wall vs bare Python |",
            "| --- | ---: | ---: | ---: |",
        ]
        names = {
            "health": "`python -m nemotron_deploy.service.health --no-state-file`",
            "curl": "`curl -s -X PUT` (same body)",
            "bare-python": "bare stdlib `urllib` PUT (same interpreter)",
        }
        for v in ("health", "curl", "bare-python"):
            r = _ratio(cc[v]["wall"]["median"], bare["wall"]["median"])
            lines.append(f"| {names[v]} | {_cell(cc[v]['wall'])} | {_cell(cc[v]['cpu'])} | {_x(r)} |")
        imp = cc["import"]
        lines += [
            f"| `import nemotron_deploy.service.health` (start-up difference) | {_cell(imp['difference'])} | | |",
            f"| `import nemotron_deploy.service.health` (`-X importtime`) | {_cell(imp['importtime'])} | | |",
            "",
        ]
    ep = results.get("endpoint")
    if ep:
        lines += _endpoint_markdown(ep)
    rg = results.get("registry")
    if rg:
        lines += [
            "**Registry traffic**: bytes the sandbox registry served for one deploy that fetches the "
            "image (removed first): pyxis imports it once into shared storage with enroot, podman and "
            "docker pull it on every node (docker: each node's own engine). x image: bytes served over "
            "the pyxis import's bytes at its smallest size.",
            "",
            "| runtime | compute nodes | bytes served | x image | nodes that fetched | requests | deploy with fetch |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in rg["rows"]:
            times = f"{row['bytes'] / rg['image_bytes']:.2f}x" if rg.get("image_bytes") else "-"
            lines.append(
                f"| {row['runtime']} | {row['nodes']} | {_bytes(row['bytes'])} | {times} "
                f"| {row['nodes_pulling']} | {row['requests']} | {_s(row['deploy_wall'])} |"
            )
        if rg["not_measured"]:
            lines.append(
                f"\n(also installed on the nodes but not a runtime the sandbox fetches with: {rg['not_measured']})"
            )
        lines.append("")
    tg = targets(results)
    if tg:
        lines += [
            "**Targets** (ratios from this one run)",
            "",
            "| target | measured | |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {t['target']} | {t['measured']} | {'met' if t['met'] else '**missed**'} |" for t in tg]
        lines.append("")
    return "\n".join(lines)


def _endpoint_markdown(ep: dict) -> list[str]:
    cfg, tp, lat, fo = ep["config"], ep["throughput"], ep["latency"], ep["failover"]
    gen = _s(tp["generation_seconds"])
    lines = [
        f"**Endpoint**, as its clients feel it: {cfg['haproxy']} with the endpoint config "
        f"rendered from `{cfg['inventory']}` for 2 replica slots (health check every {cfg['check_seconds']} s, "
        "one request at a time per replica; only the port, the bind address 127.0.0.1 and the stats "
        "socket differ from the deployed file), in front of one emulator process per replica on loopback. "
        "Clients send the model card client's body (one prompt, 16 tokens), a new connection per request.",
        "",
        f"Throughput: {tp['clients']} clients in a closed loop, {gen} per generation (one replica at most "
        f"{tp['ideal_rps_per_replica']:g} requests/s), rounds of {tp['seconds_per_round']:g} s with 1, 2, 2, 1 "
        f"replicas (for 1, slot r2 in maintenance); answers counted from {_s(tp['counted_from'])} into each "
        "round; requests/s = answers between a round's first and last counted answer over the time "
        "between them, mean of the rounds (min–max); by slot: requests each slot served in those rounds.",
        "",
        "| replicas | requests/s | answers counted | failed | by slot r1 / r2 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in (1, 2):
        rounds = [r for r in tp["rounds"] if r["replicas"] == n]
        rps = [r["rps"] for r in rounds]
        span = f" ({min(rps):.2f}–{max(rps):.2f})" if len(rps) > 1 else ""
        r1 = sum(r["per_slot"]["r1"] for r in rounds)
        r2 = sum(r["per_slot"]["r2"] for r in rounds)
        lines.append(
            f"| {n} | {tp['rps'][str(n)]:.2f}{span} | {sum(r['answers'] for r in rounds)} "
            f"| {sum(r['errors'] for r in rounds)} | {r1} / {r2} |"
        )
    ok = tp["ratio"] >= ENDPOINT_RATIO_LIMIT
    lines += [
        f"| 2 vs 1 | {_x(tp['ratio'])} (≥{ENDPOINT_RATIO_LIMIT:g}x {'met' if ok else '**missed**'}) | | | |",
        "",
        f"Latency the endpoint adds: one client, {lat['requests']} requests per path after {lat['warmup']} "
        "warm-up ones, alternating between the replica's own port and the endpoint (the same replica "
        "behind it, no extra generation time); added = through minus direct, per percentile.",
        "",
        "| path | p50 | p99 | max | failed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (
        ("direct", "direct to the replica"),
        ("through", "through the endpoint"),
        ("openai", "POST /v1/completions through the endpoint"),
    ):
        if name not in lat:
            continue
        s = lat[name]
        lines.append(
            f"| {label} | {_s(s['p50'])} | {_s(s['p99'])} | {_s(s['max'])} | {lat['errors'][name]} |"
        )
    ok = lat["added"]["p99"] <= ENDPOINT_ADDED_P99_LIMIT
    lines += [
        f"| added by the endpoint | {_ms(lat['added']['p50'])} | {_ms(lat['added']['p99'])} "
        f"(≤{_s(ENDPOINT_ADDED_P99_LIMIT)} {'met' if ok else '**missed**'}) | | |",
    ]
    if "openai_added" in lat:
        ok = lat["openai_added"]["p99"] <= OPENAI_ADDED_P99_LIMIT
        lines.append(
            f"| added by /v1/completions over PUT /generate | {_ms(lat['openai_added']['p50'])} | "
            f"{_ms(lat['openai_added']['p99'])} (≤{_s(OPENAI_ADDED_P99_LIMIT)} {'met' if ok else '**missed**'}) | | |"
        )
    lines += [
        "",
        f"Failover: {fo['clients']} clients, 2 replicas, {gen} per generation; one replica's process "
        f"SIGKILLed {_s(fo['killed_at'])} into a {_s(fo['seconds'])} run.",
        "",
        "| requests | failed | longest gap between two answers around the kill (before it) "
        "| slowest request in flight at the kill (typical before) | kill → slot DOWN |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {fo['requests']} | {fo['failures']} | {_s(fo['gap'])} ({_s(fo['gap_before'])}) "
        f"| {_s(fo['in_flight_longest'])} ({_s(fo['latency_before'])}) | {_s(fo['down_after'])} |",
        "",
        "How to read the failover: the request the killed replica was generating loses its connection "
        "(empty response); HAProxy retries it (`retry-on conn-failure empty-response`). The retry may go "
        "to the dead replica once more (it holds no connection now, and `leastconn` prefers it): that "
        "connection is refused; a second refused one marks the slot DOWN (`observe layer4`, `error-limit 1`, "
        f"`on-error sudden-death`; {_s(fo['down_after'])} here), long before the health checks (every "
        f"{cfg['check_seconds']} s, `fall 2`) would. After a refused connection HAProxy waits "
        "min(`timeout connect`, 1 s) before the next try, which queues for the surviving replica: "
        "that client gets its answer, about 1 s late (the slowest request above); every other client "
        "keeps getting answers from the surviving replica at its rate, so the gap between two answers "
        "stays about a generation or two.",
        "",
    ]
    if fo["failed"]:
        lines += [f"Failed failover requests: {'; '.join(fo['failed'])}", ""]
    su, ro = ep.get("sustained"), ep.get("refused_once")
    if su:
        lines += [
            f"Sustained load: {su['clients']} clients back to back (no pause) for {_s(su['seconds'])}, 2 "
            "replicas with no generation time, each rolled again and again as the rollout does where "
            "there is no room for one more (drain, maintenance, the process stopped, a new one that "
            "loads, the slot pointed at it once it generates).",
            "",
            "| requests | req/s | failed (HTTP 503) | rolls | time with no slot UP |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {su['requests']} | {su['rps']:.0f} | {su['failures']} ({su['failed_503']}) | {su['rolls']} "
            f"| {_s(su['no_replica_up_seconds'])} |",
            "",
        ]
    if ro:
        lines += [
            "One refused connection on the only replica serving (the other drained, as in a rollout): "
            f"{ro['failures']} of {ro['requests']} requests in the 1.5 s after it failed "
            f"({ro['failed_503']} with 503), the slot was not UP for {_s(ro['slot_not_up_seconds'])}. With "
            "`on-error mark-down` (before issue 20) that one error put the slot DOWN until its next check, "
            "a second later, and the endpoint answered 503 to everything meanwhile.",
            "",
        ]
    return lines


# --------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------

SUMMARY_FIELDS = ["part", "variant", "nodes", "metric", "unit", "n", "median", "min", "max", "p95"]


def summary_rows(results: dict) -> list[dict]:
    rows: list[dict] = []

    def add(part: str, variant: str, nodes, metric: str, unit: str, s: dict) -> None:
        rows.append({"part": part, "variant": variant, "nodes": nodes, "metric": metric, "unit": unit, **s})

    dep = results.get("deploy")
    if dep:
        for n in dep["sizes"]:
            for key in ("first", "redeploy", "floor", "floor_default_kex"):
                add("deploy", key, n, "wall", "s", dep["summary"][n][key])
            c = dep["commands"][n]["max"]
            add("deploy", "redeploy", n, "ssh_commands_per_host_max", "count", _point(c))
            add("deploy", "any", n, "peak_rss_max", "B", _point(dep["summary"][n].get("peak_rss_max", 0)))
    rd = results.get("readiness")
    if rd:
        for kind in ("ours", "card"):
            add("readiness", kind, "", "latency", "s", rd[kind]["summary"])
    cc = results.get("check_cost")
    if cc:
        for v in ("health", "curl", "bare-python"):
            add("check_cost", v, "", "wall", "s", cc[v]["wall"])
            add("check_cost", v, "", "cpu", "s", cc[v]["cpu"])
        for key in ("difference", "importtime"):
            add("check_cost", f"import_{key}", "", "wall", "s", cc["import"][key])
    ep = results.get("endpoint")
    if ep:
        tp, lat, fo = ep["throughput"], ep["latency"], ep["failover"]
        for n in (1, 2):
            rps = [r["rps"] for r in tp["rounds"] if r["replicas"] == n]
            s = Summary.of(rps).as_dict()
            s["median"] = tp["rps"][str(n)]  # the mean of the rounds, as reported
            add("endpoint", f"{n} replica(s)", "", "throughput_mean_of_rounds", "req/s", s)
        add("endpoint", "2 vs 1", "", "throughput_ratio", "x", _point(tp["ratio"]))
        for name in ("direct", "through", "openai"):
            if name not in lat:
                continue
            s = lat[name]
            add("endpoint", name, "", "latency", "s", {k: s[k] for k in ("n", "median", "min", "max", "p95")})
            add("endpoint", name, "", "latency_p99", "s", _point(s["p99"]))
        for q in ("p50", "p99"):
            add("endpoint", "added", "", f"latency_{q}", "s", _point(lat["added"][q]))
            if "openai_added" in lat:
                add("endpoint", "openai added", "", f"latency_{q}", "s", _point(lat["openai_added"][q]))
        if ep.get("openai_throughput"):
            add(
                "endpoint",
                "openai 2 vs 1",
                "",
                "throughput_ratio",
                "x",
                _point(ep["openai_throughput"]["ratio"]),
            )
        add("endpoint", "failover", "", "failed_requests", "count", _point(fo["failures"]))
        add("endpoint", "failover", "", "longest_gap", "s", _point(fo["gap"]))
        add("endpoint", "failover", "", "slowest_in_flight", "s", _point(fo["in_flight_longest"]))
        add("endpoint", "failover", "", "kill_to_down", "s", _point(fo["down_after"]))
        if su := ep.get("sustained"):
            add("endpoint", "sustained", "", "failed_requests", "count", _point(su["failures"]))
            add("endpoint", "sustained", "", "requests", "count", _point(su["requests"]))
            add("endpoint", "sustained", "", "no_replica_up", "s", _point(su["no_replica_up_seconds"]))
        if ro := ep.get("refused_once"):
            add("endpoint", "refused_once", "", "failed_requests", "count", _point(ro["failures"]))
            add("endpoint", "refused_once", "", "slot_not_up", "s", _point(ro["slot_not_up_seconds"]))
    rg = results.get("registry")
    if rg:
        for row in rg["rows"]:
            add("registry", row["runtime"], row["nodes"], "bytes", "B", _point(row["bytes"]))
            add(
                "registry",
                row["runtime"],
                row["nodes"],
                "deploy_with_pull_wall",
                "s",
                _point(row["deploy_wall"]),
            )
    return rows


def _point(v: float) -> dict:
    return {"n": 1, "median": v, "min": v, "max": v, "p95": v}


def sample_rows(results: dict) -> list[dict]:
    rows: list[dict] = []
    dep = results.get("deploy")
    if dep:
        for s in dep["samples"]:
            for key in ("first", "redeploy", "floor", "floor_default_kex"):
                rows.append(
                    {
                        "part": "deploy",
                        "variant": key,
                        "nodes": s["nodes"],
                        "index": s["round"],
                        "value": s[key],
                    }
                )
    rd = results.get("readiness")
    if rd:
        for kind in ("ours", "card"):
            for s in rd[kind]["samples"]:
                rows.append(
                    {
                        "part": "readiness",
                        "variant": kind,
                        "nodes": "",
                        "index": s["index"],
                        "value": s["latency"],
                    }
                )
    cc = results.get("check_cost")
    if cc:
        for v in ("health", "curl", "bare-python"):
            for metric in ("wall", "cpu"):
                for i, value in enumerate(cc[v]["samples"][metric]):
                    rows.append(
                        {
                            "part": "check_cost",
                            "variant": f"{v}:{metric}",
                            "nodes": "",
                            "index": i,
                            "value": value,
                        }
                    )
    ep = results.get("endpoint")
    if ep:
        for r in ep["throughput"]["rounds"]:
            rows.append(
                {
                    "part": "endpoint",
                    "variant": f"throughput:{r['replicas']} replica(s)",
                    "nodes": "",
                    "index": r["round"],
                    "value": r["rps"],
                }
            )
        for name in ("direct", "through"):
            for i, value in enumerate(ep["latency"][name]["samples"]):
                rows.append(
                    {
                        "part": "endpoint",
                        "variant": f"latency:{name}",
                        "nodes": "",
                        "index": i,
                        "value": value,
                    }
                )
    return rows


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k, "")) for k in fields})


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else v


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 13))
    m = results["machine"]
    fig.suptitle(f"nemotron-deploy benchmarks ({m['cores']} cores, {m['memory_gib']} GiB, {results['date']})")
    _plot_deploy(axes[0][0], results.get("deploy"))
    _plot_readiness(axes[0][1], results.get("readiness"))
    _plot_check(axes[1][0], results.get("check_cost"))
    _plot_registry(axes[1][1], results.get("registry"))
    _plot_endpoint_throughput(axes[2][0], results.get("endpoint"))
    _plot_endpoint_latency(axes[2][1], results.get("endpoint"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _empty(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _plot_deploy(ax, dep) -> None:
    if not dep:
        return _empty(ax, "Deploy scaling")
    sizes = dep["sizes"]
    for key, label, style in (
        ("first", "first deploy (image pulled)", "o-"),
        ("redeploy", "no-change re-deploy", "s-"),
        ("floor", "floor: 1 SSH round trip/host", "^-"),
    ):
        med = [dep["summary"][n][key]["median"] for n in sizes]
        lo = [med[i] - dep["summary"][n][key]["min"] for i, n in enumerate(sizes)]
        hi = [dep["summary"][n][key]["max"] - med[i] for i, n in enumerate(sizes)]
        ax.errorbar(sizes, med, yerr=[lo, hi], fmt=style, capsize=3, label=label)
    for n, lim in RE_DEPLOY_FLOOR_LIMITS.items():
        if n in dep["summary"]:
            ax.plot([n], [lim * dep["summary"][n]["floor"]["median"]], "kv", label=f"re-deploy target at {n}")
    for n, lim in FIRST_FLOOR_LIMITS.items():
        if n in dep["summary"]:
            ax.plot(
                [n], [lim * dep["summary"][n]["floor"]["median"]], "rv", label=f"first-deploy target at {n}"
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("compute nodes")
    ax.set_ylabel("wall time [s] (median, min–max)")
    ax.set_title("Deploy scaling")
    ax.set_yscale("log")  # first deploys are ~10x the re-deploys: both must stay readable
    ax.legend(fontsize=8)


def _plot_readiness(ax, rd) -> None:
    if not rd:
        return _empty(ax, "Readiness latency")
    data = [
        [s["latency"] for s in rd[k]["samples"] if s["latency"] == s["latency"]] for k in ("ours", "card")
    ]
    ax.boxplot(data, whis=(0, 100))
    ax.set_xticks([1, 2], ["health --wait", "model card loop"])
    for i, values in enumerate(data, start=1):
        ax.plot([i] * len(values), values, "k.", alpha=0.5)
    ax.axhline(READINESS_P95_LIMIT, color="r", linestyle="--", linewidth=1, label="1 s (p95 target)")
    ax.set_yscale("log")
    ax.set_ylabel("ready → waiter returns [s]")
    ax.set_title(f"Readiness latency ({rd['starts']} starts each)")
    ax.legend(fontsize=8)


def _plot_check(ax, cc) -> None:
    if not cc:
        return _empty(ax, "Check cost")
    variants = ["health", "curl", "bare-python"]
    wall = [cc[v]["wall"]["median"] * 1e3 for v in variants]
    cpu = [cc[v]["cpu"]["median"] * 1e3 for v in variants]
    xs = range(len(variants))
    ax.bar([x - 0.2 for x in xs], wall, width=0.4, label="wall")
    ax.bar([x + 0.2 for x in xs], cpu, width=0.4, label="CPU")
    ax.set_xticks(list(xs), ["health check", "curl", "bare Python"])
    ax.set_ylabel("ms (median)")
    ax.set_title(f"One check ({cc['runs']} runs each)")
    ax.legend(fontsize=8)


def _plot_registry(ax, rg) -> None:
    if not rg or not rg["rows"]:
        return _empty(ax, "Registry traffic")
    for runtime in sorted({r["runtime"] for r in rg["rows"]}):
        rows = [r for r in rg["rows"] if r["runtime"] == runtime]
        ax.plot([r["nodes"] for r in rows], [r["bytes"] / (1 << 20) for r in rows], "o-", label=runtime)
    ax.set_xticks(sorted({r["nodes"] for r in rg["rows"]}))  # linear: bytes should grow linearly in N
    ax.set_xlabel("compute nodes")
    ax.set_ylabel("MiB served per deploy")
    ax.set_title("Registry traffic (one deploy that pulls)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def _plot_endpoint_throughput(ax, ep) -> None:
    if not ep:
        return _empty(ax, "Endpoint throughput")
    tp, fo = ep["throughput"], ep["failover"]
    means = [tp["rps"]["1"], tp["rps"]["2"]]
    ax.bar([1, 2], means, width=0.5, label="mean of rounds")
    for r in tp["rounds"]:
        ax.plot([r["replicas"]], [r["rps"]], "k.", alpha=0.6)
    ax.plot(
        [1.75, 2.25],
        [ENDPOINT_RATIO_LIMIT * means[0]] * 2,
        "r--",
        label=f"target: {ENDPOINT_RATIO_LIMIT:g}x 1 replica",
    )
    ax.set_xticks([1, 2], ["1 replica", "2 replicas"])
    ax.set_ylabel("requests/s through the endpoint")
    ax.set_title(
        f"Endpoint throughput ({tp['clients']} clients, {tp['generation_seconds'] * 1000:.0f} ms/generation): "
        f"{_x(tp['ratio'])}"
    )
    ax.text(
        0.02,
        0.97,
        f"failover, 1 of 2 replicas SIGKILLed\n({fo['clients']} clients): {fo['failures']} of {fo['requests']} failed\n"
        f"slot DOWN after {_s(fo['down_after'])}\nlongest gap between answers {_s(fo['gap'])}\n"
        f"slowest request {_s(fo['in_flight_longest'])} (typical {_s(fo['latency_before'])})",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
    )
    ax.set_ylim(0, max(means + [ENDPOINT_RATIO_LIMIT * means[0]]) * 1.6)
    ax.legend(fontsize=8, loc="upper right")


def _plot_endpoint_latency(ax, ep) -> None:
    if not ep:
        return _empty(ax, "Endpoint latency")
    lat = ep["latency"]
    data = [[x * 1e3 for x in lat[k]["samples"]] for k in ("direct", "through")]
    ax.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 2})
    for i, k in enumerate(("direct", "through"), start=1):
        ax.plot([i], [lat[k]["p99"] * 1e3], "rv", label="p99" if i == 1 else None)
    ax.set_xticks([1, 2], ["direct to the replica", "through the endpoint"])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("request latency [ms] (whiskers p1–p99)")
    ax.set_title(
        f"Endpoint latency ({lat['requests']} each): {_ms(lat['added']['p50'])} p50, "
        f"{_ms(lat['added']['p99'])} p99"
    )
    ax.legend(fontsize=8)


# --------------------------------------------------------------------------------------------------


def write(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write every output into ``out_dir``; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "table": out_dir / "README-table.md",
        "csv": out_dir / "results.csv",
        "samples": out_dir / "samples.csv",
        "json": out_dir / "results.json",
        "plot": out_dir / "bench.png",
    }
    results = dict(results, targets=targets(results))
    paths["table"].write_text(markdown(results))
    _write_csv(paths["csv"], SUMMARY_FIELDS, summary_rows(results))
    _write_csv(paths["samples"], ["part", "variant", "nodes", "index", "value"], sample_rows(results))
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot(results, paths["plot"])
    return paths
