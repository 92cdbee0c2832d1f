"""Message schema: one frozen, slotted dataclass per message, with wire encoding and validation.

Pure: no sockets, asyncio, clocks or logging; imports only msgpack (through framing), the standard library
and the rest of ``protocol``, never ``lmgrd`` or ``client_stub``. Every length and range limit comes from
:mod:`protocol.validation`, the one place they are written. Every message on the wire is a msgpack map with an ``op``
string; requests also carry ``id`` (an unsigned integer the client chooses, echoed in the reply). Replies
carry the same ``id`` (0 for a message the server sends unprompted, such as a handshake timeout), an
``op`` naming the reply, and either result fields or, for ``op == "error"``, ``code``, ``message`` and
``hint``. ``parse_request`` and ``parse_reply`` raise only :class:`MalformedMessage` with a message that
names the offending field and its value; extra unknown fields are ignored (forward compatibility).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from protocol.errors import ErrorCode, MalformedMessage
from protocol.framing import HEADER, _pack, encode_frame
from protocol.validation import (
    MAX_CODE_LENGTH,
    MAX_COMMAND_LENGTH,
    MAX_HEARTBEAT_INTERVAL_SECONDS,
    MAX_ID,
    MAX_IDLE_FOR_SECONDS,
    MAX_LEASE_TIMEOUT_SECONDS,
    MAX_MESSAGE_LENGTH,
    MAX_PID,
    MAX_PRODUCT_LENGTH,
    MAX_PROTOCOL_VERSION,
    MAX_PROTOCOLS_OFFERED,
    MAX_SECRET_LENGTH,
    MAX_TEXT,
    MAX_TOKEN_LENGTH,
    MAX_TOKENS,
    MAX_VERSION_LENGTH,
    MAX_WAIT_SECONDS,
    MAX_WAITED_SECONDS,
    MIN_SECRET_LENGTH,
    shown,
)

#: The protocol version whose hello carries ``secret`` (required when a hello offers it; leases bound to it).
SECRET_SINCE_PROTOCOL = 2

# The hot-path reply frames' fixed parts, encoded once: msgpack writes a map as its header, then each key and
# value in insertion order, so a frame is these bytes with the packed values between them (the tests check
# each builder against ``encode_frame(Message(...).to_wire())`` and the vectors, byte for byte).
_header = HEADER.pack
_CHECKED_IN_HEAD: bytes = b"\x83" + _pack("op") + _pack("checked_in") + _pack("id")
_CHECKED_IN_TAIL: dict[bool, bytes] = {True: _pack("released") + _pack(True), False: _pack("released") + _pack(False)}
_CHECKED_IN_FIXED = len(_CHECKED_IN_HEAD) + len(_CHECKED_IN_TAIL[True])
#: Granted.frame's parts: the fixed head, and the encoded pool names and timing seen so far (bounded: a daemon
#: has as many pools as its licenses name, and one timing; waited varies only for queued checkouts).
_GRANTED_HEAD: bytes = b"\x89" + _pack("op") + _pack("granted") + _pack("id")
_GRANTED_TOKEN: bytes = _pack("token")
_GRANTED_POOLS: dict[tuple[str, str], bytes] = {}
_GRANTED_TAILS: dict[tuple[float, float, float], bytes] = {}
_GRANTED_PARTS_LIMIT = 4096
_HEARTBEAT_ACK_HEAD: bytes = b"\x84" + _pack("op") + _pack("heartbeat_ack") + _pack("id")
_HEARTBEAT_ACK_RENEWED: bytes = _pack("renewed")
_HEARTBEAT_ACK_NONE_LOST: bytes = _pack("lost") + _pack([])
_HEARTBEAT_ACK_FIXED = len(_HEARTBEAT_ACK_HEAD) + len(_HEARTBEAT_ACK_RENEWED) + len(_HEARTBEAT_ACK_NONE_LOST)

_T = TypeVar("_T")


# --------------------------------------------------------------------------- field readers
def _get(d: dict[str, Any], key: str, kind: type[_T] | tuple[type, ...], what: str, op: str) -> Any:
    try:
        value = d[key]
    except KeyError:
        raise MalformedMessage(f"{op}: missing field '{key}' ({what})") from None
    # bool is an int subclass: never accept it where a number belongs.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MalformedMessage(f"{op}: field '{key}' must be {what}, got {type(value).__name__} {shown(value)}")
    return value


def _text(d: dict[str, Any], key: str, op: str, default: str | None = None, limit: int = MAX_TEXT) -> str:
    if default is not None and key not in d:
        return default
    value: str = _get(d, key, str, f"a string of at most {limit} characters", op)
    if len(value) > limit:
        raise MalformedMessage(f"{op}: field '{key}' is {len(value)} characters long; the limit is {limit}")
    return value


def _uint(d: dict[str, Any], key: str, op: str, limit: int = MAX_ID, default: int | None = None) -> int:
    if default is not None and key not in d:
        return default
    value: int = _get(d, key, int, f"an integer from 0 to {limit}", op)
    if not 0 <= value <= limit:
        raise MalformedMessage(f"{op}: field '{key}' must be from 0 to {limit}, got {shown(value)}")
    return value


def _seconds(d: dict[str, Any], key: str, op: str, limit: float, default: float | None = None) -> float:
    if default is not None and key not in d:
        return default
    value = _get(d, key, (int, float), f"a number of seconds from 0 to {limit:g}", op)
    if not 0.0 <= value <= limit:  # also rejects NaN
        raise MalformedMessage(f"{op}: field '{key}' must be from 0 to {limit:g} seconds, got {shown(value)}")
    return float(value)


def _bool(d: dict[str, Any], key: str, op: str, default: bool) -> bool:
    if key not in d:
        return default
    value: bool = _get(d, key, bool, "true or false", op)
    return value


def _texts(d: dict[str, Any], key: str, op: str, limit: int = MAX_TOKENS) -> tuple[str, ...]:
    value = _get(d, key, list, f"a list of at most {limit} strings", op)
    if len(value) > limit:
        raise MalformedMessage(f"{op}: field '{key}' holds {len(value)} items; the limit is {limit}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or len(item) > MAX_TEXT:
            raise MalformedMessage(f"{op}: field '{key}[{i}]' must be a string, got {shown(item)}")
    return tuple(value)


def _map(d: dict[str, Any], key: str, op: str) -> dict[str, Any]:
    if key not in d:
        return {}
    value: dict[str, Any] = _get(d, key, dict, "a map", op)
    return value


# --------------------------------------------------------------------------- requests
@dataclass(frozen=True, slots=True)
class Hello:
    """First message of every connection: who is asking, and which protocol versions it speaks.

    ``secret`` (protocol 2) is a random string the client chose for itself, at least 128 bits, the same on
    every connection it opens: the server binds every lease it grants to (user, host, secret), so only a
    connection that presents the same three may resume or check in that lease. It never leaves the client
    except in hello, and the server keeps only a digest of it. A hello offering protocol 2 must carry one.
    """

    OP: ClassVar[str] = "hello"
    id: int
    proto: tuple[int, ...]
    host: str
    user: str
    pid: int
    client_version: str
    display: str = ""
    secret: str = field(default="", repr=False)

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": "hello", "id": self.id, "proto": list(self.proto), "host": self.host,
                             "user": self.user, "pid": self.pid, "client_version": self.client_version,
                             "display": self.display}
        if self.secret:
            d["secret"] = self.secret
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Hello:
        # Once per connection (a burst of clients connecting at once): as in Checkout.from_wire, every field of
        # the exact type msgpack decodes to and within its limits takes this path (a subset of what the checked
        # readers below accept, giving the same values); anything else takes them, so an error names the field.
        rid, protos, host, user, pid = d.get("id"), d.get("proto"), d.get("host"), d.get("user"), d.get("pid")
        cv, display, secret = d.get("client_version", ""), d.get("display", ""), d.get("secret", "")
        if (type(rid) is int and 0 <= rid <= MAX_ID and type(protos) is list
                and 0 < len(protos) <= MAX_PROTOCOLS_OFFERED and type(host) is str and len(host) <= MAX_TEXT
                and type(user) is str and len(user) <= MAX_TEXT
                and type(pid) is int and 0 <= pid <= MAX_PID and type(cv) is str and len(cv) <= MAX_TEXT
                and type(display) is str and len(display) <= MAX_TEXT and type(secret) is str):
            for p in protos:
                if type(p) is not int or not 0 < p <= MAX_PROTOCOL_VERSION:
                    break
            else:
                if (MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH if secret
                        else SECRET_SINCE_PROTOCOL not in protos):
                    return cls(rid, tuple(protos), host, user, pid, cv, display, secret)
        protos = _get(d, "proto", list, "a list of protocol version integers", "hello")
        if not protos or len(protos) > MAX_PROTOCOLS_OFFERED or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p <= MAX_PROTOCOL_VERSION for p in protos
        ):
            raise MalformedMessage(f"hello: field 'proto' must list 1 to {MAX_PROTOCOLS_OFFERED} positive integers, "
                                   f"got {shown(protos)}")
        # Required once protocol 2 is offered; never echoed in a message: it is the client's proof of holding
        # its leases.
        if SECRET_SINCE_PROTOCOL in protos:
            secret = _text(d, "secret", "hello", limit=MAX_SECRET_LENGTH)
        else:
            secret = _text(d, "secret", "hello", default="", limit=MAX_SECRET_LENGTH)
        if secret and len(secret) < MIN_SECRET_LENGTH:
            raise MalformedMessage(f"hello: field 'secret' is {len(secret)} characters long; at least "
                                   f"{MIN_SECRET_LENGTH} are required (128 random bits)")
        if not secret and SECRET_SINCE_PROTOCOL in protos:
            raise MalformedMessage(f"hello: field 'secret' is empty; protocol {SECRET_SINCE_PROTOCOL} needs a random "
                                   f"string of {MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} characters")
        return cls(_uint(d, "id", "hello"), tuple(protos), _text(d, "host", "hello"),
                   _text(d, "user", "hello"), _uint(d, "pid", "hello", MAX_PID),
                   _text(d, "client_version", "hello", default=""), _text(d, "display", "hello", default=""),
                   secret)


# -- the hot path's shapes ------------------------------------------------------------------------------------
# Checkout, checkin and heartbeat as clients send them: every field of the exact type msgpack decodes to and
# within its limit. Each predicate accepts a subset of what the checked readers (``_uint``, ``_text``...) accept,
# reading the same values, so ``from_wire`` takes the fast branch when it holds and the checked one otherwise
# (an error then names the field). :data:`HOT_REQUESTS` adds the key count: a map holding nothing but the
# fields a predicate checked has only string keys and nothing nested, so it needs no other check at all
# (the framing's key and depth walk included).


def _exact_checkout(d: dict[str, Any]) -> bool:
    rid, product, version, wait = d.get("id"), d.get("product"), d.get("version"), d.get("wait", 0.0)
    return (type(rid) is int and 0 <= rid <= MAX_ID and type(product) is str and len(product) <= MAX_PRODUCT_LENGTH
            and type(version) is str and len(version) <= MAX_VERSION_LENGTH and type(wait) is float
            and 0.0 <= wait <= MAX_WAIT_SECONDS)


def _exact_checkin(d: dict[str, Any]) -> bool:
    rid, token = d.get("id"), d.get("token")
    return type(rid) is int and 0 <= rid <= MAX_ID and type(token) is str and len(token) <= MAX_TOKEN_LENGTH


def _exact_heartbeat(d: dict[str, Any]) -> bool:
    rid = d.get("id")
    return "idle_for" not in d and type(rid) is int and 0 <= rid <= MAX_ID and type(d.get("idle", False)) is bool


@dataclass(frozen=True, slots=True)
class Checkout:
    """Ask for a seat of ``product`` at ``version``; wait up to ``wait`` seconds in the queue if none is free."""

    OP: ClassVar[str] = "checkout"
    id: int
    product: str
    version: str
    wait: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"op": "checkout", "id": self.id, "product": self.product, "version": self.version,
                "wait": self.wait}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Checkout:
        # The hot path: every field of the exact type msgpack decodes to and within its limit (a subset of
        # what the checked readers below accept, giving the same values); anything else takes them, so an
        # error still names the field.
        if _exact_checkout(d):
            return cls(d["id"], d["product"], d["version"], d.get("wait", 0.0))
        return cls(_uint(d, "id", "checkout"), _text(d, "product", "checkout", limit=MAX_PRODUCT_LENGTH),
                   _text(d, "version", "checkout", limit=MAX_VERSION_LENGTH),
                   _seconds(d, "wait", "checkout", MAX_WAIT_SECONDS, default=0.0))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Renews every lease of this connection.

    ``idle`` reports that the user is idle (usage policy ``timeout``); ``idle_for`` optionally says for
    how many seconds (the client knows when its user last did something). Without it the server counts
    from the first idle heartbeat.
    """

    OP: ClassVar[str] = "heartbeat"
    id: int
    idle: bool = False
    idle_for: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        if self.idle_for:
            return {"op": "heartbeat", "id": self.id, "idle": self.idle, "idle_for": self.idle_for}
        return {"op": "heartbeat", "id": self.id, "idle": self.idle}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Heartbeat:
        if _exact_heartbeat(d):  # the hot path, as in Checkout.from_wire
            return cls(d["id"], d.get("idle", False), 0.0)
        return cls(_uint(d, "id", "heartbeat"), _bool(d, "idle", "heartbeat", False),
                   _seconds(d, "idle_for", "heartbeat", MAX_IDLE_FOR_SECONDS, 0.0))


