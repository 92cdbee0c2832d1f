"""Usage policy: parsing (every problem named by key path) and the ledger's reserve/max enforcement."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from harness import Holder
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmgrd.core.ledger import LeaseInfo, LeaseRecord, Ledger, PoolKey, ShareMode, Waiter, share_key_for
from lmgrd.core.policy import MIN_IDLE_TIMEOUT, ProductPolicy, parse_policy

POOL: PoolKey = ("C1", "CADPRO")

CONFIG: dict[str, Any] = {
    "groups": {"designers": ["alice", "Bob"]},
    "host_groups": {"lab": ["lab-pc1", "LAB-PC2.corp.example"]},
    "policy": {
        "CADPRO": {
            "reserve": [{"seats": 2, "group": "designers"}],
            "max": [{"seats": 1, "host_group": "lab"}, {"seats": 2, "user": "carol"}],
            "include": [{"group": "designers"}, {"user": "carol"}, {"host_group": "lab"}, {"user": "dave"}],
            "exclude": [{"user": "dave"}],
            "timeout": 3600,
        }
    },
}


def policy(cfg: dict[str, Any] = CONFIG) -> ProductPolicy:
    pol, problems = parse_policy(cfg)
    assert problems == []
    pp = pol.get("CADPRO")
    assert pp is not None
    return pp


_TOKENS = itertools.count(1)


def make(count: int, pp: ProductPolicy | None) -> Ledger:
    ledger = Ledger(90.0, lambda: f"tok{next(_TOKENS):06d}")
    ledger.set_pool(POOL, count)
    ledger.set_policy(POOL, pp)
    return ledger


def co(ledger: Ledger, user: str, host: str = "pc1", session: int = 1) -> LeaseInfo | None:
    key = share_key_for(ShareMode.USER_HOST, user, host)
    return ledger.checkout(POOL, key, Holder(user, host, 100, host, session), "2.1", 0.0, 1.7e9)


def waiter(wid: int, user: str, host: str = "pc9") -> Waiter:
    return Waiter(wid, POOL, share_key_for(ShareMode.USER_HOST, user, host), Holder(user, host, wid, host, 9), "2.1")


# -- parsing -------------------------------------------------------------------------------------------------


def test_a_valid_policy_resolves_groups_case_insensitively() -> None:
    pp = policy()
    assert pp.reserved_total == 2 and pp.timeout == 3600.0
    assert pp.reserve[0].subject.matches("BOB", "anywhere")
    assert pp.max[0].subject.matches("x", "lab-pc2")  # host groups compare short host names
    assert pp.refusal("alice", "pc1") is None
    assert pp.refusal("dave", "pc1") is not None and "excluded" in str(pp.refusal("dave", "pc1"))  # exclude wins
    not_included = pp.refusal("erin", "pc1")
    assert not_included is not None and "include list" in not_included


def test_every_problem_is_reported_by_key_path() -> None:
    bad = {
        "groups": {"g": "alice"},
        "policy": {
            "CADPRO": {
                "reserve": [{"seats": 0, "user": "a"}, {"group": "nope", "seats": 1},
                            {"user": "a", "host": "b", "seats": 1}],
                "max": [{"seats": -1, "user": "a"}, "alice"],
                "exclude": [{"colour": "red"}],
                "timeout": 60,
                "maximum": 3,
            },
            "VIEWER": [],
        },
    }
    _, problems = parse_policy(bad)
    text = "\n".join(problems)
    for expected in ("groups.g", "policy.CADPRO.reserve[0].seats", "policy.CADPRO.reserve[1].group",
                     "policy.CADPRO.reserve[2]", "policy.CADPRO.max[0].seats", "policy.CADPRO.max[1]",
                     "policy.CADPRO.exclude[0]", "policy.CADPRO.timeout", "maximum", "policy.VIEWER"):
        assert expected in text, expected
    assert f"{MIN_IDLE_TIMEOUT:g}" in text


# -- enforcement in the ledger -------------------------------------------------------------------------------


def test_reserved_seats_never_go_to_others() -> None:
    ledger = make(4, policy())
    assert co(ledger, "erin") is not None and co(ledger, "frank") is not None
    assert ledger.reserved(POOL) == 2
    assert co(ledger, "gina") is None  # two seats free, both reserved for designers
    assert ledger.refusal(POOL, ("gina", "pc1"), "gina", "pc1") == "reserved"
    assert co(ledger, "alice") is not None and co(ledger, "bob") is not None
    assert ledger.in_use(POOL) == 4 and ledger.reserved(POOL) == 0
    assert ledger.refusal(POOL, ("gina", "pc1"), "gina", "pc1") == "full"


def test_members_overflow_into_unreserved_seats_and_a_freed_reserved_seat_stays_reserved() -> None:
    ledger = make(3, policy())
    a = co(ledger, "alice")
    assert a is not None and co(ledger, "bob") is not None
    assert co(ledger, "alice", host="pc2") is not None  # third designer seat: the unreserved one
    assert co(ledger, "erin") is None
    ledger.release(a.token, 1.0, 1.7e9)
    assert ledger.reserved(POOL) == 1
    assert co(ledger, "erin") is None  # the freed seat was a reserved one
    assert co(ledger, "bob", host="pc3") is not None


def test_max_is_never_exceeded_but_joining_a_held_seat_is_free() -> None:
    ledger = make(10, policy())
    assert co(ledger, "carol", host="pc1") is not None
    assert co(ledger, "carol", host="pc2") is not None
    assert co(ledger, "carol", host="pc3") is None
    assert ledger.refusal(POOL, ("carol", "pc3"), "carol", "pc3") == "max"
    assert co(ledger, "carol", host="pc2") is not None  # same user and host: shares the seat
    assert co(ledger, "x", host="lab-pc1") is not None
    assert co(ledger, "y", host="LAB-PC2") is None  # the lab host group may hold one seat in all


def test_waiters_get_only_seats_admissible_for_them_in_arrival_order() -> None:
    ledger = make(3, policy())
    held = [co(ledger, u) for u in ("erin", "alice", "bob")]
    assert all(held)
    assert ledger.enqueue(waiter(1, "frank")) == 1
    assert ledger.enqueue(waiter(2, "gina")) == 2
    assert ledger.enqueue(waiter(3, "alice", host="pc7")) == 3
    # A designer's (reserved) seat frees: it goes to the designer at the back, not to frank or gina.
    lease_bob = held[2]
    assert lease_bob is not None
    _, grants = ledger.release(lease_bob.token, 1.0, 1.7e9)
    assert [w.waiter_id for w, _ in grants] == [3]
    # The unreserved seat frees: frank, first in line, gets it.
    lease_erin = held[0]
    assert lease_erin is not None
    _, grants = ledger.release(lease_erin.token, 2.0, 1.7e9)
    assert [w.waiter_id for w, _ in grants] == [1]
    assert [w.waiter_id for w in ledger.waiting(POOL)] == [2]


def test_a_policy_change_retags_existing_seats_and_restore_counts_them() -> None:
    ledger = make(3, None)
    for u in ("erin", "frank", "gina"):
        assert co(ledger, u) is not None
    ledger.set_policy(POOL, policy())  # the 3 seats now held by outsiders exceed the 1 unreserved seat
    assert ledger.in_use(POOL) == 3
    recs = [x.to_record() for x in ledger.leases()]
    fresh = make(5, policy())
    fresh.restore(recs, 0.0)
    assert co(fresh, "hank") is None  # 3 outsiders already hold more than the 3 unreserved seats
    assert fresh.reserved(POOL) == 2
    assert co(fresh, "alice") is not None


def test_restored_records_with_policy_are_tagged() -> None:
    fresh = make(2, policy())
    rec = LeaseRecord("tokX", POOL[0], POOL[1], ("alice", "pc1"), "alice", "pc1", 1, "2.1", "pc1", 1.7e9)
    fresh.restore([rec], 0.0)
    assert fresh.reserved(POOL) == 1
    assert co(fresh, "erin") is None  # 1 free seat, reserved for the second designer


# -- property: random interleavings never break reserve or max ---------------------------------------------

USERS = ("alice", "bob", "carol", "erin", "frank")
HOSTS = ("pc1", "lab-pc1", "lab-pc2")


class PolicyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.count = 4
        self.pp = policy()
        self.ledger = make(self.count, self.pp)
        self.tokens: list[str] = []
        self.now = 0.0
        self.next_waiter = 1
        self.violation_allowed = False  # after a policy change over existing seats

    def _check_grant(self, lease: LeaseInfo) -> None:
        self.tokens.append(lease.token)

    @rule(user=st.sampled_from(USERS), host=st.sampled_from(HOSTS), wait=st.booleans())
    def checkout(self, user: str, host: str, wait: bool) -> None:
        lease = co(self.ledger, user, host)
        if lease is not None:
            self._check_grant(lease)
        elif wait and self.ledger.refusal(POOL, (user.lower(), host), user, host) != "max":
            self.ledger.enqueue(waiter(self.next_waiter, user, host))
            self.next_waiter += 1

    @precondition(lambda self: self.tokens)
    @rule(i=st.integers(0, 20))
    def checkin(self, i: int) -> None:
        token = self.tokens.pop(i % len(self.tokens))
        _, grants = self.ledger.release(token, self.now, 1.7e9)
        self.tokens.extend(lease.token for _, lease in grants)

    @rule(dt=st.sampled_from([1.0, 50.0, 100.0]))
    def expire(self, dt: float) -> None:
        self.now += dt
        lapsed, grants = self.ledger.expire(self.now, 1.7e9)
        gone = {x.token for x in lapsed}
        self.tokens = [t for t in self.tokens if t not in gone]
        self.tokens.extend(lease.token for _, lease in grants)
        self.ledger.renew_session(1, self.now)

    @rule(wid=st.integers(1, 30))
    def cancel(self, wid: int) -> None:
        self.ledger.cancel_wait(wid)

    @invariant()
    def reserve_and_max_hold(self) -> None:
        seats: dict[tuple[str, ...], LeaseInfo] = {}
        for lease in self.ledger.leases(POOL):
            seats.setdefault(lease.share_key, lease)
        holders = list(seats.values())
        assert len(holders) <= self.count
        outsiders = [x for x in holders if not any(r.subject.matches(x.user, x.host) for r in self.pp.reserve)]
        assert len(outsiders) <= self.count - self.pp.reserved_total
        for rule_ in self.pp.max:
            assert sum(rule_.subject.matches(x.user, x.host) for x in holders) <= rule_.seats
        # No waiter is left behind a seat the policy would give it.
        for w in self.ledger.waiting(POOL):
            assert self.ledger.refusal(POOL, w.share_key, w.user, w.host) is not None


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


def test_the_invariant_checker_can_fail() -> None:
    """Without the policy in the ledger the same checks catch an over-grant (the property is not vacuous)."""
    ledger = make(4, None)
    for u in ("erin", "frank", "gina"):
        assert co(ledger, u) is not None
    outsiders = [x for x in ledger.leases(POOL) if not policy().reserve[0].subject.matches(x.user, x.host)]
    with pytest.raises(AssertionError):
        assert len(outsiders) <= 4 - policy().reserved_total
