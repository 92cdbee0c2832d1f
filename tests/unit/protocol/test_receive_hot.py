"""The hot path's decoding (Connection.receive_hot, messages.hot_request) against the table and the parsers.

receive_hot may take a read only when receive_data would yield exactly one request of the same class with the
same field values, and it must leave the connection untouched when it declines. These tests feed both with
generated maps (well-formed, edge-typed and hostile), whole and split, and compare.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import BadRequest, Checkin, Checkout, Connection, Heartbeat, Hello, Role, State
from protocol.framing import encode_frame
from protocol.messages import hot_request, parse_request
from protocol.validation import MAX_ID, MAX_PRODUCT_LENGTH, MAX_TOKEN_LENGTH, MAX_VERSION_LENGTH, MAX_WAIT_SECONDS

_HELLO = Hello(1, (1,), "pc-1", "alice", 42, "t", "")


def ready() -> Connection[Any]:
    conn: Connection[Any] = Connection(Role.SERVER)
    assert conn.receive_data(encode_frame(_HELLO.to_wire())) == [_HELLO]
    from protocol import Welcome

    conn.send(Welcome(1, 1, "x", 30.0, 90.0, 65536, 1))
    assert conn.state is State.READY
    return conn


def fields(kind: type, d: dict[str, Any]) -> Any:
    """The message the hot handlers build from ``d``'s fields (lmgrd.daemon.session's ``_*_map``)."""
    if kind is Checkout:
        return Checkout(d["id"], d["product"], d["version"], d.get("wait", 0.0))
    if kind is Checkin:
        return Checkin(d["id"], d["token"])
    assert kind is Heartbeat
    return Heartbeat(d["id"], d.get("idle", False), 0.0)


# Values of every type msgpack decodes to, biased to the limits the predicates check.
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-1, max_value=MAX_ID + 1),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True), st.floats(min_value=-1.0, max_value=MAX_WAIT_SECONDS + 1),
    st.text(max_size=MAX_PRODUCT_LENGTH + 2), st.text(min_size=MAX_TOKEN_LENGTH - 1, max_size=MAX_TOKEN_LENGTH + 1),
    st.binary(max_size=8),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3),
                                                                                             inner, max_size=3),
                       max_leaves=6)
# Binary keys too: msgpack decodes them, and decode_body refuses them (a map the hot path must not take).
_keys: st.SearchStrategy[Any] = st.sampled_from(["op", "id", "product", "version", "wait", "token", "idle", "idle_for",
                                                 "extra", "", b"token", b"x"])
_ops = st.sampled_from(["checkout", "checkin", "heartbeat", "hello", "status", "nope"]) | _values


@st.composite
def maps(draw: st.DrawFn) -> dict[str, Any]:
    d: dict[str, Any] = {"op": draw(_ops)}
    for key in draw(st.lists(_keys, max_size=6)):
        d[key] = draw(_values)
    if draw(st.booleans()):  # often a well-formed request of a hot kind, with one field perturbed
        op = draw(st.sampled_from(["checkout", "checkin", "heartbeat"]))
        base: dict[str, Any] = {
            "checkout": {"op": op, "id": draw(st.integers(0, MAX_ID)), "product": draw(st.text(max_size=10)),
                         "version": draw(st.text(max_size=MAX_VERSION_LENGTH + 1)), "wait": 0.0},
            "checkin": {"op": op, "id": draw(st.integers(0, 10)), "token": draw(st.text(max_size=40))},
            "heartbeat": {"op": op, "id": draw(st.integers(0, 10)), "idle": draw(st.booleans())},
        }[op]
        if draw(st.booleans()):
            base[draw(_keys)] = draw(_values)
        d = base
    return d


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(maps())
def test_hot_request_only_for_what_parse_request_builds_the_same(d: dict[str, Any]) -> None:
    kind = hot_request(d)
    if kind is None:
        return
    assert parse_request(d) == fields(kind, d)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(maps(), st.integers(min_value=0, max_value=3))
def test_receive_hot_agrees_with_receive_data(d: dict[str, Any], cut: int) -> None:
    try:
        frame = encode_frame(d)
    except (TypeError, ValueError, OverflowError):
        return  # not encodable: no client can send it
    hot_conn, slow_conn = ready(), ready()
    hot = hot_conn.receive_hot(frame)
    assert hot_conn.state is State.READY  # it never moves the state, whatever it returns
    if hot is None:
        return
    kind, got = hot
    assert got == d
    [msg] = slow_conn.receive_data(frame)
    assert not isinstance(msg, BadRequest)
    assert type(msg) is kind and msg == fields(kind, got)
    # The same bytes split, or behind a partial frame, never take the hot path.
    if cut:
        split_conn = ready()
        assert split_conn.receive_hot(frame[:cut]) is None
        split_conn.receive_data(frame[:cut])
        assert split_conn.receive_hot(frame[cut:]) is None


def test_receive_hot_declines_before_welcome_and_after_an_error() -> None:
    conn: Connection[Any] = Connection(Role.SERVER)
    beat = encode_frame(Heartbeat(2).to_wire())
    assert conn.receive_hot(beat) is None  # before hello: receive_data refuses it
    conn.receive_data(encode_frame(_HELLO.to_wire()))
    assert conn.receive_hot(beat) is None  # before the welcome: the table, not the hot path
    conn = ready()
    assert conn.receive_hot(beat) == (Heartbeat, {"op": "heartbeat", "id": 2, "idle": False})
    with pytest.raises(Exception):  # noqa: B017 - any protocol error puts it in ERROR
        conn.receive_data(b"\x00\x00\x00\x01\xc1")
    assert conn.state is State.ERROR
    assert conn.receive_hot(beat) is None


@pytest.mark.parametrize("frame", [
    b"\x00\x00\x00\x00",  # empty frame
    b"\x00\x00\x00\x02\x81",  # announced longer than sent
    b"\x00\x00\x00\x01\xc1",  # not msgpack
    b"\x00\x00\x00\x01\x90",  # an array, not a map
    encode_frame({"op": "checkout", "id": 1, "product": "P", "version": "1", "wait": 0.0})[:-1],  # partial
    encode_frame({"op": "checkin", "id": 1, "token": "t"}) + b"\x00",  # trailing byte after a whole frame
    encode_frame({"op": "checkin", "id": 1, b"token": "t"}),  # a binary key
    encode_frame({"op": "checkout", "id": 1, "product": "P", "version": "1", "wait": 0}),  # int wait: checked path
    encode_frame({"op": "heartbeat", "id": 1, "idle": False, "idle_for": 3.0}),
])
def test_receive_hot_declines_what_needs_the_checked_path(frame: bytes) -> None:
    conn = ready()
    assert conn.receive_hot(frame) is None
    assert conn.state is State.READY


def test_msgpack_defaults_match_decode_body() -> None:
    """receive_hot unpacks with msgpack's defaults; decode_body names its options: they must be the same."""
    body = msgpack.packb({"op": "x", "k": [1, 2]})
    assert msgpack.unpackb(body) == msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    with pytest.raises(ValueError):
        msgpack.unpackb(msgpack.packb({1: 2}))  # strict_map_key by default


