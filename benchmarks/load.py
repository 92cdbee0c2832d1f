"""Load generator for the lmgrd benchmarks: many protocol clients multiplexed on one uvloop, one process.

Each client is a bare ``asyncio.Protocol`` with pre-encoded request frames and a fast path for the common
case of one whole reply frame per ``data_received``, so that the generator spends as little as possible of
the CPU it shares with the server under test. It speaks the wire protocol of ``protocol/PROTOCOL.md``
directly (length-prefixed msgpack) and checks every reply id.

Modes (``run.py`` starts this script as a subprocess, one run per mode, and reads JSON lines on stdout):

- ``burst``: N clients connect at the same moment, each sends hello, waits for welcome, checks out once
  (no wait). Reports the outcome counts and the time from the first connect until every client has its
  answer.
- ``churn``: C connections say hello, then all at once loop checkout -> checkin for a warm-up and then a
  measured window; reports request round trips per second, checkout+checkin cycles per second, p50/p99
  latency of one request round trip, and the CPU the generator and the server used in the window.
- ``hold``: N clients connect and say hello (and, unless ``--no-checkout``, check out a seat and keep it),
  print a ``ready`` line, wait for a line on stdin, then close and print ``done``.
- ``storm``: N clients connect, check out a seat each, then every client heartbeats every ``--interval``
  seconds (each at its own random phase) for ``--duration`` seconds; reports heartbeat latency, the server's
  and the generator's CPU over the window, and leases lost: an ack that renews fewer than one lease or
  names a lost one, a dropped connection, or (at the end) a checkin that releases nothing.
- ``restart``: N clients check out a seat each and print ``ready``; when the server goes away each
  reconnects with client_stub's own backoff (capped exponential, full jitter), says hello again and resumes
  its token; prints ``resumed`` with the monotonic time the last one did (the orchestrator SIGKILLs and
  restarts the daemon in between), then on a line on stdin checks every seat in and prints ``done``.

Every phase is bounded by ``--timeout``; a client that gets anything unexpected counts as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import deque
from typing import Any

import msgpack
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from client_stub.backoff import Backoff
from lmgrd.storage.host import raise_nofile

_pack = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb
perf = time.perf_counter
HOST = "127.0.0.1"
CLIENT_HOST = "bench-client"


def frame(msg: dict[str, Any]) -> bytes:
    body: bytes = _pack(msg)
    return len(body).to_bytes(4, "big") + body


#: Each client's hello secret (128 bits, 32 hex digits), the same on every connection it opens, as client_stub
#: does: a daemon that binds leases to (user, host, secret) lets only that client resume them after a restart.
#: A daemon that does not know the field ignores it (unknown fields are ignored).
SECRET_BASE = os.urandom(8).hex()


def hello_frame(i: int) -> bytes:
    return frame({"op": "hello", "id": 1, "proto": [1], "host": CLIENT_HOST, "user": f"bench{i}",
                  "pid": 1000 + i, "client_version": "bench", "display": "", "secret": f"{SECRET_BASE}{i:016x}"})


class Gen:
    """Shared state of one run: counters and the future that completes when every client is done."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.n = n
        self.outcomes: dict[str, int] = {}
        self.answered = 0
        self.done: asyncio.Future[None] = loop.create_future()
        self.errors: list[str] = []
        self.clients: list[BaseClient] = []

    def outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1
        self.answered += 1
        if self.answered >= self.n and not self.done.done():
            self.done.set_result(None)

    def error(self, what: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(what)


class BaseClient(asyncio.Protocol):
    """Framing and the hello step; subclasses handle the replies after welcome."""

    __slots__ = ("buf", "gen", "i", "state", "transport")

    def __init__(self, gen: Gen, i: int) -> None:
        self.gen = gen
        self.i = i
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.state = "connecting"
        gen.clients.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state = "hello"
        self.connected()

    def connected(self) -> None:
        assert self.transport is not None
        self.transport.write(hello_frame(self.i))

    def data_received(self, data: bytes) -> None:
        if not self.buf and len(data) > 4:
            n = int.from_bytes(data[:4], "big")
            if len(data) == n + 4:  # the common case: exactly one whole frame
                self.on_msg(_unpackb(data[4:]))
                return
        buf = self.buf + data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            n = int.from_bytes(buf[pos:pos + 4], "big")
            if end - pos - 4 < n:
                break
            self.on_msg(_unpackb(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        self.buf = buf[pos:]

    def on_msg(self, msg: dict[str, Any]) -> None:
        if self.state == "hello":
            if msg.get("op") != "welcome":
                self.fail(f"hello answered with {msg.get('op')} {msg.get('code')}: {msg.get('message')}")
                return
            self.state = "ready"
            self.welcomed()
        else:
            self.reply(msg)

    def welcomed(self) -> None:
        raise NotImplementedError

    def reply(self, msg: dict[str, Any]) -> None:
        raise NotImplementedError

    def fail(self, why: str) -> None:
        self.gen.error(f"client {self.i}: {why}")
        if self.state != "failed":
            self.state = "failed"
            self.gen.outcome("error")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state not in ("closing", "failed", "finished"):
            self.fail(f"connection lost in state {self.state}: {exc}")

    def close(self) -> None:
        if self.state not in ("failed", "finished"):
            self.state = "closing"
        if self.transport is not None:
            self.transport.close()


# --------------------------------------------------------------------------- burst and hold
class CheckoutOnce(BaseClient):
    """hello -> welcome -> checkout -> answer; keeps the connection (and the seat) until told to close."""

    __slots__ = ("answered_at", "checkout", "connected_at", "token", "welcomed_at")

    def __init__(self, gen: Gen, i: int, checkout: bytes | None) -> None:
        super().__init__(gen, i)
        self.checkout = checkout
        self.answered_at = 0.0
        self.connected_at = 0.0
        self.welcomed_at = 0.0
        self.token = ""

    def connected(self) -> None:
        self.connected_at = perf()
        super().connected()

    def welcomed(self) -> None:
        self.welcomed_at = perf()
        if self.checkout is None:  # hold without a seat
            self.answered_at = perf()
            self.state = "holding"
            self.gen.outcome("connected")
            return
        assert self.transport is not None
        self.state = "checkout"
        self.transport.write(self.checkout)

    def reply(self, msg: dict[str, Any]) -> None:
        if self.state != "checkout" or msg.get("id") != 2:
            self.fail(f"unexpected reply {msg!r:.120} in state {self.state}")
            return
        self.answered_at = perf()
        self.state = "holding"
        op = msg.get("op")
        if op == "granted":
            self.token = msg["token"]
        self.gen.outcome("granted" if op == "granted" else str(msg.get("code", op)))


async def open_clients(gen: Gen, make: Any, n: int, port: int, concurrency: int) -> None:
    """Start n connections; at most ``concurrency`` connects in flight (n = concurrency: all at once)."""
    loop = gen.loop
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            try:
                await loop.create_connection(lambda: make(i), HOST, port)
            except OSError as exc:
                gen.error(f"client {i}: connect failed: {exc}")
                gen.outcome(f"connect_error_{exc.errno}")

    await asyncio.gather(*(one(i) for i in range(n)))


def checkout_frame(product: str, version: str) -> bytes:
    return frame({"op": "checkout", "id": 2, "product": product, "version": version, "wait": 0.0})


async def run_burst(ns: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gen = Gen(loop, ns.clients)
    co = checkout_frame(ns.product, ns.version)
    t0 = perf()
    opener = loop.create_task(open_clients(gen, lambda i: CheckoutOnce(gen, i, co), ns.clients, ns.port,
                                           ns.clients))
    try:
        await asyncio.wait_for(asyncio.shield(gen.done), ns.timeout)
        timed_out = False
    except TimeoutError:
        timed_out = True
    t_all = perf() - t0
    await asyncio.wait_for(opener, 5)
    once = [c for c in gen.clients if isinstance(c, CheckoutOnce)]
    answers = sorted(c.answered_at - t0 for c in once if c.answered_at)
    connects = [c.connected_at - t0 for c in once if c.connected_at]
    welcomes = [c.welcomed_at - t0 for c in once if c.welcomed_at]
    for c in gen.clients:
        c.close()
    await asyncio.sleep(0.05)
    return {"mode": "burst", "clients": ns.clients, "outcomes": gen.outcomes, "timed_out": timed_out,
            "seconds_to_last_answer": answers[-1] if answers else t_all,
            "p50_answer_seconds": pct(answers, 50), "p99_answer_seconds": pct(answers, 99),
            "seconds_to_last_connect": max(connects, default=0.0),
            "seconds_to_last_welcome": max(welcomes, default=0.0),
            "errors": gen.errors}


async def run_hold(ns: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gen = Gen(loop, ns.clients)
    co = None if ns.no_checkout else checkout_frame(ns.product, ns.version)
    t0 = perf()
    opener = loop.create_task(open_clients(gen, lambda i: CheckoutOnce(gen, i, co), ns.clients, ns.port,
                                           ns.connect_concurrency))
    try:
        await asyncio.wait_for(asyncio.shield(gen.done), ns.timeout)
        timed_out = False
    except TimeoutError:
        timed_out = True
    await asyncio.wait_for(opener, 5)
    ready = {"event": "ready", "mode": "hold", "clients": ns.clients, "outcomes": gen.outcomes,
             "timed_out": timed_out, "seconds": perf() - t0, "errors": gen.errors}
    print(json.dumps(ready), flush=True)
    # Hold every connection until the orchestrator has measured (a line on stdin, or EOF), bounded.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), ns.timeout)
    lost_while_holding = sum(1 for c in gen.clients if c.state == "failed")
    for c in gen.clients:
        c.close()
    await asyncio.sleep(0.1)
    return {"mode": "hold", "failed_while_holding": lost_while_holding, "outcomes": gen.outcomes}


# --------------------------------------------------------------------------- churn
class Window:
    """The measured window of a churn run, shared by every connection."""

    def __init__(self) -> None:
        self.start = float("inf")
        self.end = float("inf")
        self.stop = float("inf")
        self.lat: list[float] = []
        self.requests = 0
        self.cycles = 0
        self.denied = 0
        self.running = 0


class ChurnClient(BaseClient):
    """hello once, then checkout -> checkin -> checkout ... until the window closes (one request in flight)."""

    __slots__ = ("checkout", "running", "sent_at", "w")

    def __init__(self, gen: Gen, i: int, w: Window, checkout: bytes) -> None:
        super().__init__(gen, i)
        self.w = w
        self.sent_at = 0.0
        self.checkout = checkout
        self.running = False

    def welcomed(self) -> None:
        self.state = "idle"
        self.gen.outcome("ready")

    def go(self) -> None:
        if self.state != "idle":
            return
        self.running = True
        self.w.running += 1
        self.send_checkout(perf())

    def send_checkout(self, now: float) -> None:
        self.state = "checkout"
        self.sent_at = now
        assert self.transport is not None
        self.transport.write(self.checkout)

    def stopped(self) -> None:
        if self.running:
            self.running = False
            self.w.running -= 1
            if self.w.running == 0 and not self.gen.done.done():
                self.gen.done.set_result(None)

    def fail(self, why: str) -> None:
        super().fail(why)
        self.stopped()

    def reply(self, msg: dict[str, Any]) -> None:
        now = perf()
        w = self.w
        measured = w.start <= now < w.end
        if measured:
            w.lat.append(now - self.sent_at)
            w.requests += 1
        op = msg["op"]
        t = self.transport
        assert t is not None
        if self.state == "checkout" and op == "granted" and msg["id"] == 2:
            self.state = "checkin"
            self.sent_at = now
            t.write(frame({"op": "checkin", "id": 3, "token": msg["token"]}))
            return
        if self.state == "checkin" and op == "checked_in" and msg["id"] == 3:
            if not msg.get("released"):
                self.fail(f"checkin did not release the seat: {msg!r:.120}")
                return
            if measured:
                w.cycles += 1
        elif self.state == "checkout" and op == "error" and msg["id"] == 2:
            if measured:
                w.denied += 1
            if msg.get("code") != "NO_SEATS":
                self.fail(f"checkout refused: {msg.get('code')}: {msg.get('message')}")
                return
        else:
            self.fail(f"unexpected reply in state {self.state}: {msg!r:.120}")
            return
        if now >= w.stop:
            self.state = "finished"
            self.stopped()
            return
        self.send_checkout(now)


def cpu_seconds(p: psutil.Process | None) -> float:
    if p is None:
        return 0.0
    t = p.cpu_times()
    return float(t.user + t.system)


async def run_churn(ns: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gen = Gen(loop, ns.connections)
    w = Window()
    co = checkout_frame(ns.product, ns.version)
    await asyncio.wait_for(open_clients(
        gen, lambda i: ChurnClient(gen, i, w, co), ns.connections, ns.port,
        ns.connect_concurrency), ns.timeout)
    await asyncio.wait_for(asyncio.shield(gen.done), ns.timeout)
    if gen.outcomes.get("ready", 0) != ns.connections:
        return {"mode": "churn", "connections": ns.connections, "setup_failed": gen.outcomes,
                "errors": gen.errors}
    server = psutil.Process(ns.server_pid) if ns.server_pid else None
    me = psutil.Process()
    gen.done = loop.create_future()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = perf()
        marks[name + "_cpu_self"] = cpu_seconds(me)
        marks[name + "_cpu_server"] = cpu_seconds(server)

    t0 = perf()
    w.start = t0 + ns.warmup
    w.end = w.start + ns.duration
    w.stop = w.end
    loop.call_later(ns.warmup, mark, "start")
    loop.call_later(ns.warmup + ns.duration, mark, "end")
    for c in gen.clients:
        if isinstance(c, ChurnClient):
            c.go()
    try:
        await asyncio.wait_for(asyncio.shield(gen.done), ns.warmup + ns.duration + ns.timeout)
        timed_out = False
    except TimeoutError:
        timed_out = True
    for name in ("start", "end"):  # a loop too busy to run a mark's timer before the clients stopped
        if name not in marks:
            mark(name)
    for c in gen.clients:
        c.close()
    await asyncio.sleep(0.05)
    lat = sorted(w.lat)
    span = marks.get("end", perf()) - marks.get("start", t0)
    cpu_self = marks.get("end_cpu_self", 0.0) - marks.get("start_cpu_self", 0.0)
    cpu_server = marks.get("end_cpu_server", 0.0) - marks.get("start_cpu_server", 0.0)
    return {
        "mode": "churn", "connections": ns.connections, "duration": ns.duration, "warmup": ns.warmup,
        "timed_out": timed_out, "requests": w.requests, "cycles": w.cycles, "denied": w.denied,
        "requests_per_second": w.requests / ns.duration, "cycles_per_second": w.cycles / ns.duration,
        "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "p999_ms": pct(lat, 99.9) * 1000,
        "max_ms": (lat[-1] * 1000 if lat else 0.0),
        "loadgen_cpu_percent": 100 * cpu_self / span if span > 0 else 0.0,
        "server_cpu_us_per_request": 1e6 * cpu_server / w.requests if w.requests else 0.0,
        "loadgen_cpu_us_per_request": 1e6 * cpu_self / w.requests if w.requests else 0.0,
        "server_cpu_percent": 100 * cpu_server / span if span > 0 else 0.0,
        "errors": gen.errors, "outcomes": gen.outcomes,
    }


# --------------------------------------------------------------------------- fill (scaling)
class FillClient(BaseClient):
    """hello, then ``n`` checkouts one after another, cycling over ``frames`` (one per product); keeps them."""

    __slots__ = ("frames", "granted", "n", "sent", "tokens")

    def __init__(self, gen: Gen, i: int, frames: list[bytes], n: int) -> None:
        super().__init__(gen, i)
        self.frames = frames
        self.n = n
        self.sent = 0
        self.granted = 0

    def welcomed(self) -> None:
        self.state = "filling"
        self.next()

    def next(self) -> None:
        if self.sent >= self.n:
            self.state = "holding"
            self.gen.outcome("filled")
            return
        assert self.transport is not None
        # seat k of connection i goes to product (i * n + k) mod P: every product gets the same share
        self.transport.write(self.frames[(self.i * self.n + self.sent) % len(self.frames)])
        self.sent += 1

    def reply(self, msg: dict[str, Any]) -> None:
        if self.state != "filling" or msg.get("op") != "granted":
            self.fail(f"fill: unexpected reply {msg!r:.160} in state {self.state}")
            return
        self.granted += 1
        self.next()


async def run_fill(ns: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gen = Gen(loop, ns.connections)
    products = ns.product.split(",")
    frames = [checkout_frame(p, ns.version) for p in products]
    t0 = perf()
    await asyncio.wait_for(open_clients(gen, lambda i: FillClient(gen, i, frames, ns.per_connection),
                                        ns.connections, ns.port, ns.connect_concurrency), ns.timeout)
    try:
        await asyncio.wait_for(asyncio.shield(gen.done), ns.timeout)
        timed_out = False
    except TimeoutError:
        timed_out = True
    granted = sum(c.granted for c in gen.clients if isinstance(c, FillClient))
    print(json.dumps({"event": "ready", "mode": "fill", "granted": granted, "seconds": perf() - t0,
                      "timed_out": timed_out, "outcomes": gen.outcomes, "errors": gen.errors}), flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), ns.timeout)
    failed = sum(1 for c in gen.clients if c.state == "failed")
    for c in gen.clients:
        c.close()
    await asyncio.sleep(0.1)
    return {"mode": "fill", "granted": granted, "failed_while_holding": failed}


# --------------------------------------------------------------------------- heartbeat storm
class StormClient(CheckoutOnce):
    """Holds one seat and heartbeats it every ``interval`` seconds from the moment it is granted (at its own
    random phase) until ``stop``, as a real client would, whether or not the last ack is back; then checks
    it in. A lease it loses at any point counts, during the setup as well."""

    __slots__ = ("last_sent", "outstanding", "storm")

    def __init__(self, gen: Gen, i: int, checkout: bytes, storm: Storm) -> None:
        super().__init__(gen, i, checkout)
        self.storm = storm
        self.outstanding: deque[float] = deque()
        self.last_sent = 0.0

    def beat(self) -> None:
        st = self.storm
        t = self.transport
        if self.state != "holding" or t is None:
            return
        now = perf()
        if now >= st.stop:
            return
        if self.last_sent:
            gap = now - self.last_sent  # the client's own lateness: a starved load generator shows here
            if gap > st.max_gap:
                st.max_gap = gap
        self.last_sent = now
        self.outstanding.append(now)
        st.sent += 1
        t.write(HEARTBEAT)
        st.loop.call_at(st.loop.time() + st.interval, self.beat)

    def reply(self, msg: dict[str, Any]) -> None:
        st = self.storm
        op = msg.get("op")
        if op == "heartbeat_ack" and self.state == "holding" and self.outstanding:
            now = perf()
            sent_at = self.outstanding.popleft()
            if st.start <= sent_at < st.stop:
                st.lat.append(now - sent_at)
            st.acked += 1
            if msg.get("renewed", 0) < 1 or msg.get("lost"):
                st.lost += 1
                self.fail(f"heartbeat ack renewed {msg.get('renewed')} lost {msg.get('lost')!r:.120}")
            return
        if self.state == "checking_in" and op == "checked_in":
            self.state = "finished"
            st.checked_in += 1
            if msg.get("released"):
                st.released += 1
            if st.checked_in >= st.to_check_in and not st.all_in.done():
                st.all_in.set_result(None)
            return
        if self.state == "checkout":
            super().reply(msg)
            if self.state == "holding":
                st.loop.call_later(st.rng.random() * st.interval, self.beat)
            return
        self.fail(f"unexpected reply {msg!r:.120} in state {self.state}")

    def fail(self, why: str) -> None:
        if self.state == "holding":  # already counted as granted: count the loss, not a second outcome
            self.gen.error(f"client {self.i}: {why}")
            self.state = "failed"
            return
        super().fail(why)

    def check_in(self) -> None:
        if self.state == "holding" and self.transport is not None and self.token:
            self.state = "checking_in"
            self.transport.write(frame({"op": "checkin", "id": 9, "token": self.token}))
            self.storm.to_check_in += 1


HEARTBEAT = frame({"op": "heartbeat", "id": 4, "idle": False})


class Storm:
    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.start = float("inf")
        self.stop = float("inf")
        self.lat: list[float] = []
        self.sent = 0
        self.acked = 0
        self.lost = 0
        self.checked_in = 0
        self.to_check_in = 0
        self.released = 0
        self.max_gap = 0.0
        self.rng = random.Random(1)
        self.all_in: asyncio.Future[None] = loop.create_future()


async def run_storm(ns: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gen = Gen(loop, ns.clients)
    st = Storm(loop, ns.interval)
    co = checkout_frame(ns.product, ns.version)
    t0 = perf()
    await asyncio.wait_for(open_clients(gen, lambda i: StormClient(gen, i, co, st), ns.clients, ns.port,
                                        ns.connect_concurrency), ns.timeout)
    await asyncio.wait_for(asyncio.shield(gen.done), ns.timeout)
    setup_s = perf() - t0
    if gen.outcomes.get("granted", 0) != ns.clients:
        for c in gen.clients:
            c.close()
        return {"mode": "storm", "clients": ns.clients, "setup_failed": gen.outcomes, "errors": gen.errors}
    server = psutil.Process(ns.server_pid) if ns.server_pid else None
    me = psutil.Process()
    rss0 = server.memory_info().rss if server else 0
    st.start = perf() + ns.interval  # every client is beating by now; the window opens after one more interval
    st.stop = st.start + ns.duration
    clients = [c for c in gen.clients if isinstance(c, StormClient)]
    await asyncio.sleep(st.start - perf())
    cpu_s0, cpu_m0, t_a = cpu_seconds(server), cpu_seconds(me), perf()
    await asyncio.sleep(st.stop - perf())
    cpu_s1, cpu_m1, t_b = cpu_seconds(server), cpu_seconds(me), perf()
    rss1 = server.memory_info().rss if server else 0
    # the beats in flight come back; then every client checks its seat in: released must be true for all
    deadline = perf() + ns.timeout
    while any(c.outstanding for c in clients if c.state == "holding") and perf() < deadline:
        await asyncio.sleep(0.05)
    for c in clients:
        c.check_in()
    if st.to_check_in:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(st.all_in), ns.timeout)
    failed = sum(1 for c in clients if c.state == "failed")
    for c in gen.clients:
        c.close()
    await asyncio.sleep(0.1)
    lat = sorted(st.lat)
    span = t_b - t_a
    return {
        "mode": "storm", "clients": ns.clients, "interval": ns.interval, "duration": ns.duration,
        "setup_seconds": setup_s, "heartbeats_sent": st.sent, "heartbeats_acked": st.acked,
        "heartbeats_per_second": len(lat) / ns.duration,
        "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "p999_ms": pct(lat, 99.9) * 1000,
        "max_ms": lat[-1] * 1000 if lat else 0.0,
        "server_cores": (cpu_s1 - cpu_s0) / span, "loadgen_cores": (cpu_m1 - cpu_m0) / span,
        "server_rss_start": rss0, "server_rss_end": rss1,
        "lost_in_acks": st.lost, "clients_failed": failed, "max_client_gap_seconds": st.max_gap,
        "checked_in": st.checked_in,
        "released_at_end": st.released,
        "leases_lost": ns.clients - st.released,
        "errors": gen.errors,
    }


# --------------------------------------------------------------------------- restart
class RestartClient(CheckoutOnce):
    """Holds one seat; when the connection drops, reconnects with backoff, says hello and resumes it."""

    __slots__ = ("attempt", "lost_at", "resumed_at", "rs")

    def __init__(self, gen: Gen, i: int, checkout: bytes, rs: Restarts) -> None:
        super().__init__(gen, i, checkout)
        self.rs = rs
        self.attempt = 0
        self.resumed_at = 0.0
        self.lost_at = 0.0

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state in ("holding", "resuming", "hello_again") and self.rs.reconnect:
            self.state = "reconnecting"
            self.lost_at = self.lost_at or time.monotonic()
            self.transport = None
            self.rs.loop.call_later(self.rs.backoff.delay(self.attempt), self.reconnect)
            return
        super().connection_lost(exc)

    def reconnect(self) -> None:
        self.rs.loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        rs = self.rs
        self.attempt += 1
        try:
            await rs.loop.create_connection(lambda: self, HOST, rs.port)
        except OSError:
            if time.monotonic() < rs.give_up:
                rs.loop.call_later(rs.backoff.delay(self.attempt), self.reconnect)
            else:
                self.fail("gave up reconnecting")
            return

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.state == "reconnecting":
            self.transport = transport  # type: ignore[assignment]
            self.buf = b""
            self.state = "hello_again"
            transport.write(hello_frame(self.i))  # type: ignore[attr-defined]
            return
        super().connection_made(transport)

    def on_msg(self, msg: dict[str, Any]) -> None:
        if self.state == "hello_again":
            if msg.get("op") != "welcome":
                self.fail(f"hello after restart answered with {msg.get('op')} {msg.get('code')}")
                return
            self.state = "resuming"
            assert self.transport is not None
            self.transport.write(frame({"op": "resume", "id": 5, "tokens": [self.token]}))
            return
        if self.state == "resuming":
            if msg.get("op") == "resumed" and self.token in msg.get("resumed", ()):
                self.state = "holding"
                self.resumed_at = time.monotonic()
                self.rs.resumed += 1
            else:
                self.rs.lost += 1
                self.fail(f"resume answered {msg!r:.160}")
            self.rs.answered += 1
            if self.rs.answered >= self.rs.expected and not self.rs.all_done.done():
                self.rs.all_done.set_result(None)
            return
        if self.state == "checking_in":
            if msg.get("op") == "checked_in":
                self.state = "finished"
                self.rs.checked_in += 1
                self.rs.released += bool(msg.get("released"))
                if self.rs.checked_in >= self.rs.expected and not self.rs.all_in.done():
                    self.rs.all_in.set_result(None)
            return
        super().on_msg(msg)


class Restarts:
    def __init__(self, loop: asyncio.AbstractEventLoop, port: int, expected: int, give_up: float) -> None:
        self.loop = loop
        self.port = port
        self.expected = expected
        self.give_up = give_up
        self.backoff = Backoff()  # client_stub's defaults: base 0.2 s, cap 10 s, full jitter
        self.reconnect = True
        self.resumed = 0
        self.lost = 0
        self.answered = 0
        self.checked_in = 0
        self.released = 0
        self.all_done: asyncio.Future[None] = loop.create_future()
        self.all_in: asyncio.Future[None] = loop.create_future()


async def run_restart(ns: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gen = Gen(loop, ns.clients)
    rs = Restarts(loop, ns.port, ns.clients, float("inf"))
    co = checkout_frame(ns.product, ns.version)
    await asyncio.wait_for(open_clients(gen, lambda i: RestartClient(gen, i, co, rs), ns.clients, ns.port,
                                        ns.connect_concurrency), ns.timeout)
    await asyncio.wait_for(asyncio.shield(gen.done), ns.timeout)
    print(json.dumps({"event": "ready", "outcomes": gen.outcomes, "errors": gen.errors}), flush=True)
    rs.give_up = time.monotonic() + ns.timeout
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(rs.all_done), ns.timeout)
    except TimeoutError:
        timed_out = True
    clients = [c for c in gen.clients if isinstance(c, RestartClient)]
    resumed_at = [c.resumed_at for c in clients if c.resumed_at]
    lost_at = [c.lost_at for c in clients if c.lost_at]
    print(json.dumps({"event": "resumed", "resumed": rs.resumed, "lost": rs.lost, "timed_out": timed_out,
                      "first_drop_seen": min(lost_at, default=0.0), "last_resumed": max(resumed_at, default=0.0),
                      "reconnect_attempts": sum(c.attempt for c in clients), "errors": gen.errors}), flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), ns.timeout)
    rs.reconnect = False
    for c in clients:
        if c.state == "holding" and c.transport is not None:
            c.state = "checking_in"
            c.transport.write(frame({"op": "checkin", "id": 9, "token": c.token}))
        else:
            rs.checked_in += 1
    if rs.checked_in < rs.expected:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(rs.all_in), ns.timeout)
    for c in gen.clients:
        c.close()
    await asyncio.sleep(0.1)
    return {"mode": "restart", "checked_in": rs.checked_in, "released_at_end": rs.released}


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("burst", "churn", "hold", "storm", "restart", "fill"))
    p.add_argument("--per-connection", type=int, default=1, help="fill: seats each connection checks out")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--product", required=True, help="the product (fill: a comma-separated list, cycled)")
    p.add_argument("--version", default="1.0")
    p.add_argument("--clients", type=int, default=5000, help="burst and hold: number of clients")
    p.add_argument("--connections", type=int, default=100, help="churn: concurrent connections")
    p.add_argument("--duration", type=float, default=5.0, help="churn and storm: measured seconds")
    p.add_argument("--interval", type=float, default=1.0, help="storm: seconds between a client's heartbeats")
    p.add_argument("--warmup", type=float, default=1.0, help="churn: unmeasured seconds first")
    p.add_argument("--server-pid", type=int, default=0, help="churn: report this process's CPU use")
    p.add_argument("--no-checkout", action="store_true", help="hold: connect and hello only")
    p.add_argument("--connect-concurrency", type=int, default=1000, help="churn/hold: connects in flight")
    p.add_argument("--timeout", type=float, default=60.0, help="bound on every phase, seconds")
    ns = p.parse_args(argv)
    raise_nofile()
    import uvloop

    runner_fn = {"burst": run_burst, "churn": run_churn, "hold": run_hold, "storm": run_storm,
                 "restart": run_restart, "fill": run_fill}[ns.mode]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(runner_fn(ns))
    result["event"] = "done"
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
