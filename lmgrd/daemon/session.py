"""Per-client sessions and the request handlers: what each request does, with no socket in sight.

A :class:`Session` is one client's state (who it is after ``hello``, the seats it has lost since its last
heartbeat, its queued checkouts). :class:`Handlers` answers each request of a session: ``hello``,
``checkout`` (licensing checks in the documented order, then the lease lifecycle), ``checkin``,
``heartbeat`` (renewal, idle reclaim), ``resume``, ``status`` and ``admin`` (handed to the admin handler the
composition root plugs in). Replies go to the outbox; seats are granted and ended only by
:mod:`lmgrd.daemon.leases`. The transport (:mod:`lmgrd.daemon.transport`) feeds bytes in; tests drive the
handlers directly with a recording transport.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from lmgrd import __version__
from lmgrd.core.ledger import LeaseInfo, owner_digest, share_key_for
from lmgrd.core.licensing import Licensing, seat_refusal
from lmgrd.core.logtext import printable
from lmgrd.daemon.events import EndReason
from lmgrd.daemon.guard import RefusalCounts, RefusalLog
from lmgrd.daemon.leases import LeaseLifecycle
from lmgrd.daemon.outbox import Outbox, Transport
from protocol import (
    Admin,
    BadRequest,
    CheckedIn,
    Checkin,
    Checkout,
    Connection,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Hello,
    LostSeat,
    ProtocolError,
    Resume,
    Resumed,
    Role,
    Status,
    StatusReply,
    Welcome,
    encode_frame,
    error_frame,
)
from protocol.validation import hostname_problem, short_hostname

__all__ = ["AdminHandler", "Handlers", "Session"]

logger = logging.getLogger(__name__)

_CHECKIN = EndReason.CHECKIN

#: Runs one admin command for a session: (session, command, args, auth) -> reply data, or ProtocolError. A
#: command that waits on something outside the daemon (``activate`` asking the vendor's activation service)
#: returns an awaitable of the reply data instead; the reply is sent when it completes.
AdminHandler = Callable[["Session", str, dict[str, Any], str], "dict[str, Any] | Awaitable[dict[str, Any]]"]


class Session:
    """One client connection's state. Plain attributes: the transport subclass adds the asyncio callbacks."""

    # Kept small: one per connection, and a license server holds thousands (benchmarks' idle scenario). What
    # most clients never need is allocated on first use: ``lost`` (a seat lost between two heartbeats) and
    # ``waiters`` (a queued checkout); the peer string and ``user@host`` are built only for the log lines that
    # name them; clients of one host share its name's string (``_short_host``).
    __slots__ = (
        "addr", "allowance", "conn", "display", "host", "idle_since", "last_active", "lost", "owner", "paused_since",
        "pid", "port", "session", "transport", "user", "waiters",
    )

    def __init__(self, max_frame_bytes: int) -> None:
        self.conn = Connection(Role.SERVER, max_frame_bytes)
        self.transport: Transport | None = None
        self.session = 0  # set at hello; 0 = not yet identified
        #: The normalized address the client connects from (one shared string per address), and its port.
        self.addr = ""
        self.port = 0
        # Who this client is, set at hello: the session is the ledger's holder (lmgrd.core.ledger.HolderLike).
        self.user = ""
        self.host = ""
        self.pid = 0
        self.display = ""
        #: Who may resume or check in this client's leases from another connection (owner_digest at hello).
        self.owner = ""
        #: Monotonic time of the last bytes received, and what is left of the request-rate allowance.
        self.last_active = 0.0
        self.allowance = 0.0
        #: Seats lost since the last heartbeat, told in its ack: ``()`` (shared, empty) until the first one.
        self.lost: list[LostSeat] | tuple[()] = ()
        #: This client's queued checkouts, waiter_id -> request id: ``None`` until the first one.
        self.waiters: dict[int, int] | None = None
        self.paused_since: float | None = None
        self.idle_since: float | None = None  # monotonic time of the first heartbeat saying "idle"

    @property
    def peer(self) -> str:
        """``address:port`` of the client, for log lines (built when one is written, not kept)."""
        return f"{self.addr}:{self.port}" if self.port else self.addr

    def tell(self, seat: LostSeat) -> None:
        """Tell this client at its next heartbeat that it lost ``seat``."""
        if self.lost:
            self.lost.append(seat)
        else:
            self.lost = [seat]

    def add_waiter(self, waiter_id: int, request_id: int) -> None:
        """A checkout of this client was queued (``waiter_id`` in the lease lifecycle)."""
        if self.waiters is None:
            self.waiters = {waiter_id: request_id}
        else:
            self.waiters[waiter_id] = request_id

    def drop_waiter(self, waiter_id: int) -> None:
        """A queued checkout of this client was served, refused or cancelled."""
        w = self.waiters
        if w is not None:
            w.pop(waiter_id, None)
            if not w:
                self.waiters = None

    def identify(self, session: int, user: str, host: str, pid: int, display: str, owner: str = "") -> None:
        """Record who this client is (at hello)."""
        self.session = session
        self.user = user
        self.host = host
        self.pid = pid
        self.display = display
        self.owner = owner or f"connection:{os.urandom(16).hex()}"

    def who(self) -> str:
        """The client as log lines name it: ``user@host`` (escaped: the user name is the client's choice)."""
        # Built per log line, not kept per connection: a line written costs microseconds anyway, and the
        # user is the client's own choice, escaped (lmgrd.core.logtext) so it cannot forge a line.
        return f"{printable(self.user)}@{self.host}" if self.user else self.peer

    def holds(self, lease: LeaseInfo) -> bool:
        """May this client resume or check in ``lease``? Its own connection's, or its holder's: the same
        user, host and hello secret (``owner``). A lease recorded before leases were bound (owner "") is the
        same user's on the same host."""
        if lease.session is not None and lease.session == self.session:
            return True
        if lease.owner:
            return lease.owner == self.owner
        return lease.user == self.user and lease.host == self.host


