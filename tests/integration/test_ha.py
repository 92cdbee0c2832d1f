"""High availability on etcd (issue 11): real etcd members and real lmgrd nodes, all on 127.0.0.1.

Every test replays the seat keys with a watch from revision 1 (``SeatOracle``) and asserts the live set of a
pool never exceeded its count at any revision. etcd members and lmgrd nodes are subprocesses stopped by PID.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client_stub.aio import AsyncLicenseClient, AsyncSeat
from client_stub.errors import LicenseError
from tests.etcd_cluster import BlackholeProxy, EtcdCluster, NetNamespace, SeatOracle
from tests.harness import Daemon, write_keys, write_license

pytestmark = pytest.mark.timeout(120)

PRODUCT, VERSION = "CADPRO", "2.1"


class HA:
    """One license served by several lmgrd nodes (``--store etcd``) on one etcd cluster."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key, self.pub = write_keys(tmp / "vendor")
        self.clusters: list[EtcdCluster] = []
        self.nodes: list[Daemon] = []
        self.proxies: list[BlackholeProxy] = []
        self.oracles: list[SeatOracle] = []
        self.lic = tmp / "site.lic"

    def license(self, count: int) -> None:
        self.customer = write_license(self.lic, self.key, ((PRODUCT, VERSION, count),)).customer_id

    def etcd(self, n: int) -> EtcdCluster:
        c = EtcdCluster(self.tmp / f"etcd{len(self.clusters)}", n).start()
        self.clusters.append(c)
        return c

    def oracle(self, etcd: EtcdCluster) -> SeatOracle:
        o = SeatOracle(etcd).start()
        self.oracles.append(o)
        return o

    def node(self, name: str, endpoints: str, *, lease_timeout: float = 6.0) -> Daemon:
        work = self.tmp / f"node-{name}"
        work.mkdir()
        d = Daemon(work, [self.lic], self.pub, lease_timeout=lease_timeout,
                   extra=["--store", "etcd", "--etcd-endpoints", endpoints, "--node-name", name,
                          "--etcd-timeout", "2", "--metrics-port", "auto"])
        self.nodes.append(d)
        return d.start()

    def proxy(self, port: int) -> BlackholeProxy:
        p = BlackholeProxy(port)
        self.proxies.append(p)
        return p

    def close(self) -> None:
        for o in self.oracles:  # stopped by the test when it passes; here when it failed early
            o.stop(settle=0)
        for d in self.nodes:
            if d.proc is not None and d.proc.poll() is None:
                d.kill()
        for p in self.proxies:
            p.close()
        for c in self.clusters:
            c.stop()


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[HA]:
    h = HA(tmp_path)
    try:
        yield h
    finally:
        h.close()


