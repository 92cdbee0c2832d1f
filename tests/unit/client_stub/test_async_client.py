"""AsyncLicenseClient against a scripted protocol server on real sockets.

Each test makes the server misbehave in one chosen way (late replies, lost seats, silence, dropped
connections, refusals) and checks what the product sees: the exception and its code, ``seat.lost`` and
``on_lost`` (exactly once), and what the client sent (resume by token, checkin of orphaned grants).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
from scripted_server import ScriptedServer, ServerConn

from client_stub import (
    AsyncLicenseClient,
    AsyncSeat,
    LicenseError,
    LicenseLost,
    ProtocolMismatch,
    SeatDenied,
    ServerUnavailable,
)
from client_stub.backoff import Backoff
from protocol import (
    BadRequest,
    Checkin,
    Checkout,
    Connection,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    Hello,
    LostSeat,
    Request,
    Resume,
    Role,
    Status,
    encode_frame,
)
from protocol.validation import MAX_VERSION_LENGTH

Run = Callable[..., Any]
Make = Callable[..., ScriptedServer]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def client(srv: ScriptedServer | str, **kw: Any) -> AsyncLicenseClient:
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("request_timeout", 2.0)
    kw.setdefault("backoff", Backoff(0.02, 0.1))
    return AsyncLicenseClient(srv if isinstance(srv, str) else srv.address, **kw)


class Recorder:
    """An on_lost callback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[AsyncSeat, LicenseLost]] = []
        self.event = asyncio.Event()

    def __call__(self, seat: AsyncSeat, error: LicenseLost) -> None:
        self.calls.append((seat, error))
        self.event.set()


@pytest.mark.parametrize("name", ["設計PC", "pc_01", "-lead", "a..b", "caf\u00e9"])
def test_bad_hostname_is_refused_before_connecting(run: Run, scripted: Make, name: str) -> None:
    async def main() -> None:
        srv = await scripted().start()
        with pytest.raises(LicenseError) as info:
            client(srv, hostname=name)
        err = info.value
        assert err.code is ErrorCode.INVALID_HOSTNAME
        assert "ASCII letters, digits and hyphens" in err.message
        assert repr(name) in err.message
        await asyncio.sleep(0.05)
        assert srv.conns == []
        await srv.stop()

    run(main)


