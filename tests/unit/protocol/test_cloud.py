"""protocol/cloud.py: the activation service's signed documents, and the license's signed cloud_url."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgrd.vendor.signing import check_request, sign_license
from protocol.cloud import (
    ACTIVATION_CERTIFICATE_SIGNING_DOMAIN,
    OFFLINE_RESPONSE_SIGNING_DOMAIN,
    ActivationCertificate,
    ActivationRequest,
    CheckInRequest,
    CloudDocumentError,
    CloudRevocation,
    OfflineRequest,
    canonical_bytes,
    dumps_document,
    installation_key_text,
    nonce_text,
    parse_answer,
    signed_json,
    verify_activation_request,
    verify_certificate,
    verify_check_in_request,
    verify_cloud_revocation,
    verify_offline_request,
)
from protocol.errors import ErrorCode
from protocol.fingerprint import Fingerprint
from protocol.license import License, Product, canonical_license_bytes, cloud_url_problem, verify_license

CID = "CID-AAAA-BBBB-CCCC-DDDD"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
FP = Fingerprint.of("licsrv01", "0123456789abcdef", ["02:00:00:00:00:01", "02:00:00:00:00:02"])
VENDOR = Ed25519PrivateKey.generate()
INSTALL = Ed25519PrivateKey.generate()
KEY = installation_key_text(INSTALL.public_key())


def nonce() -> str:
    return nonce_text(os.urandom(16))


def activation_request(**changes: Any) -> ActivationRequest:
    fields: dict[str, Any] = dict(customer_id=CID, hostname="licsrv01", addresses=("192.0.2.10",), fingerprint=FP,
                                  installation_key=KEY, nonce=nonce(), sent_at=NOW, mode="manual")
    fields.update(changes)
    return ActivationRequest(**fields)


def certificate(how: str = "manual") -> ActivationCertificate:
    if how == "offline":
        return ActivationCertificate(CID, "licsrv01", FP, KEY, NOW, None, None, None, 0, "offline", nonce())
    return ActivationCertificate(CID, "licsrv01", FP, KEY, NOW, NOW + timedelta(days=30), NOW + timedelta(days=1),
                                 nonce_text(os.urandom(32)), 1, how, nonce())  # type: ignore[arg-type]


def wire(doc: Any, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Signed, then through JSON text and back, as it travels."""
    return json.loads(json.dumps(signed_json(doc, key.sign(canonical_bytes(doc)))))


def test_every_kind_round_trips_through_json_and_verifies() -> None:
    req = activation_request()
    assert verify_activation_request(wire(req, INSTALL)) == req
    off = OfflineRequest(CID, "licsrv01", ("192.0.2.10",), FP, KEY, nonce(), NOW)
    assert verify_offline_request(wire(off, INSTALL)) == off
    chk = CheckInRequest(CID, "licsrv01", (), FP, KEY, nonce(), 3, nonce(), NOW)
    assert verify_check_in_request(wire(chk, INSTALL), KEY) == chk
    for how in ("manual", "automatic", "offline"):
        cert = certificate(how)
        assert verify_certificate(wire(cert, VENDOR), VENDOR.public_key()) == cert
    rev = CloudRevocation(CID, NOW, "license server replaced", "CID-EEEE-FFFF-GGGG-HHHH")
    assert verify_cloud_revocation(wire(rev, VENDOR), VENDOR.public_key()) == rev


@pytest.mark.parametrize(("field", "value"), [
    ("sequence", 2), ("valid_until", "2030-01-01T00:00:00Z"), ("customer_id", "CID-AAAA-BBBB-CCCC-DDDE"),
    ("token", "A" * 43),
])
def test_a_tampered_certificate_is_refused(field: str, value: object) -> None:
    signed = wire(certificate(), VENDOR)
    signed["document"][field] = value
    with pytest.raises(CloudDocumentError) as err:
        verify_certificate(signed, VENDOR.public_key())
    assert err.value.code is ErrorCode.LICENSE_INVALID
    assert "does not verify" in err.value.message