def no_seats_left(etcd: EtcdCluster, within: float = 5.0) -> bool:
    """True once etcd holds no seat key (releases are sent right after the checkin reply), polled boundedly."""
    deadline = time.monotonic() + within
    while "/seats/" in etcd.ctl("get", "--prefix", "/lmgrd/c/", "--keys-only"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def client(server: str, user: str, **kw: Any) -> AsyncLicenseClient:
    return AsyncLicenseClient(server, user=user, connect_timeout=2.0, request_timeout=5.0, **kw)


async def try_checkout(cl: AsyncLicenseClient, wait: float = 0.0) -> AsyncSeat | LicenseError:
    try:
        return await cl.checkout(PRODUCT, VERSION, wait)
    except LicenseError as exc:
        return exc


def test_two_nodes_race_for_the_last_seats_never_over_allocate(ha: HA) -> None:
    count = 5
    ha.license(count)
    etcd = ha.etcd(3)
    oracle = ha.oracle(etcd)
    a = ha.node("a", etcd.endpoints)
    b = ha.node("b", etcd.endpoints)

    async def run() -> list[str]:
        clients = [client((a, b)[i % 2].address, f"user{i}") for i in range(20)]
        tokens: list[str] = []
        try:
            for rnd in range(4):
                results = await asyncio.gather(*(try_checkout(cl) for cl in clients))
                seats = [r for r in results if isinstance(r, AsyncSeat)]
                refused = [r for r in results if not isinstance(r, AsyncSeat)]
                assert all(getattr(r, "code", None) == "NO_SEATS" for r in refused), refused
                if rnd == 0:
                    assert len(seats) == count  # all free at first: exactly count of the 20 get one
                assert len(seats) <= count
                tokens += [s.token for s in seats]
                await asyncio.gather(*(s.checkin() for s in seats))
        finally:
            await asyncio.gather(*(cl.close() for cl in clients))
        return tokens

    tokens = asyncio.run(run())
    oracle.stop()
    rep = oracle.check(count)
    assert rep["max_live"] == {f"/lmgrd/c/{ha.customer}/seats/{PRODUCT}": count}
    assert set(tokens) <= rep["granted"]  # every seat a client got was a seat in etcd
    # Each grant's node is in the seat record; both nodes took part (granted, or were refused by etcd because
    # the other node had the seats: the cross-node race).
    nodes = {ev[3]["node"] for ev in oracle.events() if ev[1] == "PUT" and ev[3] is not None}
    assert nodes and nodes <= {"a", "b"}
    for d in (a, b):
        assert "OUT CADPRO" in d.log() or "cluster-wide: all seats in use" in d.log()
    assert "cluster-wide: all seats in use" in a.log() + b.log()
    assert no_seats_left(etcd)  # every checkin freed its seat


def test_sigkill_of_a_node_the_client_resumes_its_seat_on_the_other(ha: HA) -> None:
    ha.license(1)
    etcd = ha.etcd(1)
    oracle = ha.oracle(etcd)
    a = ha.node("a", etcd.endpoints)
    b = ha.node("b", etcd.endpoints)

    async def run() -> None:
        lost: list[Any] = []
        holder = client(f"{a.address},{b.address}", "holder", on_lost=lambda s, e: lost.append(e))
        rival = client(b.address, "rival")
        seat = await holder.checkout(PRODUCT, VERSION)
        a.kill()  # SIGKILL
        # While the holder moves to b, the rival keeps asking b for the only seat: never granted.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and "ADOPTED" not in b.log():
            r = await try_checkout(rival)
            assert not isinstance(r, AsyncSeat), "the rival got the seat of a client that was failing over"
            await asyncio.sleep(0.05)
        assert "ADOPTED" in b.log()
        await asyncio.sleep(b.lease_timeout + 0.5)  # longer than the lease timeout: b keeps the seat alive now
        assert seat.held and not lost
        r = await try_checkout(rival)
        assert not isinstance(r, AsyncSeat)
        await seat.checkin()
        for _ in range(40):  # the checkin's etcd delete is asynchronous: bounded retries
            r = await try_checkout(rival)
            if isinstance(r, AsyncSeat):
                break
            await asyncio.sleep(0.05)
        assert isinstance(r, AsyncSeat)
        await r.checkin()
        await holder.close()
        await rival.close()

    asyncio.run(run())
    oracle.stop()
    rep = oracle.check(1)
    # The holder's slot was deleted once only: by its checkin (no lapse during the failover).
    assert len(rep["deletes"]) == 2


def test_sigkill_of_the_etcd_leader_under_churn_loses_and_doubles_nothing(ha: HA) -> None:
    count = 4
    ha.license(count)
    etcd = ha.etcd(3)
    oracle = ha.oracle(etcd)
    # The lease timeout (6 s): held seats survive an election that a loaded machine may stretch to 2-3 s
    # (a node ends its seats after 2/3 of the lease timeout without a keepalive).
    a = ha.node("a", etcd.endpoints)
    b = ha.node("b", etcd.endpoints)
    done: list[float] = []
    errors: list[str] = []

    async def worker(i: int, stop: float) -> None:
        lost: list[Any] = []
        cl = client(f"{(a, b)[i % 2].address}", f"w{i}", on_lost=lambda s, e: lost.append(e))
        try:
            while time.monotonic() < stop:
                r = await try_checkout(cl)
                if isinstance(r, AsyncSeat):
                    await r.checkin()
                    done.append(time.monotonic())
                else:
                    if r.code not in ("NO_SEATS", "STORE_UNAVAILABLE"):
                        errors.append(f"{r.code}: {r}")
                    await asyncio.sleep(0.02)
        finally:
            await cl.close()
        errors.extend(str(e) for e in lost)

    async def run() -> float:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(worker(i, t0 + 9)) for i in range(8)]
        await asyncio.sleep(3)
        killed = time.monotonic()
        await asyncio.to_thread(etcd.leader().kill)
        await asyncio.gather(*tasks)
        return killed

    killed = asyncio.run(run())
    oracle.stop()
    oracle.check(count)
    assert not errors
    before = [t for t in done if t < killed]
    after = [t for t in done if t > killed]
    assert before and after, "churn did not resume after the leader was killed"
    gap = max(y - x for x, y in zip(sorted(done), sorted(done)[1:], strict=False))
    print(f"churn: {len(done)} cycles, longest pause {gap:.2f} s around the leader kill")
    assert no_seats_left(etcd)  # nothing leaked


