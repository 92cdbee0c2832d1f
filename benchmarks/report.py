"""Tables, targets, RESULTS.md and the chart, from ``results.json`` (written by ``run.py``; nothing is run here).

Each section of the results file (``bench``, ``storm``, ``restart``, ``scaling``) is rendered if present, so
each command rewrites RESULTS.md while changing only its own numbers. ``benchmarks/NOTES.md`` (how to read
the numbers, the hot-path changes and what each gained; written by hand) is appended as it is, and whatever
follows ``KEEP_MARKER`` in the existing RESULTS.md is kept.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: RESULTS.md from this line on is written by hand (or by other benchmarks) and kept by every rewrite.
KEEP_MARKER = "<!-- Below this line: sections written by hand or by other benchmarks; run.py keeps them. -->"
ORDER = ("lmgrd", "ceiling", "ceiling_protocol", "redis")
LABEL = {"lmgrd": "lmgrd", "ceiling": "ceiling (minimal)", "ceiling_protocol": "ceiling (protocol/)",
         "redis": "Redis semaphore"}


def med(runs: list[dict[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in runs if r.get(key) is not None]
    return float(statistics.median(vals)) if vals else 0.0


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def fmt(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --------------------------------------------------------------------------- targets
def targets(res: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every target of the issue that the results can judge, per section."""
    out: dict[str, list[dict[str, Any]]] = {}

    def add(section: str, name: str, value: float, limit: str, ok: bool) -> None:
        out.setdefault(section, []).append({"name": name, "value": value, "limit": limit, "pass": ok})

    b = res.get("bench", {})
    for c in (100, 1000):
        ch = b.get(f"churn_{c}", {})
        if "lmgrd" in ch and "ceiling" in ch:
            lm, ce = ch["lmgrd"], ch["ceiling"]
            rr = ratio(med(lm, "requests_per_second"), med(ce, "requests_per_second"))
            add("bench", f"churn {c}: throughput / minimal ceiling", rr, ">= 0.8", rr >= 0.8)
            pr = ratio(med(lm, "p99_ms"), med(ce, "p99_ms"))
            add("bench", f"churn {c}: p99 / minimal ceiling's", pr, "<= 1.5", pr <= 1.5)
    ch = b.get("churn_1000", {})
    if "lmgrd" in ch and "redis" in ch:
        rr = ratio(med(ch["lmgrd"], "requests_per_second"), med(ch["redis"], "requests_per_second"))
        add("bench", "churn 1000: throughput / Redis", rr, ">= 5", rr >= 5)
    bu = b.get("burst", {})
    if "lmgrd" in bu:
        ok = all(r["ok"] for r in bu["lmgrd"])
        add("bench", "burst: exact counts (lmgrd)", 1.0 if ok else 0.0, "granted = seats, rest NO_SEATS", ok)
        if "ceiling" in bu:
            tr = ratio(med(bu["lmgrd"], "seconds_to_last_answer"), med(bu["ceiling"], "seconds_to_last_answer"))
            add("bench", "burst: time to all answers / minimal ceiling's", tr, "<= 1.3", tr <= 1.3)
    for key in sorted((k for k in b if k.startswith("idle_")), key=lambda k: int(k.split("_")[1])):
        if "lmgrd" in b[key]:
            kib = med(b[key]["lmgrd"], "kib_per_client")
            ok = kib <= 3.0 and all(r["ok"] for r in b[key]["lmgrd"])
            add("bench", f"idle {key.split('_')[1]}: KiB per client holding a seat", kib, "<= 3", ok)
    st = res.get("storm", {}).get("lmgrd")
    if st:
        cores = st.get("server_cores", 9.0)
        add("storm", "storm: daemon CPU (cores)", cores, "< 0.5", cores < 0.5)
        add("storm", "storm: leases lost", float(st.get("leases_lost", -1)), "= 0", st.get("leases_lost") == 0)
    rs = res.get("restart", {}).get("runs", [])
    if rs:
        lost = sum(r["seats_lost"] for r in rs)
        dbl = sum(r["double_granted"] for r in rs)
        add("restart", "restart: seats lost", float(lost), "= 0", lost == 0 and all(r["ok"] for r in rs))
        add("restart", "restart: seats double-granted", float(dbl), "= 0", dbl == 0)
    pts = res.get("scaling", {}).get("points", [])
    if pts:
        us = [p["server_cpu_us_per_request"] for p in pts]
        flat = max(us) / min(us) if min(us) else float("inf")
        add("scaling", "scaling: slowest / fastest CPU per request", flat, "<= 1.5 (flat)", flat <= 1.5)
    return out


