"""The connection state machine, for both ends, as one pure object (the h11 model).

``Connection(Role.SERVER)`` takes the client's bytes and returns request messages, and turns the server's
replies into bytes; ``Connection(Role.CLIENT)`` does the mirror image. Both directions pass the ONE table
below, so an end that tries to send out of order is stopped as surely as a peer that does. The object never
sees a socket, a loop or a clock. Imports only the standard library and the rest of ``protocol``; never
``lmgrd`` or ``client_stub``.

Rule 1: everything that moves the state of a connection is in ``TRANSITIONS``; anything not listed there
is an error. Rule 2: any error raised here leaves the connection in ``ERROR``, which is terminal except that
the server may still send the one error reply that explains it (the caller then closes).

The conversation::

    AWAIT_HELLO --client: hello--> AWAIT_WELCOME --server: welcome--> READY
         |                             |                                  requests and replies
         +---server: error-------------+--server: error--> MUST_CLOSE     (error with id 0: the server closes)

Requests a client pipelines behind its hello are legal in ``AWAIT_WELCOME`` (the server answers in order,
so its welcome comes first); a reply other than ``welcome`` or ``error`` before the welcome is not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Generic, Literal, NoReturn, TypeVar, overload

import msgpack

from protocol.errors import ErrorCode, LocalProtocolError, MalformedMessage, ProtocolError
from protocol.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame
from protocol.messages import (
    REPLY_TYPES,
    REQUEST_TYPES,
    Admin,
    CheckedIn,
    Checkin,
    Checkout,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Reply,
    Request,
    Resume,
    Resumed,
    Status,
    StatusReply,
    Welcome,
    hot_request,
    parse_reply,
    parse_request,
)
from protocol.validation import MAX_ID

__all__ = [
    "CLIENT_MAX_FRAME_BYTES",
    "SUPPORTED_VERSIONS",
    "TRANSITIONS",
    "BadRequest",
    "Connection",
    "Role",
    "State",
    "error_frame",
    "negotiate",
]

#: Protocol versions this code speaks, oldest first. Version 2 adds hello's ``secret``, to which the server
#: binds every lease it grants (PROTOCOL.md, "Leases belong to their holder"); the messages are otherwise
#: those of version 1.
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2)
#: The client's frame ceiling: it trusts its configured server more than the server trusts clients, but
#: still bounds what it buffers.
CLIENT_MAX_FRAME_BYTES = 16 * 1024 * 1024


class Role(enum.Enum):
    """Which end of the connection this object is."""

    CLIENT = "client"
    SERVER = "server"

    # Members are singletons compared by identity: hash them the same way, in C (Enum's own __hash__ is
    # Python code, and every message hashes two members to look up the table).
    __hash__ = object.__hash__


class State(enum.Enum):
    """The state of the conversation, the same on both ends once both have seen the same messages."""

    AWAIT_HELLO = "await_hello"  # nothing yet: the client must send hello first
    AWAIT_WELCOME = "await_welcome"  # hello seen: the server owes a welcome (or a refusal)
    READY = "ready"  # requests and their replies, in any mix
    MUST_CLOSE = "must_close"  # the server refused the connection before welcoming it
    ERROR = "error"  # a rule was broken (either end); terminal
    CLOSED = "closed"  # the caller closed the transport

    __hash__ = object.__hash__  # as for Role


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A well-framed message that fails the schema after the hello: answer it, keep the connection.

    ``id`` is the request's id when it carried a valid one, else 0.
    """

    id: int
    error: ProtocolError


_REQUESTS: tuple[type[Request], ...] = (Checkout, Heartbeat, Checkin, Resume, Status, Admin)
_REPLIES: tuple[type[Reply], ...] = (Granted, HeartbeatAck, CheckedIn, Resumed, StatusReply, ErrorReply)

#: (state, who sends, message class) -> next state. ``BadRequest`` stands for a request that failed the
#: schema: the server answers it after the hello, and fails the connection before it.
TRANSITIONS: dict[tuple[State, Role, type], State] = {
    (State.AWAIT_HELLO, Role.CLIENT, Hello): State.AWAIT_WELCOME,
    # Too many connections, or no hello in time: the server says so and closes.
    (State.AWAIT_HELLO, Role.SERVER, ErrorReply): State.MUST_CLOSE,
    **{(State.AWAIT_WELCOME, Role.CLIENT, kind): State.AWAIT_WELCOME for kind in (*_REQUESTS, BadRequest)},
    (State.AWAIT_WELCOME, Role.SERVER, Welcome): State.READY,
    # The hello was refused (no common protocol version, a hostname that cannot be licensed).
    (State.AWAIT_WELCOME, Role.SERVER, ErrorReply): State.MUST_CLOSE,
    **{(State.READY, Role.CLIENT, kind): State.READY for kind in (*_REQUESTS, BadRequest)},
    **{(State.READY, Role.SERVER, kind): State.READY for kind in _REPLIES},
    # The one reply allowed after a broken rule: the error that explains it.
    (State.ERROR, Role.SERVER, ErrorReply): State.ERROR,
}


