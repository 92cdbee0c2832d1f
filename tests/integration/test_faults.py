"""Fault injection with real processes: SIGKILL, SIGSTOP, dropped connections, random action sequences.

The invariant under test (issue 2, sections 4 and 5): the seats granted for a (customer ID, product) never
exceed its count, and a client that was *told* it holds a seat (it read the ``granted`` reply) keeps it
across any crash of the daemon: after a restart on the same port and state directory, resuming with the
token succeeds. A grant the daemon journalled but never managed to send (killed in between) may come back
as a restored lease nobody resumes; it counts against the count until it lapses, which is allowed.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from harness import REPO, Daemon, Factory, RawClient, in_use, status, write_keys, write_license
from harness import hello_client as client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_stub import LicenseClient
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

NO_METRICS = ["--metrics-port", "0"]
#: The churners here check out and in as fast as the machine lets them, which on a quick moment is over the
#: default 1,000 requests a second per connection: the rate limit is tested in test_security.py, not here.
CHURN = [*NO_METRICS, "--max-requests-per-second", "0"]


def pool(c: RawClient) -> dict[str, Any]:
    p: dict[str, Any] = status(c)["pools"][0]
    return p


def resume_all(d: Daemon, tokens: list[str], user: str) -> tuple[RawClient, Resumed]:
    c = client(d, user=user)
    res = c.request(Resume(c.id(), tuple(tokens)))
    assert isinstance(res, Resumed), res
    return c, res


def hard_close(c: RawClient) -> None:
    """Close with a TCP reset, as a crashed client's kernel would."""
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def no_traceback(d: Daemon) -> None:
    log = d.log()
    assert "Traceback" not in log and "Exception in callback" not in log, log


# --------------------------------------------------------------------------- SIGKILL with seats held
@dataclass
class Churner:
    """A thread that checks out in a tight loop, checking one of its seats in whenever the count is reached."""

    c: RawClient
    told: list[str] = field(default_factory=list)  # granted replies read, not checked in
    uncertain: list[str] = field(default_factory=list)  # checkin sent, reply never read (killed in between)
    grants: int = 0
    releases: int = 0
    unexpected: list[Reply] = field(default_factory=list)  # checked by the test thread

    def run(self) -> None:
        try:
            for _ in range(100_000):
                r = self.c.request(Checkout(self.c.id(), "CADPRO", "2.1", 0.0))
                if isinstance(r, Granted):
                    self.told.append(r.token)
                    self.grants += 1
                    continue
                if not (isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS):
                    self.unexpected.append(r)
                    return
                if self.told:
                    token = self.told.pop(0)
                    self.uncertain.append(token)
                    done = self.c.request(Checkin(self.c.id(), token))
                    if not (isinstance(done, CheckedIn) and done.released):
                        self.unexpected.append(done)
                        return
                    self.uncertain.remove(token)
                    self.releases += 1
        except (OSError, ConnectionError):
            return  # the daemon was killed