# --------------------------------------------------------------------------- tables
def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def bench_md(b: dict[str, Any]) -> list[str]:
    present = [t for t in ORDER if any(t in v for k, v in b.items() if isinstance(v, dict) and k != "params"
                                       and k not in ("meta", "carried"))]
    head = ["scenario", "metric", *[LABEL[t] for t in present]]
    ratio_cols = [t for t in ("ceiling", "ceiling_protocol", "redis") if t in present and "lmgrd" in present]
    head += [f"lmgrd / {LABEL[t]}" for t in ratio_cols]
    rows: list[list[str]] = []

    def row(scn: str, metric: str, data: dict[str, list[dict[str, Any]]], key: str, nd: int = 2,
            scale: float = 1.0, ratios: bool = True) -> None:
        vals = {t: med(data[t], key) * scale for t in present if t in data}
        cells = [fmt(vals[t], nd) if t in vals else "" for t in present]
        rc = [f"{ratio(vals['lmgrd'], vals[t]):.2f}" if ratios and "lmgrd" in vals and t in vals else ""
              for t in ratio_cols]
        rows.append([scn, metric, *cells, *rc])

    conns = sorted(int(k.split("_")[1]) for k in b if k.startswith("churn_"))
    for c in conns:
        d = b[f"churn_{c}"]
        row(f"churn {c:,} connections", "round trips/s (checkout or checkin)", d, "requests_per_second", 0)
        for t in present:
            if t in d and not all(r["ok"] for r in d[t]):
                rows[-1][2 + present.index(t)] += " (FAILED: see results.json)"
        row("", "p50 latency (ms)", d, "p50_ms")
        row("", "p99 latency (ms)", d, "p99_ms")
        row("", "p99.9 latency (ms)", d, "p999_ms")
        row("", "server CPU per round trip (us)", d, "server_cpu_us_per_request", 1)
        row("", "server CPU (cores)", d, "server_cpu_percent", 2, 0.01, ratios=False)
        row("", "load generator CPU (cores; processes)", d, "loadgen_cpu_percent", 2, 0.01, ratios=False)
        rows[-1][2:2 + len(present)] = [
            f"{med(d[t], 'loadgen_cpu_percent') / 100:.2f}; {int(med(d[t], 'loadgen_procs'))}" if t in d else ""
            for t in present]
    bu = b.get("burst")
    if bu:
        p = b["params"]
        rows.append([f"burst {p['clients']:,} clients, {p['seats']:,} seats", "granted / NO_SEATS / other",
                     *[(f"{int(med(bu[t], 'granted'))}/{int(med(bu[t], 'no_seats'))}/{int(med(bu[t], 'other'))}"
                        + ("" if all(r['ok'] for r in bu[t]) else " NOT EXACT")) if t in bu else ""
                       for t in present], *["" for _ in ratio_cols]])
        row("", "time to the last answer (s)", bu, "seconds_to_last_answer", 3)
        rows.append(["", "time to the last answer: fastest-slowest (s); runs",
                     *[(f"{min(r['seconds_to_last_answer'] for r in bu[t]):.3f}-"
                        f"{max(r['seconds_to_last_answer'] for r in bu[t]):.3f}; {len(bu[t])}") if t in bu else ""
                       for t in present], *["" for _ in ratio_cols]])
        row("", "load generator: last connect made (s)", bu, "seconds_to_last_connect", 3, ratios=False)
        if "redis" in bu:
            rows[-1][2 + present.index("redis")] = "n/a"
    for key in sorted((k for k in b if k.startswith("idle_")), key=lambda k: int(k.split("_")[1])):
        row(f"idle {int(key.split('_')[1]):,} clients", "server RSS per client holding a seat (KiB)", b[key],
            "kib_per_client")
    return table(head, rows)


