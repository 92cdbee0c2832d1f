"""The session handlers and the lease lifecycle, driven without sockets: a real ``Server`` (ledger, journal
store in a temp dir, licensing from real signed files) on this test's loop, sessions with a recording
transport, requests dispatched straight to the handlers, replies decoded from the frames they wrote, and the
journal read back from disk. These are the glue tests: the share key, the journal record, and every way a
seat ends going through the one lifecycle path (record, counter, event, the holder told).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_rig import Rig, run

from lmgrd.daemon.events import EndReason
from protocol import Checkin, Checkout, ErrorCode, Heartbeat, Resume


def test_a_grant_is_journalled_with_the_holder_as_given(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]
                                                        ) -> None:
    async def body(rig: Rig) -> None:
        s = rig.connect("alice", "PC-07.corp.example", pid=31337, display="pc-07:0")
        g = rig.checkout(s)
        assert g["op"] == "granted" and g["product"] == "CADPRO" and g["version"] == "2.1"
        rec = rig.journal()[g["token"]]
        # user and host each in their own field (a swap in the journal record is caught here)
        assert (rec.user, rec.host, rec.pid, rec.display) == ("alice", "pc-07", 31337, "pc-07:0")
        assert (rec.customer_id, rec.product, rec.version) == (g["customer_id"], "CADPRO", "2.1")
        assert rec.share_key == ("alice", "pc-07")
        assert rig.server.counters.granted == 1
        assert rig.recorder.events == [("grant", (g["token"], "alice", "pc-07", 0.0))]

    run(tmp_path, vendor, body)


@pytest.mark.parametrize(("share", "second", "shares"), [
    ("user_host", ("ALICE", "pc1.corp.example"), True),  # case and domain do not matter
    ("user_host", ("bob", "pc1"), False),
    ("user_host", ("alice", "pc2"), False),
    ("host", ("bob", "PC1"), True),
    ("host", ("alice", "pc2"), False),
    ("none", ("alice", "pc1"), False),
])
def test_who_shares_a_seat(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], share: str,
                           second: tuple[str, str], shares: bool) -> None:
    async def body(rig: Rig) -> None:
        a = rig.connect("alice", "pc1")
        b = rig.connect(*second)
        assert rig.checkout(a)["op"] == "granted"
        reply = rig.checkout(b)
        pool = next(iter(rig.server.licensing.pools()))
        if shares:
            assert reply["op"] == "granted"
            assert rig.server.ledger.in_use(pool) == 1  # one seat, two leases
        else:
            assert reply["op"] == "error" and reply["code"] == ErrorCode.NO_SEATS
            assert rig.server.ledger.in_use(pool) == 1

    run(tmp_path, vendor, body, share=share)


def test_checkin_ends_through_the_lifecycle(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(rig: Rig) -> None:
        s = rig.connect("alice")
        g = rig.checkout(s)
        (ack,) = rig.send(s, Checkin(rig.rid(), g["token"]))
        assert ack["op"] == "checked_in" and ack["released"] is True
        assert g["token"] not in rig.journal()
        assert rig.server.counters.released == 1
        assert ("release", (g["token"], EndReason.CHECKIN)) in rig.recorder.events
        (again,) = rig.send(s, Checkin(rig.rid(), g["token"]))
        assert again["released"] is False and rig.server.counters.released == 1

    run(tmp_path, vendor, body)


@pytest.mark.parametrize(("reason", "code"), [
    (EndReason.REMOVAL, ErrorCode.SEAT_REMOVED),
    (EndReason.IDLE, ErrorCode.IDLE_TIMEOUT),
    (EndReason.REVOKED, ErrorCode.LICENSE_REVOKED),
    (EndReason.EXPIRY, ErrorCode.LEASE_EXPIRED),
])
def test_every_end_is_recorded_counted_reported_and_told(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path],
                                                         reason: EndReason, code: ErrorCode) -> None:
    now = [1000.0]

    async def body(rig: Rig) -> None:
        alice, bob = rig.connect("alice", "pc1"), rig.connect("bob", "pc2")
        g = rig.checkout(alice)
        assert rig.send(bob, Checkout(rig.rid(), "CADPRO", "2.1", 30)) == []  # queued: no reply yet
        leases = rig.server.leases
        if reason is EndReason.EXPIRY:
            now[0] += 10.0  # past the 3 s lease timeout
            assert leases.expire(100) == 1
        else:
            assert leases.end(g["token"], reason, "a test") is not None
        rig.server.outbox.flush()
        assert g["token"] not in rig.journal()
        counted = rig.server.counters.expired if reason is EndReason.EXPIRY else rig.server.counters.released
        assert counted == 1
        assert ("release", (g["token"], reason)) in rig.recorder.events
        # the holder learns it at its next heartbeat, with the reason's code
        (ack,) = rig.send(alice, Heartbeat(rig.rid(), False))
        assert [(x["token"], x["code"]) for x in ack["lost"]] == [(g["token"], code)]
        # the freed seat went to the waiter, and that grant is journalled too
        (granted,) = rig.replies(bob)
        assert granted["op"] == "granted" and granted["token"] in rig.journal()
        assert rig.journal()[granted["token"]].user == "bob"

    run(tmp_path, vendor, body, clock=lambda: now[0])


def test_a_seat_whose_waiter_left_goes_to_the_next_waiter(tmp_path: Path,
                                                               vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(rig: Rig) -> None:
        alice, bob, cat = rig.connect("alice", "pc1"), rig.connect("bob", "pc2"), rig.connect("cat", "pc3")
        g = rig.checkout(alice)
        rig.server.handlers.dispatch(bob, Checkout(rig.rid(), "CADPRO", "2.1", 30))
        rig.server.handlers.dispatch(cat, Checkout(rig.rid(), "CADPRO", "2.1", 30))
        assert bob.transport is not None
        bob.transport.close()  # bob's connection is going away: his turn passes to cat
        rig.send(alice, Checkin(rig.rid(), g["token"]))
        (granted,) = rig.replies(cat)
        assert granted["op"] == "granted"
        assert [r.user for r in rig.journal().values()] == ["cat"]

    run(tmp_path, vendor, body)


def test_a_removed_seat_is_reported_at_resume(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(rig: Rig) -> None:
        s = rig.connect("alice")
        g = rig.checkout(s)
        assert rig.server.remove_lease(g["token"], "lmremove from test") is not None
        again = rig.connect("alice")
        (resumed,) = rig.send(again, Resume(rig.rid(), (g["token"],)))
        assert resumed["resumed"] == []
        assert [(x["code"], "lmremove from test" in x["message"]) for x in resumed["lost"]] == [
            (ErrorCode.SEAT_REMOVED, True)]

    run(tmp_path, vendor, body)


def test_policy_exclude_is_refused_before_seats(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(rig: Rig) -> None:
        s = rig.connect("mallory")
        reply = rig.checkout(s)
        assert reply["op"] == "error" and reply["code"] == ErrorCode.EXCLUDED
        assert "excluded" in reply["message"]
        assert rig.server.counters.denied == {ErrorCode.EXCLUDED: 1}
        assert rig.recorder.events == [("deny", ("CADPRO", ErrorCode.EXCLUDED))]
        assert rig.checkout(rig.connect("alice"))["op"] == "granted"

    run(tmp_path, vendor, body, extra={"policy": {"CADPRO": {"exclude": [{"user": "mallory"}]}}})


def test_a_wait_that_runs_out_is_denied_with_the_reason(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]
                                                        ) -> None:
    async def body(rig: Rig) -> None:
        alice, bob = rig.connect("alice", "pc1"), rig.connect("bob", "pc2")
        rig.checkout(alice)
        rig.server.handlers.dispatch(bob, Checkout(rig.rid(), "CADPRO", "2.1", 0.2))
        await asyncio.sleep(0.4)
        rig.server.outbox.flush()
        (reply,) = rig.replies(bob)
        assert reply["op"] == "error" and reply["code"] == ErrorCode.NO_SEATS
        assert "became free within" in reply["message"]
        assert rig.server.leases.waits == {} and bob.waiters is None

    run(tmp_path, vendor, body)


def test_restore_frees_leases_whose_license_is_gone(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def first(rig: Rig) -> None:
        rig.checkout(rig.connect("alice"))
        assert len(rig.journal()) == 1

    async def second(rig: Rig) -> None:  # run() signs a new license (another customer ID): the lease is unlicensed
        assert rig.journal() == {} and len(rig.server.ledger) == 0
        assert rig.server.counters.released == 1

    run(tmp_path, vendor, first)
    run(tmp_path, vendor, second)


def test_every_request_the_connection_hands_over_has_a_handler(tmp_path: Path,
                                                               vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    from protocol import BadRequest
    from protocol.messages import REQUEST_TYPES

    async def body(rig: Rig) -> None:
        classes = {getattr(parser, '__self__', None) for parser in REQUEST_TYPES.values()}
        assert set(rig.server.handlers.routes) == {*classes, BadRequest}

    run(tmp_path, vendor, body)
