"""lmgrd benchmark: the real daemon against the ceiling server, same load, same run.

    .venv/bin/python benchmarks/run.py            # full run (make bench): updates results.json and RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # small smoke run (results-quick.json, RESULTS.md untouched)

Every scenario runs against a freshly started ``lmgrd`` subprocess (127.0.0.1, a free port, a temporary
state directory, a license signed for this host with a throwaway vendor key, share mode ``none`` so each
checkout takes its own seat, ``--max-connections-per-address 0``, ``--log-level warning``) and against a
freshly started ``benchmarks/ceiling.py`` (a minimal uvloop server that decodes the same frames and answers
from a dict). The load comes from ``benchmarks/load.py`` in its own process, so the orchestrator's own work
never competes with it.

- burst: N clients (5,000) connect at once and check out against S seats (4,000): exactly S granted, N-S
  NO_SEATS, nothing else; time until every client has its answer.
- churn: C connections (100 and 1,000) each loop checkout -> checkin; request round trips per second and
  p50/p99 latency of one round trip, after a warm-up, over a fixed window.
- idle: server RSS growth per connected client at N clients, each holding a seat (lmgrd and the ceiling),
  and per bare connection (hello only) on the ceiling.

Each process started here is stopped in a ``finally`` (SIGTERM, then SIGKILL), on error as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from lmgrd.storage.host import raise_nofile  # noqa: E402
from tests.harness import write_keys, write_license  # noqa: E402

PY = sys.executable
LOAD = str(HERE / "load.py")
CEILING = str(HERE / "ceiling.py")
KIB = 1024.0


class BenchError(RuntimeError):
    """A scenario could not run (a server did not start, the load generator failed)."""


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Setup:
    """The temporary world every scenario runs in: keys, license, logs."""

    workdir: Path
    pub: Path
    lic: Path
    products: dict[str, int]
    daemon_loop: str
    started: list[subprocess.Popen[Any]] = field(default_factory=list)
    runs: int = 0


def wait_connectable(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before listening:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"server did not listen on 127.0.0.1:{port} within {timeout:g} s")


def start_daemon(setup: Setup) -> Server:
    setup.runs += 1
    run_dir = setup.workdir / f"lmgrd-{setup.runs}"
    run_dir.mkdir()
    port = free_port()
    log = run_dir / "lmgrd.log"
    args = [PY, "-m", "lmgrd", "--license", str(setup.lic), "--vendor-key", str(setup.pub), "--port", str(port),
            "--bind", "127.0.0.1", "--state-dir", str(run_dir / "state"), "--max-connections-per-address", "0",
            "--log-level", "warning", "--admin-token-file", str(run_dir / "admin.token")]
    env = {**os.environ, "LMGRD_RUNTIME_DIR": str(run_dir / "run"), "LMGRD_LOOP": setup.daemon_loop}
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=f, cwd=REPO, env=env)
    setup.started.append(proc)
    try:
        wait_connectable(port, proc, log)
    except BaseException:
        stop(proc)
        raise
    return Server("lmgrd", proc, port, log)


def start_ceiling(setup: Setup) -> Server:
    setup.runs += 1
    log = setup.workdir / f"ceiling-{setup.runs}.log"
    args = [PY, CEILING, "--port", "0"] + [f"--pool={p}={n}" for p, n in setup.products.items()]
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, cwd=REPO)
    setup.started.append(proc)
    try:
        assert proc.stdout is not None
        line = read_line(proc, 20.0, "ceiling")
        port = int(line.rsplit(":", 1)[1])
    except BaseException:
        stop(proc)
        raise
    return Server("ceiling", proc, port, log)


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise BenchError(f"{what} exited (code {proc.poll()}) without output")
            return line.decode().strip()
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} without output")
    raise BenchError(f"{what} printed nothing within {timeout:g} s")


@contextlib.contextmanager
def server(setup: Setup, which: str) -> Iterator[Server]:
    srv = start_daemon(setup) if which == "lmgrd" else start_ceiling(setup)
    try:
        yield srv
    finally:
        stop(srv.proc)
        if srv.proc.stdout is not None:
            srv.proc.stdout.close()


def load(args: list[str], timeout: float) -> dict[str, Any]:
    """Run load.py to completion; return its final JSON line."""
    try:
        out = subprocess.run([PY, LOAD, *args], capture_output=True, timeout=timeout, cwd=REPO, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"load generator {' '.join(args)} did not finish within {timeout:g} s") from exc
    lines = [ln for ln in out.stdout.decode().splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise BenchError(f"load generator {' '.join(args)} failed (exit {out.returncode}):\n"
                         f"{out.stderr.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def warm_up(srv: Server) -> None:
    """A few checkout/checkin cycles so first-use costs (lazy imports, caches) are not measured."""
    load(["churn", "--port", str(srv.port), "--product", "CHURN", "--connections", "10", "--duration", "0.3",
          "--warmup", "0.1", "--timeout", "20"], 60)


# --------------------------------------------------------------------------- scenarios
def burst(setup: Setup, which: str, clients: int, seats: int) -> dict[str, Any]:
    with server(setup, which) as srv:
        warm_up(srv)
        r = load(["burst", "--port", str(srv.port), "--product", "BURST", "--clients", str(clients),
                  "--timeout", "60"], 120)
    oc = r["outcomes"]
    other = {k: v for k, v in oc.items() if k not in ("granted", "NO_SEATS")}
    r["ok"] = oc.get("granted", 0) == seats and oc.get("NO_SEATS", 0) == clients - seats and not other \
        and not r["timed_out"]
    r["other_outcomes"] = other
    if not r["ok"]:
        r["server_log_tail"] = srv.log_tail()
    return r


def churn(setup: Setup, which: str, connections: int, duration: float, warmup: float) -> dict[str, Any]:
    with server(setup, which) as srv:
        r = load(["churn", "--port", str(srv.port), "--product", "CHURN", "--connections", str(connections),
                  "--duration", str(duration), "--warmup", str(warmup), "--server-pid", str(srv.pid),
                  "--timeout", "60"], duration + warmup + 180)
    r["ok"] = "setup_failed" not in r and not r["errors"] and not r["timed_out"] and r["requests"] > 0
    if not r["ok"]:
        r["server_log_tail"] = srv.log_tail()
    return r


def idle(setup: Setup, which: str, clients: int, with_seat: bool) -> dict[str, Any]:
    with server(setup, which) as srv:
        warm_up(srv)
        time.sleep(0.5)
        before = srv.rss()
        args = [PY, LOAD, "hold", "--port", str(srv.port), "--product", "IDLE", "--clients", str(clients),
                "--timeout", "90"]
        if not with_seat:
            args.append("--no-checkout")
        gen = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=REPO)
        try:
            ready = json.loads(read_line(gen, 120.0, "load generator (hold)"))
            time.sleep(1.0)  # let the server settle (the last replies, allocator) before measuring
            samples = [srv.rss()]
            for _ in range(2):
                time.sleep(0.25)
                samples.append(srv.rss())
            after = max(samples)
            assert gen.stdin is not None
            gen.stdin.write(b"release\n")
            gen.stdin.flush()
            out, err = gen.communicate(timeout=60)
            lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
            done = json.loads(lines[-1]) if lines else {"error": err.decode(errors="replace")[-2000:]}
        finally:
            if gen.poll() is None:
                gen.kill()
                gen.wait(5)
    want = "granted" if with_seat else "connected"
    ok = ready["outcomes"].get(want, 0) == clients and not ready["timed_out"] and \
        done.get("failed_while_holding", 1) == 0
    return {"clients": clients, "with_seat": with_seat, "rss_before": before, "rss_after": after,
            "rss_samples": samples, "kib_per_client": (after - before) / clients / KIB,
            "outcomes": ready["outcomes"], "ok": ok, "errors": ready["errors"], "hold_done": done}


# --------------------------------------------------------------------------- profile
def profile_churn(setup: Setup, connections: int, duration: float, warmup: float, out: Path) -> dict[str, Any]:
    """Sample the daemon with py-spy during a churn run; return the top functions by self and total samples."""
    pyspy = Path(PY).parent / "py-spy"
    if not pyspy.exists():
        raise BenchError(f"--profile needs py-spy: {Path(PY).parent / 'pip'} install py-spy")
    raw = setup.workdir / "profile.raw.txt"  # collapsed stacks; kept only with --keep
    with server(setup, "lmgrd") as srv:
        spy = subprocess.Popen([str(pyspy), "record", "-p", str(srv.pid), "-r", "250", "-d",
                                str(int(warmup + duration + 2)), "-f", "raw", "-o", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)
            r = load(["churn", "--port", str(srv.port), "--product", "CHURN", "--connections", str(connections),
                      "--duration", str(duration), "--warmup", str(warmup), "--server-pid", str(srv.pid),
                      "--timeout", "60"], duration + warmup + 180)
            spy.wait(warmup + duration + 30)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(5)
    self_n: dict[str, int] = {}
    func_self: dict[str, int] = {}
    total_n: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        leaf = frames[-1]
        self_n[leaf] = self_n.get(leaf, 0) + n
        fn = re.sub(r":\d+\)$", ")", leaf)  # "name (file:line)" -> "name (file)"
        func_self[fn] = func_self.get(fn, 0) + n
        for f in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            total_n[f] = total_n.get(f, 0) + n

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / samples) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:25]]

    top_self, top_total, top_func = top(self_n), top(total_n), top(func_self)
    prof: dict[str, Any] = {"samples": samples, "churn": r, "top_self": top_self, "top_total": top_total,
                            "top_self_by_function": top_func, "raw": str(raw)}
    prof["connections"] = connections
    write_profile(prof, out)
    return prof


def write_profile(prof: dict[str, Any], out: Path) -> None:
    rps = prof["churn"].get("requests_per_second", 0)
    lines = [f"py-spy profile of lmgrd, churn at {prof.get('connections', '?')} connections, {prof['samples']} "
             f"samples ({rps:.0f} req/s under the profiler)", "", "## top self by line (% of samples)"]
    lines += [f"{p:6.2f}%  {k}" for k, p in prof["top_self"]]
    lines += ["", "## top self by function (all lines of a function together)"]
    lines += [f"{p:6.2f}%  {k}" for k, p in prof["top_self_by_function"]]
    lines += ["", "## top total by function (inclusive, % of samples)"]
    lines += [f"{p:6.2f}%  {k}" for k, p in prof["top_total"]]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- report
def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def machine() -> dict[str, Any]:
    import msgpack
    import uvloop

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    somaxconn = ""
    with contextlib.suppress(OSError):
        somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "uvloop": getattr(uvloop, "__version__", "?"),
            "msgpack": ".".join(map(str, msgpack.version)), "psutil": psutil.__version__,
            "kernel": platform.release(), "somaxconn": somaxconn,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "loadavg_start": os.getloadavg()}


@dataclass
class Row:
    scenario: str
    metric: str
    lmgrd: str
    ceiling: str
    ratio: str
    target: str
    result: str


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def build_rows(res: dict[str, Any], ns: argparse.Namespace) -> tuple[list[Row], list[dict[str, Any]]]:
    rows: list[Row] = []
    targets: list[dict[str, Any]] = []
    sc = res["scenarios"]

    def target(name: str, value: float, limit: float, ok: bool) -> str:
        targets.append({"name": name, "value": value, "limit": limit, "pass": ok})
        return verdict(ok)

    b = sc["burst"]
    bl, bc = b["lmgrd"], b["ceiling"]
    tl, tc = bl["seconds_to_last_answer"], bc["seconds_to_last_answer"]

    def oc(r: dict[str, Any]) -> str:
        return f"{r['granted']}/{r['no_seats']}/{r['other']}"

    exact = bl["all_ok"] and bc["all_ok"]
    rows.append(Row(f"burst {ns.clients} clients, {ns.seats} seats", "granted / NO_SEATS / other",
                    oc(bl), oc(bc), "", f"exactly {ns.seats}/{ns.clients - ns.seats}/0",
                    target("burst outcome exact", 1.0 if exact else 0.0, 1.0, exact)))
    ratio = tl / tc if tc else float("inf")
    rows.append(Row("", "time to last answer (s)", f"{tl:.3f}", f"{tc:.3f}", f"{ratio:.2f}x", "<= 2x ceiling",
                    target("burst time ratio", ratio, 2.0, ratio <= 2.0)))
    rows.append(Row("", "p50 answer (s)", f"{bl['p50_answer_seconds']:.3f}", f"{bc['p50_answer_seconds']:.3f}",
                    "", "", ""))
    rows.append(Row("", "load generator: last connect made (s)", f"{bl['seconds_to_last_connect']:.3f}",
                    f"{bc['seconds_to_last_connect']:.3f}", "", "", ""))
    for c in ns.churn_connections:
        ch = sc[f"churn_{c}"]
        cl, cc = ch["lmgrd"], ch["ceiling"]
        rr = cl["requests_per_second"] / cc["requests_per_second"] if cc["requests_per_second"] else 0.0
        pr = cl["p99_ms"] / cc["p99_ms"] if cc["p99_ms"] else float("inf")
        big = c == max(ns.churn_connections)
        rows.append(Row(f"churn {c} connections", "request round trips/s",
                        f"{cl['requests_per_second']:,.0f}", f"{cc['requests_per_second']:,.0f}", f"{rr:.2f}",
                        ">= 0.5 of ceiling" if big else "",
                        target(f"churn {c} throughput ratio", rr, 0.5, rr >= 0.5) if big else ""))
        rows.append(Row("", "checkout+checkin cycles/s", f"{cl['cycles_per_second']:,.0f}",
                        f"{cc['cycles_per_second']:,.0f}", "", "", ""))
        rows.append(Row("", "p50 latency (ms)", f"{cl['p50_ms']:.2f}", f"{cc['p50_ms']:.2f}",
                        f"{cl['p50_ms'] / cc['p50_ms']:.2f}x" if cc["p50_ms"] else "", "", ""))
        rows.append(Row("", "p99 latency (ms)", f"{cl['p99_ms']:.2f}", f"{cc['p99_ms']:.2f}", f"{pr:.2f}x",
                        "<= 2.5x ceiling" if big else "",
                        target(f"churn {c} p99 ratio", pr, 2.5, pr <= 2.5) if big else ""))
        rows.append(Row("", "server CPU per round trip (us)", f"{cl['server_cpu_us_per_request']:.1f}",
                        f"{cc['server_cpu_us_per_request']:.1f}",
                        f"{cl['server_cpu_us_per_request'] / cc['server_cpu_us_per_request']:.2f}x"
                        if cc["server_cpu_us_per_request"] else "", "", ""))
        rows.append(Row("", "server / load generator CPU %",
                        f"{cl['server_cpu_percent']:.0f} / {cl['loadgen_cpu_percent']:.0f}",
                        f"{cc['server_cpu_percent']:.0f} / {cc['loadgen_cpu_percent']:.0f}", "", "", ""))
    il = sc["idle"]["lmgrd"]
    ic = sc["idle"]["ceiling_bare"]
    ics = sc["idle"]["ceiling_seat"]
    kl = il["kib_per_client"]
    rows.append(Row(f"idle {ns.clients} clients", "RSS per client holding a seat (KiB)", f"{kl:.2f}",
                    f"{ics['kib_per_client']:.2f}",
                    f"{kl / ics['kib_per_client']:.2f}x" if ics["kib_per_client"] > 0 else "", "<= 4 KiB",
                    target("idle KiB per client with a seat", kl, 4.0, kl <= 4.0 and il["all_ok"])))
    rows.append(Row("", "RSS per bare connection, hello only (KiB)", "", f"{ic['kib_per_client']:.2f}", "", "",
                    ""))
    return rows, targets


def table(rows: list[Row]) -> str:
    head = ["scenario", "metric", "lmgrd", "ceiling", "lmgrd/ceiling", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r.scenario} | {r.metric} | {r.lmgrd} | {r.ceiling} | {r.ratio} | {r.target} | {r.result} |")
    return "\n".join(lines)


def summarize_burst(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "seconds_to_last_answer": median([r["seconds_to_last_answer"] for r in runs]),
        "p50_answer_seconds": median([r["p50_answer_seconds"] for r in runs]),
        "seconds_to_last_connect": median([r["seconds_to_last_connect"] for r in runs]),
        "granted": min(r["outcomes"].get("granted", 0) for r in runs),
        "no_seats": min(r["outcomes"].get("NO_SEATS", 0) for r in runs),
        "other": max(sum(r["other_outcomes"].values()) for r in runs),
        "all_ok": all(r["ok"] for r in runs), "runs": runs,
    }


def summarize_churn(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("requests_per_second", "cycles_per_second", "p50_ms", "p99_ms", "server_cpu_percent",
            "loadgen_cpu_percent", "server_cpu_us_per_request", "loadgen_cpu_us_per_request")
    out: dict[str, Any] = {k: median([r.get(k, 0.0) for r in runs]) for k in keys}
    out["all_ok"] = all(r["ok"] for r in runs)
    out["runs"] = runs
    return out


def summarize_idle(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kib_per_client": median([r["kib_per_client"] for r in runs]), "all_ok": all(r["ok"] for r in runs),
            "runs": runs}


def write_md(path: Path, res: dict[str, Any], tbl: str, prof: dict[str, Any] | None) -> None:
    m = res["machine"]
    ok = all(t["pass"] for t in res["targets"])
    lines = [
        "# lmgrd benchmark results",
        "",
        "Produced by `benchmarks/run.py` (`make bench`); raw numbers, every run, in `benchmarks/results.json`.",
        "",
        f"- command: `{res['command']}`",
        f"- date: {res['date']}",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"somaxconn {m['somaxconn']}",
        f"- Python {m['python']} ({m['implementation']}), uvloop {m['uvloop']}, msgpack {m['msgpack']}; "
        f"daemon loop: {res['params']['daemon_loop']}",
        f"- load average at start {tuple(round(x, 2) for x in m['loadavg_start'])}, "
        f"at end {tuple(round(x, 2) for x in res['loadavg_end'])}",
        f"- repeats: {res['params']['repeat']} (the table shows medians), churn window "
        f"{res['params']['duration']:g} s after a {res['params']['warmup']:g} s warm-up",
        "",
        tbl,
        "",
        f"All targets: {'PASS' if ok else 'FAIL'}.",
        "",
        "How to read it:",
        "",
        "- Each scenario starts a fresh `lmgrd` subprocess (license for this host, share mode `none`, "
        "`--max-connections-per-address 0`, `--log-level warning`, journal in a temporary state directory) "
        "and a fresh `benchmarks/ceiling.py` (uvloop `asyncio.Protocol`, the same `FrameDecoder`, "
        "`parse_request` and `encode_frame`, seats in a dict, no journal, no checks, no logging).",
        "- The load generator (`benchmarks/load.py`) is one uvloop process of bare `asyncio.Protocol` clients, "
        "separate from the orchestrator. It shares the machine's cores with the server under test, so the "
        "absolute numbers are bounded by what both processes get; the ratios, taken in the same run under the "
        "same load, are the comparison that means something.",
        "- A churn round trip is one request and its reply (a checkout or a checkin); a cycle is "
        "checkout + checkin. Latency is per round trip, measured by the client.",
        "- idle: (server RSS with N clients connected and each holding a seat - RSS before) / N. The ceiling's "
        "seat row holds a token in its dict; its bare row is a connection that said hello and holds nothing.",
        "- The machine is shared (other jobs ran during the run: see the load averages), so expect run-to-run "
        "noise of tens of percent in the absolute numbers.",
        "- Under contention neither server gets a whole core (see the CPU % rows), which pulls the throughput "
        "ratio towards 1. The server CPU per round trip is the steadier comparison: its inverse is the throughput "
        "ratio to expect when both servers are CPU-bound on an otherwise idle core.",
    ]
    if prof is not None:
        lines += ["", f"Profile of lmgrd under churn at {max(res['params']['churn_connections'])} connections "
                  f"({prof['samples']} py-spy samples; `--profile`, full listing in `benchmarks/profile.txt`), "
                  "self time by function:", "",
                  "```"] + [f"{p:6.2f}%  {k}" for k, p in prof["top_self_by_function"][:15]] + ["```", "",
                  "py-spy samples Python frames only: the self time of `Server._flush` is mostly the `write(2)` "
                  "inside uvloop's `transport.write`, and that of `Runner.run` is uvloop's C loop (epoll, "
                  "`read(2)`); the ceiling pays both per message as well."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke run: 500 clients / 400 seats, churn at 50 "
                   "and 200 connections for 1 s; writes results-quick.json and leaves RESULTS.md alone")
    p.add_argument("--clients", type=int, help="burst and idle clients (default 5000)")
    p.add_argument("--seats", type=int, help="burst seats (default 4000, at most --clients)")
    p.add_argument("--duration", type=float, help="churn measured window in seconds (default 5)")
    p.add_argument("--warmup", type=float, help="churn unmeasured warm-up in seconds (default 1)")
    p.add_argument("--churn-connections", help="comma-separated connection counts (default 100,1000)")
    p.add_argument("--repeat", type=int, default=1, help="run every measurement N times, report medians")
    p.add_argument("--only", help="comma-separated subset of burst,churn,idle (the table needs all three)")
    p.add_argument("--daemon-loop", choices=("uvloop", "asyncio"), default="uvloop", help="LMGRD_LOOP")
    p.add_argument("--profile", action="store_true", help="also sample lmgrd with py-spy during churn at the "
                   "largest connection count; writes benchmarks/profile.txt (next to --json if given)")
    p.add_argument("--json", type=Path, help="where to write the JSON (default benchmarks/results.json)")
    p.add_argument("--md", type=Path, help="markdown file to rewrite (default benchmarks/RESULTS.md; "
                   "not written by --quick unless given)")
    p.add_argument("--render", type=Path, metavar="RESULTS.json", help="run nothing: print the table from a "
                   "results file (and rewrite --md if given)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (default: report only)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, journals)")
    ns = p.parse_args(argv)
    q = ns.quick
    ns.clients = ns.clients or (500 if q else 5000)
    ns.seats = ns.seats if ns.seats is not None else (ns.clients * 4) // 5
    ns.duration = ns.duration or (1.0 if q else 5.0)
    ns.warmup = ns.warmup if ns.warmup is not None else (0.3 if q else 1.0)
    ns.churn_connections = [int(x) for x in (ns.churn_connections or ("50,200" if q else "100,1000")).split(",")]
    ns.only = set((ns.only or "burst,churn,idle").split(","))
    ns.json = ns.json or HERE / ("results-quick.json" if q else "results.json")
    ns.md = ns.md or (None if q else HERE / "RESULTS.md")
    ns.profile_out = HERE / "profile.txt" if ns.json == HERE / "results.json" else ns.json.with_suffix(".profile.txt")
    if not 0 < ns.seats <= ns.clients:
        p.error(f"--seats must be from 1 to --clients ({ns.clients}), got {ns.seats}")
    if ns.repeat < 1 or ns.repeat > 20:
        p.error("--repeat must be from 1 to 20")
    if ns.clients > 15000 or max(ns.churn_connections) > 15000:
        p.error("at most 15000 clients or connections: the file descriptor hard limit here is 20000")
    return ns


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def render(ns: argparse.Namespace) -> int:
    """Rebuild the table (and RESULTS.md when --md is given) from a results.json, without running anything."""
    res: dict[str, Any] = json.loads(ns.render.read_text(encoding="utf-8"))
    prm = res["params"]
    ns.clients, ns.seats, ns.churn_connections = prm["clients"], prm["seats"], prm["churn_connections"]
    rows, targets = build_rows(res, ns)
    res["targets"] = targets
    tbl = table(rows)
    print(tbl)
    if ns.md is not None:
        write_md(ns.md, res, tbl, res.get("profile"))
        say(f"wrote {ns.md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    if ns.render is not None:
        return render(ns)
    raise_nofile()  # inherited by the servers and the load generator (each raises its own too)

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: the servers started are stopped

    signal.signal(signal.SIGTERM, terminate)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    tmp = tempfile.mkdtemp(prefix="lmgrd-bench-")
    workdir = Path(tmp)
    key, pub = write_keys(workdir / "keys")
    products = {"BURST": ns.seats, "CHURN": 100_000, "IDLE": ns.clients + 100}
    # Issued two days ago: past the 24-hour self-activation, so the daemon serves it from the first second.
    write_license(workdir / "bench.lic", key, tuple((p, "1.0", n) for p, n in products.items()), share="none",
                  issued_at=datetime.now(UTC) - timedelta(days=2))
    setup = Setup(workdir, pub, workdir / "bench.lic", products, ns.daemon_loop)
    res: dict[str, Any] = {
        "command": command.strip(), "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
        "params": {"clients": ns.clients, "seats": ns.seats, "duration": ns.duration, "warmup": ns.warmup,
                   "churn_connections": ns.churn_connections, "repeat": ns.repeat, "daemon_loop": ns.daemon_loop},
        "scenarios": {},
    }
    prof = None
    try:
        sc = res["scenarios"]
        if "burst" in ns.only:
            runs: dict[str, list[dict[str, Any]]] = {"lmgrd": [], "ceiling": []}
            for i in range(ns.repeat):
                for which in ("lmgrd", "ceiling"):
                    say(f"burst {i + 1}/{ns.repeat}: {which}, {ns.clients} clients, {ns.seats} seats")
                    r = burst(setup, which, ns.clients, ns.seats)
                    say(f"  {r['seconds_to_last_answer']:.3f} s, outcomes {r['outcomes']}")
                    runs[which].append(r)
            sc["burst"] = {w: summarize_burst(v) for w, v in runs.items()}
        if "churn" in ns.only:
            for c in ns.churn_connections:
                runs = {"lmgrd": [], "ceiling": []}
                for i in range(ns.repeat):
                    for which in ("lmgrd", "ceiling"):
                        say(f"churn {i + 1}/{ns.repeat}: {which}, {c} connections, {ns.duration:g} s")
                        r = churn(setup, which, c, ns.duration, ns.warmup)
                        say(f"  {r.get('requests_per_second', 0):,.0f} req/s, p50 {r.get('p50_ms', 0):.2f} ms, "
                            f"p99 {r.get('p99_ms', 0):.2f} ms, server CPU {r.get('server_cpu_percent', 0):.0f}%, "
                            f"load generator CPU {r.get('loadgen_cpu_percent', 0):.0f}%"
                            + ("" if r["ok"] else f", ERRORS {r.get('errors') or r.get('setup_failed')}"))
                        runs[which].append(r)
                sc[f"churn_{c}"] = {w: summarize_churn(v) for w, v in runs.items()}
        if "idle" in ns.only:
            runs = {"lmgrd": [], "ceiling_seat": [], "ceiling_bare": []}
            for i in range(ns.repeat):
                for which, seat, key_ in (("lmgrd", True, "lmgrd"), ("ceiling", True, "ceiling_seat"),
                                          ("ceiling", False, "ceiling_bare")):
                    say(f"idle {i + 1}/{ns.repeat}: {key_}, {ns.clients} clients")
                    r = idle(setup, which, ns.clients, seat)
                    say(f"  {r['kib_per_client']:.2f} KiB per client, outcomes {r['outcomes']}")
                    runs[key_].append(r)
            sc["idle"] = {w: summarize_idle(v) for w, v in runs.items()}
        if ns.profile:
            c = max(ns.churn_connections)
            say(f"profiling lmgrd with py-spy under churn at {c} connections")
            prof = profile_churn(setup, c, ns.duration, ns.warmup, ns.profile_out)
            res["profile"] = prof
    finally:
        for proc in setup.started:
            stop(proc)
        if ns.keep:
            say(f"kept {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    if {"burst", "churn", "idle"} <= ns.only:
        rows, targets = build_rows(res, ns)
        res["targets"] = targets
        tbl = table(rows)
        print(tbl)
        print()
        for t in targets:
            print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['name']}: {t['value']:.3g} (limit {t['limit']:g})")
        if ns.md is not None:
            write_md(ns.md, res, tbl, prof)
            say(f"wrote {ns.md}")
    else:
        res["targets"] = []
        print(json.dumps(res["scenarios"], indent=1, default=str)[:4000])
    if prof is not None:
        print("\nlmgrd profile, self time by function (% of samples):")
        for k, p in prof["top_self_by_function"][:15]:
            print(f"{p:6.2f}%  {k}")
    ns.json.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    say(f"wrote {ns.json}")
    if ns.strict and not all(t["pass"] for t in res["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