class Daemon(Protocol):
    """What the handlers need of the server shell."""

    licensing: Licensing
    closing: bool
    request_rate: float

    def status(self) -> dict[str, Any]: ...


class Handlers:
    """The request handlers of every session (one instance per daemon)."""

    def __init__(self, daemon: Daemon, leases: LeaseLifecycle, outbox: Outbox, sessions: dict[int, Session], *,
                 heartbeat_interval: float, lease_timeout: float, max_frame_bytes: int,
                 clock: Callable[[], float], wall: Callable[[], float], fail: Callable[..., None],
                 refusals: RefusalCounts | None = None, refusal_log: RefusalLog | None = None,
                 awaiting_hello: dict[Any, float] | None = None) -> None:
        self.daemon = daemon
        self.leases = leases
        self.ledger = leases.ledger
        self.outbox = outbox
        self.sessions = sessions
        self.hb_interval = heartbeat_interval
        self.lease_timeout = lease_timeout
        self.max_frame_bytes = max_frame_bytes
        #: (request id, proto, session) -> the welcome frame; the rest of it is this daemon's, encoded once.
        self.welcome = Welcome.framer(__version__, heartbeat_interval, lease_timeout, max_frame_bytes)
        self.clock = clock
        self.wall = wall
        self.fail = fail
        self.refusals = refusals if refusals is not None else RefusalCounts()
        self.refusal_log = refusal_log if refusal_log is not None else RefusalLog(clock, _no_timer, self.refusals)
        self.next_session = 1
        #: Connections that owe a hello, with its deadline (the server's handshake sweep; a hello removes its own).
        self.awaiting_hello: dict[Any, float] = awaiting_hello if awaiting_hello is not None else {}
        #: Set by the composition root (lmgrd.cli) to lmgrd.admin's handler; without it admin is refused.
        self.admin: AdminHandler | None = None
        #: Admin commands still waiting on their answer (kept referenced so the loop cannot drop them).
        self._admin_tasks: set[asyncio.Future[dict[str, Any]]] = set()
        #: Every message class the connection can hand over, and its handler.
        self.routes: dict[type, Callable[[Session, Any], None]] = {
            Heartbeat: self.heartbeat, Checkout: self.checkout, Checkin: self.checkin, Hello: self.hello,
            Resume: self.resume, Status: self.status, Admin: self.admin_command, BadRequest: self.bad_request,
        }
        #: The same handlers for a request the connection handed over as its decoded map
        #: (``Connection.receive_hot``): its fields read by name, no message object.
        self.hot: dict[type, Callable[[Session, dict[str, Any]], None]] = {
            Checkout: self._checkout_map, Checkin: self._checkin_map, Heartbeat: self._heartbeat_map,
        }

    def dispatch(self, s: Session, req: Any) -> None:
        """Run the handler of ``req``'s message class (one dict lookup: this is every request's path)."""
        self.routes[type(req)](s, req)

    def status(self, s: Session, req: Status) -> None:
        self.outbox.reply(s, StatusReply, encode_frame(StatusReply(req.id, self.daemon.status()).to_wire()))

    def bad_request(self, s: Session, req: BadRequest) -> None:
        self.refusals.bad_requests += 1
        self.refusal_log("bad requests", logging.INFO, "bad request from %s: %s", s.who(), req.error.message)
        self.error(s, req.id, req.error.code, req.error.message,
                   req.error.hint or "see protocol/PROTOCOL.md for the message schema")

    def rate_limited(self, s: Session, req: Any) -> None:
        """Refuse one request over the connection's rate (the transport decides which; nothing is run).

        Except a checkin of a seat this client holds: refusing it would keep the seat from everyone until its
        lease lapses, and such checkins are bounded by the seats the client holds (each ends one). A checkin of
        any other token is refused like every other request, so the exemption is no way around the limit."""
        if type(req) is Checkin:
            held = self.ledger.get(req.token)
            if held is not None and s.holds(held):  # holds() covers the own connection's leases first
                self.check_in(s, req.id, req.token)
                return
        self.refusals.rate_limited += 1
        rate = self.daemon.request_rate
        self.refusal_log("rate limits", logging.WARNING, "rate limit: %s (%s) sent more than %g requests a second; "
                         "refused its %s", s.who(), s.peer, rate, getattr(req, "OP", "bad request"))
        self.error(s, req.id, ErrorCode.RATE_LIMITED,
                   f"this connection sent more than {rate:g} requests a second; the request was not run",
                   "slow down and send it again; a license client needs a few requests a second at most")

    def error(self, s: Session, rid: int, code: ErrorCode, message: str, hint: str = "") -> None:
        self.outbox.reply(s, ErrorReply, encode_frame(ErrorReply(rid, code, message, hint).to_wire()))

    # -- hello -----------------------------------------------------------------------------------------------
    def hello(self, s: Session, req: Hello) -> None:
        self.awaiting_hello.pop(s, None)  # the handshake timeout no longer applies
        problem = _host_problem(req.host)
        if problem is not None:
            logger.warning("refused client %s: %s", s.peer, problem)
            self.fail(s, ProtocolError(ErrorCode.INVALID_HOSTNAME, problem, "rename the client PC, then try again"),
                      req.id)
            return
        host = _short_host(req.host)
        # A client without a secret (protocol 1) gets an owner of this connection's own: its leases can be
        # resumed by no other connection, since nothing would prove it is the same client.
        s.identify(self.next_session, req.user, host, req.pid, "".join(req.display.split()) or host,
                   owner_digest(req.user, host, req.secret) if req.secret else "")
        self.next_session += 1
        self.sessions[s.session] = s
        if logger.isEnabledFor(logging.DEBUG):  # who() and peer are built for the line: only when it is written
            logger.debug("hello from %s (%s pid %d, client %s)", s.who(), s.peer, s.pid, req.client_version)
        self.outbox.reply(s, Welcome, self.welcome(req.id, s.conn.proto, s.session))

    # -- checkout and checkin ----------------------------------------------------------------------------------
    def checkout(self, s: Session, req: Checkout) -> None:
        self.check_out(s, req.id, req.product, req.version, req.wait)

    def _checkout_map(self, s: Session, d: dict[str, Any]) -> None:
        self.check_out(s, d["id"], d["product"], d["version"], d.get("wait", 0.0))

    def check_out(self, s: Session, rid: int, product: str, version: str, wait: float) -> None:
        """A checkout: licensing checks in the documented order, then the lease lifecycle grants, queues or
        denies (the one path of every checkout, whichever way the request was decoded)."""
        holder = s  # the session is the holder; the connection state machine admits checkout only after hello
        now = self.clock()
        wall = self.wall()
        licensing = self.daemon.licensing
        decision = licensing.candidates(product, version, s.addr, holder.user, holder.host,
                                        datetime.fromtimestamp(wall, UTC), holder.display)
        leases = self.leases
        if decision.error is not None:
            code, message, hint = decision.error
            leases.deny(s, rid, product, version, code, message, hint)
            return
        if leases.outbox.store_error is not None and leases.store_refusal(s, rid, product, version):
            return
        user, host = holder.user, holder.host
        for lic in decision.licenses:
            if leases.checkout(s, rid, (lic.customer_id, product), share_key_for(lic.share, user, host),
                               holder, version, now, wall, wait if not self.daemon.closing else 0.0):
                return
        first = decision.licenses[0]
        addr, display = holder.addr, holder.display
        reasons = {self.ledger.refusal((lic.customer_id, product), share_key_for(lic.share, user, host), user,
                                       host, addr, display) for lic in decision.licenses}
        code, message, hint = seat_refusal(product, decision.licenses, reasons, licensing.policy, user, host,
                                           addr, display)
        if code is not ErrorCode.MAX_REACHED and wait > 0 and not self.daemon.closing:
            leases.enqueue(s, rid, product, version, (first.customer_id, product),
                           share_key_for(first.share, user, host), holder, wait, now)
            return
        leases.deny(s, rid, product, version, code, message, hint)

    def checkin(self, s: Session, req: Checkin) -> None:
        self.check_in(s, req.id, req.token)

    def _checkin_map(self, s: Session, d: dict[str, Any]) -> None:
        self.check_in(s, d["id"], d["token"])

    def check_in(self, s: Session, rid: int, token: str) -> None:
        held = self.ledger.get(token)
        if held is None or (held.session != s.session and not s.holds(held)):  # own connection's: no call
            # Someone else's seat, or none: nothing is freed, and the answer is the same either way (no
            # oracle for which tokens exist).
            self.token_refused(s, "checkin", token, held)
            self.outbox.reply(s, CheckedIn, CheckedIn.frame(rid, False))
            return
        lease = self.leases.end(token, _CHECKIN, "", s)
        self.outbox.reply(s, CheckedIn, CheckedIn.frame(rid, lease is not None))

    def token_refused(self, s: Session, request: str, token: str, lease: LeaseInfo | None) -> None:
        """Count (and, rate-limited, log) a checkin or resume of a lease this client does not hold."""
        if lease is None:
            self.refusals.token(request, "unknown")
            return
        self.refusals.token(request, "not_holder")
        self.refusal_log("token refusals", logging.WARNING,
                         "refused %s of lease %s by %s (%s): the lease is %s@%s's, granted to another client",
                         request, token[:8], s.who(), s.peer, printable(lease.user), lease.host)

    # -- heartbeat, idle and resume --------------------------------------------------------------------------
    def heartbeat(self, s: Session, req: Heartbeat) -> None:
        self.beat(s, req.id, req.idle, req.idle_for)

    def _heartbeat_map(self, s: Session, d: dict[str, Any]) -> None:
        self.beat(s, d["id"], d.get("idle", False), 0.0)

    def beat(self, s: Session, rid: int, idle: bool, idle_for: float) -> None:
        """A heartbeat: renew this session's leases, reclaim idle seats under a usage policy, say what was lost."""
        now = self.clock()
        if idle:
            if s.idle_since is None:
                s.idle_since = now
            if self.daemon.licensing.policy.active:
                self.reclaim_idle(s, max(idle_for, now - s.idle_since))
        elif s.idle_since is not None:
            s.idle_since = None
        renewed = self.ledger.renew_session(s.session, now)
        lost = s.lost
        self.outbox.reply(s, HeartbeatAck, HeartbeatAck.frame(rid, renewed, lost))  # encoded here, so:
        if lost:
            lost.clear()

    def reclaim_idle(self, s: Session, idle_for: float) -> None:
        """End this session's seats of products whose policy ``timeout`` its idle time has passed."""
        policy = self.daemon.licensing.policy
        for lease in self.ledger.session_leases(s.session):
            pp = policy.get(lease.pool[1])
            if pp is None or pp.timeout is None or idle_for < pp.timeout:
                continue
            self.leases.end(lease.token, EndReason.IDLE,
                            f"{idle_for:.0f} s idle (the usage policy frees seats idle longer than {pp.timeout:g} s)")

    def resume(self, s: Session, req: Resume) -> None:
        now = self.clock()
        resumed: list[str] = []
        lost: list[LostSeat] = []
        removed = self.leases.removed
        ledger = self.ledger
        unknown: list[str] = []  # HA: tokens another node granted (its client moved here): adopted from etcd
        cluster = self.leases.cluster is not None
        for token in req.tokens:
            before = ledger.get(token)
            if before is None or not s.holds(before):
                gone = removed.get(token) if before is None else None
                if gone is not None and gone[0] == s.owner:
                    del removed[token]
                    lost.append(gone[1])
                    continue
                if cluster and before is None:
                    unknown.append(token)  # adopted only if etcd's record of it names this client's owner
                    continue
                self.token_refused(s, "resume", token, before)
                # The same answer for a lease that is someone else's as for one that does not exist.
                lost.append(LostSeat(token, ErrorCode.LEASE_NOT_FOUND,
                                     "this seat is not held for this client: it lapsed, was checked in or "
                                     "removed, or was never this client's"))
                continue
            old_session = before.session
            ledger.resume(token, s.session, now)
            if old_session is not None and old_session != s.session:
                old = self.sessions.get(old_session)
                if old is not None:
                    # The holder came back on a new connection while the old one is still open (half-open
                    # after a network blip, or a second process with the same secret): the old one is told.
                    old.tell(LostSeat(token, ErrorCode.SEAT_MOVED,
                                      f"this seat of {before.pool[1]} moved to another connection of "
                                      f"this client ({s.peer}), which resumed it"))
                    logger.info("lease %s moved from %s (session %d) to %s (session %d)", token[:8], old.peer,
                                old_session, s.peer, s.session)
            resumed.append(token)
        if unknown:
            self.leases.adopt(s, req.id, resumed, lost, unknown)  # answers once etcd has
            return
        logger.info("RESUME %s: %d seat(s) resumed, %d lost", s.who(), len(resumed), len(lost))
        self.outbox.reply(s, Resumed, encode_frame(Resumed(req.id, tuple(resumed), tuple(lost)).to_wire()))

    # -- admin -------------------------------------------------------------------------------------------------
    def admin_command(self, s: Session, req: Admin) -> None:
        if self.admin is None:
            self.error(s, req.id, ErrorCode.NOT_AUTHORIZED, "this server takes no admin commands",
                       "start it with lmgrd, which enables lmutil")
            return
        try:
            data = self.admin(s, req.command, req.args, req.auth)
        except ProtocolError as exc:
            self.error(s, req.id, exc.code, exc.message, exc.hint)
            return
        if isinstance(data, dict):
            self.outbox.reply(s, StatusReply, encode_frame(StatusReply(req.id, data).to_wire()))
            return
        task = asyncio.ensure_future(data)
        self._admin_tasks.add(task)
        task.add_done_callback(lambda t: self._admin_done(s, req, t))

    def _admin_done(self, s: Session, req: Admin, task: asyncio.Future[dict[str, Any]]) -> None:
        """Answer an admin command that had to wait (its session may have gone meanwhile: nothing is sent)."""
        self._admin_tasks.discard(task)
        if task.cancelled():
            self.error(s, req.id, ErrorCode.SHUTTING_DOWN, f"admin command '{req.command}' was cancelled",
                       "the license server is shutting down; run it again when it is back")
            return
        exc = task.exception()
        if isinstance(exc, ProtocolError):
            self.error(s, req.id, exc.code, exc.message, exc.hint)
        elif exc is not None:
            logger.error("admin command %r failed: %r", req.command, exc, exc_info=exc)
            self.error(s, req.id, ErrorCode.INTERNAL_ERROR, f"admin command '{req.command}' failed: {exc!r}")
        else:
            self.outbox.reply(s, StatusReply, encode_frame(StatusReply(req.id, task.result()).to_wire()))


