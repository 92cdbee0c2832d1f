"""Units of the usage log and lmremove: config keys and flag, which leases an lmremove names, and the report's
percentile and interval arithmetic on small hand-made inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmgrd.cli import _overrides, build_parser
from lmgrd.config import ConfigInvalid, build_config
from lmgrd.core.ledger import LeaseInfo
from lmgrd.core.removal import match_leases
from lmgrd.report import build_report, parse_date
from protocol.errors import ErrorCode, ProtocolError

BASE = {"licenses": ["a.lic"], "vendor_key": "v.pub"}


def test_usage_log_settings_and_flag() -> None:
    cfg = build_config({**BASE, "usage_log": "/var/log/lmgrd/usage.log", "usage_log_max_bytes": 4096,
                        "usage_log_backups": 0}, {}, "t.yaml")
    assert (cfg.usage_log, cfg.usage_log_max_bytes, cfg.usage_log_backups) == (
        Path("/var/log/lmgrd/usage.log"), 4096, 0)
    assert build_config(BASE, {}, "t").usage_log is None
    ns = build_parser().parse_args(["--usage-log", "/tmp/u.log", "--license", "a.lic", "--vendor-key", "v.pub"])
    assert build_config({"usage_log": "/elsewhere.log"}, _overrides(ns), "t").usage_log == Path("/tmp/u.log")
    with pytest.raises(ConfigInvalid) as exc:
        build_config({**BASE, "usage_log": 5, "usage_log_max_bytes": "big", "usage_log_backups": -1}, {}, "t.yaml")
    text = str(exc.value)
    assert "usage_log: expected a path, got 5" in text
    assert "usage_log_max_bytes: expected an integer" in text and "usage_log_backups: expected an integer" in text


def lease(token: str, user: str = "alice", host: str = "pc1.corp", product: str = "CADPRO") -> LeaseInfo:
    return LeaseInfo(token, ("CID-A", product), (user, host), user, host, 1, "2.1", host, 0.0, 1, 10.0)


LEASES = [lease("abcd1111" + "0" * 24), lease("abcd2222" + "0" * 24, user="bob"),
          lease("ef001111" + "0" * 24, product="VIEWER"), lease("ef002222" + "0" * 24)]


def test_match_by_names_takes_every_lease_of_that_user_host_and_product() -> None:
    found = match_leases(LEASES, {"product": "CADPRO", "user": "ALICE", "host": "PC1"})
    assert [x.token[:8] for x in found] == ["abcd1111", "ef002222"]
    assert match_leases(LEASES, {"product": "CADPRO", "user": "bob", "host": "pc1", "display": "pc1.corp"}) == [
        LEASES[1]]

def test_match_errors() -> None:
    def code(args: dict[str, str]) -> tuple[ErrorCode, str]:
        with pytest.raises(ProtocolError) as exc:
            match_leases(LEASES, args)
        return exc.value.code, exc.value.message

    c, m = code({"token": "abcd"})
    assert c is ErrorCode.BAD_REQUEST and "matches 2 leases" in m and "abcd1111" in m and "abcd2222" in m
    assert match_leases(LEASES, {"token": "ABCD1"})[0].token.startswith("abcd1111")  # case-insensitive prefix
    c, m = code({"token": "9999"})
    assert c is ErrorCode.LEASE_NOT_FOUND and "no lease token starts with '9999'" in m
    c, m = code({"product": "CADPRO", "user": "carol", "host": "pc1"})
    assert c is ErrorCode.LEASE_NOT_FOUND and "held now: CADPRO by alice@pc1.corp (abcd1111)" in m
    c, m = code({"product": "CADPRO", "user": "alice", "host": "pc1", "display": "nope"})
    assert c is ErrorCode.LEASE_NOT_FOUND and "display nope" in m
    c, m = code({"product": "CADPRO", "host": "pc1"})
    assert c is ErrorCode.BAD_REQUEST and "USER missing" in m
    c, m = code({"token": "abcd1111", "product": "CADPRO"})
    assert c is ErrorCode.BAD_REQUEST and "not both" in m


def ev(t: float, event: str, in_use: int | None = None, **kw: object) -> dict[str, object]:
    e: dict[str, object] = {"epoch": t, "event": event, "customer_id": "C", "product": "P", "user": "u",
                            "host": "h", **kw}
    if in_use is not None:
        e["in_use"] = in_use
    return e


def test_percentile_is_time_weighted() -> None:
    # 10 seats for 4 % of the time, 1 seat for the rest: the peak is 10, the 95th percentile 1.
    events = [ev(0, "checkout", 1, count=10), ev(96, "checkout", 10, count=10), ev(100, "checkin", 0)]
    p = build_report(events).pools[0]
    assert (p.peak, p.p95, p.hours_at_limit) == (10, 1, pytest.approx(4 / 3600))
    # At 6 % of the time, 10 seats reach the 95th percentile.
    events[1] = ev(94, "checkout", 10, count=10)
    assert build_report(events).pools[0].p95 == 10


def test_a_lease_older_than_the_log_is_counted_from_its_held_time() -> None:
    events = [ev(0, "denial", reason="NO_SEATS"), ev(3600, "checkin", 0, held_s=7200.0, lease="x")]
    p = build_report(events, since=0, until=3600).pools[0]
    assert p.top_users == [{"user": "u", "seat_hours": 1.0, "checkouts": 0}]  # clipped to the period


def test_dates() -> None:
    assert parse_date("2024-04-01").isoformat() == "2024-04-01T00:00:00+00:00"
    assert parse_date("2024-04-01", end_of_day=True).isoformat() == "2024-04-02T00:00:00+00:00"
    assert parse_date("2024-04-01T10:00+02:00").isoformat() == "2024-04-01T10:00:00+02:00"
