"""The lease lifecycle's cluster paths (``store: etcd``, HA) in-process, against a real etcd.

One etcd member per module (started on free loopback ports in a temp dir, stopped by PID); each test has a
key prefix of its own. A "node" is a real :class:`~lmgrd.daemon.server.Server` on the test's loop (the daemon
rig: real ledger, real signed licenses, sessions on recording transports) whose seats live in etcd through a
real :class:`~lmgrd.storage.etcd.EtcdSeats`; two nodes on one prefix are two lmgrd nodes of one cluster. The
server's keepalive and watch loops are not started: a test drives ``maintain`` / ``refresh_view`` /
``serve_cluster`` itself, so each step is one the test chose. Every wait is a bounded poll on a condition.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import itertools
import json
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_rig import Recorder, RecordingTransport, Rig
from harness import write_license

from lmgrd.config import build_config
from lmgrd.daemon.events import EndReason
from lmgrd.daemon.server import Server
from lmgrd.daemon.session import Session
from lmgrd.storage.etcd import EtcdSeats, EtcdSettings, NullStore, ha_missing
from lmgrd.storage.files import load_licensing
from protocol import Checkin, Checkout, ErrorCode, Heartbeat, Resume
from tests.etcd_cluster import ETCD, ETCDCTL, EtcdCluster

Vendor = tuple[Ed25519PrivateKey, Path]

pytestmark = [
    pytest.mark.skipif(ha_missing() is not None, reason=ha_missing() or ""),
    pytest.mark.skipif(not (Path(ETCD).exists() and Path(ETCDCTL).exists()), reason="etcd is not installed"),
]

_prefixes = itertools.count(1)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for the module. It gets SIGKILL when this process dies (PR_SET_PDEATHSIG), so a test
    process killed before the fixture's end (mutmut's timeout) leaves no etcd behind."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), 1)
    try:
        for m in cluster.members:
            with open(m.log, "ab") as log:
                m.proc = subprocess.Popen(m.args(), stdout=log, stderr=log, preexec_fn=_die_with_parent)
        cluster.wait_healthy()
        yield cluster
    finally:
        for m in cluster.members:  # a test that stopped it (SIGSTOP) and failed: SIGKILL works on it anyway
            m.kill(signal.SIGCONT)
        cluster.stop()


class Cluster:
    """The nodes of one test on one etcd prefix."""

    def __init__(self, etcd: EtcdCluster, prefix: str, rigs: list[Rig]) -> None:
        self.etcd, self.prefix, self.rigs = etcd, prefix, rigs

    def keys(self, under: str) -> list[str]:
        """The keys etcd holds under ``PREFIX/under`` (etcdctl, not the store: what is really there)."""
        out = self.etcd.ctl("get", f"{self.prefix}/{under}", "--prefix", "--keys-only")
        return sorted(line for line in out.splitlines() if line)

    def seats(self) -> list[dict[str, Any]]:
        """The seat values etcd holds (every pool), in slot order."""
        out = self.etcd.ctl("get", f"{self.prefix}/c/", "--prefix", "-w", "json")
        kvs = json.loads(out).get("kvs") or []
        return [json.loads(base64.b64decode(kv["value"])) for kv in kvs]

    def stop_etcd(self) -> None:
        for m in self.etcd.members:
            m.kill(signal.SIGSTOP)

    def cont_etcd(self) -> None:
        for m in self.etcd.members:
            m.kill(signal.SIGCONT)


def node(rig: Rig) -> EtcdSeats:
    cluster = rig.server.cluster
    assert cluster is not None
    return cluster


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def settle(*rigs: Rig) -> None:
    """Wait until every node's etcd decisions (claims, adoptions) and releases are done, then flush replies."""
    for rig in rigs:
        leases, cluster = rig.server.leases, node(rig)
        deadline = time.monotonic() + 5.0
        while leases._tasks or cluster._releasing:
            assert time.monotonic() < deadline, "the node's etcd work did not finish"
            await asyncio.wait([*leases._tasks, *cluster._releasing], timeout=1.0)
        rig.server.outbox.flush()


async def answer(rig: Rig, s: Session) -> dict[str, Any]:
    """The one reply ``s`` gets once etcd has decided."""
    got: list[dict[str, Any]] = []

    def ready() -> bool:
        rig.server.outbox.flush()
        got.extend(rig.replies(s))
        return bool(got)

    await until(ready, f"a reply to {s.who()}")
    await settle(rig)
    got.extend(rig.replies(s))
    (reply,) = got
    return reply