def test_a_tampered_revocation_and_another_vendor_key_are_refused() -> None:
    signed = wire(CloudRevocation(CID, NOW, "fraud", None), VENDOR)
    tampered = copy.deepcopy(signed)
    tampered["document"]["replaced_by"] = "CID-EEEE-FFFF-GGGG-HHHH"
    for doc, key in ((tampered, VENDOR.public_key()), (signed, Ed25519PrivateKey.generate().public_key())):
        with pytest.raises(CloudDocumentError) as err:
            verify_cloud_revocation(doc, key)
        assert err.value.code is ErrorCode.LICENSE_INVALID


def test_domains_keep_kinds_apart() -> None:
    online, offline = certificate(), certificate("offline")
    assert canonical_bytes(online).startswith(ACTIVATION_CERTIFICATE_SIGNING_DOMAIN)
    assert canonical_bytes(offline).startswith(OFFLINE_RESPONSE_SIGNING_DOMAIN)
    # A request signed by the installation key can never pass as a check-in (same key, another domain).
    req = activation_request()
    sig = INSTALL.sign(canonical_bytes(req))
    chk = CheckInRequest(CID, "licsrv01", ("192.0.2.10",), FP, KEY, nonce(), 1, req.nonce, NOW)
    fake = json.loads(json.dumps(signed_json(chk, sig)))
    with pytest.raises(CloudDocumentError):
        verify_check_in_request(fake, KEY)


def test_an_offline_certificate_cannot_be_relabelled_online() -> None:
    signed = wire(certificate("offline"), VENDOR)
    signed["document"]["how"] = "manual"
    with pytest.raises(CloudDocumentError, match="kind"):
        verify_certificate(signed, VENDOR.public_key())


def test_check_in_needs_the_key_on_record() -> None:
    other = installation_key_text(Ed25519PrivateKey.generate().public_key())
    chk = CheckInRequest(CID, "licsrv01", (), FP, KEY, nonce(), 1, nonce(), NOW)
    with pytest.raises(CloudDocumentError, match="installation_key"):
        verify_check_in_request(wire(chk, INSTALL), other)
    # Signed by another private key than the one it names: refused.
    with pytest.raises(CloudDocumentError) as err:
        verify_check_in_request(wire(chk, Ed25519PrivateKey.generate()), KEY)
    assert err.value.code is ErrorCode.LICENSE_INVALID


@pytest.mark.parametrize(("path", "value", "expect"), [
    (("document", "addresses"), ["not-an-ip"], "document.addresses[0]"),
    (("document", "mode"), "later", "document.mode"),
    (("document", "fingerprint", "macs"), ["xyz"], "document.fingerprint.macs[0]"),
    (("document", "nonce"), "short", "document.nonce"),
    (("document", "sent_at"), 12, "document.sent_at"),
    (("document", "extra"), 1, "unknown field 'extra'"),
    (("document", "format"), 2, "unsupported format"),
    (("document", "kind"), "check_in_request", "document.kind"),
    (("signature",), "rsa:AAAA", "signature"),
])
def test_malformed_fields_are_named(path: tuple[str, ...], value: object, expect: str) -> None:
    signed = wire(activation_request(), INSTALL)
    target = signed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(CloudDocumentError) as err:
        verify_activation_request(signed)
    assert err.value.code is ErrorCode.BAD_REQUEST
    assert expect in err.value.message


def test_offline_documents_fit_a_qr_code() -> None:
    req = OfflineRequest(CID, "licsrv01", ("192.0.2.10", "2001:db8::10"), FP, KEY, nonce(), NOW)
    assert len(dumps_document(signed_json(req, INSTALL.sign(canonical_bytes(req))))) < 1500
    cert = certificate("offline")
    assert len(dumps_document(signed_json(cert, VENDOR.sign(canonical_bytes(cert))))) < 1500


