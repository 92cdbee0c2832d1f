"""What an outside tester found, against the real daemon subprocess and the real client_stub (issue 9).

Lease tokens bound to their holder: another user's connection that presents a seat's token (checkin,
resume, then heartbeats) or a guessed token never frees, renews or takes over the seat, is refused and
counted (``lmgrd_token_refusals_total``); the rightful client keeps its seat, and a resume by the holder's
own new connection moves the seat and tells the old one (``SEAT_MOVED``). Log injection: a newline in
hello's user or display writes no forged log line. Resource holding: an idle connection holding no seat is
dropped while an active one is kept; a request flood is answered ``RATE_LIMITED`` and counted; a flood of
bad requests writes a bounded number of log lines. Waits are bounded polls; nothing asserts wall time.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import time
from urllib.parse import urlsplit

from harness import HOSTNAME, Daemon, Factory, RawClient, hello_client, in_use
from prometheus_client.parser import text_string_to_metric_families

from client_stub import AsyncLicenseClient, AsyncSeat, LicenseLost
from client_stub.backoff import Backoff
from protocol import (
    CheckedIn,
    Checkin,
    Checkout,
    ErrorCode,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Resume,
    Resumed,
    Status,
    StatusReply,
    Welcome,
)


def metrics(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    u = urlsplit(d.metrics_url())
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode("utf-8")
    finally:
        conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def thief(d: Daemon, user: str = "mallory", host: str = "evilpc") -> RawClient:
    return hello_client(d, user, host)


# --------------------------------------------------------------------------- tokens bound to their holder
def test_another_users_token_never_frees_renews_or_takes_the_seat(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), share="none", heartbeat=1.0, lease_timeout=3.0,
                       extra=["--metrics-port", "auto"])
    lost: list[LicenseLost] = []

    async def main() -> None:
        async with AsyncLicenseClient(d.address, user="alice", backoff=Backoff(0.05, 0.5),
                                      on_lost=lambda s, e: lost.append(e)) as lm:
            seat: AsyncSeat = await lm.checkout("CADPRO", "2.1")
            m = await asyncio.to_thread(thief, d)
            # The thief presents alice's token: resume (would move the seat), then checkin (would free it).
            res = await asyncio.to_thread(m.request, Resume(m.id(), (seat.token, "0" * 32)))
            assert isinstance(res, Resumed) and res.resumed == (), res
            assert {x.token: x.code for x in res.lost} == {seat.token: ErrorCode.LEASE_NOT_FOUND,
                                                          "0" * 32: ErrorCode.LEASE_NOT_FOUND}
            ack = await asyncio.to_thread(m.request, Heartbeat(m.id()))
            assert isinstance(ack, HeartbeatAck) and ack.renewed == 0 and not ack.lost, ack
            done = await asyncio.to_thread(m.request, Checkin(m.id(), seat.token))
            assert isinstance(done, CheckedIn) and not done.released, done
            # Another user with a second connection of the same name cannot either (the secret differs).
            twin = await asyncio.to_thread(thief, d, "alice", HOSTNAME)
            done = await asyncio.to_thread(twin.request, Checkin(twin.id(), seat.token))
            assert isinstance(done, CheckedIn) and not done.released, done
            assert await asyncio.to_thread(in_use, m) == 1
            # The seat is still alice's: it outlives several lease timeouts on her heartbeats alone, and
            # nobody else gets one.
            for _ in range(2):  # longer than the lease timeout in all
                await asyncio.sleep(1.6)
                assert seat.held and not lost
            deny = await asyncio.to_thread(m.request, Checkout(m.id(), "CADPRO", "2.1"))
            assert isinstance(deny, ErrorReply) and deny.code is ErrorCode.NO_SEATS
            await seat.checkin()
            assert await asyncio.to_thread(in_use, m) == 0

    asyncio.run(main())
    v = metrics(d)
    refused = {k[1]: n for k, n in v.items() if k[0] == "lmgrd_token_refusals_total"}
    assert refused[(("reason", "not_holder"), ("request", "resume"))] == 1
    assert refused[(("reason", "not_holder"), ("request", "checkin"))] == 2
    assert refused[(("reason", "unknown"), ("request", "resume"))] == 1
    log = d.log()
    assert "Traceback" not in log


def test_a_resume_by_the_holders_new_connection_moves_the_seat_and_tells_the_old(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), share="none", heartbeat=1.0, lease_timeout=4.0)
    secret = "s3cret-of-this-client-0123456789"
    old = d.connect()
    assert isinstance(old.request(Hello(old.id(), (1, 2), "pc1", "alice", 1, "test", "", secret)), Welcome)
    g = old.request(Checkout(old.id(), "CADPRO", "2.1"))
    assert isinstance(g, Granted)
    new = d.connect()
    assert isinstance(new.request(Hello(new.id(), (1, 2), "pc1", "alice", 1, "test", "", secret)), Welcome)
    res = new.request(Resume(new.id(), (g.token,)))
    assert isinstance(res, Resumed) and res.resumed == (g.token,) and not res.lost, res
    ack = old.request(Heartbeat(old.id()))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 0, ack
    assert [(x.token, x.code) for x in ack.lost] == [(g.token, ErrorCode.SEAT_MOVED)], ack
    ack = new.request(Heartbeat(new.id()))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and not ack.lost, ack
    # The old connection can no longer end it either way... (it is the same holder: checkin is allowed,
    # and is the holder's own choice) but a connection without the secret cannot.
    other = d.connect()
    assert isinstance(other.request(Hello(other.id(), (1, 2), "pc1", "alice", 1, "test", "", "x" * 32)), Welcome)
    done = other.request(Checkin(other.id(), g.token))
    assert isinstance(done, CheckedIn) and not done.released
    done = new.request(Checkin(new.id(), g.token))
    assert isinstance(done, CheckedIn) and done.released


def test_a_bound_seat_stays_bound_across_a_sigkill_restart(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), share="none", heartbeat=1.0, lease_timeout=6.0)
    secret = "another-secret-0123456789abcdef"
    a = d.connect()
    assert isinstance(a.request(Hello(a.id(), (1, 2), "pc1", "alice", 1, "test", "", secret)), Welcome)
    g = a.request(Checkout(a.id(), "CADPRO", "2.1"))
    assert isinstance(g, Granted)
    d.kill()
    a.close()
    d.start()
    m = thief(d, "alice", "pc1")  # same user and host, no secret of alice's
    res = m.request(Resume(m.id(), (g.token,)))
    assert isinstance(res, Resumed) and res.resumed == () and res.lost[0].code is ErrorCode.LEASE_NOT_FOUND
    a2 = d.connect()
    assert isinstance(a2.request(Hello(a2.id(), (1, 2), "pc1", "alice", 1, "test", "", secret)), Welcome)
    res = a2.request(Resume(a2.id(), (g.token,)))
    assert isinstance(res, Resumed) and res.resumed == (g.token,), res


# --------------------------------------------------------------------------- log injection
def test_control_characters_in_hello_forge_no_log_line(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),))
    c = d.connect()
    forged = "2026-01-01T00:00:00.000 WARNING lmgrd.daemon.server: FORGED"
    user = f"eve\n{forged}\r\x1b[2Jx"
    assert isinstance(c.request(Hello(c.id(), (1, 2), "pc1", user, 1, f"v\n{forged}", f":0\x00\n{forged}",
                                      "e" * 32)), Welcome)
    assert isinstance(c.request(Checkout(c.id(), "CADPRO", "2.1")), Granted)
    deny = c.request(Checkout(c.id(), "CADPRO", f"9\n{forged}"))
    assert isinstance(deny, ErrorReply)
    deny = c.request(Checkout(c.id(), f"NOPE\n{forged}", "1"))
    assert isinstance(deny, ErrorReply)
    c.close()
    d.wait_for_log(r"disconnected holding 1 seat")
    log = d.log()
    lines = log.split("\n")
    assert not [ln for ln in lines if ln.startswith("2026-01-01")], log  # no line the client wrote
    assert all(re.match(r"\d{4}-\d\d-\d\dT[\d:.]+ [A-Z]+ [\w.]+: ", ln) for ln in lines if ln), log
    forged_in = [ln for ln in lines if "FORGED" in ln]
    assert forged_in and all("\\n" + forged in ln for ln in forged_in), forged_in  # shown escaped, in place
    assert any("eve\\n" in ln and "\\x1b[2J" in ln for ln in lines), log
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", log)


# --------------------------------------------------------------------------- resource holding
def test_an_idle_connection_holding_no_seat_is_dropped_and_an_active_one_kept(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),), extra=["--idle-connection-timeout", "1", "--metrics-port", "auto"])
    idle = d.connect()
    assert isinstance(idle.hello(user="idle"), Welcome)
    holder = d.connect()
    assert isinstance(holder.hello(user="holder"), Welcome)
    assert isinstance(holder.request(Checkout(holder.id(), "CADPRO", "2.1")), Granted)
    chatty = d.connect()
    assert isinstance(chatty.hello(user="chatty"), Welcome)
    deadline = time.monotonic() + 2.6
    while time.monotonic() < deadline:  # chatty talks every 0.3 s (2.6 idle timeouts), holder heartbeats
        assert isinstance(chatty.request(Status(chatty.id())), StatusReply)
        if int(time.monotonic() * 10) % 10 < 3:
            assert isinstance(holder.request(Heartbeat(holder.id())), HeartbeatAck)
        time.sleep(0.3)
    assert idle.closed(timeout=5.0)
    assert isinstance(chatty.request(Status(chatty.id())), StatusReply)
    ack = holder.request(Heartbeat(holder.id()))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 1
    v = metrics(d)
    assert v[("lmgrd_idle_connections_closed_total", ())] >= 1


def test_a_request_flood_is_rate_limited_and_counted(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),), extra=["--max-requests-per-second", "20", "--metrics-port", "auto"])
    c = d.connect()
    assert isinstance(c.hello(user="flooder"), Welcome)
    n = 200
    c.send_raw(b"".join(c.conn.send(Status(1000 + i)) for i in range(n)))
    replies = [c.recv() for _ in range(n)]
    limited = [r for r in replies if isinstance(r, ErrorReply) and r.code is ErrorCode.RATE_LIMITED]
    served = [r for r in replies if isinstance(r, StatusReply)]
    assert len(served) + len(limited) == n
    assert 1 <= len(served) <= 40 and len(limited) >= n - 40
    assert sorted(r.id for r in replies) == list(range(1000, 1000 + n))  # every request answered, in order
    v = metrics(d)
    assert v[("lmgrd_rate_limited_requests_total", ())] == len(limited)
    # An honest client on another connection is served normally meanwhile.
    h = d.connect()
    assert isinstance(h.hello(user="honest"), Welcome)
    assert isinstance(h.request(Checkout(h.id(), "CADPRO", "2.1")), Granted)
    log = d.log()
    assert log.count("rate limit") <= 12, log


def test_a_checkin_of_a_held_seat_is_run_over_the_rate_limit_and_no_other_request_is(daemon_factory: Factory,
                                                                                      ) -> None:
    """Refusing a held seat's checkin for the rate would keep the seat from everyone until its lease lapses."""
    d = daemon_factory((("CADPRO", "2.1", 3),), extra=["--max-requests-per-second", "2", "--metrics-port", "auto"])
    c = d.connect()
    assert isinstance(c.hello(user="busy"), Welcome)
    tokens = []
    for _ in range(2):
        g = c.request(Checkout(c.id(), "CADPRO", "2.1"))
        assert isinstance(g, Granted)
        tokens.append(g.token)
    # One read: a flood that spends the allowance, then the checkins (one of a token nobody holds) and more.
    frames = [Status(100 + i) for i in range(30)] + [Checkin(200, tokens[0]), Checkin(201, "f" * 32),
                                                     Status(202), Checkin(203, tokens[1])]
    c.send_raw(b"".join(c.conn.send(f) for f in frames))
    replies = {r.id: r for r in (c.recv() for _ in frames)}
    assert isinstance(replies[200], CheckedIn) and replies[200].released
    assert isinstance(replies[203], CheckedIn) and replies[203].released
    for rid in (201, 202):
        assert isinstance(replies[rid], ErrorReply) and replies[rid].code is ErrorCode.RATE_LIMITED, replies[rid]
    limited = sum(isinstance(r, ErrorReply) and r.code is ErrorCode.RATE_LIMITED for r in replies.values())
    assert limited >= 20
    # The seats are free for others at once.
    others = [d.connect() for _ in range(3)]
    for o in others:
        assert isinstance(o.hello(user="other"), Welcome)
        assert isinstance(o.request(Checkout(o.id(), "CADPRO", "2.1")), Granted)
    assert metrics(d)[("lmgrd_rate_limited_requests_total", ())] == limited


