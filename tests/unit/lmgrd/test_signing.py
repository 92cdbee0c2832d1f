"""lmgrd.vendor.signing: private keys, new customer IDs and registration-request checks (the vendor's side).

Signing itself is exercised with verification in tests/unit/protocol/test_license.py (every round trip there
signs here and verifies in protocol).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd.vendor.signing import (
    FieldProblem,
    RequestSpec,
    check_request,
    dump_private_key,
    dump_public_key,
    load_private_key,
    new_customer_id,
)
from protocol.license import Product, VendorKeyError, customer_id_problem, load_public_key
from protocol.validation import HOSTNAME_RULE

KEY = Ed25519PrivateKey.generate()
ISSUED = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)


# --------------------------------------------------------------------------------------------------
# Keys


def test_key_pem_round_trip_with_comment_line() -> None:
    pub = b"# DEMO KEY\n" + dump_public_key(KEY.public_key())
    priv = b"# DEMO KEY\n" + dump_private_key(KEY)
    assert load_public_key(pub).public_bytes_raw() == KEY.public_key().public_bytes_raw()
    assert load_private_key(priv).private_bytes_raw() == KEY.private_bytes_raw()


def test_key_mixups_are_explained() -> None:
    with pytest.raises(VendorKeyError, match="PRIVATE key"):
        load_public_key(dump_private_key(KEY), "vendor.key")
    with pytest.raises(VendorKeyError, match="PUBLIC key"):
        load_private_key(dump_public_key(KEY.public_key()), "vendor.pub")
    with pytest.raises(VendorKeyError, match=r"garbage\.pem: not a PEM public key"):
        load_public_key(b"garbage", "garbage.pem")
    with pytest.raises(VendorKeyError, match="not a PEM private key"):
        load_private_key(b"garbage")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pub = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(VendorKeyError, match="not an Ed25519"):
        load_public_key(ec_pub)
    encrypted = KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(VendorKeyError, match="encrypted"):
        load_private_key(encrypted)


# --------------------------------------------------------------------------------------------------
# Customer IDs


def test_new_customer_id() -> None:
    cid = new_customer_id(bytes(range(10)))
    assert cid == new_customer_id(bytes(range(10)))
    assert customer_id_problem(cid) is None
    assert len(cid) == len("CID-XXXX-XXXX-XXXX-XXXX")
    assert new_customer_id(bytes(10)) != new_customer_id(b"\x00" * 9 + b"\x01")
    with pytest.raises(ValueError):
        new_customer_id(bytes(9))
    assert customer_id_problem("CID-0000-0000-0000-0000") is not None  # 0 is not base32


# --------------------------------------------------------------------------------------------------
# The registration request


TODAY = date(2025, 6, 1)
GOOD_REQUEST: dict[str, object] = {
    "license_type": "multi",
    "customer": "Example Engineering Tokyo",
    "host": {"hostname": "licsrv01", "ip": "192.0.2.10"},
    "products": [{"name": "CADPRO", "version": "2.1", "count": 25}],
    "expires": date(2027, 12, 31),
    "site_networks": ["192.0.2.0/24"],
    "share": "user_host",
}


def request(**changes: object) -> dict[str, object]:
    data = dict(GOOD_REQUEST)
    data.update(changes)
    return {k: v for k, v in data.items() if v is not DROP}


DROP = object()


def paths(problems: list[FieldProblem]) -> list[str]:
    return [p.path for p in problems]


def test_good_request() -> None:
    spec, problems = check_request(request(), TODAY)
    assert problems == []
    assert spec == RequestSpec(
        license_type="multi",
        customer="Example Engineering Tokyo",
        hostname="licsrv01",
        ip="192.0.2.10",
        products=(Product("CADPRO", "2.1", 25),),
        expires=date(2027, 12, 31),
        site_networks=("192.0.2.0/24",),
        share="user_host",
    )
    lic = spec.to_license("CID-ABCD-EFGH-IJKL-MNOP", ISSUED)
    assert lic.customer_id == "CID-ABCD-EFGH-IJKL-MNOP"
    assert lic.issued_at == ISSUED


def test_optional_fields_default() -> None:
    spec, problems = check_request(request(expires=DROP, site_networks=DROP, share=DROP), TODAY)
    assert problems == []
    assert spec is not None
    assert (spec.expires, spec.site_networks, spec.share) == (None, (), "user_host")


def test_request_normalises_values() -> None:
    spec, problems = check_request(
        request(
            customer="  Example  ",
            host={"hostname": "licsrv01", "ip": "::ffff:192.0.2.10"},
            products=[{"name": "CADPRO", "version": 3, "count": 1}],
            expires="2027-12-31",
        ),
        TODAY,
    )
    assert problems == []
    assert spec is not None
    assert (spec.customer, spec.ip, spec.products[0].version, spec.expires) == (
        "Example",
        "192.0.2.10",
        "3",
        date(2027, 12, 31),
    )


def test_every_problem_is_reported_at_once() -> None:
    data = {
        "license_type": "single",
        "customr": "typo",
        "host": {"hostname": "経理PC", "ip": "300.1.1.1", "port": 27000},
        "products": [
            {"name": "CAD PRO", "version": 2.10, "count": 2},
            {"name": "CADVIEW", "version": "1.x", "count": 0},
            {"name": "CADVIEW", "version": "1", "count": True},
        ],
        "expires": date(2025, 5, 31),
        "site_networks": ["10.0.0.1/8", "nonsense"],
        "share": "everyone",
    }
    spec, problems = check_request(data, TODAY)
    assert spec is None
    assert paths(problems) == [
        "customr",
        "customer",
        "host.port",
        "host.hostname",
        "host.ip",
        "products",
        "products[0].name",
        "products[0].version",
        "products[0].count",
        "products[1].version",
        "products[1].count",
        "products[2].name",
        "products[2].count",
        "expires",
        "site_networks[0]",
        "site_networks[1]",
        "share",
    ]
    by_path = {p.path: p.message for p in problems}
    assert "did you mean 'customer'" in by_path["customr"]
    assert "missing required field" in by_path["customer"]
    assert by_path["host.hostname"].endswith(HOSTNAME_RULE)
    assert "'経理PC'" in by_path["host.hostname"]
    assert "Japanese" in by_path["host.hostname"] and "renamed" in by_path["host.hostname"]
    assert "'300.1.1.1' is not an IP address" in by_path["host.ip"]
    assert "exactly one product" in by_path["products"]
    assert "quote it" in by_path["products[0].version"]
    assert "count 1" in by_path["products[0].count"]
    assert "not a dotted version" in by_path["products[1].version"]
    assert "at least 1" in by_path["products[1].count"]
    assert "already listed at products[1]" in by_path["products[2].name"]
    assert "True" in by_path["products[2].count"]
    assert "in the past" in by_path["expires"]
    assert "did you mean '10.0.0.0/8'" in by_path["site_networks[0]"]
    assert "unknown share mode 'everyone'" in by_path["share"]
    assert str(problems[0]) == f"customr: {by_path['customr']}"


def test_missing_required_fields() -> None:
    spec, problems = check_request({}, TODAY)
    assert spec is None
    assert paths(problems) == ["license_type", "customer", "host", "products"]
    _, problems = check_request(request(host={}), TODAY)
    assert paths(problems) == ["host.hostname", "host.ip"]
    _, problems = check_request(request(products=[{}]), TODAY)
    assert paths(problems) == ["products[0].name", "products[0].version", "products[0].count"]


@pytest.mark.parametrize("data", [None, [], "license", 42])
def test_request_must_be_a_mapping(data: object) -> None:
    spec, problems = check_request(data, TODAY)
    assert spec is None
    assert paths(problems) == ["request"]


@pytest.mark.parametrize(
    ("changes", "path", "fragment"),
    [
        ({"license_type": "floating"}, "license_type", "unknown license type"),
        ({"license_type": "singel"}, "license_type", "did you mean 'single'"),
        ({"customer": "a\nb"}, "customer", "U+000A"),
        ({"customer": 12}, "customer", "must be text"),
        ({"host": "licsrv01"}, "host", "mapping"),
        ({"host": {"hostname": "licsrv01", "ip": "0.0.0.0"}}, "host.ip", "not the address of one host"),
        ({"host": {"hostname": 7, "ip": "192.0.2.10"}}, "host.hostname", "must be a string"),
        ({"products": []}, "products", "non-empty list"),
        ({"products": "CADPRO"}, "products", "non-empty list"),
        ({"products": ["CADPRO"]}, "products[0]", "mapping"),
        ({"products": [{"name": "A", "version": "1", "count": 1.5}]}, "products[0].count", "whole number"),
        ({"products": [{"name": "A", "version": "1", "count": "5"}]}, "products[0].count", "whole number"),
        ({"products": [{"name": "A", "version": "1", "count": 10**7}]}, "products[0].count", "maximum"),
        ({"products": [{"name": "A", "version": True, "count": 1}]}, "products[0].version", "dotted version"),
        ({"products": [{"name": "A", "version": -1, "count": 1}]}, "products[0].version", "dot-separated"),
        ({"expires": "next year"}, "expires", "date like 2027-12-31"),
        ({"expires": "2027-02-30"}, "expires", "date like"),
        ({"expires": datetime(2027, 1, 1)}, "expires", "date like"),
        ({"site_networks": "192.0.2.0/24"}, "site_networks", "must be a list"),
        ({"site_networks": [5]}, "site_networks[0]", "must be a network"),
        ({"share": "hosts"}, "share", "did you mean 'host'"),
    ],
)
def test_single_request_problems(changes: dict[str, object], path: str, fragment: str) -> None:
    spec, problems = check_request(request(**changes), TODAY)
    assert spec is None
    assert len(problems) == 1, problems
    assert problems[0].path == path
    assert fragment in problems[0].message


def test_expiry_today_is_fine_yesterday_is_not() -> None:
    assert check_request(request(expires=TODAY), TODAY)[1] == []
    _, problems = check_request(request(expires=TODAY - timedelta(days=1)), TODAY)
    assert paths(problems) == ["expires"]


def test_single_user_request() -> None:
    base = {"license_type": "single", "host": {"hostname": "pc042", "ip": "127.0.0.1"}}
    spec, problems = check_request(request(**base, products=[{"name": "CADPRO", "version": "2.1"}]), TODAY)
    assert problems == []
    assert spec is not None and spec.products == (Product("CADPRO", "2.1", 1),)
    spec, problems = check_request(request(**base, products=[{"name": "CADPRO", "version": "2.1", "count": 25}]), TODAY)
    assert spec is None and paths(problems) == ["products[0].count"]
    assert "single-user" in problems[0].message


def test_misspelt_key_is_reported_with_the_missing_one() -> None:
    _, problems = check_request(request(products=[{"name": "A", "versoin": "1", "count": 1}]), TODAY)
    assert paths(problems) == ["products[0].versoin", "products[0].version"]
    assert "did you mean 'version'" in problems[0].message


def test_multi_user_count_is_required() -> None:
    _, problems = check_request(request(products=[{"name": "CADPRO", "version": "2.1"}]), TODAY)
    assert paths(problems) == ["products[0].count"]


def test_loopback_and_ipv6_are_valid_registrations() -> None:
    for ip in ("127.0.0.1", "::1", "2001:db8::10", "fe80::1%eth0"):
        assert check_request(request(host={"hostname": "licsrv01", "ip": ip}), TODAY)[1] == []