def storm_md(s: dict[str, Any]) -> list[str]:
    present = [t for t in ("lmgrd", "ceiling", "redis") if t in s]
    rows = []
    for metric, key, nd in (("heartbeats answered per second", "heartbeats_per_second", 0),
                            ("server CPU (cores)", "server_cores", 3), ("heartbeat p50 (ms)", "p50_ms", 2),
                            ("heartbeat p99 (ms)", "p99_ms", 2), ("heartbeat p99.9 (ms)", "p999_ms", 2),
                            ("leases lost", "leases_lost", 0), ("load generator CPU (cores)", "loadgen_cores", 3),
                            ("load generator: longest gap between a client's heartbeats (s)",
                             "max_client_gap_seconds", 2)):
        rows.append([metric, *[fmt(float(s[t].get(key) or 0), nd) for t in present]])
    rows.append(["server RSS at the end (MiB)", *[fmt(s[t].get("server_rss_end", 0) / 2**20, 1) for t in present]])
    return table(["metric", *[LABEL[t] for t in present]], rows)


def restart_md(r: dict[str, Any]) -> list[str]:
    rows = []
    for i, x in enumerate(r["runs"], 1):
        rows.append([str(i), f"{x['clients']:,}", f"{x['seconds_until_listening']:.3f}",
                     f"{x['seconds_until_all_resumed']:.3f}" if x["seconds_until_all_resumed"] else "never",
                     f"{x['resumed']:,}", str(x["seats_lost"]), str(x["double_granted"]),
                     f"{x['held_before_kill']} / {x['held_after_restart']} / {x['held_after_checkin']}",
                     str(x["probe_checkout"]), verdict(x["ok"])])
    return table(["run", "clients holding a seat", "SIGKILL -> listening (s)", "SIGKILL -> every client resumed (s)",
                  "resumed", "seats lost", "double-granted", "in use: before / after restart / after checkin",
                  "one more checkout", "invariants"], rows)


def scaling_md(s: dict[str, Any]) -> list[str]:
    rows = []
    for p in s["points"]:
        rows.append([f"{p['products']:,}", f"{p['customers']:,}", f"{p['pools']:,}", f"{p['leases']:,}",
                     f"{p['fill_seconds']:.1f}", f"{p['server_cpu_us_per_request']:.1f}",
                     f"{p['churn_requests_per_second']:,.0f}", f"{p['churn_p99_ms']:.2f}",
                     f"{p['bytes_per_lease']:,.0f}", verdict(p["ok"])])
    return table(["products", "customer IDs", "pools", "leases held", "fill (s)", "CPU per request (us)",
                  "round trips/s", "p99 (ms)", "RSS per held lease (B)", "ok"], rows)


def meta_md(m: dict[str, Any]) -> list[str]:
    return [f"- command: `{m['command']}` ({m['seconds']:.0f} s), {m['date']}",
            f"- uptime at start: `{m['uptime_start']}`", f"- uptime at end: `{m['uptime_end']}`"]


def _scenario_order(key: str) -> tuple[str, int]:
    """churn_100 before churn_1000 before churn_5000: by name, then by the number after it."""
    name, _, n = key.partition("_")
    return name, int(n) if n.isdigit() else 0


def carried_md(section: dict[str, Any]) -> list[str]:
    """One line per earlier run whose scenarios this section still shows (a later run measured only some)."""
    runs: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for key, m in section.get("carried", {}).items():
        if m:
            runs.setdefault(f"{m['command']}|{m['date']}", (m, []))[1].append(key)
    return [f"- {', '.join(sorted(keys, key=_scenario_order))}: from an earlier run, `{m['command']}` "
            f"({m['seconds']:.0f} s), {m['date']}, "
            f"uptime at start `{m['uptime_start']}`" for m, keys in runs.values()]


