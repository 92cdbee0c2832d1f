"""The lease lifecycle and the outbox when the journal cannot be written, driven without sockets (the rig's real
Server and journal). The write failure is the kernel's own: RLIMIT_FSIZE at the journal's current size makes
every append fail with EFBIG, as a full disk fails with ENOSPC (tests/integration/test_disk_full.py does that
on a real tmpfs and a read-only ext4). Checked here: the grant in flight when the write fails is undone and
refused, a waiter a freed seat would go to is refused, the retry backs off, and recovery writes what waited.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_rig import Rig, run

from lmgrd.daemon.events import EndReason
from lmgrd.daemon.leases import _store_message
from lmgrd.daemon.outbox import RETRY_FIRST
from lmgrd.storage.journal import JOURNAL_NAME, StoreError
from protocol import Checkin, Checkout, ErrorCode, Heartbeat


@pytest.fixture
def journal_full(file_size_limit: Callable[[int], None]) -> Callable[[Path | None], None]:
    """``journal_full(path)`` stops the file from growing (EFBIG from write(2)); ``journal_full(None)`` lifts it."""

    def full(path: Path | None) -> None:
        file_size_limit(resource.RLIM_INFINITY if path is None else path.stat().st_size)

    return full


def test_a_failed_write_undoes_its_grants_refuses_waiters_and_recovers(
        tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], journal_full: Callable[[Path | None], None]) -> None:
    async def body(rig: Rig) -> None:
        server = rig.server
        alice, bob, carol = rig.connect("alice"), rig.connect("bob"), rig.connect("carol")
        g = rig.checkout(alice)
        assert g["op"] == "granted"
        assert rig.send(bob, Checkout(rig.rid(), "CADPRO", "2.1", 30.0)) == []  # queued behind alice
        journal_full(rig.state / JOURNAL_NAME)
        try:
            # alice's checkin frees the seat; it goes to bob; the batch (release + bob's grant) cannot be
            # written: bob is refused, never told he had the seat, and alice's checkin is still answered.
            server.handlers.dispatch(alice, Checkin(rig.rid(), g["token"]))
            server.outbox.flush()
            (ack,) = rig.replies(alice)
            assert ack["op"] == "checked_in" and ack["released"] is True
            (refused,) = rig.replies(bob)
            assert refused["op"] == "error" and refused["code"] == ErrorCode.STORE_UNAVAILABLE, refused
            assert str(rig.state) in refused["message"] and "File too large" in refused["message"]
            assert "free space" in refused["hint"]
            undone = [e for e in rig.recorder.events if e[0] == "release" and e[1][1] is EndReason.UNRECORDED]
            assert len(undone) == 1, rig.recorder.events
            pool = next(iter(server.licensing.pools()))
            assert server.ledger.in_use(pool) == 0 and server.ledger.queued(pool) == 0
            assert server.store_error is not None
            # Degraded: checkouts refused up front, heartbeats answered.
            r = rig.checkout(carol)
            assert r["op"] == "error" and r["code"] == ErrorCode.STORE_UNAVAILABLE, r
            (hb,) = rig.send(alice, Heartbeat(rig.rid()))
            assert hb["op"] == "heartbeat_ack"
            assert server.status()["store"]["writable"] is False
            # The retry backs off: a handful of attempts in a second, not a busy loop.
            await asyncio.sleep(0.8)  # retries due at 0.1, 0.3 and 0.7 s
            failures = server.store_write_failures
            assert 2 <= failures <= 5, failures
            assert server.outbox.retry_delay > RETRY_FIRST
            assert set(rig.journal()) == {g["token"]}  # on disk: only what was written before the failure
        finally:
            journal_full(None)
        server.outbox.retry()  # what the retry timer does next (tests/integration/test_disk_full.py waits for it)
        assert server.store_error is None and server.status()["store"] == {"writable": True, "error": None}
        assert rig.journal() == {}  # alice's release, bob's grant and its undoing: all written, in order
        assert rig.checkout(carol)["op"] == "granted"

    run(tmp_path, vendor, body)


def test_while_degraded_a_freed_seat_is_refused_to_every_waiter_it_would_go_to_and_stays_free(
        tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], journal_full: Callable[[Path | None], None]) -> None:
    async def body(rig: Rig) -> None:
        server = rig.server
        pool = next(iter(server.licensing.pools()))
        alice, dave = rig.connect("alice"), rig.connect("dave")
        alice2 = rig.connect("alice", pid=4343)  # alice's second process: joins her seat
        bob, erin = rig.connect("bob"), rig.connect("erin")
        assert rig.checkout(alice)["op"] == "granted"
        gd = rig.checkout(dave)
        assert gd["op"] == "granted"
        bob_rid, erin_rid = rig.rid(), rig.rid()
        assert rig.send(bob, Checkout(bob_rid, "CADPRO", "2.1", 30.0)) == []
        assert rig.send(erin, Checkout(erin_rid, "CADPRO", "2.0", 30.0)) == []
        assert server.ledger.queued(pool) == 2
        joined = rig.checkout(alice2)  # joins and leaves alice's seat: one release counted already
        assert joined["op"] == "granted" and rig.send(alice2, Checkin(rig.rid(), joined["token"]))[0]["released"]
        released_before = server.counters.released
        assert released_before >= 1
        journal_full(rig.state / JOURNAL_NAME)
        try:
            # A join takes no seat: its unwritable grant is undone, the seat stays alice's, nobody is served.
            join_rid = rig.rid()
            (undone,) = rig.send(alice2, Checkout(join_rid, "CADPRO", "2.1", 0))
            assert (undone["op"], undone["id"], undone["code"]) == ("error", join_rid, ErrorCode.STORE_UNAVAILABLE)
            assert server.counters.released == released_before + 1
            assert rig.recorder.denials[-1] == ("CADPRO", "2.1", ErrorCode.STORE_UNAVAILABLE, "alice", pool[0])
            assert server.store_error is not None and server.ledger.queued(pool) == 2
            # Now dave's seat frees: it would go to bob, then (given back) to erin; both are refused, each
            # under its own request, and the seat is left free, granted to no one.
            server.handlers.dispatch(dave, Checkin(rig.rid(), gd["token"]))
            server.outbox.flush()
            (refused_bob,) = rig.replies(bob)
            (refused_erin,) = rig.replies(erin)
            assert (refused_bob["op"], refused_bob["id"], refused_bob["code"]) == (
                "error", bob_rid, ErrorCode.STORE_UNAVAILABLE)
            assert (refused_erin["op"], refused_erin["id"], refused_erin["code"]) == (
                "error", erin_rid, ErrorCode.STORE_UNAVAILABLE)
            for refused in (refused_bob, refused_erin):
                assert str(rig.state) in refused["message"]
                assert refused["hint"] == (f"seats already held keep running; try again later. Administrator: free "
                                           f"space in {rig.state} or make it writable; the server grants again by "
                                           "itself once it can write")
            unavailable = ErrorCode.STORE_UNAVAILABLE
            assert rig.recorder.denials[-2:] == [("CADPRO", "2.1", unavailable, "bob", pool[0]),
                                                 ("CADPRO", "2.0", unavailable, "erin", pool[0])]
            assert server.ledger.in_use(pool) == 1 and server.ledger.queued(pool) == 0
        finally:
            journal_full(None)
        server.outbox.retry()
        assert server.store_error is None
        assert rig.checkout(bob)["op"] == "granted"

    run(tmp_path, vendor, body, products=(("CADPRO", "2.1", 2),))


def test_an_undone_grant_gives_its_seat_to_the_next_waiter_who_is_refused_too(
        tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], journal_full: Callable[[Path | None], None]) -> None:
    async def body(rig: Rig) -> None:
        server = rig.server
        pool = next(iter(server.licensing.pools()))
        alice, bob, erin = rig.connect("alice"), rig.connect("bob"), rig.connect("erin")
        g = rig.checkout(alice)
        assert rig.send(bob, Checkout(rig.rid(), "CADPRO", "2.1", 30.0)) == []
        erin_rid = rig.rid()
        assert rig.send(erin, Checkout(erin_rid, "CADPRO", "2.1", 30.0)) == []
        journal_full(rig.state / JOURNAL_NAME)
        try:
            # alice's seat goes to bob; that batch fails, bob's grant is undone and its seat goes to erin,
            # whom the failing store cannot record either.
            server.handlers.dispatch(alice, Checkin(rig.rid(), g["token"]))
            server.outbox.flush()
            (refused_bob,) = rig.replies(bob)
            (refused_erin,) = rig.replies(erin)
            assert refused_bob["code"] == ErrorCode.STORE_UNAVAILABLE
            assert (refused_erin["id"], refused_erin["code"]) == (erin_rid, ErrorCode.STORE_UNAVAILABLE)
            assert server.ledger.in_use(pool) == 0 and server.ledger.queued(pool) == 0
        finally:
            journal_full(None)

    run(tmp_path, vendor, body)


def test_a_failed_batch_undoes_every_grant_still_held_past_one_already_ended(
        tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], journal_full: Callable[[Path | None], None]) -> None:
    async def body(rig: Rig) -> None:
        server = rig.server
        pool = next(iter(server.licensing.pools()))
        alice, dave = rig.connect("alice"), rig.connect("dave")
        rig.checkout(rig.connect("carol"))  # written: the journal has a record to fill up behind
        journal_full(rig.state / JOURNAL_NAME)
        try:
            # Two grants in one batch, neither written yet; alice's ends (the administrator frees it) before
            # the flush fails: dave's grant must still be undone and refused.
            server.handlers.dispatch(alice, Checkout(rig.rid(), "CADPRO", "2.1", 0))
            dave_rid = rig.rid()
            server.handlers.dispatch(dave, Checkout(dave_rid, "CADPRO", "2.1", 0))
            assert server.ledger.in_use(pool) == 3
            (first,) = server.ledger.session_leases(alice.session)
            assert server.leases.end(first.token, EndReason.REMOVAL, "test") is not None
            server.outbox.flush()
            (refused,) = rig.replies(dave)
            assert (refused["op"], refused["id"], refused["code"]) == ("error", dave_rid, ErrorCode.STORE_UNAVAILABLE)
            assert server.ledger.in_use(pool) == 1  # carol's, written before the journal filled
        finally:
            journal_full(None)

    run(tmp_path, vendor, body, products=(("CADPRO", "2.1", 3),))


def test_a_store_other_than_the_journal_is_refused_with_its_own_error_and_what_to_do() -> None:
    message, hint = _store_message(StoreError("etcd at 192.0.2.5:2379 does not answer"))
    assert message == "the license server cannot record new seats: etcd at 192.0.2.5:2379 does not answer"
    assert hint == "seats already held keep running; try again later"