@dataclass(frozen=True, slots=True)
class Checkin:
    """Give a seat back now."""

    OP: ClassVar[str] = "checkin"
    id: int
    token: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": "checkin", "id": self.id, "token": self.token}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Checkin:
        if _exact_checkin(d):  # the hot path, as in Checkout.from_wire
            return cls(d["id"], d["token"])
        return cls(_uint(d, "id", "checkin"), _text(d, "token", "checkin", limit=MAX_TOKEN_LENGTH))


@dataclass(frozen=True, slots=True)
class Resume:
    """After a reconnect: take back the leases these tokens name (never a second seat)."""

    OP: ClassVar[str] = "resume"
    id: int
    tokens: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"op": "resume", "id": self.id, "tokens": list(self.tokens)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Resume:
        return cls(_uint(d, "id", "resume"), _texts(d, "tokens", "resume"))


@dataclass(frozen=True, slots=True)
class Status:
    """Ask for the server's pools (customer ID, product, count, in use, queued, expiry)."""

    OP: ClassVar[str] = "status"
    id: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": "status", "id": self.id}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Status:
        return cls(_uint(d, "id", "status"))


@dataclass(frozen=True, slots=True)
class Admin:
    """An administrative command (lmutil): ``command`` with ``args``, authenticated by ``auth``."""

    OP: ClassVar[str] = "admin"
    id: int
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    auth: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"op": "admin", "id": self.id, "command": self.command, "args": self.args, "auth": self.auth}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Admin:
        return cls(_uint(d, "id", "admin"), _text(d, "command", "admin", limit=MAX_COMMAND_LENGTH),
                   _map(d, "args", "admin"), _text(d, "auth", "admin", default=""))