@pytest.mark.parametrize("body", [
    msgpack.packb([1, 2]), msgpack.packb(7), msgpack.packb("checkout"), msgpack.packb(None),  # not maps at all
    msgpack.packb({"op": "heartbeat", "id": 1, b"x": 1}),  # no idle, a binary key: decode_body refuses it
    msgpack.packb({"op": "heartbeat", "id": 1, "idle": True, b"x": 1}),
])
def test_receive_hot_declines_a_frame_that_is_not_a_hot_map(body: bytes) -> None:
    conn = ready()
    frame = len(body).to_bytes(4, "big") + body
    assert conn.receive_hot(frame) is None
    assert conn.state is State.READY


def test_receive_hot_declines_a_whole_frame_behind_buffered_bytes() -> None:
    """A whole frame arriving while part of an earlier one is buffered belongs after that one: the hot path must
    not serve it first (the decoder then sees both in order)."""
    conn = ready()
    first = encode_frame(Heartbeat(5).to_wire())
    conn.receive_data(first[:3])
    second = encode_frame(Checkin(6, "t" * 32).to_wire())
    assert conn.receive_hot(second) is None
    assert conn.receive_data(first[3:] + second) == [Heartbeat(5), Checkin(6, "t" * 32)]


def test_receive_hot_declines_a_frame_over_the_limit() -> None:
    conn: Connection[Any] = Connection(Role.SERVER, max_frame_bytes=80)  # the hello is 74 bytes
    conn.receive_data(encode_frame(_HELLO.to_wire()))
    from protocol import Welcome

    conn.send(Welcome(1, 1, "x", 30.0, 90.0, 80, 1))
    frame = encode_frame(Checkout(1, "P" * 60, "1.0").to_wire())
    assert len(frame) - 4 > 80
    assert conn.receive_hot(frame) is None
    with pytest.raises(Exception):  # noqa: B017 - FrameTooLarge, a ProtocolError
        conn.receive_data(frame)
