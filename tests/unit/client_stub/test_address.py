"""Server list parsing and lookup: argument, LM_LICENSE_SERVER, then the per-user config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_stub import LicenseError
from client_stub.address import (
    LicenseFile,
    ServerAddress,
    config_path,
    parse_endpoint,
    parse_server_list,
    resolve_servers,
)
from protocol import ErrorCode


@pytest.mark.parametrize(("spec", "host", "port"), [
    ("27000@licsrv", "licsrv", 27000),
    ("27001@licsrv01.corp.example", "licsrv01.corp.example", 27001),
    ("@licsrv", "licsrv", 27000),
    ("27000@192.0.2.10", "192.0.2.10", 27000),
    ("27000@[::1]", "::1", 27000),
    ("27000@::1", "::1", 27000),
    ("@[2001:db8::10]", "2001:db8::10", 27000),
    ("licsrv:1234", "licsrv", 1234),
    ("[::1]:27000", "::1", 27000),
    ("  27000@licsrv  ", "licsrv", 27000),
    ("65535@h", "h", 65535),
])
def test_server_forms(spec: str, host: str, port: int) -> None:
    assert parse_endpoint(spec) == ServerAddress(host, port)


def test_ipv6_prints_in_brackets() -> None:
    assert str(parse_endpoint("27000@::1")) == "27000@[::1]"
    assert str(parse_endpoint("licsrv:27001")) == "27001@licsrv"


@pytest.mark.parametrize(("spec", "words"), [
    ("0@licsrv", "port '0'"),
    ("70000@licsrv", "port '70000'"),
    ("x@licsrv", "port 'x'"),
    ("27000@", "host ''"),
    ("licsrv", "PORT@HOST such as 27000@licsrv"),
    ("licsrv:", "port ''"),
    (":27000", "host ''"),
    ("27000@lic srv", "host 'lic srv'"),
    ("27000@[nothex]", "IPv6"),
    ("", "empty"),
])
def test_bad_entries_are_named(spec: str, words: str) -> None:
    with pytest.raises(LicenseError) as info:
        parse_endpoint(spec)
    assert info.value.code is ErrorCode.CLIENT_CONFIG_INVALID
    assert words in info.value.message
    assert "LM_LICENSE_SERVER" in str(info.value)  # says how to set it


def test_license_files(tmp_path: Path) -> None:
    existing = tmp_path / "node.dat"
    existing.write_text("x")
    assert parse_endpoint(str(existing)) == LicenseFile(existing)
    assert parse_endpoint(str(tmp_path / "missing.lic")) == LicenseFile(tmp_path / "missing.lic")
    assert parse_endpoint("relative/site.LIC") == LicenseFile(Path("relative/site.LIC"))
    assert parse_server_list(existing) == (LicenseFile(existing),)  # a Path is always a file


def test_lists_keep_their_order(tmp_path: Path) -> None:
    lic = tmp_path / "pc.lic"
    got = parse_server_list(f"27000@a, b:27001 ,{lic},@c")
    assert got == (ServerAddress("a", 27000), ServerAddress("b", 27001), LicenseFile(lic), ServerAddress("c", 27000))
    assert parse_server_list(["27000@a,27000@b", "27000@c"]) == tuple(
        ServerAddress(h, 27000) for h in "abc")
    with pytest.raises(LicenseError, match="empty"):
        parse_server_list(" , ")


def test_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    got = resolve_servers("27000@arg", environ={"LM_LICENSE_SERVER": "27000@env"})
    assert got.entries == (ServerAddress("arg", 27000),) and got.source == "argument"


def test_environment_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("LM_LICENSE_SERVER", "27000@main,27000@backup")
    got = resolve_servers()
    assert got.servers == (ServerAddress("main", 27000), ServerAddress("backup", 27000))
    assert got.source == "environment variable LM_LICENSE_SERVER"
    monkeypatch.setenv("LM_LICENSE_SERVER", "27000@main,oops")
    with pytest.raises(LicenseError, match="LM_LICENSE_SERVER='27000@main,oops'"):
        resolve_servers()


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lmgrd" / "client.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_under_xdg_config_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LM_LICENSE_SERVER", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = _write_config(tmp_path, "servers: ['27000@licsrv', 'backup:27001']\n")
    assert config_path() == path
    got = resolve_servers()
    assert got.servers == (ServerAddress("licsrv", 27000), ServerAddress("backup", 27001))
    assert got.source == f"config file {path}"
    # The environment comes before the file.
    monkeypatch.setenv("LM_LICENSE_SERVER", "@envhost")
    assert resolve_servers().servers == (ServerAddress("envhost", 27000),)


@pytest.mark.parametrize(("text", "words"), [
    ("servers: [1, 2]\n", "'servers' must be a list"),
    ("- a\n- b\n", "must be a mapping"),
    ("servers: ['nonsense']\n", "'nonsense' is not a license server"),
    ("servers: [27000@a\n", "not valid YAML"),
])
def test_bad_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, words: str) -> None:
    monkeypatch.delenv("LM_LICENSE_SERVER", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = _write_config(tmp_path, text)
    with pytest.raises(LicenseError) as info:
        resolve_servers()
    assert info.value.code is ErrorCode.CLIENT_CONFIG_INVALID
    assert str(path) in info.value.message and words in info.value.message


@pytest.mark.parametrize("text", [None, "", "servers: []\n", "other: 1\n"])
def test_nothing_configured_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               text: str | None) -> None:
    monkeypatch.delenv("LM_LICENSE_SERVER", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    if text is not None:
        _write_config(tmp_path, text)
    with pytest.raises(LicenseError) as info:
        resolve_servers()
    err = info.value
    assert err.code is ErrorCode.CLIENT_CONFIG_INVALID
    assert "no license server is configured" in err.message
    for how in ("LM_LICENSE_SERVER=27000@licsrv", "lmclient set-server", ".lic"):
        assert how in str(err)
