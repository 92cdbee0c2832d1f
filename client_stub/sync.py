"""LicenseClient: the blocking facade over :class:`~client_stub.aio.AsyncLicenseClient`.

Imports ``client_stub.aio`` and the standard library; never ``lmgrd``. It is not a second implementation:
each client owns a private event loop on a daemon thread, and every method submits the matching
coroutine with :func:`asyncio.run_coroutine_threadsafe` and waits for it. Heartbeats, reconnects and the
``on_lost`` callbacks run on that thread. Usage::

    from client_stub import LicenseClient, LicenseError

    with LicenseClient("27000@licsrv") as lm:
        with lm.checkout("CADPRO", version="2.1", wait=30) as seat:
            ...   # heartbeats run in the background; seat.lost turns true if the seat is lost
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from client_stub.address import ServerList
from client_stub.aio import CLIENT_VERSION, AsyncLicenseClient, AsyncSeat, Identity, Ping
from client_stub.backoff import Backoff
from client_stub.errors import LicenseLost
from client_stub.nodelock import VendorKey

__all__ = ["LicenseClient", "OnLostSync", "Seat"]

_T = TypeVar("_T")

#: ``on_lost(seat, error)``: runs once, on the client's background thread, when a seat is lost. Keep it
#: short and do not call blocking LicenseClient methods from it (set a flag or a threading.Event instead).
OnLostSync = Callable[["Seat", LicenseLost], None]

# Bound for stopping the background loop when closing or at interpreter exit.
_SHUTDOWN_SECONDS = 5.0


class Seat:
    """A seat held by this process (blocking flavour). Use it in a ``with`` block or call :meth:`checkin`.

    Same attributes as :class:`~client_stub.aio.AsyncSeat`: ``token``, ``product``, ``version``,
    ``customer_id``, ``server``, ``nodelocked``, ``lease_timeout``, ``heartbeat_interval``, ``waited``,
    ``lost``, ``lost_reason``, ``released``.
    """

    __slots__ = ("_aseat", "_client")

    def __init__(self, client: LicenseClient, aseat: AsyncSeat) -> None:
        self._client = client
        self._aseat = aseat

    @property
    def token(self) -> str:
        """The lease token (a server's, or a local one for a single-user license)."""
        return self._aseat.token

    @property
    def product(self) -> str:
        """The product checked out."""
        return self._aseat.product

    @property
    def version(self) -> str:
        """The version checked out."""
        return self._aseat.version

    @property
    def customer_id(self) -> str:
        """The license the seat came from."""
        return self._aseat.customer_id

    @property
    def server(self) -> str:
        """PORT@HOST of the server, or the license file path."""
        return self._aseat.server

    @property
    def nodelocked(self) -> bool:
        """True for a single-user license (no server, no heartbeats)."""
        return self._aseat.nodelocked

    @property
    def lease_timeout(self) -> float:
        """The server's lease timeout, seconds (inf when node-locked)."""
        return self._aseat.lease_timeout

    @property
    def heartbeat_interval(self) -> float:
        """The server's heartbeat interval, seconds (0 when node-locked)."""
        return self._aseat.heartbeat_interval

    @property
    def waited(self) -> float:
        """Seconds spent in the server's queue."""
        return self._aseat.waited

    @property
    def lost(self) -> bool:
        """True once the seat is gone (the server said so, or it could not be renewed in time)."""
        return self._aseat.lost

    @property
    def lost_reason(self) -> LicenseLost | None:
        """Why the seat was lost, or ``None``."""
        return self._aseat.lost_reason

    @property
    def released(self) -> bool:
        """True once checked in (or the client closed)."""
        return self._aseat.released

    @property
    def held(self) -> bool:
        """Neither released nor lost."""
        return self._aseat.held

    def checkin(self) -> None:
        """Give the seat back. Idempotent; does not raise for an unreachable server."""
        if self._aseat.released:
            return
        if self._aseat.lost or self._aseat.nodelocked:
            self._aseat._released = True  # nothing to tell a server (safe from any thread, even on_lost)
            return
        self._client._run(self._aseat.checkin())

    def __enter__(self) -> Seat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.checkin()

    def __repr__(self) -> str:
        return repr(self._aseat).replace("<AsyncSeat", "<Seat", 1)


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, aclient: AsyncLicenseClient) -> None:
    """Close the async client and stop its loop thread. Also runs at garbage collection and interpreter
    exit (weakref.finalize) for a client the product never closed, so its seats are checked in."""
    if loop.is_closed():
        return
    if threading.current_thread() is thread:  # collected on our own loop thread: cannot wait for it
        loop.call_soon(loop.stop)
        return

    async def finish() -> None:
        try:
            await aclient.close()
        finally:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_asyncgens()

    if thread.is_alive():
        fut = asyncio.run_coroutine_threadsafe(finish(), loop)
        try:
            fut.result(_SHUTDOWN_SECONDS + aclient.request_timeout)
        except BaseException:
            fut.cancel()
            raise
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_SHUTDOWN_SECONDS)
    if not thread.is_alive():
        loop.close()


