"""The peer: what a Python shop would build instead of lmgrd, a Redis counting semaphore with TTL leases.

The semaphore is one sorted set per product: members are the holders' tokens, scores their expiry in
milliseconds. Acquire is one Lua script (``ACQUIRE``) that first drops the holders whose expiry has passed
and then adds the caller if fewer than ``limit`` remain, atomically; release is ``ZREM``; renew (the
heartbeat) is ``ZADD XX CH``, which changes nothing for a token that is no longer there (the lease is lost
and the reply says 0). The server is Debian's ``redis-server`` on 127.0.0.1, started by
:func:`start_redis` on a free port in a temporary directory with persistence off (``--save ''
--appendonly no``: the fastest Redis can be; a durable one would fsync an AOF as well). The clients are
redis-py's asyncio client with the hiredis parser, one connection per simulated client, as every product
process would hold its own.

This file is also the Redis load generator, one process per ``--procs`` share of the clients
(``benchmarks/run.py`` starts them; each writes one JSON object to ``--out``), with the same shapes as ``load.py``:

- ``churn``: C connections each loop acquire -> release; latencies go into a histogram (microseconds ->
  count) so the orchestrator can merge processes exactly;
- ``burst``: N connections connect and acquire at the same moment (``--start-at``, a monotonic instant
  shared by the processes); outcome counts and the time of the last answer;
- ``storm``: N connections hold a seat each and renew it every ``--interval`` seconds;
- ``hold``: N connections hold a seat each until a line arrives on stdin (idle memory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

KEY_PREFIX = "sem:"
ACQUIRE = """
-- KEYS[1]: the product's sorted set; ARGV: now_ms, ttl_ms, limit, token
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[4])
  return 1
