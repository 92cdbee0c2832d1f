"""Field rules shared by issuer, daemon and client: hostnames, versions, IPs, product names."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.validation import (
    HOSTNAME_RULE,
    PRODUCT_NAME_RE,
    hostname_problem,
    normalize_ip,
    parse_version,
    product_problem,
    short_hostname,
    version_permitted,
)


def test_hostname_rule_says_it_in_the_handbook_words() -> None:
    assert "ASCII letters" in HOSTNAME_RULE
    assert "digits" in HOSTNAME_RULE
    assert "hyphens" in HOSTNAME_RULE
    assert "Japanese" in HOSTNAME_RULE
    assert "cannot be licensed" in HOSTNAME_RULE
    assert "renamed" in HOSTNAME_RULE


@pytest.mark.parametrize(
    "name",
    ["licsrv01", "LICSRV01", "licsrv01.corp.example", "a", "build-7", "x" * 63, "1234", "a-b.c-d.e"],
)
def test_valid_hostnames(name: str) -> None:
    assert hostname_problem(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "経理PC",
        "ライセンスサーバ",
        "licsrv_01",
        "lic srv",
        "-licsrv",
        "licsrv-",
        "a..b",
        ".licsrv",
        "licsrv.",
        "x" * 64,
        "café",
        "licsrv01.コープ.example",
        "a\nb",
        ".".join(["abcdefgh"] * 30),  # 269 characters
    ],
)
def test_invalid_hostnames_quote_the_name_and_the_rule(name: str) -> None:
    problem = hostname_problem(name)
    assert problem is not None
    assert problem.endswith(HOSTNAME_RULE)
    if name and len(name) < 200:
        assert repr(name) in problem


def test_japanese_hostname_message_names_the_characters() -> None:
    problem = hostname_problem("経理PC")
    assert problem is not None
    assert "'経'" in problem and "'理'" in problem
    assert "Japanese" in problem and "renamed" in problem


def test_non_string_hostname_is_a_problem_not_a_crash() -> None:
    assert hostname_problem(42) is not None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b"),
    [("licsrv01.corp.example", "LICSRV01"), ("LicSrv01", "licsrv01.other"), ("x", "X")],
)
def test_short_hostnames_compare_equal(a: str, b: str) -> None:
    assert short_hostname(a) == short_hostname(b)


def test_short_hostname_is_the_first_label_lowercased() -> None:
    assert short_hostname("LICSRV01.corp.example") == "licsrv01"
    assert short_hostname("build7") != short_hostname("licsrv01")


@pytest.mark.parametrize(
    ("text", "parts"), [("3", (3,)), ("2.10", (2, 10)), ("11.0.4", (11, 0, 4)), ("0", (0,)), ("2.01", (2, 1))]
)
def test_parse_version(text: str, parts: tuple[int, ...]) -> None:
    assert parse_version(text) == parts


@pytest.mark.parametrize("text", ["", "2.", ".2", "2..1", "v2", "2.1a", "-1", "2,1", " 2", "２.１", "1" * 65])
def test_parse_version_rejects_with_the_value_quoted(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_version(text)
    assert "version" in str(info.value)


def test_parse_version_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="version"):
        parse_version(2.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("requested", "permitted", "ok"),
    [
        ("2.1", "2.1", True),
        ("2.0", "2.1", True),
        ("2.9", "2.10", True),
        ("2.10", "2.9", False),
        ("2", "2.0", True),
        ("2.0", "2", True),
        ("2.0.1", "2", False),
        ("3", "2.99", False),
        ("11.0.4", "11.1", True),
    ],
)
def test_version_permitted(requested: str, permitted: str, ok: bool) -> None:
    assert version_permitted(requested, permitted) is ok


versions = st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(versions, versions)
def test_versions_compare_as_zero_padded_tuples(a: list[int], b: list[int]) -> None:
    width = max(len(a), len(b))
    pa, pb = a + [0] * (width - len(a)), b + [0] * (width - len(b))
    sa, sb = ".".join(map(str, a)), ".".join(map(str, b))
    assert parse_version(sa) == tuple(a)
    assert version_permitted(sa, sb) is (pa <= pb)
    # Trailing zeros never change the answer.
    assert version_permitted(sa + ".0", sb) is version_permitted(sa, sb)


def test_normalize_ip_maps_ipv4_in_ipv6_and_strips_zones() -> None:
    assert normalize_ip("::ffff:192.0.2.10") == ipaddress.IPv4Address("192.0.2.10")
    assert normalize_ip("::FFFF:c000:020a") == ipaddress.IPv4Address("192.0.2.10")
    assert normalize_ip("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")
    assert normalize_ip("127.0.0.1") == ipaddress.IPv4Address("127.0.0.1")
    assert normalize_ip("::1") == ipaddress.IPv6Address("::1")
    assert normalize_ip("2001:DB8::10") == ipaddress.IPv6Address("2001:db8::10")


@pytest.mark.parametrize("addr", ["", "licsrv01", "300.1.1.1", "192.0.2", "1.2.3.4/24", "::g", "%eth0"])
def test_normalize_ip_rejects_non_addresses_quoting_them(addr: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_ip(addr)
    assert repr(addr) in str(info.value)


@pytest.mark.parametrize("name", ["CADPRO", "cad_pro-2", "X", "a" * 64, "0"])
def test_valid_product_names(name: str) -> None:
    assert product_problem(name) is None
    assert PRODUCT_NAME_RE.fullmatch(name)


@pytest.mark.parametrize("name", ["", "CAD PRO", "CAD.PRO", "a" * 65, "製品", "CADPRO\n"])
def test_invalid_product_names(name: str) -> None:
    assert product_problem(name) is not None
    assert not PRODUCT_NAME_RE.fullmatch(name)
