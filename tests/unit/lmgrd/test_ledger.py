"""Examples for the seat ledger: sharing, waiters, sessions, expiry and restore."""

from __future__ import annotations

import itertools

import pytest
from harness import Holder

from lmgrd.core.ledger import (
    LeaseInfo,
    LeaseRecord,
    Ledger,
    PoolKey,
    ShareMode,
    UnknownPoolError,
    Waiter,
    share_key_for,
)

POOL: PoolKey = ("C1", "CADPRO")
OTHER: PoolKey = ("C1", "VIEWER")
T = 90.0


def make(count: int = 2, timeout: float = T) -> Ledger:
    counter = itertools.count(1)
    ledger = Ledger(timeout, lambda: f"tok{next(counter):04d}")
    ledger.set_pool(POOL, count)
    return ledger


def co(
    ledger: Ledger,
    user: str = "alice",
    host: str = "pc1",
    *,
    mode: ShareMode = ShareMode.USER_HOST,
    session: int | None = 1,
    now: float = 0.0,
    pool: PoolKey = POOL,
) -> LeaseInfo | None:
    key = share_key_for(mode, user, host)
    return ledger.checkout(pool, key, Holder(user, host, 100, ":0", session), "2.1", now, 1.7e9 + now)


def waiter(wid: int, user: str, host: str = "pc9", session: int = 9, pool: PoolKey = POOL) -> Waiter:
    key = share_key_for(ShareMode.USER_HOST, user, host)
    return Waiter(wid, pool, key, Holder(user, host, 200 + wid, ":0", session), "2.1", ctx=("req", wid))


def must(lease: LeaseInfo | None) -> LeaseInfo:
    assert lease is not None
    return lease


# -- sharing modes -----------------------------------------------------------------------------------------


def test_share_keys_compare_short_hostnames_and_users_case_insensitively() -> None:
    assert share_key_for(ShareMode.USER_HOST, "Alice", "PC1.corp.example") == ("alice", "pc1")
    assert share_key_for(ShareMode.HOST, "Alice", "PC1.corp.example") == ("pc1",)
    assert share_key_for(ShareMode.NONE, "Alice", "pc1") == ()


def test_user_host_processes_of_one_user_on_one_host_share_a_seat() -> None:
    ledger = make(count=1)
    a = must(co(ledger, "alice", "pc1"))
    b = must(co(ledger, "ALICE", "pc1.corp.example", session=2))
    assert a.token != b.token and a.share_key == b.share_key == ("alice", "pc1")
    assert ledger.in_use(POOL) == 1
    assert co(ledger, "bob", "pc1") is None  # another user needs another seat
    assert co(ledger, "alice", "pc2") is None  # the same user elsewhere too


def test_host_mode_shares_one_seat_per_host_whoever_the_user() -> None:
    ledger = make(count=1)
    must(co(ledger, "alice", "pc1", mode=ShareMode.HOST))
    must(co(ledger, "bob", "PC1", mode=ShareMode.HOST))
    assert ledger.in_use(POOL) == 1
    assert co(ledger, "alice", "pc2", mode=ShareMode.HOST) is None


def test_none_mode_gives_every_checkout_its_own_seat() -> None:
    ledger = make(count=2)
    a = must(co(ledger, mode=ShareMode.NONE))
    b = must(co(ledger, mode=ShareMode.NONE))
    assert a.share_key == (a.token,) and b.share_key == (b.token,)
    assert ledger.in_use(POOL) == 2
    assert co(ledger, mode=ShareMode.NONE) is None


def test_a_shared_seat_frees_only_with_its_last_lease() -> None:
    ledger = make(count=1)
    a = must(co(ledger))
    b = must(co(ledger, session=2))
    assert ledger.release(a.token, 1.0, 0.0) == (a, [])
    assert ledger.in_use(POOL) == 1 and co(ledger, "bob") is None
    ledger.release(b.token, 1.0, 0.0)
    assert ledger.in_use(POOL) == 0
    assert ledger.release(b.token, 1.0, 0.0) == (None, [])  # a second checkin is harmless
    must(co(ledger, "bob"))


def test_unknown_pool_is_a_clear_error() -> None:
    ledger = make()
    with pytest.raises(UnknownPoolError, match="set_pool"):
        co(ledger, pool=OTHER)
    with pytest.raises(ValueError, match="integer >= 0"):
        ledger.set_pool(OTHER, -1)


def test_a_repeated_token_from_the_factory_is_refused() -> None:
    ledger = Ledger(T, lambda: "same")
    ledger.set_pool(POOL, 5)
    must(co(ledger, "alice"))
    with pytest.raises(RuntimeError, match="already in use"):
        co(ledger, "bob")
    assert ledger.in_use(POOL) == 1