def test_quorum_loss_refuses_fast_with_store_unavailable_then_resumes(ha: HA) -> None:
    ha.license(3)
    etcd = ha.etcd(3)
    oracle = ha.oracle(etcd)
    a = ha.node("a", etcd.endpoints)

    async def run() -> None:
        lost: list[Any] = []
        keeper = client(a.address, "keeper", on_lost=lambda s, e: lost.append(e))
        seat = await keeper.checkout(PRODUCT, VERSION)
        cl = client(a.address, "newcomer")
        leader = etcd.leader()
        down = [next(m for m in etcd.members if m is not leader), leader]
        for m in down:
            await asyncio.to_thread(m.kill)
        # New checkouts: refused with STORE_UNAVAILABLE, each well inside the client's request timeout.
        codes = []
        for _ in range(5):
            r = await try_checkout(cl)
            assert not isinstance(r, AsyncSeat)
            codes.append(r.code)
        assert set(codes) == {"STORE_UNAVAILABLE"}
        # The held seat keeps its heartbeats for at most the lease timeout (6 s here), then it is ended.
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.1)
        assert lost and lost[0].code == "STORE_UNAVAILABLE" and not seat.held
        # One member back: quorum (2 of 3) again, and service resumes by itself.
        down[0].start()
        got = None
        for _ in range(100):
            r = await try_checkout(cl)
            if isinstance(r, AsyncSeat):
                got = r
                break
            await asyncio.sleep(0.2)
        assert got is not None
        await got.checkin()
        await keeper.close()
        await cl.close()

    asyncio.run(run())
    oracle.stop()
    oracle.check(3)


def test_a_node_cut_off_from_etcd_stops_granting_the_other_goes_on(ha: HA) -> None:
    count = 3
    ha.license(count)
    etcd = ha.etcd(1)
    oracle = ha.oracle(etcd)
    proxy = ha.proxy(etcd.members[0].client_port)
    a = ha.node("a", proxy.endpoint)  # a reaches etcd only through the proxy
    b = ha.node("b", etcd.endpoints)

    async def run() -> None:
        lost: list[Any] = []
        ca = client(a.address, "on-a", on_lost=lambda s, e: lost.append(e))
        held_a = [await ca.checkout(PRODUCT, VERSION)]
        proxy.cut()
        cb = [client(b.address, f"on-b{i}") for i in range(count)]
        # a refuses new checkouts (its etcd calls time out: STORE_UNAVAILABLE), b goes on granting.
        newcomer = client(a.address, "new-on-a")
        r = await try_checkout(newcomer)
        assert not isinstance(r, AsyncSeat) and r.code == "STORE_UNAVAILABLE"
        await newcomer.close()
        got = [await try_checkout(c) for c in cb[:count - 1]]
        assert all(isinstance(s, AsyncSeat) for s in got)
        # The last seat is a's client's until a has been cut off long enough to end it (2/3 of the TTL) and
        # etcd lets it lapse (TTL): only then does b grant it.
        r = await try_checkout(cb[-1])
        assert not isinstance(r, AsyncSeat)
        last = None
        for _ in range(200):
            r = await try_checkout(cb[-1])
            if isinstance(r, AsyncSeat):
                last = r
                break
            await asyncio.sleep(0.1)
        assert last is not None
        assert lost and lost[0].code == "STORE_UNAVAILABLE" and not held_a[0].held
        proxy.heal()
        for s in [*got, last]:
            assert isinstance(s, AsyncSeat)
            await s.checkin()
        for c in [ca, *cb]:
            await c.close()

    asyncio.run(run())
    oracle.stop()
    oracle.check(count)


