"""Stateful property test of the ledger and its journal (STYLE.md item 8).

Random interleavings of checkout (with or without waiting), checkin, heartbeat, time passing with
bounded expiry, disconnect, resume, waiter cancellation, count changes and daemon restarts (a fresh
Ledger restored from a reopened JournalStore, after a clean close or a simulated SIGKILL). A plain-dict
model predicts every answer; after every step the invariants below must hold. Every assertion here
MUST keep passing: each one is a way a seat could be granted twice or lost.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass

from harness import Holder
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lmgrd.core.ledger import LeaseInfo, Ledger, PoolKey, ShareMode, Waiter, share_key_for
from lmgrd.storage.journal import JournalStore, read_journal

T = 10.0  # lease timeout
MODES: dict[PoolKey, ShareMode] = {
    ("C1", "CAD"): ShareMode.USER_HOST,
    ("C1", "VIEW"): ShareMode.NONE,
    ("C2", "CAD"): ShareMode.HOST,
}
POOLS = sorted(MODES)
USERS = ("alice", "Bob", "carol")
HOSTS = ("pc1", "PC2.corp.example", "pc3")


@dataclass
class ModelLease:
    pool: PoolKey
    share_key: tuple[str, ...]
    session: int | None
    deadline: float


@dataclass
class ModelWaiter:
    pool: PoolKey
    share_key: tuple[str, ...]
    session: int


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="lmgrd-ledger-sm-")
        # Tiny compaction thresholds, so that compaction runs every few steps.
        self.store = JournalStore(self.dir, compact_min_records=6, compact_ratio=2)
        self.token_ids = itertools.count(1)  # survives restarts: tokens stay unique
        self.ledger = self.new_ledger()
        self.now = 100.0
        self.counts: dict[PoolKey, int] = {}
        self.caps: dict[PoolKey, int] = {}
        self.model: dict[str, ModelLease] = {}
        self.dead: list[str] = []  # released or expired tokens
        self.connected: list[int] = []
        self.session_ids = itertools.count(1)
        self.queues: dict[PoolKey, list[int]] = {pool: [] for pool in POOLS}
        self.waiters: dict[int, ModelWaiter] = {}
        self.waiter_ids = itertools.count(1)

    def new_ledger(self) -> Ledger:
        return Ledger(T, lambda: f"tok{next(self.token_ids):05d}")

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------------------

    def wall(self) -> float:
        return 1.7e9 + self.now

    def held(self, pool: PoolKey, key: tuple[str, ...]) -> bool:
        return any(m.pool == pool and m.share_key == key for m in self.model.values())

    def seats(self, pool: PoolKey) -> int:
        return len({m.share_key for m in self.model.values() if m.pool == pool})

    def add_lease(self, lease: LeaseInfo, pool: PoolKey, session: int | None) -> None:
        assert lease.token not in self.model
        assert lease.pool == pool and lease.session == session and lease.deadline == self.now + T
        self.model[lease.token] = ModelLease(pool, lease.share_key, session, lease.deadline)
        self.store.record_grant(lease.to_record())

    def drop_lease(self, token: str) -> None:
        del self.model[token]
        self.dead.append(token)
        self.store.record_release(token)

    def apply_grants(self, grants: list[tuple[Waiter, LeaseInfo]]) -> None:
        for w, lease in grants:
            mw = self.waiters.pop(w.waiter_id)
            queue = self.queues[mw.pool]
            new_seat = not self.held(mw.pool, lease.share_key)
            if new_seat:
                # First come, first served: a waiter that takes a new seat is the oldest one.
                assert queue[0] == w.waiter_id, (queue, w.waiter_id)
            elif mw.share_key:
                assert lease.share_key == mw.share_key
            event("waiter served" + (" (new seat)" if new_seat else " (joined)"))
            queue.remove(w.waiter_id)
            self.add_lease(lease, mw.pool, mw.session)

    # -- rules -----------------------------------------------------------------------------------------------

    @initialize(counts=st.lists(st.integers(1, 3), min_size=len(POOLS), max_size=len(POOLS)))
    def configure(self, counts: list[int]) -> None:
        for pool, count in zip(POOLS, counts, strict=True):
            self.ledger.set_pool(pool, count)
            self.counts[pool] = self.caps[pool] = count
        self.connected = [next(self.session_ids), next(self.session_ids)]

    @precondition(lambda self: len(self.connected) < 4)
    @rule()
    def connect(self) -> None:
        self.connected.append(next(self.session_ids))

    @precondition(lambda self: self.connected)
    @rule(
        requests=st.lists(
            st.tuples(
                st.sampled_from(POOLS),
                st.sampled_from(USERS),
                st.sampled_from(HOSTS),
                st.integers(0, 3),
                st.booleans(),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def checkout(self, requests: list[tuple[PoolKey, str, str, int, bool]]) -> None:
        """A few checkouts in one loop iteration (one flush), some willing to wait."""
        for pool, user, host, s, wait in requests:
            session = self.connected[s % len(self.connected)]
            key = share_key_for(MODES[pool], user, host)
            joinable = bool(key) and self.held(pool, key)
            free = not self.queues[pool] and self.seats(pool) < self.counts[pool]
            lease = self.ledger.checkout(pool, key, Holder(user, host, 1, ":0", session), "1.0", self.now, self.wall())
            if joinable or free:
                assert lease is not None
                assert lease.share_key == (key or (lease.token,))
                self.add_lease(lease, pool, session)
                continue
            assert lease is None
            event("checkout denied")
            if wait:
                wid = next(self.waiter_ids)
                w = Waiter(wid, pool, key, Holder(user, host, 1, ":0", session), "1.0", ctx=wid)
                assert self.ledger.enqueue(w) == len(self.queues[pool]) + 1
                self.queues[pool].append(wid)
                self.waiters[wid] = ModelWaiter(pool, key, session)
        self.commit()

    @precondition(lambda self: self.model)
    @rule(i=st.integers(0, 50))
    def checkin(self, i: int) -> None:
        self.release(sorted(self.model)[i % len(self.model)])

    @precondition(lambda self: any(self.queues[m.pool] for m in self.model.values()))
    @rule(i=st.integers(0, 50))
    def checkin_where_someone_waits(self, i: int) -> None:
        tokens = sorted(t for t, m in self.model.items() if self.queues[m.pool])
        self.release(tokens[i % len(tokens)])

    def release(self, token: str) -> None:
        if self.dead:  # a second checkin of a token is harmless
            assert self.ledger.release(self.dead[-1], self.now, self.wall()) == (None, [])
        lease, grants = self.ledger.release(token, self.now, self.wall())
        assert lease is not None and lease.token == token
        self.drop_lease(token)
        self.apply_grants(grants)
        self.commit()

    @precondition(lambda self: self.connected)
    @rule(s=st.integers(0, 3))
    def heartbeat(self, s: int) -> None:
        session = self.connected[s % len(self.connected)]
        mine = [m for m in self.model.values() if m.session == session]
        assert self.ledger.renew_session(session, self.now) == len(mine)
        for m in mine:
            m.deadline = self.now + T

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, 6.0, 11.0]), limit=st.integers(1, 4))
    def advance_and_expire(self, dt: float, limit: int) -> None:
        self.now += dt
        lapsed = {t for t, m in self.model.items() if m.deadline <= self.now}
        expired, grants = self.ledger.expire(self.now, self.wall(), limit)
        tokens = [x.token for x in expired]
        assert len(tokens) == len(set(tokens)) <= limit
        assert set(tokens) <= lapsed
        if len(tokens) < limit:
            assert set(tokens) == lapsed  # nothing due is left behind
        deadlines = [self.model[t].deadline for t in tokens]
        assert deadlines == sorted(deadlines)  # earliest first
        rest = [self.model[t].deadline for t in lapsed - set(tokens)]
        assert not rest or not deadlines or max(deadlines) <= min(rest)
        for t in tokens:
            self.drop_lease(t)
        if tokens:
            event(f"expired {len(tokens)} of limit {limit}")
        self.apply_grants(grants)
        self.commit()

    @precondition(lambda self: self.connected)
    @rule(s=st.integers(0, 3), grace=st.sampled_from([0.0, 2.0, 5.0, 20.0]))
    def disconnect(self, s: int, grace: float) -> None:
        session = self.connected[s % len(self.connected)]
        self.connected.remove(session)
        detached = self.ledger.detach_session(session, self.now, grace)
        mine = {t for t, m in self.model.items() if m.session == session}
        assert {x.token for x in detached} == mine
        for t in mine:
            m = self.model[t]
            m.session = None
            m.deadline = min(m.deadline, self.now + min(grace, T))
        for wid in [wid for wid, w in self.waiters.items() if w.session == session]:
            self.queues[self.waiters.pop(wid).pool].remove(wid)

    @precondition(lambda self: self.connected)
    @rule(i=st.integers(0, 50), s=st.integers(0, 3), known=st.booleans())
    def resume(self, i: int, s: int, known: bool) -> None:
        session = self.connected[s % len(self.connected)]
        before = {p: self.ledger.in_use(p) for p in POOLS}
        if known and self.model:
            token = sorted(self.model)[i % len(self.model)]
            lease = self.ledger.resume(token, session, self.now)
            assert lease is not None and lease.token == token
            self.model[token].session = session
            self.model[token].deadline = self.now + T
        else:
            token = self.dead[i % len(self.dead)] if self.dead else "tok-never"
            assert self.ledger.resume(token, session, self.now) is None
        assert before == {p: self.ledger.in_use(p) for p in POOLS}  # never a second seat

    @precondition(lambda self: self.waiters)
    @rule(i=st.integers(0, 50))
    def cancel_wait(self, i: int) -> None:
        assert self.ledger.cancel_wait(10**6) is False
        wid = sorted(self.waiters)[i % len(self.waiters)]
        assert self.ledger.cancel_wait(wid) is True
        self.queues[self.waiters.pop(wid).pool].remove(wid)

    @rule(pool=st.sampled_from(POOLS), count=st.integers(0, 4))
    def reconfigure(self, pool: PoolKey, count: int) -> None:
        self.ledger.set_pool(pool, count)
        self.counts[pool] = count
        self.apply_grants(self.ledger.serve(pool, self.now, self.wall()))
        self.commit()

    @rule(crash=st.booleans(), counts=st.lists(st.integers(0, 3), min_size=len(POOLS), max_size=len(POOLS)))
    def restart(self, crash: bool, counts: list[int]) -> None:
        if crash:
            # SIGKILL: no close(), no final flush or fsync; the kernel drops the descriptors and the lock.
            os.close(self.store._fd)
            os.close(self.store._lock_fd)
            self.store._closed = True
        else:
            self.store.close()
        self.store = JournalStore(self.dir, compact_min_records=6, compact_ratio=2)
        self.ledger = self.new_ledger()
        for pool, count in zip(POOLS, counts, strict=True):  # the license may have changed meanwhile
            self.ledger.set_pool(pool, count)
            self.counts[pool] = count
        restored = self.ledger.restore(self.store.load(), self.now)
        event(f"restart: {'crash' if crash else 'clean'}, over count: "
              f"{any(self.seats(p) > self.counts[p] for p in POOLS)}")
        assert {x.token for x in restored} == set(self.model)
        for m in self.model.values():
            m.session = None
            m.deadline = self.now + T
        self.connected.clear()
        self.waiters.clear()  # their connections went with the old process
        for queue in self.queues.values():
            queue.clear()

    def commit(self) -> None:
        self.store.flush()  # the daemon flushes once per loop iteration, before replying

    # -- invariants ------------------------------------------------------------------------------------------

    @invariant()
    def seats_never_exceed_the_count(self) -> None:
        for pool in self.counts:
            in_use = self.ledger.in_use(pool)
            assert in_use == self.seats(pool)
            # Above the count only if it already was (restore or a lowered count), never growing there.
            assert in_use <= max(self.counts[pool], self.caps[pool]), (pool, in_use, self.caps[pool])
            self.caps[pool] = max(self.counts[pool], in_use)

    @invariant()
    def no_lease_is_lost_or_invented(self) -> None:
        leases = {x.token: x for x in self.ledger.leases()}
        assert set(leases) == set(self.model)
        assert len(self.ledger) == len(self.model)
        for token, m in self.model.items():
            x = leases[token]
            assert (x.pool, x.share_key, x.session, x.deadline) == (m.pool, m.share_key, m.session, m.deadline)
            assert self.ledger.get(token) is x
        for session in self.connected:
            mine = {t for t, m in self.model.items() if m.session == session}
            assert {x.token for x in self.ledger.session_leases(session)} == mine
        deadlines = [m.deadline for m in self.model.values()]
        assert self.ledger.next_deadline() == (min(deadlines) if deadlines else None)

    @invariant()
    def the_store_holds_exactly_the_ledger(self) -> None:
        want = sorted((x.to_record() for x in self.ledger.leases()), key=lambda r: r.token)
        assert sorted(self.store.load(), key=lambda r: r.token) == want
        assert sorted(read_journal(self.store.path), key=lambda r: r.token) == want  # on disk, flushed

    @invariant()
    def waiters_queue_in_arrival_order_and_only_when_needed(self) -> None:
        for pool in self.counts:
            queue = self.queues[pool]
            assert self.ledger.queued(pool) == len(queue)
            assert [w.waiter_id for w in self.ledger.waiting(pool)] == queue
            if queue:
                # Nobody waits while a seat is free or while their seat is held.
                assert self.ledger.in_use(pool) >= self.counts[pool]
                assert not any(self.waiters[wid].share_key and self.held(pool, self.waiters[wid].share_key)
                               for wid in queue)  # fmt: skip


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestLedgerProperties = LedgerMachine.TestCase
