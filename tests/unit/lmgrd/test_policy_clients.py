"""RESERVE and MAX by DISPLAY and by INTERNET (an IP address, with FlexNet's ``*`` parts): the ledger counts seats by
the client's display and the address it connects from as it does by user and host, for a FlexNet options file
and the YAML policy alike; the address is journalled, so a restart keeps counting those seats.

Options files are in the shapes the FlexNet license administration guide publishes (one rule a line, a keyword,
a count, a feature, a type, a name; groups defined on their own lines)."""

from __future__ import annotations

import itertools
import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from harness import Holder
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lmgrd.core.ledger import LeaseInfo, LeaseRecord, Ledger, PoolKey, ShareMode, Waiter, share_key_for
from lmgrd.core.options import parse_options
from lmgrd.core.policy import ProductPolicy, address_matches, parse_policy
from lmgrd.storage.journal import JournalStore, read_journal

POOL: PoolKey = ("C1", "CADPRO")
WALL = 1.7e9


def options(text: str) -> ProductPolicy:
    opts = parse_options(text, "/opt/cad/licenses/cad.opt")
    assert opts.problems == () and opts.unsupported == (), (opts.problems, opts.unsupported)
    pp = opts.policy.get("CADPRO")
    assert pp is not None
    return pp


def make(count: int, pp: ProductPolicy | None) -> Ledger:
    counter = itertools.count(1)
    ledger = Ledger(90.0, lambda: f"tok{next(counter):05d}")
    ledger.set_pool(POOL, count)
    ledger.set_policy(POOL, pp)
    return ledger


def holder(user: str, host: str = "pc1", addr: str = "198.51.100.20", display: str = "", session: int = 1) -> Holder:
    return Holder(user, host, 100, display or f"{host}:0", session, addr=addr)


def co(ledger: Ledger, h: Holder, share: ShareMode = ShareMode.USER_HOST) -> LeaseInfo | None:
    return ledger.checkout(POOL, share_key_for(share, h.user, h.host), h, "2.1", 0.0, WALL)


# -- the wildcard forms ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("addr", "pattern", "hit"), [
    ("192.0.2.10", "192.0.2.10", True),
    ("192.0.2.10", "192.0.2.*", True),
    ("192.0.2.10", "192.0.*.*", True),
    ("192.0.2.10", "192.*.*.*", True),
    ("192.0.2.10", "*.*.*.10", True),
    ("192.0.3.10", "192.0.2.*", False),
    ("192.0.2.100", "192.0.2.10", False),  # whole parts, not prefixes
    ("::ffff:192.0.2.10", "192.0.2.*", True),  # a dual-stack listener's IPv4 client
    ("2001:db8::7", "2001:db8::7", True),
    ("", "192.0.2.*", False),  # a client whose address is unknown matches no address rule
])
def test_internet_patterns_match_whole_parts(addr: str, pattern: str, hit: bool) -> None:
    assert address_matches(addr, (pattern,)) is hit


# -- RESERVE and MAX by INTERNET and DISPLAY, from an options file ------------------------------------------------


def test_reserve_by_internet_keeps_seats_for_that_subnet() -> None:
    pp = options("# the lab subnet always gets two seats\n"
                 "RESERVE 2 CADPRO INTERNET 192.0.2.*\n")
    ledger = make(3, pp)
    assert co(ledger, holder("erin", addr="198.51.100.9")) is not None  # the one unreserved seat
    assert co(ledger, holder("frank", addr="198.51.100.10")) is None
    assert ledger.refusal(POOL, ("frank", "pc1"), "frank", "pc1", "198.51.100.10") == "reserved"
    assert ledger.reservations(POOL)[0][1] == 2 and ledger.reserved(POOL) == 2
    for user, addr in (("lab1", "192.0.2.31"), ("lab2", "192.0.2.32")):
        assert co(ledger, holder(user, addr=addr)) is not None
    assert ledger.in_use(POOL) == 3 and ledger.reserved(POOL) == 0