class LicenseClient:
    """Check seats out of a license server (or a single-user license file), blocking flavour.

    Takes the same arguments as :class:`~client_stub.aio.AsyncLicenseClient` (``server``, ``vendor_key``,
    ``hostname``, ``user``, ``connect_timeout``, ``request_timeout``, ``client_version``, ``on_lost``,
    ``backoff``); ``on_lost(seat, error)`` receives the blocking :class:`Seat` and runs on the client's
    background thread.

    Raises:
        LicenseError: CLIENT_CONFIG_INVALID, INVALID_HOSTNAME, ... as AsyncLicenseClient.
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
        on_lost: OnLostSync | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._on_lost = on_lost
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="client_stub-loop", daemon=True)
        self._thread.start()

        async def make() -> AsyncLicenseClient:
            return AsyncLicenseClient(server, vendor_key=vendor_key, hostname=hostname, user=user,
                                      connect_timeout=connect_timeout, request_timeout=request_timeout,
                                      client_version=client_version, backoff=backoff)

        try:
            self._aclient = self._run(make())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_SHUTDOWN_SECONDS)
            self._loop.close()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._thread, self._aclient)

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking LicenseClient methods cannot be called from an on_lost callback (it runs "
                               "on the client's own thread); set a flag or a threading.Event there instead")
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("this LicenseClient is closed; create a new one")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # KeyboardInterrupt in the caller: stop the operation on the loop too
            raise

    @property
    def servers(self) -> ServerList:
        """The server list in use and where it came from."""
        return self._aclient.servers

    @property
    def identity(self) -> Identity:
        return self._aclient.identity

    def checkout(self, product: str, version: str, wait: float = 0.0, *,
                 on_lost: OnLostSync | None = None) -> Seat:
        """Check out one seat; see :meth:`AsyncLicenseClient.checkout`. Blocks up to ``request_timeout + wait``.

        Raises:
            SeatDenied, ServerUnavailable, LicenseError: as AsyncLicenseClient.checkout.
        """
        callback = on_lost if on_lost is not None else self._on_lost

        async def run() -> Seat:
            holder: list[Seat] = []

            def dispatch(aseat: AsyncSeat, error: LicenseLost) -> None:
                assert callback is not None
                callback(holder[0] if holder else Seat(self, aseat), error)

            aseat = await self._aclient.checkout(product, version, wait,
                                                 on_lost=dispatch if callback is not None else None)
            # Built on the loop thread before any later loss can be processed, so dispatch sees it.
            holder.append(Seat(self, aseat))
            return holder[0]

        return self._run(run())

    @contextlib.contextmanager
    def seat(self, product: str, version: str, wait: float = 0.0, *,
             on_lost: OnLostSync | None = None) -> Iterator[Seat]:
        """``with lm.seat("CADPRO", "2.1") as seat:`` checks out on entry and in on exit."""
        with self.checkout(product, version, wait, on_lost=on_lost) as held:
            yield held

    def status(self) -> dict[str, object]:
        """The server's status map; see :meth:`AsyncLicenseClient.status`."""
        return self._run(self._aclient.status())

    def report_idle(self, seconds: float | None) -> None:
        """See :meth:`AsyncLicenseClient.report_idle` (safe from any thread)."""
        self._loop.call_soon_threadsafe(self._aclient.report_idle, seconds)

    def ping(self) -> Ping:
        """Server, version, protocol and round trip; see :meth:`AsyncLicenseClient.ping`."""
        return self._run(self._aclient.ping())

    def close(self) -> None:
        """Check in every held seat, close the connection and stop the background thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> LicenseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._aclient).replace("<AsyncLicenseClient", "<LicenseClient", 1)
