"""The asyncio side of one client connection: bytes in, requests to the handlers, flow control.

Thin by design (uvicorn's ``H11Protocol``): ``data_received`` feeds the session's protocol connection and
dispatches each request; a client that stops reading its replies is paused, and dropped if it stays
stalled for a lease timeout; a client that sends no hello in time is dropped. Each connection has a
request-rate allowance (a token bucket: ``max_requests_per_second``, holding up to two seconds' worth):
requests beyond it are answered ``RATE_LIMITED`` and not run (but for the checkin of a held seat:
``Handlers.rate_limited``). The allowance is settled once per read,
not per request, and the time of the read is kept for the server's idle-connection sweep.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from time import perf_counter
from typing import TYPE_CHECKING

from lmgrd.daemon.session import Session
from protocol import ErrorCode, ProtocolError, State, parse_request
from protocol.validation import normalize_ip

if TYPE_CHECKING:
    from lmgrd.daemon.server import Server

__all__ = ["WRITE_HIGH_WATER", "ClientProtocol", "client_address"]

logger = logging.getLogger(__name__)

#: Once the connection is refused or broke a rule, requests already read behind it are not served.
_NOT_SERVING = frozenset({State.MUST_CLOSE, State.ERROR, State.CLOSED})

#: A client that does not read its replies is paused above this much unsent data; if it stays stalled for
#: a lease timeout it is dropped (its leases then lapse like any dropped client's).
WRITE_HIGH_WATER = 64 * 1024


@functools.lru_cache(maxsize=4096)
def client_address(raw: str) -> str:
    """A peer's address as every comparison needs it (:func:`protocol.validation.normalize_ip`), or ``raw`` if
    it is not an IP address. Cached by the raw string: parsing with ``ipaddress`` costs a few microseconds a
    connection, and the clients of one address then share one string (a burst of reconnects after a restart
    comes from a few hundred addresses at most; an attacker cycling through addresses only evicts entries)."""
    try:
        return str(normalize_ip(raw))
    except ValueError:
        return raw


class ClientProtocol(Session, asyncio.Protocol):
    """One client connection: its session state plus the asyncio callbacks."""

    __slots__ = ("server",)

    def __init__(self, server: Server) -> None:
        Session.__init__(self, server.cfg.max_frame_bytes)
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.addr = client_address(str(peer[0]))
            self.port = int(peer[1])
        else:
            self.addr = "?"
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self.server.on_connect(self)

    def data_received(self, data: bytes) -> None:
        hot = self.conn.receive_hot(data)
        if hot is None:
            self._received(data)
            return
        # The commonest read: one whole checkout, checkin or heartbeat (protocol.Connection.receive_hot), served
        # from its decoded map by the same handler code as any request; rate and timing as below for one request.
        server = self.server
        now = server.clock()
        kind, d = hot
        rate = server.request_rate
        if rate:
            allowance = self.allowance + (now - self.last_active) * rate
            if allowance > server.request_burst:
                allowance = server.request_burst
            if allowance < 1.0:
                self.last_active = now
                self.allowance = allowance
                server.handlers.rate_limited(self, parse_request(d))
                return
            self.allowance = allowance - 1.0
        self.last_active = now
        handler = server.hot_routes[kind]
        timer = server.request_timer
        if timer is None:
            handler(self, d)
        else:
            t0 = perf_counter()
            handler(self, d)
            timer(kind, perf_counter() - t0)

    def _received(self, data: bytes) -> None:
        """Every other read: any number of frames, in any split, each through the connection's table."""
        try:
            requests = self.conn.receive_data(data)
        except ProtocolError as exc:
            self.server.fail(self, exc)
            return
        server = self.server
        now = server.clock()
        rate = server.request_rate
        refused = None
        if rate:
            # Token bucket, settled once per read: refill for the time since the last read, capped at the
            # burst; the requests beyond what is left are refused (after the ones served, in order).
            allowance = self.allowance + (now - self.last_active) * rate
            if allowance > server.request_burst:
                allowance = server.request_burst
            n = len(requests)
            if allowance >= n:
                self.allowance = allowance - n
            else:
                served = int(allowance) if allowance > 0 else 0
                self.allowance = allowance - served
                refused = requests[served:]
                requests = requests[:served]
        self.last_active = now
        dispatch = server.handlers.dispatch
        timer = server.request_timer
        conn = self.conn
        if timer is None:
            for req in requests:
                if conn.state in _NOT_SERVING:
                    return
                dispatch(self, req)
        else:
            for req in requests:  # lmgrd_request_duration_seconds: observe only, no allocation
                if conn.state in _NOT_SERVING:
                    return
                t0 = perf_counter()
                dispatch(self, req)
                timer(type(req), perf_counter() - t0)
        if refused:
            limited = server.handlers.rate_limited
            for req in refused:
                if conn.state in _NOT_SERVING:
                    return
                limited(self, req)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close()
        self.server.on_disconnect(self)

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it catches up.
        t = self._asyncio_transport()
        if t is not None:
            t.pause_reading()
        since = self.paused_since = time.monotonic()
        self.server.refusal_log("paused clients", logging.WARNING,
                                "client %s is not reading its replies; pausing its requests", self.peer)
        self.server.loop.call_later(self.server.lease_timeout, self._stalled, since)

    def _stalled(self, since: float) -> None:
        t = self._asyncio_transport()
        if self.paused_since == since and t is not None and not t.is_closing():
            logger.warning("client %s read none of its replies for %g s (a lease timeout); dropping it",
                           self.peer, self.server.lease_timeout)
            t.abort()

    def resume_writing(self) -> None:
        t = self._asyncio_transport()
        if t is not None and not t.is_closing():
            t.resume_reading()
        self.paused_since = None

    def _asyncio_transport(self) -> asyncio.Transport | None:
        return self.transport  # type: ignore[return-value]  # set by connection_made to an asyncio transport

    def abort(self) -> None:
        t = self._asyncio_transport()
        if t is not None:
            t.abort()

    def handshake_expired(self) -> None:
        """The handshake timeout passed (the server's handshake sweep calls this): drop a client with no hello."""
        if not self.conn.proto:  # no hello arrived (the connection keeps no hello, only its proto)
            self.server.counters.handshake_timeouts += 1
            timeout = self.server.cfg.handshake_timeout
            self.server.refusal_log("handshake timeouts", logging.INFO, "client %s sent no hello within %.1f s; "
                                    "dropped", self.peer, timeout)
            self.server.fail(self, ProtocolError(ErrorCode.HANDSHAKE_TIMEOUT, f"no hello within {timeout:g} seconds",
                                                 "send hello right after connecting"))