def test_sigkill_while_clients_hold_seats_and_others_check_out(daemon_factory: Factory) -> None:
    count = 12
    d = daemon_factory((("CADPRO", "2.1", count),), share="none", heartbeat=2.0, lease_timeout=10.0,
                       extra=CHURN)
    holders: dict[str, list[str]] = {}
    holder_conns = []
    for i in range(3):
        h = client(d, user=f"holder{i}")
        holder_conns.append(h)
        holders[f"holder{i}"] = []
        for _ in range(1 + i % 2):
            g = h.request(Checkout(h.id(), "CADPRO", "2.1", 0.0))
            assert isinstance(g, Granted), g
            holders[f"holder{i}"].append(g.token)
    churners = [Churner(client(d, user=f"churn{i}")) for i in range(4)]
    threads = [threading.Thread(target=ch.run, daemon=True) for ch in churners]
    for t in threads:
        t.start()
    time.sleep(random.uniform(0.3, 0.6))
    d.kill()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert not [r for ch in churners for r in ch.unexpected], [ch.unexpected for ch in churners]
    assert sum(ch.grants for ch in churners) > count, "the churners barely ran; the test proves nothing"
    assert sum(ch.releases for ch in churners) > 0
    told = sum(len(v) for v in holders.values()) + sum(len(ch.told) for ch in churners)
    assert told <= count

    d.start()  # same port, same state directory
    observer = client(d, user="observer")
    restored = pool(observer)
    assert told <= restored["in_use"] <= count, restored
    for user, tokens in holders.items():
        _, res = resume_all(d, tokens, user)
        assert sorted(res.resumed) == sorted(tokens) and not res.lost, res
    for i, ch in enumerate(churners):
        _, res = resume_all(d, ch.told + ch.uncertain, f"churn{i}")
        assert set(ch.told) <= set(res.resumed), res  # every seat a client was told about is still its
        assert {x.token for x in res.lost} <= set(ch.uncertain), res
    after = pool(observer)
    assert after["in_use"] <= count
    # Nobody can now get more than what is left: the count holds with the restored leases.
    newcomer = client(d, user="newcomer")
    extra = 0
    for _ in range(count + 1):
        r = newcomer.request(Checkout(newcomer.id(), "CADPRO", "2.1", 0.0))
        if isinstance(r, ErrorReply):
            assert r.code is ErrorCode.NO_SEATS, r
            break
        extra += 1
    assert after["in_use"] + extra == count
    assert pool(observer)["in_use"] == count
    no_traceback(d)


def _burst(barrier: threading.Barrier, c: RawClient, mine: list[str], tries: int) -> None:
    """Check out as fast as possible from the barrier on, until refused or the daemon dies."""
    barrier.wait(5)
    try:
        for _ in range(tries):
            r = c.request(Checkout(c.id(), "CADPRO", "2.1", 0.0))
            if not isinstance(r, Granted):
                if not (isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS):
                    mine.append(f"unexpected reply {r!r}")  # not a token: the resume check reports it
                return
            mine.append(r.token)
    except (OSError, ConnectionError):
        return


def test_checkout_burst_racing_sigkill(daemon_factory: Factory) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    count, threads_n = 3, 8
    for rnd in range(5):
        d = daemon_factory((("CADPRO", "2.1", count),), share="none", heartbeat=2.0, lease_timeout=10.0,
                           extra=CHURN)
        conns = [client(d, user=f"u{i}") for i in range(threads_n)]
        told: list[list[str]] = [[] for _ in conns]
        barrier = threading.Barrier(threads_n + 1)

        ts = [threading.Thread(target=_burst, args=(barrier, conns[i], told[i], count + 1), daemon=True)
              for i in range(threads_n)]
        for t in ts:
            t.start()
        barrier.wait(5)
        time.sleep(rng.uniform(0.0, 0.02))
        d.kill()
        for t in ts:
            t.join(10)
        all_told = [tok for mine in told for tok in mine]
        ctx = f"(seed {seed}, round {rnd}, told {len(all_told)})"
        assert not [t for t in all_told if t.startswith("unexpected")], (all_told, ctx)
        assert len(all_told) <= count, ctx
        d.start()
        for i, mine in enumerate(told):
            if mine:
                _, res = resume_all(d, mine, f"u{i}")
                assert sorted(res.resumed) == sorted(mine) and not res.lost, (res, ctx)
        p = pool(client(d, user="observer"))
        assert len(all_told) <= p["in_use"] <= count, (p, ctx)
        no_traceback(d)
        d.kill()
        for c in conns:
            c.close()


