"""A state directory that fills up or turns read-only, for real: a small tmpfs (ENOSPC) and an ext4 image that
the kernel remounts read-only after an error (EROFS), each mounted by the test (root needed; skipped cleanly
when mounting is impossible).

What must hold (issue 9): new grants refused with ``STORE_UNAVAILABLE`` naming the directory and the OS
error; heartbeats, checkins, hellos and status keep working, so no holder loses its seat; the daemon recovers
by itself when space returns; nothing acknowledged is lost (a SIGKILL after the recovery restores exactly the
seats clients were told they hold); the journal stays consistent; no traceback in the log; ``/healthz`` and
``lmgrd_store_writable`` show the degraded store.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import REPO, Daemon, Factory, RawClient, in_use, status
from harness import hello_client as client

from lmgrd.storage.journal import JOURNAL_NAME, read_journal
from protocol import (
    CheckedIn,
    Checkin,
    Checkout,
    ErrorCode,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Reply,
    Resume,
    Resumed,
)


def _mount(args: list[str], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a test file system needs root")
    r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a test file system here: {r.stderr.strip()}")


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: room for the journal, and quickly filled."""
    target = tmp_path / "tmpfs"
    _mount(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"], target)
    try:
        yield target
    finally:
        _umount(target)


@pytest.fixture
def ext4_image(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An 8 MiB ext4 image mounted with ``errors=remount-ro``; yields (mount point, the sysfs directory whose
    ``trigger_fs_error`` makes the kernel remount it read-only, as after a real I/O error)."""
    img = tmp_path / "ext4.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    r = subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"mkfs.ext4 unavailable: {r.stderr.strip()}")
    target = tmp_path / "ext4"
    _mount(["-o", "loop,errors=remount-ro", str(img)], target)
    try:
        src = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(target)], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        sysfs = Path("/sys/fs/ext4") / Path(src).name
        if not (sysfs / "trigger_fs_error").exists():
            pytest.skip(f"this kernel has no {sysfs}/trigger_fs_error")
        yield target, sysfs
    finally:
        _umount(target)


def fill(directory: Path) -> Path:
    """Write a file until the file system says ENOSPC; returns it (delete it to give the space back)."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(100_000):  # bounded: 400 MB, far more than the file system holds
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        for _ in range(4096):  # the last partial block too
            try:
                os.write(fd, b"\0")
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


def checkout(c: RawClient) -> Reply:
    return c.request(Checkout(c.id(), "CADPRO", "2.1", 0.0))


def http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(base: str, name: str) -> float:
    _, text = http(base + "metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def assert_clean_log(d: Daemon) -> None:
    log = d.log()
    for bad in ("Traceback", "Exception in callback", "Fatal error on transport"):
        assert bad not in log, log[-4000:]


def refused_for_store(r: Reply, state_dir: Path, oserror: str) -> None:
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.STORE_UNAVAILABLE, r
    assert str(state_dir) in r.message and oserror in r.message, r.message
    assert "free space" in r.hint.lower() or "writable" in r.hint, r.hint


def heartbeat_through(c: RawClient, seconds: float, held: int) -> None:
    """Heartbeat every 0.5 s for ``seconds``; every ack must renew all ``held`` seats and lose none."""
    for _ in range(int(seconds / 0.5) + 1):
        ack = c.request(Heartbeat(c.id()))
        assert isinstance(ack, HeartbeatAck) and ack.renewed == held and not ack.lost, ack
        time.sleep(0.5)


def test_disk_full_refuses_new_grants_keeps_serving_and_recovers_by_itself(
        daemon_factory: Factory, tiny_tmpfs: Path) -> None:
    state = tiny_tmpfs / "state"
    d = daemon_factory((("CADPRO", "2.1", 50),), share="none", heartbeat=1.0, lease_timeout=3.0,
                       state_dir=state, extra=["--metrics-port", "auto"])
    base = d.metrics_url()
    alice = client(d, "alice")
    held: list[str] = []
    for _ in range(2):
        g = checkout(alice)
        assert isinstance(g, Granted), g
        held.append(g.token)
    filler = fill(tiny_tmpfs)

    # Churn until the journal needs a block the file system no longer has (the last page may have had room).
    churn = client(d, "churn")
    refused: Reply | None = None
    for _ in range(2000):
        r = checkout(churn)
        if not isinstance(r, Granted):
            refused = r
            break
        done = churn.request(Checkin(churn.id(), r.token))
        assert isinstance(done, CheckedIn) and done.released, done
    assert refused is not None, "the journal never hit ENOSPC"
    refused_for_store(refused, state, "No space left on device")  # the in-flight grant, undone, not acknowledged
    d.wait_for_log(r"cannot write the lease journal .*No space left on device")

    # Degraded: every checkout refused the same way; everything else keeps working, for longer than a lease.
    bob = client(d, "bob")  # hello works
    refused_for_store(checkout(bob), state, "No space left on device")
    store = status(bob)["store"]
    assert isinstance(store, dict) and store["writable"] is False, store
    assert "No space left on device" in store["error"] and str(state) in store["error"], store
    heartbeat_through(alice, 4.0, held=2)  # 4 s > the 3 s lease timeout: seats kept by heartbeats alone
    assert in_use(bob) == 2
    code, body = http(base + "healthz")
    assert code == 503 and "STORE_UNAVAILABLE" in body and str(state) in body, (code, body)
    assert metric(base, "lmgrd_store_writable") == 0
    assert metric(base, "lmgrd_store_write_failures_total") >= 1
    # A checkin while degraded frees the seat now; its record waits in memory (documented in the README).
    done = alice.request(Checkin(alice.id(), held.pop(0)))
    assert isinstance(done, CheckedIn) and done.released, done
    assert in_use(bob) == 1

    # Space returns: the daemon notices by itself (retry with backoff), writes what waited, grants again.
    filler.unlink()
    d.wait_for_log(r"lease journal writable again", timeout=15)
    g = checkout(bob)
    assert isinstance(g, Granted), g
    code, body = http(base + "healthz")
    assert code == 200, (code, body)
    assert metric(base, "lmgrd_store_writable") == 1
    assert in_use(bob) == 2

    # Nothing acknowledged is lost, nothing undone or checked in comes back: the journal says exactly this.
    d.kill()
    assert sorted(r.token for r in read_journal(state / JOURNAL_NAME)) == sorted([*held, g.token])
    d.start()
    for who, tokens in (("alice", held), ("bob", [g.token])):
        c = client(d, who)
        res = c.request(Resume(c.id(), tuple(tokens)))
        assert isinstance(res, Resumed) and sorted(res.resumed) == sorted(tokens) and not res.lost, res
        assert in_use(c) == 2
    assert_clean_log(d)


def test_read_only_state_directory_keeps_held_seats_and_stops_cleanly(
        daemon_factory: Factory, ext4_image: tuple[Path, Path]) -> None:
    mnt, sysfs = ext4_image
    state = mnt / "state"
    d = daemon_factory((("CADPRO", "2.1", 5),), share="none", heartbeat=1.0, lease_timeout=3.0,
                       state_dir=state, extra=["--metrics-port", "0"])
    alice = client(d, "alice")
    tokens = []
    for _ in range(2):
        g = checkout(alice)
        assert isinstance(g, Granted), g
        tokens.append(g.token)
    (sysfs / "trigger_fs_error").write_text("1")  # the kernel remounts the file system read-only
    bob = client(d, "bob")
    refused_for_store(checkout(bob), state, "Read-only file system")  # undone in flight: never acknowledged
    refused_for_store(checkout(bob), state, "Read-only file system")  # refused up front while degraded
    heartbeat_through(alice, 4.0, held=2)
    done = alice.request(Checkin(alice.id(), tokens[0]))
    assert isinstance(done, CheckedIn) and done.released, done
    assert in_use(bob) == 1
    assert d.stop() == 0  # a clean stop, saying what it could not write
    log = d.log()
    assert "stopping with records not written" in log, log[-3000:]
    assert_clean_log(d)
    # What the read-only journal still holds: both grants (the checkin could not be recorded). At the next
    # start on a writable directory the checked-in seat comes back unclaimed and lapses after a lease timeout.
    assert sorted(r.token for r in read_journal(state / JOURNAL_NAME)) == sorted(tokens)


def test_a_read_only_state_directory_at_start_is_refused_with_the_directory_named(
        daemon_factory: Factory, tmp_path: Path) -> None:
    target = tmp_path / "ro"
    _mount(["-t", "tmpfs", "-o", "size=64k,ro", "tmpfs"], target)
    try:
        d = daemon_factory(start=False, state_dir=target / "state", extra=["--metrics-port", "0"])
        with open(d.log_path, "wb") as log:
            rc = subprocess.run(d.args(), stdout=log, stderr=log, cwd=REPO, env=d.env(), timeout=60).returncode
        assert rc == 1
        out = d.log()
        assert f"cannot open the state directory {target / 'state'}: Read-only file system" in out, out
        assert "Traceback" not in out, out
    finally:
        _umount(target)
