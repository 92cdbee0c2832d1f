"""The usage log of the real daemon (every event kind, written while it runs, flushed at shutdown, read back by
``lmutil report``), and the writer itself: rotation by size, and a stalled disk (a pipe nobody reads) that
drops and counts events instead of blocking the caller."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import HOSTNAME, Daemon, RawClient, write_license

from lmgrd.monitoring.usage import UsageLog
from protocol import Checkin, Checkout, ErrorReply, Granted
from protocol.license import Revocation, sign_revocation

COMMON = ("ts", "epoch", "event", "customer_id", "product", "version", "user", "host")


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def wait_for_event(path: Path, event: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = read_lines(path)
        if any(x["event"] == event for x in lines):
            return lines
        time.sleep(0.02)
    raise AssertionError(f"no {event} line in {path} within {timeout} s: {read_lines(path)}")


def checkout(d: Daemon, user: str, product: str = "CADPRO", wait: float = 0) -> tuple[RawClient, Any]:
    c = d.connect()
    c.hello(user=user)
    return c, c.request(Checkout(c.id(), product, "2.1", wait))


def test_every_event_kind_is_logged_by_the_real_daemon(tmp_path: Path,
                                                       vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    key, pub = vendor
    lic = tmp_path / "site.lic"
    cid = write_license(lic, key, (("CADPRO", "2.1", 1),)).customer_id
    cfg = tmp_path / "lmgrd.yaml"
    log = tmp_path / "logs" / "usage.log"  # the directory is created by the daemon
    cfg.write_text(f"revocations: []\nusage_log: {log}\n")
    d = Daemon(tmp_path, [lic], pub, heartbeat=1, lease_timeout=3, extra=["-c", str(cfg), "--metrics-port", "0"])
    d.start()
    try:
        alice, g = checkout(d, "alice")
        assert isinstance(g, Granted)
        wait_for_event(log, "checkout")  # written while the daemon runs, not only at shutdown
        _bob, denied = checkout(d, "bob")
        assert isinstance(denied, ErrorReply) and denied.code == "NO_SEATS"
        _bob2, unknown = checkout(d, "bob", product="NOPE")
        assert isinstance(unknown, ErrorReply) and unknown.code == "UNKNOWN_PRODUCT"
        alice.request(Checkin(alice.id(), g.token))
        _carol, gc = checkout(d, "carol")
        assert isinstance(gc, Granted)
        r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmremove", "--token", gc.token, "-c", d.address],
                           capture_output=True, text=True, timeout=30, env=d.env())
        assert r.returncode == 0, r.stderr
        dave, gd = checkout(d, "dave")
        assert isinstance(gd, Granted)
        dave.close()  # no heartbeat any more: the seat lapses
        d.wait_for_log(r"EXPIRED CADPRO 2\.1 of dave@", timeout=15)
        _erin, ge = checkout(d, "erin")
        assert isinstance(ge, Granted)
        rev = tmp_path / "cid.revoked"
        rev.write_text(sign_revocation(Revocation(cid, datetime.now(UTC), "test revocation"), key))
        cfg.write_text(f"revocations: [{rev}]\nusage_log: {log}\n")
        r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmreread", "-c", d.address],
                           capture_output=True, text=True, timeout=30, env=d.env())
        assert r.returncode == 1 and "revoked" in r.stdout, r.stdout + r.stderr  # reloaded; the file is revoked
        d.wait_for_log(r"REVOKED CADPRO")
        _frank, revoked = checkout(d, "frank")
        assert isinstance(revoked, ErrorReply) and revoked.code == "LICENSE_REVOKED"
    finally:
        assert d.stop() == 0
    assert "usage log" in d.log() and "flushed" in d.log()
    lines = read_lines(log)
    kinds = [(x["event"], x["user"]) for x in lines]
    assert kinds == [
        ("checkout", "alice"), ("denial", "bob"), ("denial", "bob"), ("checkin", "alice"), ("checkout", "carol"),
        ("removal", "carol"), ("checkout", "dave"), ("expiry", "dave"), ("checkout", "erin"), ("revoked", "erin"),
        ("denial", "frank"),
    ], kinds
    for x in lines:
        assert all(k in x for k in COMMON), x
        assert x["host"] == HOSTNAME.lower()
        assert datetime.fromisoformat(x["ts"]).timestamp() == pytest.approx(x["epoch"], abs=0.001)
    for x in lines:
        if x["event"] == "checkout":
            got = (x["customer_id"], x["product"], x["version"], x["count"], x["in_use"])
            assert got == (cid, "CADPRO", "2.1", 1, 1)
            assert len(x["lease"]) == 12
        elif x["event"] == "denial":
            assert x["reason"] in ("NO_SEATS", "UNKNOWN_PRODUCT", "LICENSE_REVOKED")
        else:
            assert x["in_use"] == 0 and x["held_s"] >= 0 and x["customer_id"] == cid
    assert [x["reason"] for x in lines if x["event"] == "denial"] == ["NO_SEATS", "UNKNOWN_PRODUCT", "LICENSE_REVOKED"]
    denial = lines[2]
    assert (denial["product"], denial["customer_id"]) == ("NOPE", "")
    assert lines[1]["customer_id"] == cid  # a licensed product's denial names its customer
    by_lease = {x["lease"]: x for x in lines if x["event"] == "checkout"}
    assert by_lease[g.token[:12]]["user"] == "alice" and by_lease[gc.token[:12]]["user"] == "carol"
    # The report reads the same file.
    r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "report", str(log), "--json", "--product", "CADPRO"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["products"]
    assert len(rep) == 1 and rep[0]["checkouts"] == 4 and rep[0]["peak"] == 1 and rep[0]["count"] == 1
    assert rep[0]["denials"] == {"LICENSE_REVOKED": 1, "NO_SEATS": 1}


def _event(log: UsageLog, i: int) -> None:
    log.on_deny("CADPRO", "2.1", "NO_SEATS", None, f"CID-{i:06d}")


def test_rotation_by_size_keeps_n_backups_of_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "usage.log"
    log = UsageLog(path, max_bytes=2000, backups=2, wall=lambda: 1_700_000_000.0)
    for i in range(200):
        _event(log, i)
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["usage.log", "usage.log.1", "usage.log.2"]
    for f in files:
        assert 0 < f.stat().st_size <= 2000
    # Oldest first: .2, .1, then the live file; the lines are consecutive and end with the last event.
    ids = [int(x["customer_id"][4:]) for f in ("usage.log.2", "usage.log.1", "usage.log")
           for x in read_lines(tmp_path / f)]
    assert ids == list(range(ids[0], 200)) and ids[0] > 0
    # A restart appends to the live file and rotates on from there.
    log = UsageLog(path, max_bytes=2000, backups=2, wall=lambda: 1_700_000_001.0)
    _event(log, 200)
    log.close()
    ids = [int(x["customer_id"][4:]) for f in ("usage.log.2", "usage.log.1", "usage.log")
           for x in read_lines(tmp_path / f)]
    assert ids == list(range(ids[0], 201))


def test_no_backups_means_the_file_restarts(tmp_path: Path) -> None:
    path = tmp_path / "usage.log"
    log = UsageLog(path, max_bytes=1000, backups=0)
    for i in range(100):
        _event(log, i)
    log.close()
    assert [f.name for f in tmp_path.iterdir()] == ["usage.log"]
    assert path.stat().st_size <= 1000 and read_lines(path)[-1]["customer_id"] == "CID-000099"


def test_a_stalled_disk_drops_and_counts_events_without_blocking(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    fifo = tmp_path / "usage.pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read until the end: the "disk" stalls
    try:
        log = UsageLog(fifo, max_bytes=0, queue_size=50)
        for i in range(5000):  # far more than the pipe buffer and the queue hold; each call returns at once
            _event(log, i)
        assert log.dropped > 0
        dropped = log.dropped
        with caplog.at_level(logging.WARNING, logger="lmgrd.monitoring.usage"):
            data = b""
            deadline = time.monotonic() + 20
            log_closed = False
            while time.monotonic() < deadline:
                ready, _, _ = select.select([reader], [], [], 0.05)
                if ready:
                    chunk = os.read(reader, 1 << 16)
                    if not chunk:
                        break  # EOF: the writer closed its end
                    data += chunk
                if not log_closed and b'"dropped"' in data:
                    # The pipe has room again for what is still queued (at most queue_size lines).
                    log.close()
                    log_closed = True
        lines = [json.loads(x) for x in data.splitlines()]
        drops = [x for x in lines if x["event"] == "dropped"]
        assert sum(x["count"] for x in drops) == dropped
        assert len(lines) - len(drops) == 5000 - dropped  # every event not dropped was written
        assert any("dropped because the disk did not keep up" in r.getMessage() for r in caplog.records)
    finally:
        os.close(reader)
