"""The identity sent in hello: the OS's hostname and user unless overridden, the pid, a display without spaces."""

from __future__ import annotations

import getpass
import os
import socket

import pytest

from client_stub import LicenseError
from client_stub.aio import local_identity
from protocol import ErrorCode
from protocol.validation import hostname_problem


def test_defaults_come_from_the_os(monkeypatch: pytest.MonkeyPatch) -> None:
    if hostname_problem(socket.gethostname()):
        pytest.skip("this machine's own hostname cannot be licensed")
    monkeypatch.delenv("DISPLAY", raising=False)
    ident = local_identity()
    assert ident.host == socket.gethostname()
    assert ident.user == getpass.getuser()
    assert ident.pid == os.getpid()
    assert ident.display and " " not in ident.display


def test_display_from_environment_without_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", "my host:0 .1")
    assert local_identity("pc-01").display == "my_host:0_.1"


def test_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    ident = local_identity("ts-01.corp.example", "山田")
    assert (ident.host, ident.user) == ("ts-01.corp.example", "山田")


@pytest.mark.parametrize("user", ["", "   ", "x" * 257])
def test_bad_user(user: str) -> None:
    with pytest.raises(LicenseError) as info:
        local_identity("pc-01", user)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_real_non_ascii_hostname_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The OS reports the name; the client refuses it as it would a given one, before any connection.
    monkeypatch.setattr(socket, "gethostname", lambda: "設計-PC")
    with pytest.raises(LicenseError) as info:
        local_identity()
    assert info.value.code is ErrorCode.INVALID_HOSTNAME
    assert "this computer's hostname" in info.value.message
    assert "ASCII letters, digits and hyphens" in info.value.message
