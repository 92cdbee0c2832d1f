"""The lease journal's edges on real files: the record format, damage classification, limits, permissions,
the lock file, compaction retries and a failed write; and the user/host glue from lease to restored lease.

Written to kill the mutants ``make mutation`` found surviving in lmgrd/storage/journal.py. Journals are
built byte by byte from the documented format (module docstring of lmgrd.storage.journal), not with the
code under test, so a test fails when the code drifts from the format.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from harness import Holder

from lmgrd.core.ledger import LeaseInfo, Ledger, ShareMode, share_key_for
from lmgrd.storage.journal import (
    JOURNAL_NAME,
    LOCK_NAME,
    MAGIC,
    MAX_RECORD_BYTES,
    TMP_NAME,
    JournalCorrupt,
    JournalStore,
    LeaseRecord,
    StoreLocked,
    StoreWriteError,
    read_journal,
)
from protocol import Checkout, Granted, Welcome

LOG = "lmgrd.storage.journal"


def rec(i: int, **kw: Any) -> LeaseRecord:
    fields: dict[str, Any] = dict(token=f"tok{i:04d}", customer_id="C1", product="CADPRO", share_key=("bob", "ws7"),
                                  user="bob", host="ws7", pid=4000 + i, version="2.1", display=":0",
                                  granted_at=1.7e9 + i, owner="0f" * 16)
    fields.update(kw)
    return LeaseRecord(**fields)


def grant_payload(r: LeaseRecord) -> list[Any]:
    """A grant as the format documents it: [1, token, customer_id, product, [share key...], user, host, pid,
    version, display, granted_at, owner, addr]."""
    return [1, r.token, r.customer_id, r.product, list(r.share_key), r.user, r.host, r.pid, r.version, r.display,
            r.granted_at, r.owner, r.addr]


def frame(payload: bytes, *, crc: int | None = None, length: int | None = None) -> bytes:
    return struct.pack(">II", len(payload) if length is None else length,
                       zlib.crc32(payload) if crc is None else crc) + payload


def pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def grant(r: LeaseRecord) -> bytes:
    return frame(pack(grant_payload(r)))


def release(token: Any) -> bytes:
    return frame(pack([2, token]))


def write(dir_: Path, *parts: bytes) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    path = dir_ / JOURNAL_NAME
    path.write_bytes(MAGIC + b"".join(parts))
    return path


def corrupt(path: Path) -> JournalCorrupt:
    with pytest.raises(JournalCorrupt) as info:
        read_journal(path)
    assert info.value.path == path
    with pytest.raises(JournalCorrupt) as again:
        JournalStore(path.parent)
    assert again.value.path == path and again.value.offset == info.value.offset
    assert str(again.value) == str(info.value)
    return info.value


def corrupt_message(path: Path, offset: int, what: str) -> str:
    return (
        f"lease journal {path} is corrupt at byte offset {offset}: {what}. lmgrd will not guess which seats are "
        f"held. Keep a copy of the file, then either truncate it to {offset} bytes to keep the leases recorded "
        f"before that point, or move it aside to start with no leases (clients then check out again)"
    )


# -- the user/host glue: a lease, its record, the journal, the restored lease ---------------------------------


def test_a_lease_restored_from_a_real_journal_keeps_its_user_and_host(tmp_path: Path) -> None:
    # The glue the issue names: swapping user and host in LeaseInfo.to_record or in the journal's grant
    # payload left the suite green. User and host differ in every way here, and both must come back.
    ledger = Ledger(30.0, lambda: "tok-carol-1")
    pool = ("C1", "CADPRO")
    ledger.set_pool(pool, 2)
    key = share_key_for(ShareMode.USER_HOST, "carol", "ws042.corp.example")
    lease = ledger.checkout(pool, key, Holder("carol", "ws042.corp.example", 4242, ":1", 7), "2.1", 100.0, 1.7e9)
    assert lease is not None
    with JournalStore(tmp_path) as store:
        store.record_grant(lease.to_record())
    records = read_journal(tmp_path / JOURNAL_NAME)
    assert [(r.user, r.host) for r in records] == [("carol", "ws042.corp.example")]
    with JournalStore(tmp_path) as store:
        loaded = store.load()
    restarted = Ledger(30.0, lambda: "unused")
    [back] = restarted.restore(loaded, 5.0)
    assert (back.user, back.host, back.pid, back.display, back.version) == ("carol", "ws042.corp.example", 4242,
                                                                            ":1", "2.1")
    assert (back.token, back.pool, back.share_key, back.granted_at) == ("tok-carol-1", pool, ("carol", "ws042"),
                                                                        1.7e9)
    assert back.session is None and back.deadline == 35.0


def test_a_grant_recorded_before_leases_were_bound_reads_with_no_owner(tmp_path: Path) -> None:
    r = rec(1, owner="")
    legacy = pack(grant_payload(r)[:11])  # the 11 fields a daemon before protocol 2 wrote
    path = write(tmp_path, frame(legacy))
    assert read_journal(path) == [r] and read_journal(path)[0].owner == ""


def test_a_grant_is_written_in_the_documented_field_order(tmp_path: Path) -> None:
    r = rec(1, user="carol", host="ws042", share_key=("carol", "ws042"), display="ターミナル", addr="192.0.2.9")
    with JournalStore(tmp_path) as store:
        store.record_grant(r)
        store.record_release("tok0001")
    data = (tmp_path / JOURNAL_NAME).read_bytes()
    assert data == MAGIC + grant(r) + release("tok0001")
    length, crc = struct.unpack_from(">II", data, len(MAGIC))
    payload = data[len(MAGIC) + 8 : len(MAGIC) + 8 + length]
    assert zlib.crc32(payload) == crc
    assert msgpack.unpackb(payload) == [1, "tok0001", "C1", "CADPRO", ["carol", "ws042"], "carol", "ws042", 4001,
                                        "2.1", "ターミナル", 1.7e9 + 1, "0f" * 16, "192.0.2.9"]


def test_the_daemon_journals_the_user_and_host_the_client_said(daemon_factory: Callable[..., Any]) -> None:
    # End to end through the real daemon (the grant path's own record builder included), then restored.
    d = daemon_factory()
    c = d.connect()
    assert isinstance(c.hello(host="ws042", user="carol", pid=4242), Welcome)
    g = c.request(Checkout(c.id(), "CADPRO", "2.1"))
    assert isinstance(g, Granted), g
    assert d.stop() == 0  # SIGTERM keeps the seat for the client to resume
    [r] = read_journal(d.state_dir / JOURNAL_NAME)
    assert (r.token, r.user, r.host, r.pid, r.product, r.version) == (g.token, "carol", "ws042", 4242, "CADPRO",
                                                                      "2.1")
    [back] = Ledger(30.0, lambda: "unused").restore([r], 0.0)
    assert (back.user, back.host) == ("carol", "ws042")


def test_to_record_keeps_every_field_of_the_lease() -> None:
    lease = LeaseInfo("t", ("C9", "VIEWER"), ("k",), "u", "h", 9, "1.0", ":3", 12.5, 4, 99.0)
    assert lease.to_record() == LeaseRecord("t", "C9", "VIEWER", ("k",), "u", "h", 9, "1.0", ":3", 12.5)


# -- what a record may contain ------------------------------------------------------------------------------


GOOD = rec(1)


@pytest.mark.parametrize("payload", [
    pytest.param(5, id="not-a-list"),
    pytest.param({"op": 1}, id="a-map"),
    pytest.param([], id="empty-list"),
    pytest.param([2, 5], id="release-of-a-non-string"),
    pytest.param([2, "tok", "extra"], id="release-too-long"),
    pytest.param([1, "tok"], id="grant-of-two-fields"),
    pytest.param([3, *grant_payload(GOOD)[1:]], id="thirteen-fields-unknown-kind"),
    pytest.param(grant_payload(GOOD)[:10], id="grant-of-ten-fields"),
    pytest.param([*grant_payload(GOOD)[:4], "bob", *grant_payload(GOOD)[5:]], id="share-key-a-string"),
    pytest.param([*grant_payload(GOOD)[:4], ["bob", 7], *grant_payload(GOOD)[5:]], id="share-key-item-an-int"),
    pytest.param([*grant_payload(GOOD)[:5], 5, *grant_payload(GOOD)[6:]], id="user-an-int"),
    pytest.param([*grant_payload(GOOD)[:7], "4001", *grant_payload(GOOD)[8:]], id="pid-a-string"),
    pytest.param([*grant_payload(GOOD)[:7], True, *grant_payload(GOOD)[8:]], id="pid-a-bool"),
    pytest.param([*grant_payload(GOOD)[:10], "1.7e9", *grant_payload(GOOD)[11:]], id="granted-at-a-string"),
    pytest.param([*grant_payload(GOOD)[:12], 7], id="addr-an-int"),
    pytest.param([*grant_payload(GOOD), ""], id="grant-of-fourteen-fields"),
])
def test_a_checksummed_record_that_is_not_a_lease_record_is_corruption(tmp_path: Path, payload: Any) -> None:
    path = write(tmp_path, grant(rec(0)), frame(pack(payload)), grant(rec(2)))
    err = corrupt(path)
    off = len(MAGIC) + len(grant(rec(0)))
    assert err.offset == off
    assert str(err) == corrupt_message(path, off, "a record has a valid checksum but is not a lease record")


def test_a_whole_number_grant_time_and_a_release_of_an_unknown_token_are_fine(tmp_path: Path) -> None:
    r = rec(1)
    path = write(tmp_path, frame(pack([*grant_payload(r)[:10], 1700000001, r.owner])), release("never-granted"))
    [got] = read_journal(path)
    assert got == r._replace(granted_at=1700000001.0) and type(got.granted_at) is float
    assert isinstance(got.share_key, tuple)


def test_a_release_record_is_the_packed_list_byte_for_byte(tmp_path: Path) -> None:
    # Tokens of every msgpack string width the store can see (fixstr, str8, str16).
    tokens = ["t", "x" * 31, "f" * 32, "y" * 255, "z" * 256]
    store = JournalStore(tmp_path)
    for i, token in enumerate(tokens):
        store.record_grant(rec(i, token=token))
    store.flush()
    start = (tmp_path / JOURNAL_NAME).stat().st_size
    for token in tokens:
        store.record_release(token)
    store.flush()
    store.close()
    tail = (tmp_path / JOURNAL_NAME).read_bytes()[start:]
    assert tail == b"".join(release(t) for t in tokens)
    assert read_journal(tmp_path / JOURNAL_NAME) == []


def test_a_lease_granted_twice_is_corruption_naming_it(tmp_path: Path) -> None:
    r = rec(1, token="abcdefghijkl")
    path = write(tmp_path, grant(r), grant(rec(2)), grant(r))
    err = corrupt(path)
    off = len(MAGIC) + len(grant(r)) + len(grant(rec(2)))
    assert str(err) == corrupt_message(path, off, "lease abcdef... is granted twice")


def test_a_grant_again_after_its_release_is_a_new_lease(tmp_path: Path) -> None:
    path = write(tmp_path, grant(rec(1)), release("tok0001"), grant(rec(1, pid=1)))
    assert read_journal(path) == [rec(1, pid=1)]


# -- damage: torn tail or corruption ------------------------------------------------------------------------


def test_damage_followed_by_an_intact_record_names_the_problem_and_both_offsets(tmp_path: Path) -> None:
    head = grant(rec(0))
    at = len(MAGIC) + len(head)
    cases = {
        "a record fails its checksum": frame(pack(grant_payload(rec(1))), crc=1),
        "a record claims an impossible length of 1048577 bytes": frame(b"x", length=MAX_RECORD_BYTES + 1),
        "a record claims an impossible length of 0 bytes": frame(b"", length=0),
    }
    for i, (problem, damage) in enumerate(cases.items()):
        path = write(tmp_path / str(i), head, damage, grant(rec(5)))
        later = at + len(damage)
        assert str(corrupt(path)) == corrupt_message(path, at, f"{problem}, yet an intact record follows at offset "
                                                               f"{later}")


def test_a_record_running_past_the_end_with_an_intact_one_inside_is_corruption(tmp_path: Path) -> None:
    inner = grant(rec(5))
    damage = struct.pack(">II", 4096, 0)
    path = write(tmp_path, grant(rec(0)), damage, inner)
    at = len(MAGIC) + len(grant(rec(0)))
    assert str(corrupt(path)) == corrupt_message(
        path, at, f"a record of 4096 bytes is cut short, yet an intact record follows at offset {at + 8}")


def test_one_stray_byte_before_an_intact_last_record_is_corruption(tmp_path: Path) -> None:
    path = write(tmp_path, grant(rec(0)), b"\x00", grant(rec(1)))
    at = len(MAGIC) + len(grant(rec(0)))
    assert str(corrupt(path)) == corrupt_message(
        path, at, f"a record claims an impossible length of {int.from_bytes(grant(rec(1))[:3], 'big')} bytes, "
                  f"yet an intact record follows at offset {at + 1}")


def cut(tmp_path: Path, caplog: pytest.LogCaptureFixture, *tail: bytes) -> tuple[list[LeaseRecord], str]:
    good = [rec(0), rec(1)]
    path = write(tmp_path, grant(good[0]), grant(good[1]), *tail)
    size = path.stat().st_size
    assert read_journal(path) == good
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOG), JournalStore(tmp_path) as store:
        assert store.load() == good
    end = len(MAGIC) + len(grant(good[0])) + len(grant(good[1]))
    assert path.stat().st_size == end
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"lease journal {path}: cut a torn tail of {size - end} bytes at offset {end} (")
    assert warnings[0].endswith("); the 2 records before it are intact")
    return good, warnings[0].split(" (", 1)[1].split(");", 1)[0]


def test_a_torn_tail_is_cut_saying_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    two_bad = frame(pack(grant_payload(rec(2))), crc=7) + frame(pack(grant_payload(rec(3))), crc=7)
    assert cut(tmp_path / "a", caplog, b"\x00\x00\x00")[1] == "a record header is cut short"
    assert cut(tmp_path / "b", caplog, bytes(8))[1] == "a record claims an impossible length of 0 bytes"
    assert cut(tmp_path / "c", caplog, grant(rec(2))[:-1])[1] == (
        f"a record of {len(grant(rec(2))) - 8} bytes is cut short"
    )
    assert cut(tmp_path / "d", caplog, two_bad)[1] == "a record fails its checksum"


def test_a_claimed_length_past_the_end_is_torn_even_if_the_bytes_present_check_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    payload = pack(grant_payload(rec(2)))
    tail = struct.pack(">II", len(payload) + 5, zlib.crc32(payload)) + payload
    # Damage first (a bad checksum), then a header whose length runs past the end: nothing intact follows.
    damage = frame(pack(grant_payload(rec(3))), crc=3)
    assert cut(tmp_path, caplog, damage, tail)[1] == "a record fails its checksum"


def test_a_clean_journal_opens_without_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, grant(rec(0)))
    with caplog.at_level(logging.INFO, logger=LOG), JournalStore(tmp_path) as store:
        assert store.load() == [rec(0)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert path.read_bytes() == MAGIC + grant(rec(0))


def test_a_record_of_exactly_the_size_limit_is_kept_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    base = len(pack(grant_payload(rec(1, display=""))))
    big = rec(1, display="d" * (MAX_RECORD_BYTES - base - 4))  # the empty string's 1-byte header becomes 5 bytes
    assert len(pack(grant_payload(big))) == MAX_RECORD_BYTES
    with JournalStore(tmp_path / "a") as store:
        store.record_grant(big)
        with pytest.raises(ValueError) as info:
            store.record_grant(big._replace(token="tok0002", display=big.display + "d"))
        assert str(info.value) == f"a lease record of {MAX_RECORD_BYTES + 1} bytes exceeds {MAX_RECORD_BYTES} bytes"
    assert read_journal(tmp_path / "a" / JOURNAL_NAME) == [big]
    with JournalStore(tmp_path / "a") as store:
        assert store.load() == [big]
    # ... and after damage, such a record still counts as intact: the damage is corruption, not a tail.
    path = write(tmp_path / "b", grant(rec(0)), frame(b"zz", crc=0), grant(big))
    assert "yet an intact record follows" in str(corrupt(path))


# -- short and foreign files ----------------------------------------------------------------------------------


def test_an_empty_or_partial_header_reads_as_no_leases_and_short_junk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    for data in (b"", MAGIC[:5], MAGIC):
        path.write_bytes(data)
        assert read_journal(path) == []
    path.write_bytes(b"abc")
    err = corrupt(path)
    assert err.offset == 0
    assert str(err) == corrupt_message(path, 0, "the file does not start with the lmgrd journal header")
    assert path.read_bytes() == b"abc"  # refused, never overwritten


# -- files, modes, the lock ---------------------------------------------------------------------------------


def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_the_state_dir_is_created_private_with_its_parents_and_the_files_with_their_modes(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b" / "state"
    with JournalStore(state):
        assert stat.S_IMODE(state.stat().st_mode) == 0o700 & ~umask()
        assert stat.S_IMODE((state / JOURNAL_NAME).stat().st_mode) == 0o600 & ~umask()
        assert stat.S_IMODE((state / LOCK_NAME).stat().st_mode) == 0o644 & ~umask()
        assert (state / LOCK_NAME).read_text("ascii") == f"{os.getpid()}\n"


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[Callable[[bytes], None]]:
    """Hold the state directory's lock as another lmgrd would, having written ``content`` in the lock file."""
    fds: list[int] = []

    def hold(content: bytes) -> None:
        fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fds.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, content)

    yield hold
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("content, shown", [(b"31337\n", "31337"), (b"", "unknown"), (b"  \n", "unknown"),
                                            (b"\xff12", "\ufffd12")])
