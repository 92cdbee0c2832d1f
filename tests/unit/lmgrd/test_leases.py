"""The lease lifecycle (lmgrd.daemon.leases) in detail, on the daemon rig (real ledger, real journal in a temp
dir, real signed licenses): the exact words each holder is told, the queue's bookkeeping, denials with their
ids and counters, the log lines operators grep, revocation of a whole pool, and restores."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_rig import Rig, run

from lmgrd.daemon.events import EndReason
from protocol import Checkin, Checkout, ErrorCode, Heartbeat

Vendor = tuple[Ed25519PrivateKey, Path]


def _pool(rig: Rig) -> tuple[str, str]:
    return next(iter(rig.server.licensing.pools()))


@pytest.mark.parametrize(("reason", "why", "message"), [
    (EndReason.REMOVAL, "lmremove from 10.0.0.9",
     "this seat of CADPRO was freed by the license administrator (lmremove from 10.0.0.9); check out again to "
     "continue"),
    (EndReason.IDLE, "950 s idle (the usage policy frees seats idle longer than 900 s)",
     "this seat of CADPRO was reclaimed after 950 s idle (the usage policy frees seats idle longer than 900 s); "
     "check out again to continue"),
    (EndReason.REVOKED, "customer ID X was revoked", "this seat of CADPRO is lost: customer ID X was revoked"),
])
def test_the_holder_is_told_in_these_words(tmp_path: Path, vendor: Vendor, reason: EndReason, why: str,
                                           message: str, caplog: pytest.LogCaptureFixture) -> None:
    async def body(rig: Rig) -> None:
        alice = rig.connect("alice", "pc1")
        g = rig.checkout(alice)
        with caplog.at_level(logging.INFO, logger="lmgrd.daemon.leases"):
            assert rig.server.leases.end(g["token"], reason, why) is not None
        (ack,) = rig.send(alice, Heartbeat(rig.rid(), False))
        assert [x["message"] for x in ack["lost"]] == [message]
        line = {EndReason.REMOVAL: f"REMOVED CADPRO 2.1 of alice@pc1 lease {g['token'][:8]}: {why}",
                EndReason.IDLE: f"IDLE CADPRO 2.1 of alice@pc1 lease {g['token'][:8]} reclaimed: {why}",
                EndReason.REVOKED: f"REVOKED CADPRO 2.1 of alice@pc1 lease {g['token'][:8]}: {why}"}[reason]
        assert line in caplog.messages
        assert rig.server.counters.released == 1 and rig.server.counters.expired == 0
        # only a removal is remembered for a later resume
        assert (g["token"] in rig.server.leases.removed) is (reason is EndReason.REMOVAL)

    run(tmp_path, vendor, body)


def test_expiry_in_bounded_batches_with_its_words_and_log(tmp_path: Path, vendor: Vendor,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]

    async def body(rig: Rig) -> None:
        a, b = rig.connect("alice", "pc1"), rig.connect("bob", "pc2")
        ga, gb = rig.checkout(a), rig.checkout(b)
        now[0] += 10.0
        with caplog.at_level(logging.INFO, logger="lmgrd.daemon.leases"):
            assert rig.server.leases.expire(1) == 1
            assert rig.server.leases.expire(1) == 1
            assert rig.server.leases.expire(1) == 0
        rig.server.outbox.flush()
        assert rig.journal() == {}
        assert rig.server.counters.expired == 2 and rig.server.counters.released == 0
        for s, g, who in ((a, ga, "alice@pc1"), (b, gb, "bob@pc2")):
            (ack,) = rig.send(s, Heartbeat(rig.rid(), False))
            assert [(x["code"], x["message"]) for x in ack["lost"]] == [
                (ErrorCode.LEASE_EXPIRED, "no heartbeat reached the server for 3 s")]
            assert f"EXPIRED CADPRO 2.1 of {who} lease {g['token'][:8]}: no heartbeat for 3 s" in caplog.messages

    run(tmp_path, vendor, body, products=(("CADPRO", "2.1", 2),), clock=lambda: now[0])


def test_counters_and_log_lines_of_checkouts_and_checkins(tmp_path: Path, vendor: Vendor,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    async def body(rig: Rig) -> None:
        s = rig.connect("alice", "pc1")
        with caplog.at_level(logging.INFO, logger="lmgrd.daemon.leases"):
            for _ in range(2):
                g = rig.checkout(s)
                rig.send(s, Checkin(rig.rid(), g["token"]))
        assert rig.server.counters.granted == 2 and rig.server.counters.released == 2
        cid = g["customer_id"]
        assert f"OUT CADPRO 2.1 to alice@pc1 lease {g['token'][:8]} (1/2 in use, customer {cid})" in caplog.messages
        assert f"IN CADPRO 2.1 from alice@pc1 lease {g['token'][:8]} (0/2 in use)" in caplog.messages

    run(tmp_path, vendor, body, products=(("CADPRO", "2.1", 2),))


def test_the_queue_keeps_order_ids_and_the_wait_it_cost(tmp_path: Path, vendor: Vendor) -> None:
    now = [1000.0]

    async def body(rig: Rig) -> None:
        alice, bob, cat = rig.connect("alice", "pc1"), rig.connect("bob", "pc2"), rig.connect("cat", "pc3")
        g = rig.checkout(alice)
        leases = rig.server.leases
        rb, rc = rig.rid(), rig.rid()
        rig.server.handlers.dispatch(bob, Checkout(rb, "CADPRO", "2.1", 60))
        rig.server.handlers.dispatch(cat, Checkout(rc, "CADPRO", "2.1", 60))
        assert sorted(leases.waits) == [1, 2] and bob.waiters == {1: rb} and cat.waiters == {2: rc}
        w = leases.waits[1]
        assert (w.request_id, w.product, w.version, w.started, w.pool) == (rb, "CADPRO", "2.1", 1000.0, _pool(rig))
        assert w.share_key == ("bob", "pc2")
        assert [x.user for x in rig.server.ledger.waiting(_pool(rig))] == ["bob", "cat"]
        now[0] += 7.0
        rig.send(alice, Checkin(rig.rid(), g["token"]))
        (granted,) = rig.replies(bob)
        assert granted["op"] == "granted" and granted["id"] == rb and granted["waited"] == 7.0
        assert rig.journal()[granted["token"]].user == "bob"
        assert bob.waiters is None and sorted(leases.waits) == [2]  # freed with its last wait
        assert rig.replies(cat) == []

    run(tmp_path, vendor, body, clock=lambda: now[0])


def test_a_client_that_leaves_takes_its_place_in_the_queue_with_it(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        alice, bob, cat = rig.connect("alice", "pc1"), rig.connect("bob", "pc2"), rig.connect("cat", "pc3")
        g = rig.checkout(alice)
        rig.server.handlers.dispatch(bob, Checkout(rig.rid(), "CADPRO", "2.1", 60))
        rig.server.handlers.dispatch(cat, Checkout(rig.rid(), "CADPRO", "2.1", 60))
        rig.server.leases.drop_waits(bob)
        assert bob.waiters is None and sorted(rig.server.leases.waits) == [2]
        assert [x.user for x in rig.server.ledger.waiting(_pool(rig))] == ["cat"]
        rig.send(alice, Checkin(rig.rid(), g["token"]))
        assert rig.replies(bob) == []
        (granted,) = rig.replies(cat)
        assert granted["op"] == "granted"

    run(tmp_path, vendor, body)


def test_a_wait_for_a_reserved_seat_runs_out_as_reserved(tmp_path: Path, vendor: Vendor) -> None:
    now = [1000.0]

    async def body(rig: Rig) -> None:
        alice, bob = rig.connect("alice", "pc1"), rig.connect("bob", "pc2")
        assert rig.checkout(alice)["op"] == "granted"  # alice takes the one unreserved seat
        rid = rig.rid()
        rig.server.handlers.dispatch(bob, Checkout(rid, "CADPRO", "2.1", 0.2))
        now[0] += 2.0  # under the 3 s lease timeout: alice's seat must not lapse meanwhile
        await asyncio.sleep(0.4)
        rig.server.outbox.flush()
        (reply,) = rig.replies(bob)
        assert (reply["op"], reply["id"], reply["code"]) == ("error", rid, ErrorCode.RESERVED)
        assert reply["message"] == "no seat the usage policy allows you of CADPRO became free within 2 s"
        assert reply["hint"] == "try again later or wait longer"
        assert rig.server.ledger.queued(_pool(rig)) == 0 and rig.server.leases.waits == {}
        assert rig.server.counters.denied == {ErrorCode.RESERVED: 1}
        assert rig.recorder.denials == [("CADPRO", "2.1", ErrorCode.RESERVED, "bob", _pool(rig)[0])]

    run(tmp_path, vendor, body, products=(("CADPRO", "2.1", 2),), clock=lambda: now[0],
        extra={"policy": {"CADPRO": {"reserve": [{"seats": 1, "user": "carol"}]}}})


def test_a_wait_for_any_seat_runs_out_as_no_seats(tmp_path: Path, vendor: Vendor) -> None:
    now = [1000.0]

    async def body(rig: Rig) -> None:
        alice, bob = rig.connect("alice", "pc1"), rig.connect("bob", "pc2")
        rig.checkout(alice)
        rid = rig.rid()
        rig.server.handlers.dispatch(bob, Checkout(rid, "CADPRO", "2.1", 0.2))
        now[0] += 2.4
        await asyncio.sleep(0.4)
        rig.server.outbox.flush()
        (reply,) = rig.replies(bob)
        assert (reply["id"], reply["code"]) == (rid, ErrorCode.NO_SEATS)
        assert reply["message"] == "no seat of CADPRO became free within 2 s"
        assert rig.server.counters.denied == {ErrorCode.NO_SEATS: 1}
        (pool,) = rig.server.ledger.pools()
        assert rig.recorder.denials == [("CADPRO", "2.1", ErrorCode.NO_SEATS, "bob", pool[0])]  # the pool it waited in

    run(tmp_path, vendor, body, clock=lambda: now[0])


def test_denials_are_counted_and_reported_each_time(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        alice, bob = rig.connect("alice", "pc1"), rig.connect("bob", "pc2")
        rig.checkout(alice)
        for _ in range(2):
            reply = rig.checkout(bob)
            assert reply["code"] == ErrorCode.NO_SEATS
            assert reply["hint"].startswith("try again later, check out with a wait")
        assert rig.server.counters.denied == {ErrorCode.NO_SEATS: 2}
        assert rig.recorder.denials == [("CADPRO", "2.1", ErrorCode.NO_SEATS, "bob", None)] * 2

    run(tmp_path, vendor, body)


def test_a_revoked_pool_ends_every_seat_and_refuses_its_queue(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        alice, bob = rig.connect("alice", "pc1"), rig.connect("bob", "pc2")
        g = rig.checkout(alice)
        rid = rig.rid()
        rig.server.handlers.dispatch(bob, Checkout(rid, "CADPRO", "2.1", 60))
        pool = _pool(rig)
        why = f"customer ID {pool[0]} was revoked by the vendor"
        ended = rig.server.leases.end_pool(pool, EndReason.REVOKED, why, ErrorCode.LICENSE_REVOKED,
                                           "install the reissued license")
        assert ended == 1
        rig.server.outbox.flush()
        assert rig.journal() == {} and pool not in rig.server.ledger.pools()
        assert rig.server.counters.released == 1
        assert ("release", (g["token"], EndReason.REVOKED)) in rig.recorder.events
        (refused,) = rig.replies(bob)
        assert (refused["id"], refused["code"], refused["message"], refused["hint"]) == (
            rid, ErrorCode.LICENSE_REVOKED, f"CADPRO is not served: {why}", "install the reissued license")
        assert rig.recorder.denials == [("CADPRO", "2.1", ErrorCode.LICENSE_REVOKED, "bob", pool[0])]
        assert bob.waiters is None and rig.server.leases.waits == {}
        (ack,) = rig.send(alice, Heartbeat(rig.rid(), False))
        assert [(x["code"], x["message"]) for x in ack["lost"]] == [
            (ErrorCode.LICENSE_REVOKED, f"this seat of CADPRO is lost: {why}")]

    run(tmp_path, vendor, body)


def test_a_raised_count_serves_the_queue_at_the_wall_clock(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        alice, bob = rig.connect("alice", "pc1"), rig.connect("bob", "pc2")
        rig.checkout(alice)
        rig.server.handlers.dispatch(bob, Checkout(rig.rid(), "CADPRO", "2.1", 60))
        rig.server.ledger.set_pool(_pool(rig), 2)
        rig.server.leases.serve_pool(_pool(rig))
        rig.server.outbox.flush()
        (granted,) = rig.replies(bob)
        assert granted["op"] == "granted"
        assert abs(rig.journal()[granted["token"]].granted_at - time.time()) < 30

    run(tmp_path, vendor, body)


def test_restore_keeps_the_licensed_and_counts_each_one_freed(tmp_path: Path, vendor: Vendor) -> None:
    async def two(rig: Rig) -> None:
        rig.checkout(rig.connect("alice", "pc1"))
        rig.checkout(rig.connect("bob", "pc2"))

    async def licensed(rig: Rig) -> None:
        assert len(rig.server.ledger) == 2 and rig.server.counters.released == 0

    async def unlicensed(rig: Rig) -> None:  # run() signs a new customer ID: both leases are freed
        assert len(rig.server.ledger) == 0 and rig.server.counters.released == 2 and rig.journal() == {}

    run(tmp_path, vendor, two, products=(("CADPRO", "2.1", 2),))
    lic = (tmp_path / "site.lic").read_bytes()
    run(tmp_path, vendor, licensed, products=(("CADPRO", "2.1", 2),), keep_license=lic)
    run(tmp_path, vendor, unlicensed, products=(("CADPRO", "2.1", 2),))


def test_a_waiter_joins_at_once_the_seat_another_users_checkout_gave_its_host(tmp_path: Path, vendor: Vendor) -> None:
    # Host sharing + a usage policy: alice@h2 waits (the free seat is carol's); carol@h2 takes it, so the
    # seat keyed ("h2",) exists and alice joins it at once, in a full pool, with no seat taken.
    async def body(rig: Rig) -> None:
        bob, alice, carol = rig.connect("bob", "h1"), rig.connect("alice", "h2"), rig.connect("carol", "h2")
        assert rig.checkout(bob)["op"] == "granted"  # the one unreserved seat
        rid = rig.rid()
        assert rig.send(alice, Checkout(rid, "CADPRO", "2.1", 60)) == []  # queued
        assert rig.checkout(carol)["op"] == "granted"
        (granted,) = rig.replies(alice)
        assert (granted["op"], granted["id"]) == ("granted", rid)
        pool = _pool(rig)
        assert rig.server.ledger.in_use(pool) == 2 and rig.server.ledger.queued(pool) == 0
        assert rig.server.leases.waits == {} and alice.waiters is None
        assert sorted(r.user for r in rig.journal().values()) == ["alice", "bob", "carol"]

    run(tmp_path, vendor, body, products=(("CADPRO", "2.1", 2),), share="host",
        extra={"policy": {"CADPRO": {"reserve": [{"seats": 1, "user": "carol"}]}}})


# -- the lifecycle edges mutation testing found untested (tests/mutation/survivors.txt) ---------------------------


def test_two_queued_checkouts_of_one_user_share_the_seat_the_first_gets(tmp_path: Path, vendor: Vendor) -> None:
    # alice@pc2 queues twice (two requests, one share key): the seat the first is granted is the second's too.
    async def body(rig: Rig) -> None:
        bob, alice = rig.connect("bob", "pc1"), rig.connect("alice", "pc2")
        held = rig.checkout(bob)
        r1, r2 = rig.rid(), rig.rid()
        rig.server.handlers.dispatch(alice, Checkout(r1, "CADPRO", "2.1", 60))
        rig.server.handlers.dispatch(alice, Checkout(r2, "CADPRO", "2.1", 60))
        assert [w.share_key for w in rig.server.leases.waits.values()] == [("alice", "pc2")] * 2
        rig.send(bob, Checkin(rig.rid(), held["token"]))
        granted = rig.replies(alice)
        assert sorted((g["op"], g["id"]) for g in granted) == [("granted", r1), ("granted", r2)]
        pool = _pool(rig)
        assert rig.server.ledger.in_use(pool) == 1 and len(rig.server.ledger.leases(pool)) == 2
        assert rig.server.ledger.queued(pool) == 0 and alice.waiters is None

    run(tmp_path, vendor, body)


@pytest.mark.parametrize("rule", [{"host": "lab1"}, {"internet": "127.0.0.*"}, {"display": "lab1:0"}],
                         ids=["host", "internet", "display"])
def test_a_wait_runs_out_as_max_reached_when_its_max_filled_meanwhile(tmp_path: Path, vendor: Vendor,
                                                                      rule: dict[str, str]) -> None:
    # dave@lab1 waits (the free seat is erin's); erin@lab1 takes it, which fills the max rule dave falls under too
    # (by host, by the address both connect from, or by their display): dave's wait runs out as MAX_REACHED,
    # judged by his own host, address and display.
    now = [1000.0]

    async def body(rig: Rig) -> None:
        alice, bob = rig.connect("alice", "pc1"), rig.connect("bob", "pc2", display="pc2:0")
        dave = rig.connect("dave", "lab1", display="lab1:0")
        assert rig.checkout(alice)["op"] == rig.checkout(bob)["op"] == "granted"
        rid = rig.rid()
        rig.server.handlers.dispatch(dave, Checkout(rid, "CADPRO", "2.1", 0.2))
        assert rig.server.ledger.queued(_pool(rig)) == 1
        assert rig.checkout(rig.connect("erin", "lab1", display="lab1:0"))["op"] == "granted"
        now[0] += 2.0
        await asyncio.sleep(0.4)
        rig.server.outbox.flush()
        (reply,) = rig.replies(dave)
        assert (reply["op"], reply["id"], reply["code"]) == ("error", rid, ErrorCode.MAX_REACHED)
        assert reply["message"] == "no seat the usage policy allows you of CADPRO became free within 2 s"
        assert rig.server.counters.denied == {ErrorCode.MAX_REACHED: 1}

    # The internet rule matches alice and bob too (every rig client is 127.0.0.1): max 3 lets them in first.
    seats = 3 if "internet" in rule else 1
    run(tmp_path, vendor, body, products=(("CADPRO", "2.1", 3),), clock=lambda: now[0],
        extra={"policy": {"CADPRO": {"reserve": [{"seats": 1, "user": "erin"}],
                                     "max": [{"seats": seats, **rule}]}}})


def test_a_removal_reaches_the_journal_without_any_reply_to_carry_it(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        g = rig.checkout(rig.connect("alice", "pc1"))
        for _ in range(3):  # let the flushes the checkout scheduled run: nothing is pending after
            await asyncio.sleep(0)
        assert list(rig.journal()) == [g["token"]] and not rig.server.outbox.scheduled
        assert rig.server.leases.end(g["token"], EndReason.REMOVAL, "lmremove from 10.0.0.9") is not None
        assert list(rig.journal()) == [g["token"]]  # buffered: written at the next loop iteration
        await asyncio.sleep(0)  # one iteration: the flush the removal asked for
        assert rig.journal() == {}

    run(tmp_path, vendor, body)


def test_every_end_but_a_checkin_or_expiry_counts_as_released_each_time(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        for i, reason in enumerate((EndReason.REMOVAL, EndReason.IDLE, EndReason.REVOKED), start=1):
            g = rig.checkout(rig.connect("alice", "pc1"))
            assert rig.server.leases.end(g["token"], reason, "why") is not None
            assert rig.server.counters.released == i and rig.server.counters.expired == 0

    run(tmp_path, vendor, body)


def test_the_remembered_removals_are_bounded_and_forget_the_oldest_first(tmp_path: Path, vendor: Vendor) -> None:
    from lmgrd.daemon.leases import REMOVED_MEMORY

    async def body(rig: Rig) -> None:
        s = rig.connect("alice", "pc1")
        leases = rig.server.leases
        pool = _pool(rig)
        tokens = []
        for i in range(REMOVED_MEMORY + 2):
            assert leases.checkout(s, i, pool, ("alice", "pc1"), s, "2.1", 0.0, 0.0)
            (lease,) = rig.server.ledger.leases(pool)
            tokens.append(lease.token)
            assert leases.end(lease.token, EndReason.REMOVAL, "lmremove") is not None
            if i == REMOVED_MEMORY - 1:
                assert len(leases.removed) == REMOVED_MEMORY and tokens[0] in leases.removed
        assert len(leases.removed) == REMOVED_MEMORY
        assert list(leases.removed) == tokens[2:]  # the two oldest went, in order

    run(tmp_path, vendor, body)