# --------------------------------------------------------------------------- SIGSTOP past the lease timeout
def test_sigstop_longer_than_the_lease_timeout(daemon_factory: Factory) -> None:
    """What is expected: the daemon's clock is monotonic and keeps running while it is stopped, so on SIGCONT
    every lease last renewed more than a lease timeout ago is due at once. ``bob`` sent nothing: his lease
    lapses and its seat goes to the waiting ``carol``. ``alice`` kept sending heartbeats into the stopped
    daemon's socket; whether the expiry timer or her queued heartbeats run first is the event loop's choice,
    so her lease may lapse (she is then told LEASE_EXPIRED and checks out again) or survive. Either way the
    count is never exceeded, every seat a client is told it holds renews, and the daemon serves normally."""
    d = daemon_factory((("CADPRO", "2.1", 2),), share="none", heartbeat=1.0, lease_timeout=3.0,
                       extra=NO_METRICS)
    alice, bob, carol = client(d, "alice"), client(d, "bob"), client(d, "carol")
    ga = alice.request(Checkout(alice.id(), "CADPRO", "2.1", 0.0))
    gb = bob.request(Checkout(bob.id(), "CADPRO", "2.1", 0.0))
    assert isinstance(ga, Granted) and isinstance(gb, Granted)
    carol.send(Checkout(carol.id(), "CADPRO", "2.1", 60.0))
    d.wait_for_log(r"QUEUED CADPRO 2.1 for carol@")
    d.signal(signal.SIGSTOP)
    try:
        sent = 0
        for _ in range(5):  # 4.5 s stopped: 1.5 lease timeouts
            alice.send(Heartbeat(alice.id()))
            sent += 1
            time.sleep(0.9)
    finally:
        d.signal(signal.SIGCONT)
    acks: list[Reply] = [alice.recv() for _ in range(sent)]
    assert all(isinstance(a, HeartbeatAck) for a in acks), acks
    alice_lost = [x for a in acks if isinstance(a, HeartbeatAck) for x in a.lost]
    gc = carol.recv()
    assert isinstance(gc, Granted), gc  # bob's lapsed seat went to the waiter
    hb = bob.request(Heartbeat(bob.id()))
    assert isinstance(hb, HeartbeatAck) and hb.renewed == 0, hb
    assert [(x.token, x.code) for x in hb.lost] == [(gb.token, ErrorCode.LEASE_EXPIRED)], hb
    if alice_lost:
        assert [(x.token, x.code) for x in alice_lost] == [(ga.token, ErrorCode.LEASE_EXPIRED)], alice_lost
        again = alice.request(Checkout(alice.id(), "CADPRO", "2.1", 0.0))
        assert isinstance(again, Granted), again  # her seat was freed, not given away twice
    # Nothing is over-allocated: both seats are held, by alice and carol, and nobody else gets one.
    late = client(d, "dave")
    r = late.request(Checkout(late.id(), "CADPRO", "2.1", 0.0))
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS, r
    assert pool(late)["in_use"] == 2
    for c in (alice, carol):
        ack = c.request(Heartbeat(c.id()))
        assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and not ack.lost, ack
    no_traceback(d)


