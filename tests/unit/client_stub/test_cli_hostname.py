"""lmclient explains up front that a host with a non-ASCII name cannot be licensed (the name is the OS's;
renaming this test machine is not possible, so the OS's answer is replaced in-process)."""

from __future__ import annotations

import socket

import pytest

from client_stub import cli


@pytest.mark.parametrize("name", ["設計-pc1", "pc_1", "pc 1"])
def test_hostid_warns_that_the_name_cannot_be_licensed(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], name: str) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: name)
    assert cli.main(["hostid"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"this host's name {name!r} cannot be licensed" in err
    assert "ASCII letters, digits and hyphens" in err and "must be renamed" in err


def test_ping_says_so_before_trying(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "設計")
    code = cli.main(["ping", "-c", "1@127.0.0.1"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.splitlines()[0].startswith("lmclient: this host's name '設計' cannot be licensed"), err


def test_a_licensable_name_gets_no_warning(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "licsrv01")
    assert cli.main(["hostid"]) == 0
    assert "cannot be licensed" not in capsys.readouterr().err