async def checkout(rig: Rig, s: Session, wait: float = 0, product: str = "CADPRO") -> dict[str, Any]:
    rig.server.handlers.dispatch(s, Checkout(rig.rid(), product, "2.1", wait))
    rig.server.outbox.flush()
    assert rig.replies(s) == []  # nobody is answered before etcd decides
    return await answer(rig, s)


def _pool(rig: Rig) -> tuple[str, str]:
    return next(iter(rig.server.licensing.pools()))


Body = Callable[[Cluster], Awaitable[None]]


def run(tmp_path: Path, vendor: Vendor, etcd: EtcdCluster, body: Body, *, nodes: int = 2, count: int = 1,
        share: str = "user_host", clock: Callable[[], float] | None = None, timeout: float = 2.0) -> None:
    key, pub = vendor
    lic = tmp_path / "site.lic"
    write_license(lic, key, (("CADPRO", "2.1", count),), share=share)
    prefix = f"/lmt{next(_prefixes)}x{time.monotonic_ns()}"

    async def main() -> None:
        rigs: list[Rig] = []
        try:
            for i in range(nodes):
                state = tmp_path / f"state{i}"
                state.mkdir()
                cfg = build_config({}, {"licenses": [str(lic)], "vendor_key": str(pub), "port": 0,
                                        "state_dir": str(state), "heartbeat_interval": 1.0, "lease_timeout": 3.0},
                                   "test")
                licensing, problems = load_licensing(cfg)
                assert not problems, problems
                seats = EtcdSeats(EtcdSettings((etcd.members[0].endpoint,), prefix, timeout), f"n{i + 1}", 30)
                server = Server(cfg, licensing, NullStore(), clock=clock, cluster=seats)
                rec = Recorder()
                server.observers.add(rec)
                await seats.connect({"node": seats.node})
                assert seats.up
                rigs.append(Rig(server, rec, state))
            await body(Cluster(etcd, prefix, rigs))
        finally:
            for rig in rigs:
                for task in list(rig.server.leases._tasks) + list(node(rig)._releasing):
                    task.cancel()
                await node(rig).close()

    asyncio.run(main())


NO_SEATS_CLUSTER = "all {n} seat(s) of CADPRO are in use across the license server cluster"
UNREACHABLE = "the license servers' shared seat store (etcd) cannot be reached"


def test_a_checkout_is_tentative_until_etcd_writes_it_and_two_nodes_never_exceed_the_count(
        tmp_path: Path, vendor: Vendor, etcd: EtcdCluster) -> None:
    async def body(c: Cluster) -> None:
        a, b = c.rigs
        users = [(rig, rig.connect(f"u{n}{i}", f"pc{n}{i}")) for n, rig in enumerate(c.rigs) for i in range(2)]
        for rig, s in users:
            rig.server.handlers.dispatch(s, Checkout(rig.rid(), "CADPRO", "2.1", 0))
        for rig, s in users:  # each node's ledger granted both of its checkouts, tentatively: nobody told yet
            rig.server.outbox.flush()
            assert rig.replies(s) == []
        assert a.server.ledger.in_use(_pool(a)) == 2 and b.server.ledger.in_use(_pool(b)) == 2
        assert c.keys("c/") == [] and c.keys("tokens/") == []
        assert a.server.counters.granted == 0 and a.recorder.events == []
        replies = [await answer(rig, s) for rig, s in users]
        granted = [(rig, r) for (rig, _s), r in zip(users, replies, strict=True) if r["op"] == "granted"]
        refused = [r for r in replies if r["op"] == "error"]
        assert len(granted) == 2 and len(refused) == 2
        assert {(r["code"], r["message"]) for r in refused} == {(ErrorCode.NO_SEATS, NO_SEATS_CLUSTER.format(n=2))}
        # The refused tentative leases were taken back: the ledgers hold exactly the granted seats.
        assert a.server.ledger.in_use(_pool(a)) + b.server.ledger.in_use(_pool(b)) == 2
        assert a.server.counters.granted + b.server.counters.granted == 2
        assert a.server.counters.denied.get(ErrorCode.NO_SEATS, 0) + b.server.counters.denied.get(
            ErrorCode.NO_SEATS, 0) == 2
        seats = c.seats()
        assert sorted(s["token"] for s in seats) == sorted(r["token"] for _rig, r in granted)
        for rig, r in granted:
            assert {"node": node(rig).node, "token": r["token"]}.items() <= next(
                s for s in seats if s["token"] == r["token"]).items()
            assert rig.server.ledger.get(r["token"]) is not None
        assert len(c.keys("tokens/")) == 2

    run(tmp_path, vendor, etcd, body, count=2)


