"""The usage log: one JSON line per checkout, checkin, expiry, removal, revocation and denial.

It answers the customer's question "how many seats should we buy?" (``lmutil report`` reads it, see
:mod:`lmgrd.report`). Append-only, rotated by size (``PATH``, ``PATH.1`` .. ``PATH.N``), and it never blocks the
event loop. The standard library does the work: the observer hooks hand a small record to a
``logging.handlers.QueueHandler`` (a non-blocking put on a bounded queue); a ``QueueListener`` thread formats
each line and writes it through a ``RotatingFileHandler``, flushing whenever the queue runs empty (one write
per burst, not per line). The handlers are used directly, not through a logger, so usage lines never reach the
daemon's own log and the daemon's log never reaches the usage file. If the disk stalls long enough for the
queue to fill, further events are dropped and counted; the writer logs how many and writes a ``dropped``
line, so a report knows the log has a gap. ``on_shutdown`` (called by the server's shutdown) drains the queue
before the daemon exits.

Line schema (every line): ``ts`` (ISO 8601, UTC), ``epoch`` (seconds), ``event``, ``customer_id``,
``product``, ``version``, ``user``, ``host``. Checkout adds ``lease`` (the first 12 characters of the token:
enough to pair it with its release, too few to resume someone's seat), ``count`` (seats licensed),
``in_use`` (seats held after the event), ``pid``, ``display`` and ``waited_s``; checkin, expiry, removal and
revoked add ``lease``, ``in_use`` and ``held_s`` (seconds since the checkout); denial adds ``reason`` (the
error code). Never imports ``client_stub``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from io import TextIOWrapper
from logging.handlers import QueueHandler, QueueListener, RotatingFileHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmgrd.core.ledger import LeaseInfo
from lmgrd.core.logtext import printable_json_line

if TYPE_CHECKING:
    from lmgrd.daemon.api import DaemonView as Server

__all__ = ["DEFAULT_BACKUPS", "DEFAULT_MAX_BYTES", "DEFAULT_QUEUE_SIZE", "LEASE_ID_CHARS", "UsageLog",
           "attach_usage_log"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
#: Events buffered while the disk is slow; past this they are dropped and counted (about 60 MB of records).
DEFAULT_QUEUE_SIZE = 100_000
#: Characters of the lease token written to the log.
LEASE_ID_CHARS = 12
#: How long shutdown waits for the writer to drain.
_CLOSE_TIMEOUT = 10.0

# An event on the queue: (epoch, event name, fields). Formatting happens on the writer thread.
_Event = tuple[float, str, dict[str, Any]]
#: What QueueListener takes as "stop" (its ``_sentinel``).
_SENTINEL = None


class _UsageRecord(logging.LogRecord):
    """One usage event on its way to the file; ``usage`` is what the line is made of."""

    usage: _Event


def _record(item: _Event) -> _UsageRecord:
    rec = _UsageRecord(__name__, logging.INFO, __file__, 0, item[1], None, None)
    rec.usage = item
    return rec


class _JsonLine(logging.Formatter):
    """A usage record as its JSON line (the terminator is the handler's)."""

    def format(self, record: logging.LogRecord) -> str:
        assert isinstance(record, _UsageRecord)
        epoch, event, fields = record.usage
        epoch = round(epoch, 3)  # ts and epoch say the same millisecond
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "epoch": epoch, "event": event,
        }
        fields = dict(fields)
        granted_at = fields.pop("granted_at", None)
        line.update(fields)
        if granted_at is not None:
            line["held_s"] = round(max(0.0, epoch - granted_at), 3)
        # Client strings (user, display, product, version) stay one line: JSON escapes the C0 controls, and
        # the Unicode line breaks it leaves alone are escaped too.
        return printable_json_line(json.dumps(line, separators=(",", ":"), ensure_ascii=False))


