"""lmgrd.storage.files: reading license, revocation and key files from disk; this host's identity."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd.storage.files import (
    HostIdentity,
    license_problems_for_daemon,
    read_license_file,
    read_public_key_file,
    read_revocation_file,
    this_host,
)
from lmgrd.vendor.signing import dump_private_key, dump_public_key, load_private_key, sign_license, sign_revocation
from protocol.errors import ErrorCode
from protocol.license import (
    License,
    LicenseFileError,
    Product,
    Revocation,
    VendorKeyError,
    load_public_key,
    verify_license,
)

KEY = Ed25519PrivateKey.generate()
DEMO_DIR = Path(__file__).resolve().parents[3] / "lmgrd" / "vendor" / "demo_keys"


def make_license(hostname: str = "licsrv01", ip: str = "192.0.2.10", license_type: str = "multi") -> License:
    count = 1 if license_type == "single" else 5
    return License(
        customer_id="CID-ABCD-EFGH-IJKL-MNOP",
        license_type=license_type,  # type: ignore[arg-type]
        customer="Example",
        hostname=hostname,
        ip=ip,
        products=(Product("CADPRO", "2.1", count),),
        issued_at=datetime(2025, 1, 1, tzinfo=UTC),
        expires=None,
        site_networks=(),
        share="user_host",
    )


def test_read_license_file(tmp_path: Path) -> None:
    path = tmp_path / "customer.lic"
    path.write_text(sign_license(make_license(), KEY), encoding="utf-8")
    assert read_license_file(path, KEY.public_key()) == make_license()
    assert read_license_file(str(path), KEY.public_key()) == make_license()


def test_tampered_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "customer.lic"
    path.write_text(sign_license(make_license(), KEY).replace("count=5", "count=50"), encoding="utf-8")
    with pytest.raises(LicenseFileError) as info:
        read_license_file(path, KEY.public_key())
    assert info.value.code is ErrorCode.LICENSE_INVALID
    assert str(path) in info.value.message
    assert "signature does not verify" in info.value.message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.lic"
    with pytest.raises(LicenseFileError) as info:
        read_license_file(path, KEY.public_key())
    assert str(path) in info.value.message
    assert "cannot read" in info.value.message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(LicenseFileError, match="cannot read"):
        read_license_file(tmp_path, KEY.public_key())


def test_not_utf8_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "customer.lic"
    path.write_bytes(sign_license(make_license(), KEY).encode("utf-8").replace(b"Example", b"Ex\xffmple"))
    with pytest.raises(LicenseFileError) as info:
        read_license_file(path, KEY.public_key())
    assert str(path) in info.value.message
    assert "not UTF-8" in info.value.message


def test_read_revocation_file(tmp_path: Path) -> None:
    rev = Revocation("CID-ABCD-EFGH-IJKL-MNOP", datetime(2025, 2, 1, tzinfo=UTC), "contract ended")
    path = tmp_path / "old.revoked"
    path.write_text(sign_revocation(rev, KEY), encoding="utf-8")
    assert read_revocation_file(path, KEY.public_key()) == rev
    with pytest.raises(LicenseFileError, match="signature does not verify"):
        read_revocation_file(path, Ed25519PrivateKey.generate().public_key())
    path.write_text(sign_revocation(rev, KEY).replace("contract", "Contract"), encoding="utf-8")
    with pytest.raises(LicenseFileError) as info:
        read_revocation_file(path, KEY.public_key())
    assert str(path) in info.value.message


def test_read_public_key_file(tmp_path: Path) -> None:
    path = tmp_path / "vendor.pub"
    path.write_bytes(dump_public_key(KEY.public_key()))
    assert read_public_key_file(path).public_bytes_raw() == KEY.public_key().public_bytes_raw()
    private = tmp_path / "vendor.key"
    private.write_bytes(dump_private_key(KEY))
    with pytest.raises(VendorKeyError) as info:
        read_public_key_file(private)
    assert str(private) in info.value.message and "PRIVATE" in info.value.message
    with pytest.raises(VendorKeyError) as info:
        read_public_key_file(tmp_path / "missing.pub")
    assert "missing.pub" in info.value.message
    big = tmp_path / "big.pub"
    big.write_bytes(b"#" * 100_000)
    with pytest.raises(VendorKeyError, match="too large"):
        read_public_key_file(big)


def test_this_host_reports_the_os_view() -> None:
    host = this_host()
    assert host.hostname == socket.gethostname()
    assert "127.0.0.1" in host.addresses  # loopback is included
    assert len(set(host.addresses)) == len(host.addresses)
    assert all("%" not in addr for addr in host.addresses)


def test_daemon_serves_a_multi_license_for_this_host() -> None:
    host = this_host()
    lic = make_license(hostname=host.hostname.split(".")[0].upper(), ip="127.0.0.1")
    assert license_problems_for_daemon(lic, host) == []


def test_daemon_refuses_a_license_for_another_host() -> None:
    host = HostIdentity("build7", ("127.0.0.1", "10.0.0.5"))
    problems = license_problems_for_daemon(make_license(), host)
    assert len(problems) == 2
    assert "'licsrv01' but this machine is 'build7'" in problems[0]
    assert "192.0.2.10" in problems[1]


def test_daemon_refuses_single_user_licenses() -> None:
    host = HostIdentity("licsrv01", ("192.0.2.10",))
    problems = license_problems_for_daemon(make_license(license_type="single"), host)
    assert problems == [
        "customer ID CID-ABCD-EFGH-IJKL-MNOP is a single-user (node-locked) license; it belongs on its PC "
        "(licsrv01) and is not served by lmgrd"
    ]


def test_demo_key_pair_is_marked_and_matches() -> None:
    private_pem = (DEMO_DIR / "demo_vendor.key").read_bytes()
    public_pem = (DEMO_DIR / "demo_vendor.pub").read_bytes()
    for pem in (private_pem, public_pem):
        assert pem.startswith(b"# DEMO KEY")
        assert b"NEVER USE IN PRODUCTION" in pem.splitlines()[0]
    private = load_private_key(private_pem)
    public = load_public_key(public_pem)
    assert private.public_key().public_bytes_raw() == public.public_bytes_raw()
    text = sign_license(make_license(), private)
    assert verify_license(text, read_public_key_file(DEMO_DIR / "demo_vendor.pub"), "demo.lic") == make_license()