def test_max_by_internet_caps_a_subnet_and_joining_a_held_seat_is_free() -> None:
    pp = options("MAX 1 CADPRO INTERNET 10.8.*.*\n")
    ledger = make(4, pp)
    assert co(ledger, holder("alice", addr="10.8.1.5")) is not None
    assert co(ledger, holder("bob", addr="10.8.200.1")) is None  # same /16: the cap holds
    assert ledger.refusal(POOL, ("bob", "pc1"), "bob", "pc1", "10.8.200.1") == "max"
    assert co(ledger, holder("alice", addr="10.8.1.5")) is not None  # alice@pc1 again: her own seat
    assert co(ledger, holder("bob", addr="10.9.0.1")) is not None  # another subnet
    assert ledger.in_use(POOL) == 2


def test_reserve_and_max_by_display() -> None:
    pp = options("RESERVE 1 CADPRO DISPLAY kiosk:0\n"
                 "MAX 1 CADPRO DISPLAY tsclient-17\n")
    ledger = make(2, pp)
    assert co(ledger, holder("alice", display="tsclient-17")) is not None  # the unreserved seat
    assert co(ledger, holder("bob", host="pc2", display="tsclient-17")) is None
    assert ledger.refusal(POOL, ("bob", "pc2"), "bob", "pc2", "", "tsclient-17") == "max"
    assert co(ledger, holder("carol", display="desk:0")) is None  # the free seat is the kiosk's
    assert co(ledger, holder("kim", host="kiosk", display="KIOSK:0")) is not None  # displays ignore case
    assert ledger.in_use(POOL) == 2


def test_a_host_group_of_names_and_addresses_limits_both() -> None:
    pp = options("HOST_GROUP render rnode1 rnode2 203.0.113.*\n"
                 "MAX 2 CADPRO HOST_GROUP render\n")
    ledger = make(5, pp)
    assert co(ledger, holder("a", host="rnode1", addr="198.51.100.1")) is not None  # by name
    assert co(ledger, holder("b", host="ws9", addr="203.0.113.40")) is not None  # by address
    assert co(ledger, holder("c", host="rnode2", addr="198.51.100.2")) is None
    assert co(ledger, holder("d", host="ws8", addr="203.0.113.41")) is None
    assert co(ledger, holder("e", host="ws7", addr="198.51.100.3")) is not None


def test_a_waiter_is_served_by_its_address() -> None:
    pp = options("RESERVE 1 CADPRO INTERNET 192.0.2.*\n")
    ledger = make(2, pp)
    assert co(ledger, holder("out1", addr="198.51.100.1")) is not None
    lab = holder("lab1", addr="192.0.2.5", session=2)
    assert co(ledger, lab) is not None  # the reserved seat
    out2 = holder("out2", addr="198.51.100.2", session=3)
    lab2 = holder("lab2", addr="192.0.2.6", session=4)
    ledger.enqueue(Waiter(1, POOL, ("out2", "pc1"), out2, "2.1"))
    ledger.enqueue(Waiter(2, POOL, ("lab2", "pc1"), lab2, "2.1"))
    lab_lease = next(x for x in ledger.leases(POOL) if x.user == "lab1")
    _, grants = ledger.release(lab_lease.token, 1.0, WALL)
    # The freed seat is reserved for 192.0.2.*: lab2 gets it although out2 waited longer.
    assert [(w.waiter_id, lease.user, lease.addr) for w, lease in grants] == [(2, "lab2", "192.0.2.6")]


