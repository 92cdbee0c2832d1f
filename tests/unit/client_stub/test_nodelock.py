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

from client_stub import AsyncLicenseClient, LicenseClient, LicenseError, SeatDenied, activation, cli
from client_stub.nodelock import check_license_file, load_vendor_key
from protocol import ErrorCode
from protocol.fingerprint import Fingerprint

Vendor = tuple[Ed25519PrivateKey, Path]


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LM_VENDOR_KEY", raising=False)
    monkeypatch.delenv("LM_LICENSE_SERVER", raising=False)
    # Activation records go to this test's own data directory, never the user's.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


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
    from lmgrd.vendor.signing import dump_private_key

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
    from client_stub.machine import this_machine

    host, addresses = this_machine()
    assert host == socket.gethostname()
    assert "127.0.0.1" in addresses


# --------------------------------------------------------------------------- single-user activation
def test_a_fresh_license_is_refused_until_24_hours_after_issue(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    issued = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    lic = single(tmp_path, key, issued_at=issued)
    err = refusal(lic, pub)
    assert isinstance(err, SeatDenied) and err.code is ErrorCode.LICENSE_NOT_ACTIVATED
    auto = issued + timedelta(hours=24)
    assert f"activates by itself at {auto:%Y-%m-%d %H:%M:%S} UTC" in err.message
    assert f"lmclient activate {lic}" in err.hint
    # The injected clock decides the 24 hours: a second short is still refused, the moment itself is not.
    pk = load_vendor_key(str(pub))
    with pytest.raises(SeatDenied) as info:
        check_license_file(lic, "CADPRO", "2.1", pk, now=auto - timedelta(seconds=1))
    assert info.value.code is ErrorCode.LICENSE_NOT_ACTIVATED
    assert check_license_file(lic, "CADPRO", "2.1", pk, now=auto).customer_id.startswith("CID-")
    assert not activation.activation_path().exists()  # time passing records nothing


def test_lmclient_activate_records_the_activation_in_the_user_data_dir(
        tmp_path: Path, vendor: Vendor, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    key, pub = vendor
    lic = single(tmp_path, key, issued_at=datetime.now(UTC))
    assert cli.main(["activate", str(lic), "--vendor-key", str(pub)]) == 0, capsys.readouterr().err
    record = tmp_path / "data" / "lmgrd" / "activations.json"  # XDG_DATA_HOME/lmgrd
    assert activation.activation_path() == record and str(record) in capsys.readouterr().out
    with LicenseClient(str(lic), vendor_key=pub) as lm:
        lm.checkout("CADPRO", "2.1").checkin()
    # Another data directory (another user, or XDG_DATA_HOME moved) holds no activation.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "elsewhere"))
    assert refusal(lic, pub).code is ErrorCode.LICENSE_NOT_ACTIVATED
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    with LicenseClient(str(lic), vendor_key=pub) as lm:
        lm.checkout("CADPRO", "2.1").checkin()


def test_an_activation_recorded_on_another_machine_is_license_moved(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    path = tmp_path / "pc.lic"
    lic = write_license(path, key, (("CADPRO", "2.1", 1),), license_type="single", issued_at=datetime.now(UTC))
    other = Fingerprint.of("otherpc", "0123456789abcdef", ["02:00:00:00:00:01"])
    activation.activate(lic, datetime.now(UTC), fingerprint=other, hostname="otherpc")
    pk = load_vendor_key(str(pub))
    for now in (None, lic.issued_at + timedelta(days=30)):  # not even the 24 hours help a moved license
        with pytest.raises(SeatDenied) as info:
            check_license_file(path, "CADPRO", "2.1", pk, now=now)
        assert info.value.code is ErrorCode.LICENSE_MOVED and "otherpc" in info.value.message
    # Activating here does not overwrite the other machine's record.
    assert cli.main(["activate", str(path), "--vendor-key", str(pub)]) == cli.EXIT_DENIED


def test_activation_comes_after_the_host_and_before_expiry(tmp_path: Path, vendor: Vendor) -> None:
    key, pub = vendor
    fresh = datetime.now(UTC)
    foreign = single(tmp_path, key, name="foreign.lic", hostname="otherpc", issued_at=fresh)
    assert refusal(foreign, pub).code is ErrorCode.HOST_NOT_LICENSED
    assert cli.main(["activate", str(foreign), "--vendor-key", str(pub)]) == cli.EXIT_DENIED
    assert not activation.activation_path().exists()  # a refused license is never recorded
    expired = single(tmp_path, key, name="expired.lic", issued_at=fresh, expires=date.today() - timedelta(days=2))
    assert refusal(expired, pub).code is ErrorCode.LICENSE_NOT_ACTIVATED
    assert cli.main(["activate", str(expired), "--vendor-key", str(pub)]) == 0
    assert refusal(expired, pub).code is ErrorCode.LICENSE_EXPIRED
    assert refusal(expired, pub, product="OTHER").code is ErrorCode.LICENSE_EXPIRED
