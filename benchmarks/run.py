"""lmgrd benchmarks: the real daemon against an honest ceiling and a Redis peer, same load shapes, one run.

    python benchmarks/run.py bench      # make bench: churn, burst (5 runs), idle   (about 7 min)
    python benchmarks/run.py storm      # make bench-storm: heartbeat storm (about 3 min)
    python benchmarks/run.py restart    # make bench-restart: SIGKILL with 5,000 seats held (about 1 min)
    python benchmarks/run.py scaling    # make bench-scaling: products x customer IDs x held leases (about 4 min)
    python benchmarks/run.py render     # rebuild RESULTS.md and the chart from results.json, run nothing
    python benchmarks/run.py bench --quick   # a small smoke run of the same code (results-quick.json)

The targets, started fresh for every measurement (127.0.0.1, a free port, a temporary directory):

- ``lmgrd``: the daemon as a subprocess (a license signed for this host with a throwaway vendor key, share
  mode ``none`` so each checkout takes its own seat, ``--max-connections-per-address 0``,
  ``--max-requests-per-second 0``, ``--log-level warning``, the journal in a temporary state directory);
- ``ceiling``: ``benchmarks/ceiling.py``, the minimal uvloop server (raw msgpack, two dicts, nothing from
  ``protocol/``); ``ceiling_protocol``: ``benchmarks/ceiling_protocol.py``, the same built on ``protocol/``'s
  decoder, parser and message classes (the old ceiling, a second row);
- ``redis``: ``redis-server`` with the semaphore of ``benchmarks/redis_peer.py`` (churn, burst, storm, idle).

The load for lmgrd and the ceilings comes from ``benchmarks/load.py`` (one uvloop process of bare
``asyncio.Protocol`` clients with pre-encoded frames), the Redis load from ``--redis-procs`` processes of
redis-py asyncio with hiredis. Every command updates its own section of ``benchmarks/results.json`` and
rewrites ``benchmarks/RESULTS.md`` and ``benchmarks/churn.png`` from the whole file. Nothing here asserts
time: targets are reported PASS/FAIL (``--strict`` exits 1 on a FAIL). Every process started here is stopped
in a ``finally`` (SIGTERM, then SIGKILL), on error as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import msgpack  # noqa: E402
import psutil  # noqa: E402
import redis_peer  # noqa: E402

from lmgrd.storage.host import raise_nofile  # noqa: E402
from lmgrd.vendor.signing import new_customer_id  # noqa: E402
from tests.harness import write_keys, write_license  # noqa: E402

PY = sys.executable
LOAD = str(HERE / "load.py")
KIB = 1024.0
TARGETS = ("lmgrd", "ceiling", "ceiling_protocol", "redis")
LABEL = {"lmgrd": "lmgrd", "ceiling": "ceiling (minimal)", "ceiling_protocol": "ceiling (protocol/)",
         "redis": "Redis semaphore"}
SCRIPT = {"ceiling": HERE / "ceiling.py", "ceiling_protocol": HERE / "ceiling_protocol.py"}


class BenchError(RuntimeError):
    """A scenario could not run (a server did not start, the load generator failed)."""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu(self) -> float:
        t = psutil.Process(self.pid).cpu_times()
        return float(t.user + t.system)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Setup:
    """The temporary world every scenario runs in: keys, licenses, logs, and what was started."""

    workdir: Path
    key: Any
    pub: Path
    daemon_loop: str
    redis_procs: int
    warm: bool = True  # --quick skips the warm-up cycles (a smoke run measures nothing)
    started: list[subprocess.Popen[Any]] = field(default_factory=list)
    runs: int = 0

    def next_dir(self, name: str) -> Path:
        self.runs += 1
        d = self.workdir / f"{name}-{self.runs}"
        d.mkdir()
        return d

    def licenses(self, products: dict[str, int], customers: int = 1, extra_first: dict[str, int] | None = None,
                 ) -> list[Path]:
        """One license per customer ID, each with ``products`` (the first also with ``extra_first``)."""
        d = self.next_dir("lic")
        out = []
        for k in range(customers):
            prods = dict(products)
            if k == 0 and extra_first:
                prods.update(extra_first)
            path = d / f"c{k}.lic"
            # Issued two days ago: past the 24-hour self-activation, served from the first second.
            write_license(path, self.key, tuple((p, "1.0", n) for p, n in prods.items()), share="none",
                          issued_at=datetime.now(UTC) - timedelta(days=2),
                          customer_id=new_customer_id(k.to_bytes(10, "big")))
            out.append(path)
        return out


def wait_connectable(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0,
                     poll: float = 0.05) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before listening:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return time.monotonic()
        except OSError:
            time.sleep(poll)
    raise BenchError(f"server did not listen on 127.0.0.1:{port} within {timeout:g} s")


def start_daemon(setup: Setup, licenses: Sequence[Path], *, extra: Sequence[str] = (), run_dir: Path | None = None,
                 port: int | None = None, poll: float = 0.05) -> Server:
    run_dir = run_dir or setup.next_dir("lmgrd")
    port = port or free_port()
    log = run_dir / "lmgrd.log"
    args = [PY, "-m", "lmgrd", "--vendor-key", str(setup.pub), "--port", str(port), "--bind", "127.0.0.1",
            "--state-dir", str(run_dir / "state"), "--max-connections-per-address", "0",
            "--max-requests-per-second", "0", "--log-level", "warning",
            "--admin-token-file", str(run_dir / "admin.token"), *extra]
    for lic in licenses:
        args += ["--license", str(lic)]
    env = {**os.environ, "LMGRD_RUNTIME_DIR": str(run_dir / "run"), "LMGRD_LOOP": setup.daemon_loop}
    with open(log, "ab") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=f, cwd=REPO, env=env)
    setup.started.append(proc)
    try:
        listening = wait_connectable(port, proc, log, poll=poll)
    except BaseException:
        stop(proc)
        raise
    return Server("lmgrd", proc, port, log, {"run_dir": run_dir, "listening_at": listening})


def start_ceiling(setup: Setup, which: str, products: dict[str, int]) -> Server:
    d = setup.next_dir(which)
    log = d / "server.log"
    args = [PY, str(SCRIPT[which]), "--port", "0"] + [f"--pool={p}={n}" for p, n in products.items()]
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, cwd=REPO)
    setup.started.append(proc)
    try:
        line = read_line(proc, 20.0, which)
        port = int(line.rsplit(":", 1)[1])
    except BaseException:
        stop(proc)
        raise
    return Server(which, proc, port, log)


def start_redis(setup: Setup) -> Server:
    d = setup.next_dir("redis")
    proc, port = redis_peer.start_redis(d)
    setup.started.append(proc)
    sha = redis_peer.load_script(port)
    return Server("redis", proc, port, d / "redis.log", {"sha": sha})


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
def server(setup: Setup, which: str, products: dict[str, int], daemon_extra: Sequence[str] = ()) -> Iterator[Server]:
    if which == "lmgrd":
        srv = start_daemon(setup, setup.licenses(products), extra=daemon_extra)
    elif which == "redis":
        srv = start_redis(setup)
    else:
        srv = start_ceiling(setup, which, products)
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


def spawn_hold(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY, LOAD, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)


def finish_hold(gen: subprocess.Popen[bytes], timeout: float = 90.0) -> dict[str, Any]:
    """Send the release line to a holding load generator; return its final JSON line."""
    try:
        assert gen.stdin is not None
        gen.stdin.write(b"release\n")
        gen.stdin.flush()
        out, err = gen.communicate(timeout=timeout)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait(5)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": err.decode(errors="replace")[-2000:]}


class RedisLoad:
    """``--redis-procs`` processes of redis_peer.py sharing the clients, started together."""

    def __init__(self, setup: Setup, srv: Server, mode: str, total: int, args: list[str], lead: float) -> None:
        self.dir = setup.next_dir(f"redis-{mode}")
        n = max(1, min(setup.redis_procs, total))
        self.start_at = time.monotonic() + lead
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outs = [self.dir / f"out{i}.json" for i in range(n)]
        share = [total // n + (1 if i < total % n else 0) for i in range(n)]
        size = "--connections" if mode == "churn" else "--clients"
        for i in range(n):
            cmd = [PY, str(HERE / "redis_peer.py"), mode, "--port", str(srv.port), "--sha", srv.extra["sha"],
                   "--start-at", str(self.start_at), size, str(share[i]), "--out", str(self.outs[i]),
                   "--server-pid", str(srv.pid) if i == 0 else "0", *args]
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 cwd=REPO)
            setup.started.append(p)
            self.procs.append(p)

    def ready(self, timeout: float) -> list[dict[str, Any]]:
        return [json.loads(read_line(p, timeout, "redis load (ready)")) for p in self.procs]

    def release(self) -> None:
        self.send("go\n")

    def cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(p.pid).cpu_times()
                total += t.user + t.system
        return total

    def send(self, line: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                p.stdin.write(line.encode())
                p.stdin.flush()

    def results(self, timeout: float) -> list[dict[str, Any]]:
        out = []
        for p, path in zip(self.procs, self.outs, strict=True):
            try:
                _, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                p.kill()
                raise BenchError(f"redis load generator did not finish within {timeout:g} s") from exc
            if p.returncode != 0 or not path.exists():
                raise BenchError(f"redis load generator failed (exit {p.returncode}):\n"
                                 f"{err.decode(errors='replace')[-3000:]}")
            out.append(json.loads(path.read_text()))
        return out


def hist_merge(results: list[dict[str, Any]]) -> list[tuple[int, int]]:
    h: dict[int, int] = {}
    for r in results:
        for k, v in r["hist"].items():
            h[int(k)] = h.get(int(k), 0) + v
    return sorted(h.items())


def hist_pct(items: list[tuple[int, int]], q: float) -> float:
    """The q-th percentile, in milliseconds, of a merged microsecond histogram (same rule as load.pct)."""
    total = sum(v for _, v in items)
    if not total:
        return 0.0
    rank = min(total, max(1, round(q / 100 * total)))
    seen = 0
    for k, v in items:
        seen += v
        if seen >= rank:
            return k / 1000.0
    return items[-1][0] / 1000.0


def loadgen_cpu_cores(r: dict[str, Any]) -> float:
    return float(r.get("loadgen_cpu_percent", 0.0)) / 100.0


# --------------------------------------------------------------------------- scenarios: bench
def warm_up(srv: Server, warm: bool = True) -> None:
    """A few checkout/checkin cycles so first-use costs (lazy imports, caches) are not measured."""
    if srv.name == "redis" or not warm:
        return
    load(["churn", "--port", str(srv.port), "--product", "CHURN", "--connections", "10", "--duration", "0.3",
          "--warmup", "0.1", "--timeout", "20"], 60)


def churn(setup: Setup, which: str, connections: int, duration: float, warmup: float) -> dict[str, Any]:
    products = {"CHURN": 1_000_000}
    with server(setup, which, products) as srv:
        if which == "redis":
            rl = RedisLoad(setup, srv, "churn", connections,
                           ["--product", "CHURN", "--limit", str(products["CHURN"]), "--duration", str(duration),
                            "--warmup", str(warmup), "--timeout", "300"], lead=0.0)
            rl.ready(300)
            rl.send(f"{time.monotonic() + 0.5!r}\n")
            rs = rl.results(duration + warmup + 180)
            items = hist_merge(rs)
            span = rs[0]["span"]
            req = sum(r["requests"] for r in rs)
            cpu_gen = sum(r["cpu_self"] for r in rs)
            r: dict[str, Any] = {
                "requests": req, "cycles": sum(r["cycles"] for r in rs), "denied": sum(r["denied"] for r in rs),
                "requests_per_second": req / duration, "cycles_per_second": sum(r["cycles"] for r in rs) / duration,
                "p50_ms": hist_pct(items, 50), "p99_ms": hist_pct(items, 99), "p999_ms": hist_pct(items, 99.9),
                "max_ms": items[-1][0] / 1000 if items else 0.0,
                "server_cpu_percent": 100 * rs[0]["cpu_server"] / span,
                "loadgen_cpu_percent": 100 * cpu_gen / span,
                "server_cpu_us_per_request": 1e6 * rs[0]["cpu_server"] / req if req else 0.0,
                "loadgen_procs": len(rs), "errors": [], "timed_out": False}
        else:
            r = load(["churn", "--port", str(srv.port), "--product", "CHURN", "--connections", str(connections),
                      "--duration", str(duration), "--warmup", str(warmup), "--server-pid", str(srv.pid),
                      "--timeout", "60"], duration + warmup + 180)
            r["loadgen_procs"] = 1
    r["ok"] = "setup_failed" not in r and not r["errors"] and not r["timed_out"] and r["requests"] > 0
    if not r["ok"]:
        r["server_log_tail"] = srv.log_tail()
    return r


def burst(setup: Setup, which: str, clients: int, seats: int) -> dict[str, Any]:
    products = {"BURST": seats, "CHURN": 1000}
    with server(setup, which, products) as srv:
        warm_up(srv, setup.warm)
        if which == "redis":
            rl = RedisLoad(setup, srv, "burst", clients, ["--product", "BURST", "--limit", str(seats)], lead=1.0)
            rs = rl.results(180)
            oc: dict[str, int] = {}
            for x in rs:
                for k, v in x["outcomes"].items():
                    oc[k] = oc.get(k, 0) + v
            r: dict[str, Any] = {"outcomes": oc, "timed_out": False, "loadgen_procs": len(rs),
                                 "seconds_to_last_answer": max(x["last_answer"] for x in rs) - rl.start_at,
                                 "p50_answer_seconds": 0.0, "errors": []}
        else:
            r = load(["burst", "--port", str(srv.port), "--product", "BURST", "--clients", str(clients),
                      "--timeout", "60"], 120)
            r["loadgen_procs"] = 1
    oc = r["outcomes"]
    other = {k: v for k, v in oc.items() if k not in ("granted", "NO_SEATS")}
    r["granted"], r["no_seats"], r["other"] = oc.get("granted", 0), oc.get("NO_SEATS", 0), sum(other.values())
    r["ok"] = r["granted"] == seats and r["no_seats"] == clients - seats and not other and not r["timed_out"]
    r["other_outcomes"] = other
    if not r["ok"]:
        r["server_log_tail"] = srv.log_tail()
    return r


def idle(setup: Setup, which: str, clients: int) -> dict[str, Any]:
    products = {"IDLE": clients + 100, "CHURN": 1000}
    with server(setup, which, products) as srv:
        warm_up(srv, setup.warm)
        time.sleep(0.5)
        before = srv.rss()
        if which == "redis":
            rl = RedisLoad(setup, srv, "hold", clients, ["--product", "IDLE", "--limit", str(clients + 100),
                                                          "--connect-concurrency", "1000", "--timeout", "120"],
                           lead=0.5)
            readies = rl.ready(180)
            oc: dict[str, int] = {}
            for x in readies:
                for k, v in x["outcomes"].items():
                    oc[k] = oc.get(k, 0) + v
            ready: dict[str, Any] = {"outcomes": oc, "timed_out": False, "errors": []}
        else:
            gen = spawn_hold(["hold", "--port", str(srv.port), "--product", "IDLE", "--clients", str(clients),
                              "--timeout", "120"])
            ready = json.loads(read_line(gen, 180.0, "load generator (hold)"))
        time.sleep(1.0)  # let the server settle (the last replies, allocator) before measuring
        samples = [srv.rss()]
        for _ in range(2):
            time.sleep(0.25)
            samples.append(srv.rss())
        after = max(samples)
        if which == "redis":
            rl.release()
            rl.results(60)
            done: dict[str, Any] = {"failed_while_holding": 0}
        else:
            done = finish_hold(gen)
    ok = ready["outcomes"].get("granted", 0) == clients and not ready["timed_out"] and \
        done.get("failed_while_holding", 1) == 0
    return {"clients": clients, "rss_before": before, "rss_after": after, "rss_samples": samples,
            "kib_per_client": (after - before) / clients / KIB, "outcomes": ready["outcomes"], "ok": ok,
            "errors": ready.get("errors", [])}


# --------------------------------------------------------------------------- scenario: storm
def storm(setup: Setup, which: str, clients: int, duration: float, interval: float) -> dict[str, Any]:
    products = {"STORM": clients + 100, "CHURN": 1000}
    # The daemon is told the clients' real rhythm: heartbeat every second, lease timeout 3 s (the shortest
    # lmgrd accepts): a stall of 3 s anywhere would lose leases and show.
    extra = ["--heartbeat-interval", str(interval), "--lease-timeout", str(max(3.0, 3 * interval))]
    with server(setup, which, products, extra) as srv:
        warm_up(srv, setup.warm)
        if which == "redis":
            rl = RedisLoad(setup, srv, "storm", clients,
                           ["--product", "STORM", "--limit", str(clients + 100), "--duration", str(duration),
                            "--interval", str(interval), "--ttl-ms", str(int(3000 * interval)),
                            "--connect-concurrency", "1000", "--timeout", "180"], lead=0.5)
            rl.ready(240)
            beat_at = time.monotonic() + interval + 0.5  # every client renews by now; the window opens next
            rl.send(f"{beat_at!r}\n")
            time.sleep(max(0.0, beat_at - time.monotonic()))
            c0, g0, t0, rss0 = srv.cpu(), rl.cpu(), time.monotonic(), srv.rss()
            time.sleep(duration)
            c1, g1, t1, rss1 = srv.cpu(), rl.cpu(), time.monotonic(), srv.rss()
            rs = rl.results(120)
            items = hist_merge(rs)
            lost = sum(x["lost_in_renewals"] for x in rs)
            released = sum(x["released_at_end"] for x in rs)
            gen_cpu = (g1 - g0) / (t1 - t0)
            r: dict[str, Any] = {
                "clients": clients, "heartbeats_per_second": sum(v for _, v in items) / duration,
                "p50_ms": hist_pct(items, 50), "p99_ms": hist_pct(items, 99), "p999_ms": hist_pct(items, 99.9),
                "max_ms": items[-1][0] / 1000 if items else 0.0, "server_cores": (c1 - c0) / (t1 - t0),
                "loadgen_cores": gen_cpu, "loadgen_cpu_total_seconds": sum(x["cpu_total"] for x in rs),
                "server_rss_start": rss0, "server_rss_end": rss1, "lost_in_acks": lost,
                "released_at_end": released, "leases_lost": clients - released, "errors": [],
                "max_client_gap_seconds": max(x["max_client_gap_seconds"] for x in rs), "loadgen_procs": len(rs)}
        else:
            r = load(["storm", "--port", str(srv.port), "--product", "STORM", "--clients", str(clients),
                      "--duration", str(duration), "--interval", str(interval), "--server-pid", str(srv.pid),
                      "--timeout", "120"], duration + 400)
            r["loadgen_procs"] = 1
    r["ok"] = "setup_failed" not in r and r["leases_lost"] == 0 and not r["errors"]
    if not r["ok"]:
        r["server_log_tail"] = srv.log_tail()
    return r


# --------------------------------------------------------------------------- scenario: restart
def request(port: int, msgs: list[dict[str, Any]], timeout: float = 10.0) -> list[dict[str, Any]]:
    """A tiny blocking client: hello, then each message in turn; returns the replies after welcome."""
    pack = msgpack.Packer(use_bin_type=True).pack

    def frame(m: dict[str, Any]) -> bytes:
        body = pack(m)
        return len(body).to_bytes(4, "big") + body

    out: list[dict[str, Any]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rb")
        for m in [{"op": "hello", "id": 1, "proto": [1], "host": "bench-probe", "user": "probe", "pid": 1,
                   "client_version": "bench", "display": ""}, *msgs]:
            s.sendall(frame(m))
            n = int.from_bytes(f.read(4), "big")
            out.append(msgpack.unpackb(f.read(n)))
    return out[1:]


def in_use(port: int, product: str) -> int:
    data = request(port, [{"op": "status", "id": 2}])[0]["data"]
    return sum(p["in_use"] for p in data["pools"] if p["product"] == product)


def restart(setup: Setup, clients: int) -> dict[str, Any]:
    lics = setup.licenses({"RESTART": clients, "CHURN": 1000})
    run_dir = setup.next_dir("lmgrd-restart")
    port = free_port()
    srv = start_daemon(setup, lics, run_dir=run_dir, port=port)
    gen = None
    srv2 = None
    try:
        warm_up(srv, setup.warm)
        gen = spawn_hold(["restart", "--port", str(port), "--product", "RESTART", "--clients", str(clients),
                          "--timeout", "120"])
        ready = json.loads(read_line(gen, 180.0, "load generator (restart)"))
        if ready["outcomes"].get("granted", 0) != clients:
            raise BenchError(f"restart: only {ready['outcomes']} of {clients} seats granted")
        held_before = in_use(port, "RESTART")
        rss_before = srv.rss()
        time.sleep(0.5)
        killed_at = time.monotonic()
        srv.proc.kill()  # SIGKILL: no shutdown stage runs, the journal is all that is left
        srv.proc.wait(10)
        srv2 = start_daemon(setup, lics, run_dir=run_dir, port=port, poll=0.01)
        listening = srv2.extra["listening_at"] - killed_at
        resumed = json.loads(read_line(gen, 180.0, "load generator (resumed)"))
        held_after = in_use(port, "RESTART")
        probe = request(port, [{"op": "checkout", "id": 2, "product": "RESTART", "version": "1.0", "wait": 0.0}])[0]
        assert gen.stdin is not None
        gen.stdin.write(b"checkin\n")
        gen.stdin.flush()
        out, _ = gen.communicate(timeout=120)
        done = json.loads([ln for ln in out.decode().splitlines() if ln.startswith("{")][-1])
        held_end = in_use(port, "RESTART")
        log_tail = srv2.log_tail()
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
            gen.wait(5)
        stop(srv.proc)
        if srv2 is not None:
            stop(srv2.proc)
    probe_granted = probe.get("op") == "granted"
    r = {"clients": clients, "held_before_kill": held_before, "rss_before_kill": rss_before,
         "seconds_until_listening": listening,
         "seconds_until_all_resumed": resumed["last_resumed"] - killed_at if resumed["last_resumed"] else None,
         "resumed": resumed["resumed"], "resume_lost": resumed["lost"], "timed_out": resumed["timed_out"],
         "reconnect_attempts": resumed["reconnect_attempts"], "held_after_restart": held_after,
         "probe_checkout": probe.get("op") if probe_granted else probe.get("code"),
         "seats_lost": clients - resumed["resumed"],
         "double_granted": max(0, held_after - clients) + (1 if probe_granted else 0),
         "released_at_end": done.get("released_at_end"), "held_after_checkin": held_end,
         "errors": resumed["errors"]}
    r["ok"] = r["seats_lost"] == 0 and r["double_granted"] == 0 and held_after == clients and \
        r["released_at_end"] == clients and held_end == 0 and not r["timed_out"]
    if not r["ok"]:
        r["server_log_tail"] = log_tail
    return r


# --------------------------------------------------------------------------- scenario: scaling
def scaling_point(setup: Setup, products: int, customers: int, leases: int, duration: float) -> dict[str, Any]:
    """A daemon serving ``customers`` licenses of ``products`` products, ``leases`` seats held; then churn."""
    per_product = max(1, -(-leases // (products * customers))) + 1
    names = [f"P{i:04d}" for i in range(products)]
    lics = setup.licenses({n: per_product for n in names}, customers, extra_first={"CHURN": 1_000_000})
    srv = start_daemon(setup, lics)
    fill = None
    try:
        warm_up(srv, setup.warm)
        time.sleep(0.3)
        rss0 = srv.rss()
        conns = min(100, leases)
        fill = spawn_hold(["fill", "--port", str(srv.port), "--product", ",".join(names), "--connections",
                           str(conns), "--per-connection", str(leases // conns), "--timeout", "300"])
        ready = json.loads(read_line(fill, 400.0, "load generator (fill)"))
        time.sleep(0.5)
        rss1 = srv.rss()
        r = load(["churn", "--port", str(srv.port), "--product", "CHURN", "--connections", "100", "--duration",
                  str(duration), "--warmup", "0.5", "--server-pid", str(srv.pid), "--timeout", "60"], duration + 120)
        done = finish_hold(fill, 120)
        fill = None
    finally:
        if fill is not None and fill.poll() is None:
            fill.kill()
            fill.wait(5)
        stop(srv.proc)
    held = ready["granted"]
    return {"products": products, "customers": customers, "pools": products * customers + 1, "leases": held,
            "fill_seconds": ready["seconds"], "rss_before_fill": rss0, "rss_with_leases": rss1,
            "bytes_per_lease": (rss1 - rss0) / held if held else 0.0,
            "churn_requests_per_second": r["requests_per_second"], "churn_p99_ms": r["p99_ms"],
            "server_cpu_us_per_request": r["server_cpu_us_per_request"],
            "ok": held == (leases // conns) * conns and not r["errors"] and done.get("failed_while_holding") == 0,
            "errors": r["errors"] + ready.get("errors", [])}


# --------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
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
    redis_version = ""
    exe = redis_peer.redis_server_path()
    if exe:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            redis_version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                           timeout=10).stdout.strip()
    try:
        import hiredis
        import redis

        rpy = f"redis-py {redis.__version__}, hiredis {hiredis.__version__}"
    except ImportError:
        rpy = "redis-py not installed"
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "uvloop": getattr(uvloop, "__version__", "?"),
            "msgpack": ".".join(map(str, msgpack.version)), "kernel": platform.release(), "somaxconn": somaxconn,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "redis_server": redis_version,
            "redis_client": rpy, "netns": bool(os.environ.get(NETNS_ENV))}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- commands
def cmd_bench(setup: Setup, ns: argparse.Namespace) -> dict[str, Any]:
    sc: dict[str, Any] = {"params": {"clients": ns.clients, "seats": ns.seats, "duration": ns.duration,
                                     "warmup": ns.warmup, "churn_connections": ns.churn_connections,
                                     "idle_clients": ns.idle_clients, "repeat": ns.repeat,
                                     "redis_procs": ns.redis_procs, "burst_runs": ns.burst_runs}}
    targets = [t for t in TARGETS if t in ns.targets]
    for rep in range(ns.repeat):
        tag = f" (repeat {rep + 1}/{ns.repeat})" if ns.repeat > 1 else ""
        if "burst" in ns.only:
            # One burst lasts about a second, so one run says little (the same code measured 0.95-1.70 s in five
            # runs): --burst-runs runs of every target, alternating; the report takes medians.
            for run_no in range(ns.burst_runs):
                btag = f"{tag} (run {run_no + 1}/{ns.burst_runs})" if ns.burst_runs > 1 else tag
                for which in targets:
                    say(f"burst{btag}: {which}, {ns.clients} clients, {ns.seats} seats")
                    r = burst(setup, which, ns.clients, ns.seats)
                    say(f"  {r['seconds_to_last_answer']:.3f} s, outcomes {r['outcomes']}")
                    sc.setdefault("burst", {}).setdefault(which, []).append(r)
        if "churn" in ns.only:
            for c in ns.churn_connections:
                for which in targets:
                    say(f"churn{tag}: {which}, {c} connections, {ns.duration:g} s")
                    r = churn(setup, which, c, ns.duration, ns.warmup)
                    say(f"  {r.get('requests_per_second', 0):,.0f} req/s, p50 {r.get('p50_ms', 0):.2f} ms, "
                        f"p99 {r.get('p99_ms', 0):.2f} ms, p999 {r.get('p999_ms', 0):.2f} ms, server CPU "
                        f"{r.get('server_cpu_percent', 0):.0f}%, load generator CPU "
                        f"{r.get('loadgen_cpu_percent', 0):.0f}%"
                        + ("" if r["ok"] else f", ERRORS {r.get('errors') or r.get('setup_failed')}"))
                    sc.setdefault(f"churn_{c}", {}).setdefault(which, []).append(r)
        if "idle" in ns.only:
            for n in ns.idle_clients:
                for which in ("lmgrd", "ceiling", "redis"):
                    if which not in targets:
                        continue
                    say(f"idle{tag}: {which}, {n} clients holding a seat")
                    r = idle(setup, which, n)
                    say(f"  {r['kib_per_client']:.2f} KiB per client, outcomes {r['outcomes']}")
                    sc.setdefault(f"idle_{n}", {}).setdefault(which, []).append(r)
    return sc


def cmd_storm(setup: Setup, ns: argparse.Namespace) -> dict[str, Any]:
    sc: dict[str, Any] = {"params": {"clients": ns.clients, "duration": ns.duration, "interval": 1.0,
                                     "redis_procs": ns.redis_procs}}
    for which in [t for t in ("lmgrd", "ceiling", "redis") if t in ns.targets]:
        say(f"storm: {which}, {ns.clients} clients heartbeating every 1 s for {ns.duration:g} s")
        r = storm(setup, which, ns.clients, ns.duration, 1.0)
        say(f"  server {r.get('server_cores', 0):.3f} cores, heartbeat p99 {r.get('p99_ms', 0):.2f} ms, "
            f"leases lost {r.get('leases_lost')}" + ("" if r["ok"] else f", NOT OK {r.get('errors')}"))
        sc[which] = r
    return sc


def cmd_restart(setup: Setup, ns: argparse.Namespace) -> dict[str, Any]:
    sc: dict[str, Any] = {"params": {"clients": ns.clients, "repeat": ns.repeat}, "runs": []}
    for i in range(ns.repeat):
        say(f"restart {i + 1}/{ns.repeat}: {ns.clients} clients holding seats, SIGKILL, restart")
        r = restart(setup, ns.clients)
        say(f"  listening again after {r['seconds_until_listening']:.3f} s, all resumed after "
            f"{r['seconds_until_all_resumed']} s; seats lost {r['seats_lost']}, double-granted {r['double_granted']}")
        sc["runs"].append(r)
    return sc


SCALING_POINTS = [  # (products, customer IDs, held leases)
    (1, 1, 100), (10, 1, 100), (100, 1, 100), (1000, 1, 100),
    (1000, 1, 1000), (1000, 1, 10_000), (1000, 1, 100_000), (100, 10, 100_000), (10, 100, 100_000),
]
SCALING_QUICK = [(1, 1, 100), (100, 1, 1000), (100, 2, 5000)]


def cmd_scaling(setup: Setup, ns: argparse.Namespace) -> dict[str, Any]:
    pts = SCALING_QUICK if ns.quick else SCALING_POINTS
    sc: dict[str, Any] = {"params": {"duration": ns.duration, "points": pts}, "points": []}
    for p, k, n in pts:
        say(f"scaling: {p} products x {k} customer IDs, {n} leases held; churn at 100 connections")
        r = scaling_point(setup, p, k, n, ns.duration)
        say(f"  {r['server_cpu_us_per_request']:.1f} us per request, p99 {r['churn_p99_ms']:.2f} ms, "
            f"{r['bytes_per_lease']:.0f} B per lease" + ("" if r["ok"] else f", NOT OK {r['errors']}"))
        sc["points"].append(r)
    return sc


COMMANDS = {"bench": cmd_bench, "storm": cmd_storm, "restart": cmd_restart, "scaling": cmd_scaling}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="bench", choices=(*COMMANDS, "render"))
    p.add_argument("--quick", action="store_true", help="a small smoke run of the same code; writes "
                   "results-quick.json and leaves RESULTS.md alone")
    p.add_argument("--clients", type=int, help="burst (10000), storm (10000) or restart (5000) clients")
    p.add_argument("--seats", type=int, help="burst seats (default 8000, at most --clients)")
    p.add_argument("--duration", type=float, help="churn window (5 s), storm window (30 s), scaling churn (3 s)")
    p.add_argument("--warmup", type=float, help="churn unmeasured warm-up in seconds (default 1)")
    p.add_argument("--churn-connections", help="comma-separated connection counts (default 100,1000,5000)")
    p.add_argument("--idle-clients", help="comma-separated clients holding a seat (default 1000,5000,10000)")
    p.add_argument("--repeat", type=int, default=1, help="bench and restart: run every measurement N times")
    p.add_argument("--burst-runs", type=int,
                   help="bench: bursts per target in each repeat, alternating (default 5, 1 with --quick; medians)")
    p.add_argument("--only", help="bench: comma-separated subset of burst,churn,idle")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--redis-procs", type=int, default=2, help="processes driving Redis (default 2)")
    p.add_argument("--daemon-loop", choices=("uvloop", "asyncio"), default="uvloop", help="LMGRD_LOOP")
    p.add_argument("--json", type=Path, help="results file (default benchmarks/results.json)")
    p.add_argument("--md", type=Path, help="markdown to rewrite (default benchmarks/RESULTS.md; not with --quick)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (default: report only)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, journals)")
    p.add_argument("--netns", action=argparse.BooleanOptionalAction, default=True,
                   help="run in a private network namespace with somaxconn 65535 (default, when root)")
    ns = p.parse_args(argv)
    q = ns.quick
    cmd = ns.command
    default_clients = {"bench": (500, 10_000), "storm": (500, 10_000), "restart": (300, 5000)}.get(cmd, (0, 0))
    ns.clients = ns.clients or default_clients[0 if q else 1]
    ns.seats = ns.seats if ns.seats is not None else (ns.clients * 4) // 5
    default_duration = {"bench": (1.0, 5.0), "storm": (5.0, 30.0), "scaling": (1.0, 3.0)}.get(cmd, (1.0, 5.0))
    ns.duration = ns.duration or default_duration[0 if q else 1]
    ns.warmup = ns.warmup if ns.warmup is not None else (0.3 if q else 1.0)
    ns.churn_connections = [int(x) for x in (ns.churn_connections or ("50,200" if q else "100,1000,5000")).split(",")]
    ns.idle_clients = [int(x) for x in (ns.idle_clients or ("300" if q else "1000,5000,10000")).split(",")]
    ns.only = set((ns.only or "burst,churn,idle").split(","))
    ns.burst_runs = ns.burst_runs or (1 if q else 5)
    ns.targets = set(ns.targets.split(","))
    if unknown := ns.targets - set(TARGETS):
        p.error(f"--targets: unknown {', '.join(sorted(unknown))}; known: {', '.join(TARGETS)}")
    ns.png = ns.json.with_suffix(".png") if ns.json else HERE / ("churn-quick.png" if q else "churn.png")
    ns.json = ns.json or HERE / ("results-quick.json" if q else "results.json")
    ns.md = ns.md or (None if q else HERE / "RESULTS.md")
    if cmd == "bench" and not 0 < ns.seats <= ns.clients:
        p.error(f"--seats must be from 1 to --clients ({ns.clients}), got {ns.seats}")
    if not 1 <= ns.repeat <= 20:
        p.error("--repeat must be from 1 to 20")
    if max(ns.clients, *ns.churn_connections, *ns.idle_clients) > 15000:
        p.error("at most 15000 clients or connections: the file descriptor hard limit here is 20000")
    return ns


NETNS_ENV = "LMGRD_BENCH_NETNS"


def reexec_in_netns(argv: list[str]) -> None:
    """Run this command again inside a fresh network namespace (root): its own loopback, and its own
    ``somaxconn`` and SYN backlog raised to 65535, so a burst of 10,000 connects measures the servers rather
    than the kernel's accept-queue drops and SYN retransmits (1 s, 3 s) of the shared machine's 4096. Every
    target runs in the same namespace; nothing outside it is changed. Replaces this process (same PID)."""
    script = ("ip link set lo up && sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 "
              '&& exec "$@"')
    os.environ[NETNS_ENV] = "1"
    os.execvp("unshare", ["unshare", "--net", "--", "sh", "-c", script, "sh", PY, str(Path(__file__).resolve()),
                          *argv])


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None


def carry_over(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The section to keep: ``new``, plus the scenarios of ``old`` this run did not measure (``bench --only churn``
    must not drop the burst and idle records), each carried with the meta of the run that measured it
    (``carried``: scenario key -> meta; the report names those runs)."""
    if not old:
        return new
    carried: dict[str, Any] = {}
    for key, value in old.items():
        if key in ("params", "meta", "carried") or key in new:
            continue
        new[key] = value
        carried[key] = old.get("carried", {}).get(key, old.get("meta"))
    if carried:
        new["carried"] = carried
    return new


