"""lmutil as an operator runs it, against the real daemon: credential discovery, lmstat layout, lmdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from harness import HOSTNAME, Daemon, write_license

from protocol import Checkout, Granted, Heartbeat, HeartbeatAck


def lmutil(d: Daemon, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmgrd.lmutil", *args, "-c", d.address], capture_output=True,
                          text=True, timeout=30, env=env or d.env())


def test_lmstat_finds_its_credential_and_follows_flexnet_layout(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 25),))
    c = d.connect()
    c.hello(user="alice")
    assert isinstance(c.request(Checkout(c.id(), "CADPRO", "2.1", 0)), Granted)
    r = lmutil(d, "lmstat", "-a")
    assert r.returncode == 0, r.stderr
    assert "Users of CADPRO:  (Total of 25 licenses issued;  Total of 1 license in use)" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("    alice "))
    assert line.startswith(f"    alice {HOSTNAME.lower()} ") and "(v2.1)" in line and ", start " in line
    j = lmutil(d, "lmstat", "-f", "CADPRO", "--json")
    data = json.loads(j.stdout)
    assert data["pools"][0]["in_use"] == 1 and data["leases"][0]["user"] == "alice"


def test_without_the_token_lmutil_is_refused_and_logged(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    env = {**os.environ, "LMGRD_RUNTIME_DIR": str(d.workdir / "elsewhere")}
    r = lmutil(d, "lmstat", env=env)
    assert r.returncode == 1 and "NOT_AUTHORIZED" in r.stderr
    d.wait_for_log(r"NOT_AUTHORIZED admin command 'lmstat' from 127\.0\.0\.1")
    # An explicit --token-file works from anywhere.
    tok = d.workdir / "run" / f"admin-{d.port}.token"
    assert oct(tok.stat().st_mode & 0o777) == "0o600"
    r = lmutil(d, "lmstat", "--token-file", str(tok), env=env)
    assert r.returncode == 0, r.stderr


def test_lmdown_stops_the_daemon_gracefully(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    r = lmutil(d, "lmdown")
    assert r.returncode == 0, r.stderr
    assert d.proc is not None and d.proc.wait(10) == 0
    assert "lmgrd stopped" in d.log()


def test_unreachable_server_exit_code(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    d.stop()
    r = lmutil(d, "lmstat")
    assert r.returncode == 3 and "cannot reach the license server" in r.stderr


def test_lmreread_reloads_without_dropping_leases_and_keeps_old_on_bad_file(
        daemon_factory: Callable[..., Daemon], vendor: tuple[Any, Any]) -> None:
    key, _pub = vendor
    d = daemon_factory((("CADPRO", "2.1", 1),))
    c = d.connect()
    c.hello(user="alice")
    g = c.request(Checkout(c.id(), "CADPRO", "2.1", 0))
    assert isinstance(g, Granted)
    lic = d.licenses[0]
    write_license(lic, key, (("CADPRO", "2.1", 2), ("VIEWER", "1.0", 1)))  # a new customer ID, more seats
    r = lmutil(d, "lmreread", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["problems"] == []
    ack = c.request(Heartbeat(c.id()))
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 1  # the lease survived the reread
    b = d.connect()
    b.hello(user="bob")
    assert isinstance(b.request(Checkout(b.id(), "VIEWER", "1.0", 0)), Granted)
    # A broken file is refused with the reason and the old license keeps serving.
    lic.write_text(lic.read_text().replace("count=2", "count=99"))
    r = lmutil(d, "lmreread", "--json")
    assert r.returncode == 1  # the operator's script sees the refusal
    out = json.loads(r.stdout)
    assert any("keeps serving" in p for p in out["problems"]) and any(str(lic) in p for p in out["problems"])
    assert isinstance(b.request(Checkout(b.id(), "CADPRO", "2.1", 0)), Granted)
    # SIGHUP does the same.
    write_license(lic, key, (("CADPRO", "2.1", 3),))
    d.signal(signal.SIGHUP)
    d.wait_for_log(r"reread: serving 1 license")