def test_refused_across_the_cluster_then_queued_and_granted_when_the_other_node_frees(
        tmp_path: Path, vendor: Vendor, etcd: EtcdCluster) -> None:
    now = [1000.0]

    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice, bob, carol = a.connect("alice", "pc1"), b.connect("bob", "pc2"), b.connect("carol", "pc3")
        g = await checkout(a, alice)
        assert g["op"] == "granted"
        r = await checkout(b, bob)
        assert (r["op"], r["code"], r["message"], r["hint"]) == (
            "error", ErrorCode.NO_SEATS, NO_SEATS_CLUSTER.format(n=1), "try again later, or check out with a wait")
        assert b.server.ledger.in_use(_pool(b)) == 0 and b.server.counters.granted == 0
        assert b.recorder.denials == [("CADPRO", "2.1", ErrorCode.NO_SEATS, "bob", _pool(b)[0])]
        rid = b.rid()
        b.server.handlers.dispatch(carol, Checkout(rid, "CADPRO", "2.1", 60))
        await settle(b)
        assert b.replies(carol) == []
        leases = b.server.leases
        (wid,) = leases.waits
        assert leases.cluster_queue == {_pool(b): [wid]} and carol.waiters == {wid: rid}
        ctx = leases.waits[wid]
        assert (ctx.request_id, ctx.started, ctx.until, ctx.pool, ctx.share_key) == (
            rid, 1000.0, 1060.0, _pool(b), ("carol", "pc3"))
        assert b.server.ledger.in_use(_pool(b)) == 0  # the refused tentative seat went back
        # The view shows the pool full: nothing is offered.
        await node(b).refresh_view()
        leases.serve_cluster()
        await settle(b)
        assert b.replies(carol) == [] and leases.cluster_queue == {_pool(b): [wid]}
        (ack,) = a.send(alice, Checkin(a.rid(), g["token"]))
        assert ack["op"] == "checked_in"
        await settle(a)
        assert c.keys("c/") == [] and c.keys("tokens/") == []  # the end was written to etcd
        now[0] += 5.0
        await node(b).refresh_view()
        leases.serve_cluster()
        got = await answer(b, carol)
        assert (got["op"], got["id"], got["waited"], got["version"]) == ("granted", rid, 5.0, "2.1")
        assert leases.cluster_queue == {} and leases.waits == {} and carol.waiters is None
        (seat,) = c.seats()
        assert (seat["node"], seat["token"], seat["user"], seat["version"]) == ("n2", got["token"], "carol", "2.1")
        assert isinstance(seat["granted_at"], float)
        assert b.server.ledger.get(got["token"]) is not None and b.server.counters.granted == 1

    run(tmp_path, vendor, etcd, body, clock=lambda: now[0])


def test_a_cluster_wide_wait_that_runs_out_is_refused_and_forgotten(tmp_path: Path, vendor: Vendor,
                                                                   etcd: EtcdCluster) -> None:
    now = [1000.0]

    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice, carol = a.connect("alice", "pc1"), b.connect("carol", "pc3")
        g = await checkout(a, alice)
        rid = b.rid()
        loop = asyncio.get_running_loop()
        before = loop.time()
        b.server.handlers.dispatch(carol, Checkout(rid, "CADPRO", "2.1", 0.5))
        await settle(b)
        after = loop.time()
        leases = b.server.leases
        (wid,) = leases.waits
        when = leases.waits[wid].timer.when()  # type: ignore[union-attr]
        assert before + 0.5 <= when <= after + 0.5  # the server's clock stood still: the whole 0.5 s
        assert leases.cluster_queue == {_pool(b): [wid]}
        now[0] += 2.0
        r = await answer(b, carol)  # the wait timer (0.5 s of the loop's time) fired
        assert (r["op"], r["id"], r["code"], r["message"]) == (
            "error", rid, ErrorCode.NO_SEATS, "no seat of CADPRO became free within 2 s")
        assert leases.waits == {} and carol.waiters is None
        a.send(alice, Checkin(a.rid(), g["token"]))
        await settle(a)
        await node(b).refresh_view()
        leases.serve_cluster()  # the seat is free now; the wait that ran out is not served
        await settle(b)
        assert b.replies(carol) == [] and leases.cluster_queue == {} and c.keys("c/") == []
        assert b.server.counters.granted == 0

    run(tmp_path, vendor, etcd, body, clock=lambda: now[0])


