"""Single-user mode: a license file checked on this PC, with real Ed25519-signed files made in the test."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import HOSTNAME, write_keys, write_license

from client_stub import AsyncLicenseClient, LicenseClient, LicenseError, SeatDenied
from client_stub.nodelock import check_license_file, load_vendor_key
from protocol import ErrorCode

Vendor = tuple[Ed25519PrivateKey, Path]


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LM_VENDOR_KEY", raising=False)
    monkeypatch.delenv("LM_LICENSE_SERVER", raising=False)


@pytest.fixture
def vendor(tmp_path: Path) -> Vendor:
    key, pub = write_keys(tmp_path / "vendor")
    return key, pub


def single(tmp_path: Path, key: Ed25519PrivateKey, name: str = "pc.lic", **kw: Any) -> Path:
    path = tmp_path / name
    kw.setdefault("products", (("CADPRO", "2.1", 1),))
    write_license(path, key, license_type="single", **kw)
    return path


def refusal(lic: Path, pub: Any, product: str = "CADPRO", version: str = "2.1", **kw: Any) -> LicenseError:
    with LicenseClient(str(lic), vendor_key=pub, **kw) as lm, pytest.raises(LicenseError) as info:
        lm.checkout(product, version=version)
    return info.value


def test_sync_checkout_on_this_pc(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    lic = single(tmp_path, key)
    with LicenseClient(str(lic), vendor_key=str(pub)) as lm:
        with lm.checkout("CADPRO", version="2.0", wait=30) as seat:
            assert seat.nodelocked and not seat.lost and seat.server == str(lic)
            assert seat.token.startswith("local-") and seat.customer_id.startswith("CID-")
        assert seat.released
        seat.checkin()  # idempotent


def test_async_checkout_with_key_from_environment(tmp_path: Path, vendor: Vendor, monkeypatch: pytest.MonkeyPatch,
                                                  run: Callable[..., Any]) -> None:
    key, pub = vendor
    lic = single(tmp_path, key)
    monkeypatch.setenv("LM_VENDOR_KEY", str(pub))

    async def main() -> None:
        async with AsyncLicenseClient(lic) as lm, lm.seat("CADPRO", "2.1") as seat:
            assert seat.nodelocked and seat.held

    run(main)


def test_key_as_pem_bytes(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    lic = single(tmp_path, key)
    with LicenseClient(str(lic), vendor_key=pub.read_bytes()) as lm:
        lm.checkout("CADPRO", "2.1").checkin()


def test_no_vendor_key_says_how_to_supply_one(tmp_path: Path, vendor: Vendor) -> None:
    lic = single(tmp_path, vendor[0])
    err = refusal(lic, None)
    assert err.code is ErrorCode.LICENSE_INVALID
    assert "LM_VENDOR_KEY" in str(err) and "vendor_key=" in str(err)


def test_unreadable_or_wrong_kind_of_key(tmp_path: Path, vendor: Vendor) -> None:
    key, _ = vendor
    lic = single(tmp_path, key)
    err = refusal(lic, str(tmp_path / "nope.pub"))
    assert err.code is ErrorCode.LICENSE_INVALID and "nope.pub" in err.message
    private = tmp_path / "vendor.key"
    from protocol.license import dump_private_key

    private.write_bytes(dump_private_key(key))
    err = refusal(lic, str(private))
    assert err.code is ErrorCode.LICENSE_INVALID and "PRIVATE" in err.message


def test_tampered_file_is_invalid(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    lic = single(tmp_path, key)
    text = lic.read_text()
    assert "version=2.1" in text
    lic.write_text(text.replace("version=2.1", "version=9.9"))
    err = refusal(lic, pub, version="9.0")
    assert err.code is ErrorCode.LICENSE_INVALID and str(lic) in err.message


def test_unsigned_file_is_invalid(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    lic = single(tmp_path, key)
    lic.write_text("\n".join(ln for ln in lic.read_text().splitlines() if not ln.startswith("signature")))
    assert refusal(lic, pub).code is ErrorCode.LICENSE_INVALID


def test_another_vendors_key_is_invalid(tmp_path: Path, vendor: Vendor) -> None:
    lic = single(tmp_path, vendor[0])
    _, other_pub = write_keys(tmp_path / "other")
    assert refusal(lic, other_pub).code is ErrorCode.LICENSE_INVALID


def test_missing_file(tmp_path: Path, vendor: Vendor) -> None:
    err = refusal(tmp_path / "absent.lic", vendor[1])
    assert err.code is ErrorCode.LICENSE_INVALID and "absent.lic" in err.message


def test_multi_user_file_needs_a_server(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    lic = tmp_path / "site.lic"
    write_license(lic, key, (("CADPRO", "2.1", 5),), license_type="multi")
    err = refusal(lic, pub)
    assert err.code is ErrorCode.LICENSE_INVALID
    assert "multi-user" in err.message and "license server" in str(err)


def test_other_host_is_refused_naming_both(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    lic = single(tmp_path, key, hostname="otherpc")
    err = refusal(lic, pub)
    assert isinstance(err, SeatDenied) and err.code is ErrorCode.HOST_NOT_LICENSED
    assert "'otherpc'" in err.message and repr(HOSTNAME.lower()) in err.message


def test_hostname_override_is_not_a_bypass(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    lic = single(tmp_path, key, hostname="otherpc")
    # Claiming to be the licensed PC does not help: the check uses the OS's own hostname.
    assert refusal(lic, pub, hostname="otherpc").code is ErrorCode.HOST_NOT_LICENSED
    # ...and a different claimed name does not break a license for this very PC.
    ok = single(tmp_path, key, name="ok.lic")
    with LicenseClient(str(ok), vendor_key=pub, hostname="someone-else") as lm:
        lm.checkout("CADPRO", "2.1").checkin()


def test_other_address_is_refused(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    lic = single(tmp_path, key, ip="192.0.2.77")
    err = refusal(lic, pub)
    assert err.code is ErrorCode.HOST_NOT_LICENSED and "192.0.2.77" in err.message


@pytest.mark.parametrize(("kw", "product", "version", "code"), [
    ({"expires": date.today() - timedelta(days=2)}, "CADPRO", "2.1", ErrorCode.LICENSE_EXPIRED),
    # Expiry is checked before the product: the first failure in the handbook's order wins.
    ({"expires": date.today() - timedelta(days=2)}, "OTHER", "2.1", ErrorCode.LICENSE_EXPIRED),
    ({}, "OTHER", "2.1", ErrorCode.UNKNOWN_PRODUCT),
    ({}, "CADPRO", "2.10", ErrorCode.VERSION_NOT_PERMITTED),
    ({"expires": date.today() + timedelta(days=30)}, "CADPRO", "2.1", None),
])
def test_expiry_product_version(tmp_path: Path, vendor: Vendor, kw: dict[str, Any], product: str, version: str,
                                code: ErrorCode | None) -> None:
    key, pub = vendor
    lic = single(tmp_path, key, **kw)
    if code is None:
        with LicenseClient(str(lic), vendor_key=pub) as lm:
            lm.checkout(product, version).checkin()
        return
    err = refusal(lic, pub, product=product, version=version)
    assert isinstance(err, SeatDenied) and err.code is code


def test_expiry_uses_the_given_clock(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    lic = single(tmp_path, key, expires=date(2030, 1, 31))
    pk = load_vendor_key(str(pub))
    check_license_file(lic, "CADPRO", "2.1", pk, now=datetime(2030, 1, 31, 23, 59, tzinfo=UTC))
    with pytest.raises(SeatDenied) as info:
        check_license_file(lic, "CADPRO", "2.1", pk, now=datetime(2030, 2, 1, 0, 0, 1, tzinfo=UTC))
    assert info.value.code is ErrorCode.LICENSE_EXPIRED


def test_entries_are_tried_in_order(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    wrong = single(tmp_path, key, name="a.lic", products=(("OTHER", "1", 1),))
    right = single(tmp_path, key, name="b.lic")
    with LicenseClient(f"{wrong},{right}", vendor_key=pub) as lm, lm.checkout("CADPRO", "2.1") as seat:
        assert seat.server == str(right)
    # When every entry refuses, the first refusal is raised.
    with LicenseClient([str(wrong), str(wrong)], vendor_key=pub) as lm, pytest.raises(SeatDenied) as info:
        lm.checkout("CADPRO", "2.1")
    assert info.value.code is ErrorCode.UNKNOWN_PRODUCT


def test_this_machine_reports_the_os_view() -> None:
    from client_stub.nodelock import this_machine

    host, addresses = this_machine()
    assert host == socket.gethostname()
    assert "127.0.0.1" in addresses
