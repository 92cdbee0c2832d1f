"""lmgrd/core/cloud.py: what a license with a cloud_url may serve, from real signed answers of the service's
format (protocol/cloud.py), and the records written to and read back from a real state directory."""

from __future__ import annotations

import copy
import json
import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd.config import ConfigInvalid, build_config
from lmgrd.core.cloud import WARN_BEFORE, CloudActivations, jittered, read_cloud_license
from lmgrd.storage.cloud import installation_key, open_cloud, read_cloud_state
from protocol.cloud import (
    ActivationCertificate,
    CloudRevocation,
    canonical_bytes,
    installation_key_text,
    nonce_text,
    parse_answer,
    signed_json,
)
from protocol.errors import ErrorCode
from protocol.fingerprint import Fingerprint
from protocol.license import License, Product

CID = "CID-AAAA-BBBB-CCCC-DDDD"
NEW_CID = "CID-EEEE-FFFF-GGGG-HHHH"
URL = "https://activation.vendor.example"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
FP = Fingerprint.of("licsrv01", "0123456789abcdef", ["02:00:00:00:00:01", "02:00:00:00:00:02"])
OTHER_FP = Fingerprint.of("licsrv02", "fedcba9876543210", ["02:00:00:00:00:09"])
VENDOR = Ed25519PrivateKey.generate()
LIC = License(CID, "multi", "Test Customer", "licsrv01", "192.0.2.10", (Product("CADPRO", "2.1", 3),),
              NOW - timedelta(hours=1), date(2027, 1, 1), (), "user_host", cloud_url=URL)


def cert(key: str, *, seq: int = 1, valid_for: timedelta = timedelta(days=30), fp: Fingerprint = FP,
         how: str = "manual", cid: str = CID) -> ActivationCertificate:
    if how == "offline":
        return ActivationCertificate(cid, "licsrv01", fp, key, NOW, datetime(2027, 1, 1, 23, 59, 59, tzinfo=UTC),
                                     None, None, 0, "offline", nonce_text(os.urandom(16)))
    return ActivationCertificate(cid, "licsrv01", fp, key, NOW, NOW + valid_for, NOW + valid_for / 2,
                                 nonce_text(os.urandom(32)), seq, how, nonce_text(os.urandom(16)))  # type: ignore[arg-type]


def signed(doc: Any, key: Ed25519PrivateKey = VENDOR) -> dict[str, Any]:
    return json.loads(json.dumps(signed_json(doc, key.sign(canonical_bytes(doc)))))


def body(status: str, **parts: Any) -> bytes:
    return json.dumps({"status": status, **parts}).encode()


def answer(http: int, raw: bytes) -> tuple[Any, dict[str, Any]]:
    return parse_answer(http, raw, VENDOR.public_key()), json.loads(raw)


@pytest.fixture
def state(tmp_path: Path) -> tuple[CloudActivations, str, Path]:
    cloud = open_cloud(tmp_path, [LIC], VENDOR.public_key(), FP)
    assert cloud is not None
    return cloud, cloud.installation_key, tmp_path


def reopen(tmp_path: Path) -> CloudActivations:
    cloud = open_cloud(tmp_path, [LIC], VENDOR.public_key(), FP)
    assert cloud is not None
    return cloud


def test_the_installation_key_is_made_once_and_kept(tmp_path: Path) -> None:
    a = installation_key(tmp_path)
    b = installation_key(tmp_path)
    assert installation_key_text(a.public_key()) == installation_key_text(b.public_key())
    assert (tmp_path / "cloud" / "installation.key").stat().st_mode & 0o777 == 0o600


def test_pending_refuses_with_the_service_url_and_how_to_activate(state: Any) -> None:
    cloud, _key, _dir = state
    err = cloud.check(LIC, NOW)
    assert err is not None and err[0] is ErrorCode.LICENSE_NOT_ACTIVATED
    assert URL in err[1] and f"lmutil activate {CID}" in err[2]
    at = NOW + timedelta(hours=23)
    a, raw = answer(202, body("pending", activates_at="2026-03-02T11:00:00Z",
                              error={"code": "LICENSE_NOT_ACTIVATED", "message": "pending", "hint": ""}))
    assert cloud.accept(CID, a, raw, NOW) == "pending"
    err = cloud.check(LIC, NOW)
    assert err is not None and err[0] is ErrorCode.LICENSE_NOT_ACTIVATED and "2026-03-02 11:00:00 UTC" in err[1]
    assert cloud.state(LIC, at) == "pending"  # the local clock never activates a cloud license


