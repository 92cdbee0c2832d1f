"""The client side of leases bound to their holder (issue 9), against the scripted server over real sockets.

The client sends one secret of its own in every hello (the same on each reconnect); it reads a heartbeat
ack's ``renewed`` as well as its ``lost``: a seat the server stopped renewing without saying so is checked
(a resume on the same connection) and, if it is gone, reported lost (``on_lost``, ``seat.held`` False).
A heartbeat refused RATE_LIMITED costs no seat.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from scripted_server import ScriptedServer, ServerConn
from test_async_client import Recorder, client

from protocol import ErrorCode, ErrorReply, Heartbeat, HeartbeatAck, Hello, Request, Resume
from protocol.validation import MIN_SECRET_LENGTH

Run = Callable[..., Any]
Make = Callable[..., ScriptedServer]


def test_every_hello_carries_the_same_secret_of_this_client(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=0.5).start()
        async with client(srv) as lm, client(srv) as other:
            seat = await lm.checkout("CADPRO", "2.1")
            await other.ping()
            srv.conns[0].abort()  # a reconnect: the same secret again, and the seat resumed
            await srv.wait_for(lambda: len(srv.of(Resume)) >= 1)
            assert seat.held
        hellos = srv.of(Hello)
        assert all(h.proto == (1, 2) and len(h.secret) >= MIN_SECRET_LENGTH for h in hellos)
        mine = [h.secret for h in hellos if h.pid == hellos[0].pid]
        assert len(set(mine)) == 2  # two clients, two secrets; each client the same on every connection
        assert len(hellos) == 3
        first = hellos[0].secret
        assert [h.secret for h in hellos].count(first) == 2
        assert "secret" not in repr(hellos[0])
        await srv.stop()

    run(main)


def test_a_seat_the_server_stopped_renewing_unannounced_is_reported_lost(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=2.0).start()
        rec = Recorder()
        taken: set[str] = set()

        async def handler(conn: ServerConn, req: Request) -> bool:
            # An older or buggy server (or a seat taken over elsewhere): the lease is no longer this
            # connection's, and neither `lost` nor anything else says so; only `renewed` shows it.
            if isinstance(req, Heartbeat) and taken:
                conn.tokens -= taken
                srv.granted -= taken
                conn.send(HeartbeatAck(req.id, len(conn.tokens), ()))
                return True
            return False

        srv.handler = handler
        async with client(srv, on_lost=rec) as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            kept = await lm.checkout("CADPRO", "2.1")
            taken.add(seat.token)
            await asyncio.wait_for(rec.event.wait(), 5)  # well before the 2 s lease timeout could pass
            assert not seat.held and seat.lost_reason is not None
            assert seat.lost_reason.code is ErrorCode.LEASE_NOT_FOUND
            assert kept.held and [s for s, _ in rec.calls] == [seat]
            assert [set(r.tokens) for r in srv.of(Resume)] == [{seat.token, kept.token}]
            n = len(srv.of(Heartbeat))
            await srv.wait_for(lambda: len(srv.of(Heartbeat)) >= n + 3)
            assert kept.held and len(srv.of(Resume)) == 1  # the counts agree again: no more checks
        await srv.stop()

    run(main)


def test_a_rate_limited_heartbeat_costs_no_seat(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=1.0).start()
        rec = Recorder()
        refused = 0

        async def handler(conn: ServerConn, req: Request) -> bool:
            nonlocal refused
            if isinstance(req, Heartbeat) and refused < 3:
                refused += 1
                conn.send(ErrorReply(req.id, ErrorCode.RATE_LIMITED, "too many requests", "slow down"))
                return True
            return False

        srv.handler = handler
        async with client(srv, on_lost=rec) as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            await srv.wait_for(lambda: len(srv.of(Heartbeat)) >= 6)
            assert seat.held and not rec.calls
        await srv.stop()

    run(main)
