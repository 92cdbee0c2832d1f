"""Usage policy against the real daemon: include/exclude, max, reserve, the queue, idle timeout, lmreread."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from harness import Daemon, RawClient

from client_stub import LicenseClient
from protocol import CheckedIn, Checkin, Checkout, ErrorCode, ErrorReply, Granted, Heartbeat, HeartbeatAck

POLICY: dict[str, Any] = {
    "groups": {"designers": ["alice", "bob"]},
    "host_groups": {"kiosks": ["kiosk1"]},
    "policy": {
        "CADPRO": {
            "reserve": [{"seats": 1, "group": "designers"}],
            "max": [{"seats": 1, "user": "carol"}],
        },
        "VIEWER": {
            "include": [{"group": "designers"}, {"user": "erin"}],
            "exclude": [{"user": "bob"}, {"host_group": "kiosks"}],
            "timeout": 900,
        },
    },
}
PRODUCTS = (("CADPRO", "2.1", 3), ("VIEWER", "1.0", 5))


def start(daemon_factory: Callable[..., Daemon], cfg: dict[str, Any], heartbeat: float = 10.0,
          lease_timeout: float = 30.0) -> tuple[Daemon, Path]:
    d = daemon_factory(PRODUCTS, start=False, heartbeat=heartbeat, lease_timeout=lease_timeout)
    path = d.workdir / "lmgrd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    d.extra += ["-c", str(path)]
    d.start()
    return d, path


def client(d: Daemon, user: str, host: str = "pc1") -> RawClient:
    c = d.connect()
    c.hello(user=user, host=host)
    return c


def checkout(c: RawClient, product: str = "CADPRO", wait: float = 0.0) -> Granted | ErrorReply:
    r = c.request(Checkout(c.id(), product, "1.0" if product == "VIEWER" else "2.1", wait))
    assert isinstance(r, Granted | ErrorReply), r
    return r


def code(r: Granted | ErrorReply) -> str:
    return "GRANTED" if isinstance(r, Granted) else str(r.code)


def lmstat(d: Daemon) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmstat", "-a", "--json", "-c", d.address],
                       capture_output=True, text=True, timeout=30, env=d.env())
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def pool(data: dict[str, Any], product: str) -> dict[str, Any]:
    return next(p for p in data["pools"] if p["product"] == product)


def test_include_and_exclude_name_the_rule(daemon_factory: Callable[..., Daemon]) -> None:
    d, _ = start(daemon_factory, POLICY)
    assert code(checkout(client(d, "alice"), "VIEWER")) == "GRANTED"
    assert code(checkout(client(d, "erin"), "VIEWER")) == "GRANTED"
    r = checkout(client(d, "bob"), "VIEWER")  # a designer, but excluded: exclude wins
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.EXCLUDED and "exclude user bob" in r.message
    r = checkout(client(d, "frank"), "VIEWER", wait=5)  # not included; waiting does not help
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.EXCLUDED and "include list" in r.message
    r = checkout(client(d, "erin", host="kiosk1"), "VIEWER")
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.EXCLUDED and "host_group kiosks" in r.message
    assert code(checkout(client(d, "frank"), "CADPRO")) == "GRANTED"  # the VIEWER rules stay on VIEWER
    d.wait_for_log(r"DENIED VIEWER 1\.0 to bob@.*EXCLUDED")


def test_reserve_max_and_queue_together(daemon_factory: Callable[..., Daemon]) -> None:
    d, _ = start(daemon_factory, POLICY)
    erin, carol = client(d, "erin"), client(d, "carol", host="pc1")
    e = checkout(erin)
    assert isinstance(e, Granted)
    c1 = checkout(carol)
    assert isinstance(c1, Granted)  # the two unreserved seats are taken
    r = checkout(client(d, "carol", host="pc2"), wait=5)  # a second seat for carol: max 1, no queueing
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.MAX_REACHED and "max 1 for user carol" in r.message
    r = checkout(client(d, "frank"))
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.RESERVED
    data = pool(lmstat(d), "CADPRO")
    assert (data["in_use"], data["reserved"], data["queued"]) == (2, 1, 0)
    prom = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmstat", "--prometheus", "-c", d.address],
                          capture_output=True, text=True, timeout=30, env=d.env()).stdout
    assert re.search(r'lmgrd_seats\{customer_id="[^"]+",product="CADPRO",state="reserved"\} 1\.0', prom), prom
    assert re.search(r'lmgrd_denials_total\{customer_id="[^"]*",product="CADPRO",reason="RESERVED"\} 1\.0', prom)
    assert re.search(r'lmgrd_denials_total\{customer_id="[^"]*",product="CADPRO",reason="MAX_REACHED"\} 1\.0', prom)

    frank, gina = client(d, "frank"), client(d, "gina")
    frank.send(Checkout(frank.id(), "CADPRO", "2.1", 30))
    d.wait_for_log(r"QUEUED CADPRO 2\.1 for frank@.*position 1")
    gina.send(Checkout(gina.id(), "CADPRO", "2.1", 30))
    d.wait_for_log(r"QUEUED CADPRO 2\.1 for gina@.*position 2")
    # A designer arriving after them takes the reserved seat: frank and gina could not use it.
    assert code(checkout(client(d, "alice"))) == "GRANTED"
    stat = lmstat(d)
    data = pool(stat, "CADPRO")
    assert (data["in_use"], data["reserved"], data["queued"]) == (3, 0, 2)
    assert [(w["user"], w["position"]) for w in stat["queue"]] == [("frank", 1), ("gina", 2)]
    # Unreserved seats free: first come, first served.
    assert isinstance(erin.request(Checkin(erin.id(), e.token)), CheckedIn)
    g = frank.recv()
    assert isinstance(g, Granted) and g.waited > 0
    carol.request(Checkin(carol.id(), c1.token))
    assert isinstance(gina.recv(), Granted)
    data = pool(lmstat(d), "CADPRO")
    assert (data["in_use"], data["reserved"], data["queued"]) == (3, 0, 0)
    text = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmstat", "-a", "--extended", "-c", d.address],
                          capture_output=True, text=True, timeout=30, env=d.env()).stdout
    assert "Users of CADPRO:  (Total of 3 licenses issued;  Total of 3 licenses in use)" in text
    assert "reserved 0, queued 0" in text


def test_queued_waiter_times_out_with_the_policy_reason(daemon_factory: Callable[..., Daemon]) -> None:
    d, _ = start(daemon_factory, POLICY)
    assert code(checkout(client(d, "erin"))) == "GRANTED"
    assert code(checkout(client(d, "frank"))) == "GRANTED"
    r = checkout(client(d, "gina"), wait=1)  # the one free seat stays reserved for designers
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.RESERVED and "policy" in r.message


def test_idle_seats_are_reclaimed_after_the_policy_timeout(daemon_factory: Callable[..., Daemon]) -> None:
    d, _ = start(daemon_factory, POLICY)
    alice = client(d, "alice")
    g = checkout(alice, "VIEWER")
    cad = checkout(alice, "CADPRO")  # no timeout on CADPRO: never reclaimed for idleness
    assert isinstance(g, Granted) and isinstance(cad, Granted)
    ack = alice.request(Heartbeat(alice.id(), idle=True, idle_for=899))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 2 and ack.lost == ()
    ack = alice.request(Heartbeat(alice.id(), idle=True, idle_for=901))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 1
    assert [(x.token, x.code) for x in ack.lost] == [(g.token, ErrorCode.IDLE_TIMEOUT)]
    assert "900 s" in ack.lost[0].message
    data = lmstat(d)
    assert pool(data, "VIEWER")["in_use"] == 0 and pool(data, "CADPRO")["in_use"] == 1
    d.wait_for_log(r"IDLE VIEWER 1\.0 of alice@.* reclaimed")


def test_client_stub_reports_idle_and_learns_its_seat_was_reclaimed(daemon_factory: Callable[..., Daemon]) -> None:
    d, _ = start(daemon_factory, POLICY, heartbeat=1.0, lease_timeout=4.0)
    with LicenseClient(f"{d.port}@127.0.0.1", user="alice") as lm:
        seat = lm.checkout("VIEWER", version="1.0")
        time.sleep(2.5)  # two heartbeats while active: the seat stays
        assert not seat.lost
        lm.report_idle(950)  # the product saw no input for 950 s (> the 900 s policy timeout)
        for _ in range(100):
            if seat.lost:
                break
            time.sleep(0.1)
        assert seat.lost and seat.lost_reason is not None and seat.lost_reason.code is ErrorCode.IDLE_TIMEOUT
        assert pool(lmstat(d), "VIEWER")["in_use"] == 0
        lm.report_idle(None)
        again = lm.checkout("VIEWER", version="1.0")  # active again: a new seat is granted and kept
        time.sleep(2.5)
        assert not again.lost


def test_lmreread_changes_the_policy_without_dropping_anyone(daemon_factory: Callable[..., Daemon]) -> None:
    d, path = start(daemon_factory, POLICY)
    erin = client(d, "erin")
    assert code(checkout(erin)) == "GRANTED"
    assert code(checkout(client(d, "frank"))) == "GRANTED"
    gina = client(d, "gina")
    gina.send(Checkout(gina.id(), "CADPRO", "2.1", 30))
    d.wait_for_log(r"QUEUED CADPRO 2\.1 for gina")
    # A broken policy is refused and the running one stays.
    broken = {**POLICY, "policy": {"CADPRO": {"reserve": [{"seats": 1, "group": "nobody"}]}}}
    path.write_text(yaml.safe_dump(broken))
    r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmreread", "-c", d.address],
                       capture_output=True, text=True, timeout=30, env=d.env())
    assert r.returncode == 1, r.stdout + r.stderr  # the operator is told, not just the log
    assert "policy.CADPRO.reserve[0].group: no group named 'nobody'" in r.stdout + r.stderr
    d.wait_for_log(r"policy\.CADPRO\.reserve\[0\]\.group: no group named 'nobody'")
    assert pool(lmstat(d), "CADPRO")["reserved"] == 1
    # Lifting the reservation gives the waiting gina the seat at once; held seats are untouched.
    path.write_text(yaml.safe_dump({"groups": POLICY["groups"]}))
    r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmreread", "-c", d.address],
                       capture_output=True, text=True, timeout=30, env=d.env())
    assert r.returncode == 0, r.stderr
    assert isinstance(gina.recv(), Granted)
    data = pool(lmstat(d), "CADPRO")
    assert (data["in_use"], data["reserved"], data["queued"]) == (3, 0, 0)
    ack = erin.request(Heartbeat(erin.id()))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and ack.lost == ()


def test_a_bad_policy_stops_the_daemon_from_starting_with_every_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"policy": {"CADPRO": {"max": [{"seats": "two", "user": "x"}], "timeout": 5}}}))
    r = subprocess.run([sys.executable, "-m", "lmgrd", "-c", str(cfg), "--check", "--license", "x.lic",
                        "--vendor-key", "v.pub"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "policy.CADPRO.max[0].seats" in r.stderr and "policy.CADPRO.timeout" in r.stderr
