"""Slow-connection attacks and honest clients on one asyncio loop: what tests/integration/test_slowloris.py asserts
and benchmarks/slowloris.py measures (issue 9).

Against the license port: ``silent`` connections that never send a byte and ``trickle`` connections that send a
hello one byte per ``trickle_interval`` (never finishing it within the handshake timeout), while ``honest``
clients each connect, say hello, check a seat out, heartbeat and check it in, timing every round trip. Against
the monitoring port: the same two kinds of slow HTTP connection (a request head that never comes or comes a
byte at a time) while honest clients GET ``/healthz``. Every wait is bounded; nothing here asserts time.

Imports only ``protocol`` (and the standard library), so both the tests and the benchmark can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from protocol import (
    CheckedIn,
    Checkin,
    Checkout,
    Connection,
    ErrorCode,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Role,
    Welcome,
    encode_frame,
)
from protocol.framing import FrameDecoder

#: A hello as a trickler sends it, a byte at a time (it never gets to the end within any sane timeout).
TRICKLED_HELLO = encode_frame(Hello(1, (1,), "trickler", "slow", 1, "slowloris", "").to_wire())
TRICKLED_HEAD = b"GET /healthz HTTP/1.1\r\nHost: lmgrd\r\nX-Slow: " + b"a" * 4000 + b"\r\n\r\n"


class SlowConnection(asyncio.Protocol):
    """One attacking connection: remembers what the server sent and when it closed the connection."""

    def __init__(self, opened: list[SlowConnection]) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = b""
        self.closed_at: float | None = None
        self.connected_at = 0.0
        opened.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connected_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_at = time.monotonic()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def error_code(self) -> str | None:
        """The code of the error frame the server sent before closing, if it sent one."""
        try:
            msgs = FrameDecoder().feed(self.received)
        except Exception:
            return None
        return str(msgs[0].get("code")) if msgs and msgs[0].get("op") == "error" else None


async def open_slow(host: str, port: int, n: int, concurrency: int = 200) -> list[SlowConnection]:
    """Open ``n`` connections (at most ``concurrency`` connects in flight); failed connects are not returned."""
    loop = asyncio.get_running_loop()
    opened: list[SlowConnection] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            with contextlib.suppress(OSError):
                await asyncio.wait_for(loop.create_connection(lambda: SlowConnection(opened), host, port), 30)

    await asyncio.gather(*(one() for _ in range(n)))
    return [c for c in opened if c.transport is not None]


async def trickle(conns: list[SlowConnection], payload: bytes, interval: float, stop: asyncio.Event) -> int:
    """Send ``payload`` one byte per ``interval`` to each open connection until ``stop``; returns bytes sent."""
    sent = 0
    for i in range(len(payload)):
        for c in conns:
            if c.closed_at is None:
                c.send(payload[i:i + 1])
                sent += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set() or all(c.closed_at is not None for c in conns):
            break
    return sent


@dataclass
class Honest:
    """What the honest clients saw: every request's round trip, and each failure with its reason."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def p(self, q: float) -> float | None:
        if not self.latencies:
            return None
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": len(self.failures), "requests": len(self.latencies),
                "p50_ms": _ms(self.p(0.50)), "p99_ms": _ms(self.p(0.99)), "max_ms": _ms(self.p(1.0)),
                "failures": self.failures[:5]}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection, req: Any,
                   out: Honest) -> Any:
    t0 = time.perf_counter()
    writer.write(conn.send(req))
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        replies = conn.receive_data(data)
        if replies:
            out.latencies.append(time.perf_counter() - t0)
            return replies[0]


