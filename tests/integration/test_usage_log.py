"""The usage log of the real daemon (every event kind, written while it runs, flushed at shutdown, read back by
``lmutil report``), and the writer itself (a QueueHandler, a QueueListener thread and a RotatingFileHandler):
the exact line format, rotation by size with the rotated names and nothing lost across a rotation, a stalled
disk (a pipe nobody reads) that drops and counts events instead of blocking the caller, and a full disk
(/dev/full) that is reported once and never raises."""

from __future__ import annotations

import itertools
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

from lmgrd.core.ledger import LeaseInfo
from lmgrd.monitoring.usage import UsageLog
from lmgrd.vendor.signing import sign_revocation
from protocol import Checkin, Checkout, ErrorReply, Granted
from protocol.license import Revocation

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
        start = time.monotonic()
        for i in range(5000):  # far more than the pipe buffer and the queue hold; each call returns at once
            _event(log, i)
        assert time.monotonic() - start < 2.0  # never waited on the stalled writer
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
        assert drops and all(list(x) == ["ts", "epoch", "event", "count"] for x in drops), drops
        assert sum(x["count"] for x in drops) == dropped
        assert len(lines) - len(drops) == 5000 - dropped  # every event not dropped was written
        assert any("dropped because the disk did not keep up" in r.getMessage() for r in caplog.records)
    finally:
        os.close(reader)


def _lease(user: str, token: str = "abcdef0123456789" * 2) -> LeaseInfo:
    return LeaseInfo(token, ("CID-A", "CADPRO"), (user, "pc1"), user, "pc1", 4242, "2.1", "pc1:0",
                     1_699_999_000.0, 1, 10.0)


class _Who:
    user, host = "bob", "pc2"


def test_lines_are_byte_for_byte_the_documented_format(tmp_path: Path) -> None:
    # These bytes were produced by the writer this one replaced (its own thread and rotation): they are the
    # format lmutil report and customers' scripts read.
    path = tmp_path / "usage.jsonl"
    log = UsageLog(path, wall=lambda: 1_700_000_000.1234)
    log.on_grant(_lease("josé"), None, 1.23456)
    log.on_release(_lease("josé"), "checkin")
    log.on_deny("CADPRO", "2.1", "NO_SEATS", _Who(), "CID-A")
    log.on_deny("NOPE", "1", "UNKNOWN_PRODUCT", None, None)
    log.close()
    assert path.read_bytes() == (
        b'{"ts":"2023-11-14T22:13:20.123Z","epoch":1700000000.123,"event":"checkout","customer_id":"CID-A",'
        b'"product":"CADPRO","version":"2.1","user":"jos\xc3\xa9","host":"pc1","lease":"abcdef012345","count":null,'
        b'"in_use":null,"pid":4242,"display":"pc1:0","waited_s":1.235}\n'
        b'{"ts":"2023-11-14T22:13:20.123Z","epoch":1700000000.123,"event":"checkin","customer_id":"CID-A",'
        b'"product":"CADPRO","version":"2.1","user":"jos\xc3\xa9","host":"pc1","lease":"abcdef012345",'
        b'"in_use":null,"held_s":1000.123}\n'
        b'{"ts":"2023-11-14T22:13:20.123Z","epoch":1700000000.123,"event":"denial","customer_id":"CID-A",'
        b'"product":"CADPRO","version":"2.1","user":"bob","host":"pc2","reason":"NO_SEATS"}\n'
        b'{"ts":"2023-11-14T22:13:20.123Z","epoch":1700000000.123,"event":"denial","customer_id":"",'
        b'"product":"NOPE","version":"1","user":"","host":"","reason":"UNKNOWN_PRODUCT"}\n')
    assert log.written == 4 and log.dropped == 0


def test_rotation_happens_at_the_size_limit_with_the_rotated_names_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    limit = 1500
    log = UsageLog(path, max_bytes=limit, backups=100, wall=lambda: 1_700_000_000.0)
    users = ["ann", "bérénice", "zoë-" + "x" * 40, "李"]  # multi-byte characters: the limit is in bytes
    for i in range(300):
        log.on_grant(_lease(users[i % 4], token=f"{i:012d}" + "0" * 20), None, 0.0)
    log.close()
    names = sorted((f.name for f in tmp_path.iterdir()), key=lambda n: (len(n), n))
    rotated = len(names) - 1
    assert rotated >= 10
    assert names == ["usage.jsonl"] + [f"usage.jsonl.{i}" for i in range(1, rotated + 1)]
    oldest_first = [tmp_path / f"usage.jsonl.{i}" for i in range(rotated, 0, -1)] + [path]
    raw = [f.read_bytes() for f in oldest_first]
    # Every event once, in order, as whole lines; no file past the limit.
    tokens = [json.loads(line)["lease"] for data in raw for line in data.splitlines()]
    assert tokens == [f"{i:012d}" for i in range(300)]
    assert all(data.endswith(b"\n") and len(data) <= limit for data in raw)
    # Rotated at the limit, not before: each rotated file could not take the next line.
    for data, newer in itertools.pairwise(raw):
        assert len(data) + len(newer.splitlines(keepends=True)[0]) > limit
    assert log.written == 300


def test_old_backups_fall_off_the_end(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    log = UsageLog(path, max_bytes=600, backups=3, wall=lambda: 1_700_000_000.0)
    for i in range(100):
        _event(log, i)
    log.close()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["usage.jsonl", "usage.jsonl.1", "usage.jsonl.2",
                                                          "usage.jsonl.3"]
    ids = [int(x["customer_id"][4:]) for f in ("usage.jsonl.3", "usage.jsonl.2", "usage.jsonl.1", "usage.jsonl")
           for x in read_lines(tmp_path / f)]
    assert ids == list(range(ids[0], 100)) and ids[0] > 0


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    log = UsageLog(path, max_bytes=200, backups=5, wall=lambda: 1_700_000_000.0)
    _event(log, 1)
    log.on_deny("P" * 300, "2.1", "NO_SEATS", None, "CID-LONG")
    _event(log, 2)
    log.close()
    files = [tmp_path / n for n in ("usage.jsonl.2", "usage.jsonl.1", "usage.jsonl")]
    assert [[x["customer_id"] for x in read_lines(f)] for f in files] == [["CID-000001"], ["CID-LONG"],
                                                                          ["CID-000002"]]


def test_usage_lines_and_the_daemons_log_never_mix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "usage.jsonl"
    with caplog.at_level(logging.DEBUG):  # the root logger sees everything logged anywhere
        log = UsageLog(path, wall=lambda: 1_700_000_000.0)
        for i in range(20):
            _event(log, i)
        logging.getLogger("lmgrd").warning("a daemon log line")
        logging.getLogger("lmgrd.monitoring.usage").warning("a usage-module log line")
        log.close()
    assert [x["customer_id"] for x in read_lines(path)] == [f"CID-{i:06d}" for i in range(20)]  # JSON only
    assert not [r for r in caplog.records if "CID-0000" in r.getMessage()], caplog.records
    assert any("flushed (20 event(s) written since start)" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_reported_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="lmgrd.monitoring.usage"):
        log = UsageLog(Path("/dev/full"), max_bytes=1000)  # every write fails with ENOSPC
        for burst in range(3):
            for i in range(200):
                _event(log, burst * 1000 + i)
            time.sleep(0.2)
        log.close()
        log.close()  # idempotent
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # once per outage, not once per line
    assert "cannot write the usage log /dev/full" in errors[0] and "No space left on device" in errors[0]