end
return 0
"""


# --------------------------------------------------------------------------- the server
def redis_server_path() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path, maxclients: int = 20000) -> tuple[subprocess.Popen[bytes], int]:
    """Start redis-server on 127.0.0.1 and a free port, no persistence; return it once it answers PING."""
    exe = redis_server_path()
    if exe is None:
        raise RuntimeError("redis-server is not installed: apt-get install -y --no-install-recommends "
                           "redis-server (make bench does this when it is missing)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(workdir / "redis.log", "wb")  # noqa: SIM115  # closed by the caller's stop() via the process
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--save", "", "--appendonly", "no", "--maxclients", str(maxclients),
                             "--tcp-backlog", "8192", "--daemonize", "no", "--loglevel", "warning",
                             "--protected-mode", "yes"], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}: "
                               f"{(workdir / 'redis.log').read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{port} within 20 s")


# --------------------------------------------------------------------------- the load
def now_ms() -> int:
    return int(time.time() * 1000)


def cpu_seconds(p: psutil.Process | None) -> float:
    if p is None:
        return 0.0
    t = p.cpu_times()
    return float(t.user + t.system)


class Hist:
    """Latencies in whole microseconds -> count (exact merge across processes)."""

    def __init__(self) -> None:
        self.h: dict[int, int] = {}

    def add(self, seconds: float) -> None:
        k = int(seconds * 1e6)
        self.h[k] = self.h.get(k, 0) + 1


async def connect(ns: argparse.Namespace) -> Any:
    import redis.asyncio as aioredis

    r = aioredis.Redis(host="127.0.0.1", port=ns.port, single_connection_client=True, protocol=2,
                       socket_connect_timeout=ns.timeout)
    await r.initialize()
    return r


async def run_churn(ns: argparse.Namespace) -> dict[str, Any]:
    key = KEY_PREFIX + ns.product
    sha = ns.sha
    clients = [await connect(ns) for _ in range(ns.connections)]  # sequential: connects are not measured
    # every process connected: the orchestrator then sends the shared monotonic instant the load starts
    print(json.dumps({"event": "ready", "connections": len(clients)}), flush=True)
    loop = asyncio.get_running_loop()
    ns.start_at = float(await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), ns.timeout))
    hist = Hist()
    counts = {"requests": 0, "cycles": 0, "denied": 0}
    start = ns.start_at + ns.warmup
    stop = start + ns.duration
    server = psutil.Process(ns.server_pid) if ns.server_pid else None
    me = psutil.Process()
    marks: dict[str, float] = {}
    pid = os.getpid()
    perf = time.monotonic

    async def one(i: int, r: Any) -> None:
        n = 0
        while True:
            t = perf()
            if t >= stop:
                return
            n += 1
            token = f"{pid}-{i}-{n}"
            ok = await r.evalsha(sha, 1, key, now_ms(), ns.ttl_ms, ns.limit, token)
            t2 = perf()
            measured = start <= t2 < stop
            if measured:
                hist.add(t2 - t)
                counts["requests"] += 1
            if not ok:
                counts["denied"] += measured
                continue
            released = await r.zrem(key, token)
            t3 = perf()
            if released != 1:
                raise RuntimeError(f"release of {token} removed {released}")
            if start <= t3 < stop:
                hist.add(t3 - t2)
                counts["requests"] += 1
                counts["cycles"] += 1

    async def mark(name: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - perf()))
        marks[name] = perf()
        marks[name + "_self"] = cpu_seconds(me)
        marks[name + "_server"] = cpu_seconds(server)

    await asyncio.sleep(max(0.0, ns.start_at - perf()))
    await asyncio.gather(mark("start", start), mark("end", stop), *(one(i, r) for i, r in enumerate(clients)))
    for r in clients:
        await r.aclose()
    span = marks["end"] - marks["start"]
    return {"mode": "churn", "connections": ns.connections, "hist": hist.h, **counts, "span": span,
            "cpu_self": marks["end_self"] - marks["start_self"],
            "cpu_server": marks["end_server"] - marks["start_server"]}


async def hold_all(ns: argparse.Namespace, key: str) -> tuple[list[Any], list[str], dict[str, int], list[float]]:
    """Connect N clients at ``start_at`` and acquire once each; return clients, tokens, outcomes, answer times."""
    pid = os.getpid()
    outcomes: dict[str, int] = {}
    answered: list[float] = []
    tokens = [f"{pid}-{i}" for i in range(ns.clients)]
    clients: list[Any] = [None] * ns.clients
    sem = asyncio.Semaphore(ns.connect_concurrency)

    async def one(i: int) -> None:
        async with sem:
            try:
                r = clients[i] = await connect(ns)
                ok = await r.evalsha(ns.sha, 1, key, now_ms(), ns.ttl_ms, ns.limit, tokens[i])
                what = "granted" if ok else "NO_SEATS"
            except Exception as exc:  # counted as an outcome, named
                what = type(exc).__name__
            answered.append(time.monotonic())
            outcomes[what] = outcomes.get(what, 0) + 1

    await asyncio.sleep(max(0.0, ns.start_at - time.monotonic()))
    await asyncio.gather(*(one(i) for i in range(ns.clients)))
    return clients, tokens, outcomes, answered


async def run_burst(ns: argparse.Namespace) -> dict[str, Any]:
    clients, _, outcomes, answered = await hold_all(ns, KEY_PREFIX + ns.product)
    for r in clients:
        if r is not None:
            await r.aclose()
    answered.sort()
    return {"mode": "burst", "clients": ns.clients, "outcomes": outcomes,
            "last_answer": answered[-1] if answered else 0.0,
            "answers": [answered[len(answered) // 2]] if answered else []}


async def run_storm(ns: argparse.Namespace) -> dict[str, Any]:
    """Each client renews from the moment it holds its seat (at its own random phase), one ``ZADD XX CH`` every
    ``interval`` after the last reply; the measured window opens at the instant read from stdin (sent by the
    orchestrator once every process is ready) and lasts ``duration``."""
    key = KEY_PREFIX + ns.product
    pid = os.getpid()
    tokens = [f"{pid}-{i}" for i in range(ns.clients)]
    clients: list[Any] = [None] * ns.clients
    outcomes: dict[str, int] = {}
    window = {"start": float("inf"), "stop": float("inf")}
    hist = Hist()
    lost = 0
    max_gap = 0.0
    granted = 0
    all_granted = asyncio.get_running_loop().create_future()
    rng = random.Random(pid)
    sem = asyncio.Semaphore(ns.connect_concurrency)

    async def renew(i: int) -> None:
        nonlocal lost, max_gap
        r = clients[i]
        await asyncio.sleep(rng.random() * ns.interval)
        last = 0.0
        nxt = time.monotonic()
        while nxt < window["stop"]:
            t = time.monotonic()
            if last:
                max_gap = max(max_gap, t - last)
            last = t
            changed = await r.zadd(key, {tokens[i]: now_ms() + ns.ttl_ms}, xx=True, ch=True)
            if window["start"] <= t < window["stop"]:
                hist.add(time.monotonic() - t)
            if changed != 1:
                lost += 1
                return
            nxt += ns.interval
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    async def one(i: int) -> None:
        nonlocal granted
        async with sem:
            try:
                r = clients[i] = await connect(ns)
                ok = await r.evalsha(ns.sha, 1, key, now_ms(), ns.ttl_ms, ns.limit, tokens[i])
                what = "granted" if ok else "NO_SEATS"
            except Exception as exc:  # counted as an outcome, named
                ok, what = False, type(exc).__name__
        outcomes[what] = outcomes.get(what, 0) + 1
        if sum(outcomes.values()) >= ns.clients and not all_granted.done():
            all_granted.set_result(None)
        if ok:
            granted += 1
            await renew(i)

    await asyncio.sleep(max(0.0, ns.start_at - time.monotonic()))
    tasks = [asyncio.ensure_future(one(i)) for i in range(ns.clients)]
    await asyncio.wait_for(all_granted, ns.timeout)
    print(json.dumps({"event": "ready", "outcomes": outcomes}), flush=True)
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), ns.timeout)
    window["start"] = float(line)
    window["stop"] = window["start"] + ns.duration
    await asyncio.wait_for(asyncio.gather(*tasks), ns.duration + ns.timeout)
    released = 0
    for i, r in enumerate(clients):
        if r is not None:
            released += await r.zrem(key, tokens[i])
            await r.aclose()
    return {"mode": "storm", "hist": hist.h, "lost_in_renewals": lost, "released_at_end": released,
            "clients": ns.clients, "outcomes": outcomes, "max_client_gap_seconds": max_gap}


async def run_hold(ns: argparse.Namespace) -> dict[str, Any]:
    clients, _, outcomes, _ = await hold_all(ns, KEY_PREFIX + ns.product)
    print(json.dumps({"event": "ready", "outcomes": outcomes}), flush=True)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), ns.timeout)
    for r in clients:
        if r is not None:
            await r.aclose()
    return {"mode": "hold", "outcomes": outcomes}


def load_script(port: int) -> str:
    """SCRIPT LOAD the acquire script once (synchronously, before the load starts); returns its SHA1."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=port, protocol=2)
    try:
        sha: str = r.script_load(ACQUIRE)
        return sha
    finally:
        r.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("churn", "burst", "storm", "hold"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sha", required=True, help="SHA1 of the loaded ACQUIRE script")
    p.add_argument("--product", required=True)
    p.add_argument("--limit", type=int, required=True, help="the product's seat count")
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--connect-concurrency", type=int, default=10000)
    p.add_argument("--start-at", type=float, required=True, help="monotonic instant to start (shared)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--ttl-ms", type=int, default=90_000, help="lease TTL (default: the daemon's 90 s)")
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--out", type=Path, required=True, help="write the result (one JSON object) here")
    ns = p.parse_args(argv)
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    fn = {"churn": run_churn, "burst": run_burst, "storm": run_storm, "hold": run_hold}[ns.mode]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        res = runner.run(fn(ns))
    res["event"] = "done"
    res["pid"] = os.getpid()
    res["cpu_total"] = cpu_seconds(psutil.Process())
    ns.out.write_text(json.dumps(res), encoding="utf-8")  # a file: a big histogram outgrows a pipe write
    return 0


if __name__ == "__main__":
    sys.exit(main())
