"""The connection state machine (the h11 model): hello first and once, version negotiation, ERROR is final."""

from __future__ import annotations

import msgpack
import pytest

from protocol import (
    BadRequest,
    Checkout,
    ClientConnection,
    ErrorCode,
    Granted,
    Hello,
    ProtocolError,
    ServerConnection,
    State,
    Status,
    Welcome,
    encode_frame,
    error_frame,
    negotiate,
)
from protocol.connection import TRANSITIONS

HELLO = Hello(1, (1,), "pc1", "alice", 7, "test", "")


def ready() -> ServerConnection:
    conn = ServerConnection()
    assert conn.receive_data(ClientConnection.send(HELLO)) == [HELLO]
    assert conn.state is State.READY and conn.proto == 1
    return conn


def test_hello_then_requests() -> None:
    conn = ready()
    reqs = conn.receive_data(ClientConnection.send(Checkout(2, "P", "1", 0)) + ClientConnection.send(Status(3)))
    assert reqs == [Checkout(2, "P", "1", 0.0), Status(3)]


def test_a_request_before_hello_is_an_error_and_final() -> None:
    conn = ServerConnection()
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(ClientConnection.send(Status(1)))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE and "before 'hello'" in info.value.message
    assert conn.state is State.ERROR
    with pytest.raises(ProtocolError):
        conn.receive_data(ClientConnection.send(HELLO))


def test_hello_twice_is_an_error() -> None:
    conn = ready()
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(ClientConnection.send(HELLO))
    assert "sent twice" in info.value.message and conn.state is State.ERROR


def test_no_common_version_names_both_ranges() -> None:
    with pytest.raises(ProtocolError) as info:
        ServerConnection().receive_data(ClientConnection.send(Hello(1, (7, 8), "pc1", "a", 1, "", "")))
    assert info.value.code is ErrorCode.UNSUPPORTED_PROTOCOL
    assert "[7, 8]" in info.value.message and "[1]" in info.value.message
    assert negotiate((1, 2, 3), (1, 2)) == 2


def test_bad_schema_after_hello_is_answered_and_the_connection_stays() -> None:
    conn = ready()
    out = conn.receive_data(encode_frame({"op": "checkout", "id": 9, "product": 1, "version": "1"})
                            + ClientConnection.send(Status(10)))
    assert isinstance(out[0], BadRequest) and out[0].id == 9 and "'product'" in out[0].error.message
    assert out[1] == Status(10) and conn.state is State.READY


def test_bad_schema_before_hello_is_fatal() -> None:
    conn = ServerConnection()
    with pytest.raises(ProtocolError):
        conn.receive_data(encode_frame({"op": "hello", "id": 1}))
    assert conn.state is State.ERROR


def test_a_malformed_frame_is_fatal_even_when_ready() -> None:
    conn = ready()
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(b"\x00\x00\x00\x02" + msgpack.packb([1]))
    assert info.value.code is ErrorCode.BAD_REQUEST and conn.state is State.ERROR


def test_every_transition_is_listed() -> None:
    assert (State.AWAIT_HELLO, "hello") in TRANSITIONS
    assert all(src is not State.ERROR and dst is not State.ERROR for (src, _op), dst in TRANSITIONS.items())


def test_client_side_decodes_replies_and_tracks_the_handshake() -> None:
    client = ClientConnection()
    welcome = Welcome(1, 1, "0.1.0", 30.0, 90.0, 65536, 3)
    granted = Granted(2, "t" * 32, "CID", "P", "1", 90.0, 30.0, 0.0)
    assert client.receive_data(ServerConnection.send(welcome) + ServerConnection.send(granted)) == [welcome, granted]
    assert client.state is State.READY


def test_error_frame_carries_code_message_and_hint() -> None:
    frame = error_frame(4, ProtocolError(ErrorCode.NO_SEATS, "all in use", "wait"))
    (reply,) = ClientConnection().receive_data(frame)
    assert (reply.id, reply.code, reply.message, reply.hint) == (4, ErrorCode.NO_SEATS, "all in use", "wait")
