"""Keep the client's seats alive: heartbeats, local lease deadlines, reconnect with backoff, resume by token.

Imports ``protocol``, ``client_stub.errors`` and ``client_stub.backoff``; never ``lmgrd``. One
:class:`LeaseKeeper` per client runs one asyncio task and one timer:

* the task sends ``Heartbeat`` every ``heartbeat_interval`` (the server's, announced in ``welcome``) while
  seats are held; a heartbeat renews every lease of the connection. When the connection is gone it
  reconnects with capped, jittered backoff, trying each server of the list in order; the client's
  connect step re-does ``hello`` and sends ``Resume`` with the held tokens (see :meth:`LeaseKeeper.resume`),
  which never takes a second seat;
* the timer is armed at the earliest local deadline. A seat's deadline is the send time of the last
  heartbeat (or checkout, or resume) the server acknowledged, plus the lease timeout: the server cannot
  have renewed the lease later than that, so when the deadline passes with no newer acknowledgement a
  cut-off client must assume the seat is gone (the etcd ``deadlineLoop`` rule).

A seat is LOST when the server says so (``lost`` in a heartbeat or resume reply: LEASE_EXPIRED,
SEAT_REMOVED, LEASE_NOT_FOUND, LICENSE_REVOKED, ...) or when its local deadline passes. Then
``seat.lost`` becomes true and its ``on_lost(seat, error)`` runs exactly once. A token given up locally
is checked in on the next connection, so a server that merely stalled does not keep a seat the product
no longer uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Protocol

from client_stub.backoff import Backoff
from client_stub.errors import LicenseError, LicenseLost, ProtocolMismatch, ServerUnavailable, error_for
from protocol import (
    Checkin,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    LostSeat,
    Reply,
    Request,
    Resume,
    Resumed,
    Welcome,
)

if TYPE_CHECKING:
    from client_stub.aio import AsyncSeat

__all__ = ["Connection", "LeaseKeeper", "Link"]

logger = logging.getLogger(__name__)

# Never heartbeat or retry faster than this, whatever a server announces.
_MIN_INTERVAL = 0.05


class Connection(Protocol):
    """What the keeper needs from one open, welcomed connection (``client_stub.aio._Connection``)."""

    @property
    def address(self) -> str: ...

    @property
    def welcome(self) -> Welcome: ...

    @property
    def closed(self) -> bool: ...

    async def request(self, msg: Request) -> Reply: ...

    def send_nowait(self, msg: Request) -> None: ...

    def abort(self, error: LicenseError) -> None: ...


class Link(Protocol):
    """What the keeper needs from its client (``client_stub.aio.AsyncLicenseClient``)."""

    @property
    def request_timeout(self) -> float: ...

    def live_connection(self) -> Connection | None: ...

    async def connect(self) -> Connection: ...

    def next_id(self) -> int: ...


class LeaseKeeper:
    """The seats one client holds on license servers, and the task and timer that keep them.

    Args:
        link: the client: gives the current connection, opens a new one, allocates request ids.
        backoff: delays between reconnect rounds (capped further at one heartbeat interval, so a
            restarted server is found well within the lease timeout).
    """

    def __init__(self, link: Link, backoff: Backoff) -> None:
        self._link = link
        self._backoff = backoff
        # token -> the local seats using it (processes of one user on one host may share a seat, and the
        # server then answers two checkouts with one token: it is checked in when the last one is).
        self._seats: dict[str, list[AsyncSeat]] = {}
        self._deadlines: dict[str, float] = {}
        # Tokens this client gave up while the server may still count them; checked in on the next connect.
        self._release: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._next_beat = 0.0
        self._stopped = False
        #: time.monotonic() since which the product's user is idle, or None while active (report_idle).
        self.idle_since: float | None = None

    # ------------------------------------------------------------------ seats
    @property
    def tokens(self) -> tuple[str, ...]:
        """Tokens held now (each once, however many local seats share it)."""
        return tuple(self._seats)

    def holds(self, token: str) -> bool:
        return token in self._seats

    def deadline(self, token: str) -> float | None:
        """The local deadline of ``token`` (loop time), or ``None`` if it is not held."""
        return self._deadlines.get(token)

    def hold(self, seat: AsyncSeat, renewed_at: float, lease_timeout: float) -> None:
        """Start keeping ``seat``: the server granted it, renewed as of ``renewed_at`` (loop time)."""
        if self._stopped:
            raise RuntimeError("the license client is closed")
        self._seats.setdefault(seat.token, []).append(seat)
        self._release.discard(seat.token)
        self._deadlines[seat.token] = max(self._deadlines.get(seat.token, 0.0), renewed_at + lease_timeout)
        self._arm()
        self._ensure_task()
        self._wake.set()

    async def release(self, seat: AsyncSeat) -> bool:
        """Stop keeping ``seat`` and check it in if no other local seat shares its token.

        Never raises for an unreachable server: the token is checked in on the next connection, and the
        server frees it within one lease timeout anyway.

        Returns:
            True if the server confirmed it released the seat.
        """
        holders = self._seats.get(seat.token)
        if holders is None or seat not in holders:
            return False
        holders.remove(seat)
        if holders:
            return False
        del self._seats[seat.token]
        self._deadlines.pop(seat.token, None)
        self._arm()
        conn = self._link.live_connection()
        if conn is None:
            self._release.add(seat.token)
            logger.info("checkin of %s lease %s deferred: not connected", seat.product, seat.token[:8])
            return False
        try:
            async with asyncio.timeout(self._link.request_timeout):
                reply = await conn.request(Checkin(self._link.next_id(), seat.token))
        except (TimeoutError, LicenseError) as exc:
            self._release.add(seat.token)
            logger.info("checkin of %s lease %s deferred: %s", seat.product, seat.token[:8], exc)
            return False
        return bool(getattr(reply, "released", False))

    def lose_all(self, error: LicenseLost, *, server_knows: bool) -> None:
        """Declare every held seat lost with ``error``."""
        for token in list(self._seats):
            self._lose(token, error, server_knows=server_knows)

    def _lose(self, token: str, error: LicenseLost, *, server_knows: bool) -> None:
        holders = self._seats.pop(token, [])
        self._deadlines.pop(token, None)
        if not server_knows:
            self._release.add(token)
        self._arm()
        for seat in holders:
            logger.warning("seat of %s lost (lease %s): %s", seat.product, token[:8], error.message)
            seat._mark_lost(error)

    def _lose_reported(self, lost: tuple[LostSeat, ...]) -> None:
        for item in lost:
            if item.token in self._seats:
                self._lose(item.token, LicenseLost(item.code, item.message), server_knows=True)

    # ------------------------------------------------------------------ local deadline timer
    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._deadlines and not self._stopped:
            self._timer = asyncio.get_running_loop().call_at(min(self._deadlines.values()), self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        for token, deadline in list(self._deadlines.items()):
            if deadline <= now and token in self._seats:
                seat = self._seats[token][0]
                self._lose(token, LicenseLost(
                    ErrorCode.LEASE_EXPIRED,
                    f"no heartbeat for the {seat.product} seat reached the license server for "
                    f"{seat.lease_timeout:g} s (the lease timeout), so the seat must be assumed gone",
                    "check the network path to the license server; the product must check out again",
                ), server_knows=False)
        self._arm()

    # ------------------------------------------------------------------ connection events
    def wake(self) -> None:
        """Tell the task the connection state changed (opened, lost)."""
        self._wake.set()

    async def resume(self, conn: Connection) -> None:
        """On a fresh connection: resume held tokens, and check in the ones given up meanwhile.

        Called by the client's connect step, under its connect lock, right after ``welcome``.

        Raises:
            LicenseError: retryable or protocol-level failure of the resume (the connection is unusable).
        """
        loop = asyncio.get_running_loop()
        tokens = tuple(self._seats)
        if tokens:
            await self._resume_tokens(conn, tokens)
        for token in list(self._release):
            if token not in self._seats:
                conn.send_nowait(Checkin(self._link.next_id(), token))
        self._release.clear()
        self._next_beat = loop.time() + self._interval(conn)

    async def _resume_tokens(self, conn: Connection, tokens: tuple[str, ...]) -> None:
        """Resume ``tokens`` on ``conn``: those the server names as resumed are renewed, the others lost."""
        sent = asyncio.get_running_loop().time()
        async with asyncio.timeout(self._link.request_timeout):
            reply = await conn.request(Resume(self._link.next_id(), tokens))
        if isinstance(reply, ErrorReply):
            err = error_for(reply.code, reply.message, reply.hint, decision=LicenseLost)
            if not isinstance(err, LicenseLost):
                raise err
            self.lose_all(err, server_knows=True)
        elif isinstance(reply, Resumed):
            self._lose_reported(reply.lost)
            lease_timeout = conn.welcome.lease_timeout
            answered = set(reply.resumed) | {x.token for x in reply.lost}
            for token in reply.resumed:
                if token in self._seats:
                    self._deadlines[token] = max(self._deadlines[token], sent + lease_timeout)
                else:
                    self._release.add(token)  # given up locally while the resume was in flight
            for token in tokens:
                if token in self._seats and token not in answered:
                    self._lose(token, LicenseLost(ErrorCode.LEASE_NOT_FOUND,
                                                  "the license server did not resume this seat"),
                               server_knows=True)
            self._arm()
            logger.info("resumed %d seat(s) on %s, %d lost", len(reply.resumed), conn.address,
                        len(reply.lost))
        else:
            raise ProtocolMismatch(ErrorCode.UNEXPECTED_MESSAGE,
                                   f"the license server answered resume with '{reply.OP}'")

    def apply_ack(self, ack: HeartbeatAck, sent: float, lease_timeout: float,
                  held: frozenset[str] | None = None) -> tuple[str, ...]:
        """A heartbeat sent at ``sent`` (loop time) was acknowledged: drop lost seats, renew deadlines.

        ``held`` is the tokens held when the heartbeat was sent. The server renewed ``ack.renewed`` leases of
        this connection; if that is fewer than the seats held then and now (less those it reports lost), some
        seat is no longer this connection's without the server saying which (an older server, or a seat
        taken over elsewhere): nothing is renewed then, and the tokens to check are returned (the caller
        resumes them on this connection, which answers exactly which are still held).

        Returns:
            The tokens to check, or ``()`` when the ack accounts for every seat.
        """
        self._lose_reported(ack.lost)
        if held is not None:
            expected = tuple(t for t in held if t in self._seats)
            if ack.renewed < len(expected):
                logger.warning("the license server renewed %d lease(s) of this connection, %d seat(s) are held; "
                               "checking which are still held", ack.renewed, len(expected))
                return expected
        for token in self._seats:
            self._deadlines[token] = max(self._deadlines[token], sent + lease_timeout)
        self._arm()
        return ()

    # ------------------------------------------------------------------ the task
    def _interval(self, conn: Connection) -> float:
        interval = conn.welcome.heartbeat_interval
        for holders in self._seats.values():
            interval = min(interval, holders[0].heartbeat_interval)
        return max(_MIN_INTERVAL, interval)

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="client_stub-lease-keeper")

    async def _sleep(self, seconds: float) -> None:
        # Cleared right before waiting, after the caller looked at the state (no await in between), so a
        # wake-up cannot be lost.
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._wake.wait()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        try:
            while not self._stopped:
                if not self._seats:
                    await self._sleep(3600.0)
                    continue
                conn = self._link.live_connection()
                if conn is None:
                    try:
                        await self._link.connect()
                        attempt = 0
                    except LicenseError as exc:
                        if not exc.retryable:
                            self.lose_all(LicenseLost(exc.code, f"cannot reconnect to renew seats: {exc.message}",
                                                      exc.hint), server_knows=False)
                            continue
                        cap = min(self._lease_floor() / 3.0, self._backoff.cap)
                        delay = min(self._backoff.delay(attempt), max(_MIN_INTERVAL, cap))
                        attempt += 1
                        logger.info("license server unreachable (%s); retrying in %.2f s", exc.message, delay)
                        await self._sleep(delay)
                    continue
                now = loop.time()
                if now < self._next_beat:
                    await self._sleep(self._next_beat - now)
                    continue
                self._next_beat = now + self._interval(conn)
                await self._beat(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave the product believing it holds seats
            logger.exception("license keeper failed")
            self.lose_all(LicenseLost(ErrorCode.INTERNAL_ERROR, f"the license client failed: {exc!r}"),
                          server_knows=False)

    def _lease_floor(self) -> float:
        return min((h[0].lease_timeout for h in self._seats.values()), default=self._backoff.cap * 3.0)

    def heartbeat(self) -> Heartbeat:
        """The next heartbeat, saying whether (and how long) the user has been idle."""
        since = self.idle_since
        if since is None:
            return Heartbeat(self._link.next_id())
        return Heartbeat(self._link.next_id(), idle=True, idle_for=round(max(0.0, time.monotonic() - since), 3))

    async def _beat(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        lease_timeout = conn.welcome.lease_timeout
        interval = self._interval(conn)
        # Long enough for a busy server, short enough to reconnect well before the local deadline.
        ack_timeout = min(self._link.request_timeout, max(interval, lease_timeout / 2.0))
        sent = loop.time()
        held = frozenset(self._seats)
        try:
            async with asyncio.timeout(ack_timeout):
                reply = await conn.request(self.heartbeat())
        except TimeoutError:
            logger.warning("license server %s did not answer a heartbeat within %g s; reconnecting",
                           conn.address, ack_timeout)
            conn.abort(ServerUnavailable(f"the license server {conn.address} did not answer a heartbeat "
                                         f"within {ack_timeout:g} s"))
            return
        except LicenseError:
            return  # the connection closed; the loop reconnects
        if isinstance(reply, HeartbeatAck):
            unaccounted = self.apply_ack(reply, sent, lease_timeout, held)
            if unaccounted:
                try:
                    await self._resume_tokens(conn, unaccounted)
                except TimeoutError:
                    conn.abort(ServerUnavailable(f"the license server {conn.address} did not answer resume "
                                                 f"within {self._link.request_timeout:g} s"))
                except LicenseError as exc:
                    conn.abort(exc)
        elif isinstance(reply, ErrorReply):
            if reply.code is ErrorCode.RATE_LIMITED:
                # Not run (after the connection's retries), not a loss: like a heartbeat that did not arrive;
                # the next one renews the seats.
                logger.warning("license server %s refused a heartbeat: %s", conn.address, reply.message)
                return
            err = error_for(reply.code, reply.message, reply.hint, decision=LicenseLost)
            if isinstance(err, LicenseLost):
                self.lose_all(err, server_knows=True)
            else:
                conn.abort(err)
        else:
            conn.abort(ProtocolMismatch(ErrorCode.UNEXPECTED_MESSAGE,
                                        f"the license server answered a heartbeat with '{reply.OP}'"))

    async def stop(self) -> dict[str, list[AsyncSeat]]:
        """Stop the task and the timer; return the seats still held by token (for the client to check in)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            # wait() does not re-raise the task's CancelledError, yet our own cancellation still propagates.
            await asyncio.wait([task])
        held = dict(self._seats)
        self._seats.clear()
        self._deadlines.clear()
        return held