def test_parse_answer_reads_each_status() -> None:
    pub = VENDOR.public_key()
    active = parse_answer(200, json.dumps({"status": "active", "certificate": wire(certificate(), VENDOR)}).encode(),
                          pub)
    assert active.status == "active" and active.certificate is not None and not active.service_said_no
    pending = parse_answer(202, json.dumps({"status": "pending", "activates_at": "2026-03-02T12:00:00Z", "error": {
        "code": "LICENSE_NOT_ACTIVATED", "message": "pending", "hint": ""}}).encode(), pub)
    assert pending.code is ErrorCode.LICENSE_NOT_ACTIVATED and pending.activates_at == NOW + timedelta(days=1)
    conflict = parse_answer(409, json.dumps({"status": "error", "conflict": {"hostname": "other", "since": (
        "2026-03-01T12:00:00Z")}, "error": {"code": "ACTIVATION_CONFLICT", "message": "m"}}).encode(), pub)
    assert conflict.conflict_hostname == "other" and conflict.service_said_no
    limited = parse_answer(429, json.dumps({"status": "error", "retry_after_seconds": 7, "error": {
        "code": "RATE_LIMITED", "message": "slow down"}}).encode(), pub)
    assert limited.retry_after_seconds == 7 and not limited.service_said_no
    forged = wire(certificate(), Ed25519PrivateKey.generate())
    with pytest.raises(CloudDocumentError) as err:
        parse_answer(200, json.dumps({"status": "active", "certificate": forged}).encode(), pub)
    assert err.value.code is ErrorCode.LICENSE_INVALID
    with pytest.raises(CloudDocumentError):
        parse_answer(502, b"<html>Bad gateway</html>", pub)


@pytest.mark.parametrize(("url", "ok"), [
    ("https://activation.vendor.example", True), ("https://activation.vendor.example:8443/lm", True),
    ("http://127.0.0.1:8080", True), ("http://[::1]:8080/", True), ("http://localhost:1", True),
    ("http://activation.vendor.example", False), ("http://192.0.2.1", False), ("ftp://x.example", False),
    ("https://user@x.example", False), ("https://x.example/?q=1", False), ("https://x.example:99999", False),
    ("https://::1/", False), (42, False),
])
def test_cloud_url_rule(url: object, ok: bool) -> None:
    assert (cloud_url_problem(url) is None) is ok


def _license(cloud_url: str | None) -> License:
    return License(CID, "multi", "Example", "licsrv01", "192.0.2.10", (Product("CADPRO", "2.1", 5),), NOW,
                   date(2027, 12, 31), (), "user_host", cloud_url)


def test_cloud_url_is_signed_and_absent_fields_keep_old_bytes() -> None:
    with_url, without = _license("https://activation.vendor.example"), _license(None)
    assert b"cloud_url" in canonical_license_bytes(with_url)
    assert b"cloud_url" not in canonical_license_bytes(without)
    text = sign_license(with_url, VENDOR)
    assert verify_license(text, VENDOR.public_key(), "x.lic").cloud_url == "https://activation.vendor.example"
    # Removing the line (to fall back to the local 24-hour rule) breaks the signature.
    stripped = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("cloud_url"))
    with pytest.raises(Exception, match="signature does not verify"):
        verify_license(stripped, VENDOR.public_key(), "x.lic")


def test_registration_request_takes_cloud_url() -> None:
    base = {"license_type": "multi", "customer": "Example", "host": {"hostname": "licsrv01", "ip": "192.0.2.10"},
            "products": [{"name": "CADPRO", "version": "2.1", "count": 5}]}
    spec, problems = check_request({**base, "cloud_url": "https://activation.vendor.example"}, date(2026, 1, 1))
    assert problems == [] and spec is not None and spec.cloud_url == "https://activation.vendor.example"
    spec, problems = check_request({**base, "cloud_url": "http://activation.vendor.example"}, date(2026, 1, 1))
    assert spec is None and [p.path for p in problems] == ["cloud_url"]
    assert "loopback" in problems[0].message


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
                     lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children,
                                                                                     max_size=6), max_leaves=20)