def test_a_certificate_serves_until_valid_until_and_survives_a_restart(state: Any) -> None:
    cloud, key, tmp = state
    a, raw = answer(200, body("active", certificate=signed(cert(key, valid_for=timedelta(days=10)))))
    assert cloud.accept(CID, a, raw, NOW) == "active"
    assert cloud.check(LIC, NOW) is None
    again = reopen(tmp)
    assert again.check(LIC, NOW + timedelta(days=9)) is None
    err = again.check(LIC, NOW + timedelta(days=10, seconds=1))
    assert err is not None and err[0] is ErrorCode.LICENSE_NOT_ACTIVATED and "expired" in err[1]


def test_unreachable_keeps_serving_warns_from_seven_days_then_refuses_naming_url_and_last_contact(state: Any) -> None:
    cloud, key, _tmp = state
    a, raw = answer(200, body("active", certificate=signed(cert(key, valid_for=timedelta(days=30)))))
    cloud.accept(CID, a, raw, NOW)
    later = NOW + timedelta(days=20)
    assert cloud.unreachable(CID, f"{URL}/v1/check-ins: connection refused", later) == "unreachable"
    assert cloud.check(LIC, later) is None  # an outage is not the service's word
    assert cloud.warning(LIC, later) is None  # 10 days left: no warning yet
    near = NOW + timedelta(days=30) - WARN_BEFORE + timedelta(seconds=1)
    warning = cloud.warning(LIC, near)
    assert warning is not None and URL in warning and "2026-03-01 12:00:00 UTC" in warning
    assert cloud.check(LIC, near) is None
    err = cloud.check(LIC, NOW + timedelta(days=30, seconds=1))
    assert err is not None and err[0] is ErrorCode.LICENSE_NOT_ACTIVATED
    assert URL in err[1] and "last reached 2026-03-01 12:00:00 UTC" in err[1] and "connection refused" in err[1]


def test_5xx_429_and_unverifiable_answers_are_unreachable_not_a_no(state: Any) -> None:
    cloud, key, _tmp = state
    a, raw = answer(200, body("active", certificate=signed(cert(key))))
    cloud.accept(CID, a, raw, NOW)
    for http, code in ((503, "STORE_UNAVAILABLE"), (429, "RATE_LIMITED"), (500, "INTERNAL_ERROR")):
        a, raw = answer(http, body("error", error={"code": code, "message": "busy", "hint": ""}))
        assert cloud.accept(CID, a, raw, NOW + timedelta(days=1)) == "unreachable"
        assert cloud.check(LIC, NOW + timedelta(days=1)) is None
    # A certificate for another installation key (an impostor's, or a clone's) is not adopted.
    foreign = installation_key_text(Ed25519PrivateKey.generate().public_key())
    a, raw = answer(200, body("active", certificate=signed(cert(foreign, seq=2))))
    assert cloud.accept(CID, a, raw, NOW) == "unreachable"
    assert cloud.licenses[CID].certificate is not None and cloud.licenses[CID].certificate.installation_key == key
    # An older sequence than the one held (a replayed answer) is not adopted either.
    a, raw = answer(200, body("active", certificate=signed(cert(key, seq=1))))
    cloud.accept(CID, answer(200, body("active", certificate=signed(cert(key, seq=5))))[0],
                 answer(200, body("active", certificate=signed(cert(key, seq=5))))[1], NOW)
    held = cloud.licenses[CID].certificate
    assert cloud.accept(CID, a, raw, NOW) == "unreachable"
    assert cloud.licenses[CID].certificate is held


def test_conflict_stops_new_seats_and_says_so(state: Any) -> None:
    cloud, key, _tmp = state
    a, raw = answer(200, body("active", certificate=signed(cert(key))))
    cloud.accept(CID, a, raw, NOW)
    a, raw = answer(409, body("error", error={"code": "ACTIVATION_CONFLICT", "message": "stale check-in token: a "
                                              "copy of this installation checked in since", "hint": "reissue"}))
    assert cloud.accept(CID, a, raw, NOW) == "refused"
    err = cloud.check(LIC, NOW)
    assert err is not None and err[0] is ErrorCode.ACTIVATION_CONFLICT and "stale check-in token" in err[1]


