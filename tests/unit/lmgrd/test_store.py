"""The lease journal on real files: round trip, torn tails, corruption, compaction, crashes and the lock.

Crashes are real: a child process is SIGKILLed (by itself, at a chosen step, or by the test) and the
test reopens what it left on disk.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmgrd.storage.journal import (
    JOURNAL_NAME,
    LOCK_NAME,
    MAGIC,
    TMP_NAME,
    JournalCorrupt,
    JournalStore,
    LeaseRecord,
    StoreError,
    StoreLocked,
    open_store,
    read_journal,
)

ROOT = Path(__file__).resolve().parents[3]


def rec(i: int, *, user: str = "alice", display: str = ":0") -> LeaseRecord:
    return LeaseRecord(f"tok{i:04d}", "C1", "CADPRO", (user, "pc1"), user, "pc1", 1000 + i, "2.1", display, 1.7e9 + i)


def fill(state_dir: Path, grants: int, releases: int, **kwargs: int) -> list[LeaseRecord]:
    """Grant tok0000.. and release the first `releases` of them; return the live records."""
    with JournalStore(state_dir, **kwargs) as store:
        for i in range(grants):
            store.record_grant(rec(i))
        store.flush()
        for i in range(releases):
            store.record_release(rec(i).token)
        store.flush()
    return [rec(i) for i in range(releases, grants)]


def run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip


# -- round trip --------------------------------------------------------------------------------------------


def test_grants_and_releases_round_trip_in_grant_order(tmp_path: Path) -> None:
    with open_store(tmp_path / "state") as store:
        assert store.load() == []
        records = [rec(1), rec(2, user="Bob", display="ターミナル 1"), rec(3), rec(4)]
        for r in records:
            store.record_grant(r)
        store.record_release(rec(3).token)
        store.record_release("never-granted")  # ignored, and not written
        store.flush()
        assert store.records == 5
        store.record_grant(rec(5))
        store.record_release(rec(1).token)
        store.flush()
        want = [rec(2, user="Bob", display="ターミナル 1"), rec(4), rec(5)]
        assert store.load() == want
    assert read_journal(tmp_path / "state" / JOURNAL_NAME) == want
    with JournalStore(tmp_path / "state") as again:
        assert again.load() == want
        assert isinstance(again.load()[0].share_key, tuple)


def test_a_grant_is_recorded_once(tmp_path: Path) -> None:
    with JournalStore(tmp_path) as store:
        store.record_grant(rec(1))
        with pytest.raises(ValueError, match="already recorded"):
            store.record_grant(rec(1))


def test_flush_survives_sigkill_and_unflushed_records_do_not(tmp_path: Path) -> None:
    child = run_child(
        """
        import os, signal, sys
        from lmgrd.storage.journal import JournalStore, LeaseRecord
        r = lambda i: LeaseRecord(f"tok{i}", "C1", "CAD", ("u", "h"), "u", "h", 1, "1", ":0", 0.0)
        store = JournalStore(sys.argv[1])
        store.record_grant(r(1)); store.record_grant(r(2)); store.flush()
        store.record_release("tok1"); store.flush()
        store.record_grant(r(3))  # buffered, never flushed: never acknowledged either
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(tmp_path),
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with JournalStore(tmp_path) as store:
        assert [r.token for r in store.load()] == ["tok2"]


# -- damaged files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 8, 9, 20, -1])
def test_a_torn_tail_is_cut_with_a_warning(tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture) -> None:
    live = fill(tmp_path, 4, 1)
    path = tmp_path / JOURNAL_NAME
    good = path.stat().st_size
    with JournalStore(tmp_path) as store:  # one more record, to be torn
        store.record_grant(rec(9))
        store.flush()
    whole = path.read_bytes()
    torn = whole[: good + cut] if cut > 0 else whole[:-1]
    path.write_bytes(torn)
    with caplog.at_level(logging.WARNING, logger="lmgrd.storage.journal"), JournalStore(tmp_path) as store:
        assert store.load() == live
        assert path.stat().st_size == good
        store.record_grant(rec(10))  # appending after the cut works
    assert f"cut a torn tail of {len(torn) - good} bytes at offset {good}" in caplog.text
    assert read_journal(path) == [*live, rec(10)]


def test_a_zero_filled_tail_after_a_power_loss_is_cut(tmp_path: Path) -> None:
    live = fill(tmp_path, 3, 0)
    path = tmp_path / JOURNAL_NAME
    good = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"\0" * 4096)
    with JournalStore(tmp_path) as store:
        assert store.load() == live
    assert path.stat().st_size == good


def test_a_bad_checksum_in_the_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    live = fill(tmp_path, 3, 0)
    path = tmp_path / JOURNAL_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with JournalStore(tmp_path) as store:
        assert store.load() == live[:2]


def offsets(path: Path) -> list[int]:
    """Byte offset of every record in a journal."""
    data = path.read_bytes()
    out, off = [], len(MAGIC)
    while off < len(data):
        out.append(off)
        off += 8 + int.from_bytes(data[off : off + 4], "big")
    return out