class _DroppingQueueHandler(QueueHandler):
    """Puts records on the bounded queue without ever waiting: a full queue drops the record and counts it."""

    def __init__(self, q: queue.Queue[Any]) -> None:
        super().__init__(q)
        self.dropped = 0  # only incremented, on the loop thread; the writer reports each increase

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatted on the writer thread, not on the event loop

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _UsageFile(RotatingFileHandler):
    """``RotatingFileHandler`` with the usage log's rules: sizes in bytes, kept by the handler (``tell()`` on a
    text stream would flush each line); rotate between lines, before the one that would take the file past
    ``maxBytes`` (a line longer than that gets a file of its own); never rotate what is not a regular file (a
    pipe to a log shipper); no backups means the file starts again; flush only when the writer says so."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self._size = 0
        self._regular = True
        self._error_logged = False
        self.written = 0
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.setFormatter(_JsonLine())

    def _open(self) -> TextIOWrapper:
        stream = super()._open()
        try:
            st = os.fstat(stream.fileno())
            self._regular = stat.S_ISREG(st.st_mode)
            self._size = st.st_size if self._regular else 0
        except OSError:
            self._regular, self._size = False, 0
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            size = len(line) if line.isascii() else len(line.encode("utf-8"))
            if self.maxBytes and self._regular and self._size > 0 and self._size + size > self.maxBytes:
                self.doRollover()
            if self.stream is None:  # closed after a write error: try again with this line
                self.stream = self._open()
            self.stream.write(line)
            self._size += size
            self.written += 1
        except Exception:
            self.handleError(record)

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()  # PATH.N-1 -> PATH.N .. PATH -> PATH.1, then a new PATH
            return
        if self.stream:
            self.stream.close()
            self.stream = None
        Path(self.baseFilename).unlink(missing_ok=True)
        self.stream = self._open()

    def flush(self) -> None:
        """Called by ``emit`` after every line in ``StreamHandler``; here a no-op: see :meth:`flush_lines`."""

    def flush_lines(self) -> None:
        """Hand the buffered lines to the OS (the writer calls this when the queue runs empty)."""
        with self.lock:  # type: ignore[union-attr]
            if self.stream is None:
                return  # closed after a write error; the next line reopens it
            try:
                self.stream.flush()
                self._error_logged = False  # the outage, if there was one, is over
            except Exception:
                self.handleError(None)

    def handleError(self, record: logging.LogRecord | None) -> None:
        """A write failed: say so once per outage (not once per line), drop the stream, retry with the next line."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            if not self._error_logged:
                logger.error("cannot write the usage log %s: %s; events are lost until it can be written again "
                             "(retrying with the next ones)", self.baseFilename, exc)
                self._error_logged = True
        else:
            logger.error("usage log: cannot write an event: %r", exc)
        if self.stream is not None:
            with contextlib.suppress(Exception):
                self.stream.close()
            self.stream = None

    def close(self) -> None:
        """Flush, fsync and close (the daemon is stopping: what was logged must be on disk)."""
        with self.lock:  # type: ignore[union-attr]
            if self.stream is not None:
                with contextlib.suppress(OSError):
                    self.stream.flush()
                with contextlib.suppress(OSError):  # EINVAL on a pipe
                    os.fsync(self.stream.fileno())
            with contextlib.suppress(OSError):
                super().close()


class _Writer(QueueListener):
    """The writer thread: ``QueueListener`` that flushes the file and reports drops whenever the queue runs
    empty, and whose stop waits a bounded time (a stalled disk must not hang the daemon's exit)."""

    def __init__(self, q: queue.Queue[Any], file: _UsageFile, report_drops: Callable[[], None]) -> None:
        super().__init__(q, file)
        self.q = q  # typed: QueueListener.queue is any queue-like object
        self.file = file
        self.report_drops = report_drops

    def dequeue(self, block: bool) -> Any:
        try:
            return self.q.get_nowait()
        except queue.Empty:
            pass
        self.report_drops()
        self.file.flush_lines()
        return self.q.get(block)

    def handle(self, record: logging.LogRecord) -> None:
        super().handle(record)
        self.report_drops()

    def start(self) -> None:
        super().start()
        if self._thread is not None:
            self._thread.name = "lmgrd-usage-log"

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop_within(self, timeout: float) -> bool:
        """Ask the thread to finish what is queued and wait up to ``timeout`` seconds; True when it did."""
        thread = self._thread
        if thread is None:
            return True
        self.q.put(_SENTINEL, timeout=timeout)  # raises queue.Full when the writer is stuck
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._thread = None
        return True