@settings(max_examples=50, deadline=None)
@given(st.one_of(_json, st.fixed_dictionaries({"document": _json, "signature": _json}),
                 st.fixed_dictionaries({"document": st.fixed_dictionaries(
                     {"format": st.just(1), "kind": st.just("activation_request")}, optional={
                         k: _json for k in ("customer_id", "hostname", "addresses", "fingerprint", "installation_key",
                                            "nonce", "sent_at", "mode")}), "signature": st.text(max_size=100)})))
def test_any_json_is_a_document_or_a_cloud_document_error(data: object) -> None:
    """What a client sends is either verified or refused with CloudDocumentError: nothing else escapes."""
    for verify in (verify_activation_request, verify_offline_request,
                   lambda d: verify_check_in_request(d, KEY),
                   lambda d: verify_certificate(d, VENDOR.public_key()),
                   lambda d: verify_cloud_revocation(d, VENDOR.public_key())):
        with contextlib.suppress(CloudDocumentError):
            verify(data)
    with contextlib.suppress(CloudDocumentError):
        parse_answer(400, json.dumps(data).encode(), VENDOR.public_key())


# --------------------------------------------------------------------------- the wire format, pinned
_FIXED_KEY = base64.b64encode(bytes(range(32))).decode()
_N1, _N2 = nonce_text(bytes(range(16))), nonce_text(bytes(range(16, 48)))
#: sha256 of the canonical bytes of fixed documents, from before the document classes shared a base: any change
#: to a field, its order in the signed map, a domain or the encoding changes a digest (and breaks every signature
#: already issued).
PINNED = [
    (ActivationRequest(CID, "licsrv01", ("192.0.2.10", "2001:db8::10"), FP, _FIXED_KEY, _N1, NOW, "automatic"),
     "74c0d452f1928ea4d842104ba19ab51099293343eef04c4e826314d4d6f9babc"),
    (OfflineRequest(CID, "licsrv01", ("192.0.2.10",), FP, _FIXED_KEY, _N1, NOW),
     "a7765bcf31d4966812c48b85f40229cde153505cffe5db944b9897cded399ac9"),
    (CheckInRequest(CID, "licsrv01", (), FP, _FIXED_KEY, _N2, 7, _N1, NOW),
     "039817cba877508024c93b667d73516db3ec51912089f993071d52b5f6ed1e57"),
    (ActivationCertificate(CID, "licsrv01", FP, _FIXED_KEY, NOW, NOW + timedelta(days=30), NOW + timedelta(days=1),
                           _N2, 1, "manual", _N1),
     "47419e0d6c3c8d519901ca6ecf5e09256514fab4d09882fdbd1cb884c1b03c58"),
    (ActivationCertificate(CID, "licsrv01", FP, _FIXED_KEY, NOW, None, None, None, 0, "offline", _N1),
     "96fe4bbaeb3918b0e3391ac3a48c0f61d3f4cb5f260ea372d3682d73ec6f4519"),
    (CloudRevocation(CID, NOW, "license server replaced", "CID-EEEE-FFFF-GGGG-HHHH"),
     "104914e40c7571c6a8f9307ac775e3f8e13944a0a4008cc50b5ee1241d72b8e5"),
]


@pytest.mark.parametrize(("doc", "digest"), PINNED, ids=lambda x: type(x).__name__ if not isinstance(x, str) else "")
def test_the_canonical_bytes_of_every_kind_are_pinned(doc: Any, digest: str) -> None:
    assert hashlib.sha256(canonical_bytes(doc)).hexdigest() == digest