Request = Hello | Checkout | Heartbeat | Checkin | Resume | Status | Admin
REQUEST_TYPES: dict[str, Callable[[dict[str, Any]], Request]] = {
    cls.OP: cls.from_wire for cls in (Hello, Checkout, Heartbeat, Checkin, Resume, Status, Admin)
}


def _hot_checkout(d: dict[str, Any]) -> bool:
    return len(d) == 4 + ("wait" in d) and _exact_checkout(d)


def _hot_checkin(d: dict[str, Any]) -> bool:
    return len(d) == 3 and _exact_checkin(d)


def _hot_heartbeat(d: dict[str, Any]) -> bool:
    return len(d) == 2 + ("idle" in d) and _exact_heartbeat(d)


#: op -> (message class, hot shape): the requests :meth:`protocol.Connection.receive_hot` hands over as their
#: decoded map. A map has the hot shape when the class's exact-type predicate holds and it has no key beyond
#: ``op``, the required fields and the optional ones present (``wait``; ``idle``).
HOT_REQUESTS: dict[str, tuple[type[Request], Callable[[dict[str, Any]], bool]]] = {
    "checkout": (Checkout, _hot_checkout),
    "checkin": (Checkin, _hot_checkin),
    "heartbeat": (Heartbeat, _hot_heartbeat),
}


