"""Revocation lists: a file holding several revocations, each verified against its own signature
(``protocol.license``), and the daemon loading files and directories of them (``lmgrd.storage.files``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd.storage.files import load_revocations, revocation_files
from lmgrd.vendor.signing import sign_revocation
from protocol.license import (
    LicenseFileError,
    Revocation,
    split_revocation_list,
    verify_revocation,
    verify_revocation_list,
)

CIDS = ("CID-AAAA-BBBB-CCCC-DDDD", "CID-AAAA-BBBB-CCCC-EEEE", "CID-AAAA-BBBB-CCCC-FFFF")
KEY = Ed25519PrivateKey.generate()
AT = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


def signed(cid: str, key: Ed25519PrivateKey = KEY, reason: str = "revoked by the vendor") -> str:
    return sign_revocation(Revocation(cid, AT, reason), key)


def test_a_single_revocation_file_is_a_list_of_one_with_the_same_messages() -> None:
    text = signed(CIDS[0])
    assert [e.number for e in split_revocation_list(text)] == [1]
    revs, bad = verify_revocation_list(text, KEY.public_key(), "old.revoked")
    assert [r.customer_id for r in revs] == [CIDS[0]] and bad == []
    broken = text.replace("revoked by the vendor", "revoked by nobody")
    _, bad = verify_revocation_list(broken, KEY.public_key(), "old.revoked")
    with pytest.raises(LicenseFileError) as single:
        verify_revocation(broken, KEY.public_key(), "old.revoked")
    assert [e.message for e in bad] == [single.value.message]  # a one-entry file is named as before


def test_each_entry_is_verified_alone_and_a_bad_one_hides_nothing() -> None:
    forged = signed(CIDS[1], Ed25519PrivateKey.generate())
    cut = signed(CIDS[2]).rsplit("signature", 1)[0]  # an append cut short: no signature line
    text = "\n".join([signed(CIDS[0]), forged, cut, signed(CIDS[2], reason="again")])
    entries = split_revocation_list(text)
    assert [e.number for e in entries] == [1, 2, 3, 4]
    assert [e.first_line for e in entries] == [4, 15, 26, 36]  # the cut entry is one line short
    revs, bad = verify_revocation_list(text, KEY.public_key(), "list.revoked")
    assert [r.customer_id for r in revs] == [CIDS[0], CIDS[2]]
    assert [e.message.split(": ", 1)[0] for e in bad] == ["list.revoked (entry 2 of 4, line 15)",
                                                           "list.revoked (entry 3 of 4, line 26)"]
    assert "signature does not verify" in bad[0].message and "missing signature" in bad[1].message


def test_a_parse_error_names_the_files_own_line() -> None:
    text = signed(CIDS[0]) + "\n" + signed(CIDS[1]).replace("revoked_at    2026-12-01T09:30:00Z", "revoked_at    x")
    _, bad = verify_revocation_list(text, KEY.public_key(), "l.revoked")
    assert len(bad) == 1 and "(entry 2 of 2, line 15): line 18: unparsable line: revoked_at 'x'" in bad[0].message


def test_an_empty_file_is_refused() -> None:
    revs, bad = verify_revocation_list("# nothing here\n", KEY.public_key(), "e.revoked")
    assert revs == [] and "holds no revocation" in bad[0].message


def test_a_directory_loads_every_visible_file(tmp_path: Path) -> None:
    (tmp_path / "a.revoked").write_text(signed(CIDS[0]) + "\n" + signed(CIDS[1]))
    (tmp_path / "b.revoked").write_text(signed(CIDS[2], Ed25519PrivateKey.generate()))
    (tmp_path / ".b.revoked.x1y2.tmp").write_text("half written")  # write_atomic's temporary name
    (tmp_path / "sub").mkdir()
    assert [p.name for p in revocation_files(tmp_path)] == ["a.revoked", "b.revoked"]
    revoked, problems = load_revocations([tmp_path], KEY.public_key())
    assert sorted(revoked) == [CIDS[0], CIDS[1]]
    assert len(problems) == 1 and problems[0].startswith(f"REVOCATION REFUSED: {tmp_path / 'b.revoked'}: ")
    revoked, problems = load_revocations([tmp_path / "missing"], KEY.public_key())
    assert revoked == {} and "cannot read the revocation file" in problems[0]
