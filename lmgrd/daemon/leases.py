"""The lease lifecycle: the ONLY code that grants a seat or ends one.

A grant, whether at once or to a queued checkout: ledger -> journal record (``LeaseInfo.to_record``) ->
counter -> observers (``on_grant``) -> ``OUT`` log line -> the ``granted`` reply, queued on the outbox (sent
after the group-commit flush has written the record).

An end, for every :class:`~lmgrd.daemon.events.EndReason` (checkin, lmremove, idle reclaim, expiry,
revocation, a license gone at restore): ledger -> journal release -> counter -> observers
(``on_release``) -> one log line -> the holder told at its next heartbeat (``LostSeat``, with the reason's
error code) unless it asked for the end itself -> the freed seat offered to the queue. No seat leaves the
ledger any other way, so none leaves without a record, a counter and a log line.

A store that cannot write (state directory full or read-only): no grant is acknowledged before its
record is written. The grants of the batch whose write failed are undone here (:meth:`undo_grants`: ledger
release, a release record behind the grant's, ``EndReason.UNRECORDED``) and their checkouts refused with
``STORE_UNAVAILABLE``; while the outbox stays degraded every checkout, and every waiter a freed seat would
go to, is refused the same way (:meth:`store_refusal`). Checkins, expiries and removals still end seats at
once; their records wait in memory and are written, in order, when the store recovers.

Queued checkouts live here too (a waiter is a grant not yet made): their wait timers, a waiter that left
before its grant, and the denial when a wait runs out. Denials of every kind go through :meth:`deny`.

**The store seam.** With the embedded journal (the default) a grant is decided by the ledger alone and is
synchronous: the hot path pays one ``if self.cluster is None``. With ``store: etcd`` (HA, several nodes) the
ledger's grant is *tentative* until :class:`~lmgrd.storage.etcd.EtcdSeats` has written the seat to etcd in one
transaction that can never exceed the count across nodes; the reply waits for etcd. A refusal from etcd takes
the tentative lease back (nobody was told of it, nothing journalled) and the checkout is queued or denied as it
would be locally (``NO_SEATS``; ``STORE_UNAVAILABLE`` when etcd cannot answer). Ends go to etcd too, from the
one place every end passes (:meth:`_ended`). A client resuming a token this node never granted is *adopted*
(:meth:`adopt`): the seat moves to this node in etcd and into this node's ledger.

Imports the core, the journal store protocol and ``protocol``; never the transport, admin or monitoring.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from lmgrd.core.ledger import HolderLike, LeaseInfo, Ledger, PoolKey, Waiter
from lmgrd.daemon.events import ClientView, EndReason, Observers
from lmgrd.daemon.outbox import Outbox, Writable
from lmgrd.storage.etcd import EtcdSeats, StoreUnavailable
from lmgrd.storage.journal import LeaseRecord, LeaseStore, StoreError, StoreWriteError
from protocol import ErrorCode, ErrorReply, Granted, LostSeat, Resumed, encode_frame

__all__ = ["REMOVED_MEMORY", "Counters", "LeaseLifecycle", "WaitCtx"]

logger = logging.getLogger(__name__)

#: How many lmremove'd tokens are remembered so their resume says SEAT_REMOVED (oldest forgotten first).
REMOVED_MEMORY = 4096

_CHECKIN = EndReason.CHECKIN

#: The error code a holder is told for each way its seat can end without its asking (CHECKIN: none).
LOST_CODE: Mapping[EndReason, ErrorCode] = {
    EndReason.REMOVAL: ErrorCode.SEAT_REMOVED,
    EndReason.IDLE: ErrorCode.IDLE_TIMEOUT,
    EndReason.EXPIRY: ErrorCode.LEASE_EXPIRED,
    EndReason.REVOKED: ErrorCode.LICENSE_REVOKED,
    EndReason.STORE_LOST: ErrorCode.STORE_UNAVAILABLE,
}


def _store_message(err: StoreError) -> tuple[str, str]:
    """The STORE_UNAVAILABLE message (what, where, the OS error) and hint (what to do) for ``err``."""
    if isinstance(err, StoreWriteError):
        message = (f"the license server cannot record new seats: writing its state directory {err.state_dir} "
                   f"failed ({err.reason})")
        hint = (f"seats already held keep running; try again later. Administrator: free space in {err.state_dir} "
                "or make it writable; the server grants again by itself once it can write")
    else:
        message = f"the license server cannot record new seats: {err}"
        hint = "seats already held keep running; try again later"
    return message, hint


class Client(Writable, ClientView, Protocol):
    """A connected client as the lifecycle needs it: where replies go, what it is told at heartbeat, and its
    queued checkouts (``waiters``: waiter_id -> request id, ``None`` while it has none)."""

    @property
    def waiters(self) -> dict[int, int] | None: ...

    def tell(self, seat: LostSeat) -> None:
        """Tell the client at its next heartbeat that it lost ``seat``."""
        ...

    def add_waiter(self, waiter_id: int, request_id: int) -> None: ...
    def drop_waiter(self, waiter_id: int) -> None: ...


class Timers(Protocol):
    def call_later(self, delay: float, callback: Callable[[int], None], arg: int, /) -> Cancellable: ...


class Cancellable(Protocol):
    def cancel(self) -> None: ...


@dataclass(slots=True)
class WaitCtx:
    """What is needed to answer a queued checkout later."""

    client: Client
    request_id: int
    product: str
    version: str
    started: float
    pool: PoolKey
    share_key: tuple[str, ...]
    holder: HolderLike
    timer: Cancellable | None = None
    until: float = 0.0  # when the wait runs out (monotonic)


@dataclass(slots=True)
class Counters:
    """Event counts since start (the status reply, metrics and tests read them)."""

    granted: int = 0
    denied: dict[str, int] = field(default_factory=dict)
    released: int = 0
    expired: int = 0
    connections: int = 0
    #: Connections dropped because no hello came within handshake_timeout (silent or trickling clients).
    handshake_timeouts: int = 0


class LeaseLifecycle:
    """Grants and ends seats; the daemon's other parts ask it to, and never touch the ledger's leases."""

    def __init__(
        self,
        ledger: Ledger,
        store: LeaseStore,
        outbox: Outbox,
        observers: Observers,
        *,
        sessions: Mapping[int, Client],
        count_of: Callable[[PoolKey], int],
        timers: Timers,
        clock: Callable[[], float],
        wall: Callable[[], float],
        lease_timeout: float,
        heartbeat_interval: float,
        arm: Callable[[], None] = lambda: None,
        cluster: EtcdSeats | None = None,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.outbox = outbox
        self.observers = observers
        self.sessions = sessions
        self.count_of = count_of
        self.timers = timers
        self.clock = clock
        self.wall = wall
        self.lease_timeout = lease_timeout
        self.hb_interval = heartbeat_interval
        #: Arms the server's expiry timer; called after a grant while :attr:`timer_idle` (no timer armed).
        self.arm = arm
        self.timer_idle = True
        self.counters = Counters()
        self.waits: dict[int, WaitCtx] = {}
        self.next_waiter = 1
        #: Tokens freed by lmremove, so a later resume by their holder (the lease's owner) says SEAT_REMOVED
        #: rather than LEASE_NOT_FOUND (bounded).
        self.removed: dict[str, tuple[str, LostSeat]] = {}
        outbox.undo = self.undo_grants
        #: The cluster-wide seat store (HA, ``store: etcd``); None: this node's ledger decides alone.
        self.cluster = cluster
        self._tasks: set[asyncio.Task[None]] = set()
        #: Checkouts etcd refused, waiting for a seat another node frees: pool -> waiter ids in arrival order.
        self.cluster_queue: dict[PoolKey, list[int]] = {}

    # -- grants ------------------------------------------------------------------------------------------------
    def checkout(self, client: Client, rid: int, pool: PoolKey, share_key: tuple[str, ...], holder: HolderLike,
                 version: str, now: float, wall: float, wait: float = 0.0) -> bool:
        """Grant a seat of ``pool`` now if the ledger has one; False when it needs a new seat and none is free.

        With a cluster store, True means the checkout is answered later (granted, queued for up to ``wait``
        seconds, or denied), once etcd has decided.
        """
        ledger = self.ledger
        lease = ledger.checkout(pool, share_key, holder, version, now, wall)
        if lease is None:
            return False
        if self.cluster is not None:
            self._spawn(self._claim(client, rid, lease, holder, now, now + wait))
            return True
        self._granted(client, rid, lease, 0.0)
        if ledger.queued(pool):
            # Waiters whose share key this seat has join it now (under a usage policy a checkout may pass the
            # queue, and under host sharing its seat can be a waiter's: invariant 3 of the ledger).
            self._serve(ledger.serve(pool, now, wall))
        return True

    # -- the cluster store (HA) ---------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, client: Client, rid: int, lease: LeaseInfo, holder: HolderLike, started: float,
                     until: float) -> None:
        """Make the ledger's tentative ``lease`` a cluster-wide seat, then answer; or take it back and refuse."""
        cluster = self.cluster
        assert cluster is not None
        error = ""
        if not cluster.up:
            ok, error = False, "etcd was unreachable or without quorum at the last attempt"
        else:
            try:
                ok = await cluster.acquire(lease.to_record(), self.count_of(lease.pool), lease.session or 0,
                                           lease.share_key)
            except StoreUnavailable as exc:
                ok, error = False, str(exc)
        if self.ledger.get(lease.token) is not lease:  # ended while etcd decided (pool removed, lmremove)
            if ok:
                cluster.release(lease.token, lease.pool[0])
            if error:
                self.deny(client, rid, lease.pool[1], lease.version, ErrorCode.STORE_UNAVAILABLE,
                          "the license servers' shared seat store (etcd) cannot be reached",
                          "try again shortly; if it persists, ask the administrator to check the etcd cluster",
                          log=f"store unavailable: {error}", customer_id=lease.pool[0])
            else:
                self.deny(client, rid, lease.pool[1], lease.version, ErrorCode.NO_SEATS,
                          f"the seat of {lease.pool[1]} ended before it could be granted (the licenses were "
                          "reloaded or the seat was removed)", "check out again", customer_id=lease.pool[0])
            return
        t = client.transport
        if ok and (t is None or t.is_closing()):
            logger.info("client left before its grant of %s; seat released", lease.pool[1])
            cluster.release(lease.token, lease.pool[0])
            self._take_back(lease)
            return
        if ok:
            self._granted(client, rid, lease, self.clock() - started)
            return
        self._take_back(lease)
        product, version = lease.pool[1], lease.version
        if error:
            self.deny(client, rid, product, version, ErrorCode.STORE_UNAVAILABLE,
                      "the license servers' shared seat store (etcd) cannot be reached",
                      "try again shortly; if it persists, ask the administrator to check the etcd cluster",
                      log=f"store unavailable: {error}", customer_id=lease.pool[0])
            return
        now = self.clock()
        if until > now and t is not None and not t.is_closing():
            share_key = () if lease.share_key == (lease.token,) else lease.share_key
            self._cluster_enqueue(WaitCtx(client, rid, product, version, started, lease.pool, share_key, holder,
                                          until=until))
            return
        count = self.count_of(lease.pool)
        self.deny(client, rid, product, version, ErrorCode.NO_SEATS,
                  f"all {count} seat(s) of {product} are in use across the license server cluster",
                  "try again later, or check out with a wait", log="cluster-wide: all seats in use",
                  customer_id=lease.pool[0])

    def _cluster_enqueue(self, ctx: WaitCtx) -> None:
        """Queue a checkout etcd refused (the seats are held on other nodes) until ``ctx.until``.

        Kept here, not in the ledger (whose seats are free): :meth:`serve_cluster` retries it when the cluster
        view shows a free seat; the wait timer and a leaving client are handled as for any waiter.
        """
        waiter_id = self.next_waiter
        self.next_waiter += 1
        ctx.timer = self.timers.call_later(max(0.0, ctx.until - self.clock()), self._wait_expired, waiter_id)
        self.waits[waiter_id] = ctx
        ctx.client.add_waiter(waiter_id, ctx.request_id)
        queue = self.cluster_queue.setdefault(ctx.pool, [])
        # In arrival order: a waiter offered a seat that another node took first comes back to its place.
        pos = len(queue)
        while pos and (ahead := self.waits.get(queue[pos - 1])) is not None and ahead.started > ctx.started:
            pos -= 1
        queue.insert(pos, waiter_id)
        logger.info("QUEUED %s %s for %s (cluster-wide, position %d)", ctx.product, ctx.version, ctx.client.who(),
                    pos + 1)

    def _take_back(self, lease: LeaseInfo) -> None:
        """Undo a tentative grant nobody was told of (no record, no counter, no event)."""
        _, served = self.ledger.release(lease.token, self.clock(), self.wall())
        if served:
            self._serve(served)

    def adopt(self, client: Client, rid: int, resumed: list[str], lost: list[LostSeat], tokens: list[str]) -> None:
        """Resume ``tokens`` this node does not hold from the cluster store, then send the ``Resumed`` reply."""
        self._spawn(self._adopt(client, rid, resumed, lost, tokens))

    async def _adopt(self, client: Client, rid: int, resumed: list[str], lost: list[LostSeat],
                     tokens: list[str]) -> None:
        cluster = self.cluster
        assert cluster is not None
        owner = str(getattr(client, "owner", ""))

        def holds(rec: LeaseRecord) -> bool:  # as Session.holds: the lease's owner, or (unbound) user and host
            return rec.owner == owner if rec.owner else (rec.user == client.user and rec.host == client.host)

        results = await asyncio.gather(*(cluster.adopt(token, holds) for token in tokens), return_exceptions=True)
        now = self.clock()
        session = getattr(client, "session", 0)
        for token, res in zip(tokens, results, strict=True):
            if isinstance(res, BaseException):
                lost.append(LostSeat(token, ErrorCode.STORE_UNAVAILABLE,
                                     "the license servers' shared seat store (etcd) cannot be reached"))
                continue
            if res is None:
                lost.append(LostSeat(token, ErrorCode.LEASE_NOT_FOUND,
                                     "this seat is no longer held: it lapsed, was checked in or was removed"))
                continue
            if self.ledger.get(token) is None:
                self.ledger.restore([res], now)
            self.ledger.resume(token, session, now)
            resumed.append(token)
            logger.info("ADOPTED %s %s of %s@%s lease %s from another node", res.product, res.version, res.user,
                        res.host, token[:8])
        logger.info("RESUME %s: %d seat(s) resumed, %d lost", client.who(), len(resumed), len(lost))
        self.outbox.reply(client, Resumed, encode_frame(Resumed(rid, tuple(resumed), tuple(lost)).to_wire()))
        self.arm()

    def store_lost(self, tokens: Iterable[str]) -> int:
        """End the leases whose seat is gone from the cluster store (their etcd lease lapsed)."""
        n = 0
        cluster = self.cluster
        for token in tokens:
            if cluster is not None:
                cluster.drop_local(token)
            if self.end(token, EndReason.STORE_LOST, "the shared seat store lost this seat") is not None:
                n += 1
        return n

    def serve_cluster(self) -> None:
        """Offer seats freed on other nodes to this node's queue (called when the watch of the cluster's seats
        sees one freed, and after each read of the whole view)."""
        cluster = self.cluster
        if cluster is None:
            return
        now, wall = self.clock(), self.wall()
        for pool in self.ledger.pools():
            # This node's seats being written to etcd are in its ledger before the cluster view shows them.
            free = self.count_of(pool) - max(cluster.held(pool), self.ledger.in_use(pool))
            if free <= 0:
                continue
            if self.ledger.queued(pool):
                self.serve_pool(pool)
            queue = self.cluster_queue.get(pool)
            while queue and free > 0:
                ctx = self._take_wait(queue.pop(0))
                if ctx is None:
                    continue
                t = ctx.client.transport
                if t is None or t.is_closing():
                    continue
                lease = self.ledger.checkout(pool, ctx.share_key, cast(HolderLike, ctx.client), ctx.version, now,
                                             wall)
                if lease is None:  # this node is full itself: wait in the cluster queue again
                    self._cluster_enqueue(ctx)
                    break
                free -= 1
                self._spawn(self._claim(ctx.client, ctx.request_id, lease, ctx.holder, ctx.started, ctx.until))
            if not queue:
                self.cluster_queue.pop(pool, None)

    def _granted(self, client: Client, rid: int, lease: LeaseInfo, waited: float) -> None:
        self.store.record_grant(lease.to_record())
        self.counters.granted += 1
        if self.observers.any:
            self.observers.grant(lease, client, waited)
        if logger.isEnabledFor(logging.INFO):
            logger.info("OUT %s %s to %s lease %s (%d/%d in use, customer %s)", lease.pool[1], lease.version,
                        client.who(), lease.token[:8], self.ledger.in_use(lease.pool), self.count_of(lease.pool),
                        lease.pool[0])
        self.outbox.granted(client, rid, lease.token, Granted.frame(rid, lease.token, lease.pool[0], lease.pool[1],
                                                                    lease.version, self.lease_timeout,
                                                                    self.hb_interval, waited))
        if self.timer_idle:
            self.arm()

    def store_refusal(self, client: Client, rid: int, product: str, version: str,
                      customer_id: str | None = None) -> bool:
        """Refuse a checkout with ``STORE_UNAVAILABLE`` if the store cannot record a grant now; True if refused.
        ``customer_id``: the pool's, when one was chosen (a waiter's); a checkout refused up front has none."""
        err = self.outbox.store_error
        if err is None:
            return False
        message, hint = _store_message(err)
        self.deny(client, rid, product, version, ErrorCode.STORE_UNAVAILABLE, message, hint,
                  log=f"(STORE_UNAVAILABLE): {err}", customer_id=customer_id)
        return True

    def undo_grants(self, grants: list[tuple[Writable, int, str]], error: StoreError) -> None:
        """End grants whose record the store failed to write (their ``granted`` reply was never sent) and
        refuse their checkouts with ``STORE_UNAVAILABLE``. Called by the outbox when a flush fails."""
        message, hint = _store_message(error)
        now, wall = self.clock(), self.wall()
        for to, rid, token in grants:
            lease, served = self.ledger.release(token, now, wall)
            if lease is None:
                continue
            self.store.record_release(token)  # behind the unwritten grant: the journal stays consistent
            self.counters.released += 1
            if self.observers.any:
                self.observers.release(lease, EndReason.UNRECORDED)
            logger.warning("UNDONE %s %s to %s lease %s: the journal could not record the grant", lease.pool[1],
                           lease.version, lease.user + "@" + lease.host, token[:8])
            client = cast(Client, to)
            self.deny(client, rid, lease.pool[1], lease.version, ErrorCode.STORE_UNAVAILABLE, message, hint,
                      log="(STORE_UNAVAILABLE): the grant could not be recorded", customer_id=lease.pool[0])
            if served:
                self._serve(served)

    # -- the queue -----------------------------------------------------------------------------------------------
    def enqueue(self, client: Client, rid: int, product: str, version: str, pool: PoolKey,
                share_key: tuple[str, ...], holder: HolderLike, wait: float, now: float) -> int:
        """Queue a checkout the ledger refused for up to ``wait`` seconds; returns its position."""
        waiter_id = self.next_waiter
        self.next_waiter += 1
        ctx = WaitCtx(client, rid, product, version, now, pool, share_key, holder, until=now + wait)
        position = self.ledger.enqueue(Waiter(waiter_id, pool, share_key, holder, version, ctx))
        ctx.timer = self.timers.call_later(wait, self._wait_expired, waiter_id)
        self.waits[waiter_id] = ctx
        client.add_waiter(waiter_id, rid)
        logger.info("QUEUED %s %s for %s (position %d, waiting up to %g s)", product, version, client.who(),
                    position, wait)
        return position

    def _wait_expired(self, waiter_id: int) -> None:
        ctx = self._take_wait(waiter_id)
        if ctx is None:
            return
        self.ledger.cancel_wait(waiter_id)
        waited = self.clock() - ctx.started
        # Why it is still refused, from the pool it waited in (the ledger knows; no license check again).
        h = ctx.holder
        why = self.ledger.refusal(ctx.pool, ctx.share_key, h.user, h.host, h.addr, h.display)
        code = {"max": ErrorCode.MAX_REACHED, "reserved": ErrorCode.RESERVED}.get(why or "", ErrorCode.NO_SEATS)
        what = "no seat" if code is ErrorCode.NO_SEATS else "no seat the usage policy allows you"
        self.deny(ctx.client, ctx.request_id, ctx.product, ctx.version, code,
                  f"{what} of {ctx.product} became free within {waited:.0f} s", "try again later or wait longer",
                  log=f"after waiting {waited:.1f} s: no seat became free ({code})", customer_id=ctx.pool[0])

    def _take_wait(self, waiter_id: int) -> WaitCtx | None:
        ctx = self.waits.pop(waiter_id, None)
        if ctx is None:
            return None
        if ctx.timer is not None:
            ctx.timer.cancel()
            ctx.timer = None
        ctx.client.drop_waiter(waiter_id)
        return ctx

    def drop_waits(self, client: Client) -> None:
        """The client left: forget its queued checkouts."""
        for waiter_id in list(client.waiters or ()):
            if self._take_wait(waiter_id) is not None:
                self.ledger.cancel_wait(waiter_id)

    def serve_pool(self, pool: PoolKey) -> None:
        """Give waiters of ``pool`` whatever seats are free now (after a count or policy change)."""
        self._serve(self.ledger.serve(pool, self.clock(), self.wall()))

    def _serve(self, served: list[tuple[Waiter, LeaseInfo]]) -> None:
        now = self.clock()
        i = 0
        while i < len(served):  # grows when a seat goes back to the queue
            waiter, lease = served[i]
            i += 1
            ctx = self._take_wait(waiter.waiter_id)
            t = ctx.client.transport if ctx is not None else None
            if ctx is not None and self.outbox.store_error is not None and t is not None and not t.is_closing():
                # The store cannot record this grant: the seat goes back (nothing was journalled or told) and
                # the waiter is refused, like a checkout now.
                _, more = self.ledger.release(lease.token, now, self.wall())
                served.extend(more)
                self.store_refusal(ctx.client, ctx.request_id, ctx.product, ctx.version, ctx.pool[0])
                continue
            if ctx is None or t is None or t.is_closing():
                # The waiter left between the ledger's decision and now. Nobody was told of this lease and
                # nothing was journalled: give the seat straight back, to the next waiter.
                logger.info("waiter for %s left before its grant; seat released", lease.pool[1])
                _, more = self.ledger.release(lease.token, now, self.wall())
                served.extend(more)
                continue
            if self.cluster is None:
                self._granted(ctx.client, ctx.request_id, lease, now - ctx.started)
            else:
                self._spawn(self._claim(ctx.client, ctx.request_id, lease, ctx.holder, ctx.started, ctx.until))

    # -- denials -------------------------------------------------------------------------------------------------
    def deny(self, client: Client, rid: int, product: str, version: str, code: ErrorCode, message: str,
             hint: str, *, log: str = "", customer_id: str | None = None) -> None:
        """Refuse a checkout: counter, observers, one ``DENIED`` line, the error reply."""
        self.counters.denied[code] = self.counters.denied.get(code, 0) + 1
        if self.observers.any:
            self.observers.deny(product, version, code, client, customer_id)
        if logger.isEnabledFor(logging.INFO):
            if log:
                logger.info("DENIED %s %s to %s %s", product, version, client.who(), log)
            else:
                logger.info("DENIED %s %s to %s: %s %s", product, version, client.who(), code, message)
        self.outbox.reply(client, ErrorReply, encode_frame(ErrorReply(rid, code, message, hint).to_wire()))

    # -- ends ----------------------------------------------------------------------------------------------------
    def end(self, token: str, reason: EndReason, why: str = "", client: Client | None = None) -> LeaseInfo | None:
        """End one lease now for ``reason``; ``None`` if no lease has that token (already ended).

        ``client`` is who asked (the checkin's connection, for the log line); ``why`` says what ended it
        (for removal, idle and revocation: shown to the holder and logged).
        """
        lease, served = self.ledger.release(token, self.clock(), self.wall())
        if lease is None:
            return None
        self._ended(lease, reason, why, client)
        if reason is not _CHECKIN:
            self.outbox.request_flush()  # nobody's reply carries this record out: write it promptly
        if served:
            self._serve(served)
        return lease

    def expire(self, limit: int) -> int:
        """End the leases whose deadline has passed (at most ``limit``); returns how many ended."""
        lapsed, served = self.ledger.expire(self.clock(), self.wall(), limit)
        for lease in lapsed:
            self._ended(lease, EndReason.EXPIRY, "", None)
        if lapsed:
            self.outbox.request_flush()
        if served:
            self._serve(served)
        return len(lapsed)

    def end_pool(self, pool: PoolKey, reason: EndReason, why: str, code: ErrorCode, hint: str) -> int:
        """End every lease of ``pool`` and refuse its queued checkouts with ``code``; returns leases ended."""
        leases, waiters = self.ledger.remove_pool(pool)
        for lease in leases:
            self._ended(lease, reason, why, None)
        for w in waiters:
            ctx = self._take_wait(w.waiter_id)
            if ctx is not None:
                self.deny(ctx.client, ctx.request_id, ctx.product, ctx.version, code,
                          f"{ctx.product} is not served: {why}", hint, customer_id=pool[0])
        if leases:
            self.outbox.request_flush()
        return len(leases)

    def restore(self, records: Iterable[LeaseRecord], licensed: Callable[[PoolKey], bool]) -> int:
        """Reload the journal's leases at start; those of a pool no longer licensed end (``UNLICENSED``)."""
        keep: list[LeaseRecord] = []
        for rec in records:
            if licensed((rec.customer_id, rec.product)):
                keep.append(rec)
            else:
                self.store.record_release(rec.token)
                logger.warning("lease %s for %s/%s restored from the state directory is no longer licensed here; "
                               "freed", rec.token[:8], rec.customer_id, rec.product)
                self.counters.released += 1
        self.ledger.restore(keep, self.clock())
        self.outbox.flush()  # a store that cannot write degrades the daemon here; it still starts
        return len(keep)

    def _ended(self, lease: LeaseInfo, reason: EndReason, why: str, client: Client | None) -> None:
        self.store.record_release(lease.token)
        if self.cluster is not None:
            self.cluster.release(lease.token, lease.pool[0])
        if self.observers.any:
            self.observers.release(lease, reason)
        if reason is _CHECKIN:  # the hot path: nobody to tell, one log line
            self.counters.released += 1
            if logger.isEnabledFor(logging.INFO):
                who = client.who() if client is not None else f"{lease.user}@{lease.host}"
                logger.info("IN %s %s from %s lease %s (%d/%d in use)", lease.pool[1], lease.version, who,
                            lease.token[:8], self.ledger.in_use(lease.pool), self.count_of(lease.pool))
            return
        if reason is EndReason.EXPIRY:
            self.counters.expired += 1
        else:
            self.counters.released += 1
        product, version, tok = lease.pool[1], lease.version, lease.token[:8]
        if reason is EndReason.EXPIRY:
            logger.info("EXPIRED %s %s of %s@%s lease %s: no heartbeat for %g s", product, version, lease.user,
                        lease.host, tok, self.lease_timeout)
            message = f"no heartbeat reached the server for {self.lease_timeout:g} s"
        elif reason is EndReason.REMOVAL:
            logger.warning("REMOVED %s %s of %s@%s lease %s: %s", product, version, lease.user, lease.host, tok, why)
            message = (f"this seat of {product} was freed by the license administrator ({why}); check out again "
                       "to continue")
        elif reason is EndReason.IDLE:
            logger.info("IDLE %s %s of %s@%s lease %s reclaimed: %s", product, version, lease.user, lease.host, tok,
                        why)
            message = f"this seat of {product} was reclaimed after {why}; check out again to continue"
        elif reason is EndReason.REVOKED:
            logger.warning("REVOKED %s %s of %s@%s lease %s: %s", product, version, lease.user, lease.host, tok, why)
            message = f"this seat of {product} is lost: {why}"
        else:
            logger.warning("%s %s %s of %s@%s lease %s ended: %s", reason.upper(), product, version, lease.user,
                           lease.host, tok, why)
            message = f"this seat of {product} ended: {why}"
        lost = LostSeat(lease.token, LOST_CODE.get(reason, ErrorCode.LEASE_NOT_FOUND), message)
        holder = self.sessions.get(lease.session) if lease.session is not None else None
        if holder is not None:
            holder.tell(lost)
        if reason is EndReason.REMOVAL:
            # Kept even when told at a heartbeat: the client may drop before that and come back with a resume.
            self.removed[lease.token] = (lease.owner, lost)
            while len(self.removed) > REMOVED_MEMORY:
                del self.removed[next(iter(self.removed))]