def hot_request(d: dict[str, Any]) -> type[Request] | None:
    """The class of ``d`` if it is a hot request in its exact shape (see :data:`HOT_REQUESTS`), else None.

    When it returns a class, ``parse_request(d)`` would return an instance of it built from ``d["id"]`` and
    the fields of the same names (``d.get("wait", 0.0)``, ``d.get("idle", False)``): the hot path reads them
    from ``d`` instead of building the message.
    """
    op = d.get("op")
    entry = HOT_REQUESTS.get(op) if type(op) is str else None
    if entry is None or not entry[1](d):
        return None
    return entry[0]


def parse_request(d: dict[str, Any]) -> Request:
    """Turn a decoded map into a request message.

    Raises:
        MalformedMessage: unknown ``op``, missing field or wrong type (the message names the field).
    """
    op = d.get("op")
    parser = REQUEST_TYPES.get(op) if isinstance(op, str) else None
    if parser is None:
        raise MalformedMessage(f"unknown op {shown(op, 40)}; known ops: {', '.join(sorted(REQUEST_TYPES))}")
    return parser(d)


# --------------------------------------------------------------------------- replies
@dataclass(frozen=True, slots=True)
class Welcome:
    """Reply to hello: the chosen protocol version and the timing the client must keep."""

    OP: ClassVar[str] = "welcome"
    id: int
    proto: int
    server_version: str
    heartbeat_interval: float
    lease_timeout: float
    max_frame: int
    session: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": "welcome", "id": self.id, "proto": self.proto, "server_version": self.server_version,
                "heartbeat_interval": self.heartbeat_interval, "lease_timeout": self.lease_timeout,
                "max_frame": self.max_frame, "session": self.session}

    @staticmethod
    def framer(server_version: str, heartbeat_interval: float, lease_timeout: float,
               max_frame: int) -> Callable[[int, int, int], bytes]:
        """A server's welcome builder: ``(id, proto, session) -> frame``, byte for byte the frame of
        ``Welcome(id, proto, server_version, heartbeat_interval, lease_timeout, max_frame, session)``.

        Every welcome of one daemon differs only in those three, so the rest is encoded once, here (every
        connection's hello is answered with one: the burst of clients connecting at once).
        """
        head = b"\x88" + _pack("op") + _pack("welcome") + _pack("id")
        proto_key = _pack("proto")
        middle = (_pack("server_version") + _pack(server_version) + _pack("heartbeat_interval")
                  + _pack(heartbeat_interval) + _pack("lease_timeout") + _pack(lease_timeout) + _pack("max_frame")
                  + _pack(max_frame) + _pack("session"))
        fixed = len(head) + len(proto_key) + len(middle)
        pack = _pack

        def frame(id: int, proto: int, session: int) -> bytes:
            i, p, s = pack(id), pack(proto), pack(session)
            return b"".join((_header(fixed + len(i) + len(p) + len(s)), head, i, proto_key, p, middle, s))

        return frame

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Welcome:
        return cls(_uint(d, "id", "welcome"), _uint(d, "proto", "welcome", MAX_PROTOCOL_VERSION),
                   _text(d, "server_version", "welcome"),
                   _seconds(d, "heartbeat_interval", "welcome", MAX_HEARTBEAT_INTERVAL_SECONDS),
                   _seconds(d, "lease_timeout", "welcome", MAX_LEASE_TIMEOUT_SECONDS), _uint(d, "max_frame", "welcome"),
                   _uint(d, "session", "welcome"))