def test_a_held_lock_names_the_holder_pid_or_unknown(tmp_path: Path, held_lock: Callable[[bytes], None],
                                                     content: bytes, shown: str) -> None:
    held_lock(content)
    with pytest.raises(StoreLocked) as info:
        JournalStore(tmp_path)
    assert str(info.value) == (
        f"state directory {tmp_path} is in use by another process (pid {shown} holds {tmp_path / LOCK_NAME}); "
        f"stop that lmgrd first, or give this one its own --state-dir"
    )


def test_a_refused_open_closes_only_its_own_descriptors(tmp_path: Path) -> None:
    write(tmp_path, b"\x00" * 3 + grant(rec(1)))  # damage, then an intact record: refused
    for fd in (0, 1, 2):
        os.fstat(fd)
    with pytest.raises(JournalCorrupt):
        JournalStore(tmp_path)
    for fd in (0, 1, 2):
        os.fstat(fd)  # still open: a refused open must not close descriptors it never opened
    JournalStore(tmp_path / "other").close()
    (tmp_path / JOURNAL_NAME).unlink()
    JournalStore(tmp_path).close()  # the lock was released


def test_a_grant_recorded_twice_is_refused_naming_the_lease(tmp_path: Path) -> None:
    r = rec(1, token="abcdefghijkl")
    with JournalStore(tmp_path) as store:
        store.record_grant(r)
        with pytest.raises(ValueError) as info:
            store.record_grant(r)
        assert str(info.value) == "lease abcdef... is already recorded as granted"


