"""The connection state machine, for both ends, as a pure object (the h11 model).

``ServerConnection`` takes bytes and returns request messages; it enforces that ``hello`` comes first and
only once, and negotiates the protocol version. ``ClientConnection`` takes bytes and returns replies. Neither
sees a socket, a loop or a clock. Every illegal move raises :class:`ProtocolError` and leaves the
connection in ``ERROR``, which is terminal: the caller sends the error reply and closes.

Rule 1: every legal state transition is in ``TRANSITIONS``; anything else is an error.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from protocol.errors import ErrorCode, MalformedMessage, ProtocolError
from protocol.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame
from protocol.messages import Hello, Reply, Request, parse_reply, parse_request
from protocol.validation import MAX_ID

#: Protocol versions this code speaks, oldest first.
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
PROTOCOL_VERSION = SUPPORTED_VERSIONS[-1]


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    ERROR = "error"
    CLOSED = "closed"


#: (state, op) -> next state. An op not listed for a state is a protocol error.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.AWAIT_HELLO, "hello"): State.READY,
    **{
        (State.READY, op): State.READY
        for op in ("checkout", "heartbeat", "checkin", "resume", "status", "admin")
    },
}


def negotiate(offered: tuple[int, ...], supported: tuple[int, ...] = SUPPORTED_VERSIONS) -> int:
    """Pick the highest protocol version both sides speak.

    Raises:
        ProtocolError: UNSUPPORTED_PROTOCOL naming both ranges.
    """
    common = set(offered) & set(supported)
    if not common:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_PROTOCOL,
            f"client speaks protocol versions {sorted(offered)}, this server speaks {list(supported)}",
            "upgrade the product's license client or the license server so they share a version",
        )
    return max(common)


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A well-framed message that fails the schema on a READY connection: answer it, keep the connection.

    ``id`` is the request's id when it carried a valid one, else 0.
    """

    id: int
    error: ProtocolError


class ServerConnection:
    """Server side of one client connection."""

    __slots__ = ("_decoder", "hello", "proto", "state")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._decoder = FrameDecoder(max_frame_bytes)
        self.state = State.AWAIT_HELLO
        self.hello: Hello | None = None
        self.proto = 0

    @property
    def buffered(self) -> int:
        return self._decoder.buffered

    def receive_data(self, data: bytes) -> list[Request | BadRequest]:
        """Feed received bytes; return the complete requests, in order.

        A message that is well framed but fails the schema (unknown op, wrong type) after the handshake comes
        back as :class:`BadRequest` so the server can answer it and go on serving this client.

        Raises:
            ProtocolError: malformed or oversized frame, anything bad before a valid hello, a message out of
                order, or no common protocol version. The connection is then in ERROR.
        """
        if self.state is State.ERROR or self.state is State.CLOSED:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"connection is {self.state.value}")
        try:
            out: list[Request | BadRequest] = []
            for raw in self._decoder.feed(data):
                try:
                    msg = parse_request(raw)
                except MalformedMessage as exc:
                    if self.state is not State.READY:
                        raise
                    rid = raw.get("id")
                    ok_id = isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID
                    out.append(BadRequest(rid if ok_id and isinstance(rid, int) else 0, exc))
                    continue
                nxt = TRANSITIONS.get((self.state, msg.OP))
                if nxt is None:
                    if self.state is State.AWAIT_HELLO:
                        raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                            f"'{msg.OP}' sent before 'hello'",
                                            "a client must send hello first; see PROTOCOL.md")
                    raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"'{msg.OP}' sent twice on one connection")
                if isinstance(msg, Hello):
                    self.proto = negotiate(msg.proto)
                    self.hello = msg
                self.state = nxt
                out.append(msg)
            return out
        except ProtocolError:
            self.state = State.ERROR
            raise

    @staticmethod
    def send(reply: Reply) -> bytes:
        """Encode one reply as a frame."""
        return encode_frame(reply.to_wire())

    def close(self) -> None:
        self.state = State.CLOSED


class ClientConnection:
    """Client side: encode requests, decode replies."""

    __slots__ = ("_decoder", "state")

    def __init__(self, max_frame_bytes: int = 16 * 1024 * 1024) -> None:
        # The client trusts its configured server more than the server trusts clients, but still bounds.
        self._decoder = FrameDecoder(max_frame_bytes)
        self.state = State.AWAIT_HELLO

    @staticmethod
    def send(request: Request) -> bytes:
        return encode_frame(request.to_wire())

    def receive_data(self, data: bytes) -> list[Reply]:
        """Feed bytes from the server; return the complete replies.

        Raises:
            MalformedMessage: the server sent something that is not a valid reply.
        """
        try:
            replies = [parse_reply(raw) for raw in self._decoder.feed(data)]
        except MalformedMessage:
            self.state = State.ERROR
            raise
        if self.state is State.AWAIT_HELLO and any(r.OP == "welcome" for r in replies):
            self.state = State.READY
        return replies


def error_frame(request_id: int, exc: ProtocolError) -> bytes:
    """The frame that answers a failed request (or, with id 0, a connection-level failure)."""
    payload: dict[str, Any] = {"op": "error", "id": request_id, "code": str(exc.code), "message": exc.message,
                               "hint": exc.hint}
    return encode_frame(payload)