def test_a_revocation_is_stored_for_good_and_names_the_successor(state: Any) -> None:
    cloud, key, tmp = state
    a, raw = answer(200, body("active", certificate=signed(cert(key))))
    cloud.accept(CID, a, raw, NOW)
    rev = CloudRevocation(CID, NOW, "license server replaced", NEW_CID)
    a, raw = answer(410, body("revoked", revocation=signed(rev),
                              error={"code": "LICENSE_REVOKED", "message": "superseded", "hint": ""}))
    assert cloud.accept(CID, a, raw, NOW) == "revoked"
    err = cloud.check(LIC, NOW)
    assert err is not None and err[0] is ErrorCode.LICENSE_REVOKED and NEW_CID in err[1] and NEW_CID in err[2]
    again = reopen(tmp)  # a restart
    again.unreachable(CID, "connection refused", NOW + timedelta(days=1))  # and a later outage
    err = again.check(LIC, NOW + timedelta(days=1))
    assert err is not None and err[0] is ErrorCode.LICENSE_REVOKED
    assert again.due(CID, poll_interval=900, check_in_interval=86400, rand=0.5) is None


def test_tampered_stored_certificate_and_revocation_are_refused(state: Any) -> None:
    cloud, key, tmp = state
    a, raw = answer(200, body("active", certificate=signed(cert(key, valid_for=timedelta(days=1)))))
    cloud.accept(CID, a, raw, NOW)
    path = tmp / "cloud" / f"{CID}.json"
    doc = json.loads(path.read_text())
    doc["certificate"]["document"]["valid_until"] = "2099-01-01T00:00:00Z"  # stretch it by hand
    path.write_text(json.dumps(doc))
    again = reopen(tmp)
    assert any("certificate is refused" in p and "does not verify" in p for p in again.problems)
    assert again.licenses[CID].certificate is None
    err = again.check(LIC, NOW)
    assert err is not None and err[0] is ErrorCode.LICENSE_NOT_ACTIVATED
    # A revocation whose successor was edited revokes nothing, and says so.
    rev = signed(CloudRevocation(CID, NOW, "superseded", NEW_CID))
    forged = copy.deepcopy(rev)
    forged["document"]["replaced_by"] = "CID-ZZZZ-ZZZZ-ZZZZ-ZZZZ"
    doc["revocation"] = forged
    path.write_text(json.dumps(doc))
    again = reopen(tmp)
    assert any("revocation is refused" in p for p in again.problems)
    assert again.licenses[CID].revocation is None


def test_a_certificate_for_another_machine_is_moved(state: Any) -> None:
    cloud, key, tmp = state
    a, raw = answer(200, body("active", certificate=signed(cert(key))))
    cloud.accept(CID, a, raw, NOW)
    moved = open_cloud(tmp, [LIC], VENDOR.public_key(), OTHER_FP)  # the state directory on another machine
    assert moved is not None
    err = moved.check(LIC, NOW)
    assert err is not None and err[0] is ErrorCode.LICENSE_MOVED


def test_offline_certificate_serves_until_expiry_and_needs_no_check_in(state: Any) -> None:
    cloud, key, _tmp = state
    off = cert(key, how="offline")
    cloud.install_offline(CID, off, signed(off), NOW)
    assert cloud.check(LIC, datetime(2026, 12, 31, tzinfo=UTC)) is None
    assert cloud.due(CID, poll_interval=900, check_in_interval=86400, rand=0.0) is None
    assert cloud.warning(LIC, datetime(2026, 12, 31, tzinfo=UTC)) is None


def test_schedule_polls_while_pending_and_checks_in_when_active(state: Any) -> None:
    cloud, key, _tmp = state
    kind, when = cloud.due(CID, poll_interval=900, check_in_interval=86400, rand=0.0) or ("", NOW)
    assert kind == "activate" and when < NOW  # at start: now
    cloud.unreachable(CID, "refused", NOW)
    assert cloud.due(CID, poll_interval=900, check_in_interval=86400, rand=0.0) == (
        "activate", NOW + timedelta(seconds=900))
    a, raw = answer(200, body("active", certificate=signed(cert(key, valid_for=timedelta(days=30)))))
    cloud.accept(CID, a, raw, NOW)
    due = cloud.due(CID, poll_interval=900, check_in_interval=3600, rand=0.5)
    assert due == ("check_in", NOW + timedelta(seconds=jittered(3600, 0.5)))
    assert 0.9 * 3600 <= jittered(3600, 0.999) <= 3600 and jittered(0.5, 0.0) == 1.0


