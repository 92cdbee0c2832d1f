"""Revocation lists as vendor and admin use them: ``lmissue revoke`` and ``lmissue reissue`` add to a file (never
dropping an earlier entry, a customer ID once), ``lmissue show`` lists every entry, and the daemon, given a directory as
``revocations:``, loads every file in it at ``lmreread``; a damaged or foreign-signed entry is refused by file
and entry while the valid ones still revoke. Real console scripts, a real daemon subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon, RawClient, write_license

from lmgrd.storage.files import read_public_key_file, read_revocation_file
from lmgrd.vendor.signing import load_private_key
from protocol import Checkout, ErrorCode, ErrorReply, Granted, Heartbeat, HeartbeatAck
from protocol.license import verify_license, verify_revocation_list

LMISSUE = Path(sys.executable).with_name("lmissue")
CIDS = ("CID-AAAA-BBBB-CCCC-DDDD", "CID-AAAA-BBBB-CCCC-EEEE", "CID-AAAA-BBBB-CCCC-FFFF")
REQUEST = """\
license_type: multi
customer: Example Engineering Tokyo
host: {hostname: licsrv01, ip: 192.0.2.10}
products:
  - {name: CADPRO, version: "2.1", count: 5}
expires: 2099-12-31
"""


def lmissue(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LM_VENDOR_KEY"}
    return subprocess.run([str(LMISSUE), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    assert lmissue("keygen", "--out", tmp_path / "keys", cwd=tmp_path).returncode == 0
    return tmp_path / "keys"


def test_revoke_adds_to_an_existing_file_and_ignores_a_duplicate(keys: Path, tmp_path: Path) -> None:
    key, pub = keys / "vendor.key", keys / "vendor.pub"
    first = lmissue("revoke", CIDS[0], "--key", key, "--out", "c.revoked", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    single = (tmp_path / "c.revoked").read_text()
    assert read_revocation_file(tmp_path / "c.revoked", read_public_key_file(pub)).customer_id == CIDS[0]

    second = lmissue("revoke", CIDS[1], "--key", key, "--out", "c.revoked", "--reason", "server moved", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "added to c.revoked (2 revocations in it)" in second.stdout
    text = (tmp_path / "c.revoked").read_text()
    assert text.startswith(single)  # the earlier entry is kept byte for byte, signature and all
    revs, refused = verify_revocation_list(text, read_public_key_file(pub), "c.revoked")
    assert [r.customer_id for r in revs] == list(CIDS[:2]) and refused == []

    again = lmissue("revoke", CIDS[0], "--key", key, "--out", "c.revoked", "--force", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already revoked there (entry 1 of 2" in again.stdout and "nothing was written" in again.stdout
    assert "--force no longer replaces" in again.stderr
    assert (tmp_path / "c.revoked").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.revoked", "keys"]  # no temp or lock files left

    shown = lmissue("show", "c.revoked", "--vendor-key", pub, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "c.revoked: signed revocation list, 2 revocations" in shown.stdout
    assert shown.stdout.count("signature:     OK") == 2
    assert CIDS[0] in shown.stdout and CIDS[1] in shown.stdout and "server moved" in shown.stdout


def test_revoke_refuses_to_add_to_a_file_that_is_not_its_own_intact_list(keys: Path, tmp_path: Path) -> None:
    key = keys / "vendor.key"
    assert lmissue("keygen", "--out", tmp_path / "other", cwd=tmp_path).returncode == 0
    assert lmissue("revoke", CIDS[0], "--key", tmp_path / "other" / "vendor.key", "--out", "x.revoked",
                   cwd=tmp_path).returncode == 0
    before = (tmp_path / "x.revoked").read_text()
    r = lmissue("revoke", CIDS[1], "--key", key, "--out", "x.revoked", cwd=tmp_path)
    assert r.returncode == 1 and "do not verify with this --key, so nothing was added" in r.stderr
    assert (tmp_path / "x.revoked").read_text() == before
    (tmp_path / "site.lic").write_text("kind license\n")
    r = lmissue("revoke", CIDS[1], "--key", key, "--out", "site.lic", cwd=tmp_path)
    assert r.returncode == 1 and "exists and is a license file" in r.stderr


def test_show_names_the_damaged_entry_and_still_lists_the_others(keys: Path, tmp_path: Path) -> None:
    key, pub = keys / "vendor.key", keys / "vendor.pub"
    for cid in CIDS:
        assert lmissue("revoke", cid, "--key", key, "--out", "c.revoked", cwd=tmp_path).returncode == 0
    path = tmp_path / "c.revoked"
    path.write_text(path.read_text().replace(f"customer_id   {CIDS[1]}", f"customer_id   {CIDS[1][:-1]}G"))
    shown = lmissue("show", "c.revoked", "--vendor-key", pub, cwd=tmp_path)
    assert shown.returncode == 1
    assert shown.stdout.count("signature:     OK") == 2 and "DOES NOT VERIFY" in shown.stdout
    assert "1 of 3 revocations in c.revoked are refused" in shown.stderr
    assert "c.revoked (entry 2 of 3, line 15): signature does not verify" in shown.stderr


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


def _checkout(d: Daemon, product: str, user: str = "alice") -> tuple[RawClient, Granted | ErrorReply]:
    c = d.connect()
    c.hello(user=user)
    r = c.request(Checkout(c.id(), product, "2.1", 0))
    assert isinstance(r, Granted | ErrorReply), r
    return c, r


def test_a_revocations_directory_is_reread_and_each_entry_stands_alone(
        keys: Path, tmp_path: Path, daemons: list[Daemon]) -> None:
    key = load_private_key((keys / "vendor.key").read_bytes())
    pub = keys / "vendor.pub"
    lics = []
    for cid, product in zip(CIDS, ("CADPRO", "VIEWER", "SOLVER"), strict=True):
        lic = tmp_path / f"{product}.lic"
        write_license(lic, key, ((product, "2.1", 2),), customer_id=cid)
        lics.append(lic)
    revdir = tmp_path / "revocations.d"
    revdir.mkdir()
    cfg = tmp_path / "lmgrd.yaml"
    cfg.write_text(f"revocations: {revdir}\n")
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", lics, pub, extra=["-c", str(cfg)], heartbeat=10.0, lease_timeout=30.0)
    daemons.append(d)
    d.start()
    held, g = _checkout(d, "CADPRO")
    assert isinstance(g, Granted)

    # The vendor's file holds two revocations; a second file has one foreign-signed entry. Dropped in, no
    # config change, then lmreread.
    assert lmissue("revoke", CIDS[0], "--key", keys / "vendor.key", "--out", revdir / "vendor.revoked",
                   cwd=tmp_path).returncode == 0
    assert lmissue("revoke", CIDS[1], "--key", keys / "vendor.key", "--out", revdir / "vendor.revoked",
                   cwd=tmp_path).returncode == 0
    assert lmissue("keygen", "--out", tmp_path / "forger", cwd=tmp_path).returncode == 0
    assert lmissue("revoke", CIDS[2], "--key", tmp_path / "forger" / "vendor.key", "--out", revdir / "forged.revoked",
                   cwd=tmp_path).returncode == 0
    r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmreread", "--json", "-c", d.address],
                       capture_output=True, text=True, timeout=30, env=d.env())
    assert r.returncode == 1, r.stdout + r.stderr
    problems = json.loads(r.stdout)["problems"]
    refused = [p for p in problems if p.startswith("REVOCATION REFUSED")]
    assert refused == [f"REVOCATION REFUSED: {revdir / 'forged.revoked'}: signature does not verify: the revocation "
                       "file was edited after it was signed, or it was signed with another vendor's key; it revokes "
                       "nothing until the vendor's signed file is given"]
    ack = held.request(Heartbeat(held.id()))  # the held CADPRO seat ends: CIDS[0] is revoked
    assert isinstance(ack, HeartbeatAck) and [x.code for x in ack.lost] == [ErrorCode.LICENSE_REVOKED]
    for product in ("CADPRO", "VIEWER"):
        _c, reply = _checkout(d, product, user="bob")
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.LICENSE_REVOKED, reply
    _c, reply = _checkout(d, "SOLVER", user="bob")  # the forged revocation revokes nothing
    assert isinstance(reply, Granted), reply
    d.wait_for_log(r"revocation \S+vendor\.revoked loaded: customer ID CID-AAAA-BBBB-CCCC-EEEE was revoked")


def test_reissue_adds_to_an_existing_revocation_list(keys: Path, tmp_path: Path) -> None:
    # A vendor keeps one revocation list per customer site: every reissue adds the old customer ID's revocation
    # to it (atomically, earlier entries kept byte for byte, a customer ID once), never replacing it.
    key, pub = keys / "vendor.key", keys / "vendor.pub"
    public = read_public_key_file(pub)
    (tmp_path / "req.yaml").write_text(REQUEST)
    assert lmissue("issue", "req.yaml", "--key", key, "--out", "v1.lic", cwd=tmp_path).returncode == 0
    assert lmissue("revoke", CIDS[0], "--key", key, "--out", "site.revoked", cwd=tmp_path).returncode == 0
    before = (tmp_path / "site.revoked").read_text()

    r = lmissue("reissue", "v1.lic", "req.yaml", "--key", key, "--out", "v2.lic", "--revocations", "site.revoked",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    v1, v2 = (verify_license((tmp_path / n).read_text(), public, n) for n in ("v1.lic", "v2.lic"))
    assert f"added to site.revoked  (revokes {v1.customer_id}; 2 revocations in it" in r.stdout
    text = (tmp_path / "site.revoked").read_text()
    assert text.startswith(before)
    revs, refused = verify_revocation_list(text, public, "site.revoked")
    assert refused == [] and [(x.customer_id, x.replaced_by) for x in revs] == [(CIDS[0], None),
                                                                                (v1.customer_id, v2.customer_id)]

    # The default list beside the new license is added to as well, and --force (which replaces v3.lic) never
    # replaces it: a second reissue of v2 finds v2 already revoked there and adds nothing.
    for _ in (1, 2):
        r = lmissue("reissue", "v2.lic", "req.yaml", "--key", key, "--out", "v3.lic", "--force", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    assert f"{v2.customer_id} is already revoked there (entry 1 of 1" in r.stdout
    revs, refused = verify_revocation_list((tmp_path / "v3.revoked").read_text(), public, "v3.revoked")
    assert refused == [] and [x.customer_id for x in revs] == [v2.customer_id]
    r = lmissue("reissue", "v1.lic", "req.yaml", "--key", key, "--out", "v4.lic", "--revocations", "v3.revoked",
                cwd=tmp_path)
    assert r.returncode == 0 and "2 revocations in it" in r.stdout, r.stdout + r.stderr
    revs, _ = verify_revocation_list((tmp_path / "v3.revoked").read_text(), public, "v3.revoked")
    assert [x.customer_id for x in revs] == [v2.customer_id, v1.customer_id]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".lock")]

    # A list that is not this vendor's, intact, is never added to: nothing is written, no license either.
    (tmp_path / "bad.revoked").write_text("kind license\n")
    r = lmissue("reissue", "v1.lic", "req.yaml", "--key", key, "--out", "v5.lic", "--revocations", "bad.revoked",
                cwd=tmp_path)
    assert r.returncode == 1 and "exists and is a license file" in r.stderr
    assert not (tmp_path / "v5.lic").exists() and (tmp_path / "bad.revoked").read_text() == "kind license\n"
