"""The client stub against the real daemon subprocess: checkout, queueing, heartbeats, resume, loss.

Real ``lmgrd`` (``tests/harness.py``) on 127.0.0.1 with a 1 s heartbeat; real signals (SIGKILL, SIGSTOP,
SIGCONT, SIGTERM). Nothing is mocked. Waits are bounded polls of observable state, never wall-time asserts.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import pytest
from harness import Daemon, Factory, wait_until

from client_stub import (
    AsyncLicenseClient,
    AsyncSeat,
    LicenseClient,
    LicenseError,
    LicenseLost,
    Seat,
    SeatDenied,
    ServerUnavailable,
)
from client_stub.aio import RATE_RETRIES
from client_stub.backoff import Backoff
from protocol import ErrorCode


def in_use(lm: LicenseClient, product: str = "CADPRO") -> int:
    pools: Any = lm.status()["pools"]
    return sum(int(p["in_use"]) for p in pools if p["product"] == product)


def quick(d: Daemon, **kw: Any) -> LicenseClient:
    kw.setdefault("backoff", Backoff(0.05, 0.5))
    kw.setdefault("connect_timeout", 3.0)
    return LicenseClient(d.address, **kw)


class LostRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Seat, LicenseLost]] = []
        self.fired = threading.Event()

    def __call__(self, seat: Seat, error: LicenseLost) -> None:
        self.calls.append((seat, error))
        self.fired.set()


def test_sync_checkout_and_checkin(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),))
    with LicenseClient(d.address) as lm:
        with lm.checkout("CADPRO", version="2.1", wait=30) as seat:
            assert len(seat.token) >= 32 and seat.customer_id.startswith("CID-")
            assert seat.lease_timeout == 3.0 and seat.heartbeat_interval == 1.0
            assert in_use(lm) == 1
        assert seat.released and in_use(lm) == 0
        with pytest.raises(SeatDenied) as info:
            lm.checkout("CADPRO", version="3.0")
        assert info.value.code is ErrorCode.VERSION_NOT_PERMITTED
        with pytest.raises(SeatDenied) as info:
            lm.checkout("NOPE", version="1")
        assert info.value.code is ErrorCode.UNKNOWN_PRODUCT
        ping = lm.ping()
        assert ping.server == d.address and ping.protocol == 2 and ping.round_trip >= 0
    assert "IN CADPRO" in d.log()


def test_async_checkout_and_checkin(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    loop_errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
        async with AsyncLicenseClient(d.address, user="alice") as a, AsyncLicenseClient(d.address, user="bob") as b:
            async with a.seat("CADPRO", "2.1") as seat:
                assert seat.held
                with pytest.raises(SeatDenied) as info:
                    await b.checkout("CADPRO", "2.1")
                assert info.value.code is ErrorCode.NO_SEATS and "What to do: " in str(info.value)
            async with await b.checkout("CADPRO", "2.1") as other:
                assert other.held and other.token != seat.token

    asyncio.run(main(), debug=True)
    assert not loop_errors


def test_wait_in_queue(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    granted: list[AsyncSeat] = []

    async def main() -> None:
        async with AsyncLicenseClient(d.address, user="alice") as a, AsyncLicenseClient(d.address, user="bob") as b:
            first = await a.checkout("CADPRO", "2.1")
            waiter = asyncio.create_task(b.checkout("CADPRO", "2.1", wait=20))
            # The queued checkout does not block other requests on the same connection.
            for _ in range(200):
                pools: Any = (await b.status())["pools"]
                if pools[0]["queued"] == 1:
                    break
                await asyncio.sleep(0.05)
            assert pools[0]["queued"] == 1 and not waiter.done()
            await first.checkin()
            seat = await waiter
            granted.append(seat)
            assert seat.held and seat.waited > 0

    asyncio.run(main())
    assert granted


def test_heartbeats_keep_a_seat_past_the_lease_timeout(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), heartbeat=1.0, lease_timeout=3.0)
    rec = LostRecorder()
    with quick(d, on_lost=rec) as lm, lm.checkout("CADPRO", "2.1") as seat:
        start = time.monotonic()
        # Two and a half lease timeouts (bounded poll; the check is on state, not on time).
        while time.monotonic() - start < 7.5:
            time.sleep(0.25)
            assert not seat.lost
        assert in_use(lm) == 1 and not rec.calls
    assert "EXPIRED" not in d.log()


def test_resume_after_sigkill_and_restart(daemon_factory: Factory) -> None:
    # A 6 s lease leaves room for a slow restart of the daemon on a busy machine.
    d = daemon_factory((("CADPRO", "2.1", 2),), heartbeat=1.0, lease_timeout=6.0)
    rec = LostRecorder()
    with quick(d, on_lost=rec) as lm, lm.checkout("CADPRO", "2.1") as seat:
        token = seat.token
        d.kill()
        d.start()
        d.wait_for_log(r"RESUME .*: 1 seat\(s\) resumed, 0 lost")
        assert seat.token == token and not seat.lost
        # The restored lease is the resumed one: past a whole lease timeout it is still held (an
        # unresumed restored lease would have expired), and it is the only seat taken.
        time.sleep(7.0)
        assert not seat.lost and not rec.calls
        assert in_use(lm) == 1
        assert d.log().count("OUT CADPRO") == 1
    wait_until(lambda: "IN CADPRO" in d.new_log(), what="checkin after resume")


def test_resume_after_graceful_restart(daemon_factory: Factory) -> None:
    # A lease longer than a restart takes on a loaded machine: the test is about the resume, not the timeout.
    d = daemon_factory((("CADPRO", "2.1", 1),), heartbeat=1.0, lease_timeout=60.0)
    with quick(d) as lm, lm.checkout("CADPRO", "2.1") as seat:
        assert d.stop() == 0  # SIGTERM: the client is told SHUTTING_DOWN and keeps its seat
        d.start()
        d.wait_for_log(r"RESUME .*: 1 seat\(s\) resumed, 0 lost", timeout=60)
        assert seat.held and in_use(lm) == 1


def test_seat_lost_when_the_daemon_is_stopped_past_the_lease_timeout(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), heartbeat=1.0, lease_timeout=3.0)
    rec = LostRecorder()
    with quick(d, on_lost=rec) as lm:
        seat = lm.checkout("CADPRO", "2.1")
        d.signal(signal.SIGSTOP)
        try:
            assert rec.fired.wait(15), "on_lost did not fire while the daemon was stopped"
        finally:
            d.signal(signal.SIGCONT)
        assert seat.lost and len(rec.calls) == 1 and rec.calls[0][0] is seat
        error = rec.calls[0][1]
        assert error.code is ErrorCode.LEASE_EXPIRED and "3 s" in error.message
        # The daemon is back: the given-up seat is freed (checked in by the client or expired by the
        # server) and can be checked out again; on_lost does not fire a second time.
        wait_until(lambda: in_use(lm) == 0, what="the lost seat to be freed")
        with lm.checkout("CADPRO", "2.1") as again:
            assert again.held and again.token != seat.token
        assert len(rec.calls) == 1


def test_non_ascii_hostname_is_refused_before_connecting(daemon_factory: Factory) -> None:
    d = daemon_factory()
    for cls in (LicenseClient, AsyncLicenseClient):
        with pytest.raises(LicenseError) as info:
            cls(d.address, hostname="設計PC")
        assert info.value.code is ErrorCode.INVALID_HOSTNAME
        assert "ASCII letters, digits and hyphens" in info.value.message
    time.sleep(0.2)
    assert "hello from" not in d.log()


def test_hostname_override_is_sent(daemon_factory: Factory) -> None:
    d = daemon_factory()
    with LicenseClient(d.address, hostname="ts-01", user="carol") as lm:
        lm.ping()
    d.wait_for_log(r"hello from carol@ts-01")


class Ceiling:
    """An rng at the top of the jitter range, so each backoff delay is its ceiling (reproducible waits)."""

    def random(self) -> float:
        return 0.999


def rate_retries(caplog: pytest.LogCaptureFixture) -> int:
    return sum("refused" in r.getMessage() and "for rate" in r.getMessage() for r in caplog.records)


def test_requests_refused_for_rate_are_sent_again_after_a_backoff(daemon_factory: Factory,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    # 2 requests a second, bursts of 4: hello and three more are served at once, the rest are refused
    # RATE_LIMITED until the allowance refills; the client backs off and sends them again.
    d = daemon_factory((("CADPRO", "2.1", 1),), extra=["--max-requests-per-second", "2"])
    caplog.set_level("INFO", logger="client_stub")
    with LicenseClient(d.address, backoff=Backoff(0.3, 2.0, rng=Ceiling())) as lm:
        for _ in range(6):
            assert in_use(lm) == 0
        with lm.checkout("CADPRO", "2.1") as seat:
            assert seat.held and in_use(lm) == 1
        assert in_use(lm) == 0  # the checkin went through as well
    assert rate_retries(caplog) >= 1, "no request was refused: the test did not exercise the retry"
    assert "rate limit:" in d.log()


def test_a_client_refused_for_rate_gives_up_after_a_bounded_number_of_retries(
        daemon_factory: Factory, caplog: pytest.LogCaptureFixture) -> None:
    # One request per 100 s: hello takes the whole allowance, so everything after it is refused.
    d = daemon_factory((("CADPRO", "2.1", 1),), extra=["--max-requests-per-second", "0.01"])
    caplog.set_level("INFO", logger="client_stub")
    with LicenseClient(d.address, backoff=Backoff(0.01, 0.05)) as lm, pytest.raises(ServerUnavailable) as info:
        lm.status()
    assert info.value.code is ErrorCode.RATE_LIMITED and info.value.retryable
    assert rate_retries(caplog) == RATE_RETRIES
