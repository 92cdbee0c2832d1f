"""The usage log: one JSON line per checkout, checkin, expiry, removal, revocation and denial.

It answers the customer's question "how many seats should we buy?" (``lmutil report`` reads it, see
:mod:`lmgrd.report`). Append-only, rotated by size (``PATH``, ``PATH.1`` .. ``PATH.N``, like logrotate and
``logging.handlers.RotatingFileHandler``), and it never blocks the event loop: the observer hooks only put a
small tuple on a bounded in-memory queue; a background thread formats, writes and rotates in batches. If the
disk stalls long enough for the queue to fill, further events are dropped and counted; the writer logs how
many and writes a ``dropped`` line, so a report knows the log has a gap. ``on_shutdown`` (called by the
server's shutdown) drains the queue before the daemon exits.

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
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lmgrd.core.ledger import LeaseInfo

if TYPE_CHECKING:
    from lmgrd.daemon.api import DaemonView as Server

__all__ = ["DEFAULT_BACKUPS", "DEFAULT_MAX_BYTES", "DEFAULT_QUEUE_SIZE", "LEASE_ID_CHARS", "UsageLog",
           "attach_usage_log"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
#: Events buffered while the disk is slow; past this they are dropped and counted (about 30 MB of tuples).
DEFAULT_QUEUE_SIZE = 100_000
#: Characters of the lease token written to the log.
LEASE_ID_CHARS = 12
#: Lines written per write() call at most.
_BATCH = 2000
#: How long shutdown waits for the writer to drain.
_CLOSE_TIMEOUT = 10.0

# An event on the queue: (epoch, event name, fields). Formatting happens on the writer thread.
_Event = tuple[float, str, dict[str, Any]]
_STOP: Any = object()


class UsageLog:
    """A server observer that appends usage events to ``path`` from a background thread.

    Args:
        path: the log file; its directory is created if missing.
        max_bytes: rotate before a write would take the file past this size (0: never rotate).
        backups: rotated files kept (``path.1`` newest .. ``path.N`` oldest); 0 keeps none.
        wall: the wall clock (epoch seconds) events are stamped with; the server's own.
        queue_size: events buffered before new ones are dropped.
        server: the daemon it observes (``None`` in unit tests): gives ``count``, ``in_use`` and the clock.
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
        self.dropped = 0  # only incremented, on the loop thread; the writer reports each increase
        self._dropped_reported = 0
        self.written = 0
        self._file: IO[bytes] | None = None
        self._size = 0
        self._error_logged = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()  # fail at start, in the daemon's log, if the file cannot be opened
        self._thread = threading.Thread(target=self._run, name="lmgrd-usage-log", daemon=True)
        self._thread.start()

    # -- observer hooks (event loop thread: only build a dict and enqueue) --------------------------------
    def _put(self, event: str, fields: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait((self.wall(), event, fields))
        except queue.Full:
            self.dropped += 1

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
    def _open(self) -> None:
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across batches, closed in close()
        try:
            self._size = self._file.tell()
        except OSError:  # not a regular file (a pipe to a log shipper): never rotated
            self._size = 0

    def _format(self, item: _Event) -> bytes:
        epoch, event, fields = item
        epoch = round(epoch, 3)  # ts and epoch say the same millisecond
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "epoch": epoch, "event": event,
        }
        granted_at = fields.pop("granted_at", None)
        line.update(fields)
        if granted_at is not None:
            line["held_s"] = round(max(0.0, epoch - granted_at), 3)
        return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._open()

    def _write(self, lines: list[bytes]) -> None:
        try:
            if self._file is None:
                self._open()
            start = 0
            size = self._size
            # Rotate between lines, before the one that would take the file past max_bytes (a line longer
            # than max_bytes gets a file of its own).
            for i, line in enumerate(lines):
                if self.max_bytes and size > 0 and size + len(line) > self.max_bytes:
                    self._append(lines[start:i])
                    self._rotate()
                    start, size = i, 0
                size += len(line)
            self._append(lines[start:])
            self._error_logged = False
        except OSError as exc:
            if not self._error_logged:  # once per outage, not once per batch
                logger.error("cannot write the usage log %s: %s; %d event(s) lost (retrying with the next ones)",
                             self.path, exc, len(lines))
                self._error_logged = True
            with contextlib.suppress(OSError):
                if self._file is not None:
                    self._file.close()
            self._file = None

    def _append(self, lines: list[bytes]) -> None:
        if not lines:
            return
        assert self._file is not None
        data = b"".join(lines)
        self._file.write(data)
        self._file.flush()
        self._size += len(data)
        self.written += len(lines)

    def _drops_line(self) -> bytes | None:
        dropped = self.dropped  # an int read is atomic; the loop only ever increments it
        new = dropped - self._dropped_reported
        if new <= 0:
            return None
        self._dropped_reported = dropped
        logger.warning("usage log: %d event(s) dropped because the disk did not keep up (queue of %d full)",
                       new, self.queue.maxsize)
        return self._format((float(self.wall()), "dropped", {"count": new}))

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self.queue.get()
            batch: list[bytes] = []
            while True:
                if item is _STOP:
                    stop = True
                    break
                batch.append(self._format(item))
                if len(batch) >= _BATCH:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            drops = self._drops_line()
            if drops is not None:
                batch.append(drops)
            if batch:
                self._write(batch)
        if self._file is not None:
            try:
                with contextlib.suppress(OSError):
                    self._file.flush()
                with contextlib.suppress(OSError):  # EINVAL on a pipe
                    os.fsync(self._file.fileno())
            finally:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None

    def close(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Write what is queued, then stop the writer (waits up to ``timeout`` seconds). Idempotent."""
        if not self._thread.is_alive():
            return
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            logger.error("usage log: the writer is stuck; %d queued event(s) not written", self.queue.qsize())
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("usage log: the writer did not finish within %.0f s; some events may be missing",
                         timeout)
        elif self.written:
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