async def honest_license_client(host: str, port: int, i: int, product: str, version: str, heartbeats: int,
                                out: Honest, timeout: float = 30.0) -> None:
    """Connect, hello, check out, heartbeat ``heartbeats`` times, check in; one ``ok`` if every answer was right."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                conn = Connection(Role.CLIENT)
                w = await _request(reader, writer, conn, Hello(1, (1,), "honest", f"u{i}", os.getpid(), "t", ""), out)
                if not isinstance(w, Welcome):
                    raise AssertionError(f"hello: {w}")
                g = await _request(reader, writer, conn, Checkout(2, product, version, 0.0), out)
                if not isinstance(g, Granted):
                    raise AssertionError(f"checkout: {g}")
                for k in range(heartbeats):
                    ack = await _request(reader, writer, conn, Heartbeat(3 + k), out)
                    if not isinstance(ack, HeartbeatAck) or ack.renewed != 1 or ack.lost:
                        raise AssertionError(f"heartbeat: {ack}")
                done = await _request(reader, writer, conn, Checkin(3 + heartbeats, g.token), out)
                if not isinstance(done, CheckedIn) or not done.released:
                    raise AssertionError(f"checkin: {done}")
                out.ok += 1
            finally:
                writer.close()
    except (AssertionError, OSError, TimeoutError, ConnectionError) as exc:
        out.failures.append(f"client {i}: {type(exc).__name__}: {exc}"[:300])


async def honest_http_client(host: str, port: int, i: int, requests: int, out: Honest,
                             timeout: float = 30.0) -> None:
    """``requests`` GET /healthz, each on a new connection; one ``ok`` if every answer was 200 ok."""
    try:
        async with asyncio.timeout(timeout):
            for _ in range(requests):
                t0 = time.perf_counter()
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: lmgrd\r\nConnection: close\r\n\r\n")
                    raw = await reader.read(-1)
                finally:
                    writer.close()
                out.latencies.append(time.perf_counter() - t0)
                if not raw.startswith(b"HTTP/1.1 200 ") or not raw.endswith(b"\r\n\r\nok\n"):
                    raise AssertionError(f"answer: {raw[:200]!r}")
            out.ok += 1
    except (AssertionError, OSError, TimeoutError) as exc:
        out.failures.append(f"client {i}: {type(exc).__name__}: {exc}"[:300])


@dataclass
class Attack:
    """The slow connections of one run and what became of them."""

    silent: list[SlowConnection]
    trickling: list[SlowConnection]
    trickled_bytes: int = 0

    def all(self) -> list[SlowConnection]:
        return self.silent + self.trickling

    def summary(self) -> dict[str, Any]:
        every = self.all()
        closed = [c for c in every if c.closed_at is not None]
        held = sorted(c.closed_at - c.connected_at for c in closed if c.closed_at is not None)
        return {"silent": len(self.silent), "trickling": len(self.trickling), "dropped": len(closed),
                "still_open": len(every) - len(closed), "trickled_bytes": self.trickled_bytes,
                "handshake_timeout_replies": sum(c.error_code() == str(ErrorCode.HANDSHAKE_TIMEOUT) for c in every),
                "held_s_min": round(held[0], 3) if held else None,
                "held_s_max": round(held[-1], 3) if held else None}


async def run_attack(host: str, port: int, *, silent: int, trickling: int, payload: bytes, trickle_interval: float,
                     honest: Any, honest_clients: int, drop_within: float) -> tuple[Attack, Honest]:
    """Open the slow connections, run ``honest(i, out)`` for ``honest_clients`` clients meanwhile, then wait (at
    most ``drop_within`` seconds after the last slow connect) for the server to drop every slow connection."""
    attack = Attack(await open_slow(host, port, silent), await open_slow(host, port, trickling))
    stop = asyncio.Event()
    trickler = asyncio.ensure_future(trickle(attack.trickling, payload, trickle_interval, stop))
    out = Honest()
    await asyncio.gather(*(honest(i, out) for i in range(honest_clients)))
    deadline = time.monotonic() + drop_within
    while time.monotonic() < deadline and any(c.closed_at is None for c in attack.all()):
        await asyncio.sleep(0.05)
    stop.set()
    attack.trickled_bytes = await trickler
    for c in attack.all():
        c.close()
    return attack, out