def main(argv: list[str] | None = None) -> int:
    import report

    ns = parse(argv)
    if ns.netns and ns.command != "render" and not os.environ.get(NETNS_ENV):
        if netns_available():
            reexec_in_netns(list(argv if argv is not None else sys.argv[1:]))
        say("--netns needs root, unshare and ip; running in the machine's own network namespace")
    res: dict[str, Any] = json.loads(ns.json.read_text(encoding="utf-8")) if ns.json.exists() else {}
    res.pop("scenarios", None)  # the layout before this file had sections
    if ns.command == "render":
        return report.publish(res, ns.json, ns.md, ns.png, write_json=False)
    if "redis" in ns.targets and ns.command in ("bench", "storm") and redis_peer.redis_server_path() is None:
        say("redis-server is not installed (apt-get install -y --no-install-recommends redis-server); "
            "running without the Redis peer")
        ns.targets.discard("redis")
    raise_nofile()  # inherited by the servers and the load generators (each raises its own too)

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: the servers started are stopped

    signal.signal(signal.SIGTERM, terminate)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    workdir = Path(tempfile.mkdtemp(prefix="lmgrd-bench-"))
    key, pub = write_keys(workdir / "keys")
    setup = Setup(workdir, key, pub, ns.daemon_loop, ns.redis_procs, warm=not ns.quick)
    t0 = time.monotonic()
    meta = {"command": command.strip(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(), "uptime_start": uptime(), "daemon_loop": ns.daemon_loop}
    try:
        section = COMMANDS[ns.command](setup, ns)
    finally:
        for proc in setup.started:
            stop(proc)
        if ns.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["uptime_end"] = uptime()
    meta["seconds"] = round(time.monotonic() - t0, 1)
    section["meta"] = meta
    res[ns.command] = carry_over(res.get(ns.command), section)
    rc = report.publish(res, ns.json, ns.md, ns.png)
    if ns.strict:
        missed = [t for t in report.targets(res).get(ns.command, []) if not t["pass"]]
        return 1 if missed else rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