def lmutil(d: Daemon, *args: str) -> str:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", *args, "-c", d.address], capture_output=True,
                       text=True, timeout=30, env=d.env())
    assert r.returncode == 0, r.stderr
    return r.stdout


def http_get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_lmstat_metrics_and_healthz_show_the_cluster(ha: HA) -> None:
    ha.license(5)
    etcd = ha.etcd(1)
    a = ha.node("a", etcd.endpoints)
    b = ha.node("b", etcd.endpoints)
    url = a.metrics_url()

    async def run() -> None:
        ca, cb = client(a.address, "alice"), client(b.address, "bob")
        sa, sb = await ca.checkout(PRODUCT, VERSION), await cb.checkout(PRODUCT, VERSION)
        await asyncio.sleep(1.0)  # a reads the cluster view twice a second
        out = await asyncio.to_thread(lmutil, a, "lmstat", "-a")
        assert f"{a.port}@a,{b.port}@b" in out
        assert "  a: license server UP (MASTER)" in out and "  b: license server UP " in out
        assert "Total of 2 licenses in use" in out  # cluster-wide, not a's 1
        assert any(line.startswith("    alice ") and f"(a/{a.port} " in line for line in out.splitlines())
        assert any(line.startswith("    bob ") and f"(b/{a.port} " in line for line in out.splitlines())
        status, text = await asyncio.to_thread(http_get, url + "metrics")
        assert status == 200
        assert f'lmgrd_seats{{customer_id="{ha.customer}",product="{PRODUCT}",state="in_use"}} 2.0' in text
        assert f'lmgrd_cluster_seats{{customer_id="{ha.customer}",node="b",product="{PRODUCT}"}} 1.0' in text
        assert "lmgrd_store_up 1.0" in text
        assert 'lmgrd_store_request_duration_seconds_count{op="acquire"} 1.0' in text
        assert (await asyncio.to_thread(http_get, url + "healthz"))[0] == 200
        await sb.checkin()
        await cb.close()
        b.kill()  # its node key lapses with its etcd lease (TTL 6 s): then b is DOWN
        for _ in range(60):
            out = await asyncio.to_thread(lmutil, a, "lmstat")
            if "  b: license server DOWN" in out:
                break
            await asyncio.sleep(0.2)
        assert "  b: license server DOWN" in out
        etcd.stop()
        for _ in range(60):
            status, text = await asyncio.to_thread(http_get, url + "healthz")
            if status == 503:
                break
            await asyncio.sleep(0.2)
        assert status == 503 and "degraded" in text
        assert "lmgrd_store_up 0.0" in (await asyncio.to_thread(http_get, url + "metrics"))[1]
        await sa.checkin()
        await ca.close()

    asyncio.run(run())