class UsageLog:
    """A server observer that appends usage events to ``path`` from a background thread.

    Args:
        path: the log file; its directory is created if missing.
        max_bytes: rotate before a write would take the file past this size (0: never rotate).
        backups: rotated files kept (``path.1`` newest .. ``path.N`` oldest); 0 keeps none.
        wall: the wall clock (epoch seconds) events are stamped with; the server's own.
        queue_size: events buffered before new ones are dropped.
        server: the daemon it observes (``None`` in unit tests): gives ``count``, ``in_use`` and the clock.

    Raises:
        OSError: the file cannot be opened (at start, so the daemon's log says so).
    """

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 wall: Callable[[], float] | None = None, queue_size: int = DEFAULT_QUEUE_SIZE,
                 server: Server | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.server = server
        self.wall: Callable[[], float] = wall or (server.wall if server is not None else time.time)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._dropped_reported = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _UsageFile(self.path, max_bytes, backups)  # opens the file: fails here if it cannot
        self._enqueue = _DroppingQueueHandler(self.queue)
        self._writer = _Writer(self.queue, self._file, self._report_drops)
        self._closing = threading.Lock()
        self._writer.start()

    @property
    def dropped(self) -> int:
        """Events dropped because the queue was full."""
        return self._enqueue.dropped

    @property
    def written(self) -> int:
        """Lines written since start (events and ``dropped`` lines)."""
        return self._file.written

    # -- observer hooks (event loop thread: only build a dict and enqueue) --------------------------------
    def _put(self, event: str, fields: dict[str, Any]) -> None:
        self._enqueue.handle(_record((self.wall(), event, fields)))

    def _in_use(self, lease: LeaseInfo) -> int | None:
        if self.server is None:
            return None
        try:
            return int(self.server.ledger.in_use(lease.pool))
        except LookupError:  # the pool is gone (revoked or no longer licensed)
            return 0

    def on_grant(self, lease: LeaseInfo, who: Any, waited: float) -> None:
        count = self.server.licensing.count(lease.pool) if self.server is not None else None
        self._put("checkout", {
            "customer_id": lease.pool[0], "product": lease.pool[1], "version": lease.version, "user": lease.user,
            "host": lease.host, "lease": lease.token[:LEASE_ID_CHARS], "count": count, "in_use": self._in_use(lease),
            "pid": lease.pid, "display": lease.display, "waited_s": round(waited, 3),
        })

    def on_release(self, lease: LeaseInfo, reason: str) -> None:
        self._put(reason, {
            "customer_id": lease.pool[0], "product": lease.pool[1], "version": lease.version, "user": lease.user,
            "host": lease.host, "lease": lease.token[:LEASE_ID_CHARS], "in_use": self._in_use(lease),
            "granted_at": lease.granted_at,
        })

    def on_deny(self, product: str, version: str, code: Any, who: Any, customer_id: str | None) -> None:
        if customer_id is None and self.server is not None:
            customer_id = self._customer_of(product)
        self._put("denial", {
            "customer_id": customer_id or "", "product": product, "version": version,
            "user": str(getattr(who, "user", "") or ""), "host": str(getattr(who, "host", "") or ""),
            "reason": str(code),
        })

    def _customer_of(self, product: str) -> str:
        """The customer ID of the one license (served or refused, say revoked) naming ``product``, else ""."""
        lic = self.server.licensing if self.server is not None else None
        if lic is None:
            return ""
        return lic.customer_of(product) or ""

    def on_shutdown(self) -> None:
        self.close()

    # -- writer thread -------------------------------------------------------------------------------------
    def _report_drops(self) -> None:
        """Write a ``dropped`` line for the events dropped since the last one (writer thread, or close())."""
        dropped = self._enqueue.dropped  # an int read is atomic; the loop only ever increments it
        new = dropped - self._dropped_reported
        if new <= 0:
            return
        self._dropped_reported = dropped
        logger.warning("usage log: %d event(s) dropped because the disk did not keep up (queue of %d full)",
                       new, self.queue.maxsize)
        self._file.handle(_record((float(self.wall()), "dropped", {"count": new})))

    def close(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Write what is queued, then stop the writer (waits up to ``timeout`` seconds). Idempotent."""
        with self._closing:
            if not self._writer.alive():
                return
            try:
                finished = self._writer.stop_within(timeout)
            except queue.Full:
                logger.error("usage log: the writer is stuck; %d queued event(s) not written", self.queue.qsize())
                return
            if not finished:
                logger.error("usage log: the writer did not finish within %.0f s; some events may be missing",
                             timeout)
                return
            self._report_drops()  # events dropped after the writer's last look
            self._file.close()
            if self.written:
                logger.info("usage log %s flushed (%d event(s) written since start)", self.path, self.written)


def attach_usage_log(server: Server) -> UsageLog | None:
    """Start the usage log the server's config asks for (``usage_log``) and register it as an observer."""
    cfg = server.cfg
    path = getattr(cfg, "usage_log", None)
    if path is None:
        return None
    try:
        log = UsageLog(Path(path), max_bytes=cfg.usage_log_max_bytes, backups=cfg.usage_log_backups, server=server)
    except OSError as exc:
        logger.error("cannot open the usage log %s: %s; usage is not logged (fix the path or its permissions, "
                     "then restart)", path, exc)
        return None
    server.observers.append(log)
    logger.info("usage log: %s (rotated at %d bytes, %d backup(s))", path, log.max_bytes, log.backups)
    return log