# -- compaction thresholds and retries -----------------------------------------------------------------------


def test_opening_compacts_only_above_the_threshold(tmp_path: Path) -> None:
    # threshold: records > ratio * live + min_records. 2 live, 14 records: exactly at it, so kept as is.
    parts = [grant(rec(i)) for i in range(8)] + [release(f"tok{i:04d}") for i in range(6)]
    write(tmp_path / "at", *parts)
    with JournalStore(tmp_path / "at", compact_min_records=10, compact_ratio=2) as store:
        assert store.records == 14 and store.load() == [rec(6), rec(7)]
    write(tmp_path / "above", *parts, grant(rec(8)), release("tok0008"))
    with JournalStore(tmp_path / "above", compact_min_records=10, compact_ratio=2) as store:
        assert store.records == 2 and store.load() == [rec(6), rec(7)]


def test_a_flush_compacts_only_above_the_threshold(tmp_path: Path) -> None:
    with JournalStore(tmp_path, compact_min_records=4, compact_ratio=2) as store:
        store.record_grant(rec(1))
        store.flush()
        for i in range(2, 4):  # threshold: records > 2 * live + 4
            store.record_grant(rec(i))
            store.record_release(rec(i).token)
        store.flush()
        assert store.records == 5
        store.record_grant(rec(4))
        store.flush()  # 6 records, 2 live: 6 > 8 is false
        assert store.records == 6
        store.record_grant(rec(5))
        store.record_release(rec(5).token)
        store.flush()  # 8 records, 2 live: 8 > 8 is still false
        assert store.records == 8
        store.record_grant(rec(6))
        store.record_release(rec(6).token)
        store.flush()  # 10 > 8: compacted to the live set
        assert store.records == 2
    assert read_journal(tmp_path / JOURNAL_NAME) == [rec(1), rec(4)]