def store_calls(d: Daemon, op: str) -> float:
    """How many etcd calls of kind ``op`` node ``d`` made (its ``lmgrd_store_request_duration_seconds`` count)."""
    status, text = http_get(d.metrics_url() + "metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(f'lmgrd_store_request_duration_seconds_count{{op="{op}"}} '):
            return float(line.split()[-1])
    return 0.0


def test_a_seat_freed_on_one_node_goes_to_the_waiters_of_the_other_in_order_by_the_watch(ha: HA) -> None:
    """Two checkouts wait on node a (the only seat is held through node b): b's client checks in, and etcd's
    watch (not a poll: a's reads of the whole view do not grow meanwhile) gives the seat to a's first waiter;
    when that one checks in, the second gets it."""
    ha.license(1)
    etcd = ha.etcd(1)
    oracle = ha.oracle(etcd)
    a = ha.node("a", etcd.endpoints)
    b = ha.node("b", etcd.endpoints)

    async def run() -> None:
        holder, w1, w2 = client(b.address, "holder"), client(a.address, "first"), client(a.address, "second")
        try:
            held = await holder.checkout(PRODUCT, VERSION)
            a.wait_for_log(r"etcd store is up")
            t1 = asyncio.create_task(try_checkout(w1, wait=60))
            await asyncio.to_thread(a.wait_for_log, r"QUEUED CADPRO 2\.1 for first@.*cluster-wide, position 1")
            t2 = asyncio.create_task(try_checkout(w2, wait=60))
            await asyncio.to_thread(a.wait_for_log, r"QUEUED CADPRO 2\.1 for second@.*cluster-wide, position 2")
            reads = await asyncio.to_thread(store_calls, a, "get")
            await held.checkin()
            s1 = await asyncio.wait_for(t1, 30)
            assert isinstance(s1, AsyncSeat), s1
            assert not t2.done()  # one seat: the second waiter is still waiting, in order
            assert await asyncio.to_thread(store_calls, a, "get") == reads  # the watch told a, not a poll
            await s1.checkin()
            s2 = await asyncio.wait_for(t2, 30)
            assert isinstance(s2, AsyncSeat), s2
            await s2.checkin()
        finally:
            await asyncio.gather(*(cl.close() for cl in (holder, w1, w2)))

    asyncio.run(run())
    oracle.stop()
    rep = oracle.check(1)
    assert len(rep["granted"]) == 3 and len(rep["deletes"]) == 3


class NsDaemon(Daemon):
    """lmgrd in its own network namespace with its own hostname: a separate host, as far as it can tell."""

    def __init__(self, ns: NetNamespace, hostname: str, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.ns = ns
        self.hostname = hostname

    def args(self) -> list[str]:
        a = super().args()
        a[a.index("--bind") + 1] = self.ns.ip
        return self.ns.prefix(self.hostname) + a

    @property
    def address(self) -> str:
        return f"{self.port}@{self.ns.ip}"


def test_nodes_on_separate_hosts_serve_an_ha_license_only_where_it_names_them(ha: HA) -> None:
    from datetime import UTC, datetime, timedelta

    from lmgrd.vendor.signing import sign_license
    from protocol.license import License, Product

    nss: list[NetNamespace] = []
    try:
        nss = [NetNamespace(i) for i in range(3)]
        etcd = EtcdCluster(ha.tmp / "etcd-ns", 1, also_listen=tuple(ns.host_ip for ns in nss)).start()
        ha.clusters.append(etcd)
        servers = (("lmnode1", nss[0].ip), ("lmnode2", nss[1].ip))
        lic = License(customer_id="CID-HAHA-HAHA-HAHA-HAHA", license_type="multi", customer="HA Test",
                      hostname=servers[0][0], ip=servers[0][1], products=((Product(PRODUCT, VERSION, 1)),),
                      issued_at=datetime.now(UTC) - timedelta(hours=25), expires=None, site_networks=(),
                      share="user_host", servers=servers)
        ha.lic.write_text(sign_license(lic, ha.key))
        nodes = []
        for i, host in enumerate(("lmnode1", "lmnode2", "intruder")):
            work = ha.tmp / f"ns-{host}"
            work.mkdir()
            d = NsDaemon(nss[i], host, work, [ha.lic], ha.pub, extra=[
                "--store", "etcd", "--etcd-endpoints", f"{nss[i].host_ip}:{etcd.members[0].client_port}",
                "--etcd-timeout", "2", "--metrics-port", "0"])
            ha.nodes.append(d)
            nodes.append(d.start())
        one, two, intruder = nodes
        intruder.wait_for_log(r"HA license for the servers lmnode1 \(\S+\), lmnode2 \(\S+\); this machine "
                              r"\(intruder")
        assert "is not one of them" not in one.log() + two.log()

        async def run() -> None:
            lost: list[Any] = []
            holder = client(f"{one.address},{two.address}", "holder", on_lost=lambda s, e: lost.append(e))
            seat = await holder.checkout(PRODUCT, VERSION)
            rogue = client(intruder.address, "rogue")
            r = await try_checkout(rogue)
            assert not isinstance(r, AsyncSeat)  # the intruder serves nothing: the license is not its own
            one.kill()
            for _ in range(100):
                if "ADOPTED" in two.log():
                    break
                await asyncio.sleep(0.1)
            assert "ADOPTED" in two.log() and seat.held and not lost
            rival = client(two.address, "rival")
            r = await try_checkout(rival)
            assert not isinstance(r, AsyncSeat) and r.code == "NO_SEATS"
            await seat.checkin()
            for c in (holder, rogue, rival):
                await c.close()

        asyncio.run(run())
    finally:
        ha.close()
        for ns in nss:
            ns.close()


def test_a_late_release_by_the_old_node_never_frees_the_seat_its_client_moved(ha: HA) -> None:
    from protocol import CheckedIn, Checkin, Checkout, Granted, Heartbeat, HeartbeatAck, Resume, Resumed

    ha.license(1)
    etcd = ha.etcd(1)
    oracle = ha.oracle(etcd)
    a = ha.node("a", etcd.endpoints)
    b = ha.node("b", etcd.endpoints)
    one = a.connect()
    one.hello(user="mover")
    granted = one.request(Checkout(one.id(), PRODUCT, VERSION, 0))
    assert isinstance(granted, Granted)
    one.close()  # a keeps the seat for the reconnect grace (2 s), then ends it: its release is late
    two = b.connect()
    two.hello(user="mover")
    resumed = two.request(Resume(two.id(), (granted.token,)))
    assert isinstance(resumed, Resumed) and resumed.resumed == (granted.token,)
    rival = b.connect()
    rival.hello(user="rival")
    deadline = time.monotonic() + 6  # longer than a's grace and lease timeout
    while time.monotonic() < deadline:
        ack = two.request(Heartbeat(two.id()))
        assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and not ack.lost
        assert not isinstance(rival.request(Checkout(rival.id(), PRODUCT, VERSION, 0)), Granted)
        time.sleep(0.3)
    a.wait_for_log(r"EXPIRED CADPRO 2\.1 of mover@")  # a did end its copy (and released in etcd: guarded)
    assert "/seats/" in etcd.ctl("get", "--prefix", "/lmgrd/c/", "--keys-only")
    done = two.request(Checkin(two.id(), granted.token))
    assert isinstance(done, CheckedIn) and done.released
    oracle.stop()
    rep = oracle.check(1)
    assert len(rep["deletes"]) == 1  # the slot was deleted once: by the checkin on b
    for c in (two, rival):
        c.close()


def test_batched_acquires_and_releases_fill_a_large_pool_exactly_even_when_one_lease_lapsed(ha: HA) -> None:
    """A pool larger than one transaction's candidates: concurrent acquires go to etcd in batches (one
    transaction, each acquire a nested one with its own compares), so are the releases. 60 acquires race for
    40 seats: exactly 40 get one, the other 20 are told the pool is full; one acquire's session lease was revoked
    behind the store's back, which fails its whole batch in etcd: the batch is sent again one by one and that
    acquire gets a new lease. Then every seat is released in batches, each guarded by its own revision."""
    from lmgrd.core.ledger import LeaseRecord
    from lmgrd.storage.etcd import MAX_CANDIDATES, EtcdSeats, EtcdSettings

    count = 40
    assert count > MAX_CANDIDATES  # the batched path (a small pool's acquire names every slot and goes alone)
    etcd = ha.etcd(1)
    oracle = ha.oracle(etcd)
    tokens = [f"{i:032x}" for i in range(60)]

    async def run() -> None:
        seats = EtcdSeats(EtcdSettings((etcd.members[0].endpoint,)), "n1", 10)
        await seats.connect({"node": "n1"})
        try:
            recs = [LeaseRecord(t, "CID", "P", (t,), f"u{i}", "h", 1, "1.0", "", time.time())
                    for i, t in enumerate(tokens)]
            for i in range(len(recs)):
                await seats._lease_for(i)
            rpc = seats._rpc
            leases = dict(seats.session_lease)
            await seats._lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=leases[7]), timeout=5)
            got = await asyncio.gather(*(seats.acquire(r, count, i, r.share_key) for i, r in enumerate(recs)))
            assert sum(got) == count
            assert max(seats.batch_sizes) > 1 and 1 in seats.batch_sizes  # batched; re-sent one by one
            # Only the acquire whose lease lapsed got a new one (the others of its batch kept theirs); the store
            # stayed up (a lapsed lease is the session's problem, not etcd's).
            assert seats.up
            assert seats.session_lease[7] != leases[7]
            assert {i: seats.session_lease[i] for i in leases if i != 7} == {i: v for i, v in leases.items() if i != 7}
            await seats.refresh_view()
            assert seats.held(("CID", "P")) == count
            before = dict(seats.batch_sizes)
            for r, ok in zip(recs, got, strict=True):
                if ok:
                    seats.release(r.token, "CID")
            while seats._releasing:
                await asyncio.gather(*list(seats._releasing))
            assert not seats.pending
            sent = sum(seats.batch_sizes.values()) - sum(before.values())
            assert sent < count  # fewer transactions than releases
            await seats.refresh_view()
            assert seats.held(("CID", "P")) == 0
        finally:
            await seats.close()

    asyncio.run(run())
    oracle.stop()
    rep = oracle.check(count)
    assert rep["max_live"] == {"/lmgrd/c/CID/seats/P": count}
    assert len(rep["granted"]) == count and len(rep["deletes"]) == count and not rep["live"]


