"""lmgrd.storage.atomic.write_atomic on a real file system."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lmgrd.storage.atomic import write_atomic


def test_replaces_whole_with_the_mode_asked_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "token"
    p.write_bytes(b"old")
    write_atomic(p, b"new secret\n", mode=0o600)
    assert p.read_bytes() == b"new secret\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["token"]


def test_replace_false_never_overwrites(tmp_path: Path) -> None:
    p = tmp_path / "site.lic"
    write_atomic(p, b"first", replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(p, b"second", replace=False)
    assert p.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["site.lic"]
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_when_the_data_is_bad(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    p.write_bytes(b"kept")
    with pytest.raises(TypeError):
        write_atomic(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"kept"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
