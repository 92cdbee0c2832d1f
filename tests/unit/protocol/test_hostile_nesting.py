"""Deeply nested and huge values from a peer: refused with a short message, never a RecursionError (issue 9).

msgpack decodes up to 1,024 nested arrays; Python's ``repr`` of such a value (in the message that names a bad
field) overflowed the stack. The decoder now refuses nesting past ``MAX_NESTING_DEPTH`` and every message that
quotes a value goes through ``protocol.validation.shown``.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from protocol import (
    Connection,
    ErrorCode,
    FrameDecoder,
    MalformedMessage,
    ProtocolError,
    Role,
    parse_reply,
    parse_request,
)
from protocol.framing import HEADER, decode_body
from protocol.validation import MAX_NESTING_DEPTH, nesting_depth_exceeds, shown


def nested(depth: int) -> Any:
    """``depth`` lists inside one another (built without recursion)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def deep_body(levels: int) -> bytes:
    """{"op": "status", "id": <levels nested arrays>}, packed by hand (msgpack's packer stops at 512 levels)."""
    return b"\x82\xa2op\xa6status\xa2id" + b"\x91" * (levels - 1) + b"\x90"


@pytest.mark.parametrize("levels", [MAX_NESTING_DEPTH, 1000, 1023])
def test_frame_nesting_past_the_limit_is_malformed_whole_or_byte_by_byte(levels: int) -> None:
    body = deep_body(levels)  # the map is level 1, so `levels` arrays make levels + 1
    frame = HEADER.pack(len(body)) + body
    with pytest.raises(MalformedMessage, match=f"more than {MAX_NESTING_DEPTH} levels deep"):
        FrameDecoder().feed(frame)
    dec = FrameDecoder()
    with pytest.raises(MalformedMessage, match="levels deep") as caught:
        for i in range(len(frame)):
            dec.feed(frame[i:i + 1])
    assert len(str(caught.value)) < 200


def test_nesting_up_to_the_limit_decodes() -> None:
    body = deep_body(MAX_NESTING_DEPTH - 1)  # the map plus 31 arrays: 32 levels
    msg = decode_body(body)
    assert msg["op"] == "status"
    assert not nesting_depth_exceeds(msg) and nesting_depth_exceeds(msg, MAX_NESTING_DEPTH - 1)


def test_server_connection_answers_deep_nesting_with_bad_request() -> None:
    conn = Connection(Role.SERVER)
    body = deep_body(1000)
    with pytest.raises(ProtocolError) as caught:
        conn.receive_data(HEADER.pack(len(body)) + body)
    assert caught.value.code is ErrorCode.BAD_REQUEST


# Maps built in Python (not through the decoder) reach the field readers directly: their messages must still
# be short and never recurse, whatever the value.
HOSTILE: list[Any] = [nested(5000), list(range(100_000)), "x" * 1_000_000, 10**5000, {str(i): i for i in range(10_000)}]


@pytest.mark.parametrize("value", HOSTILE, ids=["deep", "long-list", "long-string", "huge-int", "big-map"])
@pytest.mark.parametrize("template", [
    {"op": "status", "id": "V"},
    {"op": "hello", "id": 1, "proto": "V", "host": "h", "user": "u", "pid": 1},
    {"op": "resume", "id": 1, "tokens": ["V"]},
    {"op": "checkout", "id": 1, "product": "P", "version": "1", "wait": "V"},
    {"op": "V"},
], ids=["uint", "proto", "texts-item", "seconds", "op"])
def test_request_field_errors_quote_a_bounded_value(template: dict[str, Any], value: Any) -> None:
    d = {k: (value if v == "V" else [value] if v == ["V"] else v) for k, v in template.items()}
    with pytest.raises(MalformedMessage) as caught:
        parse_request(d)
    assert len(str(caught.value)) < 400, str(caught.value)[:500]


@pytest.mark.parametrize("value", HOSTILE, ids=["deep", "long-list", "long-string", "huge-int", "big-map"])
def test_reply_field_errors_quote_a_bounded_value(value: Any) -> None:
    with pytest.raises(MalformedMessage) as caught:
        parse_reply({"op": "heartbeat_ack", "id": 1, "renewed": 0, "lost": [value]})
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize("value", [*HOSTILE, b"\x00" * 100_000, object()], ids=[
    "deep", "long-list", "long-string", "huge-int", "big-map", "bytes", "object"])
def test_shown_is_bounded(value: Any) -> None:
    for limit in (8, 40, 60, 200):
        text = shown(value, limit)
        assert 0 < len(text) <= limit, text


def test_shown_keeps_short_values_whole() -> None:
    assert shown("alice") == "'alice'"
    assert shown([1, [2, [3]]]) == "[1, [2, [3]]]"
    assert shown(nested(10)).startswith("[[[[")
    assert msgpack.unpackb(msgpack.packb({"a": 1})) == {"a": 1}


@pytest.mark.parametrize("wrap", ["list", "map"])
def test_depth_is_found_behind_flat_fields_and_inside_a_map_value(wrap: str) -> None:
    # decode_body walks only maps holding a list or map; the deep one here is the last of several fields.
    inner: Any = nested(MAX_NESTING_DEPTH)
    value = inner if wrap == "list" else {"k": inner}
    body = msgpack.packb({"op": "status", "id": 1, "a": "x", "b": 2.0, "z": value})
    with pytest.raises(MalformedMessage, match="levels deep"):
        decode_body(body)
    assert decode_body(msgpack.packb({"op": "status", "id": 1, "a": "x", "z": nested(MAX_NESTING_DEPTH - 2)}))


@pytest.mark.parametrize("at", [0, 2])
def test_a_binary_map_key_is_malformed_and_named_wherever_it_stands(at: int) -> None:
    # msgpack's strict_map_key lets bytes keys through; the protocol's keys are strings.
    items: list[tuple[str | bytes, object]] = [("op", "status"), ("id", 1), ("user", "alice")]
    items.insert(at, (b"\x00evil", 1))
    body = msgpack.packb(dict(items), use_bin_type=True)
    with pytest.raises(MalformedMessage, match=r"map key b'\\x00evil' is bytes, keys must be strings"):
        decode_body(body)


def test_lists_of_scalars_and_ext_values_are_not_walked_but_a_map_inside_a_list_is() -> None:
    flat = {"op": "hello", "id": 1, "proto": [1, 2], "tokens": ["a", b"b", None, 1.5, True],
            "ext": msgpack.ExtType(5, b"x")}
    assert decode_body(msgpack.packb(flat, use_bin_type=True)) == flat
    deep: Any = {"k": nested(MAX_NESTING_DEPTH)}
    with pytest.raises(MalformedMessage, match="levels deep"):
        decode_body(msgpack.packb({"op": "status", "id": 1, "proto": [1, deep]}))
