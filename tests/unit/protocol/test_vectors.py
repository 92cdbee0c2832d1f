"""The checked-in test vectors (protocol/vectors/frames.json), in both directions.

Encoding each example message must give the recorded bytes, and decoding the recorded bytes must give the
recorded map and the same message object. An accidental change to the wire format fails here; a deliberate
one regenerates the file with ``python -m protocol.make_vectors`` and says so in PROTOCOL.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocol import FrameDecoder, encode_frame, parse_reply, parse_request
from protocol.make_vectors import EXAMPLES, build
from protocol.samples import REQUESTS

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parents[3] / "protocol" / "vectors" / "frames.json").read_text(encoding="utf-8"))
BY_NAME = dict(EXAMPLES)
REQUEST_TYPES = tuple({type(m) for m in REQUESTS.values()})


def test_the_file_matches_the_examples() -> None:
    assert [v["name"] for v in VECTORS] == [name for name, _ in EXAMPLES]
    assert build() == VECTORS


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_encoding_gives_the_recorded_bytes(vector: dict[str, Any]) -> None:
    msg = BY_NAME[vector["name"]]
    assert encode_frame(msg.to_wire()).hex() == vector["frame_hex"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_decoding_the_recorded_bytes_gives_the_message(vector: dict[str, Any]) -> None:
    frame = bytes.fromhex(vector["frame_hex"])
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    (raw,) = FrameDecoder().feed(frame)
    assert raw == vector["message"]
    msg = BY_NAME[vector["name"]]
    parsed = parse_request(raw) if isinstance(msg, REQUEST_TYPES) else parse_reply(raw)  # status: both sides' op
    assert parsed == msg


def test_hot_path_frame_builders_match_the_vectors() -> None:
    from protocol import CheckedIn, Granted, HeartbeatAck

    by = {v["name"]: bytes.fromhex(v["frame_hex"]) for v in VECTORS}
    g = BY_NAME["granted"]
    assert Granted.frame(g.id, g.token, g.customer_id, g.product, g.version, g.lease_timeout,
                         g.heartbeat_interval, g.waited) == by["granted"]
    c = BY_NAME["checked_in"]
    assert CheckedIn.frame(c.id, c.released) == by["checked_in"]
    for name in ("heartbeat_ack", "heartbeat_ack_lost", "heartbeat_ack_moved"):
        h = BY_NAME[name]
        assert HeartbeatAck.frame(h.id, h.renewed, h.lost) == by[name]