@dataclass(frozen=True, slots=True)
class Granted:
    """Reply to checkout: the seat is yours while heartbeats keep the lease alive."""

    OP: ClassVar[str] = "granted"
    id: int
    token: str
    customer_id: str
    product: str
    version: str
    lease_timeout: float
    heartbeat_interval: float
    waited: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"op": "granted", "id": self.id, "token": self.token, "customer_id": self.customer_id,
                "product": self.product, "version": self.version, "lease_timeout": self.lease_timeout,
                "heartbeat_interval": self.heartbeat_interval, "waited": self.waited}

    @staticmethod
    def frame(id: int, token: str, customer_id: str, product: str, version: str, lease_timeout: float,
              heartbeat_interval: float, waited: float) -> bytes:
        """The encoded frame of ``Granted(...)``, byte for byte, without building the object (the hot path): the
        parts that repeat from grant to grant (the pool's names, the daemon's timing) are encoded once."""
        pool = _GRANTED_POOLS.get((customer_id, product))
        if pool is None:
            if len(_GRANTED_POOLS) >= _GRANTED_PARTS_LIMIT:
                _GRANTED_POOLS.clear()
            pool = _GRANTED_POOLS[(customer_id, product)] = (
                _pack("customer_id") + _pack(customer_id) + _pack("product") + _pack(product) + _pack("version"))
        tail = _GRANTED_TAILS.get((lease_timeout, heartbeat_interval, waited))
        if tail is None:
            if len(_GRANTED_TAILS) >= _GRANTED_PARTS_LIMIT:
                _GRANTED_TAILS.clear()
            tail = _GRANTED_TAILS[(lease_timeout, heartbeat_interval, waited)] = (
                _pack("lease_timeout") + _pack(lease_timeout) + _pack("heartbeat_interval")
                + _pack(heartbeat_interval) + _pack("waited") + _pack(waited))
        body = b"".join((_GRANTED_HEAD, _pack(id), _GRANTED_TOKEN, _pack(token), pool, _pack(version), tail))
        return _header(len(body)) + body

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Granted:
        return cls(_uint(d, "id", "granted"), _text(d, "token", "granted", limit=MAX_TOKEN_LENGTH),
                   _text(d, "customer_id", "granted"), _text(d, "product", "granted"),
                   _text(d, "version", "granted"), _seconds(d, "lease_timeout", "granted", MAX_LEASE_TIMEOUT_SECONDS),
                   _seconds(d, "heartbeat_interval", "granted", MAX_HEARTBEAT_INTERVAL_SECONDS),
                   _seconds(d, "waited", "granted", MAX_WAITED_SECONDS, default=0.0))


