"""The daemon's network side: one asyncio.Protocol per client, a single expiry timer, group commit.

A checkout, end to end: ``ClientProtocol.data_received`` -> ``ServerConnection.receive_data`` -> ``Server.
_checkout`` -> licensing checks in the documented order -> ``Ledger.checkout`` -> ``store.record_grant`` ->
the reply is queued; once per loop iteration ``Server._flush`` writes every buffered store record in one
write and only then sends the queued replies. So no client is ever told it holds a seat that a SIGKILL
could forget.

After every ledger change that can bring a deadline forward, ``_arm`` re-arms the one ``call_at`` timer at
``ledger.next_deadline()``; when it fires ``ledger.expire`` hands back the lapsed leases in bounded batches,
each one journalled, logged and reported to its client at the next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter
from typing import Any

from lmgrd import __version__
from lmgrd.admin import commands as admin
from lmgrd.config import DaemonConfig
from lmgrd.core.ledger import LeaseInfo, Ledger, PoolKey, Waiter
from lmgrd.core.licensing import Licensing
from lmgrd.daemon import revocations
from lmgrd.storage.journal import LeaseRecord, LeaseStore
from protocol import (
    Admin,
    BadRequest,
    CheckedIn,
    Checkin,
    Checkout,
    ErrorCode,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    LostSeat,
    ProtocolError,
    Resume,
    Resumed,
    ServerConnection,
    Status,
    StatusReply,
    Welcome,
    encode_frame,
    error_frame,
)
from protocol.license import License
from protocol.validation import hostname_problem, normalize_ip, short_hostname

logger = logging.getLogger(__name__)

#: Lapsed leases handled per timer wake-up, so a mass expiry never stalls the loop (etcd's revokeLimit).
EXPIRE_BATCH = 2000
#: A client that does not read its replies is paused; if it stays stalled this long past a lease timeout it
#: is dropped (its leases then lapse like any dropped client's).
WRITE_HIGH_WATER = 64 * 1024
#: How many lmremove'd tokens are remembered so their resume says SEAT_REMOVED (oldest forgotten first).
REMOVED_MEMORY = 4096
#: Replies queued in one loop iteration before they are flushed early: bounds a flooder's reply backlog and
#: keeps latency even under load (512 here gave a churn p99 about 2.3x the ceiling's, 64 about 1.7x, with one
#: journal write(2) per 64 grants still; see benchmarks/RESULTS.md).
FLUSH_EARLY = 64


class _TokenSource:
    """Lease tokens: 128 random bits each, hex, cut from 4 KiB reads of the OS CSPRNG (one getrandom(2) per
    256 tokens instead of one per token; the bits are the same ``os.urandom`` bits ``secrets`` uses)."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def __call__(self) -> str:
        pos = self.pos
        if pos >= len(self.buf):
            self.buf = os.urandom(4096)
            pos = 0
        self.pos = pos + 16
        return self.buf[pos:pos + 16].hex()


new_token = _TokenSource()


@dataclass(slots=True)
class WaitCtx:
    """What the server needs to answer a queued checkout later."""

    proto: ClientProtocol
    request_id: int
    product: str
    version: str
    started: float
    pool: PoolKey
    share_key: tuple[str, ...]
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class Counters:
    """Event counts since start (exported by later features; also used in tests and the status reply)."""

    granted: int = 0
    denied: dict[str, int] = field(default_factory=dict)
    released: int = 0
    expired: int = 0
    connections: int = 0


