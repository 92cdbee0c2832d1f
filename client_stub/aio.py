"""AsyncLicenseClient: check seats out of lmgrd (or a single-user license file) from asyncio code.

Imports ``protocol`` and the rest of ``client_stub``; never ``lmgrd``. Never picks an event loop policy
(the product owns its loop). Usage::

    from client_stub import AsyncLicenseClient, LicenseError

    async with AsyncLicenseClient("27000@licsrv") as lm:
        async with lm.seat("CADPRO", version="2.1", wait=30) as seat:
            ...                      # heartbeats keep the seat in the background

One connection per client, opened on first use. A single reader task decodes replies and hands each to
the future waiting on its request ``id``, so a checkout that waits in the server's queue does not hold up
heartbeats or other requests. Every public call has one deadline (``asyncio.timeout``) covering connect,
handshake and reply. The :class:`~client_stub.heartbeat.LeaseKeeper` keeps held seats alive, reconnects and
resumes them by token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import inspect
import itertools
import logging
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from client_stub.address import LicenseFile, ServerAddress, resolve_servers
from client_stub.backoff import Backoff
from client_stub.errors import (
    LicenseError,
    LicenseLost,
    ProtocolMismatch,
    SeatDenied,
    ServerUnavailable,
    error_for,
)
from client_stub.heartbeat import LeaseKeeper
from client_stub.nodelock import VendorKey, check_license_file, load_vendor_key
from protocol import (
    SUPPORTED_VERSIONS,
    CheckedIn,
    Checkin,
    Checkout,
    Connection,
    ErrorCode,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    ProtocolError,
    Reply,
    Request,
    Role,
    Status,
    StatusReply,
    Welcome,
)
from protocol.validation import MAX_TEXT, MAX_WAIT_SECONDS, hostname_problem, parse_version, product_problem

__all__ = ["CLIENT_VERSION", "AsyncLicenseClient", "AsyncSeat", "Identity", "OnLost", "Ping", "local_identity"]

logger = logging.getLogger(__name__)

CLIENT_VERSION = "client_stub/0.1.0"
#: How many times one request refused RATE_LIMITED (not run) is sent again, after a backoff delay each.
RATE_RETRIES = 6
_READ_CHUNK = 64 * 1024

#: ``on_lost(seat, error)``: called once when a seat is lost; may return an awaitable (run as a task).
OnLost = Callable[["AsyncSeat", LicenseLost], "Awaitable[None] | None"]
_R = TypeVar("_R", bound=Reply)


# --------------------------------------------------------------------------- identity
@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """Who the client says it is in ``hello``."""

    host: str
    user: str
    pid: int
    display: str


def _display(host: str) -> str:
    raw = os.environ.get("DISPLAY", "")
    if not raw:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            if sys.stdin is not None and sys.stdin.isatty():
                raw = os.ttyname(sys.stdin.fileno())
    raw = raw or host
    return "_".join(raw.split())[:MAX_TEXT]


def local_identity(hostname: str | None = None, user: str | None = None) -> Identity:
    """This process's identity: the given or the OS's hostname and user, the pid and the display.

    Raises:
        LicenseError: INVALID_HOSTNAME if the hostname (given or real) is not ASCII letters, digits and
            hyphens; BAD_REQUEST for an empty or overlong user name.
    """
    host = socket.gethostname() if hostname is None else hostname
    problem = hostname_problem(host)
    if problem:
        whose = "the hostname given to the license client" if hostname is not None else "this computer's hostname"
        raise LicenseError(
            ErrorCode.INVALID_HOSTNAME,
            f"{whose} cannot be licensed; use ASCII letters, digits and hyphens only: {problem}",
            "rename the computer with ASCII letters, digits and hyphens (or pass hostname=... with such a name)",
        )
    if user is None:
        try:
            user = getpass.getuser()
        except (OSError, KeyError, ImportError):
            user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    if not user.strip() or len(user) > MAX_TEXT:
        raise LicenseError(ErrorCode.BAD_REQUEST,
                           f"user name {user[:40]!r} must be 1 to {MAX_TEXT} characters",
                           "pass user=... with a shorter name, or leave it out to use the login name")
    return Identity(host=host, user=user, pid=os.getpid(), display=_display(host))


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    """Result of :meth:`AsyncLicenseClient.ping`."""

    server: str
    server_version: str
    protocol: int
    round_trip: float  # seconds, one heartbeat request and its reply


# --------------------------------------------------------------------------- one connection
class _Connection:
    """One TCP connection to a license server: a reader task dispatching replies to futures by id."""

    def __init__(self, address: ServerAddress, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 client: AsyncLicenseClient) -> None:
        self.address = str(address)
        self._reader = reader
        self._writer = writer
        self._client = client
        self._proto = Connection(Role.CLIENT)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._welcome: Welcome | None = None
        self.error: LicenseError | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"client_stub-reader-{address}")

    @property
    def welcome(self) -> Welcome:
        if self._welcome is None:
            raise RuntimeError("connection not welcomed yet")
        return self._welcome

    @property
    def closed(self) -> bool:
        return self.error is not None

    def _failure(self) -> LicenseError:
        err = self.error or ServerUnavailable(f"the connection to {self.address} is closed")
        return _copy_error(err)

    async def request(self, msg: Request) -> Reply:
        """Send ``msg`` and wait for the reply with its id (no timeout: the caller owns the deadline).

        A request the server refused RATE_LIMITED was not run: it is sent again under a new id after the
        client's backoff delay (jittered, growing), at most :data:`RATE_RETRIES` times; then the refusal is
        the reply.

        Raises:
            LicenseError: the connection is closed or breaks before the reply (ServerUnavailable,
                ProtocolMismatch).
        """
        reply = await self._request_once(msg)
        attempt = 0
        while isinstance(reply, ErrorReply) and reply.code is ErrorCode.RATE_LIMITED and attempt < RATE_RETRIES:
            delay = self._client._backoff.delay(attempt)
            attempt += 1
            logger.info("license server %s refused '%s' for rate; sending it again in %.2f s (retry %d of %d)",
                        self.address, msg.OP, delay, attempt, RATE_RETRIES)
            await asyncio.sleep(delay)
            msg = dataclasses.replace(msg, id=self._client.next_id())
            reply = await self._request_once(msg)
        return reply

    async def _request_once(self, msg: Request) -> Reply:
        if self.error is not None:
            raise self._failure()
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[msg.id] = fut
        try:
            try:
                self._writer.write(self._proto.send(msg))
                await self._writer.drain()
            except OSError as exc:
                self.abort(ServerUnavailable(f"connection to {self.address} lost: {exc.strerror or exc}"))
            except ProtocolError as exc:  # the conversation does not allow this request now
                self.abort(ProtocolMismatch(exc.code, f"cannot send '{msg.OP}' to {self.address}: {exc.message}"))
            return await fut
        except BaseException:
            # Cancelled (a deadline) after the reply arrived: a grant nobody will hold goes straight back.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._return_orphan(fut.result())
            raise
        finally:
            self._pending.pop(msg.id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved: our caller may have been cancelled as it was set

    def _return_orphan(self, reply: Reply) -> None:
        if isinstance(reply, Granted) and not self._client._keeper.holds(reply.token):
            logger.info("returning a grant of %s nobody waits for (lease %s)", reply.product, reply.token[:8])
            self.send_nowait(Checkin(self._client.next_id(), reply.token))

    def send_nowait(self, msg: Request) -> None:
        """Send without waiting for the reply (a late reply is ignored). Best effort."""
        if self.error is None:
            with contextlib.suppress(OSError, RuntimeError, ProtocolError):
                self._writer.write(self._proto.send(msg))

    def _dispatch(self, reply: Reply) -> None:
        if reply.id == 0:
            if isinstance(reply, ErrorReply):  # connection-level: the server closes after it
                raise _ConnectionFailed(error_for(
                    reply.code, f"the license server {self.address} ended the connection: {reply.message}",
                    reply.hint))
            return
        fut = self._pending.get(reply.id)
        if fut is not None:
            if not fut.done():
                fut.set_result(reply)
            return
        # The request that asked for it gave up (timeout, cancellation): give a granted seat back at once.
        self._return_orphan(reply)

    async def _read_loop(self) -> None:
        error: LicenseError
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    error = ServerUnavailable(f"the license server {self.address} closed the connection")
                    break
                for reply in self._proto.receive_data(data):
                    self._dispatch(reply)
        except _ConnectionFailed as exc:
            error = exc.error
        except ProtocolError as exc:  # a malformed reply, or one out of order
            error = ProtocolMismatch(exc.code, f"the license server {self.address} sent an invalid message: "
                                               f"{exc.message}")
        except OSError as exc:
            error = ServerUnavailable(f"connection to {self.address} lost: {exc.strerror or exc}")
        except asyncio.CancelledError:
            self._finish(self.error or ServerUnavailable(f"the connection to {self.address} was closed"))
            raise
        self._finish(error)

    def _finish(self, error: LicenseError) -> None:
        if self.error is not None:
            return
        self.error = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(_copy_error(error))
        self._pending.clear()
        with contextlib.suppress(Exception):
            self._writer.transport.abort()
        self._client._connection_closed(self, error)

    def abort(self, error: LicenseError) -> None:
        """Close at once, failing every pending request with ``error``."""
        self._finish(error)
        if not self._task.done():
            self._task.cancel()

    async def close(self) -> None:
        """Close politely (FIN) and wait for the reader to end."""
        if self.error is None:
            self.error = ServerUnavailable(f"the connection to {self.address} was closed by the client")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(_copy_error(self.error))
            self._pending.clear()
            with contextlib.suppress(Exception):
                self._writer.close()
        if not self._task.done():
            self._task.cancel()
        await asyncio.wait([self._task])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()


class _ConnectionFailed(Exception):
    def __init__(self, error: LicenseError) -> None:
        super().__init__(error.message)
        self.error = error


def _copy_error(err: LicenseError) -> LicenseError:
    # A fresh instance per raise, so tracebacks of different callers do not pile up on one object.
    new = type(err).__new__(type(err))
    new.__dict__.update(err.__dict__)
    new.args = err.args
    return new


# --------------------------------------------------------------------------- seats
class AsyncSeat:
    """A seat held by this process. Use it as an async context manager, or call :meth:`checkin`.

    Attributes:
        token: the lease token (a server's, or a local one for a single-user license).
        product, version: what was checked out.
        customer_id: the license it came from.
        server: ``PORT@HOST`` of the server, or the license file path.
        nodelocked: true for a single-user license (no server, no heartbeats).
        lease_timeout, heartbeat_interval: the server's timing, seconds (``inf`` and 0 when node-locked).
        waited: seconds spent in the server's queue.
    """

    __slots__ = ("_client", "_lost", "_on_lost", "_released", "customer_id", "heartbeat_interval",
                 "lease_timeout", "nodelocked", "product", "server", "token", "version", "waited")

    def __init__(self, client: AsyncLicenseClient, *, token: str, product: str, version: str, customer_id: str,
                 server: str, lease_timeout: float, heartbeat_interval: float, waited: float, nodelocked: bool,
                 on_lost: OnLost | None) -> None:
        self._client = client
        self.token = token
        self.product = product
        self.version = version
        self.customer_id = customer_id
        self.server = server
        self.lease_timeout = lease_timeout
        self.heartbeat_interval = heartbeat_interval
        self.waited = waited
        self.nodelocked = nodelocked
        self._on_lost = on_lost
        self._lost: LicenseLost | None = None
        self._released = False

    @property
    def lost(self) -> bool:
        """True once the seat is gone (the server said so, or it could not be renewed in time)."""
        return self._lost is not None

    @property
    def lost_reason(self) -> LicenseLost | None:
        """Why the seat was lost (``.code``, ``.message``, ``.hint``), or ``None``."""
        return self._lost

    @property
    def released(self) -> bool:
        """True once checked in (or the client closed)."""
        return self._released

    @property
    def held(self) -> bool:
        """Neither released nor lost."""
        return not self._released and self._lost is None

    async def checkin(self) -> None:
        """Give the seat back. Idempotent; never raises for an unreachable server (the server frees the
        seat within one lease timeout, and the client checks it in on its next connection)."""
        if self._released:
            return
        self._released = True
        if self._lost is None and not self.nodelocked:
            await self._client._keeper.release(self)

    def _mark_lost(self, error: LicenseLost) -> None:
        if self._lost is not None or self._released:
            return
        self._lost = error
        callback = self._on_lost if self._on_lost is not None else self._client._on_lost
        if callback is not None:
            self._client._run_callback(callback, self, error)

    async def __aenter__(self) -> AsyncSeat:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.checkin()

    def __repr__(self) -> str:
        state = "lost" if self.lost else "released" if self._released else "held"
        return f"<AsyncSeat {self.product} {self.version} from {self.server} lease {self.token[:8]} {state}>"


# --------------------------------------------------------------------------- the client
def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


class AsyncLicenseClient:
    """Check seats out of a license server (or a single-user license file), asyncio flavour.

    Args:
        server: ``"27000@licsrv"``, ``"licsrv:27000"``, a license file path, or a comma-separated list of
            these tried in order; ``None``: ``LM_LICENSE_SERVER``, else the client config file.
        vendor_key: for single-user license files only: the vendor public key the product ships with (a
            path to ``vendor.pub``, its PEM bytes or a loaded key); ``None``: ``LM_VENDOR_KEY``.
        hostname, user: identity sent to the server instead of the OS's (terminal servers, tests). Never
            used for a single-user license check.
        connect_timeout: seconds for TCP connect plus handshake, per server tried.
        request_timeout: seconds for one request's reply (a checkout adds its ``wait``).
        client_version: sent in hello, shown by the server's status.
        on_lost: default ``on_lost(seat, error)`` for seats that do not pass their own.
        backoff: reconnect delays, and the delays before a request refused RATE_LIMITED is sent again (at
            most :data:`RATE_RETRIES` times, within the call's deadline) (default: base 0.2 s, cap 10 s, full jitter).

    Raises:
        LicenseError: CLIENT_CONFIG_INVALID (no or malformed server list), INVALID_HOSTNAME (checked
            before any connection), BAD_REQUEST (user name).
        ValueError: a timeout that is not a positive number.
    """

    def __init__(
        self,
        server: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        *,
        vendor_key: VendorKey | None = None,
        hostname: str | None = None,
        user: str | None = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
        client_version: str = CLIENT_VERSION,
        on_lost: OnLost | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._connect_timeout = _positive("connect_timeout", connect_timeout)
        self._request_timeout = _positive("request_timeout", request_timeout)
        self.servers = resolve_servers(server)
        self.identity = local_identity(hostname, user)
        self._client_version = client_version[:MAX_TEXT]
        self._vendor_key_arg = vendor_key
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        # This client's proof that it holds its seats (protocol 2): sent in every hello, the same on every
        # connection, so a resume after a reconnect is recognised and one by anybody else is refused.
        self._secret = secrets.token_hex(16)
        self._conn: _Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._backoff = backoff or Backoff(0.2, 10.0)
        self._keeper = LeaseKeeper(self, self._backoff)
        self._local_seats: set[AsyncSeat] = set()
        self._callbacks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- Link (used by the keeper) ------------------------------------------------------------------------
    @property
    def request_timeout(self) -> float:
        return self._request_timeout

    def next_id(self) -> int:
        return next(self._ids)

    def live_connection(self) -> _Connection | None:
        conn = self._conn
        return conn if conn is not None and not conn.closed else None

    async def connect(self) -> _Connection:
        """Open a connection if none is open: try each server in order, hello, then resume held seats.

        Raises:
            ServerUnavailable: no server could be reached (each one's reason in the message).
            ProtocolMismatch: no server speaks this client's protocol.
            LicenseError: the server refused this client at hello (e.g. INVALID_HOSTNAME).
        """
        conn = self.live_connection()
        if conn is not None:
            return conn
        async with self._connect_lock:
            conn = self.live_connection()
            if conn is not None:
                return conn
            self._check_open()
            conn = await self._open_any()
            self._conn = conn
            try:
                await self._keeper.resume(conn)
            except TimeoutError:
                error = ServerUnavailable(f"the license server {conn.address} did not answer resume within "
                                          f"{self._request_timeout:g} s")
                conn.abort(error)
                raise error from None
            except LicenseError as exc:
                conn.abort(exc)
                raise
            except BaseException:  # cancelled mid-resume: never leave a half-resumed connection in place
                conn.abort(ServerUnavailable(f"the connection to {conn.address} was abandoned during resume"))
                raise
            self._keeper.wake()
            return conn

    def _connection_closed(self, conn: _Connection, error: LicenseError) -> None:
        if conn is self._conn:
            self._conn = None
            if self._keeper.tokens:
                logger.warning("lost the connection to %s (%s); reconnecting to keep %d seat(s)",
                               conn.address, error.message, len(self._keeper.tokens))
            self._keeper.wake()

    async def _open_any(self) -> _Connection:
        servers = self.servers.servers
        if not servers:
            raise LicenseError(ErrorCode.CLIENT_CONFIG_INVALID,
                               f"no license server in the list {self.servers} ({self.servers.source})")
        unavailable: list[LicenseError] = []
        refusals: list[LicenseError] = []
        for address in servers:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    return await self._open(address)
            except TimeoutError:
                unavailable.append(ServerUnavailable(
                    f"no handshake from the license server {address} within {self._connect_timeout:g} s"))
            except ServerUnavailable as exc:
                unavailable.append(exc)
            except LicenseError as exc:
                refusals.append(exc)
        if refusals:  # a server that answered and refused says more than one that did not answer
            raise refusals[0]
        if len(unavailable) == 1:
            raise unavailable[0]
        codes = {e.code for e in unavailable}
        hints = {e.hint for e in unavailable}
        raise ServerUnavailable("cannot reach any license server: " + "; ".join(e.message for e in unavailable),
                                hints.pop() if len(hints) == 1 else "",
                                codes.pop() if len(codes) == 1 else ErrorCode.SERVER_UNAVAILABLE)

    async def _open(self, address: ServerAddress) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(address.host, address.port)
        except OSError as exc:
            raise ServerUnavailable(f"cannot connect to {address}: {exc.strerror or exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn = _Connection(address, reader, writer, self)
        try:
            ident = self.identity
            reply = await conn.request(Hello(self.next_id(), SUPPORTED_VERSIONS, ident.host, ident.user, ident.pid,
                                             self._client_version, ident.display, self._secret))
            if isinstance(reply, ErrorReply):
                raise error_for(reply.code, f"{address} refused the connection: {reply.message}", reply.hint)
            if not isinstance(reply, Welcome):
                raise ProtocolMismatch(ErrorCode.UNEXPECTED_MESSAGE, f"{address} answered hello with '{reply.OP}'")
            if reply.proto not in SUPPORTED_VERSIONS:
                raise ProtocolMismatch(
                    ErrorCode.UNSUPPORTED_PROTOCOL,
                    f"{address} chose protocol version {reply.proto}; this client speaks {list(SUPPORTED_VERSIONS)}")
            conn._welcome = reply
            logger.debug("connected to %s (lmgrd %s, protocol %d)", address, reply.server_version, reply.proto)
            return conn
        except BaseException as exc:
            conn.abort(exc if isinstance(exc, LicenseError) else
                       ServerUnavailable(f"the handshake with {address} did not complete"))
            raise

    # -- helpers -------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LicenseError(ErrorCode.BAD_REQUEST, "this license client is closed",
                               "create a new LicenseClient to check out again")

    async def _call(self, msg: Request, expect: type[_R], decision: type[LicenseError] = LicenseError,
                    conn: _Connection | None = None) -> _R:
        conn = conn or await self.connect()
        reply = await conn.request(msg)
        if isinstance(reply, ErrorReply):
            raise error_for(reply.code, reply.message, reply.hint, decision=decision)
        if not isinstance(reply, expect):
            raise ProtocolMismatch(ErrorCode.UNEXPECTED_MESSAGE,
                                   f"the license server answered '{msg.OP}' with '{reply.OP}'")
        return reply

    def _run_callback(self, callback: OnLost, seat: AsyncSeat, error: LicenseLost) -> None:
        try:
            result = callback(seat, error)
        except Exception:
            logger.exception("on_lost callback for %s failed", seat.product)
            return
        if inspect.isawaitable(result):
            async def run(aw: Awaitable[None] = result) -> None:
                try:
                    await aw
                except Exception:
                    logger.exception("on_lost callback for %s failed", seat.product)

            task = asyncio.get_running_loop().create_task(run())
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    # -- public API ----------------------------------------------------------------------------------------
    async def checkout(self, product: str, version: str, wait: float = 0.0, *,
                       on_lost: OnLost | None = None) -> AsyncSeat:
        """Check out one seat of ``product`` at ``version``.

        Entries of the server list are tried in order: a license file is checked locally; the license
        servers are tried as one group (the first reachable one answers).

        Args:
            product: product name (ASCII letters, digits, ``_``, ``-``).
            version: the product's version, dotted (``"2.1"``).
            wait: seconds to wait in the server's queue if no seat is free (0: answer at once).
            on_lost: called once as ``on_lost(seat, error)`` if the seat is lost later (default: the
                client's ``on_lost``). Runs on the event loop; keep it short.

        Returns:
            The seat; heartbeats keep it until :meth:`AsyncSeat.checkin` or :meth:`close`.

        Raises:
            SeatDenied: NO_SEATS, UNKNOWN_PRODUCT, VERSION_NOT_PERMITTED, LICENSE_EXPIRED,
                HOST_NOT_LICENSED, ...
            ServerUnavailable: no server reachable, or no answer within ``request_timeout + wait``.
            LicenseError: bad arguments (BAD_REQUEST), LICENSE_INVALID (single-user file), ...
        """
        self._check_open()
        problem = product_problem(product)
        if problem:
            raise LicenseError(ErrorCode.BAD_REQUEST, problem, "pass the product name the vendor documents")
        try:
            parse_version(version)
        except ValueError as exc:
            raise LicenseError(ErrorCode.BAD_REQUEST, str(exc), "pass the product's version, e.g. \"2.1\"") from None
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT_SECONDS:
            raise LicenseError(ErrorCode.BAD_REQUEST, f"wait must be 0 to {MAX_WAIT_SECONDS:g} seconds, got {wait!r}",
                               "pass wait=SECONDS to queue for a seat, or 0 to be answered at once")
        errors: list[LicenseError] = []
        servers_tried = False
        for entry in self.servers.entries:
            try:
                if isinstance(entry, LicenseFile):
                    return self._checkout_local(entry.path, product, version, on_lost)
                if not servers_tried:
                    servers_tried = True
                    return await self._checkout_remote(product, version, float(wait), on_lost)
            except LicenseError as exc:
                errors.append(exc)
        # The first decision (a refusal with a reason) says more than "unreachable".
        raise next((e for e in errors if not e.retryable), errors[0])

    def _checkout_local(self, path: Path, product: str, version: str, on_lost: OnLost | None) -> AsyncSeat:
        key = load_vendor_key(self._vendor_key_arg)
        lic = check_license_file(path, product, version, key)
        seat = AsyncSeat(self, token=f"local-{secrets.token_hex(16)}", product=product, version=version,
                         customer_id=lic.customer_id, server=str(path), lease_timeout=math.inf,
                         heartbeat_interval=0.0, waited=0.0, nodelocked=True, on_lost=on_lost)
        self._local_seats.add(seat)
        logger.info("checked out %s %s from single-user license %s (%s)", product, version, path, lic.customer_id)
        return seat

    async def _checkout_remote(self, product: str, version: str, wait: float, on_lost: OnLost | None) -> AsyncSeat:
        budget = self._request_timeout + wait
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(budget):
                conn = await self.connect()
                sent = loop.time()
                granted = await self._call(Checkout(self.next_id(), product, version, wait), Granted, SeatDenied, conn)
        except TimeoutError:
            raise ServerUnavailable(
                f"no answer to the checkout of {product} within {budget:g} s",
                "the license server may be overloaded or the network slow; try again, or raise request_timeout",
            ) from None
        self._check_open()
        seat = AsyncSeat(self, token=granted.token, product=granted.product or product,
                         version=granted.version or version, customer_id=granted.customer_id, server=conn.address,
                         lease_timeout=granted.lease_timeout, heartbeat_interval=granted.heartbeat_interval,
                         waited=granted.waited, nodelocked=False, on_lost=on_lost)
        # The server renewed the lease no earlier than when the request left, plus the time it queued.
        self._keeper.hold(seat, sent + granted.waited, granted.lease_timeout)
        logger.info("checked out %s %s from %s (lease %s, waited %.1f s)", product, version, conn.address,
                    granted.token[:8], granted.waited)
        return seat

    @contextlib.asynccontextmanager
    async def seat(self, product: str, version: str, wait: float = 0.0, *,
                   on_lost: OnLost | None = None) -> AsyncIterator[AsyncSeat]:
        """``async with lm.seat("CADPRO", "2.1") as seat:`` checks out on entry and in on exit."""
        held = await self.checkout(product, version, wait, on_lost=on_lost)
        try:
            yield held
        finally:
            await held.checkin()

    async def status(self) -> dict[str, object]:
        """The server's status map (pools, seats in use, queues; see PROTOCOL.md).

        Raises:
            ServerUnavailable: no server reachable or no answer within ``request_timeout``.
            LicenseError: the server refused.
        """
        self._check_open()
        try:
            async with asyncio.timeout(self._request_timeout):
                reply = await self._call(Status(self.next_id()), StatusReply)
        except TimeoutError:
            raise ServerUnavailable(f"no answer to status within {self._request_timeout:g} s") from None
        return dict(reply.data)

    def report_idle(self, seconds: float | None) -> None:
        """Tell the server, from the next heartbeat on, that the user has been idle ``seconds`` (None or 0:
        active again). Products call it from their input handling; a usage policy ``timeout`` on the server
        reclaims seats idle longer than it (the seat is then lost with ``IDLE_TIMEOUT``)."""
        if seconds is None or seconds <= 0:
            self._keeper.idle_since = None
        else:
            self._keeper.idle_since = time.monotonic() - float(seconds)

    async def ping(self) -> Ping:
        """Handshake if needed, then time one heartbeat round trip.

        Returns:
            The server, its version, the protocol version and the round trip in seconds.

        Raises:
            ServerUnavailable: no server reachable or no answer within ``request_timeout``.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._request_timeout):
                conn = await self.connect()
                sent = loop.time()
                ack = await self._call(Heartbeat(self.next_id()), HeartbeatAck, LicenseLost, conn)
                rtt = loop.time() - sent
        except TimeoutError:
            raise ServerUnavailable(f"no answer to ping within {self._request_timeout:g} s") from None
        self._keeper.apply_ack(ack, sent, conn.welcome.lease_timeout)  # a heartbeat is a heartbeat
        return Ping(conn.address, conn.welcome.server_version, conn.welcome.proto, rtt)

    async def close(self) -> None:
        """Check in every held seat (best effort, within ``request_timeout``) and close the connection."""
        if self._closed:
            return
        self._closed = True
        held = await self._keeper.stop()
        conn = self.live_connection()
        if conn is not None and held:
            try:
                async with asyncio.timeout(self._request_timeout):
                    results = await asyncio.gather(
                        *(self._call(Checkin(self.next_id(), t), CheckedIn, conn=conn) for t in held),
                        return_exceptions=True)
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    logger.info("could not check in %d seat(s) on close (%s)", len(failed), failed[0])
            except TimeoutError:
                logger.info("could not check in %d seat(s) on close within %g s; the server frees them within "
                            "one lease timeout", len(held), self._request_timeout)
        for seats in held.values():
            for seat in seats:
                seat._released = True
        for seat in self._local_seats:
            seat._released = True
        self._local_seats.clear()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        for task in list(self._callbacks):
            task.cancel()

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> AsyncLicenseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        ident = self.identity
        return f"<AsyncLicenseClient {self.servers} ({self.servers.source}) as {ident.user}@{ident.host}>"