def test_the_yaml_policy_reads_the_same_subjects() -> None:
    cfg: dict[str, Any] = {
        "host_groups": {"render": ["rnode1", "203.0.113.*"]},
        "policy": {"CADPRO": {"reserve": [{"seats": 1, "internet": "192.0.2.*"}],
                              "max": [{"seats": 1, "display": "tsclient-17"}, {"seats": 1, "host_group": "render"},
                                      {"seats": 1, "host": "10.1.1.1"}]}},
    }
    pol, problems = parse_policy(cfg)
    assert problems == []
    pp = pol.get("CADPRO")
    assert pp is not None
    ledger = make(6, pp)
    assert co(ledger, holder("a", display="tsclient-17")) is not None
    assert co(ledger, holder("b", host="pc2", display="tsclient-17")) is None
    assert co(ledger, holder("c", host="ws1", addr="203.0.113.9")) is not None
    assert co(ledger, holder("d", host="rnode1")) is None
    assert co(ledger, holder("e", addr="10.1.1.1")) is not None
    assert co(ledger, holder("f", host="pc3", addr="10.1.1.1")) is None
    assert co(ledger, holder("g", addr="192.0.2.1")) is not None and ledger.reserved(POOL) == 0


@pytest.mark.parametrize(("rule", "expect"), [
    ({"seats": 1, "internet": "192.0.2"}, "policy.CADPRO.reserve[0].internet: '192.0.2' is not an IP address"),
    ({"seats": 1, "internet": "300.0.2.*"}, "policy.CADPRO.reserve[0].internet: '300.0.2.*' is not an IP address"),
    ({"seats": 1, "display": ""}, "policy.CADPRO.reserve[0].display: expected a name"),
])
def test_bad_yaml_subjects_are_named_by_key_path(rule: dict[str, Any], expect: str) -> None:
    _, problems = parse_policy({"policy": {"CADPRO": {"reserve": [rule]}}})
    assert len(problems) == 1 and problems[0].startswith(expect), problems


# -- the address survives a restart -------------------------------------------------------------------------------


def test_the_address_is_journalled_and_restored_seats_count_against_address_rules(tmp_path: Path) -> None:
    pp = options("MAX 1 CADPRO INTERNET 192.0.2.*\n")
    ledger = make(3, pp)
    lease = co(ledger, holder("alice", addr="192.0.2.7"))
    assert lease is not None and lease.addr == "192.0.2.7"
    with JournalStore(tmp_path) as store:
        store.record_grant(lease.to_record())
        store.flush()
    (rec,) = read_journal(tmp_path / "leases.journal")
    assert rec.addr == "192.0.2.7" and rec == lease.to_record()
    restarted = make(3, pp)
    restarted.restore([rec], 0.0)
    assert co(restarted, holder("bob", addr="192.0.2.8")) is None  # the restored seat still counts
    assert restarted.refusal(POOL, ("bob", "pc1"), "bob", "pc1", "192.0.2.8") == "max"


def test_a_journal_written_before_addresses_reads_with_no_address(tmp_path: Path) -> None:
    rec = LeaseRecord("tok1", "C1", "CADPRO", ("alice", "pc1"), "alice", "pc1", 7, "2.1", "pc1:0", WALL)
    with JournalStore(tmp_path) as store:
        store.record_grant(rec._replace(addr="192.0.2.1"))
        store.flush()
    path = tmp_path / "leases.journal"
    data = path.read_bytes()
    # Rewrite the one record in the 11-field form an older lmgrd wrote.
    payload = msgpack.packb([1, "tok1", "C1", "CADPRO", ["alice", "pc1"], "alice", "pc1", 7, "2.1", "pc1:0", WALL])
    path.write_bytes(data[:8] + struct.pack(">II", len(payload), zlib.crc32(payload)) + payload)
    assert read_journal(path) == [rec]  # addr "" by default


# -- the property: every rule holds after every step, clients differing by address and display ------------------

USERS = ("alice", "bob", "carol", "dan")
HOSTS = ("pc1", "pc2", "pc3", "lab")
ADDRS = ("192.0.2.5", "192.0.2.6", "198.51.100.1", "10.0.0.1")
DISPLAYS = ("kiosk:0", "pc1:0", "ts-9")
OPT = ("RESERVE 1 CADPRO INTERNET 192.0.2.*\n"
       "RESERVE 1 CADPRO DISPLAY kiosk:0\n"
       "MAX 2 CADPRO INTERNET 192.0.*.*\n"
       "MAX 1 CADPRO DISPLAY ts-9\n"
       "HOST_GROUP mixed lab 10.0.0.*\n"
       "MAX 1 CADPRO HOST_GROUP mixed\n")