def test_a_large_pool_fills_to_its_last_seat_under_concurrent_acquires(ha: HA) -> None:
    """As many concurrent acquires as a large pool has seats, on one node: every one gets a seat (the batches in
    flight and the next one never pick the same free slots, and a nearly full pool is searched slot by slot),
    and one more is told the pool is full."""
    from lmgrd.core.ledger import LeaseRecord
    from lmgrd.storage.etcd import EtcdSeats, EtcdSettings

    count = 300
    etcd = ha.etcd(1)
    oracle = ha.oracle(etcd)

    async def run() -> None:
        seats = EtcdSeats(EtcdSettings((etcd.members[0].endpoint,)), "n1", 10)
        await seats.connect({"node": "n1"})
        follow = asyncio.create_task(seats.follow(lambda: None))  # the cluster view, as a daemon keeps it
        try:
            while not seats.watching:
                await asyncio.sleep(0.01)
            recs = [LeaseRecord(f"{i:032x}", "CID", "P", (f"{i:032x}",), f"u{i}", "h", 1, "1.0", "", time.time())
                    for i in range(count + 1)]
            got = await asyncio.gather(*(seats.acquire(r, count, 0, r.share_key) for r in recs[:count]))
            assert all(got), f"{got.count(False)} of {count} acquires refused with seats free"
            assert not await seats.acquire(recs[count], count, 0, recs[count].share_key)
        finally:
            follow.cancel()
            await seats.close()

    asyncio.run(run())
    oracle.stop()
    rep = oracle.check(count)
    assert rep["max_live"] == {"/lmgrd/c/CID/seats/P": count} and len(rep["granted"]) == count