def test_store_unavailable_while_etcd_is_stopped_and_granted_again_once_it_answers(
        tmp_path: Path, vendor: Vendor, etcd: EtcdCluster) -> None:
    async def body(c: Cluster) -> None:
        (a,) = c.rigs
        alice, bob = a.connect("alice", "pc1"), a.connect("bob", "pc2")
        c.stop_etcd()
        try:
            r = await checkout(a, alice)
            assert r["id"] == a.ids
            assert (r["op"], r["code"], r["message"], r["hint"]) == (
                "error", ErrorCode.STORE_UNAVAILABLE, UNREACHABLE,
                "try again shortly; if it persists, ask the administrator to check the etcd cluster")
            assert not node(a).up
            assert a.server.ledger.in_use(_pool(a)) == 0
            # Known down: refused without another call to etcd (none would answer before its deadline).
            r = await checkout(a, bob, wait=30)
            assert (r["code"], r["message"]) == (ErrorCode.STORE_UNAVAILABLE, UNREACHABLE)
            assert a.server.leases.waits == {} and a.server.leases.cluster_queue == {}
        finally:
            c.cont_etcd()
        assert a.server.counters.denied == {ErrorCode.STORE_UNAVAILABLE: 2}
        cid = _pool(a)[0]
        assert a.recorder.denials == [("CADPRO", "2.1", ErrorCode.STORE_UNAVAILABLE, "alice", cid),
                                      ("CADPRO", "2.1", ErrorCode.STORE_UNAVAILABLE, "bob", cid)]
        assert a.server.counters.granted == 0 and a.server.ledger.in_use(_pool(a)) == 0
        await node(a).refresh_view()
        assert node(a).up
        g = await checkout(a, alice)
        assert g["op"] == "granted" and [s["token"] for s in c.seats()] == [g["token"]]

    run(tmp_path, vendor, etcd, body, nodes=1, count=2, timeout=0.5)


@pytest.mark.parametrize("etcd_up", [True, False])
def test_a_lease_ended_while_etcd_decided_is_refused_and_not_left_in_etcd(
        tmp_path: Path, vendor: Vendor, etcd: EtcdCluster, etcd_up: bool) -> None:
    async def body(c: Cluster) -> None:
        (a,) = c.rigs
        alice = a.connect("alice", "pc1")
        if not etcd_up:
            c.stop_etcd()
        try:
            rid = a.rid()
            a.server.handlers.dispatch(alice, Checkout(rid, "CADPRO", "2.1", 30))
            (lease,) = a.server.ledger.leases(_pool(a))  # tentative: etcd has not answered
            assert a.server.leases.end(lease.token, EndReason.REMOVAL, "lmremove") is lease
            r = await answer(a, alice)
        finally:
            c.cont_etcd()
        if etcd_up:
            assert (r["code"], r["message"], r["hint"]) == (
                ErrorCode.NO_SEATS, "the seat of CADPRO ended before it could be granted (the licenses were "
                "reloaded or the seat was removed)", "check out again")
        else:
            assert (r["code"], r["message"], r["hint"]) == (
                ErrorCode.STORE_UNAVAILABLE, UNREACHABLE,
                "try again shortly; if it persists, ask the administrator to check the etcd cluster")
        assert r["id"] == rid
        assert a.recorder.denials == [("CADPRO", "2.1", r["code"], "alice", _pool(a)[0])]
        assert a.server.leases.waits == {} and a.server.leases.cluster_queue == {}
        assert a.server.counters.granted == 0 and a.server.ledger.in_use(_pool(a)) == 0
        # etcd's write of the seat (when it answered) was undone: nothing is left there or in the store's claims.
        assert c.keys("c/") == [] and c.keys("tokens/") == []
        assert node(a).claims == {} and node(a).token_seat == {}

    run(tmp_path, vendor, etcd, body, nodes=1, timeout=0.5)


def test_a_client_that_left_before_etcd_answered_gets_no_seat_anywhere(tmp_path: Path, vendor: Vendor,
                                                                      etcd: EtcdCluster) -> None:
    async def body(c: Cluster) -> None:
        (a,) = c.rigs
        alice, bob = a.connect("alice", "pc1"), a.connect("bob", "pc2")
        a.server.handlers.dispatch(alice, Checkout(a.rid(), "CADPRO", "2.1", 0))
        t = alice.transport
        assert isinstance(t, RecordingTransport)
        t.closed = True
        await settle(a)
        assert t.replies() == [] and a.server.counters.granted == 0 and a.recorder.events == []
        assert a.server.ledger.in_use(_pool(a)) == 0
        assert c.keys("c/") == [] and c.keys("tokens/") == [] and node(a).token_seat == {}
        g = await checkout(a, bob)  # the one seat is free for the next
        assert g["op"] == "granted"

    run(tmp_path, vendor, etcd, body, nodes=1)