@dataclass(frozen=True, slots=True)
class LostSeat:
    """A lease the server no longer holds for this client, and why (carried in heartbeat and resume replies)."""

    token: str
    code: ErrorCode
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {"token": self.token, "code": str(self.code), "message": self.message}

    @classmethod
    def from_wire(cls, d: object, op: str) -> LostSeat:
        if not isinstance(d, dict):
            raise MalformedMessage(f"{op}: each item of 'lost' must be a map, got {shown(d)}")
        return cls(_text(d, "token", op, limit=MAX_TOKEN_LENGTH), _code(d, op),
                   _text(d, "message", op, limit=MAX_MESSAGE_LENGTH))


def _code(d: dict[str, Any], op: str) -> ErrorCode:
    raw = _text(d, "code", op, limit=MAX_CODE_LENGTH)
    try:
        return ErrorCode(raw)
    except ValueError:
        # An unknown code from a newer server still reaches the product as an internal error code,
        # with the server's message intact.
        return ErrorCode.INTERNAL_ERROR


def _lost(d: dict[str, Any], op: str) -> tuple[LostSeat, ...]:
    items = _get(d, "lost", list, "a list", op) if "lost" in d else []
    return tuple(LostSeat.from_wire(item, op) for item in items)


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """Reply to heartbeat: how many leases were renewed and which are lost (with the reason)."""

    OP: ClassVar[str] = "heartbeat_ack"
    id: int
    renewed: int
    lost: tuple[LostSeat, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"op": "heartbeat_ack", "id": self.id, "renewed": self.renewed,
                "lost": [x.to_wire() for x in self.lost]}

    @staticmethod
    def frame(id: int, renewed: int, lost: Sequence[LostSeat] = ()) -> bytes:
        """The encoded frame of ``HeartbeatAck(id, renewed, tuple(lost))``, without building the object (the
        heartbeat path): with nothing lost, only the id and the count are packed."""
        if lost:
            return encode_frame({"op": "heartbeat_ack", "id": id, "renewed": renewed,
                                 "lost": [x.to_wire() for x in lost]})
        mid: bytes = _pack(id)
        count: bytes = _pack(renewed)
        return (_header(_HEARTBEAT_ACK_FIXED + len(mid) + len(count)) + _HEARTBEAT_ACK_HEAD + mid
                + _HEARTBEAT_ACK_RENEWED + count + _HEARTBEAT_ACK_NONE_LOST)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> HeartbeatAck:
        return cls(_uint(d, "id", "heartbeat_ack"), _uint(d, "renewed", "heartbeat_ack"),
                   _lost(d, "heartbeat_ack"))


