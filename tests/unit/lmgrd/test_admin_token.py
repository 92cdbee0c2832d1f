"""The admin token file (issue 9): a directory another user made first, or a planted symlink, never gets it.

Real files, real ownership: the tests that hand a directory to another uid need root (``chown``); CI runs
as root, and elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lmgrd.admin import token as token_mod
from lmgrd.admin.token import TokenDirUnsafe, remove_token, write_token

OTHER_UID = 54321
needs_root = pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="chown to another uid needs root")


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_missing_directories_are_created_0700_and_the_token_0600(tmp_path: Path) -> None:
    path = tmp_path / "runtime-0" / "lmgrd" / "admin-27000.token"
    tok = write_token(path)
    assert path.read_text() == tok + "\n" and len(tok) >= 43
    assert mode(path) == 0o600 and mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    again = write_token(path)  # a stale token of an earlier run is replaced
    assert again != tok and path.read_text() == again + "\n"
    remove_token(path, "not-ours")
    assert path.exists()
    remove_token(path, again)
    assert not path.exists()


@needs_root
def test_a_token_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "runtime-0" / "lmgrd"
    d.mkdir(parents=True, mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)  # the attacker created it first
    with pytest.raises(TokenDirUnsafe) as info:
        write_token(d / "admin-27000.token")
    assert str(d) in str(info.value) and f"uid {OTHER_UID}" in str(info.value)
    assert list(d.iterdir()) == []


@needs_root
def test_a_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "runtime-0"
    parent.mkdir(mode=0o755)
    os.chown(parent, OTHER_UID, OTHER_UID)  # /tmp/runtime-0 made by someone else: lmgrd/ below it is theirs to swap
    with pytest.raises(TokenDirUnsafe) as info:
        write_token(parent / "lmgrd" / "admin-27000.token")
    assert str(parent) in str(info.value) and f"uid {OTHER_UID}" in str(info.value)
    assert not (parent / "lmgrd" / "admin-27000.token").exists()


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(TokenDirUnsafe) as info:
        write_token(d / "admin-1.token")
    assert "0777" in str(info.value)
    assert list(d.iterdir()) == []


def test_a_token_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(elsewhere)
    with pytest.raises(TokenDirUnsafe) as info:
        write_token(tmp_path / "run" / "admin-1.token")
    assert "symbolic link" in str(info.value)
    assert list(elsewhere.iterdir()) == []


def test_a_symlink_planted_at_the_token_path_is_replaced_not_followed(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (d / "admin-1.token").symlink_to(victim)
    tok = write_token(d / "admin-1.token")
    assert victim.read_text() == "precious\n"
    assert not (d / "admin-1.token").is_symlink() and (d / "admin-1.token").read_text() == tok + "\n"


def test_a_symlink_planted_at_the_temporary_name_is_never_written_through(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    leak = tmp_path / "leak"
    monkeypatch.setattr(token_mod.secrets, "token_hex", lambda n: "f" * (2 * n))  # the name, predicted
    (d / f".admin-1.token.{'f' * 16}.tmp").symlink_to(leak)
    with pytest.raises(FileExistsError):  # O_CREAT | O_EXCL | O_NOFOLLOW: neither reused nor followed
        write_token(d / "admin-1.token")
    assert not leak.exists() and not (d / "admin-1.token").exists()