def test_every_end_is_written_to_etcd(tmp_path: Path, vendor: Vendor, etcd: EtcdCluster) -> None:
    now = [1000.0]

    async def body(c: Cluster) -> None:
        (a,) = c.rigs
        users = [a.connect(u, f"pc{i}") for i, u in enumerate(("alice", "bob", "carol"))]
        tokens = [(await checkout(a, s))["token"] for s in users]
        assert sorted(s["token"] for s in c.seats()) == sorted(tokens) and len(c.keys("tokens/")) == 3
        a.send(users[0], Checkin(a.rid(), tokens[0]))
        await settle(a)
        assert sorted(s["token"] for s in c.seats()) == sorted(tokens[1:])
        assert a.server.leases.end(tokens[1], EndReason.REMOVAL, "lmremove") is not None
        await settle(a)
        assert [s["token"] for s in c.seats()] == [tokens[2]]
        now[0] += 10.0
        assert a.server.leases.expire(10) == 1
        await settle(a)
        assert c.keys("c/") == [] and c.keys("tokens/") == [] and node(a).pending == []
        assert node(a).claims == {} and node(a).token_seat == {}
        await node(a).refresh_view()
        a.server.leases.serve_cluster()  # seats free, nobody waiting: nothing to do
        assert a.server.leases.cluster_queue == {} and a.server.ledger.in_use(_pool(a)) == 0

    run(tmp_path, vendor, etcd, body, nodes=1, count=3, clock=lambda: now[0])


def test_store_lost_ends_the_leases_whose_etcd_lease_lapsed(tmp_path: Path, vendor: Vendor,
                                                            etcd: EtcdCluster) -> None:
    async def body(c: Cluster) -> None:
        (a,) = c.rigs
        alice, bob, carol = a.connect("alice", "pc1"), a.connect("bob", "pc2"), a.connect("carol", "pc3")
        ga, gb, gc = await checkout(a, alice), await checkout(a, bob), await checkout(a, carol)
        for s in (alice, carol):  # their etcd leases lapse: their seats are gone from etcd
            c.etcd.ctl("lease", "revoke", f"{node(a).session_lease[s.session]:x}")
        assert [s["token"] for s in c.seats()] == [gb["token"]]
        lost = await node(a).maintain()
        assert lost == sorted([ga["token"], gc["token"]])
        assert a.server.leases.store_lost([*lost, "f" * 32]) == 2  # an unknown token ends nothing
        # Forgotten locally first: no release is sent for a seat etcd no longer has.
        assert node(a)._releasing == set() and node(a).pending == []
        assert a.server.leases.store_lost(lost) == 0  # already ended
        assert a.server.ledger.get(ga["token"]) is None and a.server.ledger.get(gb["token"]) is not None
        assert list(node(a).token_seat) == [gb["token"]]
        assert sorted(a.recorder.events[-2:]) == sorted([("release", (ga["token"], EndReason.STORE_LOST)),
                                                         ("release", (gc["token"], EndReason.STORE_LOST))])
        assert a.server.counters.released == 2
        (ack,) = a.send(alice, Heartbeat(a.rid(), False))
        assert [(x["token"], x["code"], x["message"]) for x in ack["lost"]] == [
            (ga["token"], ErrorCode.STORE_UNAVAILABLE, "this seat of CADPRO ended: the shared seat store lost "
             "this seat")]
        await settle(a)
        assert [s["token"] for s in c.seats()] == [gb["token"]]  # bob's seat untouched

    run(tmp_path, vendor, etcd, body, nodes=1, count=3)


def test_a_seat_granted_by_one_node_is_adopted_by_the_node_its_client_resumes_on(
        tmp_path: Path, vendor: Vendor, etcd: EtcdCluster) -> None:
    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice = a.connect("alice", "pc1")
        g = await checkout(a, alice)
        token = g["token"]
        alice_b, bob_b = b.connect("alice", "pc1"), b.connect("bob", "pc2")
        # Someone else cannot take alice's seat by naming its token; a token etcd never saw is not found.
        b.server.handlers.dispatch(bob_b, Resume(b.rid(), (token, "e" * 32)))
        r = await answer(b, bob_b)
        gone = "this seat is no longer held: it lapsed, was checked in or was removed"
        assert r["resumed"] == [] and [(x["token"], x["code"], x["message"]) for x in r["lost"]] == [
            (token, ErrorCode.LEASE_NOT_FOUND, gone), ("e" * 32, ErrorCode.LEASE_NOT_FOUND, gone)]
        # Nor can a client of the same user and host with another secret (the seat is bound to its owner).
        other = b.connect("alice", "pc1", secret="another secret of the same user and host")
        b.server.handlers.dispatch(other, Resume(b.rid(), (token,)))
        r = await answer(b, other)
        assert r["resumed"] == [] and [(x["token"], x["code"]) for x in r["lost"]] == [
            (token, ErrorCode.LEASE_NOT_FOUND)]
        assert b.server.ledger.get(token) is None and [s["node"] for s in c.seats()] == ["n1"]
        rid = b.rid()
        b.server.handlers.dispatch(alice_b, Resume(rid, (token,)))
        b.server.outbox.flush()
        assert b.replies(alice_b) == []  # answered once etcd has
        r = await answer(b, alice_b)
        assert (r["op"], r["id"], r["resumed"], r["lost"]) == ("resumed", rid, [token], [])
        lease = b.server.ledger.get(token)
        assert lease is not None and lease.session == alice_b.session and lease.user == "alice"
        (seat,) = c.seats()
        assert (seat["node"], seat["token"]) == ("n2", token)
        assert node(b).token_seat[token] == (g["customer_id"], "CADPRO", ("alice", "pc1"))
        # The node that granted it ends its copy (expiry): a late release frees nothing of the moved seat.
        assert a.server.leases.end(token, EndReason.EXPIRY) is not None
        await settle(a)
        assert [s["node"] for s in c.seats()] == ["n2"]
        # Its new node's end frees it.
        b.send(alice_b, Checkin(b.rid(), token))
        await settle(b)
        assert c.keys("c/") == [] and c.keys("tokens/") == []

    run(tmp_path, vendor, etcd, body)