# -- waiters -----------------------------------------------------------------------------------------------


def test_waiters_are_served_first_come_first_served() -> None:
    ledger = make(count=1)
    holder = must(co(ledger, "alice"))
    assert [ledger.enqueue(waiter(i, u)) for i, u in ((1, "bob"), (2, "carol"), (3, "dave"))] == [1, 2, 3]
    assert ledger.queued(POOL) == 3
    _, grants = ledger.release(holder.token, 5.0, 1.7e9)
    assert [(w.waiter_id, lease.user, lease.session, lease.deadline) for w, lease in grants] == [
        (1, "bob", 9, 5.0 + T)
    ]
    assert grants[0][0].ctx == ("req", 1)
    assert ledger.queued(POOL) == 2 and ledger.in_use(POOL) == 1
    assert ledger.cancel_wait(2) is True and ledger.cancel_wait(2) is False
    _, grants = ledger.release(grants[0][1].token, 6.0, 1.7e9)
    assert [w.waiter_id for w, _ in grants] == [3]
    assert ledger.queued(POOL) == 0


def test_waiters_with_the_share_key_of_a_new_seat_join_it_at_once() -> None:
    ledger = make(count=1)
    holder = must(co(ledger, "alice"))
    ledger.enqueue(waiter(1, "bob", "pc2"))
    ledger.enqueue(waiter(2, "carol", "pc3"))
    ledger.enqueue(waiter(3, "bob", "pc2", session=10))
    _, grants = ledger.release(holder.token, 1.0, 0.0)
    assert [w.waiter_id for w, _ in grants] == [1, 3]
    assert ledger.in_use(POOL) == 1 and [w.waiter_id for w in ledger.waiting(POOL)] == [2]


def test_a_newcomer_never_overtakes_a_waiter() -> None:
    ledger = make(count=1)
    holder = must(co(ledger, "alice"))
    ledger.enqueue(waiter(1, "bob"))
    ledger.set_pool(POOL, 2)  # a seat frees by reconfiguration ...
    assert co(ledger, "carol") is None  # ... but the waiter is first in line
    assert must(co(ledger, "alice", session=3)).share_key == holder.share_key  # joining takes no seat
    grants = ledger.serve(POOL, 2.0, 0.0)
    assert [w.waiter_id for w, _ in grants] == [1] and ledger.in_use(POOL) == 2


def test_enqueue_refuses_what_checkout_would_grant_and_repeated_ids() -> None:
    ledger = make(count=1)
    with pytest.raises(ValueError, match="call checkout"):
        ledger.enqueue(waiter(1, "bob"))  # a seat is free
    must(co(ledger, "alice"))
    with pytest.raises(ValueError, match="call checkout"):
        ledger.enqueue(waiter(1, "alice", "pc1"))  # would join alice's seat
    ledger.enqueue(waiter(1, "bob"))
    with pytest.raises(ValueError, match="already queued"):
        ledger.enqueue(waiter(1, "carol"))


def test_cancelled_waiters_do_not_pile_up_in_the_queue() -> None:
    ledger = make(count=1)
    must(co(ledger, "alice"))
    for wid in range(1, 2001):
        ledger.enqueue(waiter(wid, f"u{wid}"))
        ledger.cancel_wait(wid)
    ledger.enqueue(waiter(5000, "last"))
    assert ledger.queued(POOL) == 1
    assert len(ledger._pools[POOL].queue) <= 2 * 1 + 64 + 1


# -- sessions ----------------------------------------------------------------------------------------------


def test_renew_session_extends_only_that_sessions_leases() -> None:
    ledger = make(count=3)
    a = must(co(ledger, "alice", session=1))
    b = must(co(ledger, "bob", session=2))
    assert ledger.renew_session(1, 50.0) == 1
    assert (a.deadline, b.deadline) == (50.0 + T, T)
    assert ledger.renew_session(99, 50.0) == 0
    assert ledger.next_deadline() == T


def test_detach_keeps_seats_for_the_grace_never_longer_than_the_lease_timeout() -> None:
    ledger = make(count=3)
    a = must(co(ledger, "alice", session=1, now=0.0))
    b = must(co(ledger, "bob", session=1, now=80.0))
    detached = ledger.detach_session(1, 85.0, grace=30.0)
    assert {lease.token for lease in detached} == {a.token, b.token}
    # a already lapses at 90 (grace cannot extend it); b is cut to 85 + 30 instead of 170
    assert (a.deadline, b.deadline) == (T, 115.0)
    assert a.session is None and b.session is None and ledger.session_leases(1) == []
    assert ledger.renew_session(1, 86.0) == 0  # heartbeats on the old session renew nothing
    huge = must(co(ledger, "carol", session=2, now=100.0))
    ledger.detach_session(2, 100.0, grace=1e9)
    assert huge.deadline == 100.0 + T  # the grace is capped at the lease timeout


