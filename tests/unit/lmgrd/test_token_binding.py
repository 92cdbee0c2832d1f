"""Leases bound to their holder, on the in-process rig (a real Server, journal on disk; issue 9).

A lease belongs to the user, host and hello secret of the connection it was granted to: a checkin or resume
by anybody else (or of a token that does not exist) frees, renews and moves nothing, looks the same either
way, and is counted; the holder's own new connection takes the seat over and the old one is told
(SEAT_MOVED). The journal keeps only the holder's digest, so the binding survives a restart, and a lease a
pre-binding daemon recorded (no digest) stays its user's on its host. Plus the pieces: the refusal log's
rate limit and the log-line escaper.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_rig import Rig, run
from harness import HOSTNAME, holder_secret

from lmgrd.core.ledger import LeaseRecord, owner_digest
from lmgrd.core.logtext import printable, printable_json_line
from lmgrd.daemon.guard import RefusalCounts, RefusalLog
from lmgrd.storage.journal import JournalStore
from protocol import Checkin, Heartbeat, Resume

Vendor = tuple[Ed25519PrivateKey, Path]
SHARE_NONE: dict[str, Any] = {"share": "none", "products": (("CADPRO", "2.1", 2),)}


def test_another_holders_checkin_and_resume_change_nothing_and_are_counted(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        alice = rig.connect("alice")
        g = rig.checkout(alice)
        token = g["token"]
        lease = rig.server.ledger.get(token)
        assert lease is not None
        deadline = lease.deadline
        for thief in (rig.connect("mallory", "evilpc"), rig.connect("alice", secret="guessed-" + "0" * 24),
                      rig.connect("alice", proto=(1,))):
            (done,) = rig.send(thief, Checkin(rig.rid(), token))
            assert done == {"op": "checked_in", "id": done["id"], "released": False}
            (res,) = rig.send(thief, Resume(rig.rid(), (token,)))
            assert res["resumed"] == [] and [x["code"] for x in res["lost"]] == ["LEASE_NOT_FOUND"]
            (ack,) = rig.send(thief, Heartbeat(rig.rid()))
            assert ack["renewed"] == 0 and ack["lost"] == []
        # Indistinguishable from a token that does not exist.
        (unknown,) = rig.send(alice, Resume(rig.rid(), ("f" * 32,)))
        assert unknown["lost"][0]["message"] == res["lost"][0]["message"]
        assert token in rig.journal() and lease.session == alice.session and lease.deadline == deadline
        assert rig.server.refusals.token_refusals == {("checkin", "not_holder"): 3, ("resume", "not_holder"): 3,
                                                      ("resume", "unknown"): 1}
        (ack,) = rig.send(alice, Heartbeat(rig.rid()))
        assert ack["renewed"] == 1 and ack["lost"] == []
        (done,) = rig.send(alice, Checkin(rig.rid(), token))
        assert done["released"] is True and token not in rig.journal()

    run(tmp_path, vendor, body, **SHARE_NONE)


def test_the_holders_new_connection_takes_the_seat_and_the_old_one_is_told(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        old = rig.connect("alice")
        token = rig.checkout(old)["token"]
        new = rig.connect("alice")  # same user, host and secret: the holder, reconnected
        (res,) = rig.send(new, Resume(rig.rid(), (token,)))
        assert res["resumed"] == [token] and res["lost"] == []
        (ack,) = rig.send(old, Heartbeat(rig.rid()))
        assert ack["renewed"] == 0 and [(x["token"], x["code"]) for x in ack["lost"]] == [(token, "SEAT_MOVED")]
        (ack,) = rig.send(new, Heartbeat(rig.rid()))
        assert ack["renewed"] == 1 and ack["lost"] == []
        assert rig.server.refusals.token_refusals == {}

    run(tmp_path, vendor, body, **SHARE_NONE)


def test_a_protocol_1_clients_seat_is_bound_to_its_connection(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        v1 = rig.connect("alice", proto=(1,))
        token = rig.checkout(v1)["token"]
        again = rig.connect("alice", proto=(1,))  # nothing proves it is the same client
        (res,) = rig.send(again, Resume(rig.rid(), (token,)))
        assert res["resumed"] == []
        (done,) = rig.send(v1, Checkin(rig.rid(), token))  # its own connection may
        assert done["released"] is True

    run(tmp_path, vendor, body, **SHARE_NONE)


def test_the_journal_keeps_the_holders_digest_never_the_secret(tmp_path: Path, vendor: Vendor) -> None:
    tokens: list[str] = []

    async def first(rig: Rig) -> None:
        s = rig.connect("alice", "PC-07.corp.example", secret="a-secret-nobody-else-knows-42")
        tokens.append(rig.checkout(s)["token"])
        rec = rig.journal()[tokens[0]]
        assert rec.owner == owner_digest("alice", "pc-07", "a-secret-nobody-else-knows-42") and len(rec.owner) == 32
        assert b"a-secret-nobody-else-knows-42" not in (rig.state / "leases.journal").read_bytes()

    async def restarted(rig: Rig) -> None:
        (token,) = tokens
        mallory = rig.connect("alice", "pc-07")  # same user and host, not the secret
        (res,) = rig.send(mallory, Resume(rig.rid(), (token,)))
        assert res["resumed"] == []
        alice = rig.connect("alice", "pc-07", secret="a-secret-nobody-else-knows-42")
        (res,) = rig.send(alice, Resume(rig.rid(), (token,)))
        assert res["resumed"] == [token]

    lic = tmp_path / "site.lic"
    run(tmp_path, vendor, first, **SHARE_NONE)
    run(tmp_path, vendor, restarted, keep_license=lic.read_bytes(), **SHARE_NONE)


def test_a_lease_recorded_before_binding_stays_its_user_and_hosts(tmp_path: Path, vendor: Vendor) -> None:
    seen: dict[str, Any] = {}

    async def grab_pool(rig: Rig) -> None:
        seen["pool"] = next(iter(rig.server.licensing.pools()))

    run(tmp_path, vendor, grab_pool, **SHARE_NONE)
    cid, product = seen["pool"]
    store = JournalStore(tmp_path / "state")
    store.record_grant(LeaseRecord("legacy" + "0" * 26, cid, product, ("legacy" + "0" * 26,), "alice", HOSTNAME,
                                   7, "2.1", ":0", 1.7e9))  # owner "": as a daemon before binding wrote it
    store.close()

    async def body(rig: Rig) -> None:
        token = "legacy" + "0" * 26
        bob = rig.connect("bob")
        (res,) = rig.send(bob, Resume(rig.rid(), (token,)))
        assert res["resumed"] == []
        alice = rig.connect("alice", secret=holder_secret("alice") + "x")
        (res,) = rig.send(alice, Resume(rig.rid(), (token,)))
        assert res["resumed"] == [token]

    run(tmp_path, vendor, body, keep_license=(tmp_path / "site.lic").read_bytes(), **SHARE_NONE)


# --------------------------------------------------------------------------- the refusal log, the escaper
def test_the_refusal_log_writes_at_most_n_lines_per_interval_then_one_summary(caplog: pytest.LogCaptureFixture
                                                                              ) -> None:
    now = [100.0]
    timers: list[tuple[float, Any, tuple[Any, ...]]] = []

    class Handle:
        def cancel(self) -> None:
            pass

    def call_later(delay: float, fn: Any, *args: Any) -> Handle:
        timers.append((now[0] + delay, fn, args))
        return Handle()

    counts = RefusalCounts()
    log = RefusalLog(lambda: now[0], call_later, counts, lines=3, interval=10.0)
    caplog.set_level(logging.INFO, logger="lmgrd.daemon.refusals")
    written = [log("bad requests", logging.INFO, "bad request %d", i) for i in range(50)]
    assert written == [True] * 3 + [False] * 47 and counts.log_suppressed == 47
    assert log("rate limits", logging.INFO, "other kind") is True  # each kind has its own budget
    assert len(timers) == 1 and timers[0][0] == 110.0
    now[0] = 110.0
    _, fn, args = timers[0]
    fn(*args)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[:3] == ["bad request 0", "bad request 1", "bad request 2"]
    assert msgs[-1].startswith("suppressed 47 more line(s) of bad requests in 10 s")
    assert len(msgs) == 5
    assert log("bad requests", logging.INFO, "bad request %d", 99) is True  # a new interval
    log.close()
    assert len(caplog.records) == 6


@pytest.mark.parametrize(("raw", "shown"), [
    ("alice", "alice"),
    ("山田", "山田"),
    ("CORP\\alice", "CORP\\alice"),
    ("eve\n2026-01-01 WARNING forged", "eve\\n2026-01-01 WARNING forged"),
    ("a\r\tb\x00\x1b[2J\x7f", "a\\r\\tb\\x00\\x1b[2J\\x7f"),
    ("x\x85y\u2028z\u2029\u200e", "x\\x85y\\u2028z\\u2029\\u200e"),
])
def test_printable_escapes_what_could_break_a_log_line(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert "\n" not in printable(raw) and printable(raw).isprintable()


def test_the_usage_log_json_line_escapes_the_breaks_json_leaves() -> None:
    import json

    line = json.dumps({"user": "a\u2028b\x85c\nd"}, ensure_ascii=False)
    safe = printable_json_line(line)
    assert len(safe.splitlines()) == 1 and json.loads(safe) == {"user": "a\u2028b\x85c\nd"}


# --------------------------------------------------------------------------- the settings
def test_the_idle_timeout_and_rate_limit_settings_are_validated_and_have_flags(tmp_path: Path) -> None:
    from lmgrd.cli import _overrides, build_parser
    from lmgrd.config import (
        DEFAULT_IDLE_CONNECTION_TIMEOUT,
        DEFAULT_MAX_REQUESTS_PER_SECOND,
        ConfigInvalid,
        build_config,
    )

    base = {"licenses": [str(tmp_path / "a.lic")], "vendor_key": str(tmp_path / "v.pub")}
    cfg = build_config(base, {}, "test")
    assert (cfg.idle_connection_timeout, cfg.max_requests_per_second) == (
        DEFAULT_IDLE_CONNECTION_TIMEOUT, DEFAULT_MAX_REQUESTS_PER_SECOND) == (300.0, 1000.0)
    with pytest.raises(ConfigInvalid) as info:
        build_config({**base, "idle_connection_timeout": -1, "max_requests_per_second": True}, {}, "lmgrd.yaml")
    assert info.value.problems == [
        "idle_connection_timeout: expected a number from 0 to 86400, got -1",
        "max_requests_per_second: expected a number from 0 to 1e+06, got True",
    ]
    ns = build_parser().parse_args(["--idle-connection-timeout", "0", "--max-requests-per-second", "50"])
    cfg = build_config({**base, "idle_connection_timeout": 60}, _overrides(ns), "test")
    assert (cfg.idle_connection_timeout, cfg.max_requests_per_second) == (0.0, 50.0)  # flags win over the file


def test_the_daemons_log_formatter_keeps_every_message_on_one_line() -> None:
    import sys

    from lmgrd.cli import OneLineFormatter

    f = OneLineFormatter("%(levelname)s %(name)s: %(message)s")
    rec = logging.LogRecord("lmgrd.x", logging.INFO, __file__, 1, "OUT %s to %s", ("CADPRO", "eve\nFORGED\x1b[2J"),
                            None)
    assert f.format(rec) == "INFO lmgrd.x: OUT CADPRO to eve\\nFORGED\\x1b[2J"
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("lmgrd.x", logging.ERROR, __file__, 1, "failed:\n%s", ("x",), sys.exc_info())
    out = f.format(rec)
    assert out.startswith("ERROR lmgrd.x: failed:\\nx\nTraceback") and out.rstrip().endswith("ValueError: boom")
