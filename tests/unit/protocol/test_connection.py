"""The connection state machine (the h11 model): one table for both ends and both directions.

Hello first and once, welcome before any other reply, version negotiation, ERROR is final; outgoing
messages pass the same table as incoming ones; bytes split anywhere give the same events, and any bytes
give events or ProtocolError, nothing else.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    Admin,
    BadRequest,
    CheckedIn,
    Checkin,
    Checkout,
    Connection,
    ErrorCode,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    LocalProtocolError,
    ProtocolError,
    Resume,
    Resumed,
    Role,
    State,
    Status,
    StatusReply,
    Welcome,
    encode_frame,
    error_frame,
    negotiate,
)
from protocol.connection import CLIENT_MAX_FRAME_BYTES, TRANSITIONS
from protocol.framing import DEFAULT_MAX_FRAME_BYTES

HELLO = Hello(1, (1,), "pc1", "alice", 7, "test", "")
WELCOME = Welcome(1, 1, "0.1.0", 30.0, 90.0, 65536, 3)
TOKEN = "t" * 32
GRANTED = Granted(2, TOKEN, "CID", "P", "1", 90.0, 30.0, 0.0)
#: One message of every class the table knows.
SAMPLES: dict[type, Any] = {
    Hello: HELLO,
    Checkout: Checkout(2, "P", "1", 0.0),
    Heartbeat: Heartbeat(3),
    Checkin: Checkin(4, TOKEN),
    Resume: Resume(5, (TOKEN,)),
    Status: Status(6),
    Admin: Admin(7, "reread", {}, ""),
    Welcome: WELCOME,
    Granted: GRANTED,
    HeartbeatAck: HeartbeatAck(3, 1, ()),
    CheckedIn: CheckedIn(4, True),
    Resumed: Resumed(5, (TOKEN,), ()),
    StatusReply: StatusReply(6, {"pools": []}),
    ErrorReply: ErrorReply(7, ErrorCode.NO_SEATS, "all in use", "wait"),
}
REQUESTS = [c for c in SAMPLES if c not in (Welcome, Granted, HeartbeatAck, CheckedIn, Resumed, StatusReply,
                                            ErrorReply)]
REPLIES = [c for c in SAMPLES if c not in REQUESTS]


def frame(msg: Any) -> bytes:
    return encode_frame(msg.to_wire())


def server_after_hello() -> Connection[Any]:
    conn = Connection(Role.SERVER)
    assert conn.receive_data(frame(HELLO)) == [HELLO]
    assert conn.state is State.AWAIT_WELCOME and conn.proto == 1 and conn.hello is None  # not kept by a server
    return conn


def ready_pair() -> tuple[Connection[Any], Connection[Any]]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    assert server.receive_data(client.send(HELLO)) == [HELLO]
    assert client.receive_data(server.send(WELCOME)) == [WELCOME]
    assert client.state is State.READY and server.state is State.READY
    return client, server


# --------------------------------------------------------------------------- the handshake, received
def test_hello_then_requests() -> None:
    conn = server_after_hello()
    reqs = conn.receive_data(frame(Checkout(2, "P", "1", 0)) + frame(Status(3)))
    assert reqs == [Checkout(2, "P", "1", 0.0), Status(3)]


def test_a_request_before_hello_is_an_error_and_final() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(frame(Status(1)))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE and "'status' sent before 'hello'" in info.value.message
    assert "hello first" in info.value.hint
    assert conn.state is State.ERROR
    with pytest.raises(ProtocolError):
        conn.receive_data(frame(HELLO))


@pytest.mark.parametrize("welcomed", [False, True])
def test_hello_twice_is_an_error(welcomed: bool) -> None:
    conn = server_after_hello()
    if welcomed:
        conn.send(WELCOME)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(frame(HELLO))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert "'hello' sent twice" in info.value.message and conn.state is State.ERROR


def test_no_common_version_names_both_ranges() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(frame(Hello(1, (7, 8), "pc1", "a", 1, "", "")))
    assert info.value.code is ErrorCode.UNSUPPORTED_PROTOCOL
    assert "[7, 8]" in info.value.message and "[1, 2]" in info.value.message
    assert conn.state is State.ERROR and conn.proto == 0
    assert negotiate((1, 2, 3), (1, 2)) == 2


def test_bad_schema_after_hello_is_answered_and_the_connection_stays() -> None:
    for conn in (server_after_hello(), ready_pair()[1]):
        before = conn.state
        out = conn.receive_data(encode_frame({"op": "checkout", "id": 9, "product": 1, "version": "1"})
                                + encode_frame({"op": "frobnicate", "id": True}) + frame(Status(10)))
        assert isinstance(out[0], BadRequest) and out[0].id == 9 and "'product'" in out[0].error.message
        assert isinstance(out[1], BadRequest) and out[1].id == 0  # a bool is no id
        assert out[2] == Status(10) and conn.state is before


def test_bad_schema_before_hello_is_fatal() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(encode_frame({"op": "hello", "id": 1}))
    assert info.value.code is ErrorCode.BAD_REQUEST and conn.state is State.ERROR


def test_a_malformed_frame_is_fatal_even_when_ready() -> None:
    _, conn = ready_pair()
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(b"\x00\x00\x00\x02" + msgpack.packb([1]))
    assert info.value.code is ErrorCode.BAD_REQUEST and conn.state is State.ERROR


def test_requests_pipelined_behind_hello_are_accepted_before_the_welcome() -> None:
    conn = Connection(Role.SERVER)
    out = conn.receive_data(frame(HELLO) + frame(Checkout(2, "P", "1")) + frame(Heartbeat(3)))
    assert out == [HELLO, Checkout(2, "P", "1"), Heartbeat(3)] and conn.state is State.AWAIT_WELCOME
    assert conn.send(WELCOME) == frame(WELCOME) and conn.state is State.READY


# --------------------------------------------------------------------------- the client's side
def test_the_client_is_ready_only_once_the_welcome_passes_the_table() -> None:
    client = Connection(Role.CLIENT)
    assert client.state is State.AWAIT_HELLO and client.proto == 0
    assert client.send(HELLO) == frame(HELLO)
    assert client.state is State.AWAIT_WELCOME and client.hello == HELLO
    assert client.receive_data(frame(WELCOME)[:5]) == [] and client.state is State.AWAIT_WELCOME
    assert client.receive_data(frame(WELCOME)[5:] + frame(GRANTED)) == [WELCOME, GRANTED]
    assert client.state is State.READY and client.proto == WELCOME.proto


def test_a_reply_before_the_welcome_is_refused_by_the_client() -> None:
    client = Connection(Role.CLIENT)
    client.send(HELLO)
    with pytest.raises(ProtocolError) as info:
        client.receive_data(frame(GRANTED))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE and "'granted' sent before 'welcome'" in info.value.message
    assert client.state is State.ERROR


def test_a_refused_hello_leaves_both_ends_with_only_closing_to_do() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(HELLO))
    refusal = ErrorReply(1, ErrorCode.INVALID_HOSTNAME, "bad name", "rename")
    assert client.receive_data(server.send(refusal)) == [refusal]
    assert client.state is State.MUST_CLOSE and server.state is State.MUST_CLOSE
    with pytest.raises(LocalProtocolError):
        client.send(Status(2))
    with pytest.raises(ProtocolError) as info:  # a request pipelined behind the refused hello
        server.receive_data(frame(Status(2)))
    assert "must_close" in info.value.message and server.state is State.ERROR


def test_an_error_before_the_hello_arrives_is_legal_from_the_server() -> None:
    # TOO_MANY_CONNECTIONS is sent on accept, possibly before the client's hello is read.
    server, client = Connection(Role.SERVER), Connection(Role.CLIENT)
    busy = ErrorReply(0, ErrorCode.TOO_MANY_CONNECTIONS, "too many", "close some")
    wire = server.send(busy)
    client.send(HELLO)
    assert client.receive_data(wire) == [busy] and client.state is State.MUST_CLOSE


def test_the_server_may_explain_a_broken_rule_and_nothing_else() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(frame(Status(1)))
    answer = conn.send_frame(ErrorReply, error_frame(0, info.value))
    assert answer == error_frame(0, info.value) and conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(WELCOME)


# --------------------------------------------------------------------------- sending passes the table
@pytest.mark.parametrize(("role", "before", "message", "fragment"), [
    (Role.CLIENT, [], Checkout(2, "P", "1"), "'checkout' sent before 'hello'"),
    (Role.CLIENT, [HELLO], HELLO, "'hello' sent twice"),
    (Role.CLIENT, [HELLO], GRANTED, "a client does not send 'granted'"),
    (Role.CLIENT, [HELLO], StatusReply(6, {}), "a client does not send 'status'"),
    (Role.SERVER, [], WELCOME, "'welcome' sent before 'hello'"),
    (Role.SERVER, [HELLO], GRANTED, "'granted' sent before 'welcome'"),
    (Role.SERVER, [HELLO, WELCOME], WELCOME, "'welcome' sent twice"),
    (Role.SERVER, [HELLO, WELCOME], Status(3), "a server does not send 'status'"),
])
def test_an_illegal_send_raises_and_leaves_error(role: Role, before: list[Any], message: Any, fragment: str) -> None:
    conn: Connection[Any] = Connection(role)
    for m in before:  # what this end has sent or received so far
        if (type(m) in REQUESTS) == (role is Role.CLIENT):
            conn.send(m)
        else:
            conn.receive_data(frame(m))
    with pytest.raises(LocalProtocolError) as info:
        conn.send(message)
    assert fragment in info.value.message and info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):  # and ERROR is final
        conn.send(SAMPLES[Status] if role is Role.CLIENT else SAMPLES[Granted])


def test_send_frame_passes_prebuilt_frames_through_the_table() -> None:
    server = server_after_hello()
    prebuilt = Granted.frame(GRANTED.id, GRANTED.token, GRANTED.customer_id, GRANTED.product, GRANTED.version,
                             GRANTED.lease_timeout, GRANTED.heartbeat_interval, GRANTED.waited)
    with pytest.raises(LocalProtocolError):
        server.send_frame(Granted, prebuilt)  # before the welcome
    assert server.state is State.ERROR
    _, server = ready_pair()
    assert server.send_frame(Granted, prebuilt) is prebuilt and server.state is State.READY
    assert server.send_frame(CheckedIn, CheckedIn.frame(4, True)) == frame(CheckedIn(4, True))
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send_frame(Hello, frame(HELLO))  # hello goes through send(), which records it
    assert client.state is State.ERROR and client.hello is None


def test_every_move_not_in_the_table_raises_and_leaves_error() -> None:
    """Exhaustive: every state x sender x message class, sent and received."""
    legal = 0
    for state, sender, kind in itertools.product(State, Role, SAMPLES):
        for direction in ("send", "receive"):
            if direction == "receive" and (kind in REQUESTS) != (sender is Role.CLIENT):
                continue  # the receiver's parser would not even read it as that class
            conn: Connection[Any] = Connection(sender if direction == "send" else
                                               (Role.SERVER if sender is Role.CLIENT else Role.CLIENT))
            conn.state = state  # white-box: put the machine where the table starts
            expected = TRANSITIONS.get((state, sender, kind))
            if direction == "send" and kind is not Hello:
                call: Any = lambda c=conn, k=kind: c.send_frame(k, frame(SAMPLES[k]))  # noqa: E731
            elif direction == "send":
                call = lambda c=conn, k=kind: c.send(SAMPLES[k])  # noqa: E731
            else:
                call = lambda c=conn, k=kind: c.receive_data(frame(SAMPLES[k]))  # noqa: E731
            if expected is None or (direction == "receive" and state in (State.ERROR, State.CLOSED)):
                with pytest.raises(ProtocolError):
                    call()
                # Bytes arriving after close() leave it closed (there is nothing left to fail).
                after = State.CLOSED if direction == "receive" and state is State.CLOSED else State.ERROR
                assert conn.state is after, (state, sender, kind, direction)
            else:
                legal += 1
                call()
                assert conn.state is expected, (state, sender, kind, direction)
    sampled = [key for key in TRANSITIONS if key[2] in SAMPLES]
    assert legal == 2 * len(sampled) - 1  # every entry once sent, once received; ERROR's one is send-only
    assert all(src is not State.CLOSED and dst is not State.CLOSED for (src, _, _), dst in TRANSITIONS.items())


def test_frame_limits_and_attributes_by_role() -> None:
    server = Connection(Role.SERVER, 1024)
    assert server.role is Role.SERVER
    with pytest.raises(ProtocolError) as info:
        server.receive_data(b"\x00\x00\x08\x00")
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert Connection(Role.SERVER)._decoder.max_frame_bytes == DEFAULT_MAX_FRAME_BYTES
    client = Connection(Role.CLIENT)
    assert client.role is Role.CLIENT and client._decoder.max_frame_bytes == CLIENT_MAX_FRAME_BYTES
    server = Connection(Role.SERVER)
    assert server.receive_data(client.send(HELLO)) == [HELLO]
    assert (server.hello, server.proto) == (None, 1)
    server.close()
    assert server.state is State.CLOSED
    with pytest.raises(ProtocolError):
        server.receive_data(b"")
    with pytest.raises(TypeError):
        Connection("server")  # type: ignore[call-overload]


def test_error_frame_carries_code_message_and_hint() -> None:
    client = Connection(Role.CLIENT)
    client.send(HELLO)
    (reply,) = client.receive_data(error_frame(4, ProtocolError(ErrorCode.NO_SEATS, "all in use", "wait")))
    assert isinstance(reply, ErrorReply)
    assert (reply.id, reply.code, reply.message, reply.hint) == (4, ErrorCode.NO_SEATS, "all in use", "wait")
    assert error_frame(4, ProtocolError(ErrorCode.NO_SEATS, "all in use", "wait")) == frame(reply)


# --------------------------------------------------------------------------- bytes split anywhere
CONVERSATION_C2S = [HELLO, Checkout(2, "P", "1"), Heartbeat(3, True, 5.0), Checkin(4, TOKEN), Resume(5, (TOKEN,)),
                    Status(6), Admin(7, "reread", {"a": 1}, "tok")]
CONVERSATION_S2C = [WELCOME, GRANTED, SAMPLES[HeartbeatAck], SAMPLES[CheckedIn], SAMPLES[Resumed],
                    SAMPLES[StatusReply], SAMPLES[ErrorReply]]


def _feed_in_pieces(conn: Connection[Any], wire: bytes, cuts: list[int]) -> list[Any]:
    out: list[Any] = []
    start = 0
    for cut in [*sorted({c % (len(wire) + 1) for c in cuts}), len(wire)]:
        out += conn.receive_data(wire[start:cut])
        start = cut
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=40))
def test_a_conversation_split_anywhere_gives_the_same_events(cuts: list[int]) -> None:
    client = Connection(Role.CLIENT)
    c2s = b"".join(client.send(m) for m in CONVERSATION_C2S)
    server = Connection(Role.SERVER)
    assert _feed_in_pieces(server, c2s, cuts) == CONVERSATION_C2S
    s2c = b"".join(server.send(m) for m in CONVERSATION_S2C)
    assert _feed_in_pieces(client, s2c, cuts) == CONVERSATION_S2C
    assert client.state is State.READY and server.state is State.READY


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Role)), st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=20),
       st.booleans(), st.booleans())
def test_any_bytes_split_anywhere_give_events_or_protocol_error_only(
    role: Role, junk: bytes, cuts: list[int], framed: bool, greeted: bool
) -> None:
    conn: Connection[Any] = Connection(role)
    if role is Role.CLIENT:
        conn.send(HELLO)
    data = encode_frame({"op": "x", "blob": junk}) + junk if framed else junk
    prefix = b"" if not greeted else frame(HELLO) if role is Role.SERVER else frame(WELCOME)
    try:
        events = _feed_in_pieces(conn, prefix + data, cuts)
    except ProtocolError:
        assert conn.state is State.ERROR
        return
    kinds = (Hello, *REQUESTS, BadRequest) if role is Role.SERVER else tuple(REPLIES)
    assert all(isinstance(e, kinds) for e in events)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(SAMPLES)), max_size=12), st.sampled_from(list(Role)))
def test_random_message_orders_either_pass_the_table_or_raise_protocol_error(kinds: list[type], role: Role) -> None:
    """Whatever order a peer sends in, the receiver returns events or raises ProtocolError, never worse,
    and the state it ends in is the one the table predicts."""
    conn: Connection[Any] = Connection(role)
    peer = Role.CLIENT if role is Role.SERVER else Role.SERVER
    state = State.AWAIT_HELLO
    sendable = [k for k in kinds if (k in REQUESTS) == (peer is Role.CLIENT)]
    for kind in sendable:
        expected = TRANSITIONS.get((state, peer, kind))
        try:
            conn.receive_data(frame(SAMPLES[kind]))
        except ProtocolError:
            assert expected is None and conn.state is State.ERROR
            return
        assert expected is not None and conn.state is expected
        state = expected