class AddressPolicyMachine(RuleBasedStateMachine):
    """Checkouts (some waiting), checkins and cancels under host or user_host sharing, as the daemon drives the
    ledger (a grant in a pool with waiters is followed by serve()). Counts 4 seats."""

    def __init__(self) -> None:
        super().__init__()
        self.pp = options(OPT)
        self.ledger = make(4, self.pp)
        self.share = ShareMode.HOST
        self.tokens: list[str] = []
        self.waiters = itertools.count(1)
        # share key -> the lease that created the seat: its client is who the seat counts for (a client that
        # joins a held seat takes nothing, whatever its address or display), until the seat is gone.
        self.creators: dict[tuple[str, ...], LeaseInfo] = {}

    def _took(self, lease: LeaseInfo) -> None:
        self.tokens.append(lease.token)
        self.creators.setdefault(lease.share_key, lease)

    def _forget_freed(self) -> None:
        held = {x.share_key for x in self.ledger.leases(POOL)}
        self.creators = {k: v for k, v in self.creators.items() if k in held}

    def _grants(self, grants: list[tuple[Waiter, LeaseInfo]]) -> None:
        for _, lease in grants:
            self._took(lease)

    @rule(share=st.sampled_from([ShareMode.HOST, ShareMode.USER_HOST]))
    def share_mode(self, share: ShareMode) -> None:
        if not self.tokens and not self.ledger.queued(POOL):
            self.share = share

    @rule(user=st.sampled_from(USERS), host=st.sampled_from(HOSTS), addr=st.sampled_from(ADDRS),
          display=st.sampled_from(DISPLAYS), wait=st.booleans())
    def checkout(self, user: str, host: str, addr: str, display: str, wait: bool) -> None:
        h = Holder(user, host, 1, display, 1, addr=addr)
        key = share_key_for(self.share, user, host)
        lease = self.ledger.checkout(POOL, key, h, "2.1", 0.0, WALL)
        if lease is not None:
            self._took(lease)
            if self.ledger.queued(POOL):
                self._grants(self.ledger.serve(POOL, 0.0, WALL))
        elif wait and self.ledger.refusal(POOL, key, user, host, addr, display) != "max":
            self.ledger.enqueue(Waiter(next(self.waiters), POOL, key, h, "2.1"))

    @rule(i=st.integers(0, 20))
    def checkin(self, i: int) -> None:
        if self.tokens:
            lease, grants = self.ledger.release(self.tokens.pop(i % len(self.tokens)), 1.0, WALL)
            assert lease is not None
            still = {x.token for x in self.ledger.leases(POOL) if x.share_key == lease.share_key}
            if not still - {g.token for _, g in grants}:  # its seat freed (a grant may have taken the key anew)
                self.creators.pop(lease.share_key, None)
            self._grants(grants)
            self._forget_freed()

    @rule(wid=st.integers(1, 40))
    def cancel(self, wid: int) -> None:
        self.ledger.cancel_wait(wid)

    @invariant()
    def rules_hold(self) -> None:
        held = {x.share_key for x in self.ledger.leases(POOL)}
        assert held == set(self.creators)
        seats = list(self.creators.values())
        assert len(seats) <= 4

        def hits(x: LeaseInfo, rules: Any) -> bool:
            return any(r.subject.matches(x.user, x.host, x.addr, x.display) for r in rules)

        assert sum(not hits(x, self.pp.reserve) for x in seats) <= 4 - self.pp.reserved_total
        for r in self.pp.max:
            assert sum(r.subject.matches(x.user, x.host, x.addr, x.display) for x in seats) <= r.seats
        for w in self.ledger.waiting(POOL):
            assert w.share_key not in held, "a waiter whose seat exists must have joined it"
            assert self.ledger.refusal(POOL, w.share_key, w.user, w.host, w.addr, w.display) is not None