def test_two_nodes_racing_for_a_large_pool_fill_it_exactly_and_refuse_only_when_full(ha: HA) -> None:
    """More concurrent acquires than seats, from two nodes at once, into a pool too large to name every slot in
    one transaction: the pool fills to its last seat (an acquire is refused only once etcd shows it full, never
    because its picks kept losing races to the other node), and never beyond."""
    from lmgrd.core.ledger import LeaseRecord
    from lmgrd.storage.etcd import EtcdSeats, EtcdSettings

    count, each = 120, 100
    etcd = ha.etcd(1)
    oracle = ha.oracle(etcd)

    async def run() -> None:
        nodes = [EtcdSeats(EtcdSettings((etcd.members[0].endpoint,)), f"n{k}", 10) for k in (1, 2)]
        for n in nodes:
            await n.connect({"node": n.node})
        follows = [asyncio.create_task(n.follow(lambda: None)) for n in nodes]
        try:
            while not all(n.watching for n in nodes):
                await asyncio.sleep(0.01)
            recs = [[LeaseRecord(f"{k:02x}{i:030x}", "CID", "P", (f"{k:02x}{i:030x}",), f"u{i}", f"h{k}", 1, "1.0",
                                 "", time.time()) for i in range(each)] for k in range(2)]
            got = await asyncio.gather(*(n.acquire(r, count, 0, r.share_key) for n, rs in zip(nodes, recs, strict=True)
                                         for r in rs))
            assert got.count(True) == count, f"{got.count(True)} of {count} seats granted to {2 * each} acquires"
            await nodes[0].refresh_view()
            assert nodes[0].held(("CID", "P")) == count
        finally:
            for f in follows:
                f.cancel()
            for n in nodes:
                await n.close()

    asyncio.run(run())
    oracle.stop()
    rep = oracle.check(count)
    assert rep["max_live"] == {"/lmgrd/c/CID/seats/P": count} and len(rep["granted"]) == count


