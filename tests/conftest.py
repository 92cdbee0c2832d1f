"""Shared fixtures: a vendor key pair, signed licenses for this host, and the daemon as a subprocess."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import Daemon, RawClient, write_keys, write_license

from lmgrd.storage.host import raise_nofile

# The suite asserts English output unless a test asks for Japanese itself: a developer's LANG=ja_JP.UTF-8
# (or LMGRD_LANG=ja) must not change what the daemon, lmutil and lmclient print under test.
os.environ["LMGRD_LANG"] = "en"


@pytest.fixture(autouse=True)
def _close_raw_clients() -> Iterator[None]:
    yield
    while RawClient.opened:
        RawClient.opened.pop().close()


@pytest.fixture(scope="session", autouse=True)
def _raise_open_file_limit() -> None:
    raise_nofile()


@pytest.fixture
def vendor(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    return write_keys(tmp_path / "vendor")


@pytest.fixture
def daemon_factory(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> Iterator[Callable[..., Daemon]]:
    """Start daemons on licenses made for this host; every one is stopped at the end of the test."""
    started: list[Daemon] = []
    key, pub = vendor

    def make(products: Any = (("CADPRO", "2.1", 3),), *, share: str = "user_host", start: bool = True,
             **kw: Any) -> Daemon:
        n = len(started)
        work = tmp_path / f"d{n}"
        work.mkdir()
        lic = work / "site.lic"
        write_license(lic, key, products, share=share)
        d = Daemon(work, [lic], pub, **kw)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
