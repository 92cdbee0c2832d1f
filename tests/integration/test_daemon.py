"""The real daemon over real sockets: seats, sharing, the ordered checks, leases, waiting, restart."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import HOSTNAME, Daemon, RawClient, write_license

from protocol import (
    CheckedIn,
    Checkin,
    Checkout,
    ErrorCode,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Resume,
    Resumed,
    Status,
    StatusReply,
    Welcome,
)


def _client(d: Daemon, user: str = "alice", host: str = HOSTNAME) -> RawClient:
    c = d.connect()
    w = c.hello(host=host, user=user)
    assert isinstance(w, Welcome), w
    return c


def _checkout(c: RawClient, product: str = "CADPRO", version: str = "2.1", wait: float = 0.0):  # type: ignore[no-untyped-def]
    return c.request(Checkout(c.id(), product, version, wait))


def test_welcome_announces_timing(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(heartbeat=1.0, lease_timeout=3.0)
    c = d.connect()
    w = c.hello()
    assert isinstance(w, Welcome)
    assert (w.heartbeat_interval, w.lease_timeout, w.proto) == (1.0, 3.0, 2)
    assert d.stop() == 0


def test_count_is_never_exceeded_and_checkin_frees_at_once(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),))
    clients = [_client(d, user=f"u{i}") for i in range(3)]
    r = [_checkout(c) for c in clients]
    assert [type(x) for x in r] == [Granted, Granted, ErrorReply]
    assert isinstance(r[2], ErrorReply) and r[2].code is ErrorCode.NO_SEATS
    assert "2 seat(s)" in r[2].message
    g0 = r[0]
    assert isinstance(g0, Granted) and len(g0.token) >= 32  # >= 128 bits in hex
    done = clients[0].request(Checkin(clients[0].id(), g0.token))
    assert isinstance(done, CheckedIn) and done.released
    again = clients[0].request(Checkin(clients[0].id(), g0.token))
    assert isinstance(again, CheckedIn) and not again.released  # idempotent
    assert isinstance(_checkout(clients[2]), Granted)


def test_sharing_modes(daemon_factory: Callable[..., Daemon]) -> None:
    # user_host: same user on the same host shares one seat; another user needs another seat.
    d = daemon_factory((("CADPRO", "2.1", 1),))
    a1, a2, b = _client(d, "alice"), _client(d, "alice"), _client(d, "bob")
    assert isinstance(_checkout(a1), Granted)
    assert isinstance(_checkout(a2), Granted)
    r = _checkout(b)
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS
    st = a1.request(Status(a1.id()))
    assert isinstance(st, StatusReply) and st.data["pools"][0]["in_use"] == 1

    h = daemon_factory((("CADPRO", "2.1", 1),), share="host")
    x, y, z = _client(h, "alice"), _client(h, "bob"), _client(h, "carol", host="otherpc")
    assert isinstance(_checkout(x), Granted)
    assert isinstance(_checkout(y), Granted)  # same host, other user: same seat
    r = _checkout(z)
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS

    n = daemon_factory((("CADPRO", "2.1", 1),), share="none")
    p, q = _client(n, "alice"), _client(n, "alice")
    assert isinstance(_checkout(p), Granted)
    r = _checkout(q)
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS


def test_version_and_product_checks(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.10", 5),))
    c = _client(d)
    assert isinstance(_checkout(c, version="2.9"), Granted)  # 2.9 < 2.10 as dotted numbers
    assert isinstance(_checkout(c, version="2.10.0"), Granted)
    r = _checkout(c, version="2.11")
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.VERSION_NOT_PERMITTED
    assert "2.11" in r.message and "2.10" in r.message
    r = _checkout(c, product="NOPE")
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.UNKNOWN_PRODUCT and "CADPRO" in r.message


def test_expired_license_is_named_before_product_and_version(tmp_path: Path,
                                                              vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    key, pub = vendor
    lic = tmp_path / "old.lic"
    write_license(lic, key, (("CADPRO", "2.1", 5),), expires=date.today() - timedelta(days=2))
    d = Daemon(tmp_path, [lic], pub).start()
    try:
        c = _client(d)
        for product, version in (("CADPRO", "2.1"), ("CADPRO", "9.9")):
            r = _checkout(c, product, version)
            assert isinstance(r, ErrorReply) and r.code is ErrorCode.LICENSE_EXPIRED, r
    finally:
        d.stop()


def test_license_for_another_host_serves_nothing(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    key, pub = vendor
    lic = tmp_path / "foreign.lic"
    write_license(lic, key, hostname="someotherhost", ip="192.0.2.10")
    d = Daemon(tmp_path, [lic], pub).start()
    try:
        log = d.wait_for_log("someotherhost").string
        assert HOSTNAME.lower() in log.lower()
        r = _checkout(_client(d))
        assert isinstance(r, ErrorReply) and r.code is ErrorCode.HOST_NOT_LICENSED, r
    finally:
        d.stop()


def test_tampered_license_is_refused(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    key, pub = vendor
    lic = tmp_path / "site.lic"
    write_license(lic, key, (("CADPRO", "2.1", 5),))
    lic.write_text(lic.read_text().replace("count=5", "count=500"))
    d = Daemon(tmp_path, [lic], pub).start()
    try:
        d.wait_for_log(str(lic))
        r = _checkout(_client(d))
        assert isinstance(r, ErrorReply) and r.code is ErrorCode.LICENSE_INVALID, r
    finally:
        d.stop()


def test_lease_lapses_without_heartbeats_and_heartbeats_keep_it(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), heartbeat=1.0, lease_timeout=3.0)
    keeper = _client(d, "alice")
    g = _checkout(keeper)
    assert isinstance(g, Granted)
    for _ in range(6):  # 6 s of heartbeats: twice the lease timeout
        ack = keeper.request(Heartbeat(keeper.id()))
        assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and not ack.lost
        time.sleep(1.0)
    other = _client(d, "bob")
    r = _checkout(other)
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS
    # Stop heartbeating (connection stays open): the lease lapses and the holder is told why.
    d.wait_for_log(r"EXPIRED CADPRO", timeout=8)
    ack = keeper.request(Heartbeat(keeper.id()))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 0
    assert [x.token for x in ack.lost] == [g.token] and ack.lost[0].code is ErrorCode.LEASE_EXPIRED
    assert isinstance(_checkout(other), Granted)


def test_dropped_client_seat_is_freed_after_grace(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), heartbeat=1.0, lease_timeout=3.0)
    a = _client(d, "alice")
    assert isinstance(_checkout(a), Granted)
    a.close()
    b = _client(d, "bob")
    deadline = time.monotonic() + 8
    while True:
        r = _checkout(b)
        if isinstance(r, Granted):
            break
        assert time.monotonic() < deadline, "the dropped client's seat was never freed"
        time.sleep(0.25)


def test_resume_after_reconnect_takes_no_second_seat(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), share="none", heartbeat=1.0, lease_timeout=5.0)
    a = _client(d, "alice")
    g = _checkout(a)
    assert isinstance(g, Granted)
    a.close()
    a2 = _client(d, "alice")
    for _ in range(3):  # resuming the same token again and again never takes another seat
        r = a2.request(Resume(a2.id(), (g.token, "f" * 32)))
        assert isinstance(r, Resumed) and r.resumed == (g.token,)
        assert [x.token for x in r.lost] == ["f" * 32] and r.lost[0].code is ErrorCode.LEASE_NOT_FOUND
    st = a2.request(Status(a2.id()))
    assert isinstance(st, StatusReply) and st.data["pools"][0]["in_use"] == 1
    ack = a2.request(Heartbeat(a2.id()))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 1


def test_waiters_are_served_first_come_first_served(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    holder = _client(d, "h")
    g = _checkout(holder)
    assert isinstance(g, Granted)
    w1, w2, leaver = _client(d, "w1"), _client(d, "w2"), _client(d, "leaver")
    w1.send(Checkout(w1.id(), "CADPRO", "2.1", 30))
    d.wait_for_log(r"QUEUED CADPRO 2.1 for w1@")
    leaver.send(Checkout(leaver.id(), "CADPRO", "2.1", 30))
    d.wait_for_log(r"QUEUED CADPRO 2.1 for leaver@")
    w2.send(Checkout(w2.id(), "CADPRO", "2.1", 30))
    d.wait_for_log(r"QUEUED CADPRO 2.1 for w2@")
    leaver.close()  # a waiter that leaves is dropped from the queue
    time.sleep(0.2)
    assert isinstance(holder.request(Checkin(holder.id(), g.token)), CheckedIn)
    r1 = w1.recv()
    assert isinstance(r1, Granted) and r1.waited > 0
    assert isinstance(w1.request(Checkin(w1.id(), r1.token)), CheckedIn)
    r2 = w2.recv()
    assert isinstance(r2, Granted)


def test_wait_times_out_with_no_seats(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    assert isinstance(_checkout(_client(d, "h")), Granted)
    w = _client(d, "w")
    r = _checkout(w, wait=1.0)
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS and "within" in r.message


def test_sigkill_restart_keeps_granted_seats(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),), share="none", heartbeat=1.0, lease_timeout=4.0)
    a = _client(d, "alice")
    tokens = []
    for _ in range(2):
        g = _checkout(a)
        assert isinstance(g, Granted)
        tokens.append(g.token)
    d.kill()  # SIGKILL: no chance to persist anything more
    a.close()
    d.start()
    # The restored leases count: nobody else gets a seat...
    b = _client(d, "bob")
    r = _checkout(b)
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS
    # ...and the holder resumes both with its tokens.
    a2 = _client(d, "alice")
    res = a2.request(Resume(a2.id(), tuple(tokens)))
    assert isinstance(res, Resumed) and sorted(res.resumed) == sorted(tokens) and not res.lost


def test_sigterm_exits_zero_quickly_and_persists(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),), lease_timeout=30.0, heartbeat=5.0)
    a = _client(d)
    g = _checkout(a)
    assert isinstance(g, Granted)
    t0 = time.monotonic()
    assert d.stop(timeout=5.0) == 0
    assert time.monotonic() - t0 < 5.0
    d.start()
    a2 = _client(d)
    res = a2.request(Resume(a2.id(), (g.token,)))
    assert isinstance(res, Resumed) and res.resumed == (g.token,)
    d.signal(signal.SIGINT)
    assert d.proc is not None and d.proc.wait(5) == 0
