"""The per-connection request rate on the transport's two lanes, on a clock the test moves: a checkin of a
held seat is run even with the allowance spent (refusing it would keep the seat until its lease lapses);
every other request, a checkin of a token the client does not hold included, is answered RATE_LIMITED."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_rig import RecordingTransport, Rig, run

from lmgrd.daemon.transport import ClientProtocol
from protocol import Checkin, Checkout, Connection, ErrorCode, Hello, Role, Status
from protocol.framing import encode_frame

Vendor = tuple[Ed25519PrivateKey, Path]


def _client(rig: Rig) -> tuple[ClientProtocol, RecordingTransport]:
    """A real ClientProtocol (the socket side replaced by a recording transport) after its hello."""
    p = ClientProtocol(rig.server)
    t = RecordingTransport()
    p.transport = t  # type: ignore[assignment]
    p.addr, p.port = "127.0.0.1", 5001
    p.allowance = rig.server.request_burst
    p.data_received(Connection(Role.CLIENT).send(Hello(1, (1, 2), "pc1", "alice", 7, "test", ":0", "s" * 32)))
    rig.server.outbox.flush()
    assert [r["op"] for r in t.replies()] == ["welcome"]
    return p, t


def _send(rig: Rig, p: ClientProtocol, t: RecordingTransport, *reqs: Any) -> list[dict[str, Any]]:
    p.data_received(b"".join(encode_frame(r.to_wire()) for r in reqs))
    rig.server.outbox.flush()
    return t.replies()


def test_a_held_seats_checkin_is_run_with_the_allowance_spent_on_both_lanes(tmp_path: Path, vendor: Vendor) -> None:
    now = [1000.0]

    async def body(rig: Rig) -> None:
        p, t = _client(rig)
        tokens = []
        for i in range(2):
            (g,) = _send(rig, p, t, Checkout(10 + i, "CADPRO", "2.1"))
            assert g["op"] == "granted", g
            tokens.append(g["token"])
        p.allowance = 0.0  # spent, and the clock does not move: nothing refills
        # The hot lane: one whole checkin alone in a read.
        (r,) = _send(rig, p, t, Checkin(20, tokens[0]))
        assert r == {"op": "checked_in", "id": 20, "released": True}
        (r,) = _send(rig, p, t, Checkin(21, "f" * 32))
        assert r["op"] == "error" and r["code"] == ErrorCode.RATE_LIMITED, r
        (r,) = _send(rig, p, t, Status(22))
        assert r["op"] == "error" and r["code"] == ErrorCode.RATE_LIMITED, r
        # The general lane: several frames in one read.
        rs = _send(rig, p, t, Status(30), Checkin(31, tokens[1]), Checkin(32, tokens[1]))
        assert [r["id"] for r in rs] == [30, 31, 32]
        assert rs[0]["code"] == ErrorCode.RATE_LIMITED
        assert rs[1] == {"op": "checked_in", "id": 31, "released": True}
        assert rs[2]["code"] == ErrorCode.RATE_LIMITED  # no longer held: refused like any request
        assert rig.server.ledger.get(tokens[0]) is None and rig.server.ledger.get(tokens[1]) is None
        assert rig.server.handlers.refusals.rate_limited == 4
        assert p.allowance == 0.0  # the exempt checkins spent nothing

    run(tmp_path, vendor, body, products=(("CADPRO", "2.1", 2),), extra={"max_requests_per_second": 5},
        clock=lambda: now[0])