def test_tls_client_certificates_and_etcd_authentication(ha: HA) -> None:
    """etcd with TLS (client certificates required) and authentication on: the store connects with the CA,
    its certificate and the user's password; a wrong password is refused by etcd (the store is down)."""
    import datetime as dt
    import ipaddress
    import subprocess

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from lmgrd.cli import etcd_settings
    from lmgrd.config import build_config
    from lmgrd.core.ledger import LeaseRecord
    from lmgrd.storage.etcd import EtcdSeats, StoreUnavailable
    from tests.etcd_cluster import ETCDCTL, free_ports

    d = ha.tmp / "tls"
    d.mkdir()
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lmgrd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))

    def leaf(name: str, usage: x509.ObjectIdentifier, ip: str | None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if ip:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        (d / f"{name}.pem").write_bytes(b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        (d / f"{name}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf("server", ExtendedKeyUsageOID.SERVER_AUTH, "127.0.0.1")
    leaf("root", ExtendedKeyUsageOID.CLIENT_AUTH, None)  # etcdctl as root, to set up users
    leaf("lmgrd-node", ExtendedKeyUsageOID.CLIENT_AUTH, None)  # no etcd user of that name: the password counts
    cport, pport = free_ports(2)
    with open(d / "etcd.log", "wb") as log:
        proc = subprocess.Popen([
            "etcd", "--name", "tls", "--data-dir", str(d / "data"), "--listen-client-urls", f"https://127.0.0.1:{cport}",
            "--advertise-client-urls", f"https://127.0.0.1:{cport}", "--listen-peer-urls", f"http://127.0.0.1:{pport}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}", "--initial-cluster",
            f"tls=http://127.0.0.1:{pport}", "--cert-file", str(d / "server.pem"), "--key-file",
            str(d / "server-key.pem"), "--trusted-ca-file", str(d / "ca.pem"), "--client-cert-auth",
            "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000"], stdout=log, stderr=log)
    try:
        ctl = [ETCDCTL, "--endpoints", f"127.0.0.1:{cport}", "--cacert", str(d / "ca.pem"), "--cert",
               str(d / "root.pem"), "--key", str(d / "root-key.pem"), "--command-timeout=3s"]
        for _ in range(100):
            if subprocess.run([*ctl, "endpoint", "health"], capture_output=True, timeout=10).returncode == 0:
                break
            time.sleep(0.1)
        for cmd in (["user", "add", "root:rootpw"], ["user", "add", "lmgrd:s3cret"], ["role", "add", "lmgrd"],
                    ["role", "grant-permission", "lmgrd", "--prefix=true", "readwrite", "/lmgrd/"],
                    ["user", "grant-role", "lmgrd", "lmgrd"], ["auth", "enable"]):
            r = subprocess.run([*ctl, *cmd], capture_output=True, text=True, timeout=10)
            assert r.returncode == 0, r.stderr
        (d / "password").write_text("s3cret\n")
        (d / "wrong").write_text("guess\n")

        def settings(password_file: str) -> Any:
            return etcd_settings(build_config({
                "licenses": ["x.lic"], "vendor_key": "v.pub", "store": "etcd", "etcd_endpoints": [f"127.0.0.1:{cport}"],
                "etcd_cacert": str(d / "ca.pem"), "etcd_cert": str(d / "lmgrd-node.pem"),
                "etcd_key": str(d / "lmgrd-node-key.pem"), "etcd_user": "lmgrd", "etcd_password_file": password_file,
            }, {}, "test"))

        async def run() -> None:
            good = EtcdSeats(settings(str(d / "password")), "n1", 10)
            await good.connect({"node": "n1"})
            assert good.up
            rec = LeaseRecord("t" * 32, "CID", "P", ("t" * 32,), "u", "h", 1, "1.0", "d", time.time())
            assert await good.acquire(rec, 2, 1, rec.share_key)
            await good.refresh_view()
            assert good.held(("CID", "P")) == 1
            bad = EtcdSeats(settings(str(d / "wrong")), "n2", 10)
            await bad.connect({"node": "n2"})
            assert not bad.up
            rec2 = LeaseRecord("s" * 32, "CID", "P", ("s" * 32,), "u", "h", 1, "1.0", "d", time.time())
            with pytest.raises(StoreUnavailable):
                await bad.acquire(rec2, 2, 1, rec2.share_key)
            await good.close()
            await bad.close()

        asyncio.run(run())
    finally:
        proc.kill()
        proc.wait(10)
