"""Site restriction, machine fingerprint, activation records and the check order, without a daemon.

Real files in tmp_path; time is passed in, so the 24-hour rule is proved to the second without waiting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from lmgrd import LmgrdError
from lmgrd.config import ConfigInvalid, build_config
from lmgrd.core.activation import Fingerprint
from lmgrd.core.licensing import Licensing
from lmgrd.core.site import Site, site_networks_problems
from lmgrd.storage.activations import ACTIVATIONS_FILE, open_activations
from lmgrd.storage.host import clock_offset, this_fingerprint
from lmgrd.vendor.signing import new_customer_id
from protocol.errors import ErrorCode
from protocol.license import License, Product

ISSUED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def make_license(site: tuple[str, ...] = (), issued: datetime = ISSUED) -> License:
    return License(customer_id=new_customer_id(os.urandom(10)), license_type="multi", customer="Unit Test",
                   hostname="licsrv01", ip="127.0.0.1", products=(Product("CADPRO", "2.1", 2),), issued_at=issued,
                   expires=None, site_networks=site, share="user_host")


# --------------------------------------------------------------------------- site
@pytest.mark.parametrize("addr", ["10.1.2.3", "172.16.0.9", "172.31.255.254", "192.168.1.20", "127.0.0.1",
                                  "127.8.9.10", "169.254.3.4", "::1", "fd12:3456::1", "fc00::5", "fe80::1",
                                  "::ffff:192.168.1.20"])
def test_default_site_is_the_lan(addr: str) -> None:
    assert Site(()).allows(addr)


@pytest.mark.parametrize("addr", ["8.8.8.8", "172.32.0.1", "192.0.2.10", "203.0.113.5", "2001:db8::1",
                                  "2606:4700::1111", "::ffff:8.8.8.8", "not-an-address", ""])
def test_default_site_refuses_public_addresses(addr: str) -> None:
    assert not Site(()).allows(addr)


def test_license_site_networks_replace_the_lan_default() -> None:
    site = Site(("192.0.2.0/24", "2001:db8::/32"))
    assert site.allows("192.0.2.77") and site.allows("2001:db8::9") and site.allows("::ffff:192.0.2.1")
    assert not site.allows("127.0.0.1") and not site.allows("10.0.0.1") and not site.allows("198.51.100.1")
    assert "192.0.2.0/24" in site.text


def test_daemon_config_narrows_but_never_widens() -> None:
    narrow = [ipaddress.ip_network("192.168.10.0/24")]
    lan = Site((), narrow)
    assert lan.allows("192.168.10.5") and not lan.allows("192.168.11.5") and not lan.allows("127.0.0.1")
    # A config network outside the license's site does not add anything.
    wide = Site(("192.0.2.0/24",), [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("127.0.0.0/8")])
    assert not wide.allows("127.0.0.1") and not wide.allows("8.8.8.8") and wide.allows("192.0.2.1")
    assert "narrowed by the daemon config" in wide.text


def test_site_networks_config_is_validated_by_field(tmp_path: Path) -> None:
    assert site_networks_problems(["10.0.0.0/8", "::1/128"]) == []
    probs = site_networks_problems(["10.0.0.1/8", 5, "nonsense"])
    assert [p.split(":")[0] for p in probs] == ["site_networks[0]", "site_networks[1]", "site_networks[2]"]
    with pytest.raises(ConfigInvalid) as info:
        build_config({"site_networks": "10.0.0.0/8", "revocations": [3]},
                     {"licenses": ["a.lic"], "vendor_key": "v.pub"}, "cfg.yaml")
    text = str(info.value)
    assert "site_networks: expected a list" in text and "revocations: expected a path" in text
    cfg = build_config({"revocations": ["a.revoked"]}, {"licenses": ["a.lic"], "vendor_key": "v.pub",
                                                        "revocations": ["b.revoked"]}, "cfg.yaml")
    assert cfg.extra["revocations"] == ["a.revoked", "b.revoked"]


# --------------------------------------------------------------------------- fingerprint
def test_fingerprint_matching_tolerates_interface_changes_only() -> None:
    base = Fingerprint.of("licsrv01.corp.example", "abc123", ["02:00:00:00:00:01", "02:00:00:00:00:02"])
    assert base.matches(Fingerprint.of("LICSRV01", "ABC123", ["02:00:00:00:00:02", "02:00:00:00:00:99"]))
    assert not base.matches(Fingerprint.of("licsrv02", "abc123", ["02:00:00:00:00:01"]))
    assert not base.matches(Fingerprint.of("licsrv01", "other", ["02:00:00:00:00:01"]))
    assert not base.matches(Fingerprint.of("licsrv01", "abc123", ["02:00:00:00:00:03"]))
    assert not base.matches(Fingerprint.of("licsrv01", "abc123", []))
    assert Fingerprint.of("h", "m", []).matches(Fingerprint.of("h", "m", []))
    here = this_fingerprint()
    assert here.matches(this_fingerprint()) and len(here.digest) == 64


# --------------------------------------------------------------------------- activation and the 24-hour rule
def test_pending_until_24_hours_after_issue_then_recorded(tmp_path: Path) -> None:
    lic = make_license()
    acts = open_activations(tmp_path, this_fingerprint())
    err = acts.check(lic, ISSUED + timedelta(hours=24) - timedelta(seconds=1))
    assert err is not None and err[0] is ErrorCode.LICENSE_NOT_ACTIVATED
    assert "2026-03-02 12:00:00 UTC" in err[1] and f"lmutil activate {lic.customer_id}" in err[2]
    assert not (tmp_path / ACTIVATIONS_FILE).exists()
    assert acts.check(lic, ISSUED + timedelta(hours=24)) is None
    doc = json.loads((tmp_path / ACTIVATIONS_FILE).read_text())
    rec = doc["activations"][lic.customer_id]
    assert rec["how"].startswith("automatic") and rec["fingerprint"] == acts.fingerprint.digest
    # A new reader (a restart) sees it active at once, even at an earlier clock.
    assert open_activations(tmp_path, this_fingerprint()).state(lic, ISSUED) == "active"


def test_manual_activation_and_a_moved_record(tmp_path: Path) -> None:
    lic = make_license()
    acts = open_activations(tmp_path, this_fingerprint())
    assert acts.state(lic, ISSUED) == "pending"
    acts.activate(lic, ISSUED + timedelta(minutes=5), "lmutil activate")
    assert acts.check(lic, ISSUED + timedelta(minutes=6)) is None
    elsewhere = open_activations(tmp_path, Fingerprint.of("licsrv01", "another-machine", ["02:00:00:00:00:42"]))
    err = elsewhere.check(lic, ISSUED + timedelta(days=30))
    assert err is not None and err[0] is ErrorCode.LICENSE_MOVED and "reissued license" in err[2]


def test_damaged_activation_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / ACTIVATIONS_FILE).write_text("{not json")
    acts = open_activations(tmp_path, this_fingerprint())
    assert acts.problems and ACTIVATIONS_FILE in acts.problems[0]
    assert acts.state(make_license(), ISSUED) == "pending"


def test_clock_offset_moves_forward_only() -> None:
    assert clock_offset({}) == 0.0
    assert clock_offset({"LMGRD_CLOCK_OFFSET_SECONDS": "86400"}) == 86400.0
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(LmgrdError):
            clock_offset({"LMGRD_CLOCK_OFFSET_SECONDS": bad})


# --------------------------------------------------------------------------- the order of the checks
def test_site_comes_before_activation_and_activation_before_expiry(tmp_path: Path) -> None:
    lic = make_license(site=("192.0.2.0/24",))
    licensing = Licensing([(tmp_path / "a.lic", lic)], [], activations=open_activations(tmp_path, this_fingerprint()))
    now = ISSUED + timedelta(hours=1)
    d = licensing.candidates("CADPRO", "2.1", "127.0.0.1", "alice", "pc1", now)
    assert d.error is not None and d.error[0] is ErrorCode.OUTSIDE_SITE and "127.0.0.1" in d.error[1]
    assert "192.0.2.0/24" in d.error[1]
    d = licensing.candidates("CADPRO", "9.0", "192.0.2.5", "alice", "pc1", now)
    assert d.error is not None and d.error[0] is ErrorCode.LICENSE_NOT_ACTIVATED
    licensing.activate(lic.customer_id, now, "unit test")
    d = licensing.candidates("CADPRO", "9.0", "192.0.2.5", "alice", "pc1", now)
    assert d.error is not None and d.error[0] is ErrorCode.VERSION_NOT_PERMITTED
    assert licensing.candidates("CADPRO", "2.1", "192.0.2.5", "alice", "pc1", now).licenses == (lic,)


def test_a_license_that_expires_while_served_stops_serving_though_its_verdicts_are_remembered(tmp_path: Path) -> None:
    """Licensing remembers a license's product/version verdict (Licensing._use); the expiry is checked first
    on every checkout, so a license granted at 23:59 of its last day refuses at 00:00 the next."""
    lic = dataclasses.replace(make_license(), expires=date(2026, 6, 30))
    licensing = Licensing([(tmp_path / "a.lic", lic)], [])
    last_minute = datetime(2026, 6, 30, 23, 59, tzinfo=UTC)
    assert licensing.candidates("CADPRO", "2.1", "127.0.0.1", "alice", "pc1", last_minute).licenses == (lic,)
    d = licensing.candidates("CADPRO", "9.0", "127.0.0.1", "alice", "pc1", last_minute)
    assert d.error is not None and d.error[0] is ErrorCode.VERSION_NOT_PERMITTED
    next_day = datetime(2026, 7, 1, 0, 0, tzinfo=UTC)
    for version in ("2.1", "9.0"):  # both verdicts were remembered before the expiry
        d = licensing.candidates("CADPRO", version, "127.0.0.1", "alice", "pc1", next_day)
        assert d.error is not None and d.error[0] is ErrorCode.LICENSE_EXPIRED, (version, d)