def test_a_resume_while_etcd_is_stopped_is_told_the_store_is_unavailable(tmp_path: Path, vendor: Vendor,
                                                                         etcd: EtcdCluster) -> None:
    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice = a.connect("alice", "pc1")
        token = (await checkout(a, alice))["token"]
        alice_b = b.connect("alice", "pc1")
        c.stop_etcd()
        try:
            b.server.handlers.dispatch(alice_b, Resume(b.rid(), (token, "d" * 32)))
            r = await answer(b, alice_b)
        finally:
            c.cont_etcd()
        assert r["resumed"] == [] and [(x["token"], x["code"], x["message"]) for x in r["lost"]] == [
            (token, ErrorCode.STORE_UNAVAILABLE, UNREACHABLE), ("d" * 32, ErrorCode.STORE_UNAVAILABLE, UNREACHABLE)]
        assert b.server.ledger.get(token) is None
        assert [s["node"] for s in c.seats()] == ["n1"]

    run(tmp_path, vendor, etcd, body, timeout=0.5)


def test_a_tentative_seat_etcd_refused_goes_to_the_local_waiter_which_then_waits_cluster_wide(
        tmp_path: Path, vendor: Vendor, etcd: EtcdCluster) -> None:
    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice = a.connect("alice", "pc1")
        bob, carol = b.connect("bob", "pc2"), b.connect("carol", "pc3")
        g = await checkout(a, alice)
        rb, rc = b.rid(), b.rid()
        b.server.handlers.dispatch(bob, Checkout(rb, "CADPRO", "2.1", 0))  # b's ledger: bob's tentative seat
        b.server.handlers.dispatch(carol, Checkout(rc, "CADPRO", "2.1", 60))  # b's ledger is full: queued
        leases = b.server.leases
        assert [w.user for w in b.server.ledger.waiting(_pool(b))] == ["carol"]
        r = await answer(b, bob)
        assert (r["id"], r["code"]) == (rb, ErrorCode.NO_SEATS)
        await settle(b)
        # bob's seat was taken back and went to carol (the ledger's waiter); etcd refused it too; she waits on.
        assert b.replies(carol) == [] and b.server.ledger.waiting(_pool(b)) == []
        (wid,) = leases.waits
        assert leases.cluster_queue == {_pool(b): [wid]} and carol.waiters == {wid: rc}
        assert b.server.ledger.in_use(_pool(b)) == 0
        a.send(alice, Checkin(a.rid(), g["token"]))
        await settle(a)
        await node(b).refresh_view()
        leases.serve_cluster()
        got = await answer(b, carol)
        assert (got["op"], got["id"]) == ("granted", rc)
        (seat,) = c.seats()
        assert (seat["node"], seat["user"]) == ("n2", "carol") and isinstance(seat["granted_at"], float)

    run(tmp_path, vendor, etcd, body)


