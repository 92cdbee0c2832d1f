"""Framing: length prefix + one msgpack map with string keys, bounded before parsing, any byte split."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import FrameDecoder, FrameTooLarge, MalformedMessage, encode_frame
from protocol.framing import HEADER, decode_body
from protocol.validation import nesting_depth_exceeds

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
maps = st.dictionaries(st.text(max_size=20), st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                                                         | st.dictionaries(st.text(max_size=8), c, max_size=4)),
                       max_size=8).filter(lambda m: not nesting_depth_exceeds(m))  # deeper is refused by design


@given(st.lists(maps, min_size=1, max_size=6), st.data())
def test_messages_survive_any_split_of_the_byte_stream(messages: list[dict[str, object]], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder(max_frame_bytes=1 << 20)
    out: list[dict[str, object]] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out += dec.feed(stream[prev:cut])
        prev = cut
    assert out == messages and not dec._buf  # nothing left over


def test_one_byte_at_a_time() -> None:
    msgs = [{"op": "status", "id": i} for i in range(5)]
    dec = FrameDecoder()
    out: list[dict[str, object]] = []
    for b in b"".join(encode_frame(m) for m in msgs):
        out += dec.feed(bytes([b]))
    assert out == msgs


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    dec = FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(HEADER.pack(1025))  # no body sent: refused before buffering anything
    assert "1025" in info.value.message and "1024" in info.value.message
    with pytest.raises(MalformedMessage):  # the stream stays failed
        dec.feed(encode_frame({"op": "status", "id": 1}))


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    body = msgpack.packb({"x": "a" * 100})
    dec = FrameDecoder(max_frame_bytes=len(body))
    assert dec.feed(HEADER.pack(len(body)) + body) == [{"x": "a" * 100}]


@pytest.mark.parametrize("body, words", [
    (b"", "empty frame"),
    (msgpack.packb([1, 2]), "must be a msgpack map"),
    (msgpack.packb("op"), "must be a msgpack map"),
    (msgpack.packb({"op": "status"}) + b"\x00", "trailing bytes"),
    (msgpack.packb({1: "status"}), "not valid msgpack"),
    (msgpack.packb({b"op": b"status"}, use_bin_type=True), "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),
    (b"\x81\xa2op", "not valid msgpack"),  # a map cut short
], ids=["empty", "list", "string", "trailing", "int-key", "binary-key", "reserved-byte", "truncated"])
def test_bodies_that_are_not_one_string_keyed_map_are_refused(body: bytes, words: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        FrameDecoder().feed(HEADER.pack(len(body)) + body)
    assert words in info.value.message


def test_decode_body_returns_the_map() -> None:
    assert decode_body(msgpack.packb({"op": "status", "id": 3})) == {"op": "status", "id": 3}


def test_max_frame_bytes_has_a_floor() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=8)
