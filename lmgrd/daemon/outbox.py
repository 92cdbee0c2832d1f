"""Replies and group commit: a reply goes out only after the journal records it depends on are written.

Handlers and the lease lifecycle queue frames with :meth:`Outbox.send`; once per loop iteration (or early,
every ``FLUSH_EARLY`` frames) :meth:`Outbox.flush` writes every buffered journal record in one write and only
then hands the queued frames to their transports, in order. So no client is ever told it holds a seat that
a SIGKILL could forget. ``None`` as a frame closes that client after the frames before it.

When the store cannot write (state directory full or read-only; :class:`StoreWriteError`) the outbox is
*degraded* (:attr:`Outbox.store_error`): the grants of the batch that failed are handed to :attr:`undo`
(the lease lifecycle ends them and refuses their checkouts with ``STORE_UNAVAILABLE``; their ``granted``
frames are never sent), every other reply of the batch goes out (heartbeat acks, welcomes, status, checkin
replies: none of them claims a seat), and the write is retried on a timer with capped exponential backoff
(:data:`RETRY_FIRST` doubling to :data:`RETRY_MAX`). While degraded no flush touches the store: the records
stay buffered, in order, and the first retry that succeeds writes them all, logs the recovery and returns
to normal group commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from lmgrd.storage.journal import LeaseStore, StoreError
from protocol import Granted, LocalProtocolError, Reply

__all__ = ["FLUSH_EARLY", "RETRY_FIRST", "RETRY_MAX", "Outbox", "UndoGrants", "Writable"]

logger = logging.getLogger(__name__)

#: Replies queued in one loop iteration before they are flushed early: bounds a flooder's reply backlog and
#: keeps latency even under load (512 here gave a churn p99 about 2.3x the ceiling's, 64 about 1.7x, with one
#: journal write(2) per 64 grants still; see benchmarks/RESULTS.md).
FLUSH_EARLY = 64

#: Seconds before the first retry of a failed journal write; each failure doubles it, up to RETRY_MAX.
RETRY_FIRST = 0.1
RETRY_MAX = 2.0


class Transport(Protocol):
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...


class Conn(Protocol):
    def send_frame(self, kind: type[Reply], frame: bytes, /) -> bytes: ...


class Writable(Protocol):
    """A client session: its transport (``None`` until connected or after it is gone) and the protocol
    connection every reply passes on its way out."""

    transport: Transport | None

    @property
    def conn(self) -> Conn: ...


#: Ends grants whose journal record could not be written, and refuses their checkouts: ``(grants, error)``
#: with each grant as ``(client, request id, token)``. Set by :class:`~lmgrd.daemon.leases.LeaseLifecycle`.
UndoGrants = Callable[[list[tuple[Writable, int, str]], StoreError], None]


class Outbox:
    """The daemon's one reply queue."""

    __slots__ = ("call_later", "call_soon", "clock", "degraded_since", "dirty", "flushing", "grants", "pending",
                 "retry_delay", "retry_handle", "scheduled", "store", "store_error", "store_failures", "undo")

    def __init__(self, store: LeaseStore, call_soon: Callable[[Callable[[], None]], object],
                 call_later: Callable[[float, Callable[[], None]], object] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.store = store
        self.call_soon = call_soon
        self.call_later = call_later
        self.clock = clock
        self.pending: list[tuple[Writable, bytes | None]] = []
        #: The ``granted`` frames in :attr:`pending`: (index in pending, client, request id, token).
        self.grants: list[tuple[int, Writable, int, str]] = []
        self.scheduled = False
        self.flushing = False
        #: Set by every flush that wrote the store: the sync timer fsyncs the journal when something was written.
        self.dirty = False
        #: Why the store cannot write now (``None``: it can). While set, new grants are refused.
        self.store_error: StoreError | None = None
        #: Failed store writes since start (the first failure and every failed retry).
        self.store_failures = 0
        self.degraded_since = 0.0
        self.retry_delay = RETRY_FIRST
        self.retry_handle: object | None = None
        self.undo: UndoGrants = lambda grants, error: None

    def reply(self, to: Writable, kind: type[Reply], frame: bytes) -> None:
        """Queue the reply ``frame`` (of message class ``kind``) for ``to``, through its connection's state
        machine: a reply its connection may not send now (it was refused, or broke a rule and was told) is
        dropped, never written."""
        try:
            to.conn.send_frame(kind, frame)
        except LocalProtocolError as exc:
            logger.debug("reply %s not sent: %s", kind.__name__, exc)
            return
        # send(), inlined: this runs for every reply.
        self.pending.append((to, frame))
        if not self.scheduled:
            self.scheduled = True
            self.call_soon(self.flush)
        elif len(self.pending) >= FLUSH_EARLY and not self.flushing:
            self.flush()

    def granted(self, to: Writable, rid: int, token: str, frame: bytes) -> None:
        """Queue the ``granted`` reply ``frame`` (request ``rid``, lease ``token``): sent only once the grant's
        journal record is written; if that write fails, the grant goes to :attr:`undo` and this frame is
        never sent."""
        try:
            to.conn.send_frame(Granted, frame)
        except LocalProtocolError as exc:
            logger.debug("reply Granted not sent: %s", exc)
            return
        self.grants.append((len(self.pending), to, rid, token))
        self.send(to, frame)

    def send(self, to: Writable, frame: bytes | None) -> None:
        """Queue raw bytes (already checked by :meth:`reply`), or ``None`` to close ``to`` after them."""
        self.pending.append((to, frame))
        if not self.scheduled:
            self.scheduled = True
            self.call_soon(self.flush)
        elif len(self.pending) >= FLUSH_EARLY and not self.flushing:
            # A pipelining client (or one that never reads) must meet write flow control within this read,
            # not after the loop has read megabytes more of its requests.
            self.flush()

    def request_flush(self) -> None:
        """Make journal records durable promptly even when no reply waits on them (a removal, an expiry)."""
        if not self.scheduled:
            self.scheduled = True
            self.call_soon(self.flush)

    def flush(self) -> None:
        """Make this iteration's grants and releases durable, then send its replies (in order).

        If the store cannot write, the batch's grants are undone (and refused) instead of acknowledged,
        the rest of its replies go out, and a retry is scheduled (see the module docstring).
        """
        self.scheduled = False
        if self.store_error is None:
            try:
                self.store.flush()
            except StoreError as exc:
                self._failed(exc)
            else:
                self.dirty = True
        pending, self.pending = self.pending, []
        grants, self.grants = self.grants, []
        if grants and self.store_error is not None:
            undone = {g[0] for g in grants}
            pending = [p for i, p in enumerate(pending) if i not in undone]
            self.flushing = True
            try:
                self.undo([(to, rid, token) for _, to, rid, token in grants], self.store_error)
            finally:
                self.flushing = False
            pending += self.pending  # the refusals, after the batch's other replies
            self.pending = []
            self.grants = []  # no grant is made while degraded; nothing undone is sent
        for to, frame in pending:
            t = to.transport
            if t is None or t.is_closing():
                continue
            if frame is None:
                t.close()
            else:
                t.write(frame)

    # -- a store that cannot write ---------------------------------------------------------------------------
    def _failed(self, exc: StoreError) -> None:
        """The first failed write: degrade, say so once, and schedule the first retry."""
        self.store_failures += 1
        self.store_error = exc
        self.degraded_since = self.clock() if self.clock is not None else 0.0
        self.retry_delay = RETRY_FIRST
        logger.error("%s. Until then new checkouts are refused (STORE_UNAVAILABLE); held seats, heartbeats, "
                     "checkins and status keep working", exc)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self.call_later is None:  # no timer (unit tests): the caller retries with retry()
            return
        self.retry_handle = self.call_later(self.retry_delay, self.retry)

    def retry(self) -> None:
        """Try the buffered records again; on success leave the degraded state, else back off and retry."""
        self.cancel_retry()  # one retry chain, even when called early
        if self.store_error is None:
            return
        try:
            self.store.flush()
        except StoreError as exc:
            self.store_failures += 1
            self.store_error = exc
            self.retry_delay = min(self.retry_delay * 2, RETRY_MAX)
            logger.debug("lease journal still not writable (%s); next try in %.1f s", exc, self.retry_delay)
            self._schedule_retry()
            return
        self.dirty = True
        took = (self.clock() - self.degraded_since) if self.clock is not None else 0.0
        logger.warning("lease journal writable again after %.1f s: the records kept in memory are written; "
                       "granting new seats again", took)
        self.store_error = None
        self.retry_delay = RETRY_FIRST
        if self.pending:
            self.flush()

    def cancel_retry(self) -> None:
        """Stop retrying (shutdown)."""
        h = self.retry_handle
        self.retry_handle = None
        cancel = getattr(h, "cancel", None)
        if cancel is not None:
            cancel()