TestAddressPolicyMachine = AddressPolicyMachine.TestCase
TestAddressPolicyMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])


# -- the ledger edges mutation testing found untested (tests/mutation/survivors.txt) ------------------------------


def test_refusal_and_enqueue_judge_a_reserve_by_the_clients_address() -> None:
    ledger = make(2, options("RESERVE 1 CADPRO INTERNET 192.0.2.*\n"))
    assert co(ledger, holder("out1", addr="198.51.100.1")) is not None
    assert ledger.refusal(POOL, ("lab1", "pc1"), "lab1", "pc1", "192.0.2.5") is None  # the reserved seat is hers
    assert ledger.refusal(POOL, ("out2", "pc1"), "out2", "pc1", "198.51.100.2") == "reserved"
    with pytest.raises(ValueError, match="can be granted now"):
        ledger.enqueue(Waiter(1, POOL, ("lab1", "pc1"), holder("lab1", addr="192.0.2.5"), "2.1"))


def test_a_display_reserve_is_counted_as_reserved_when_taken_and_when_retagged() -> None:
    pp = options("RESERVE 1 CADPRO DISPLAY kiosk:0\n")
    ledger = make(2, pp)
    desk = co(ledger, holder("alice", display="desk:0"))
    kiosk = co(ledger, holder("kim", host="kiosk", display="kiosk:0"))
    assert desk is not None and kiosk is not None and ledger.reserved(POOL) == 0
    ledger.release(desk.token, 1.0, WALL)
    assert co(ledger, holder("carol", display="desk:0")) is not None  # the kiosk's seat took none of the others'
    # A policy set (or a restore) over existing seats tags them by their display too.
    again = make(2, None)
    again.restore([kiosk.to_record()], 0.0)
    again.set_policy(POOL, pp)
    assert again.reserved(POOL) == 0
    assert co(again, holder("carol", display="desk:0")) is not None


def test_a_release_that_fills_the_pool_still_joins_a_waiter_whose_seat_exists() -> None:
    # A caller that did not serve() after a checkout (the ledger's own contract asks it to): the next serve, here
    # a release's, joins the waiter to the seat its key has, even when an earlier waiter took the last free seat.
    ledger = make(3, options("RESERVE 1 CADPRO USER bob\nMAX 1 CADPRO USER alice\n"))
    alice = co(ledger, holder("alice", host="h1"), ShareMode.HOST)
    dan = co(ledger, holder("dan", host="h4"), ShareMode.HOST)
    assert alice is not None and dan is not None
    ledger.enqueue(Waiter(1, POOL, ("h3",), holder("carol", host="h3"), "2.1"))  # the free seat is bob's
    ledger.enqueue(Waiter(2, POOL, ("h2",), holder("alice", host="h2"), "2.1"))  # her max is full
    assert co(ledger, holder("bob", host="h2"), ShareMode.HOST) is not None  # the seat ("h2",); pool full
    _, grants = ledger.release(dan.token, 1.0, WALL)
    assert [(w.waiter_id, lease.share_key) for w, lease in grants] == [(1, ("h3",)), (2, ("h2",))]
    assert ledger.in_use(POOL) == 3 and ledger.queued(POOL) == 0


def test_a_waiter_is_served_by_its_display() -> None:
    ledger = make(2, options("RESERVE 1 CADPRO DISPLAY kiosk:0\n"))
    assert co(ledger, holder("out1", display="desk:0")) is not None
    kim = co(ledger, holder("kim", host="kiosk", display="kiosk:0"))
    assert kim is not None
    ledger.enqueue(Waiter(1, POOL, ("out2", "pc1"), holder("out2", display="desk:0", session=3), "2.1"))
    ledger.enqueue(Waiter(2, POOL, ("kay", "kiosk"), holder("kay", host="kiosk", display="kiosk:0", session=4), "2.1"))
    _, grants = ledger.release(kim.token, 1.0, WALL)
    assert [(w.waiter_id, lease.display) for w, lease in grants] == [(2, "kiosk:0")]