def test_a_waiter_whose_seat_another_node_took_first_keeps_its_place(tmp_path: Path, vendor: Vendor,
                                                                     etcd: EtcdCluster) -> None:
    now = [1000.0]

    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice, erin = a.connect("alice", "pc1"), a.connect("erin", "pc5")
        carol, dave = b.connect("carol", "pc3"), b.connect("dave", "pc4")
        g = await checkout(a, alice)
        rc = b.rid()
        b.server.handlers.dispatch(carol, Checkout(rc, "CADPRO", "2.1", 60))
        await settle(b)
        now[0] += 1.0
        b.server.handlers.dispatch(dave, Checkout(b.rid(), "CADPRO", "2.1", 60))
        await settle(b)
        leases = b.server.leases
        (wc,), (wd,) = carol.waiters or {}, dave.waiters or {}
        assert leases.cluster_queue == {_pool(b): [wc, wd]}
        a.send(alice, Checkin(a.rid(), g["token"]))
        await settle(a)
        await node(b).refresh_view()  # b sees the seat free...
        ge = await checkout(a, erin)  # ...and a grants it first
        assert ge["op"] == "granted"
        leases.serve_cluster()
        await settle(b)
        assert b.replies(carol) == [] and b.replies(dave) == []
        (wc2,) = carol.waiters or {}
        assert leases.cluster_queue == {_pool(b): [wc2, wd]}  # carol back at the head, ahead of dave
        a.send(erin, Checkin(a.rid(), ge["token"]))
        await settle(a)
        await node(b).refresh_view()
        leases.serve_cluster()
        got = await answer(b, carol)
        assert (got["op"], got["id"]) == ("granted", rc)
        assert b.replies(dave) == [] and leases.cluster_queue == {_pool(b): [wd]}

    run(tmp_path, vendor, etcd, body, clock=lambda: now[0])


def test_a_local_waiter_served_by_a_checkin_is_granted_through_etcd(tmp_path: Path, vendor: Vendor,
                                                                    etcd: EtcdCluster) -> None:
    now = [1000.0]

    async def body(c: Cluster) -> None:
        (a,) = c.rigs
        alice, bob = a.connect("alice", "pc1"), a.connect("bob", "pc2")
        g = await checkout(a, alice)
        rb = a.rid()
        a.server.handlers.dispatch(bob, Checkout(rb, "CADPRO", "2.1", 60))
        a.server.outbox.flush()
        assert [w.user for w in a.server.ledger.waiting(_pool(a))] == ["bob"]
        now[0] += 3.0
        a.server.handlers.dispatch(alice, Checkin(a.rid(), g["token"]))
        a.server.outbox.flush()
        (ack,) = a.replies(alice)
        assert ack["op"] == "checked_in"
        await settle(a)
        replies = a.replies(bob)
        if not replies:  # etcd had not freed alice's slot when bob's claim was sent: he waits cluster-wide for it
            await node(a).refresh_view()
            a.server.leases.serve_cluster()
            replies = [await answer(a, bob)]
        (got,) = replies
        assert (got["op"], got["id"], got["waited"]) == ("granted", rb, 3.0)
        assert [s["user"] for s in c.seats()] == ["bob"]

    run(tmp_path, vendor, etcd, body, nodes=1, clock=lambda: now[0])


def test_serve_cluster_without_a_cluster_store_does_nothing(tmp_path: Path, vendor: Vendor) -> None:
    from daemon_rig import run as run_single

    async def body(rig: Rig) -> None:
        alice, bob = rig.connect("alice", "pc1"), rig.connect("bob", "pc2")
        g = rig.checkout(alice)
        rig.server.handlers.dispatch(bob, Checkout(rig.rid(), "CADPRO", "2.1", 60))
        assert rig.server.leases.cluster is None
        rig.server.leases.serve_cluster()
        rig.server.outbox.flush()
        assert rig.replies(bob) == [] and len(rig.server.leases.waits) == 1 and g["op"] == "granted"

    run_single(tmp_path, vendor, body)


def test_a_cluster_wide_wait_without_sharing_gets_a_seat_of_its_own(tmp_path: Path, vendor: Vendor,
                                                                    etcd: EtcdCluster) -> None:
    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice, carol = a.connect("alice", "pc1"), b.connect("carol", "pc3")
        g = await checkout(a, alice)
        b.server.handlers.dispatch(carol, Checkout(b.rid(), "CADPRO", "2.1", 60))
        await settle(b)
        (ctx,) = b.server.leases.waits.values()
        assert ctx.share_key == ()  # not the refused tentative lease's own token
        a.send(alice, Checkin(a.rid(), g["token"]))
        await settle(a)
        await node(b).refresh_view()
        b.server.leases.serve_cluster()
        got = await answer(b, carol)
        lease = b.server.ledger.get(got["token"])
        assert lease is not None and lease.share_key == (got["token"],)
        (seat,) = c.seats()
        assert seat["share_key"] == [got["token"]]

    run(tmp_path, vendor, etcd, body, share="none")