def test_detach_that_moves_a_deadline_earlier_expires_the_lease_on_time() -> None:
    ledger = make(count=1)
    a = must(co(ledger, now=0.0))
    ledger.detach_session(1, 1.0, grace=5.0)
    assert ledger.next_deadline() == 6.0
    assert ledger.expire(5.9, 0.0) == ([], [])
    assert ledger.expire(6.0, 0.0) == ([a], [])
    assert ledger.in_use(POOL) == 0 and ledger.next_deadline() is None


def test_detach_drops_the_sessions_waiters_only() -> None:
    ledger = make(count=1)
    holder = must(co(ledger, "alice", session=1))
    ledger.enqueue(waiter(1, "bob", session=7))
    ledger.enqueue(waiter(2, "carol", session=8))
    ledger.detach_session(7, 1.0, 10.0)
    assert [w.waiter_id for w in ledger.waiting(POOL)] == [2]
    _, grants = ledger.release(holder.token, 2.0, 0.0)
    assert [w.waiter_id for w, _ in grants] == [2]


def test_resume_is_idempotent_and_never_takes_a_second_seat() -> None:
    ledger = make(count=1)
    a = must(co(ledger, "alice", session=1))
    ledger.detach_session(1, 10.0, grace=5.0)
    for now in (12.0, 13.0):
        assert ledger.resume(a.token, 2, now) is a
        assert ledger.in_use(POOL) == 1 and len(ledger) == 1
        assert a.session == 2 and a.deadline == now + T
    assert ledger.session_leases(2) == [a]
    assert ledger.resume(a.token, 3, 14.0) is a  # the token proves ownership: the lease moves
    assert ledger.session_leases(2) == [] and ledger.session_leases(3) == [a]
    assert ledger.expire(15.0 + 5.0, 0.0) == ([], [])  # the detach grace no longer applies
    assert ledger.resume("nope", 3, 15.0) is None


def test_resume_after_expiry_finds_nothing() -> None:
    ledger = make(count=1)
    a = must(co(ledger))
    ledger.detach_session(1, 0.0, grace=1.0)
    assert ledger.expire(1.0, 0.0)[0] == [a]
    assert ledger.resume(a.token, 2, 1.5) is None
    assert ledger.in_use(POOL) == 0


# -- expiry ------------------------------------------------------------------------------------------------


def test_expiry_returns_lapsed_leases_in_deadline_order() -> None:
    ledger = make(count=10)
    must(co(ledger, "a", session=1, now=0.0))
    b = must(co(ledger, "b", session=2, now=1.0))
    c = must(co(ledger, "c", session=3, now=2.0))
    ledger.renew_session(1, 3.0)  # a now lapses last, though its heap entry is still the first
    assert ledger.next_deadline() == 1.0 + T
    assert ledger.expire(1.0 + T - 0.001, 0.0) == ([], [])
    expired, _ = ledger.expire(1000.0, 0.0)
    assert [x.user for x in expired] == ["b", "c", "a"]
    assert [x.deadline for x in expired] == [1.0 + T, 2.0 + T, 3.0 + T]
    assert b.session == 2  # the lease still names its session, so the daemon can tell that client
    assert ledger.next_deadline() is None and ledger.in_use(POOL) == 0 and len(c.token) > 0


def test_expiry_is_bounded_per_call() -> None:
    ledger = make(count=10)
    tokens = [must(co(ledger, f"u{i}")).token for i in range(5)]
    batches = []
    for _ in range(10):  # bounded loop
        expired, _ = ledger.expire(T, 0.0, limit=2)
        if not expired:
            break
        batches.append([x.token for x in expired])
        if len(expired) == 2:
            assert (ledger.next_deadline() or 0.0) <= T  # more may be due
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [t for b in batches for t in b] == tokens  # equal deadlines: grant order


def test_expiry_hands_freed_seats_to_waiters() -> None:
    ledger = make(count=1)
    a = must(co(ledger, "alice", now=0.0))
    ledger.enqueue(waiter(1, "bob"))
    expired, grants = ledger.expire(T, 1.7e9)
    assert expired == [a]
    assert [(w.waiter_id, lease.deadline, lease.granted_at) for w, lease in grants] == [(1, 2 * T, 1.7e9)]