def write_md(res: dict[str, Any], path: Path, chart: Path) -> None:
    tg = targets(res)
    any_meta = next((res[s]["meta"] for s in ("bench", "storm", "restart", "scaling") if s in res), None)
    lines = ["# lmgrd benchmark results", "",
             "Produced by `benchmarks/run.py` (one command per section: `make bench`, `make bench-storm`, "
             "`make bench-restart`, `make bench-scaling`); raw numbers, every run, in `benchmarks/results.json`; "
             "`python benchmarks/run.py render` rebuilds this page from it.", ""]
    if any_meta:
        m = any_meta["machine"]
        lines += [f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, somaxconn "
                  f"{m['somaxconn']}; Python {m['python']} ({m['implementation']}), uvloop {m['uvloop']}, msgpack "
                  f"{m['msgpack']}; {m.get('redis_server', '')}; {m.get('redis_client', '')}.", ""]
    all_t = [t for v in tg.values() for t in v]
    if all_t:
        lines += ["## Targets", ""]
        lines += table(["target", "measured", "limit", "result"],
                       [[t["name"], f"{t['value']:.3g}", t["limit"], verdict(t["pass"])] for t in all_t])
        lines += [""]
    if "bench" in res:
        b = res["bench"]
        p = b["params"]
        lines += ["## Churn, burst, idle (`make bench`)", "", *meta_md(b["meta"]), *carried_md(b),
            f"- churn: {p['duration']:g} s window after a {p['warmup']:g} s warm-up; repeats {p['repeat']} (medians); "
            f"Redis driven by {p['redis_procs']} processes", ""]
        lines += [*bench_md(b), ""]
        if chart.exists():
            lines += [f"![throughput and p99 against concurrency]({chart.name})", ""]
    if "storm" in res:
        s = res["storm"]
        lines += ["## Heartbeat storm (`make bench-storm`)", "", *meta_md(s["meta"]),
            f"- {s['params']['clients']:,} clients each holding a seat, each heartbeating every second at its own "
            f"phase, for {s['params']['duration']:g} s; lmgrd runs with `--heartbeat-interval 1 --lease-timeout 3` "
            "(a 3 s stall anywhere loses leases); Redis renews with `ZADD XX CH` to a 3 s TTL; a lease is lost when "
            "an ack renews nothing or names it lost, or the final checkin (ZREM) releases nothing", ""]
        lines += [*storm_md(s), ""]
    if "restart" in res:
        r = res["restart"]
        lines += ["## Restart (`make bench-restart`)", "", *meta_md(r["meta"]),
            "- the daemon is SIGKILLed with every client holding a seat and started again at once on the same port "
            "and state directory; each client reconnects with client_stub's own backoff (capped exponential, full "
            "jitter, base 0.2 s) and resumes its token. The license has exactly as many seats as clients, so the "
            "extra checkout after the restart must be refused (NO_SEATS) when nothing was lost or doubled", ""]
        lines += [*restart_md(r), ""]
    if "scaling" in res:
        s = res["scaling"]
        lines += ["## Scaling (`make bench-scaling`)", "", *meta_md(s["meta"]),
            "- per point: a daemon serving the licenses (one per customer ID, each with the products), 100 "
            "connections holding the leases (spread over every pool), then churn on one more product at 100 "
            f"connections for {s['params']['duration']:g} s: per-request CPU and RSS per held lease", ""]
        lines += [*scaling_md(s), ""]
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text(encoding="utf-8").rstrip(), ""]
    # Sections other benchmarks write by hand (slowloris, ...) live below the marker and are kept as they are.
    kept = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if KEEP_MARKER in old:
            kept = old[old.index(KEEP_MARKER):].rstrip() + "\n"
    lines += [kept or KEEP_MARKER + "\n"]
    path.write_text("\n".join(lines), encoding="utf-8")


def chart(res: dict[str, Any], out: Path) -> bool:
    b = res.get("bench")
    if not b:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    conns = sorted(int(k.split("_")[1]) for k in b if k.startswith("churn_"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"lmgrd": "o-", "ceiling": "s-", "ceiling_protocol": "s--", "redis": "^-"}
    for t in ORDER:
        xs = [c for c in conns if t in b[f"churn_{c}"] and all(r["ok"] for r in b[f"churn_{c}"][t])]  # no failed run
        if not xs:
            continue
        ax1.plot(xs, [med(b[f"churn_{c}"][t], "requests_per_second") for c in xs], style[t], label=LABEL[t])
        ax2.plot(xs, [med(b[f"churn_{c}"][t], "p99_ms") for c in xs], style[t], label=LABEL[t])
    for ax, title, unit in ((ax1, "churn throughput", "round trips / s"), (ax2, "churn p99 latency", "ms")):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_xticks(conns, [f"{c:,}" for c in conns])
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    m = b["meta"]["machine"]
    fig.suptitle(f"lmgrd benchmarks, {m['nproc']} cores shared by server and load generator ({b['meta']['date']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def publish(res: dict[str, Any], json_path: Path, md: Path | None, png: Path, write_json: bool = True) -> int:
    if write_json:
        json_path.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"wrote {json_path}")
    if chart(res, png):
        print(f"wrote {png}")
    for section, ts in targets(res).items():
        for t in ts:
            print(f"{verdict(t['pass'])}  [{section}] {t['name']}: {t['value']:.3g} (limit {t['limit']})")
    if md is not None:
        write_md(res, md, png)
        print(f"wrote {md}")
    return 0