@functools.lru_cache(maxsize=4096)
def _host_problem(name: str) -> str | None:
    """:func:`protocol.validation.hostname_problem`, cached by name like :func:`_short_host` (a pure function of
    the string; a burst of reconnects after a restart comes from a few hundred hosts at most)."""
    return hostname_problem(name)


@functools.lru_cache(maxsize=4096)
def _short_host(name: str) -> str:
    """:func:`protocol.validation.short_hostname`, cached: the clients of one host share one string (a product
    often opens several connections from each PC), and a hostile stream of names only evicts entries."""
    return short_hostname(name)


def _no_timer(delay: float, callback: Callable[..., None], *args: object) -> None:
    """For handlers built without a server (tests): interval summaries are written at the next refusal."""
    return None


def refuse(s: Session, outbox: Outbox, exc: ProtocolError, request_id: int = 0,
           log: RefusalLog | None = None) -> None:
    """Answer with an error and close this one client (after the replies queued before it)."""
    t = s.transport
    if t is None or t.is_closing():
        return
    if exc.code not in (ErrorCode.HANDSHAKE_TIMEOUT, ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.SHUTTING_DOWN):
        if log is not None:
            log("dropped clients", logging.WARNING, "dropping client %s: %s", s.peer, exc)
        else:
            logger.warning("dropping client %s: %s", s.peer, exc)
    outbox.reply(s, ErrorReply, error_frame(request_id, exc))
    outbox.send(s, None)