def test_waiters_that_left_are_skipped_and_the_next_one_served(tmp_path: Path, vendor: Vendor,
                                                               etcd: EtcdCluster) -> None:
    now = [1000.0]

    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice = a.connect("alice", "pc1")
        carol, dave, erin = b.connect("carol", "pc3"), b.connect("dave", "pc4"), b.connect("erin", "pc5")
        g = await checkout(a, alice)
        rids = {}
        for s in (carol, dave, erin):
            rids[s.who()] = b.rid()
            b.server.handlers.dispatch(s, Checkout(rids[s.who()], "CADPRO", "2.1", 60))
            await settle(b)
            now[0] += 1.0
        leases = b.server.leases
        assert len(leases.cluster_queue[_pool(b)]) == 3
        b.server.leases.drop_waits(carol)  # carol's connection closed: her waits are forgotten
        t = dave.transport
        assert isinstance(t, RecordingTransport)
        t.closed = True  # dave's is closing (its drop_waits not run yet)
        a.send(alice, Checkin(a.rid(), g["token"]))
        await settle(a)
        await node(b).refresh_view()
        leases.serve_cluster()
        got = await answer(b, erin)
        assert (got["op"], got["id"]) == ("granted", rids[erin.who()])
        assert t.replies() == [] and b.replies(carol) == []
        assert leases.cluster_queue == {} and [s["user"] for s in c.seats()] == ["erin"]

    run(tmp_path, vendor, etcd, body, clock=lambda: now[0])


def test_a_checkout_with_a_wait_whose_client_left_is_not_queued(tmp_path: Path, vendor: Vendor,
                                                                etcd: EtcdCluster) -> None:
    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice, carol = a.connect("alice", "pc1"), b.connect("carol", "pc3")
        await checkout(a, alice)
        b.server.handlers.dispatch(carol, Checkout(b.rid(), "CADPRO", "2.1", 60))
        t = carol.transport
        assert isinstance(t, RecordingTransport)
        t.closed = True
        await settle(b)
        assert b.server.leases.waits == {} and b.server.leases.cluster_queue == {} and carol.waiters is None
        assert b.server.counters.denied == {ErrorCode.NO_SEATS: 1} and b.server.ledger.in_use(_pool(b)) == 0

    run(tmp_path, vendor, etcd, body)


def test_the_cluster_wait_timer_is_set_for_what_is_left_of_the_wait(tmp_path: Path, vendor: Vendor,
                                                                    etcd: EtcdCluster) -> None:
    now = [1000.0]

    async def body(c: Cluster) -> None:
        a, b = c.rigs
        alice, carol = a.connect("alice", "pc1"), b.connect("carol", "pc3")
        await checkout(a, alice)
        loop = asyncio.get_running_loop()
        before = loop.time()
        b.server.handlers.dispatch(carol, Checkout(b.rid(), "CADPRO", "2.1", 30))
        await settle(b)
        after = loop.time()
        (ctx,) = b.server.leases.waits.values()
        assert ctx.timer is not None
        when = ctx.timer.when()  # type: ignore[attr-defined]
        # The server's clock stood still while etcd decided: the timer is the whole 30 s from its setting.
        assert before + 30 <= when <= after + 30

    run(tmp_path, vendor, etcd, body, clock=lambda: now[0])


def test_a_seat_recorded_without_an_owner_is_adopted_by_its_user_and_host(tmp_path: Path, vendor: Vendor,
                                                                          etcd: EtcdCluster) -> None:
    from lmgrd.core.ledger import LeaseRecord

    async def body(c: Cluster) -> None:
        a, b = c.rigs
        token = "ab" * 16
        # A seat whose record names no owner (written before leases were bound to their holder's secret).
        rec = LeaseRecord(token, _pool(a)[0], "CADPRO", ("alice", "pc1"), "alice", "pc1", 4242, "2.1", ":0",
                          time.time())
        assert await node(a).acquire(rec, 1, 999, rec.share_key)
        for user, host in (("alice", "pc9"), ("mallory", "pc1")):  # the same user elsewhere, another user here
            s = b.connect(user, host)
            b.server.handlers.dispatch(s, Resume(b.rid(), (token,)))
            r = await answer(b, s)
            assert r["resumed"] == [] and [x["code"] for x in r["lost"]] == [ErrorCode.LEASE_NOT_FOUND]
        assert b.server.timer is None and b.server.ledger.get(token) is None  # nothing adopted
        alice_b = b.connect("alice", "pc1")
        b.server.handlers.dispatch(alice_b, Resume(b.rid(), (token,)))
        r = await answer(b, alice_b)
        assert r["resumed"] == [token] and r["lost"] == []
        assert b.server.timer is not None  # the adopted lease's expiry is armed
        assert [s["node"] for s in c.seats()] == ["n2"]

    run(tmp_path, vendor, etcd, body)