@pytest.mark.parametrize("min_records", [0, 3])
def test_a_failed_compaction_is_retried_after_min_records_more(tmp_path: Path, min_records: int,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with JournalStore(tmp_path, compact_min_records=min_records, compact_ratio=1) as store:
        (tmp_path / TMP_NAME).mkdir()  # the snapshot cannot be created: compaction fails
        for i in range(4):
            store.record_grant(rec(i))
        store.flush()
        for i in range(4):
            store.record_release(rec(i).token)
        with caplog.at_level(logging.WARNING, logger=LOG):
            store.flush()  # 8 records, none live: compaction is due, and fails
        assert store.records == 8
        assert any("compaction failed" in r.getMessage() for r in caplog.records)
        (tmp_path / TMP_NAME).rmdir()
        retry_at = 8 + max(min_records, 1)
        n = 8
        while n < retry_at - 1:
            store.record_grant(rec(10 + n))
            store.flush()
            n += 1
            assert store.records == n, "retried before min_records more records"
        store.record_grant(rec(10 + n))
        store.flush()
        live = store.load()  # read back from the file: the store keeps no record of its own
        assert store.records == len(live), "not retried once min_records more were written"
    assert read_journal(tmp_path / JOURNAL_NAME) == live


# -- a failed write -----------------------------------------------------------------------------------------


def test_a_write_that_fails_halfway_is_cut_back_and_retried_whole(tmp_path: Path,
                                                                 file_size_limit: Callable[[int], None]) -> None:
    path = tmp_path / JOURNAL_NAME
    store = JournalStore(tmp_path)
    try:
        store.record_grant(rec(1))
        store.flush()
        store.record_grant(rec(2))
        store.flush()
        size = path.stat().st_size
        for i in range(3, 40):
            store.record_grant(rec(i, display="x" * 200))
        file_size_limit(size + 1000)  # the first write(2) stops at the limit, the second fails
        try:
            with pytest.raises(StoreWriteError) as info:
                store.flush()
        finally:
            file_size_limit(resource.RLIM_INFINITY)
        assert str(info.value) == (
            f"cannot write the lease journal {path}: File too large; 37 grant/release record(s) wait in memory. "
            f"Free space in {tmp_path} or make it writable again: lmgrd retries by itself and grants new seats "
            f"again as soon as the write succeeds"
        )
        err = info.value
        assert (err.path, err.state_dir, err.reason, err.records) == (path, tmp_path, "File too large", 37)
        assert isinstance(info.value.__cause__, OSError)
        assert path.stat().st_size == size  # cut back to the last intact record
        assert read_journal(path) == [rec(1), rec(2)]
        assert store.records == 2
        store.flush()  # the same batch, whole
        assert store.records == 39
    finally:
        store.close()
    assert read_journal(path) == [rec(1), rec(2), *(rec(i, display="x" * 200) for i in range(3, 40))]


def test_a_tail_left_by_a_write_whose_cut_back_failed_is_cut_before_the_next_batch(tmp_path: Path) -> None:
    # This puts the store in the state a failed write whose cut-back failed leaves (the half-written batch still
    # in the file, _torn set) and checks the next flush cuts the stray bytes before appending: a partial record in
    # the middle would be corruption. (test_a_write_that_fails_halfway_and_cannot_be_cut_back... makes both faults
    # for real, where the file system lets a test set the append-only flag.)
    path = tmp_path / JOURNAL_NAME
    store = JournalStore(tmp_path)
    try:
        store.record_grant(rec(1))
        store.flush()
        with path.open("ab") as f:
            f.write(grant(rec(2))[:20])  # what a failed write left behind
        store._torn = True
        store.record_grant(rec(3))
        store.flush()
        assert store.records == 2
    finally:
        store.close()
    assert path.read_bytes() == MAGIC + grant(rec(1)) + grant(rec(3))
    assert read_journal(path) == [rec(1), rec(3)]


# -- releases ----------------------------------------------------------------------------------------------


def test_journal_store_ignores_unknown_releases_without_writing_them(tmp_path: Path) -> None:
    with JournalStore(tmp_path) as store:
        store.record_release("never-granted")
        store.flush()
        assert store.records == 0
    assert (tmp_path / JOURNAL_NAME).read_bytes() == MAGIC


def test_a_compaction_whose_rename_fails_keeps_the_store_working(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # The snapshot is written and fsynced, then the rename over the journal fails (the journal's name is
    # now a non-empty directory): compaction gives up, removes its temporary file, and flushes go on.
    path = tmp_path / JOURNAL_NAME
    with JournalStore(tmp_path, compact_min_records=2, compact_ratio=1) as store:
        store.record_grant(rec(1))
        store.flush()
        path.unlink()  # the store's descriptor still appends to the unlinked file
        path.mkdir()
        (path / "keep").write_bytes(b"x")
        for i in (2, 4):
            store.record_grant(rec(i))
            store.record_release(rec(i).token)
        with caplog.at_level(logging.WARNING, logger=LOG):
            store.flush()  # 5 records > 1 * 1 live + 2: compaction is due, and its rename fails
        assert store.records == 5
        assert any("compaction failed" in r.getMessage() for r in caplog.records)
        assert not (tmp_path / TMP_NAME).exists()
        store.record_grant(rec(3))
        store.flush()
        assert store.load() == [rec(1), rec(3)]


# -- the journal keeps only where each live grant is (issue 9: memory per lease) ------------------------------


def test_load_and_compaction_read_each_live_grant_back_from_the_file_and_the_batch(
        tmp_path: Path, file_size_limit: Callable[[int], None]) -> None:
    """The store keeps a token -> offset map, not the records: ``load`` and compaction read them back, from
    the file and from the batch not yet written, across a failed write, compactions and a reopen."""
    path = tmp_path / JOURNAL_NAME
    with JournalStore(tmp_path, compact_min_records=4, compact_ratio=1) as store:
        store.record_grant(rec(0))
        store.record_grant(rec(1))
        store.flush()
        store.record_grant(rec(2, display="x" * 300))  # buffered, not written
        assert store.load() == [rec(0), rec(1), rec(2, display="x" * 300)]
        file_size_limit(path.stat().st_size + 100)  # the batch cannot be written
        try:
            with pytest.raises(StoreWriteError):
                store.flush()
        finally:
            file_size_limit(resource.RLIM_INFINITY)
        store.record_release(rec(0).token)
        store.record_grant(rec(3))
        assert store.load() == [rec(1), rec(2, display="x" * 300), rec(3)]  # still buffered, in order
        store.flush()  # 5 records, not above 1 * 3 live + 4: not compacted
        assert store.records == 5 and store.load() == [rec(1), rec(2, display="x" * 300), rec(3)]
        for i in (1, 3):
            store.record_release(rec(i).token)
        store.record_grant(rec(4))
        store.flush()  # 8 records > 1 * 2 live + 4: compacted, every live grant copied byte for byte
        assert store.records == 2
        live = [rec(2, display="x" * 300), rec(4)]
        assert store.load() == live == read_journal(path)
        store.record_release(rec(2).token)  # an offset into the compacted file
        store.record_grant(rec(5))
        assert store.load() == [rec(4), rec(5)]
    assert read_journal(path) == [rec(4), rec(5)]
    with JournalStore(tmp_path) as again:
        assert again.load() == [rec(4), rec(5)]
        again.record_release(rec(4).token)
        assert again.load() == [rec(5)]


# -- ftruncate(2) failing for real: an append-only journal ------------------------------------------------

_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_APPEND_FL = 0x80086601, 0x40086602, 0x00000020


def _set_append_only(path: Path, on: bool) -> None:
    """chattr +a / -a: the kernel then refuses ftruncate(2) of the file (EPERM) while appends still work."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(struct.pack("l", 0))
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        flags = struct.unpack("l", buf)[0]
        flags = flags | _FS_APPEND_FL if on else flags & ~_FS_APPEND_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", flags))
    finally:
        os.close(fd)


@pytest.fixture
def append_only(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Make a file append-only (needs CAP_LINUX_IMMUTABLE and a file system with the flag: skipped otherwise);
    the flag is cleared again after the test, so tmp_path can be removed."""
    marked: list[Path] = []
    probe = tmp_path / "append-only-probe"
    probe.write_bytes(b"x")
    try:
        _set_append_only(probe, True)
        _set_append_only(probe, False)
    except OSError as exc:
        pytest.skip(f"cannot make a file append-only here: {exc}")
    probe.unlink()

    def mark(path: Path) -> None:
        _set_append_only(path, True)
        marked.append(path)

    try:
        yield mark
    finally:
        for path in marked:
            _set_append_only(path, False)


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_an_open_whose_tail_cut_fails_raises_that_error_and_closes_both_descriptors(
        tmp_path: Path, append_only: Callable[[Path], None]) -> None:
    path = write(tmp_path / "state", grant(rec(1)), b"\x00\x00\x00")  # an intact record, then a torn tail
    append_only(path)  # ftruncate(2) of the journal now fails with EPERM, as on a file the admin chattr'ed +a
    before = _open_fds()
    with pytest.raises(PermissionError) as info:
        JournalStore(path.parent)
    assert info.value.errno == 1 and info.value.__class__ is PermissionError
    assert _open_fds() == before  # the journal's and the lock's descriptors are both closed
    _set_append_only(path, False)
    with JournalStore(path.parent) as store:  # the lock was released, and the tail is cut now
        assert store.load() == [rec(1)]
    assert path.read_bytes() == MAGIC + grant(rec(1))


def test_a_write_that_fails_halfway_and_cannot_be_cut_back_is_cut_before_the_next_batch(
        tmp_path: Path, append_only: Callable[[Path], None], file_size_limit: Callable[[int], None]) -> None:
    # Real faults both: write(2) stops at the file-size limit (part of the batch lands), and ftruncate(2) of the
    # append-only journal fails, so the partial batch stays in the file until the next flush cuts it.
    state = tmp_path / "state"
    path = state / JOURNAL_NAME
    store = JournalStore(state)
    try:
        store.record_grant(rec(1))
        store.flush()
        size = path.stat().st_size
        batch = [rec(i, display="x" * 200) for i in range(2, 40)]
        for r in batch:
            store.record_grant(r)
        append_only(path)
        file_size_limit(size + 1000)
        try:
            with pytest.raises(StoreWriteError):
                store.flush()
        finally:
            file_size_limit(resource.RLIM_INFINITY)
        assert size < path.stat().st_size < size + len(b"".join(grant(r) for r in batch))  # a partial batch
        _set_append_only(path, False)
        store.flush()  # cuts the partial batch first, then writes the whole one
        assert store.records == 1 + len(batch)
    finally:
        store.close()
    assert path.read_bytes() == MAGIC + grant(rec(1)) + b"".join(grant(r) for r in batch)
    assert read_journal(path) == [rec(1), *batch]


def test_a_store_on_an_append_only_journal_appends_without_cutting_anything(
        tmp_path: Path, append_only: Callable[[Path], None]) -> None:
    # A freshly opened store has no partial batch to cut: its first flush must only append (an ftruncate(2)
    # here would fail on this file and refuse a write that can succeed).
    path = write(tmp_path / "state", grant(rec(1)))
    append_only(path)
    with JournalStore(path.parent) as store:
        store.record_grant(rec(2))
        store.flush()
        assert store.records == 2
    assert path.read_bytes() == MAGIC + grant(rec(1)) + grant(rec(2))