# --------------------------------------------------------------------------- a waiter drops
def test_dropped_connection_in_the_middle_of_a_waiting_checkout(daemon_factory: Factory) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),), share="none", heartbeat=1.0, lease_timeout=3.0,
                       extra=NO_METRICS)
    holder = client(d, "holder")
    g = holder.request(Checkout(holder.id(), "CADPRO", "2.1", 0.0))
    assert isinstance(g, Granted)
    w1, w2 = client(d, "w1"), client(d, "w2")
    w1.send(Checkout(w1.id(), "CADPRO", "2.1", 60.0))
    d.wait_for_log(r"QUEUED CADPRO 2.1 for w1@")
    w2.send(Checkout(w2.id(), "CADPRO", "2.1", 60.0))
    d.wait_for_log(r"QUEUED CADPRO 2.1 for w2@")
    assert pool(holder)["queued"] == 2
    hard_close(w1)  # the head of the queue vanishes with a reset
    deadline = time.monotonic() + 10
    while pool(holder)["queued"] != 1:
        assert time.monotonic() < deadline, "the dropped waiter was never removed from the queue"
        time.sleep(0.05)
    done = holder.request(Checkin(holder.id(), g.token))
    assert isinstance(done, CheckedIn) and done.released
    g2 = w2.recv()
    assert isinstance(g2, Granted), g2  # the seat went to the next waiter, not to the dead one
    p = pool(holder)
    assert (p["in_use"], p["queued"]) == (1, 0), p

    # The race: a waiter drops at the very moment the seat frees. Whichever the daemon sees first, the seat
    # ends with the live waiter (at once, or after the dead one's reconnect grace) and is never counted twice.
    w3, w4 = client(d, "w3"), client(d, "w4")
    w3.send(Checkout(w3.id(), "CADPRO", "2.1", 60.0))
    d.wait_for_log(r"QUEUED CADPRO 2.1 for w3@")
    w4.send(Checkout(w4.id(), "CADPRO", "2.1", 60.0))
    d.wait_for_log(r"QUEUED CADPRO 2.1 for w4@")
    w2.send(Checkin(w2.id(), g2.token))
    hard_close(w3)
    assert isinstance(w2.recv(), CheckedIn)
    g4 = w4.recv(timeout=15)
    assert isinstance(g4, Granted), g4
    p = pool(w4)
    assert (p["in_use"], p["queued"]) == (1, 0), p
    no_traceback(d)


# --------------------------------------------------------------------------- random action sequences
N_CLIENTS = 3
MODEL_COUNT = 2
_who = st.integers(0, N_CLIENTS - 1)
_checkout = st.tuples(st.just("checkout"), _who, st.just(0))
ACTIONS = st.lists(st.one_of(
    _checkout, _checkout, _checkout,  # weighted, so sequences often reach the count
    st.tuples(st.just("checkin"), _who, st.integers(0, 7)),
    st.tuples(st.just("heartbeat"), _who, st.just(0)),
    st.tuples(st.just("disconnect"), _who, st.integers(0, 1)),
    st.tuples(st.just("resume"), _who, st.just(0)),
    st.tuples(st.just("restart"), st.just(0), st.just(0)),
), min_size=3, max_size=16)


class Model:
    """What the clients believe: the tokens each holds. The daemon must agree exactly after every step.

    Leases are long (15 s) and the reconnect grace is 10 s, far longer than one example runs, so no seat
    lapses on its own here and the model can be exact: a restart happens only between steps, when every
    reply has been read, so every grant is known.
    """

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.tokens: list[list[str]] = [[] for _ in range(N_CLIENTS)]
        self.conns: list[RawClient | None] = [None] * N_CLIENTS
        self.observer = client(d, "observer")

    def held(self) -> int:
        return sum(len(t) for t in self.tokens)

    def connect(self, i: int) -> RawClient:
        """Connect client ``i`` if it is not connected, resuming every seat it holds (as the client stub does)."""
        c = self.conns[i]
        if c is not None:
            return c
        c = self.conns[i] = client(self.d, f"user{i}")
        if self.tokens[i]:
            res = c.request(Resume(c.id(), tuple(self.tokens[i])))
            assert isinstance(res, Resumed), res
            assert sorted(res.resumed) == sorted(self.tokens[i]) and not res.lost, res
        return c

    def drop(self, i: int, reset: bool = False) -> None:
        c = self.conns[i]
        if c is not None:
            if reset:
                hard_close(c)
            else:
                c.close()
            self.conns[i] = None

    def step(self, action: str, i: int, arg: int) -> None:
        if action == "checkout":
            c = self.connect(i)
            r = c.request(Checkout(c.id(), "CADPRO", "2.1", 0.0))
            if self.held() < MODEL_COUNT:
                assert isinstance(r, Granted), r
                self.tokens[i].append(r.token)
            else:
                assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS, r
        elif action == "checkin":
            c = self.connect(i)
            mine = self.tokens[i]
            token = mine.pop(arg % len(mine)) if mine else "0" * 32
            done = c.request(Checkin(c.id(), token))
            assert isinstance(done, CheckedIn) and done.released == (token != "0" * 32), done
        elif action == "heartbeat":
            c = self.connect(i)
            ack = c.request(Heartbeat(c.id()))
            assert isinstance(ack, HeartbeatAck), ack
            assert ack.renewed == len(self.tokens[i]) and not ack.lost, ack
        elif action == "disconnect":
            self.drop(i, reset=bool(arg))
        elif action == "resume":
            self.drop(i)
            self.connect(i)
        else:  # SIGKILL the daemon and start it again on the same port and state directory
            self.d.kill()
            for j in range(N_CLIENTS):
                self.drop(j)
            self.observer.close()
            self.d.start()
            self.observer = client(self.d, "observer")

    def check(self) -> None:
        p = pool(self.observer)
        assert p["in_use"] <= p["count"] == MODEL_COUNT, p
        assert p["in_use"] == self.held(), (p, self.tokens)
        for i, c in enumerate(self.conns):
            if c is not None and self.tokens[i]:  # resuming on the holding connection is a no-op
                res = c.request(Resume(c.id(), tuple(self.tokens[i])))
                assert isinstance(res, Resumed) and sorted(res.resumed) == sorted(self.tokens[i]), res
                assert not res.lost, res