def negotiate(offered: tuple[int, ...], supported: tuple[int, ...] = SUPPORTED_VERSIONS) -> int:
    """Pick the highest protocol version both sides speak.

    Args:
        offered: the versions the client listed in its hello.
        supported: the versions this end speaks.

    Returns:
        The highest common version.

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


def _op(kind: type) -> str:
    return getattr(kind, "OP", "malformed message")


def _refusal(state: State, sender: Role, kind: type) -> tuple[str, str]:
    """What was wrong with ``sender`` sending a ``kind`` in ``state``: (message, hint).

    The server's wording for the first two cases is quoted by clients and tests: keep it.
    """
    op = _op(kind)
    if (sender is Role.CLIENT) != (kind in _CLIENT_SENDS):
        return f"a {sender.value} does not send '{op}'", ""
    if state is State.AWAIT_HELLO:
        return f"'{op}' sent before 'hello'", "a client must send hello first; see PROTOCOL.md"
    if kind is Hello or (kind is Welcome and state is not State.AWAIT_WELCOME):
        return f"'{op}' sent twice on one connection", ""
    if state is State.AWAIT_WELCOME:
        return f"'{op}' sent before 'welcome'", "a server must answer hello with welcome first; see PROTOCOL.md"
    return f"'{op}' sent on a connection that is {state.value}", ""


_CLIENT_SENDS: frozenset[type] = frozenset({Hello, *_REQUESTS, BadRequest})
# Every message class has its place in the table (checked once, at import).
if {cls.OP for cls in (Hello, *_REQUESTS)} != set(REQUEST_TYPES) or {
    cls.OP for cls in (Welcome, *_REPLIES)
} != set(REPLY_TYPES):
    raise TypeError("protocol.connection must list every request and reply class of protocol.messages")

_EventT = TypeVar("_EventT")


class Connection(Generic[_EventT]):
    """One end of one connection: bytes in, events out; messages in, bytes out.

    Args:
        role: which end this is.
        max_frame_bytes: the largest frame accepted from the peer (default: 64 KiB for a server,
            16 MiB for a client).

    Attributes:
        role: ``Role.CLIENT`` or ``Role.SERVER``.
        state: the :class:`State` of the conversation.
        hello: the hello this client sent, once it has passed the table. A server keeps none (``None``): the
            message goes to the caller, which keeps what it needs of it, and a daemon holds one connection per
            client for hours (about 300 bytes each, with its strings); ``proto`` says whether it arrived.
        proto: the negotiated protocol version (0 until the server has picked one: on receiving the
            hello for a server, on receiving the welcome for a client). On a server, non-zero exactly when
            the hello has been received.
    """

    __slots__ = ("_decoder", "_parse", "_peer", "hello", "proto", "role", "state")

    @overload
    def __init__(self: Connection[Reply], role: Literal[Role.CLIENT], max_frame_bytes: int | None = None) -> None:
        ...

    @overload
    def __init__(self: Connection[Request | BadRequest], role: Literal[Role.SERVER],
                 max_frame_bytes: int | None = None) -> None:
        ...

    @overload
    def __init__(self: Connection[Request | BadRequest | Reply], role: Role,
                 max_frame_bytes: int | None = None) -> None:
        ...

    def __init__(self, role: Role, max_frame_bytes: int | None = None) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be Role.CLIENT or Role.SERVER, got {role!r}")
        if max_frame_bytes is None:
            max_frame_bytes = CLIENT_MAX_FRAME_BYTES if role is Role.CLIENT else DEFAULT_MAX_FRAME_BYTES
        self._decoder = FrameDecoder(max_frame_bytes)
        self.role = role
        self._peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._parse = parse_request if role is Role.SERVER else parse_reply
        self.state = State.AWAIT_HELLO
        self.hello: Hello | None = None
        self.proto = 0

    # -- the table ------------------------------------------------------------------------------------------
    # Every move is ``TRANSITIONS.get((self.state, sender, kind))``, written out at each use (one dict
    # lookup on the hot path, no call); a miss goes here.
    def _refuse(self, sender: Role, kind: type, remote: bool) -> NoReturn:
        message, hint = _refusal(self.state, sender, kind)
        self.state = State.ERROR
        if remote:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, message, hint)
        raise LocalProtocolError(message, hint)

    # -- sending --------------------------------------------------------------------------------------------
    def send(self, message: Request | Reply) -> bytes:
        """Check that this end may send ``message`` now, move the state, and return its frame.

        Args:
            message: a request (client) or a reply (server).

        Returns:
            The complete frame to write to the transport.

        Raises:
            LocalProtocolError: this end may not send ``message`` now (a request before hello, a reply
                before welcome, a reply from a client, anything after an error or close). The connection
                is then in ERROR.
        """
        kind = type(message)
        nxt = TRANSITIONS.get((self.state, self.role, kind))
        if nxt is None:
            self._refuse(self.role, kind, remote=False)
        self.state = nxt
        if isinstance(message, Hello):
            self.hello = message
        return encode_frame(message.to_wire())

    def send_frame(self, kind: type[Request] | type[Reply], frame: bytes) -> bytes:
        """Pass a prebuilt frame (``Granted.frame(...)``, :func:`error_frame`) through the table.

        The hot-path twin of :meth:`send`: one dict lookup, no message object, no encoding. It checks that
        a message of class ``kind`` may be sent now and moves the state as :meth:`send` would; it does
        NOT decode ``frame`` to check that it holds a ``kind`` (the caller built it with that class's
        encoder), and it never takes ``Hello`` (use :meth:`send`, which records it).

        Returns:
            ``frame``, unchanged.

        Raises:
            LocalProtocolError: as for :meth:`send`.
        """
        if kind is Hello:
            self.state = State.ERROR
            raise LocalProtocolError("send hello with send(), which records it")
        nxt = TRANSITIONS.get((self.state, self.role, kind))
        if nxt is None:
            self._refuse(self.role, kind, remote=False)
        self.state = nxt
        return frame

    # -- receiving ------------------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[_EventT]:
        """Feed received bytes; return the complete messages, in order.

        On a server, a message that is well framed but fails the schema after the hello comes back as
        :class:`BadRequest`, so the server can answer it and go on serving this client.

        Args:
            data: bytes as they arrived, in any split.

        Returns:
            Requests (server) or replies (client).

        Raises:
            ProtocolError: a malformed or oversized frame (MalformedMessage), a message out of order
                (UNEXPECTED_MESSAGE), anything received after an error or close, or (server) no common
                protocol version. The connection is then in ERROR.
        """
        if self.state is State.ERROR or self.state is State.CLOSED:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"connection is {self.state.value}")
        peer = self._peer
        try:
            out: list[Any] = []
            for raw in self._decoder.feed(data):
                try:
                    msg: Any = self._parse(raw)
                except MalformedMessage as exc:
                    nxt = TRANSITIONS.get((self.state, peer, BadRequest)) if peer is Role.CLIENT else None
                    if nxt is None:
                        raise
                    self.state = nxt
                    rid = raw.get("id")
                    ok_id = isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID
                    out.append(BadRequest(rid if ok_id and isinstance(rid, int) else 0, exc))
                    continue
                kind = type(msg)
                nxt = TRANSITIONS.get((self.state, peer, kind))
                if nxt is None:
                    self._refuse(peer, kind, remote=True)
                self.state = nxt
                if kind is Hello:
                    self.proto = negotiate(msg.proto)  # >= 1: the hello arrived (the message is not kept)
                elif kind is Welcome:
                    self.proto = msg.proto
                out.append(msg)
            return out
        except ProtocolError:
            self.state = State.ERROR
            raise

    def receive_hot(self, data: bytes) -> tuple[type[Request], dict[str, Any]] | None:
        """The hot path's twin of :meth:`receive_data`, for a server's commonest read: exactly one whole frame
        holding a checkout, checkin or heartbeat in its exact shape (``protocol.messages.hot_request``) on a
        READY connection. Returns the message class and the decoded map (whose fields are the message's, read
        by name), having moved nothing: the table takes each of these kinds from READY to READY.

        Returns ``None`` for anything else, with nothing consumed and no state changed: the caller then passes
        the same bytes to :meth:`receive_data`, which decodes, checks and refuses as always (a bad frame is
        decoded twice, which only a bad frame pays).
        """
        if self.state is not _READY:
            return None
        body = self._decoder.whole(data)
        if body is None:
            return None
        try:
            d = _unpackb(body)
        except Exception:  # any msgpack failure: receive_data turns it into the precise error
            return None
        if type(d) is not dict:
            return None
        kind = hot_request(d)
        if kind is None:
            return None
        return kind, d

    def close(self) -> None:
        """The transport is gone: nothing more is sent or received."""
        self.state = State.CLOSED


_READY = State.READY
#: msgpack's unpacking with decode_body's options (msgpack's defaults: str keys only, lists, no raw bytes as str).
_unpackb = msgpack.unpackb
# Every kind receive_hot hands over goes from READY to READY for a client: receive_hot moves no state.
if any(TRANSITIONS.get((State.READY, Role.CLIENT, kind)) is not State.READY for kind in (Checkout, Checkin, Heartbeat)):
    raise TypeError("protocol.connection.receive_hot needs READY -> READY for checkout, checkin and heartbeat")


def error_frame(request_id: int, exc: ProtocolError) -> bytes:
    """The frame that answers a failed request (or, with id 0, a connection-level failure).

    Byte for byte the frame of ``ErrorReply(request_id, exc.code, exc.message, exc.hint)``; pass it
    through :meth:`Connection.send_frame` with ``ErrorReply``.
    """
    payload: dict[str, Any] = {"op": "error", "id": request_id, "code": str(exc.code), "message": exc.message,
                               "hint": exc.hint}
    return encode_frame(payload)