@pytest.mark.parametrize("where", ["checksum", "length", "zeros"])
def test_corruption_in_the_middle_is_refused_naming_file_and_offset(tmp_path: Path, where: str) -> None:
    fill(tmp_path, 5, 2)
    path = tmp_path / JOURNAL_NAME
    off = offsets(path)[3]
    data = bytearray(path.read_bytes())
    if where == "checksum":
        data[off + 12] ^= 0x01
    elif where == "length":
        data[off : off + 4] = (10**6).to_bytes(4, "big")
    else:
        data[off : off + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt) as info:
        JournalStore(tmp_path)
    message = str(info.value)
    assert str(path) in message and f"offset {off}" in message and "truncate it to" in message
    assert info.value.offset == off
    assert path.read_bytes() == bytes(data)  # refused, not repaired
    with pytest.raises(JournalCorrupt):
        read_journal(path)
    JournalStore(tmp_path / "elsewhere").close()  # and the lock was let go: a clean dir still opens
    shutil.move(path, tmp_path / "aside")
    with JournalStore(tmp_path) as store:  # the remedy the message gives works
        assert store.load() == []


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_bytes(b"SQLite format 3\0" + bytes(100))
    with pytest.raises(JournalCorrupt, match="offset 0: the file does not start with the lmgrd journal header"):
        JournalStore(tmp_path)


