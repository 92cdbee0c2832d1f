"""Signed licenses: format round trip, tamper detection, request checks, use decisions, host matching."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgrd.vendor.signing import (
    format_license,
    sign_license,
    sign_revocation,
)
from protocol.errors import ErrorCode, ProtocolError
from protocol.license import (
    LICENSE_SIGNING_DOMAIN,
    REVOCATION_SIGNING_DOMAIN,
    License,
    LicenseFileError,
    Product,
    Revocation,
    canonical_license_bytes,
    canonical_revocation_bytes,
    document_kind,
    evaluate_use,
    host_mismatch,
    parse_license,
    verify_license,
    verify_revocation,
)
from protocol.validation import HOSTNAME_RULE

KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
SOURCE = "/etc/lmgrd/customer.lic"
ISSUED = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)


def make_license(**changes: object) -> License:
    fields: dict[str, object] = {
        "customer_id": "CID-ABCD-EFGH-IJKL-MNOP",
        "license_type": "multi",
        "customer": "Example Engineering Tokyo",
        "hostname": "licsrv01",
        "ip": "192.0.2.10",
        "products": (Product("CADPRO", "2.1", 25), Product("CADVIEW", "5", 100)),
        "issued_at": ISSUED,
        "expires": date(2027, 12, 31),
        "site_networks": ("192.0.2.0/24", "198.51.100.0/24"),
        "share": "user_host",
    }
    fields.update(changes)
    return License(**fields)  # type: ignore[arg-type]


LIC = make_license()
TEXT = sign_license(LIC, KEY)


# --------------------------------------------------------------------------------------------------
# Round trip and format


def test_round_trip() -> None:
    assert verify_license(TEXT, KEY.public_key(), SOURCE) == LIC


def test_round_trip_without_expiry_networks_and_single() -> None:
    lic = make_license(
        license_type="single", products=(Product("CADPRO", "2.1", 1),), expires=None, site_networks=(), share="host"
    )
    text = sign_license(lic, KEY)
    assert "expires       never" in text
    assert "site_network" not in text
    assert verify_license(text, KEY.public_key(), SOURCE) == lic


def test_format_is_human_readable_line_oriented() -> None:
    lines = TEXT.splitlines()
    assert lines[0].startswith("#")
    header = " ".join(line for line in lines if line.startswith("#"))
    assert "invalidates the signature" in header
    assert "product       CADPRO version=2.1 count=25" in lines
    assert "product       CADVIEW version=5 count=100" in lines
    assert "customer      Example Engineering Tokyo" in lines
    assert "issued_at     2025-03-01T09:30:00Z" in lines
    assert lines[-1].startswith("signature     ed25519:")
    assert TEXT.endswith("\n")


def test_issued_at_is_normalised_to_utc_seconds() -> None:
    jst = timezone(timedelta(hours=9))
    lic = make_license(issued_at=datetime(2025, 3, 1, 18, 30, 0, 123456, tzinfo=jst))
    assert lic.issued_at == ISSUED
    assert lic.issued_at.tzinfo == UTC


def test_japanese_customer_name_round_trips() -> None:
    lic = make_license(customer="株式会社サンプル　東京")
    assert verify_license(sign_license(lic, KEY), KEY.public_key(), SOURCE).customer == "株式会社サンプル　東京"


def test_crlf_and_bom_are_tolerated() -> None:
    text = "\ufeff" + TEXT.replace("\n", "\r\n")
    assert verify_license(text, KEY.public_key(), SOURCE) == LIC


def test_comment_lines_are_not_signed() -> None:
    text = "# received from the vendor by e-mail on 2025-03-02\n" + TEXT
    assert verify_license(text, KEY.public_key(), SOURCE) == LIC


def test_helpers() -> None:
    assert LIC.product("CADPRO") == Product("CADPRO", "2.1", 25)
    assert LIC.product("cadpro") is None
    assert LIC.expires_at == datetime(2027, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert make_license(expires=None).expires_at is None


def test_license_is_frozen_and_slotted() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        LIC.customer = "x"  # type: ignore[misc]
    assert not hasattr(LIC, "__dict__")


@pytest.mark.parametrize(
    "changes",
    [
        {"customer_id": "ABC"},
        {"license_type": "floating"},
        {"customer": "two\nlines"},
        {"customer": ""},
        {"hostname": "経理PC"},
        {"ip": "not-an-ip"},
        {"products": ()},
        {"products": (Product("A", "1", 1), Product("A", "2", 1))},
        {"license_type": "single"},  # two products, count 25
        {"issued_at": datetime(2025, 3, 1)},  # naive
        {"expires": datetime(2027, 1, 1, tzinfo=UTC)},
        {"site_networks": ("10.0.0.1/8",)},
        {"share": "everyone"},
    ],
)
def test_license_constructor_rejects_what_could_not_be_issued(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_license(**changes)


@pytest.mark.parametrize(
    ("name", "version", "count"), [("A B", "1", 1), ("A", "1.x", 1), ("A", "1", 0), ("A", "1", True)]
)
def test_product_constructor_validates(name: str, version: str, count: int) -> None:
    with pytest.raises(ValueError):
        Product(name, version, count)


# --------------------------------------------------------------------------------------------------
# Tampering


TAMPERS = [
    ("count=25", "count=26"),
    ("count=100", "count=99"),
    ("version=2.1", "version=2.2"),
    ("version=5 ", "version=50 "),
    ("product       CADVIEW", "product       CADVIEX"),
    ("hostname      licsrv01", "hostname      licsrv02"),
    ("hostname      licsrv01", "hostname      LICSRV01"),
    ("ip            192.0.2.10", "ip            192.0.2.11"),
    ("customer      Example Engineering Tokyo", "customer      Example Engineering Osaka"),
    ("customer_id   CID-ABCD-EFGH-IJKL-MNOP", "customer_id   CID-ABCD-EFGH-IJKL-MNOQ"),
    ("issued_at     2025-03-01T09:30:00Z", "issued_at     2025-03-01T09:30:01Z"),
    ("expires       2027-12-31", "expires       2028-12-31"),
    ("expires       2027-12-31", "expires       never"),
    ("share         user_host", "share         none"),
    ("site_network  198.51.100.0/24\n", ""),
    ("site_network  192.0.2.0/24", "site_network  192.0.0.0/16"),
    ("site_network  192.0.2.0/24\n", "site_network  192.0.2.0/24\nsite_network  0.0.0.0/0\n"),
    ("product       CADVIEW version=5 count=100\n", ""),
    (
        "product       CADPRO version=2.1 count=25\nproduct       CADVIEW version=5 count=100\n",
        "product       CADVIEW version=5 count=100\nproduct       CADPRO version=2.1 count=25\n",
    ),
    (
        "product       CADVIEW version=5 count=100\n",
        "product       CADVIEW version=5 count=100\nproduct X version=1 count=9\n",
    ),
    ("license_type  multi", "license_type  single"),
]


@pytest.mark.parametrize(("old", "new"), TAMPERS)
def test_any_edit_fails_verification_naming_the_file(old: str, new: str) -> None:
    assert old in TEXT
    tampered = TEXT.replace(old, new, 1)
    with pytest.raises(LicenseFileError) as info:
        verify_license(tampered, KEY.public_key(), SOURCE)
    err = info.value
    assert isinstance(err, ProtocolError)
    assert err.code is ErrorCode.LICENSE_INVALID
    assert SOURCE in str(err)
    assert err.source == SOURCE


def test_signature_from_another_vendor_says_so() -> None:
    with pytest.raises(LicenseFileError) as info:
        verify_license(TEXT, OTHER_KEY.public_key(), SOURCE)
    message = info.value.message
    assert message.startswith(SOURCE + ": ")
    assert "signature does not verify" in message
    assert "edited" in message and "another vendor" in message


def test_edited_count_is_reported_as_signature_failure() -> None:
    with pytest.raises(LicenseFileError, match="signature does not verify"):
        verify_license(TEXT.replace("count=25", "count=2500"), KEY.public_key(), SOURCE)


def _without_signature(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("signature"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (_without_signature(TEXT), "missing signature"),
        ("", "missing signature"),
        (TEXT + "product       EXTRA version=1 count=1\n", "after the signature"),
        (TEXT.replace("share         user_host", "share"), "line 13: unparsable line: 'share' has no value"),
        (TEXT.replace("share         user_host", "shar          user_host"), "did you mean 'share'"),
        (TEXT.replace("share         user_host", "!!!"), "line 13: unparsable line"),
        (TEXT.replace("count=25", "count=abc"), "unparsable line"),
        (TEXT.replace("count=25", "count=025"), "unparsable line"),
        (TEXT.replace("version=2.1", "version=2.x"), "unparsable line"),
        (TEXT.replace("count=25", "seats=25"), "unparsable line"),
        (TEXT.replace("expires       2027-12-31", "expires       2027-02-30"), "not a real date"),
        (TEXT.replace("issued_at     2025-03-01T09:30:00Z", "issued_at     yesterday"), "not a UTC time"),
        (TEXT.replace("ed25519:", "rsa:"), "signature scheme"),
        (TEXT.replace("ed25519:", "ed25519:!!"), "not valid base64"),
        (TEXT.replace("hostname      licsrv01", "hostname      経理PC"), HOSTNAME_RULE),
        (TEXT.replace("ip            192.0.2.10", "ip            licsrv01"), "not an IP address"),
        (TEXT.replace("format        1", "format        2"), "unsupported format"),
        (TEXT.replace("customer      Example", "customer      Example\x07"), "control character"),
        (TEXT.replace("ip            192.0.2.10\n", ""), "'ip' line is missing"),
        (TEXT.replace("share         user_host", "share         user_host\nshare         host"), "given twice"),
    ],
)
def test_unparsable_files_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(LicenseFileError) as info:
        verify_license(text, KEY.public_key(), SOURCE)
    assert SOURCE in info.value.message
    assert fragment in info.value.message
    assert info.value.code is ErrorCode.LICENSE_INVALID


def test_text_after_signature_is_refused_even_if_comment_like_data_follows() -> None:
    # Comments after the signature are fine (editors add trailing blank lines); data is not.
    assert verify_license(TEXT + "\n# end\n\n", KEY.public_key(), SOURCE) == LIC


def test_oversized_text_is_refused() -> None:
    with pytest.raises(LicenseFileError, match="characters long"):
        verify_license("#" * 1_000_001, KEY.public_key(), SOURCE)


def test_parse_license_returns_license_and_signature_without_verifying() -> None:
    tampered = TEXT.replace("count=25", "count=26")
    lic, signature = parse_license(tampered, SOURCE)
    assert lic.products[0].count == 26
    assert len(signature) == 64


def test_format_license_refuses_a_bad_signature_length() -> None:
    with pytest.raises(ValueError):
        format_license(LIC, b"short")


def test_signing_domains_are_distinct() -> None:
    assert canonical_license_bytes(LIC).startswith(LICENSE_SIGNING_DOMAIN)
    rev = Revocation("CID-ABCD-EFGH-IJKL-MNOP", ISSUED, "test")
    assert canonical_revocation_bytes(rev).startswith(REVOCATION_SIGNING_DOMAIN)
    assert not LICENSE_SIGNING_DOMAIN.startswith(REVOCATION_SIGNING_DOMAIN)
    assert not REVOCATION_SIGNING_DOMAIN.startswith(LICENSE_SIGNING_DOMAIN)


hostnames = st.from_regex(r"[a-z][a-z0-9]{0,10}(-[a-z0-9]{1,5})?", fullmatch=True)
customers = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")),
    min_size=1,
    max_size=40,
)
products = st.lists(
    st.tuples(
        st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
        st.lists(st.integers(0, 999), min_size=1, max_size=4).map(lambda xs: ".".join(map(str, xs))),
        st.integers(1, 10_000),
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda t: t[0],
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hostname=hostnames,
    customer=customers,
    items=products,
    expires=st.none() | st.dates(min_value=date(2000, 1, 1), max_value=date(9999, 12, 31)),
    issued=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
    share=st.sampled_from(["user_host", "host", "none"]),
)
def test_property_round_trip(
    hostname: str,
    customer: str,
    items: list[tuple[str, str, int]],
    expires: date | None,
    issued: datetime,
    share: str,
) -> None:
    lic = make_license(
        hostname=hostname,
        customer=customer,
        products=tuple(Product(*item) for item in items),
        expires=expires,
        issued_at=issued,
        share=share,
    )
    assert verify_license(sign_license(lic, KEY), KEY.public_key(), SOURCE) == lic


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), replacement=st.characters(codec="utf-8"))
def test_property_any_one_character_edit_is_refused_or_harmless(position: int, replacement: str) -> None:
    """Verification either refuses an edited file with LICENSE_INVALID or returns the very same license.

    (Harmless edits exist: inside a comment, or whitespace between a key and its value.)
    """
    pos = position % len(TEXT)
    edited = TEXT[:pos] + replacement + TEXT[pos + 1 :]
    try:
        lic = verify_license(edited, KEY.public_key(), SOURCE)
    except LicenseFileError as exc:
        assert exc.code is ErrorCode.LICENSE_INVALID
        assert SOURCE in exc.message
    else:
        assert lic == LIC


# --------------------------------------------------------------------------------------------------
# Revocations


def test_revocation_round_trip_and_tamper() -> None:
    rev = Revocation(
        "CID-ABCD-EFGH-IJKL-MNOP", ISSUED, "reissued as CID-QRST-UVWX-YZ23-4567", "CID-QRST-UVWX-YZ23-4567"
    )
    text = sign_revocation(rev, KEY)
    assert document_kind(text) == "revocation"
    assert verify_revocation(text, KEY.public_key(), "old.revoked") == rev
    for old, new in [("MNOP", "MNOQ"), ("2025-03-01", "2025-03-02"), ("reissued", "Reissued")]:
        with pytest.raises(LicenseFileError, match=r"old\.revoked"):
            verify_revocation(text.replace(old, new, 1), KEY.public_key(), "old.revoked")
    with pytest.raises(LicenseFileError, match="signature does not verify"):
        verify_revocation(text, OTHER_KEY.public_key(), "old.revoked")


def test_revocation_and_license_are_not_interchangeable() -> None:
    rev_text = sign_revocation(Revocation("CID-ABCD-EFGH-IJKL-MNOP", ISSUED, "gone"), KEY)
    with pytest.raises(LicenseFileError, match="not a license file"):
        verify_license(rev_text, KEY.public_key(), "x")
    with pytest.raises(LicenseFileError, match="not a revocation file"):
        verify_revocation(TEXT, KEY.public_key(), "x")
    assert document_kind(TEXT) == "license"
    assert document_kind("hello") is None


def test_revocation_without_replacement() -> None:
    rev = Revocation("CID-ABCD-EFGH-IJKL-MNOP", ISSUED, "contract ended")
    text = sign_revocation(rev, KEY)
    assert "replaced_by   none" in text
    assert verify_revocation(text, KEY.public_key(), "x").replaced_by is None


# --------------------------------------------------------------------------------------------------
# Decisions


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_evaluate_use_allows() -> None:
    assert evaluate_use(LIC, "CADPRO", "2.1", NOW) is None
    assert evaluate_use(LIC, "CADPRO", "2.0.9", NOW) is None
    assert evaluate_use(LIC, "CADVIEW", "5.0", NOW) is None


def test_expiry_boundary_is_the_end_of_the_day_utc() -> None:
    end = datetime(2027, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert evaluate_use(LIC, "CADPRO", "2.1", end) is None
    verdict = evaluate_use(LIC, "CADPRO", "2.1", end + timedelta(microseconds=1))
    assert verdict is not None and verdict[0] is ErrorCode.LICENSE_EXPIRED
    assert "2027-12-31" in verdict[1]
    # In Tokyo it is already 2028-01-01 08:59 at that instant; still valid.
    jst = timezone(timedelta(hours=9))
    assert evaluate_use(LIC, "CADPRO", "2.1", end.astimezone(jst)) is None


def test_never_expiring_license() -> None:
    assert evaluate_use(make_license(expires=None), "CADPRO", "2.1", datetime(9999, 1, 1, tzinfo=UTC)) is None


def test_unknown_product_lists_what_the_license_has() -> None:
    verdict = evaluate_use(LIC, "CADMAX", "1", NOW)
    assert verdict is not None
    code, message = verdict
    assert code is ErrorCode.UNKNOWN_PRODUCT
    assert "'CADMAX'" in message and "CADPRO 2.1" in message and "CADVIEW 5" in message


def test_version_not_permitted_names_both_versions() -> None:
    verdict = evaluate_use(LIC, "CADPRO", "2.10", NOW)
    assert verdict is not None
    code, message = verdict
    assert code is ErrorCode.VERSION_NOT_PERMITTED
    assert "2.10" in message and "up to 2.1" in message


def test_malformed_requested_version_is_a_bad_request() -> None:
    verdict = evaluate_use(LIC, "CADPRO", "latest", NOW)
    assert verdict is not None and verdict[0] is ErrorCode.BAD_REQUEST


def test_first_failing_check_wins() -> None:
    late = datetime(2030, 1, 1, tzinfo=UTC)
    verdict = evaluate_use(LIC, "CADMAX", "99", late)
    assert verdict is not None and verdict[0] is ErrorCode.LICENSE_EXPIRED
    verdict = evaluate_use(LIC, "CADMAX", "99", NOW)
    assert verdict is not None and verdict[0] is ErrorCode.UNKNOWN_PRODUCT


def test_evaluate_use_needs_aware_time() -> None:
    with pytest.raises(ValueError):
        evaluate_use(LIC, "CADPRO", "2.1", datetime(2026, 1, 1))


def test_host_matches_by_short_name_and_normalised_address() -> None:
    assert host_mismatch(LIC, "LICSRV01.corp.example", ["127.0.0.1", "::ffff:192.0.2.10"]) == []
    assert host_mismatch(LIC, "licsrv01", ["fe80::1%eth0", "192.0.2.10"]) == []


def test_host_mismatch_names_both_sides() -> None:
    problems = host_mismatch(LIC, "build7", ["127.0.0.1", "10.0.0.5", "junk"])
    assert len(problems) == 2
    assert "registered to host 'licsrv01' but this machine is 'build7'" in problems[0]
    assert "192.0.2.10" in problems[1] and "127.0.0.1, 10.0.0.5" in problems[1]
    only_ip = host_mismatch(LIC, "licsrv01", ["10.0.0.5"])
    assert len(only_ip) == 1 and "registered to IP address 192.0.2.10" in only_ip[0]
    assert len(host_mismatch(LIC, "build7", ["192.0.2.10"])) == 1