@pytest.fixture(scope="module")
def model_vendor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model")
    key, pub = write_keys(root / "vendor")
    lic = root / "site.lic"
    write_license(lic, key, (("CADPRO", "2.1", MODEL_COUNT),), share="none")
    return lic, pub


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(actions=ACTIONS)
def test_random_actions_never_exceed_the_count_nor_lose_a_seat(model_vendor: tuple[Path, Path],
                                                                 actions: list[tuple[str, int, int]]) -> None:
    lic, pub = model_vendor
    with tempfile.TemporaryDirectory(prefix="lmgrd-model-") as tmp:
        d = Daemon(Path(tmp), [lic], pub, heartbeat=5.0, lease_timeout=15.0, extra=NO_METRICS).start()
        try:
            m = Model(d)
            for action, i, arg in actions:
                m.step(action, i, arg)
                m.check()
            for i in range(N_CLIENTS):  # in the end every seat the model holds resumes, wherever it was
                m.drop(i)
                m.connect(i)
            m.check()
            no_traceback(d)
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)
            for c in RawClient.opened:
                c.close()
            RawClient.opened.clear()


# --------------------------------------------------------------------------- issue 9: fault scenarios
# Each ends by checking the invariant: granted <= count; every seat a client believes it holds is held by the
# daemon (it resumes, it renews); no seat is held by nobody after its lease timeout (the daemon's count falls
# to exactly what clients hold). The bounds are the documented ones (README "Faults and the bounds you can
# rely on"): a silent connection's seats lapse one lease timeout after its last heartbeat; a closed one's are
# kept for the reconnect grace, then freed.

def heartbeat_for(conns: dict[str, RawClient], held: dict[str, set[str]], seconds: float) -> None:
    """Heartbeat every connection every 0.5 s for ``seconds``; each must renew exactly what its client holds."""
    for _ in range(int(seconds / 0.5) + 1):
        for user, c in conns.items():
            ack = c.request(Heartbeat(c.id()))
            assert isinstance(ack, HeartbeatAck) and ack.renewed == len(held[user]) and not ack.lost, (user, ack)
        time.sleep(0.5)


