"""Durable lease store: every granted and not yet released lease survives a restart of the daemon.

The daemon talks to a :class:`LeaseStore` only: ``record_grant`` / ``record_release`` buffer in memory,
``flush`` makes the buffer survive a crash of the process, ``sync`` makes it survive a power loss,
``load`` gives the live leases back after a restart. This module imports the standard library, msgpack
and :mod:`lmgrd.core.ledger` (for :class:`LeaseRecord`); never ``protocol`` transports or asyncio.

:class:`JournalStore` is an append-only journal in the state directory with group commit: the daemon
calls ``flush()`` once per event-loop iteration, so every grant and release of that iteration costs one
``write(2)`` together, and it sends replies only after ``flush()`` returned.

What can be lost
    * A crash of the process (SIGKILL, OOM, a bug) loses **nothing that was acknowledged**: ``flush()``
      hands the bytes to the kernel before any reply is sent, and the kernel writes them out even
      though the process is gone.
    * A power loss or kernel crash loses the records written since the last ``sync()`` (the daemon
      calls it every second, so up to about one second of grants and releases). A lost grant means a
      client holds a seat the restarted daemon does not know about: the client's next heartbeat or
      resume is answered ``LEASE_NOT_FOUND`` and it checks out again. A lost release means a seat
      stays counted until its lease times out (one lease timeout after the restart).

Journal format (``leases.journal``)
    The 8-byte magic ``b"LMGRDJ\\x00\\x01"``, then records, each ``length`` (4 bytes, big-endian),
    ``crc32(payload)`` (4 bytes, big-endian), ``payload`` (msgpack). A payload is
    ``[1, token, customer_id, product, [share key...], user, host, pid, version, display, granted_at, owner,
    addr]`` for a grant and ``[2, token]`` for a release; ``owner`` is the holder's digest
    (:func:`lmgrd.core.ledger.owner_digest`: never the client's secret itself), absent from grants written
    before leases were bound (read as "": such a lease may be resumed by a connection of the same user and
    host); ``addr`` is the address the client connected from (for usage-policy rules by address), absent from
    grants written before it was kept (read as ""). Replaying the records in order gives the live set.

Disk full, read-only, I/O error
    A failed ``flush`` raises :class:`StoreWriteError` (the state directory, the OS error) after cutting the
    file back to its last intact record, and keeps the batch buffered, in order; the next ``flush`` writes
    it whole. If even the cut-back fails, it is retried before the next write, so a partial batch never
    ends up in front of later records. The daemon (``lmgrd.daemon.outbox``) acknowledges nothing of a
    failed batch and retries with backoff; see the README, "When the state directory is full or read-only".

Recovery
    A damaged record with no intact record after it is a torn tail (a write cut short by a crash or a
    power loss): it is cut off and a warning says how many bytes went. A damaged record *followed* by
    intact ones is corruption in the middle: the store refuses to open, naming the file and the offset,
    since guessing would silently drop or resurrect seats.

What it keeps in memory
    Per live lease, only where its grant record is (a token -> offset map): the lease itself is the ledger's.
    ``load`` and compaction read the records back from the file (and from the batch not yet written).

Compaction
    When the journal holds many more records than live leases, the live set (each live grant record, byte
    for byte as written) is copied to ``leases.journal.tmp``, fsynced, and renamed over the journal (then the
    directory is fsynced). At
    every instant one complete journal holds the live set: before the rename it is the old file (a
    leftover temporary file is deleted at the next start), after it the new one. The appending
    descriptor is the temporary file's own, so nothing is written to the replaced file afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import msgpack

from lmgrd import LmgrdError
from lmgrd.core.ledger import LeaseRecord

__all__ = [
    "JOURNAL_NAME",
    "LOCK_NAME",
    "JournalCorrupt",
    "JournalStore",
    "LeaseRecord",
    "LeaseStore",
    "StoreError",
    "StoreLocked",
    "StoreWriteError",
    "open_store",
    "read_journal",
]

logger = logging.getLogger(__name__)

JOURNAL_NAME = "leases.journal"
TMP_NAME = "leases.journal.tmp"
LOCK_NAME = "lmgrd.lock"
MAGIC = b"LMGRDJ\x00\x01"
#: No record comes near this (the protocol bounds every string); a larger length field is damage.
MAX_RECORD_BYTES = 1 << 20
#: Compaction runs when records > COMPACT_RATIO * live + COMPACT_MIN_RECORDS. The floor is high on
#: purpose: at 50,000 checkouts+checkins a second (100,000 records) and a few thousand live leases,
#: it means about one compaction (one small file write and fsync) a second, not several.
COMPACT_RATIO = 4
COMPACT_MIN_RECORDS = 100_000

_GRANT = 1
_RELEASE = 2
_HEADER = struct.Struct(">II")  # payload length, crc32(payload)
#: A release's payload is ``[2, token]``: msgpack's fixarray-of-2 byte and the 2, then the packed token
#: (every checkin writes one; byte for byte what packing the list gives, without building it).
_RELEASE_HEAD = bytes((0x92, _RELEASE))


class StoreError(LmgrdError):
    """The lease store cannot do its job; the message names the file and what to do."""


class StoreWriteError(StoreError):
    """A write to the store failed (disk full, read-only, I/O error); the batch stays buffered for a retry.

    ``state_dir`` and ``reason`` (the OS error's text) are kept apart so the daemon can tell clients and
    operators exactly what is wrong where.
    """

    def __init__(self, path: Path, state_dir: Path, reason: str, records: int) -> None:
        self.path = path
        self.state_dir = state_dir
        self.reason = reason
        self.records = records
        super().__init__(
            f"cannot write the lease journal {path}: {reason}; {records} grant/release record(s) wait in memory. "
            f"Free space in {state_dir} or make it writable again: lmgrd retries by itself and grants new seats "
            f"again as soon as the write succeeds"
        )


class StoreLocked(StoreError):
    """Another process (most likely another lmgrd) holds the state directory's lock."""


class JournalCorrupt(StoreError):
    """The journal is damaged somewhere other than its tail, or is not a journal at all."""

    def __init__(self, path: Path, offset: int, what: str) -> None:
        self.path = path
        self.offset = offset
        super().__init__(
            f"lease journal {path} is corrupt at byte offset {offset}: {what}. lmgrd will not guess which "
            f"seats are held. Keep a copy of the file, then either truncate it to {offset} bytes to keep "
            f"the leases recorded before that point, or move it aside to start with no leases (clients "
            f"then check out again)"
        )


class LeaseStore(Protocol):
    """What the daemon needs from a durable lease store."""

    def load(self) -> list[LeaseRecord]:
        """The leases granted and not yet released, in grant order."""
        ...

    def record_grant(self, rec: LeaseRecord) -> None:
        """Buffer a grant (in memory; durable after the next :meth:`flush`)."""
        ...

    def record_release(self, token: str) -> None:
        """Buffer a release (checkin, expiry, removal); unknown tokens are ignored."""
        ...

    def flush(self) -> None:
        """Write everything buffered; when it returns, the records survive a SIGKILL of the process.

        Raises:
            StoreWriteError: nothing of the batch is durable; it stays buffered, in order, and the next
                ``flush`` writes it (the daemon retries with backoff and acknowledges nothing meanwhile).
        """
        ...

    def sync(self) -> None:
        """Make everything flushed survive a power loss."""
        ...

    def close(self) -> None:
        """Flush, sync and release the store (idempotent)."""
        ...


# -- encoding ---------------------------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"a lease record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES} bytes")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _grant_payload(rec: LeaseRecord) -> list[object]:
    # share_key stays a tuple: msgpack packs a tuple as the same array a list makes.
    return [
        _GRANT, rec.token, rec.customer_id, rec.product, rec.share_key, rec.user, rec.host, rec.pid,
        rec.version, rec.display, rec.granted_at, rec.owner, rec.addr,
    ]  # fmt: skip


def _decode(payload: bytes) -> LeaseRecord | str | None:
    """A grant's record, a release's token, or None if the payload is not a valid record."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception:  # msgpack raises several unrelated types for bad input
        return None
    if type(obj) is not list or not obj:
        return None
    if obj[0] == _RELEASE and len(obj) == 2 and type(obj[1]) is str:
        return obj[1]
    if obj[0] != _GRANT or len(obj) not in (11, 12, 13):
        return None
    while len(obj) < 13:  # written before leases were bound to their holder (11), or before addresses (12)
        obj.append("")
    _, token, customer_id, product, share_key, user, host, pid, version, display, granted_at, owner, addr = obj
    strings = (token, customer_id, product, user, host, version, display, owner, addr)
    if not all(type(s) is str for s in strings) or type(share_key) is not list:
        return None
    if not all(type(s) is str for s in share_key) or type(pid) is not int:
        return None
    if type(granted_at) not in (int, float):
        return None
    return LeaseRecord(
        token, customer_id, product, tuple(share_key), user, host, pid, version, display, float(granted_at), owner,
        addr,
    )


class _Scan:
    __slots__ = ("end", "live", "records", "torn")

    def __init__(self) -> None:
        self.live: dict[str, int] = {}  # token -> offset of its grant record, in grant order
        self.records = 0
        self.end = len(MAGIC)  # offset just past the last intact record
        self.torn = ""  # why the tail was cut, if it was


def _intact_record_at(data: bytes, off: int) -> bool:
    n = len(data)
    if n - off < _HEADER.size:
        return False
    length, crc = _HEADER.unpack_from(data, off)
    end = off + _HEADER.size + length
    if length == 0 or length > MAX_RECORD_BYTES or end > n:
        return False
    payload = data[off + _HEADER.size : end]
    return zlib.crc32(payload) == crc and _decode(payload) is not None


def _scan(data: bytes, path: Path) -> _Scan:
    """Replay a journal's bytes. Raises JournalCorrupt on damage that is not a torn tail."""
    if data[: len(MAGIC)] != MAGIC:
        raise JournalCorrupt(path, 0, "the file does not start with the lmgrd journal header")
    scan = _Scan()
    live = scan.live
    n = len(data)
    off = len(MAGIC)
    unpack = _HEADER.unpack_from
    while off < n:
        problem = ""
        if n - off < _HEADER.size:
            problem = "a record header is cut short"
        else:
            length, crc = unpack(data, off)
            end = off + _HEADER.size + length
            if length == 0 or length > MAX_RECORD_BYTES:
                problem = f"a record claims an impossible length of {length} bytes"
            elif end > n:
                problem = f"a record of {length} bytes is cut short"
            else:
                payload = data[off + _HEADER.size : end]
                if zlib.crc32(payload) != crc:
                    problem = "a record fails its checksum"
                else:
                    rec = _decode(payload)
                    if rec is None:
                        # Checksum intact, content invalid: written this way, so not a torn write.
                        raise JournalCorrupt(path, off, "a record has a valid checksum but is not a lease record")
                    if type(rec) is str:
                        live.pop(rec, None)
                    else:
                        assert isinstance(rec, LeaseRecord)
                        if rec.token in live:
                            raise JournalCorrupt(path, off, f"lease {rec.token[:6]}... is granted twice")
                        live[rec.token] = off
                    scan.records += 1
                    off = end
                    continue
        # Damage at `off`: a torn tail only if no intact record follows anywhere after it.
        for later in range(off + 1, n - _HEADER.size):
            if _intact_record_at(data, later):
                raise JournalCorrupt(path, off, f"{problem}, yet an intact record follows at offset {later}")
        scan.torn = problem
        break
    scan.end = off
    return scan


def read_journal(path: str | os.PathLike[str]) -> list[LeaseRecord]:
    """Replay a journal file without locking or repairing it (for tools and tests): the live leases.

    A torn tail is ignored; corruption in the middle raises :class:`JournalCorrupt`.
    """
    p = Path(path)
    data = p.read_bytes()
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        return []
    return [_record_at(data, off) for off in _scan(data, p).live.values()]


def _frame_at(data: bytes | mmap.mmap, off: int) -> bytes:
    """The whole record (header and payload) that starts at ``off``."""
    (length,) = _HEADER.unpack_from(data, off)[:1]
    return data[off : off + _HEADER.size + length]


def _record_at(data: bytes | mmap.mmap, off: int) -> LeaseRecord:
    """The grant record at ``off`` (an offset the journal itself noted: a grant, already checked once)."""
    rec = _decode(_frame_at(data, off)[_HEADER.size :])
    if not isinstance(rec, LeaseRecord):
        raise StoreError(f"lease journal: no grant record at offset {off} where one was written (a bug in lmgrd)")
    return rec


# -- files ------------------------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    while written < len(data):  # a regular file writes everything unless the disk is full or failing
        written += os.write(fd, memoryview(data)[written:])


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _acquire_lock(state_dir: Path) -> int:
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        raise StoreLocked(
            f"state directory {state_dir} is in use by another process (pid {holder} holds {path}); "
            f"stop that lmgrd first, or give this one its own --state-dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    except OSError:  # the pid is only informational; the lock is what counts
        pass
    return fd


class JournalStore:
    """Append-only lease journal with group commit in ``state_dir`` (see the module docstring).

    Opening takes an exclusive lock on ``state_dir/lmgrd.lock`` (held until :meth:`close` or the
    process dies), deletes a leftover compaction file, replays the journal and cuts a torn tail.

    Durability: :meth:`flush` writes the whole batch with one ``write(2)``; once it returns the batch
    survives SIGKILL of this process. :meth:`sync` fsyncs: a power loss loses at most the records
    flushed since the last ``sync()`` (the daemon calls it every second), never a record from before.

    Raises (from the constructor):
        StoreLocked: another process holds the state directory.
        JournalCorrupt: the journal is damaged in the middle or is not a journal.
        OSError: the directory or files cannot be created or read.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        compact_min_records: int = COMPACT_MIN_RECORDS,
        compact_ratio: int = COMPACT_RATIO,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / JOURNAL_NAME
        self._tmp_path = self.state_dir / TMP_NAME
        self._compact_min = compact_min_records
        self._compact_ratio = compact_ratio
        self._packb = msgpack.Packer(use_bin_type=True).pack
        self._buf: list[bytes] = []  # encoded frames not yet written
        self._pending = 0  # bytes in _buf
        # token -> offset of its grant record, for every lease recorded and not released (buffered included:
        # where the record lands once the batch is written, at _size + what is buffered before it), grant order.
        # Nothing else per lease: the lease itself is the ledger's.
        self._live: dict[str, int] = {}
        self._records = 0  # records in the file
        self._size = 0  # bytes in the file
        self._unsynced = False
        self._torn = False  # a failed write could not be cut back: cut before the next write
        self._compact_at = 0  # record count below which compaction is not retried after a failure
        self._fd = -1
        self._closed = False
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = _acquire_lock(self.state_dir)
        try:
            self._open()
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
            os.close(self._lock_fd)
            raise

    def _open(self) -> None:
        try:
            self._tmp_path.unlink()
            logger.info("removed %s, left by an unfinished compaction (the journal is intact)", self._tmp_path)
        except FileNotFoundError:
            pass
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            if data:
                logger.warning("lease journal %s has only a partial header; starting it afresh", self.path)
            self._fd, self._size = self._write_snapshot([])
            logger.info("created lease journal %s", self.path)
            return
        scan = _scan(data, self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        if scan.end < len(data):
            logger.warning(
                "lease journal %s: cut a torn tail of %d bytes at offset %d (%s); the %d records before "
                "it are intact",
                self.path, len(data) - scan.end, scan.end, scan.torn, scan.records,
            )  # fmt: skip
            os.ftruncate(self._fd, scan.end)
            os.fsync(self._fd)
        self._live = scan.live
        self._records = scan.records
        self._size = scan.end
        logger.info("lease journal %s: %d live leases in %d records", self.path, len(self._live), self._records)
        if self._records > self._compact_ratio * len(self._live) + self._compact_min:
            self._compact()

    # -- the LeaseStore interface ---------------------------------------------------------------------------

    def load(self) -> list[LeaseRecord]:
        """The live leases in grant order (on a fresh store: exactly what the journal held), read back from the
        journal file and the batch not yet written."""
        self._check_open()
        size = self._size
        pending = b"".join(self._buf)
        with self._mapped() as data:
            return [_record_at(data, off) if off < size else _record_at(pending, off - size)
                    for off in self._live.values()]

    def record_grant(self, rec: LeaseRecord) -> None:
        if rec.token in self._live:
            raise ValueError(f"lease {rec.token[:6]}... is already recorded as granted")
        frame = _frame(self._packb(_grant_payload(rec)))
        self._buf.append(frame)
        self._live[rec.token] = self._size + self._pending
        self._pending += len(frame)

    def record_release(self, token: str) -> None:
        if self._live.pop(token, None) is not None:
            frame = _frame(_RELEASE_HEAD + self._packb(token))
            self._buf.append(frame)
            self._pending += len(frame)

    def flush(self) -> None:
        """Write the buffered records with one ``write(2)``; they then survive SIGKILL.

        Raises:
            StoreWriteError: the write failed (disk full, read-only file system, I/O error). The file is
                cut back to its last intact record (or, if even that fails, before the next write) and the
                batch stays buffered, in order, for the next flush; none of it is durable, so the daemon
                must not acknowledge it.
        """
        if not self._buf:
            return
        self._check_open()
        data = b"".join(self._buf)
        try:
            if self._torn:
                # A failed write may have left part of a batch, and cutting it back failed too: cut it now,
                # before anything is appended behind it (a partial record in the middle is corruption).
                os.ftruncate(self._fd, self._size)
                self._torn = False
            _write_all(self._fd, data)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)  # never leave a partial batch before later records
            except OSError:
                self._torn = True
            raise StoreWriteError(self.path, self.state_dir, exc.strerror or str(exc), len(self._buf)) from exc
        self._size += len(data)
        self._records += len(self._buf)
        self._buf.clear()
        self._pending = 0
        self._unsynced = True
        if self._records > self._compact_ratio * len(self._live) + self._compact_min and (
            self._records >= self._compact_at
        ):
            self._compact()

    def sync(self) -> None:
        """fsync the journal: everything flushed so far survives a power loss."""
        if self._unsynced:
            self._check_open()
            os.fsync(self._fd)
            self._unsynced = False

    def close(self) -> None:
        """Flush, sync, close the journal and release the lock. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
            self.sync()
        finally:
            self._closed = True
            os.close(self._fd)
            os.close(self._lock_fd)

    def __enter__(self) -> JournalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------------------

    @property
    def records(self) -> int:
        """Records in the journal file (grants and releases, flushed)."""
        return self._records

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the lease journal {self.path} is closed")

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[bytes | mmap.mmap]:
        """The journal file's intact records (its first ``_size`` bytes), mapped read-only while in use."""
        if self._size <= len(MAGIC):
            yield MAGIC
            return
        with mmap.mmap(self._fd, self._size, access=mmap.ACCESS_READ) as data:
            yield data

    def _write_snapshot(self, live: Iterable[bytes]) -> tuple[int, int]:
        """Write the records ``live`` (whole frames) as a new journal through the temporary file; return (its fd,
        its size).

        Order matters for crash safety: write and fsync the temporary file, then rename it over the
        journal, then fsync the directory. A crash before the rename leaves the old journal (and a
        temporary file deleted at the next start); after it, the new journal, complete.
        """
        data = b"".join((MAGIC, *live))
        fd = os.open(self._tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
            os.replace(self._tmp_path, self.path)
        except BaseException:
            os.close(fd)
            raise
        # From here `fd` is the journal: never fail, or the caller would keep appending to the old file.
        try:
            _fsync_dir(self.state_dir)
        except OSError as exc:
            logger.warning("could not fsync directory %s (%s); a power loss may undo the compaction",
                           self.state_dir, exc)  # fmt: skip
        return fd, len(data)

    def _compact(self) -> None:
        """Copy the live grant records (byte for byte) to a new journal; called with nothing buffered."""
        before = self._records
        offsets: dict[str, int] = {}
        frames: list[bytes] = []
        at = len(MAGIC)
        with self._mapped() as data:
            for token, off in self._live.items():
                rec = _frame_at(data, off)
                frames.append(rec)
                offsets[token] = at
                at += len(rec)
        try:
            fd, size = self._write_snapshot(frames)
        except OSError as exc:
            # The old journal is intact and current; keep appending to it and retry much later.
            self._compact_at = self._records + max(self._compact_min, 1)
            logger.warning("lease journal %s: compaction failed (%s); will retry later", self.path, exc)
            with contextlib.suppress(OSError):
                self._tmp_path.unlink()
            return
        os.close(self._fd)
        self._fd = fd
        self._size = size
        self._live = offsets
        self._records = len(self._live)
        self._unsynced = False  # the snapshot was fsynced
        logger.info("lease journal %s: compacted %d records to %d live leases", self.path, before, self._records)


def open_store(state_dir: str | os.PathLike[str]) -> JournalStore:
    """Open (creating if needed) the lease journal in ``state_dir``; see :class:`JournalStore`."""
    return JournalStore(state_dir)
