"""LicenseClient, the blocking facade: same behaviour as the async client, run on a private loop thread."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from typing import Any

import pytest
from scripted_server import ScriptedServer

from client_stub import LicenseClient, LicenseError, LicenseLost, Seat, SeatDenied
from client_stub.backoff import Backoff
from protocol import Checkin, ErrorCode, LostSeat

Run = Callable[..., Any]
Make = Callable[..., ScriptedServer]


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name == "client_stub-loop"}


def test_blocking_checkout_and_on_lost(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=1.0).start()
        loop = asyncio.get_running_loop()

        def product() -> None:
            calls: list[tuple[Seat, LicenseLost, str]] = []
            refused: list[RuntimeError] = []
            fired = threading.Event()

            def on_lost(seat: Seat, error: LicenseLost) -> None:
                calls.append((seat, error, threading.current_thread().name))
                seat.checkin()  # allowed: a lost seat has nothing to tell the server
                try:
                    lm.status()
                except RuntimeError as exc:
                    refused.append(exc)
                fired.set()

            with LicenseClient(srv.address, on_lost=on_lost, backoff=Backoff(0.02, 0.1)) as lm:
                assert lm.ping().server_version == "scripted-1"
                assert lm.status()["server_version"] == "scripted-1"
                with lm.checkout("CADPRO", version="2.1", wait=30) as seat:
                    assert seat.token in srv.granted and not seat.lost and not seat.nodelocked
                    lost = [LostSeat(seat.token, ErrorCode.SEAT_REMOVED, "removed")]
                    loop.call_soon_threadsafe(setattr, srv, "lost_next", lost)
                    assert fired.wait(10)
                    assert seat.lost and seat.lost_reason is not None
                    assert seat.lost_reason.code is ErrorCode.SEAT_REMOVED
                with lm.checkout("CADPRO", "2.1") as other:
                    token = other.token
                assert other.released
            assert len(calls) == 1 and calls[0][0] is seat and calls[0][2] == "client_stub-loop"
            assert refused and "on_lost callback" in str(refused[0])
            assert token in srv.released and seat.token not in srv.released

        await asyncio.to_thread(product)
        await srv.stop()

    run(main)


def test_errors_cross_the_thread(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()

        def product() -> None:
            with LicenseClient(srv.address) as lm, pytest.raises(LicenseError) as info:
                lm.checkout("bad name", "2.1")
            assert info.value.code is ErrorCode.BAD_REQUEST

        await asyncio.to_thread(product)
        await srv.stop()

    run(main)


def test_refused_construction_leaves_no_thread() -> None:
    before = _threads()
    with pytest.raises(LicenseError) as info:
        LicenseClient("27000@127.0.0.1", hostname="設計PC")
    assert info.value.code is ErrorCode.INVALID_HOSTNAME
    assert _threads() == before


def test_close_stops_the_thread_and_is_idempotent(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()

        def product() -> None:
            lm = LicenseClient(srv.address)
            seat = lm.checkout("CADPRO", "2.1")
            lm.close()
            lm.close()
            assert seat.released and lm.closed
            with pytest.raises(RuntimeError, match="closed"):
                lm.status()

        before = _threads()
        await asyncio.to_thread(product)
        assert _threads() == before
        assert len(srv.of(Checkin)) == 1
        await srv.stop()

    run(main)


def test_a_forgotten_client_checks_in_when_collected(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()

        def product() -> str:
            lm = LicenseClient(srv.address)
            token: str = lm.checkout("CADPRO", "2.1").token
            del lm
            gc.collect()
            return token

        token = await asyncio.to_thread(product)
        await srv.wait_for(lambda: token in srv.released)
        await srv.stop()

    run(main)


def test_seat_context_manager_and_denial(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()
        from scripted_server import ServerConn

        from protocol import Checkout, ErrorReply, Request

        async def deny_second(conn: ServerConn, req: Request) -> bool:
            if isinstance(req, Checkout) and len(srv.of(Checkout)) > 1:
                conn.send(ErrorReply(req.id, ErrorCode.NO_SEATS, "all 1 seat(s) of CADPRO are in use"))
                return True
            return False

        srv.handler = deny_second

        def product() -> None:
            with LicenseClient(srv.address) as lm, lm.seat("CADPRO", "2.1") as seat:
                assert seat.product == "CADPRO" and seat.version == "2.1" and seat.customer_id
                with pytest.raises(SeatDenied) as info:
                    lm.checkout("CADPRO", "2.1")
                assert info.value.code is ErrorCode.NO_SEATS

        await asyncio.to_thread(product)
        await srv.stop()

    run(main)
