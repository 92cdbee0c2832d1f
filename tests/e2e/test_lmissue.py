"""lmissue as the vendor runs it: the real console script in a subprocess, real files, exit codes."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lmgrd.storage.files import read_license_file, read_public_key_file, read_revocation_file

LMISSUE = Path(sys.executable).with_name("lmissue")
CID_RE = re.compile(r"CID-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}")

GOOD_REQUEST = """\
license_type: multi            # multi (floating, license server) | single (node-locked PC)
customer: Example Engineering Tokyo
host: {hostname: licsrv01, ip: 192.0.2.10}
products:
  - {name: CADPRO, version: "2.1", count: 25}
  - {name: CADVIEW, version: "5", count: 100}
expires: 2099-12-31
site_networks: [192.0.2.0/24]
share: user_host
"""

BAD_REQUEST = """\
license_type: single
customer: Example Engineering Tokyo
host: {hostname: 経理PC, ip: 192.0.2.300}
products:
  - {name: CADPRO, version: 2.10, count: 3}
  - {name: CADVIEW, version: "5.x", count: 0}
expires: 2001-01-01
share: everyone
colour: blue
"""


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LM_VENDOR_KEY"}
    return subprocess.run(
        [str(LMISSUE), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with vendor.key and vendor.pub made by `lmissue keygen`."""
    root = tmp_path_factory.mktemp("vendor")
    result = run("keygen", "--out", root / "keys", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "keys"


def test_console_script_is_installed() -> None:
    assert LMISSUE.is_file() and os.access(LMISSUE, os.X_OK)


def test_help(tmp_path: Path) -> None:
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("keygen", "issue", "show", "revoke", "reissue"):
        assert command in result.stdout
    result = run("issue", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "license_type" in result.stdout and "customer ID" in result.stdout
    assert run(cwd=tmp_path).returncode == 2  # no subcommand: usage error


def test_keygen_writes_a_private_key_with_mode_0600(vendor: Path) -> None:
    key, pub = vendor / "vendor.key", vendor / "vendor.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    read_public_key_file(pub)


def test_keygen_never_overwrites(vendor: Path, tmp_path: Path) -> None:
    before = (vendor / "vendor.key").read_bytes(), (vendor / "vendor.pub").read_bytes()
    result = run("keygen", "--out", vendor, cwd=tmp_path)
    assert result.returncode == 1
    assert "never overwrites" in result.stderr
    assert ((vendor / "vendor.key").read_bytes(), (vendor / "vendor.pub").read_bytes()) == before


def test_keygen_refuses_when_only_the_public_key_exists(tmp_path: Path) -> None:
    (tmp_path / "vendor.pub").write_text("old")
    result = run("keygen", "--out", tmp_path, cwd=tmp_path)
    assert result.returncode == 1
    assert "vendor.pub" in result.stderr
    assert not (tmp_path / "vendor.key").exists()
    assert (tmp_path / "vendor.pub").read_text() == "old"


def test_issue_prints_the_customer_id_alone_on_the_last_line(vendor: Path, tmp_path: Path) -> None:
    (tmp_path / "request.yaml").write_text(GOOD_REQUEST, encoding="utf-8")
    result = run("issue", "request.yaml", "--key", vendor / "vendor.key", "--out", "customer.lic", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    assert CID_RE.fullmatch(last)
    lic = read_license_file(tmp_path / "customer.lic", read_public_key_file(vendor / "vendor.pub"))
    assert lic.customer_id == last
    assert [(p.name, p.version, p.count) for p in lic.products] == [("CADPRO", "2.1", 25), ("CADVIEW", "5", 100)]
    assert lic.hostname == "licsrv01" and lic.ip == "192.0.2.10"
    assert "CADPRO" in result.stdout and "Example Engineering Tokyo" in result.stdout

    # A second issue gets a new customer ID and never overwrites without --force.
    before = (tmp_path / "customer.lic").read_text()
    again = run("issue", "request.yaml", "--key", vendor / "vendor.key", "--out", "customer.lic", cwd=tmp_path)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "customer.lic").read_text() == before
    forced = run(
        "issue", "request.yaml", "--key", vendor / "vendor.key", "--out", "customer.lic", "--force", cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.splitlines()[-1] != last
    assert (tmp_path / "customer.lic").read_text() != before


def test_bad_request_lists_every_problem_and_writes_nothing(vendor: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_REQUEST, encoding="utf-8")
    result = run("issue", "bad.yaml", "--key", vendor / "vendor.key", "--out", "bad.lic", cwd=tmp_path)
    assert result.returncode == 1
    assert not (tmp_path / "bad.lic").exists()
    lines = result.stderr.splitlines()
    problem_paths = [line.split(":", 1)[0].strip() for line in lines[1:]]
    assert problem_paths == [
        "colour",
        "host.hostname",
        "host.ip",
        "products",
        "products[0].version",
        "products[0].count",
        "products[1].version",
        "products[1].count",
        "expires",
        "share",
    ]
    hostname_line = next(line for line in lines if line.strip().startswith("host.hostname"))
    assert "経理PC" in hostname_line
    assert "ASCII letters, digits" in hostname_line or "ASCII letters (A-Z, a-z), digits" in hostname_line
    assert "Japanese" in hostname_line and "must be renamed" in hostname_line
    assert "nothing was written" in lines[0]


def test_unreadable_yaml_is_reported_with_its_line(vendor: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("license_type: multi\nhost: {hostname: x\n", encoding="utf-8")
    result = run("issue", "broken.yaml", "--key", vendor / "vendor.key", "--out", "x.lic", cwd=tmp_path)
    assert result.returncode == 1
    assert "broken.yaml: not valid YAML at line" in result.stderr
    assert not (tmp_path / "x.lic").exists()


def test_issue_with_the_public_key_by_mistake(vendor: Path, tmp_path: Path) -> None:
    (tmp_path / "request.yaml").write_text(GOOD_REQUEST, encoding="utf-8")
    result = run("issue", "request.yaml", "--key", vendor / "vendor.pub", "--out", "x.lic", cwd=tmp_path)
    assert result.returncode == 1
    assert "PUBLIC key" in result.stderr
    assert not (tmp_path / "x.lic").exists()


@pytest.fixture
def issued(vendor: Path, tmp_path: Path) -> Path:
    (tmp_path / "request.yaml").write_text(GOOD_REQUEST, encoding="utf-8")
    result = run("issue", "request.yaml", "--key", vendor / "vendor.key", "--out", "customer.lic", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "customer.lic"


def test_show_verifies_and_flags_tampering(vendor: Path, issued: Path) -> None:
    ok = run("show", issued, "--vendor-key", vendor / "vendor.pub", cwd=issued.parent)
    assert ok.returncode == 0, ok.stderr
    assert "signature:     OK" in ok.stdout
    assert "CADPRO" in ok.stdout and "licsrv01" in ok.stdout

    unchecked = run("show", issued, cwd=issued.parent)
    assert unchecked.returncode == 0
    assert "not checked" in unchecked.stdout

    issued.write_text(issued.read_text().replace("count=25", "count=250"))
    bad = run("show", issued, "--vendor-key", vendor / "vendor.pub", cwd=issued.parent)
    assert bad.returncode == 1
    assert "seats 250" in bad.stdout  # still readable, so the vendor sees what was changed
    assert "DOES NOT VERIFY" in bad.stdout
    assert str(issued) in bad.stderr and "signature does not verify" in bad.stderr


def test_show_with_another_vendors_key(issued: Path, tmp_path: Path) -> None:
    assert run("keygen", "--out", tmp_path / "other", cwd=tmp_path).returncode == 0
    result = run("show", issued, "--vendor-key", tmp_path / "other" / "vendor.pub", cwd=tmp_path)
    assert result.returncode == 1
    assert "another vendor's key" in result.stderr


def test_show_unparsable_file(vendor: Path, tmp_path: Path) -> None:
    path = tmp_path / "junk.lic"
    path.write_text("this is not a license\n")
    result = run("show", path, "--vendor-key", vendor / "vendor.pub", cwd=tmp_path)
    assert result.returncode == 1
    assert "junk.lic" in result.stderr and "line 1" in result.stderr


def test_revoke_writes_a_signed_revocation(vendor: Path, tmp_path: Path) -> None:
    cid = "CID-AAAA-BBBB-CCCC-DDDD"
    result = run("revoke", cid, "--key", vendor / "vendor.key", "--out", "gone.revoked", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rev = read_revocation_file(tmp_path / "gone.revoked", read_public_key_file(vendor / "vendor.pub"))
    assert rev.customer_id == cid and rev.replaced_by is None
    shown = run("show", "gone.revoked", "--vendor-key", vendor / "vendor.pub", cwd=tmp_path)
    assert shown.returncode == 0 and cid in shown.stdout and "signature:     OK" in shown.stdout
    bad = run("revoke", "CID-1", "--key", vendor / "vendor.key", "--out", "x.revoked", cwd=tmp_path)
    assert bad.returncode == 1 and "CID-XXXX-XXXX-XXXX-XXXX" in bad.stderr
    assert not (tmp_path / "x.revoked").exists()


def test_reissue_writes_new_license_and_revokes_the_old(vendor: Path, issued: Path) -> None:
    cwd = issued.parent
    public = read_public_key_file(vendor / "vendor.pub")
    old = read_license_file(issued, public)
    (cwd / "moved.yaml").write_text(GOOD_REQUEST.replace("licsrv01", "licsrv02").replace("192.0.2.10", "192.0.2.20"))
    result = run("reissue", issued, "moved.yaml", "--key", vendor / "vendor.key", "--out", "new.lic", cwd=cwd)
    assert result.returncode == 0, result.stderr
    new_cid = result.stdout.splitlines()[-1]
    assert CID_RE.fullmatch(new_cid) and new_cid != old.customer_id
    new = read_license_file(cwd / "new.lic", public)
    assert (new.customer_id, new.hostname, new.ip) == (new_cid, "licsrv02", "192.0.2.20")
    rev = read_revocation_file(cwd / "new.revoked", public)
    assert (rev.customer_id, rev.replaced_by) == (old.customer_id, new_cid)

    # Never overwrite either output without --force.
    again = run("reissue", issued, "moved.yaml", "--key", vendor / "vendor.key", "--out", "new.lic", cwd=cwd)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert read_license_file(cwd / "new.lic", public).customer_id == new_cid


def test_reissue_refuses_a_license_of_another_vendor(issued: Path, tmp_path: Path) -> None:
    assert run("keygen", "--out", tmp_path / "other", cwd=tmp_path).returncode == 0
    (tmp_path / "req.yaml").write_text(GOOD_REQUEST)
    result = run(
        "reissue", issued, "req.yaml", "--key", tmp_path / "other" / "vendor.key", "--out", "n.lic", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "signature does not verify" in result.stderr
    assert not (tmp_path / "n.lic").exists() and not (tmp_path / "n.revoked").exists()