def test_the_expiry_heap_stays_proportional_to_the_leases() -> None:
    ledger = make(count=5)
    keep = must(co(ledger, "keeper"))
    for i in range(20_000):  # churn: every release leaves a stale heap entry behind
        lease = must(co(ledger, f"u{i % 3}", now=float(i)))
        ledger.release(lease.token, float(i), 0.0)
        ledger.renew_session(1, float(i))
        if i % 7 == 0:
            ledger.detach_session(1, float(i), 1.0)
            ledger.resume(keep.token, 1, float(i))
    assert len(ledger._heap) <= 2 * len(ledger) + 1024
    assert ledger.next_deadline() == keep.deadline


# -- pools and restore -------------------------------------------------------------------------------------


def test_lowering_a_count_keeps_every_lease_but_grants_no_new_seat_until_below_it() -> None:
    ledger = make(count=3)
    a, b, c = (must(co(ledger, u)) for u in ("a", "b", "c"))
    ledger.set_pool(POOL, 1)
    assert ledger.in_use(POOL) == 3 and ledger.count(POOL) == 1
    assert co(ledger, "d") is None
    must(co(ledger, "a", session=5))  # joining a held seat is still fine
    ledger.release(b.token, 1.0, 0.0)
    ledger.release(c.token, 1.0, 0.0)
    assert ledger.in_use(POOL) == 1 and co(ledger, "d") is None
    assert len(a.token) > 0


def test_remove_pool_returns_its_leases_and_waiters() -> None:
    ledger = make(count=1)
    a = must(co(ledger, "alice", session=1))
    w = waiter(1, "bob")
    ledger.enqueue(w)
    leases, waiters = ledger.remove_pool(POOL)
    assert leases == [a] and waiters == [w]
    assert len(ledger) == 0 and ledger.session_leases(1) == [] and ledger.cancel_wait(1) is False
    assert ledger.next_deadline() is None
    assert ledger.remove_pool(POOL) == ([], [])


def record(token: str, user: str, pool: PoolKey = POOL) -> LeaseRecord:
    return LeaseRecord(token, pool[0], pool[1], (user, "pc1"), user, "pc1", 7, "2.1", ":0", 1.6e9)


def test_restore_brings_every_lease_back_unbound_even_over_the_count() -> None:
    ledger = make(count=2)
    recs = [record("r1", "a"), record("r2", "b"), record("r3", "c"), record("r4", "a")]
    restored = ledger.restore(recs, now=500.0)
    assert [x.token for x in restored] == ["r1", "r2", "r3", "r4"]
    assert all(x.session is None and x.deadline == 500.0 + T for x in restored)
    assert ledger.in_use(POOL) == 3 and len(ledger) == 4  # r1 and r4 share a's seat
    assert co(ledger, "d") is None  # over the count: no new seat
    joined = must(co(ledger, "b"))  # but joining a held seat works
    assert joined.share_key == ("b", "pc1") and ledger.in_use(POOL) == 3
    assert [x.to_record() for x in ledger.leases(POOL)][:4] == recs
    ledger.release("r3", 501.0, 0.0)
    ledger.release("r2", 501.0, 0.0)
    assert ledger.in_use(POOL) == 2 and co(ledger, "d") is None  # b's seat lives on in the join
    ledger.release(joined.token, 501.0, 0.0)
    assert must(co(ledger, "d", now=501.0)).share_key == ("d", "pc1")  # 1 seat held of 2: a new one fits
    expired, _ = ledger.expire(500.0 + T, 0.0)
    assert {x.token for x in expired} == {"r1", "r4"}  # nobody resumed them


def test_restore_keeps_leases_of_a_pool_no_longer_configured_at_count_zero() -> None:
    ledger = make(count=2)
    ledger.restore([record("r1", "a", OTHER)], now=0.0)
    assert ledger.count(OTHER) == 0 and ledger.in_use(OTHER) == 1
    assert co(ledger, "z", pool=OTHER) is None


def test_restore_refuses_repeated_tokens_and_restores_nothing() -> None:
    ledger = make(count=2)
    with pytest.raises(ValueError, match="twice"):
        ledger.restore([record("r1", "a"), record("r1", "b")], now=0.0)
    assert len(ledger) == 0 and ledger.in_use(POOL) == 0
    must(co(ledger))
    with pytest.raises(ValueError, match="twice"):
        ledger.restore([record("tok0001", "a")], now=0.0)


def test_lease_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="lease_timeout"):
        Ledger(0.0, lambda: "x")