class ClientProtocol(asyncio.Protocol):
    """One client connection. Thin: bytes in, requests to the server, replies out."""

    __slots__ = (
        "addr", "conn", "display", "handshake_timer", "host", "idle_since", "lost", "paused_since", "peer", "pid",
        "server",
        "session", "transport", "user", "waiters",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn = ServerConnection(server.cfg.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.session = 0
        self.addr = ""
        self.peer = ""
        self.user = ""
        self.host = ""
        self.pid = 0
        self.display = ""
        self.lost: list[LostSeat] = []
        self.waiters: dict[int, int] = {}  # waiter_id -> request id
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.paused_since: float | None = None
        self.idle_since: float | None = None  # monotonic time of the first heartbeat saying "idle"

    # -- asyncio callbacks -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        raw = str(peer[0]) if peer else "?"
        try:
            self.addr = str(normalize_ip(raw))
        except ValueError:
            self.addr = raw
        self.peer = f"{self.addr}:{peer[1]}" if peer else self.addr
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[union-attr]
        self.server.on_connect(self)

    def data_received(self, data: bytes) -> None:
        try:
            requests = self.conn.receive_data(data)
        except ProtocolError as exc:
            self.server.fail(self, exc)
            return
        server = self.server
        timer = server.request_timer
        if timer is None:
            for req in requests:
                server.dispatch(self, req)
            return
        for req in requests:  # lmgrd_request_duration_seconds: observe only, no allocation
            t0 = perf_counter()
            server.dispatch(self, req)
            timer(type(req), perf_counter() - t0)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close()
        self.server.on_disconnect(self)

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it catches up.
        if self.transport is not None:
            self.transport.pause_reading()
        since = self.paused_since = time.monotonic()
        logger.warning("client %s is not reading its replies; pausing its requests", self.peer)
        self.server.loop.call_later(self.server.lease_timeout, self._stalled, since)

    def _stalled(self, since: float) -> None:
        if self.paused_since == since and self.transport is not None and not self.transport.is_closing():
            logger.warning("client %s read none of its replies for %g s (a lease timeout); dropping it",
                           self.peer, self.server.lease_timeout)
            self.transport.abort()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self.paused_since = None

    def handshake_expired(self) -> None:
        self.handshake_timer = None
        if self.conn.hello is None:
            logger.info("client %s sent no hello within %.1f s; dropped", self.peer,
                        self.server.cfg.handshake_timeout)
            self.server.fail(self, ProtocolError(
                ErrorCode.HANDSHAKE_TIMEOUT,
                f"no hello within {self.server.cfg.handshake_timeout:g} seconds",
                "send hello right after connecting",
            ))

    def who(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.peer


class Server:
    """Holds the ledger, the store, the licensing decisions and every connection."""

    def __init__(
        self,
        cfg: DaemonConfig,
        licensing: Licensing,
        store: LeaseStore,
        *,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
        reload: Callable[[], tuple[Licensing, list[str]]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.reload_fn = reload
        #: Event listeners (metrics, usage log): objects with any of on_grant(lease, who, waited),
        #: on_deny(product, version, code, who, customer_id), on_release(lease, reason) where reason is
        #: checkin | expiry | removal | revoked. Called synchronously on the loop: keep them cheap.
        self.observers: list[Any] = []
        #: Set by lmgrd.monitoring.metrics.attach: the Metrics object and the per-request timer (request type, seconds).
        self.metrics: Any = None
        self.request_timer: Callable[[type, float], None] | None = None
        self.licensing = licensing
        self.store = store
        self.loop = asyncio.get_running_loop()
        self.clock = clock or self.loop.time
        self.wall = wall
        self.ledger = Ledger(cfg.lease_timeout, new_token)
        self.sessions: dict[int, ClientProtocol] = {}
        self.per_address: dict[str, int] = {}
        self.next_session = 1
        self.pending: list[tuple[ClientProtocol, bytes | None]] = []
        self.flush_scheduled = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0
        self.sync_handle: asyncio.TimerHandle | None = None
        self.dirty = False
        self.waits: dict[int, WaitCtx] = {}
        #: Tokens freed by lmremove, so a later resume says SEAT_REMOVED rather than LEASE_NOT_FOUND (bounded).
        self.removed: dict[str, LostSeat] = {}
        self.next_waiter = 1
        self.counters = Counters()
        self.started_wall = wall()
        self.started = self.clock()
        self.closing = False
        self.listeners: list[asyncio.AbstractServer] = []
        self.ports: list[int] = []
        self.stopped = asyncio.Event()
        self.admin_token = ""
        self.admin_token_path: Path | None = None
        self.hb_interval = cfg.heartbeat_interval
        self.lease_timeout = cfg.lease_timeout
        for pool, count in licensing.pools().items():
            self.ledger.set_pool(pool, count)
        self._apply_policy()
        self._restore()

    # -- start-up and shutdown -----------------------------------------------------------------------------
    def _restore(self) -> None:
        records = self.store.load()
        keep: list[LeaseRecord] = []
        pools = self.licensing.pools()
        for rec in records:
            if (rec.customer_id, rec.product) in pools:
                keep.append(rec)
            else:
                logger.warning("lease %s for %s/%s restored from the state directory is no longer licensed "
                               "here; freed", rec.token[:8], rec.customer_id, rec.product)
                self.store.record_release(rec.token)
        self.ledger.restore(keep, self.clock())
        self.store.flush()
        if records:
            logger.info("restored %d lease(s) from the state directory; their clients have %.0f s to resume them",
                        len(keep), self.lease_timeout)
        self._arm()

    async def start(self) -> None:
        host = self.cfg.bind or None
        srv = await self.loop.create_server(
            lambda: ClientProtocol(self), host=host, port=self.cfg.port, backlog=self.cfg.backlog,
            reuse_address=True,
        )
        self.listeners.append(srv)
        socks = srv.sockets or ()
        self.ports = sorted({s.getsockname()[1] for s in socks})
        addrs = ", ".join(sorted({f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in socks}))
        logger.info("lmgrd %s listening on %s (heartbeat %g s, lease timeout %g s, reconnect grace %g s)",
                    __version__, addrs, self.hb_interval, self.lease_timeout, self.cfg.grace)
        self.sync_handle = self.loop.call_later(self.cfg.sync_interval, self._sync_tick)
        self.admin_token_path = self.cfg.admin_token_file or admin.token_path(self.ports[0])
        try:
            self.admin_token = admin.write_token(self.admin_token_path)
            logger.info("admin token for lmutil written to %s (mode 0600)", self.admin_token_path)
        except OSError as exc:
            self.admin_token = ""
            logger.error("cannot write the admin token file %s: %s; lmutil will be refused",
                         self.admin_token_path, exc)

    def request_shutdown(self, why: str) -> None:
        if self.closing:
            return
        self.closing = True
        logger.info("shutting down (%s): no new connections; leases are kept for their clients to resume", why)
        for srv in self.listeners:
            srv.close()
        self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        self._flush()
        for proto in list(self.sessions.values()):
            self._send(proto, error_frame(0, ProtocolError(
                ErrorCode.SHUTTING_DOWN, "the license server is shutting down",
                "your seats are kept; the client resumes them when the server is back")))
            self._send(proto, None)
        self._flush()
        for srv in self.listeners:
            try:
                await asyncio.wait_for(srv.wait_closed(), timeout=self.cfg.shutdown_timeout)
            except TimeoutError:
                logger.warning("some connections did not close within %.1f s", self.cfg.shutdown_timeout)
        for proto in list(self._all_protocols()):
            if proto.transport is not None:
                proto.transport.abort()
        self.store.flush()
        self.store.sync()
        self.store.close()
        if self.admin_token_path is not None and self.admin_token:
            admin.remove_token(self.admin_token_path, self.admin_token)
        if self.timer is not None:
            self.timer.cancel()
        if self.sync_handle is not None:
            self.sync_handle.cancel()
        self._notify("on_shutdown")  # observers flush (the usage log drains its queue)
        logger.info("lmgrd stopped; %d lease(s) persisted", sum(1 for _ in self.ledger.leases()))
        self.stopped.set()

    def _all_protocols(self) -> list[ClientProtocol]:
        return list(self.sessions.values())

    def _sync_tick(self) -> None:
        if self.dirty:
            self.dirty = False
            try:
                self.store.sync()
            except OSError as exc:
                logger.error("cannot sync the lease journal: %s", exc)
        if not self.closing:
            self.sync_handle = self.loop.call_later(self.cfg.sync_interval, self._sync_tick)

    # -- connections ---------------------------------------------------------------------------------------
    def on_connect(self, proto: ClientProtocol) -> None:
        limit = self.cfg.max_connections_per_address
        n = self.per_address.get(proto.addr, 0) + 1
        self.per_address[proto.addr] = n
        self.counters.connections += 1
        if self.closing:
            self.fail(proto, ProtocolError(ErrorCode.SHUTTING_DOWN, "the license server is shutting down",
                                           "retry in a few seconds"))
            return
        if limit and n > limit:
            logger.warning("refused a connection from %s: %d connections from that address (limit %d)",
                           proto.addr, n - 1, limit)
            self.fail(proto, ProtocolError(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"too many connections from {proto.addr}: the limit is {limit} per address",
                "close idle connections, or ask the administrator to raise max_connections_per_address",
            ))
            return
        proto.handshake_timer = self.loop.call_later(self.cfg.handshake_timeout, proto.handshake_expired)

    def on_disconnect(self, proto: ClientProtocol) -> None:
        n = self.per_address.get(proto.addr, 1) - 1
        if n <= 0:
            self.per_address.pop(proto.addr, None)
        else:
            self.per_address[proto.addr] = n
        if proto.handshake_timer is not None:
            proto.handshake_timer.cancel()
            proto.handshake_timer = None
        for waiter_id in list(proto.waiters):
            self._drop_wait(waiter_id)
        if proto.session:
            self.sessions.pop(proto.session, None)
            detached = self.ledger.detach_session(proto.session, self.clock(), self.cfg.grace)
            if detached:
                logger.info("client %s disconnected holding %d seat(s); kept %.0f s for a reconnect",
                            proto.who(), len(detached), self.cfg.grace)
                self._arm()

    def fail(self, proto: ClientProtocol, exc: ProtocolError, request_id: int = 0) -> None:
        """Answer with an error and close this one client."""
        if proto.transport is None or proto.transport.is_closing():
            return
        if exc.code not in (ErrorCode.HANDSHAKE_TIMEOUT, ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.SHUTTING_DOWN):
            logger.warning("dropping client %s: %s", proto.peer, exc)
        self._send(proto, error_frame(request_id, exc))
        self._send(proto, None)

    # -- replies and group commit --------------------------------------------------------------------------
    def _send(self, proto: ClientProtocol, frame: bytes | None) -> None:
        self.pending.append((proto, frame))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        elif len(self.pending) >= FLUSH_EARLY:
            # A pipelining client (or one that never reads) must meet write flow control within this read,
            # not after the loop has read megabytes more of its requests.
            self._flush()

    def _flush(self) -> None:
        """Make this iteration's grants and releases durable, then send its replies (in order)."""
        self.flush_scheduled = False
        self.store.flush()
        self.dirty = True
        pending, self.pending = self.pending, []
        for proto, frame in pending:
            t = proto.transport
            if t is None or t.is_closing():
                continue
            if frame is None:
                t.close()
            else:
                t.write(frame)

    def _error(self, proto: ClientProtocol, rid: int, code: ErrorCode, message: str, hint: str = "") -> None:
        self._send(proto, encode_frame(ErrorReply(rid, code, message, hint).to_wire()))

    # -- requests ------------------------------------------------------------------------------------------
    def dispatch(self, proto: ClientProtocol, req: Any) -> None:
        if isinstance(req, Heartbeat):
            self._heartbeat(proto, req)
        elif isinstance(req, Checkout):
            self._checkout(proto, req)
        elif isinstance(req, Checkin):
            self._checkin(proto, req)
        elif isinstance(req, Hello):
            self._hello(proto, req)
        elif isinstance(req, Resume):
            self._resume(proto, req)
        elif isinstance(req, Status):
            self._send(proto, encode_frame(StatusReply(req.id, self.status()).to_wire()))
        elif isinstance(req, Admin):
            try:
                data = admin.handle(self, proto, req.command, req.args, req.auth)
            except ProtocolError as exc:
                self._error(proto, req.id, exc.code, exc.message, exc.hint)
            else:
                self._send(proto, encode_frame(StatusReply(req.id, data).to_wire()))
        elif isinstance(req, BadRequest):
            logger.info("bad request from %s: %s", proto.who(), req.error.message)
            self._error(proto, req.id, req.error.code, req.error.message,
                        req.error.hint or "see protocol/PROTOCOL.md for the message schema")

    def _hello(self, proto: ClientProtocol, req: Hello) -> None:
        if proto.handshake_timer is not None:
            proto.handshake_timer.cancel()
            proto.handshake_timer = None
        problem = hostname_problem(req.host)
        if problem is not None:
            logger.warning("refused client %s: %s", proto.peer, problem)
            self.fail(proto, ProtocolError(ErrorCode.INVALID_HOSTNAME, problem,
                                           "rename the client PC, then try again"), req.id)
            return
        proto.user = req.user
        proto.host = short_hostname(req.host)
        proto.pid = req.pid
        proto.display = "".join(req.display.split()) or proto.host
        proto.session = self.next_session
        self.next_session += 1
        self.sessions[proto.session] = proto
        logger.debug("hello from %s (%s pid %d, client %s)", proto.who(), proto.peer, proto.pid,
                     req.client_version)
        self._send(proto, encode_frame(Welcome(
            req.id, proto.conn.proto, __version__, self.hb_interval, self.lease_timeout,
            self.cfg.max_frame_bytes, proto.session).to_wire()))

    def _share_key(self, share: str, proto: ClientProtocol) -> tuple[str, ...]:
        if share == "user_host":
            return (proto.user.lower(), proto.host)
        if share == "host":
            return (proto.host,)
        return ()  # "none": every checkout takes its own seat

    def _checkout(self, proto: ClientProtocol, req: Checkout) -> None:
        now = self.clock()
        decision = self.licensing.candidates(req.product, req.version, proto.addr,
                                             datetime.fromtimestamp(self.wall(), UTC))
        if decision.error is not None:
            code, message, hint = decision.error
            self._deny(proto, req, code, message, hint)
            return
        pp = self.licensing.policy.products.get(req.product) if self.licensing.policy.products else None
        if pp is not None:
            why = pp.refusal(proto.user, proto.host)
            if why is not None:
                self._deny(proto, req, ErrorCode.EXCLUDED, why,
                           "ask the license administrator to change the usage policy (lmgrd config 'policy')")
                return
        wall = self.wall()
        for lic in decision.licenses:
            pool = (lic.customer_id, req.product)
            lease = self.ledger.checkout(pool, self._share_key(lic.share, proto), proto.user, proto.host,
                                         proto.pid, req.version, proto.display, proto.session, now, wall)
            if lease is not None:
                self._granted(proto, req.id, lease, 0.0)
                return
        first = decision.licenses[0]
        pool = (first.customer_id, req.product)
        code, message, hint = self._refusal(req.product, decision.licenses, proto)
        if code is not ErrorCode.MAX_REACHED and req.wait > 0 and not self.closing:
            self._enqueue(proto, req, pool, first.share, now, wall)
            return
        self._deny(proto, req, code, message, hint)

    def _refusal(self, product: str, licenses: Sequence[License], proto: ClientProtocol
                 ) -> tuple[ErrorCode, str, str]:
        """Why no pool of ``product`` grants ``proto`` a seat now (cold path: after every pool said no)."""
        reasons = {self.ledger.refusal((lic.customer_id, product), self._share_key(lic.share, proto), proto.user,
                                       proto.host) for lic in licenses}
        count = sum(p.count for lic in licenses for p in lic.products if p.name == product)
        if reasons == {"max"}:
            pp = self.licensing.policy.get(product)
            rules = [f"max {r.seats} for {r.subject}" for r in (pp.max if pp else ())
                     if r.subject.matches(proto.user, proto.host)]
            return (ErrorCode.MAX_REACHED,
                    f"{proto.user}@{proto.host} already holds the most seats of {product} the usage policy allows "
                    f"({', '.join(rules) or 'max'})",
                    "check in a seat you hold first, or ask the license administrator to change the policy")
        if "reserved" in reasons:
            return (ErrorCode.RESERVED,
                    f"the free seats of {product} are reserved for others by the usage policy",
                    "try again later, check out with a wait, or ask the license administrator for a reservation")
        return (ErrorCode.NO_SEATS, f"all {count} seat(s) of {product} are in use",
                "try again later, check out with a wait, or ask the administrator who holds them "
                "(lmutil lmstat -a)")

    def _notify(self, event: str, *args: Any) -> None:
        for obs in self.observers:
            fn = getattr(obs, event, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception:
                    logger.exception("observer %r failed on %s", obs, event)

    def _deny(self, proto: ClientProtocol, req: Checkout, code: ErrorCode, message: str, hint: str) -> None:
        self.counters.denied[code] = self.counters.denied.get(code, 0) + 1
        if self.observers:
            self._notify("on_deny", req.product, req.version, code, proto, None)
        if logger.isEnabledFor(logging.INFO):
            logger.info("DENIED %s %s to %s: %s %s", req.product, req.version, proto.who(), code, message)
        self._error(proto, req.id, code, message, hint)

    def _granted(self, proto: ClientProtocol, rid: int, lease: LeaseInfo, waited: float) -> None:
        self.store.record_grant(LeaseRecord(
            lease.token, lease.pool[0], lease.pool[1], lease.share_key, lease.user, lease.host, lease.pid,
            lease.version, lease.display, lease.granted_at))
        self.counters.granted += 1
        if self.observers:
            self._notify("on_grant", lease, proto, waited)
        if logger.isEnabledFor(logging.INFO):
            logger.info("OUT %s %s to %s lease %s (%d/%d in use, customer %s)", lease.pool[1], lease.version,
                        proto.who(), lease.token[:8], self.ledger.in_use(lease.pool),
                        self.licensing.count(lease.pool), lease.pool[0])
        self._send(proto, Granted.frame(rid, lease.token, lease.pool[0], lease.pool[1], lease.version,
                                        self.lease_timeout, self.hb_interval, waited))
        if self.timer is None:
            self._arm()

    def _enqueue(self, proto: ClientProtocol, req: Checkout, pool: PoolKey, share: str, now: float,
                 wall: float) -> None:
        waiter_id = self.next_waiter
        self.next_waiter += 1
        key = self._share_key(share, proto)
        ctx = WaitCtx(proto, req.id, req.product, req.version, now, pool, key)
        waiter = Waiter(waiter_id, pool, key, proto.user, proto.host, proto.pid, req.version, proto.display,
                        proto.session, ctx)
        position = self.ledger.enqueue(waiter)
        ctx.timer = self.loop.call_later(req.wait, self._wait_expired, waiter_id)
        self.waits[waiter_id] = ctx
        proto.waiters[waiter_id] = req.id
        logger.info("QUEUED %s %s for %s (position %d, waiting up to %g s)", req.product, req.version,
                    proto.who(), position, req.wait)

    def _wait_expired(self, waiter_id: int) -> None:
        ctx = self.waits.pop(waiter_id, None)
        if ctx is None:
            return
        ctx.timer = None
        ctx.proto.waiters.pop(waiter_id, None)
        self.ledger.cancel_wait(waiter_id)
        waited = self.clock() - ctx.started
        # Why it is still refused, from the pool it waited in (the ledger knows; no license check again).
        reason = self.ledger.refusal(ctx.pool, ctx.share_key, ctx.proto.user, ctx.proto.host)
        code = {"max": ErrorCode.MAX_REACHED, "reserved": ErrorCode.RESERVED}.get(reason or "", ErrorCode.NO_SEATS)
        self.counters.denied[code] = self.counters.denied.get(code, 0) + 1
        if self.observers:
            self._notify("on_deny", ctx.product, ctx.version, code, ctx.proto, None)
        logger.info("DENIED %s %s to %s after waiting %.1f s: no seat became free (%s)", ctx.product, ctx.version,
                    ctx.proto.who(), waited, code)
        what = "no seat" if code is ErrorCode.NO_SEATS else "no seat the usage policy allows you"
        self._error(ctx.proto, ctx.request_id, code,
                    f"{what} of {ctx.product} became free within {waited:.0f} s",
                    "try again later or wait longer")

    def _drop_wait(self, waiter_id: int) -> None:
        ctx = self.waits.pop(waiter_id, None)
        if ctx is None:
            return
        if ctx.timer is not None:
            ctx.timer.cancel()
        ctx.proto.waiters.pop(waiter_id, None)
        self.ledger.cancel_wait(waiter_id)

    def _serve_waiters(self, served: list[tuple[Waiter, LeaseInfo]]) -> None:
        now = self.clock()
        for waiter, lease in served:
            ctx = self.waits.pop(waiter.waiter_id, None)
            if ctx is None or ctx.proto.transport is None or ctx.proto.transport.is_closing():
                # The waiter left between the ledger's decision and now: give the seat straight back.
                logger.info("waiter for %s left before its grant; seat released", lease.pool[1])
                _, more = self.ledger.release(lease.token, now, self.wall())
                self._serve_waiters(more)
                continue
            if ctx.timer is not None:
                ctx.timer.cancel()
            ctx.proto.waiters.pop(waiter.waiter_id, None)
            self._granted(ctx.proto, ctx.request_id, lease, now - ctx.started)

    def _checkin(self, proto: ClientProtocol, req: Checkin) -> None:
        lease, served = self.ledger.release(req.token, self.clock(), self.wall())
        if lease is not None:
            self.store.record_release(lease.token)
            self.counters.released += 1
            if self.observers:
                self._notify("on_release", lease, "checkin")
            if logger.isEnabledFor(logging.INFO):
                logger.info("IN %s %s from %s lease %s (%d/%d in use)", lease.pool[1], lease.version,
                            proto.who(), lease.token[:8], self.ledger.in_use(lease.pool),
                            self.licensing.count(lease.pool))
        self._send(proto, CheckedIn.frame(req.id, lease is not None))
        if served:
            self._serve_waiters(served)

    def remove_lease(self, token: str, why: str) -> LeaseInfo | None:
        """Free one lease now (``lmutil lmremove``); ``None`` if no lease has that token.

        The release is journalled, reported to observers as ``on_release(lease, "removal")``, and its seat
        goes to the waiters. The holder learns it at its next heartbeat (``SEAT_REMOVED``, ``why`` in the
        message), or at its resume if it is disconnected now.
        """
        lease, served = self.ledger.release(token, self.clock(), self.wall())
        if lease is None:
            return None
        self.store.record_release(lease.token)
        self.counters.released += 1
        if self.observers:
            self._notify("on_release", lease, "removal")
        logger.warning("REMOVED %s %s of %s@%s lease %s: %s", lease.pool[1], lease.version, lease.user,
                       lease.host, lease.token[:8], why)
        lost = LostSeat(lease.token, ErrorCode.SEAT_REMOVED, f"this seat of {lease.pool[1]} was freed by the "
                        f"license administrator ({why}); check out again to continue")
        proto = self.sessions.get(lease.session) if lease.session is not None else None
        if proto is not None:
            proto.lost.append(lost)
        # Kept even when told at a heartbeat: the client may drop before that and come back with a resume.
        self.removed[lease.token] = lost
        while len(self.removed) > REMOVED_MEMORY:
            del self.removed[next(iter(self.removed))]
        self._send_nothing()  # make the release durable promptly
        if served:
            self._serve_waiters(served)
        return lease

    def _heartbeat(self, proto: ClientProtocol, req: Heartbeat) -> None:
        now = self.clock()
        if req.idle:
            if proto.idle_since is None:
                proto.idle_since = now
            if self.licensing.policy.products:
                self._reclaim_idle(proto, max(req.idle_for, now - proto.idle_since))
        elif proto.idle_since is not None:
            proto.idle_since = None
        renewed = self.ledger.renew_session(proto.session, now)
        lost = tuple(proto.lost)
        if lost:
            proto.lost.clear()
        self._send(proto, encode_frame(HeartbeatAck(req.id, renewed, lost).to_wire()))

    def _reclaim_idle(self, proto: ClientProtocol, idle_for: float) -> None:
        """Free this session's seats of products whose policy ``timeout`` its idle time has passed."""
        policy = self.licensing.policy
        for lease in self.ledger.session_leases(proto.session):
            pp = policy.get(lease.pool[1])
            if pp is None or pp.timeout is None or idle_for < pp.timeout:
                continue
            released, served = self.ledger.release(lease.token, self.clock(), self.wall())
            if released is None:
                continue
            self.store.record_release(lease.token)
            self.counters.released += 1
            if self.observers:
                self._notify("on_release", lease, "idle")
            logger.info("IDLE %s %s of %s lease %s reclaimed: idle %.0f s, policy timeout %g s", lease.pool[1],
                        lease.version, proto.who(), lease.token[:8], idle_for, pp.timeout)
            proto.lost.append(LostSeat(lease.token, ErrorCode.IDLE_TIMEOUT,
                                       f"this seat of {lease.pool[1]} was reclaimed after {idle_for:.0f} s idle (the "
                                       f"usage policy frees seats idle longer than {pp.timeout:g} s); check out "
                                       "again to continue"))
            if served:
                self._serve_waiters(served)

    def _apply_policy(self) -> None:
        """Give every pool its product's reserve/max rules (or none); serve() must follow a change."""
        policy = self.licensing.policy
        for pool in self.ledger.pools():
            self.ledger.set_policy(pool, policy.get(pool[1]))

    def _resume(self, proto: ClientProtocol, req: Resume) -> None:
        now = self.clock()
        resumed: list[str] = []
        lost: list[LostSeat] = []
        for token in req.tokens:
            before = self.ledger.get(token)
            old_session = before.session if before is not None else None
            lease = self.ledger.resume(token, proto.session, now)
            if lease is None:
                if token in self.removed:
                    lost.append(self.removed.pop(token))
                    continue
                lost.append(LostSeat(token, ErrorCode.LEASE_NOT_FOUND,
                                     "this seat is no longer held: it lapsed, was checked in or was removed"))
                continue
            if old_session and old_session != proto.session and old_session in self.sessions:
                logger.info("lease %s moved from session %d to %d", token[:8], old_session, proto.session)
            resumed.append(token)
        logger.info("RESUME %s: %d seat(s) resumed, %d lost", proto.who(), len(resumed), len(lost))
        self._send(proto, encode_frame(Resumed(req.id, tuple(resumed), tuple(lost)).to_wire()))

    # -- expiry ----------------------------------------------------------------------------------------------
    def _arm(self) -> None:
        nd = self.ledger.next_deadline()
        if nd is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            return
        if self.timer is not None:
            if nd >= self.timer_when:
                return
            self.timer.cancel()
        self.timer_when = nd
        self.timer = self.loop.call_at(nd, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        now = self.clock()
        lapsed, served = self.ledger.expire(now, self.wall(), EXPIRE_BATCH)
        for lease in lapsed:
            self.store.record_release(lease.token)
            self.counters.expired += 1
            if self.observers:
                self._notify("on_release", lease, "expiry")
            logger.info("EXPIRED %s %s of %s@%s lease %s: no heartbeat for %g s", lease.pool[1], lease.version,
                        lease.user, lease.host, lease.token[:8], self.lease_timeout)
            if lease.session is not None:
                proto = self.sessions.get(lease.session)
                if proto is not None:
                    proto.lost.append(LostSeat(lease.token, ErrorCode.LEASE_EXPIRED,
                                               f"no heartbeat reached the server for {self.lease_timeout:g} s"))
        if lapsed:
            self._send_nothing()
        if served:
            self._serve_waiters(served)
        if len(lapsed) >= EXPIRE_BATCH:
            self.timer_when = now
            self.timer = self.loop.call_soon(self._on_timer)  # type: ignore[assignment]
        else:
            self._arm()

    def _send_nothing(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    # -- reload (lmreread, SIGHUP) --------------------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Reload licenses without dropping a connection or a lease.

        A license file that now fails validation is refused with the reason and, if it was served before,
        the old copy keeps serving. Pools that disappear get count 0: their leases run on until checked in
        or lapsed, and no new seat is granted there.
        """
        if self.reload_fn is None:
            return {"reloaded": False, "problems": ["this server was started without a reload source"]}
        new, problems = self.reload_fn()
        new_paths = {str(p) for p, _ in new.served}
        kept = [(p, lic) for p, lic in self.licensing.served
                if str(p) not in new_paths and any(r.source == str(p) for r in new.refused)
                and lic.customer_id not in new.revoked]  # a revoked license never keeps serving
        for p, lic in kept:
            problems.append(f"{p}: the new file was refused; the previously loaded license {lic.customer_id} "
                            "keeps serving")
        merged = Licensing(new.served + kept, [r for r in new.refused if r.source not in {str(p) for p, _ in kept}],
                           # new.activations is None when the vendor key failed: keep the running state then
                           activations=new.activations or self.licensing.activations,
                           revoked=new.revoked if new.activations else self.licensing.revoked,
                           daemon_site=new.daemon_site if new.activations else self.licensing.daemon_site,
                           policy=new.policy)
        old_pools = set(self.licensing.pools())
        self.licensing = merged
        revocations.end_revoked_seats(self, merged.revoked)
        for pool, count in merged.pools().items():
            self.ledger.set_pool(pool, count)
        for pool in old_pools - set(merged.pools()):
            self.ledger.set_pool(pool, 0)
            logger.warning("pool %s/%s is no longer licensed: no new seats; %d held seat(s) run on until "
                           "checked in or lapsed", pool[0], pool[1], self.ledger.in_use(pool))
        self._apply_policy()
        if merged.policy.products:
            logger.info("reread: usage policy for %s", ", ".join(sorted(merged.policy.products)))
        for prob in problems:
            logger.error("reread: %s", prob)
        served = [lic.customer_id for _, lic in merged.served]
        logger.info("reread: serving %d license(s): %s", len(served), ", ".join(served) or "none")
        for pool in merged.pools():
            self._serve_waiters(self.ledger.serve(pool, self.clock(), self.wall()))
        return {"reloaded": True, "serving": served, "problems": problems}

    # -- status ----------------------------------------------------------------------------------------------
    def reserved(self, pool: PoolKey) -> int:
        """Free seats of ``pool`` held back for the subjects of a usage-policy ``reserve`` rule."""
        return self.ledger.reserved(pool)

    def status(self) -> dict[str, Any]:
        pools = []
        for pool, count in sorted(self.licensing.pools().items()):
            lic = self.licensing.license_for(pool)
            prod = lic.product(pool[1]) if lic else None
            pools.append({
                "customer_id": pool[0], "product": pool[1], "version": prod.version if prod else "",
                "count": count, "in_use": self.ledger.in_use(pool), "queued": self.ledger.queued(pool),
                "reserved": self.ledger.reserved(pool),
                "expires": lic.expires.isoformat() if lic and lic.expires else None,
                "share": lic.share if lic else "",
                "activation": self.licensing.activation_state(pool[0], datetime.fromtimestamp(self.wall(), UTC)),
            })
        return {
            "server_version": __version__,
            "uptime_seconds": round(self.clock() - self.started, 3),
            "heartbeat_interval": self.hb_interval,
            "lease_timeout": self.lease_timeout,
            "connections": len(self.sessions),
            "pools": pools,
            "refused_licenses": self.licensing.refusals(),
        }


def install_signal_handlers(server: Server) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):  # Windows has no SIGHUP
        loop.add_signal_handler(signal.SIGHUP, server.reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, server.request_shutdown, signal.Signals(sig).name)
        except (NotImplementedError, RuntimeError):  # Windows
            signal.signal(sig, lambda s, f: loop.call_soon_threadsafe(server.request_shutdown, "signal"))