def test_a_partial_header_starts_a_fresh_journal(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_bytes(MAGIC[:3])
    with JournalStore(tmp_path) as store:
        assert store.load() == []
        store.record_grant(rec(1))
    assert read_journal(tmp_path / JOURNAL_NAME) == [rec(1)]


# -- compaction --------------------------------------------------------------------------------------------


def test_compaction_keeps_the_live_set_and_its_order(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    with JournalStore(tmp_path, compact_min_records=50, compact_ratio=2) as store:
        live: dict[str, LeaseRecord] = {}
        sizes = []
        for i in range(600):  # bounded churn: grant, and release most of them again
            store.record_grant(rec(i))
            live[rec(i).token] = rec(i)
            if i % 3:
                store.record_release(rec(i).token)
                del live[rec(i).token]
            store.flush()
            sizes.append(path.stat().st_size)
            assert store.records <= 2 * len(live) + 50
        assert store.load() == list(live.values())
    assert sum(1 for a, b in itertools.pairwise(sizes) if b < a) >= 5  # it was compacted repeatedly ...
    assert read_journal(path) == list(live.values())  # ... and the file holds exactly the live set
    assert not (tmp_path / TMP_NAME).exists()
    with JournalStore(tmp_path) as store:
        assert store.load() == list(live.values())


def test_an_overgrown_journal_is_compacted_when_opened(tmp_path: Path) -> None:
    live = fill(tmp_path, 40, 38)
    with JournalStore(tmp_path, compact_min_records=10, compact_ratio=2) as store:
        assert store.records == 2 and store.load() == live


@pytest.mark.parametrize("tmp_state", ["partial", "complete", "empty"])
def test_a_compaction_file_left_by_a_crash_is_discarded(tmp_path: Path, tmp_state: str) -> None:
    live = fill(tmp_path, 6, 2)
    fill(tmp_path / "snap", 6, 2, compact_min_records=0, compact_ratio=1)  # what compaction would write
    snapshot = (tmp_path / "snap" / JOURNAL_NAME).read_bytes()
    assert read_journal(tmp_path / "snap" / JOURNAL_NAME) == live and len(snapshot) > len(MAGIC)
    left = {"partial": snapshot[: len(snapshot) // 2], "complete": snapshot, "empty": b""}[tmp_state]
    (tmp_path / TMP_NAME).write_bytes(left)
    with JournalStore(tmp_path) as store:
        assert store.load() == live
    assert not (tmp_path / TMP_NAME).exists()


CRASHING_COMPACTION = """
    import os, signal, sys
    import lmgrd.storage.journal as store_mod

    real_os = os
    crash_at = int(sys.argv[2])

    class CrashingOs:
        '''The store's view of `os`: SIGKILL this process at the crash_at-th file operation.'''

        def __init__(self):
            self.step = 0

        def __getattr__(self, name):
            return getattr(real_os, name)

        def _tick(self, what, fd=None, data=b""):
            self.step += 1
            if self.step == crash_at:
                if data:  # a write torn in the middle
                    real_os.write(fd, bytes(data)[: len(data) // 2])
                print(what, flush=True)
                real_os.kill(real_os.getpid(), signal.SIGKILL)

        def write(self, fd, data):
            self._tick("write", fd, data)
            return real_os.write(fd, data)

        def fsync(self, fd):
            self._tick("fsync")
            return real_os.fsync(fd)

        def replace(self, src, dst):
            self._tick("replace")
            return real_os.replace(src, dst)

        def open(self, *args, **kwargs):
            self._tick("open")
            return real_os.open(*args, **kwargs)

        def close(self, fd):
            self._tick("close")
            return real_os.close(fd)

    store = store_mod.JournalStore(sys.argv[1], compact_min_records=15, compact_ratio=1)
    assert store.records == 17, store.records
    store_mod.os = CrashingOs()
    store.record_release("tok0007")
    store.flush()  # 18 records > 1 * 2 live + 15: writes the batch, then compacts
    assert store.records == 2, store.records
    store.close()
    print("done", flush=True)
"""


def test_sigkill_at_every_step_of_a_compaction_loses_nothing(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    live = fill(pristine, 10, 7)  # 17 records, live tok0007..tok0009
    assert [r.token for r in live] == ["tok0007", "tok0008", "tok0009"]
    steps = []
    for crash_at in range(1, 40):  # bounded; the child finishes after about ten operations
        state = tmp_path / f"crash{crash_at}"
        shutil.copytree(pristine, state)
        child = run_child(CRASHING_COMPACTION, str(state), str(crash_at))
        step = child.stdout.strip()
        if child.returncode == 0:
            assert step == "done"
            assert read_journal(state / JOURNAL_NAME) == live[1:]
            assert (state / JOURNAL_NAME).stat().st_size < (pristine / JOURNAL_NAME).stat().st_size
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        steps.append(step)
        with JournalStore(state) as store:
            # Killed while writing the batch: the release was never acknowledged and may be lost; killed
            # at any later step it was written, and the compaction must not lose or revive a lease.
            want = live if crash_at == 1 else live[1:]
            assert store.load() == want, (crash_at, step)
            store.record_grant(rec(42))
        assert not (state / TMP_NAME).exists()
        assert read_journal(state / JOURNAL_NAME) == [*want, rec(42)]
    else:
        pytest.fail("the child never finished its compaction")
    # The crashes covered the batch write, the snapshot write, both fsyncs, the rename and the close.
    assert steps[0] == "write" and {"open", "write", "fsync", "replace", "close"} <= set(steps), steps


def test_a_failed_write_is_cut_back_and_stays_buffered(tmp_path: Path) -> None:
    # A real write failure: the child limits its file size (RLIMIT_FSIZE), so write(2) fails with EFBIG.
    child = run_child(
        """
        import os, resource, signal, sys
        from lmgrd.storage.journal import JournalStore, LeaseRecord, StoreError, read_journal
        r = lambda i: LeaseRecord(f"tok{i}", "C1", "CAD", ("u", "h"), "u", "h", 1, "1", "x" * 200, 0.0)
        store = JournalStore(sys.argv[1])
        store.record_grant(r(1)); store.flush()
        size = os.path.getsize(store.path)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, resource.RLIM_INFINITY))
        for i in range(2, 40):
            store.record_grant(r(i))
        try:
            store.flush()
        except StoreError as exc:
            print("refused:", exc)
        assert os.path.getsize(store.path) == size, "the partial batch must be cut back"
        assert [x.token for x in read_journal(store.path)] == ["tok1"]
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        store.flush()  # the same batch, retried
        store.close()
        print(len(read_journal(store.path)))
        """,
        str(tmp_path),
    )
    assert child.returncode == 0, child.stderr
    out = child.stdout.splitlines()
    assert out[0].startswith(f"refused: cannot write the lease journal {tmp_path / JOURNAL_NAME}")
    assert "wait in memory" in out[0] and out[-1] == "39"


# -- the lock ----------------------------------------------------------------------------------------------


def test_a_second_store_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    first = JournalStore(tmp_path)
    try:
        with pytest.raises(StoreLocked) as info:
            JournalStore(tmp_path)
        message = str(info.value)
        assert f"state directory {tmp_path} is in use" in message and f"pid {os.getpid()}" in message
        assert "--state-dir" in message
    finally:
        first.close()
    JournalStore(tmp_path).close()  # free again once closed
    first.close()  # idempotent


def test_another_process_is_refused_until_the_holder_dies(tmp_path: Path) -> None:
    attempt = """
        import sys
        from lmgrd.storage.journal import JournalStore, StoreLocked
        try:
            JournalStore(sys.argv[1]).close()
        except StoreLocked as exc:
            print(exc)
            sys.exit(3)
        print("opened")
        """
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lmgrd.storage.journal import JournalStore; "
         "s = JournalStore(sys.argv[1]); "
         "print('ready', flush=True); sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        refused = run_child(attempt, str(tmp_path))
        assert refused.returncode == 3, refused.stderr
        assert f"pid {holder.pid}" in refused.stdout and str(tmp_path / LOCK_NAME) in refused.stdout
        with pytest.raises(StoreLocked):
            JournalStore(tmp_path)
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait(timeout=30)
        if holder.stdin is not None:
            holder.stdin.close()
        if holder.stdout is not None:
            holder.stdout.close()
    assert run_child(attempt, str(tmp_path)).stdout.strip() == "opened"


def test_closed_store_refuses_to_write(tmp_path: Path) -> None:
    store = JournalStore(tmp_path)
    store.close()
    store.record_grant(rec(1))
    with pytest.raises(StoreError, match="closed"):
        store.flush()