def test_twenty_sigkills_at_random_points_during_churn(daemon_factory: Factory) -> None:
    """SIGKILL the daemon 20 times at random moments of a checkout/checkin churn, restarting it each time on
    the same port and state directory: every seat a client was told it holds resumes after every restart,
    the count is never exceeded, and in the end the daemon holds exactly the clients' seats."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    count, users = 8, [f"churn{i}" for i in range(4)]
    d = daemon_factory((("CADPRO", "2.1", count),), share="none", heartbeat=1.0, lease_timeout=3.0,
                       extra=NO_METRICS)
    held: dict[str, set[str]] = {u: set() for u in users}
    conns = {u: client(d, u) for u in users}
    grants = 0
    for rnd in range(20):
        ctx = f"(seed {seed}, round {rnd})"
        churners = {u: Churner(conns[u], told=sorted(held[u])) for u in users}
        threads = [threading.Thread(target=ch.run, daemon=True) for ch in churners.values()]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.02, 0.4))
        d.kill()
        for t in threads:
            t.join(10)
            assert not t.is_alive(), ctx
        assert not [r for ch in churners.values() for r in ch.unexpected], ctx
        grants += sum(ch.grants for ch in churners.values())
        assert sum(len(ch.told) for ch in churners.values()) <= count, ctx
        d.start()
        for u, ch in churners.items():
            conns[u].close()
            c = conns[u] = client(d, u)
            asked = ch.told + ch.uncertain
            res = c.request(Resume(c.id(), tuple(asked)))
            assert isinstance(res, Resumed), (res, ctx)
            assert set(ch.told) <= set(res.resumed), (res, ctx)  # every seat it was told about is still its
            assert {x.token for x in res.lost} <= set(ch.uncertain), (res, ctx)
            held[u] = set(res.resumed)  # an unanswered checkin whose seat resumed is still held
        observer = client(d, "observer")
        n = in_use(observer)
        assert sum(len(h) for h in held.values()) <= n <= count, (n, held, ctx)
        observer.close()
    assert grants > 20 * count / 2, f"the churn barely ran ({grants} grants); the test proves nothing"
    # Journalled grants nobody was told of come back at a restart unclaimed; they lapse one lease timeout
    # later, and then the daemon holds exactly what the clients hold.
    heartbeat_for(conns, held, d.lease_timeout + 1.5)
    observer = client(d, "observer")
    assert in_use(observer) == sum(len(h) for h in held.values()), held
    no_traceback(d)


CLIENT_SCRIPT = """
import sys, time
from client_stub import LicenseClient
with LicenseClient(sys.argv[1], request_timeout=5.0) as lm:
    seat = lm.checkout("CADPRO", version="2.1")
    print(seat.token, flush=True)
    time.sleep(120)
"""


def _client_process(d: Daemon) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, d.address], stdout=subprocess.PIPE, text=True,
                         cwd=REPO)
    assert p.stdout is not None
    token = p.stdout.readline().strip()
    assert len(token) == 32, (token, p.poll())
    return p, token


def _wait_in_use(c: RawClient, n: int, deadline: float) -> float:
    """Poll until the pool's in_use is ``n``; returns the monotonic time it was seen (fails at ``deadline``)."""
    while True:
        now = time.monotonic()
        if in_use(c) == n:
            return now
        assert now < deadline, f"in_use never fell to {n}"
        time.sleep(0.05)