def test_the_stored_state_is_the_documented_json(state: Any) -> None:
    cloud, key, tmp = state
    a, raw = answer(200, body("active", certificate=signed(cert(key))))
    cloud.accept(CID, a, raw, NOW)
    stored, problems = read_cloud_state(tmp, CID)
    assert problems == [] and stored["format"] == 1 and stored["certificate"] == raw["certificate"]
    assert stored["last_reached_at"] == "2026-03-01T12:00:00Z"
    rebuilt, problems = read_cloud_license(LIC, stored, VENDOR.public_key(), key, "x")
    assert problems == [] and rebuilt.certificate == cloud.licenses[CID].certificate


@pytest.mark.parametrize(("values", "needle"), [
    ({"cloud_poll_interval": 0.5}, "cloud_poll_interval: expected a number from 1"),
    ({"cloud_check_in_interval": True}, "cloud_check_in_interval: expected a number"),
    ({"cloud_proxy": "proxy:3128"}, "cloud_proxy: expected a proxy URL"),
    ({"cloud_ca_file": 3}, "cloud_ca_file: expected a path"),
])
def test_cloud_settings_are_validated(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        build_config({"licenses": ["a.lic"], "vendor_key": "v.pub", **values}, {}, "lmgrd.yaml")
    assert any(needle in p for p in info.value.problems), info.value.problems


def test_cloud_settings_defaults_and_flags() -> None:
    cfg = build_config({"licenses": ["a.lic"], "vendor_key": "v.pub", "cloud_proxy": "http://proxy:3128"},
                       {"cloud_poll_interval": 2.0, "cloud_ca_file": "/etc/ca.pem"}, "lmgrd.yaml")
    assert cfg.cloud_poll_interval == 2.0 and cfg.cloud_check_in_interval == 86400.0
    assert cfg.cloud_proxy == "http://proxy:3128" and str(cfg.cloud_ca_file) == "/etc/ca.pem"
    assert build_config({"licenses": ["a.lic"], "vendor_key": "v.pub"}, {}, "x").cloud_poll_interval == 900.0


def test_lmstat_extended_shows_the_service_state_and_the_warning_but_flexnet_layout_does_not() -> None:
    from lmgrd import lmstat_text

    data = {"pools": [], "cloud": [{"customer_id": CID, "url": URL, "state": "active", "how": "manual",
                                    "valid_until": "2026-03-31T12:00:00Z", "last_reached_at": "2026-03-01T12:00:00Z",
                                    "last_error": "connection refused", "warning": "the service is unreachable"}]}
    text = lmstat_text.render_extended(data, 0.0)
    assert f"activation service {URL}: license {CID} active, certificate (manual) valid until 2026-03-31T12:00:00Z" \
        in text and "last error: connection refused" in text and "WARNING: the service is unreachable" in text
    flexnet = lmstat_text.render_lmstat({**data, "hostname": "licsrv01", "license_files": []}, port=27000,
                                        now=NOW.replace(tzinfo=None), features=True, users=True)
    assert URL not in flexnet and "WARNING" not in flexnet


def test_cloud_check_picks_the_proxy_as_httpx_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmgrd.cloudcheck import proxy_for

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for(URL, None) == (None, "no proxy set (HTTPS_PROXY unset)")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert proxy_for(URL, None) == ("http://proxy.example:3128", "HTTPS_PROXY")
    monkeypatch.setenv("NO_PROXY", "activation.vendor.example")
    assert proxy_for(URL, None)[0] is None
    assert proxy_for(URL, "http://other:8080") == ("http://other:8080", "cloud_proxy")


def test_a_check_in_the_service_knows_nothing_about_leads_to_a_new_activation(state: Any) -> None:
    cloud, key, _tmp = state
    a, raw = answer(200, body("active", certificate=signed(cert(key))))
    cloud.accept(CID, a, raw, NOW)
    a, raw = answer(409, body("error", error={"code": "LICENSE_NOT_ACTIVATED", "message": "no activation for this "
                                              "installation", "hint": "activate first"}))
    assert cloud.accept(CID, a, raw, NOW) == "refused"
    assert cloud.check(LIC, NOW) is None  # the certificate still serves until valid_until
    assert cloud.due(CID, poll_interval=5, check_in_interval=86400, rand=0.0) == ("activate",
                                                                                 NOW + timedelta(seconds=5))


@pytest.mark.parametrize(("proxy", "shown"), [
    ("http://user:s3cret@proxy.example:3128", "http://proxy.example:3128"),
    ("https://proxy.example/", "https://proxy.example"),
    (None, "none (HTTPS_PROXY / NO_PROXY apply)"),
])
def test_a_logged_proxy_never_shows_its_credentials(proxy: str | None, shown: str) -> None:
    from lmgrd.daemon.cloudhttp import proxy_text

    assert proxy_text(proxy) == shown