def test_constructing_a_document_checks_its_times_and_fields() -> None:
    with pytest.raises(ValueError, match="sent_at must be a timezone-aware datetime"):
        OfflineRequest(CID, "licsrv01", (), FP, KEY, nonce(), datetime(2026, 3, 1))
    with pytest.raises(ValueError, match="issued_at must be a timezone-aware datetime"):
        ActivationCertificate(CID, "licsrv01", FP, KEY, None, None, None, None, 0, "offline", nonce())  # type: ignore[arg-type]
    with pytest.raises(CloudDocumentError, match=r"document\.hostname"):
        CheckInRequest(CID, "設計pc", (), FP, KEY, nonce(), 1, nonce(), NOW)
    local = datetime(2026, 3, 1, 21, 0, 0, 999, tzinfo=timezone(timedelta(hours=9)))
    assert OfflineRequest(CID, "licsrv01", (), FP, KEY, nonce(), local).sent_at == NOW  # UTC, whole seconds


_times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1),
                      timezones=st.just(UTC))
_nonces = st.binary(min_size=16, max_size=64).map(nonce_text)
_hosts = st.from_regex(r"[a-z]([a-z0-9-]{0,18}[a-z0-9])?", fullmatch=True)
_ips = st.lists(st.ip_addresses().map(str), max_size=4, unique=True).map(tuple)
_cids = st.just(CID) | st.just("CID-EEEE-FFFF-GGGG-HHHH")
_macs = st.lists(st.text("0123456789abcdef", min_size=12, max_size=12), max_size=3, unique=True)
_fps = st.builds(Fingerprint.of, _hosts, st.text("0123456789abcdef", min_size=8, max_size=32), _macs)


@st.composite
def _certificates(draw: st.DrawFn) -> ActivationCertificate:
    issued = draw(_times)
    if draw(st.booleans()):
        return ActivationCertificate(draw(_cids), draw(_hosts), draw(_fps), KEY, issued,
                                     draw(st.none() | st.just(issued + timedelta(days=365))), None, None, 0, "offline",
                                     draw(_nonces))
    return ActivationCertificate(draw(_cids), draw(_hosts), draw(_fps), KEY, issued, issued + timedelta(days=30),
                                 issued + timedelta(days=1), draw(_nonces), draw(st.integers(1, 2**53)),
                                 draw(st.sampled_from(["manual", "automatic"])), draw(_nonces))


_documents = st.one_of(
    st.builds(ActivationRequest, _cids, _hosts, _ips, _fps, st.just(KEY), _nonces, _times,
              st.sampled_from(["manual", "automatic"])),
    st.builds(OfflineRequest, _cids, _hosts, _ips, _fps, st.just(KEY), _nonces, _times),
    st.builds(CheckInRequest, _cids, _hosts, _ips, _fps, st.just(KEY), _nonces, st.integers(0, 2**53), _nonces, _times),
    _certificates(),
    st.builds(CloudRevocation, _cids, _times, st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
                                                      max_size=80).map(str.strip).filter(bool), st.none() | _cids),
)


@settings(max_examples=60, deadline=None)
@given(_documents)
def test_every_document_round_trips_through_its_signed_json(doc: Any) -> None:
    """Any valid document of any kind: signed, sent as JSON text, parsed and verified, it is the same document with
    the same canonical bytes, and the fields of its JSON are those of its class in order."""
    key = VENDOR if isinstance(doc, ActivationCertificate | CloudRevocation) else INSTALL
    signed = wire(doc, key)
    verify: Any = {ActivationRequest: verify_activation_request, OfflineRequest: verify_offline_request,
                   CheckInRequest: lambda d: verify_check_in_request(d, KEY),
                   ActivationCertificate: lambda d: verify_certificate(d, VENDOR.public_key()),
                   CloudRevocation: lambda d: verify_cloud_revocation(d, VENDOR.public_key())}[type(doc)]
    back = verify(signed)
    assert back == doc and type(back) is type(doc)
    assert canonical_bytes(back) == canonical_bytes(doc)
    assert list(signed["document"])[2:] == [f.name for f in dataclasses.fields(doc)]
    assert json.loads(dumps_document(signed)) == signed