@dataclass(frozen=True, slots=True)
class CheckedIn:
    """Reply to checkin. ``released`` is false if the token was not (or no longer) held: checkin is idempotent."""

    OP: ClassVar[str] = "checked_in"
    id: int
    released: bool

    def to_wire(self) -> dict[str, Any]:
        return {"op": "checked_in", "id": self.id, "released": self.released}

    @staticmethod
    def frame(id: int, released: bool) -> bytes:
        """The encoded frame of ``CheckedIn(id, released)``, without building the object (the hot path): only
        the id is packed; the rest is encoded once."""
        mid: bytes = _pack(id)
        tail = _CHECKED_IN_TAIL[released]
        return _header(_CHECKED_IN_FIXED + len(mid)) + _CHECKED_IN_HEAD + mid + tail

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> CheckedIn:
        return cls(_uint(d, "id", "checked_in"), _bool(d, "released", "checked_in", False))


@dataclass(frozen=True, slots=True)
class Resumed:
    """Reply to resume: the tokens now held by this connection, and those that are gone."""

    OP: ClassVar[str] = "resumed"
    id: int
    resumed: tuple[str, ...]
    lost: tuple[LostSeat, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"op": "resumed", "id": self.id, "resumed": list(self.resumed),
                "lost": [x.to_wire() for x in self.lost]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Resumed:
        return cls(_uint(d, "id", "resumed"), _texts(d, "resumed", "resumed"), _lost(d, "resumed"))


@dataclass(frozen=True, slots=True)
class StatusReply:
    """Reply to status (and to admin commands): a free-form map of facts, documented in PROTOCOL.md."""

    OP: ClassVar[str] = "status"
    id: int
    data: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"op": "status", "id": self.id, "data": self.data}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StatusReply:
        return cls(_uint(d, "id", "status"), _map(d, "data", "status"))


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refusal: stable ``code``, a ``message`` saying what happened and a ``hint`` saying what to do."""

    OP: ClassVar[str] = "error"
    id: int
    code: ErrorCode
    message: str
    hint: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"op": "error", "id": self.id, "code": str(self.code), "message": self.message,
                "hint": self.hint}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ErrorReply:
        return cls(_uint(d, "id", "error"), _code(d, "error"), _text(d, "message", "error", limit=MAX_MESSAGE_LENGTH),
                   _text(d, "hint", "error", default="", limit=MAX_MESSAGE_LENGTH))


Reply = Welcome | Granted | HeartbeatAck | CheckedIn | Resumed | StatusReply | ErrorReply
REPLY_TYPES: dict[str, Callable[[dict[str, Any]], Reply]] = {
    cls.OP: cls.from_wire
    for cls in (Welcome, Granted, HeartbeatAck, CheckedIn, Resumed, StatusReply, ErrorReply)
}


def parse_reply(d: dict[str, Any]) -> Reply:
    """Turn a decoded map from the server into a reply message.

    Raises:
        MalformedMessage: unknown ``op``, missing field or wrong type.
    """
    op = d.get("op")
    parser = REPLY_TYPES.get(op) if isinstance(op, str) else None
    if parser is None:
        raise MalformedMessage(f"unknown reply op {shown(op, 40)}; known: {', '.join(sorted(REPLY_TYPES))}")
    return parser(d)