def test_hung_and_crashed_client_processes_lose_their_seats_within_the_documented_bounds(
        daemon_factory: Factory) -> None:
    """A client_stub process SIGSTOPped (hung: its connection stays open, its heartbeats stop) loses its seat
    one lease timeout after its last heartbeat; one SIGKILLed (crashed: its kernel closes the connection) keeps
    it for the reconnect grace, then loses it. Neither bound is exceeded by more than 1 s, neither seat is
    freed early, and each freed seat goes to the next checkout exactly once."""
    lease_timeout, heartbeat, grace = 4.0, 1.0, 2.0
    d = daemon_factory((("CADPRO", "2.1", 2),), share="none", heartbeat=heartbeat, lease_timeout=lease_timeout,
                       extra=[*NO_METRICS, "--reconnect-grace", str(grace)])
    observer = client(d, "observer")
    hung, _ = _client_process(d)
    crashed, _ = _client_process(d)
    procs = [hung, crashed]
    try:
        assert in_use(observer) == 2
        time.sleep(heartbeat * 1.5)  # both have heartbeated at least once on their own
        stopped = time.monotonic()
        hung.send_signal(signal.SIGSTOP)
        # Its last heartbeat was at most one interval before the stop: the lease runs at least that long.
        time.sleep(lease_timeout - heartbeat - 0.5)
        assert in_use(observer) == 2, "the hung client's seat was freed before its lease timeout"
        freed = _wait_in_use(observer, 1, stopped + lease_timeout + 1.0)
        assert freed <= stopped + lease_timeout + 1.0
        crashed.kill()
        crashed.wait(10)
        killed = time.monotonic()
        time.sleep(grace / 2)
        assert in_use(observer) == 1, "the crashed client's seat was freed before the reconnect grace"
        _wait_in_use(observer, 0, killed + grace + 1.0)
        # The freed seats go to newcomers, each once, and the count still holds.
        newcomer = client(d, "newcomer")
        for _ in range(2):
            assert isinstance(newcomer.request(Checkout(newcomer.id(), "CADPRO", "2.1", 0.0)), Granted)
        r = newcomer.request(Checkout(newcomer.id(), "CADPRO", "2.1", 0.0))
        assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS, r
        assert "EXPIRED CADPRO 2.1" in d.log()  # the hung one lapsed (no heartbeat), not detached
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
    no_traceback(d)


def test_network_blip_shorter_than_the_grace_resumes_the_same_seat(daemon_factory: Factory) -> None:
    """The real client_stub through the fault proxy: a reset plus 1.5 s of refused connections (shorter than
    the 4 s reconnect grace), then a 1.5 s stall (shorter than the lease timeout). After each, the client
    holds the same seat (same token, never reported lost), the daemon counts one seat, and nobody else can
    take a second: the "double checkout after reconnect" failure cannot happen."""
    d = daemon_factory((("CADPRO", "2.1", 1),), share="none", heartbeat=1.0, lease_timeout=5.0,
                       extra=[*NO_METRICS, "--reconnect-grace", "4"])
    lost: list[object] = []
    with FaultProxy(("127.0.0.1", d.port)) as proxy, \
            LicenseClient(proxy.address, request_timeout=3.0, on_lost=lambda s, e: lost.append(e)) as lm:
        seat = lm.checkout("CADPRO", version="2.1")
        token = seat.token
        observer = client(d, "observer")
        assert in_use(observer) == 1
        assert proxy.blip(1.5) == 1
        deadline = time.monotonic() + 15
        while "RESUME " not in d.log() or proxy.stats().live < 1:
            assert time.monotonic() < deadline, "the client never reconnected and resumed"
            time.sleep(0.05)
        m = d.wait_for_log(r"RESUME \S+: (\d+) seat\(s\) resumed, (\d+) lost")
        assert m.groups() == ("1", "0"), m.group(0)
        proxy.stall()
        time.sleep(1.5)
        proxy.resume()
        # Past a full lease timeout from the blip: the resumed seat is renewed, not lapsed nor doubled.
        time.sleep(d.lease_timeout)
        assert seat.held and not seat.lost and seat.token == token and not lost, (seat, lost)
        assert in_use(observer) == 1
        thief = client(d, "thief")
        r = thief.request(Checkout(thief.id(), "CADPRO", "2.1", 0.0))
        assert isinstance(r, ErrorReply) and r.code is ErrorCode.NO_SEATS, r
        st = proxy.stats()
        assert st.resets == 1 and st.refused >= 0 and st.accepted >= 2, st
        seat.checkin()
        assert in_use(observer) == 0
    no_traceback(d)