def test_a_flood_of_bad_requests_writes_a_bounded_number_of_log_lines(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),), extra=["--max-requests-per-second", "0", "--metrics-port", "auto"])
    c = d.connect()
    assert isinstance(c.hello(user="garbage"), Welcome)
    before = len(d.log().splitlines())
    n = 3000
    import msgpack

    from protocol import encode_frame

    bad = encode_frame({"op": "checkout", "id": 7, "product": 5})
    assert msgpack.unpackb(bad[4:])["product"] == 5
    c.send_raw(bad * n)
    replies = [c.recv() for _ in range(n)]
    assert all(isinstance(r, ErrorReply) and r.code is ErrorCode.BAD_REQUEST for r in replies)
    assert isinstance(c.request(Status(c.id())), StatusReply)
    lines = d.log().splitlines()[before:]
    bad_lines = [ln for ln in lines if "bad request" in ln]
    assert 1 <= len(bad_lines) <= 20, len(bad_lines)
    v = metrics(d)
    assert v[("lmgrd_bad_requests_total", ())] == n
    assert v[("lmgrd_refusal_log_lines_suppressed_total", ())] >= n - 20


def test_connection_cap_refusals_are_counted_and_their_log_lines_bounded(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),), extra=["--max-connections-per-address", "2", "--metrics-port",
                                                       "auto"])
    keep = [d.connect() for _ in range(2)]
    for k in keep:
        assert isinstance(k.hello(), Welcome)
    n = 60
    for _ in range(n):
        extra = d.connect()
        r = extra.recv()
        assert isinstance(r, ErrorReply) and r.code is ErrorCode.TOO_MANY_CONNECTIONS
        extra.close()
    v = metrics(d)
    assert v[("lmgrd_connection_refusals_total", (("reason", "per_address_limit"),))] == n
    lines = [ln for ln in d.log().splitlines() if "refused a connection" in ln]
    assert 1 <= len(lines) <= 12, len(lines)
