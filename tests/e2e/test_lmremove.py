"""``lmutil lmremove`` against the real daemon: both forms, the holder told SEAT_REMOVED at its next heartbeat
(or at its resume when it was disconnected), a waiter served the freed seat, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from harness import HOSTNAME, Daemon, RawClient

from protocol import Checkout, ErrorCode, Granted, Heartbeat, HeartbeatAck, Resume, Resumed


def lmutil(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmgrd.lmutil", *args, "-c", d.address], capture_output=True,
                          text=True, timeout=30, env=d.env())


def holder(d: Daemon, user: str, product: str = "CADPRO") -> tuple[RawClient, Granted]:
    c = d.connect()
    c.hello(user=user)
    g = c.request(Checkout(c.id(), product, "2.1", 0))
    assert isinstance(g, Granted), g
    return c, g


def test_lmremove_by_product_user_host_frees_the_seat_for_a_waiter_and_tells_the_holder(
        daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), heartbeat=10, lease_timeout=30)
    alice, g = holder(d, "alice")
    bob = d.connect()
    bob.hello(user="bob")
    bob.send(Checkout(bob.id(), "CADPRO", "2.1", 20))  # waits: the only seat is alice's
    d.wait_for_log(r"QUEUED CADPRO 2\.1 for bob@")
    r = lmutil(d, "lmremove", "CADPRO", "ALICE", HOSTNAME.upper())  # names compare case-insensitively
    assert r.returncode == 0, r.stderr
    assert f"removed CADPRO seat of alice@{HOSTNAME.lower()} (lease {g.token[:8]}" in r.stdout
    # The waiter gets the freed seat at once...
    served = bob.recv()
    assert isinstance(served, Granted) and served.token != g.token
    # ...and the holder learns at its next heartbeat that its seat is gone, and why.
    ack = alice.request(Heartbeat(alice.id()))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 0
    assert [(x.token, x.code) for x in ack.lost] == [(g.token, ErrorCode.SEAT_REMOVED)]
    assert "lmremove" in ack.lost[0].message
    d.wait_for_log(rf"REMOVED CADPRO 2\.1 of alice@\S+ lease {g.token[:8]}: lmremove from 127\.0\.0\.1")
    st = json.loads(lmutil(d, "lmstat", "-a", "--json").stdout)
    assert [x["user"] for x in st["leases"]] == ["bob"]


def test_lmremove_by_token_prefix_frees_only_that_lease(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),), heartbeat=10, lease_timeout=30)
    alice, g = holder(d, "alice")
    carol, gc = holder(d, "carol")
    r = lmutil(d, "lmremove", "--token", g.token[:8], "--json")  # the 8 characters lmstat -a prints
    assert r.returncode == 0, r.stderr
    assert [x["token"] for x in json.loads(r.stdout)["removed"]] == [g.token]
    ack = carol.request(Heartbeat(carol.id()))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and ack.lost == ()
    ack = alice.request(Heartbeat(alice.id()))
    assert isinstance(ack, HeartbeatAck) and [x.code for x in ack.lost] == [ErrorCode.SEAT_REMOVED]
    # Removing it again: nothing matches, and the error says what is held.
    r = lmutil(d, "lmremove", "--token", g.token)
    assert r.returncode == 1
    assert "LEASE_NOT_FOUND" in r.stderr and "nothing was removed" in r.stderr
    assert f"CADPRO by carol@{HOSTNAME.lower()} ({gc.token[:8]})" in r.stderr


def test_lmremove_of_a_disconnected_holder_is_reported_at_its_resume(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), heartbeat=10, lease_timeout=30)
    alice, g = holder(d, "alice")
    alice.close()
    d.wait_for_log(r"disconnected holding 1 seat")
    r = lmutil(d, "lmremove", "--token", g.token)
    assert r.returncode == 0, r.stderr
    back = d.connect()
    back.hello(user="alice")
    res = back.request(Resume(back.id(), (g.token,)))
    assert isinstance(res, Resumed) and res.resumed == ()
    assert [(x.token, x.code) for x in res.lost] == [(g.token, ErrorCode.SEAT_REMOVED)]
    _c, g2 = holder(d, "dave")  # the seat is free again
    assert g2.token != g.token


def test_lmremove_errors_say_what_matched_nothing(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),), heartbeat=10, lease_timeout=30)
    _alice, g = holder(d, "alice")
    r = lmutil(d, "lmremove", "CADPRO", "nobody", HOSTNAME)
    assert r.returncode == 1
    assert f"no seat of CADPRO is held by nobody@{HOSTNAME}" in r.stderr
    assert f"held now: CADPRO by alice@{HOSTNAME.lower()} ({g.token[:8]})" in r.stderr
    r = lmutil(d, "lmremove", "VIEWER", "alice", HOSTNAME)
    assert r.returncode == 1 and "no seat of VIEWER is held right now" in r.stderr
    r = lmutil(d, "lmremove", "CADPRO", "alice")
    assert r.returncode == 2 and "usage: lmutil lmremove PRODUCT USER HOST" in r.stderr
    r = lmutil(d, "lmremove", "--token", "ab")
    assert r.returncode == 1 and "too short" in r.stderr
    # Nothing was removed by any of these.
    st = json.loads(lmutil(d, "lmstat", "-a", "--json").stdout)
    assert [x["token"] for x in st["leases"]] == [g.token]