def test_hello_carries_the_identity(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()
        async with client(srv, hostname="pc-01.corp.example", user="山田", client_version="cadpro/2.1") as lm:
            ping = await lm.ping()
            assert ping.server == srv.address and ping.server_version == "scripted-1" and ping.protocol == 1
            assert ping.round_trip >= 0
        hello = srv.of(Hello)[0]
        assert (hello.host, hello.user, hello.client_version, hello.proto) == (
            "pc-01.corp.example", "山田", "cadpro/2.1", (1, 2))
        assert hello.pid > 0 and hello.display and " " not in hello.display
        await srv.stop()

    run(main)


def test_replies_are_matched_by_id(run: Run, scripted: Make) -> None:
    """A checkout answered after a later status: both callers get their own reply."""
    async def main() -> None:
        srv = await scripted().start()
        held: list[tuple[ServerConn, Checkout]] = []

        async def hold_checkouts(conn: ServerConn, req: Request) -> bool:
            if isinstance(req, Checkout):
                held.append((conn, req))
                return True
            return False

        srv.handler = hold_checkouts
        async with client(srv) as lm:
            task = asyncio.create_task(lm.checkout("CADPRO", "2.1", wait=5))
            await srv.wait_for(lambda: bool(held))
            status = await lm.status()
            assert status["server_version"] == "scripted-1"
            assert not task.done()
            conn, req = held[0]
            conn.send(srv.grant(conn, req, waited=0.4))
            seat = await task
            assert seat.held and seat.waited == 0.4 and seat.token in srv.granted
            await seat.checkin()
            assert srv.released == [seat.token]
        await srv.stop()

    run(main)


def test_a_grant_nobody_waits_for_is_checked_in(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()
        held: list[tuple[ServerConn, Checkout]] = []

        async def hold_checkouts(conn: ServerConn, req: Request) -> bool:
            if isinstance(req, Checkout):
                held.append((conn, req))
                return True
            return False

        srv.handler = hold_checkouts
        async with client(srv, request_timeout=0.3) as lm:
            with pytest.raises(ServerUnavailable) as info:
                await lm.checkout("CADPRO", "2.1")
            assert info.value.code is ErrorCode.SERVER_UNAVAILABLE and "CADPRO" in info.value.message
            conn, req = held[0]
            late = srv.grant(conn, req)
            conn.send(late)
            await srv.wait_for(lambda: late.token in srv.released)
        await srv.stop()

    run(main)


def test_a_cancelled_checkout_returns_its_grant(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()
        held: list[tuple[ServerConn, Checkout]] = []

        async def hold_checkouts(conn: ServerConn, req: Request) -> bool:
            if isinstance(req, Checkout):
                held.append((conn, req))
                return True
            return False

        srv.handler = hold_checkouts
        async with client(srv) as lm:
            task = asyncio.create_task(lm.checkout("CADPRO", "2.1", wait=60))
            await srv.wait_for(lambda: bool(held))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            conn, req = held[0]
            late = srv.grant(conn, req)
            conn.send(late)
            await srv.wait_for(lambda: late.token in srv.released)
        await srv.stop()

    run(main)


def test_heartbeats_keep_a_seat_past_the_lease_timeout(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=0.3).start()
        async with client(srv) as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            # 20 heartbeats at 0.05 s span more than three lease timeouts.
            await srv.wait_for(lambda: len(srv.of(Heartbeat)) >= 20)
            assert seat.held and not seat.lost
            assert len(srv.conns) == 1 and not srv.of(Resume)
        await srv.stop()

    run(main)


def test_no_heartbeats_without_seats(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05).start()
        async with client(srv) as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            await srv.wait_for(lambda: len(srv.of(Heartbeat)) >= 2)
            await seat.checkin()
            n = len(srv.of(Heartbeat))
            await asyncio.sleep(0.3)
            assert len(srv.of(Heartbeat)) <= n + 1  # at most one already on its way
        await srv.stop()

    run(main)


def test_server_reported_loss_fires_on_lost_once(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=0.5).start()
        rec = Recorder()
        async with client(srv, on_lost=rec) as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            other = await lm.checkout("CADPRO", "2.1")
            srv.lost_next = [LostSeat(seat.token, ErrorCode.SEAT_REMOVED, "removed by lmremove")]
            await asyncio.wait_for(rec.event.wait(), 5)
            srv.lost_next = [LostSeat(seat.token, ErrorCode.SEAT_REMOVED, "removed again")]
            n = len(srv.of(Heartbeat))
            await srv.wait_for(lambda: len(srv.of(Heartbeat)) >= n + 3)
            assert len(rec.calls) == 1
            lost_seat, error = rec.calls[0]
            assert lost_seat is seat and seat.lost and not other.lost
            assert isinstance(error, LicenseLost) and error.code is ErrorCode.SEAT_REMOVED
            assert seat.lost_reason is error and "removed by lmremove" in str(error)
            await seat.checkin()  # no-op for a lost seat: the server already dropped it
            assert seat.token not in srv.released
        await srv.stop()

    run(main)


def test_per_seat_async_callback_wins(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05).start()
        default = Recorder()
        got: list[ErrorCode] = []
        done = asyncio.Event()

        async def mine(seat: AsyncSeat, error: LicenseLost) -> None:
            await asyncio.sleep(0)
            got.append(error.code)
            done.set()

        async with client(srv, on_lost=default) as lm:
            seat = await lm.checkout("CADPRO", "2.1", on_lost=mine)
            srv.lost_next = [LostSeat(seat.token, ErrorCode.LICENSE_REVOKED, "revoked")]
            await asyncio.wait_for(done.wait(), 5)
        assert got == [ErrorCode.LICENSE_REVOKED] and default.calls == []
        await srv.stop()

    run(main)


def test_a_failing_callback_is_logged_not_fatal(run: Run, scripted: Make, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05).start()

        def boom(seat: AsyncSeat, error: LicenseLost) -> None:
            raise RuntimeError("product bug")

        async with client(srv, on_lost=boom) as lm:
            a = await lm.checkout("CADPRO", "2.1")
            b = await lm.checkout("CADPRO", "2.1")
            srv.lost_next = [LostSeat(a.token, ErrorCode.SEAT_REMOVED, "x")]
            await srv.wait_for(lambda: a.lost)
            n = len(srv.of(Heartbeat))
            await srv.wait_for(lambda: len(srv.of(Heartbeat)) >= n + 2)  # the keeper goes on
            assert b.held
        assert "on_lost callback for CADPRO failed" in caplog.text
        await srv.stop()

    run(main)


def test_silent_server_loses_the_seat_at_the_local_deadline(run: Run, scripted: Make) -> None:
    """A cut-off client must assume its seat is gone after one lease timeout without a renewal."""
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=0.4).start()
        rec = Recorder()
        silent = False

        async def maybe_silent(conn: ServerConn, req: Request) -> bool:
            return silent  # swallow every request (hello included) while silent

        srv.handler = maybe_silent
        async with client(srv, on_lost=rec, connect_timeout=0.3) as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            silent = True
            await asyncio.wait_for(rec.event.wait(), 10)
            assert seat.lost and len(rec.calls) == 1
            assert rec.calls[0][1].code is ErrorCode.LEASE_EXPIRED
            assert "0.4 s" in rec.calls[0][1].message
            # Back to normal: the next connection gives the token back, since the server may still count it.
            silent = False
            await lm.status()
            await srv.wait_for(lambda: seat.token in srv.released)
            assert len(rec.calls) == 1
        await srv.stop()

    run(main)


def test_reconnect_resumes_the_same_token(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=1.0).start()
        rec = Recorder()
        async with client(srv, on_lost=rec) as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            await srv.wait_for(lambda: len(srv.of(Heartbeat)) >= 1)
            srv.conns[0].abort()
            await srv.wait_for(lambda: bool(srv.of(Resume)))
            assert srv.of(Resume)[0].tokens == (seat.token,)
            # Heartbeats continue on the new connection; no second checkout was made.
            await srv.wait_for(lambda: any(n == 2 and isinstance(r, Heartbeat) for n, r in srv.requests))
            assert len(srv.of(Checkout)) == 1 and seat.held and rec.calls == []
            assert srv.of(Hello)[1].host == srv.of(Hello)[0].host  # hello re-done
        await srv.stop()

    run(main)


def test_reconnect_after_server_restart_on_the_same_port(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=2.0).start()
        async with client(srv) as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            port, granted = srv.port, srv.granted
            await srv.stop()
            await asyncio.sleep(0.2)  # a few refused reconnects
            again = scripted(heartbeat=0.05, lease_timeout=2.0)
            again.granted = granted  # the restarted server restored its leases
            await again.start(port)
            await again.wait_for(lambda: bool(again.of(Resume)))
            assert again.of(Resume)[0].tokens == (seat.token,) and not again.of(Checkout)
            await again.wait_for(lambda: bool(again.of(Heartbeat)))
            assert seat.held
        await again.stop()

    run(main)


def test_resume_refused_means_lost(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=1.0).start()
        rec = Recorder()
        async with client(srv, on_lost=rec) as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            srv.granted.clear()  # e.g. the seat lapsed on the server meanwhile
            srv.conns[0].abort()
            await asyncio.wait_for(rec.event.wait(), 5)
            assert seat.lost and rec.calls[0][1].code is ErrorCode.LEASE_NOT_FOUND
        await srv.stop()

    run(main)


def test_failover_to_the_next_server(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()
        dead = closed_port()
        async with client(f"{dead}@127.0.0.1,{srv.address}") as lm:
            seat = await lm.checkout("CADPRO", "2.1")
            assert seat.server == srv.address
        await srv.stop()

    run(main)


def test_nothing_listening(run: Run) -> None:
    async def main() -> None:
        dead = closed_port()
        async with client(f"{dead}@127.0.0.1") as lm:
            with pytest.raises(ServerUnavailable) as info:
                await lm.checkout("CADPRO", "2.1")
        err = info.value
        assert err.code is ErrorCode.SERVER_UNAVAILABLE and err.retryable
        assert f"{dead}@127.0.0.1" in err.message and "lmgrd is running" in str(err)
        # With a list, every server is named.
        other = closed_port()
        async with client(f"{dead}@127.0.0.1,{other}@127.0.0.1") as lm:
            with pytest.raises(ServerUnavailable) as info:
                await lm.status()
        assert info.value.code is ErrorCode.SERVER_UNAVAILABLE
        assert f"{dead}@127.0.0.1" in info.value.message and f"{other}@127.0.0.1" in info.value.message

    run(main)


def test_no_welcome_within_connect_timeout(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()
        srv.welcome = False
        async with client(srv, connect_timeout=0.2) as lm:
            with pytest.raises(ServerUnavailable, match=r"no handshake from the license server .* within 0\.2 s"):
                await lm.status()
        await srv.stop()

    run(main)


@pytest.mark.parametrize(("code", "cls", "conn_level"), [
    (ErrorCode.TOO_MANY_CONNECTIONS, ServerUnavailable, True),
    (ErrorCode.HANDSHAKE_TIMEOUT, ServerUnavailable, True),
    (ErrorCode.UNSUPPORTED_PROTOCOL, ProtocolMismatch, False),
    (ErrorCode.INVALID_HOSTNAME, LicenseError, False),
])
def test_hello_refused(run: Run, scripted: Make, code: ErrorCode, cls: type[LicenseError], conn_level: bool) -> None:
    async def main() -> None:
        srv = await scripted().start()

        async def refuse(conn: ServerConn, req: Request) -> bool:
            if isinstance(req, Hello):
                conn.send(ErrorReply(0 if conn_level else req.id, code, "refused by the test", "do X"))
                conn.abort()
                return True
            return False

        srv.handler = refuse
        async with client(srv) as lm:
            with pytest.raises(LicenseError) as info:
                await lm.checkout("CADPRO", "2.1")
        assert type(info.value) is cls and info.value.code is code
        assert "refused by the test" in info.value.message and info.value.hint == "do X"
        await srv.stop()

    run(main)


@pytest.mark.parametrize("code", [ErrorCode.NO_SEATS, ErrorCode.UNKNOWN_PRODUCT, ErrorCode.VERSION_NOT_PERMITTED])
def test_checkout_refused_is_seat_denied(run: Run, scripted: Make, code: ErrorCode) -> None:
    async def main() -> None:
        srv = await scripted().start()

        async def deny(conn: ServerConn, req: Request) -> bool:
            if isinstance(req, Checkout):
                conn.send(ErrorReply(req.id, code, "no, by the test"))
                return True
            return False

        srv.handler = deny
        async with client(srv) as lm:
            with pytest.raises(SeatDenied) as info:
                await lm.checkout("CADPRO", "2.1")
            assert info.value.code is code and not info.value.retryable
            assert str(info.value).startswith(f"{code}: no, by the test. What to do: ")
            assert (await lm.status())["server_version"] == "scripted-1"  # the connection stays usable
        await srv.stop()

    run(main)


@pytest.mark.parametrize(("args", "words"), [
    (("bad name", "2.1"), "product name"),
    (("CADPRO", "two"), "not a dotted version"),
    (("CADPRO", "2.1", -1), "wait must be"),
    (("CADPRO", "2.1", True), "wait must be"),
])
def test_bad_arguments_are_refused_locally(run: Run, scripted: Make, args: tuple[Any, ...], words: str) -> None:
    async def main() -> None:
        srv = await scripted().start()
        async with client(srv) as lm:
            with pytest.raises(LicenseError) as info:
                await lm.checkout(*args)
        assert info.value.code is ErrorCode.BAD_REQUEST and words in info.value.message
        assert srv.conns == []
        await srv.stop()

    run(main)


def test_close_checks_in_and_ends_the_client(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05).start()
        rec = Recorder()
        lm = client(srv, on_lost=rec)
        a = await lm.checkout("CADPRO", "2.1")
        b = await lm.checkout("CADPRO", "2.1")
        await lm.close()
        assert sorted(srv.released) == sorted([a.token, b.token])
        assert a.released and b.released and not a.lost and rec.calls == []
        with pytest.raises(LicenseError, match="closed"):
            await lm.checkout("CADPRO", "2.1")
        await lm.close()  # idempotent
        await srv.stop()

    run(main)


def test_seat_context_managers(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()
        async with client(srv) as lm:
            async with lm.seat("CADPRO", "2.1") as s1:
                assert s1.held
            async with await lm.checkout("CADPRO", "2.1") as s2:
                assert s2.held
            assert srv.released == [s1.token, s2.token]
            assert not s1.held and s1.released
        await srv.stop()

    run(main)


def test_malformed_reply_is_a_protocol_mismatch(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted().start()

        async def garbage(conn: ServerConn, req: Request) -> bool:
            if isinstance(req, Status):
                conn.writer.write(b"\x00\x00\x00\x02\x93\x01")  # a msgpack array, not a map
                return True
            return False

        srv.handler = garbage
        async with client(srv) as lm:
            with pytest.raises(ProtocolMismatch) as info:
                await lm.status()
        assert "invalid message" in info.value.message
        await srv.stop()

    run(main)


def test_checkin_while_disconnected_is_sent_on_the_next_connection(run: Run, scripted: Make) -> None:
    async def main() -> None:
        srv = await scripted(heartbeat=0.05, lease_timeout=5.0).start()
        async with client(srv) as lm:
            a = await lm.checkout("CADPRO", "2.1")
            b = await lm.checkout("CADPRO", "2.1")
            port, granted = srv.port, srv.granted
            await srv.stop()
            await a.checkin()  # does not raise although no server answers
            assert a.released
            again = scripted(heartbeat=0.05, lease_timeout=5.0)
            again.granted = granted
            await again.start(port)
            await again.wait_for(lambda: a.token in again.released)
            assert again.of(Resume)[0].tokens == (b.token,)
            assert isinstance(again.of(Checkin)[0], Checkin)
        await again.stop()

    run(main)


def _version(length: int) -> str:
    v = "1." * ((length - 1) // 2) + "1" * (1 + (length - 1) % 2)
    assert len(v) == length
    return v


@pytest.mark.parametrize("length", [1, 32, 33, 40, 64])
def test_a_version_gets_the_same_verdict_from_the_client_and_the_server(run: Run, scripted: Make, length: int) -> None:
    """The client's local check and the server's schema agree on every version length (one limit)."""
    version = _version(length)
    server_side = Connection(Role.SERVER)
    server_side.receive_data(encode_frame(Hello(1, (1,), "pc1", "a", 1, "", "").to_wire()))
    (event,) = server_side.receive_data(encode_frame(Checkout(2, "CADPRO", version).to_wire()))
    server_accepts = isinstance(event, Checkout)
    if not server_accepts:
        assert isinstance(event, BadRequest) and event.error.code is ErrorCode.BAD_REQUEST

    async def main() -> bool:
        srv = await scripted().start()
        try:
            async with client(srv) as lm:
                try:
                    seat = await lm.checkout("CADPRO", version)
                except LicenseError as exc:
                    # Refused here, before any connection: the server never had to say no.
                    assert exc.code is ErrorCode.BAD_REQUEST and srv.conns == [], exc
                    return False
                assert srv.of(Checkout)[0].version == version
                await seat.checkin()
                return True
        finally:
            await srv.stop()

    assert run(main) is server_accepts is (length <= MAX_VERSION_LENGTH)
