"""Regenerate protocol/vectors/frames.json (the checked-in test vectors) from the message classes.

Run ``python -m protocol.make_vectors`` only when the protocol deliberately changes; the tests check the
vectors in both directions, so an accidental change to the wire format fails them. A developer script:
neither end imports it, and it is the one module of ``protocol`` that writes a file (only when run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocol.errors import ErrorCode
from protocol.framing import encode_frame
from protocol.messages import (
    CheckedIn,
    Checkin,
    Checkout,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    LostSeat,
    Resume,
    Resumed,
    Status,
    Welcome,
)
from protocol.samples import SAMPLES

TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
EXAMPLES: list[tuple[str, Any]] = [
    ("hello", Hello(1, (1,), "pc-042", "alice", 4242, "0.1.0", "pts/3")),
    ("hello_v2", Hello(1, (1, 2), "pc-042", "alice", 4242, "0.1.0", "pts/3", "9a7c3e1f5b2d4068a1c3e5f7092b4d6f")),
    ("welcome", Welcome(1, 1, "0.1.0", 30.0, 90.0, 65536, 7)),
    ("checkout", Checkout(2, "CADPRO", "2.1", 30.0)),
    ("granted", Granted(2, TOKEN, "CID-ABCD-EFGH-IJKL-MNOP", "CADPRO", "2.1", 90.0, 30.0, 0.0)),
    ("no_seats", ErrorReply(2, ErrorCode.NO_SEATS, "all 25 seat(s) of CADPRO are in use", "try again later")),
    ("heartbeat", Heartbeat(3, False)),
    ("heartbeat_ack", HeartbeatAck(3, 1, ())),
    ("heartbeat_ack_lost", HeartbeatAck(4, 0, (LostSeat(TOKEN, ErrorCode.LEASE_EXPIRED, "no heartbeat for 90 s"),))),
    ("heartbeat_ack_moved", HeartbeatAck(7, 0, (LostSeat(TOKEN, ErrorCode.SEAT_MOVED, "moved elsewhere"),))),
    ("checkin", Checkin(5, TOKEN)),
    ("checked_in", CheckedIn(5, True)),
    ("resume", Resume(1, (TOKEN,))),
    ("resumed", Resumed(1, (TOKEN,), ())),
    ("status", Status(6)),
    *((f"sample_{name}", msg) for name, msg in SAMPLES.items()),  # one complete message of every kind
]


def build() -> list[dict[str, object]]:
    return [{"name": name, "message": msg.to_wire(), "frame_hex": encode_frame(msg.to_wire()).hex()}
            for name, msg in EXAMPLES]


if __name__ == "__main__":
    out = Path(__file__).with_name("vectors") / "frames.json"
    out.write_text(json.dumps(build(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