# -- clock jumps: libfaketime steps the daemon's wall clock; its monotonic clock is left alone
def _libfaketime() -> str | None:
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                    "/usr/local/lib/faketime/libfaketime.so.1"):
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return str(found[0])
    return None


class FakeWallDaemon(Daemon):
    """The daemon under libfaketime: its wall clock reads FAKETIME_TIMESTAMP_FILE (re-read on every call),
    so the test steps it while the daemon runs; CLOCK_MONOTONIC is not faked."""

    def __init__(self, *args: Any, lib: str, offset_file: Path, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lib = lib
        self.offset_file = offset_file

    def env(self) -> dict[str, str]:
        return {**super().env(), "LD_PRELOAD": self.lib, "FAKETIME_TIMESTAMP_FILE": str(self.offset_file),
                "FAKETIME_NO_CACHE": "1", "DONT_FAKE_MONOTONIC": "1"}

    def step(self, seconds: float) -> None:
        """Set the wall clock ``seconds`` away from the real one (a step, as NTP or an operator would)."""
        self.offset_file.write_text(f"{seconds:+.0f}\n")


def test_wall_clock_steps_change_no_lease_expiry(tmp_path: Path, vendor: tuple[Any, Path]) -> None:
    """Leases run on the monotonic clock: a wall clock stepped a day forward does not expire a lease early,
    stepped two days back does not keep one alive, and a heartbeating holder keeps its seat throughout."""
    lib = _libfaketime()
    if lib is None:
        pytest.skip("libfaketime is not installed (Debian package faketime; .ci/install-deps.sh installs it)")
    key, pub = vendor
    lic = tmp_path / "site.lic"
    write_license(lic, key, (("CADPRO", "2.1", 3),), share="none")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    lease_timeout = 4.0
    d = FakeWallDaemon(tmp_path, [lic], pub, heartbeat=1.0, lease_timeout=lease_timeout, extra=NO_METRICS,
                       lib=lib, offset_file=offset)
    d.start()
    try:
        alice, bob = client(d, "alice"), client(d, "bob")
        ga = alice.request(Checkout(alice.id(), "CADPRO", "2.1", 0.0))
        gb = bob.request(Checkout(bob.id(), "CADPRO", "2.1", 0.0))
        assert isinstance(ga, Granted) and isinstance(gb, Granted)
        bob_granted = time.monotonic()  # bob never heartbeats: his lease lapses one lease timeout from here
        d.step(+86400)
        carol = client(d, "carol")  # a log line written after the step carries tomorrow's date
        assert isinstance(carol.request(Checkout(carol.id(), "CADPRO", "2.1", 0.0)), Granted)
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT")
        assert re.search(rf"^{tomorrow}\S+ INFO \S+: OUT CADPRO 2.1 to carol@", d.log(), re.M), \
            "the daemon's wall clock did not move: libfaketime is not in effect"
        for _ in range(int((lease_timeout - 1.0) / 0.5)):  # a day forward expires nothing early
            for c in (alice, carol):
                assert isinstance(c.request(Heartbeat(c.id())), HeartbeatAck)
            time.sleep(0.5)
        assert in_use(alice) == 3, "a wall clock step forward expired a lease early"
        d.step(-2 * 86400)
        while in_use(alice) != 2:  # two days back keeps nothing alive: bob lapses on the monotonic schedule
            for c in (alice, carol):
                ack = c.request(Heartbeat(c.id()))
                assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and not ack.lost, ack
            assert time.monotonic() < bob_granted + lease_timeout + 2.0, "a wall clock step back kept a lease"
            time.sleep(0.2)
        hb = bob.request(Heartbeat(bob.id()))
        assert isinstance(hb, HeartbeatAck) and [(x.token, x.code) for x in hb.lost] == \
            [(gb.token, ErrorCode.LEASE_EXPIRED)], hb
        for c in (alice, carol):
            ack = c.request(Heartbeat(c.id()))
            assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and not ack.lost, ack
        no_traceback(d)
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
