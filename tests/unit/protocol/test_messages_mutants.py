"""Every field of every message, checked by name, type, range and default, with the exact refusal text.

The refusal texts are a contract: the server sends them back in ``BAD_REQUEST`` replies and the client
stub shows them to the product, so each names the message, the field, what was expected and what came.
The table below is the wire schema as PROTOCOL.md states it; each row yields a test that a missing field
is refused (or takes its default), a wrong type is refused, and a value at the limit passes while one
past it is refused. Written to kill the mutants ``make mutation`` found surviving in protocol/messages.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest

from protocol import MalformedMessage, encode_frame
from protocol.errors import ErrorCode
from protocol.messages import (
    HOT_REQUESTS,
    MAX_ID,
    MAX_TEXT,
    MAX_TOKENS,
    MAX_WAIT_SECONDS,
    Admin,
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
    StatusReply,
    Welcome,
    hot_request,
    parse_reply,
    parse_request,
)
from protocol.samples import SAMPLES
from protocol.validation import MAX_SECRET_LENGTH, MAX_VERSION_LENGTH, shown
from tests.unit.protocol.test_receive_hot import fields as hot_fields

CHECKOUT_VERSION_LIMIT = MAX_VERSION_LENGTH  # 32, the one version limit (protocol/validation.py)
TEN_YEARS = 10 * 365 * 86400.0


@dataclass(frozen=True)
class F:
    """One field: its wire name, its kind, its limit and its default (``REQUIRED`` if it has none)."""

    key: str
    kind: str  # text, uint, seconds, bool, texts, map
    limit: float = 0
    default: Any = "REQUIRED"


REQUIRED = "REQUIRED"

# op -> (request or reply, a full valid message (protocol/samples.py), its fields)
SCHEMA: dict[str, tuple[str, Any, list[F]]] = {
    "hello": ("request", SAMPLES["hello"], [
        F("id", "uint", MAX_ID), F("host", "text", MAX_TEXT), F("user", "text", MAX_TEXT),
        F("pid", "uint", 2**32), F("client_version", "text", MAX_TEXT, ""), F("display", "text", MAX_TEXT, ""),
        F("secret", "text", MAX_SECRET_LENGTH),  # required: the example offers protocol 2
    ]),
    "checkout": ("request", SAMPLES["checkout"], [
        F("id", "uint", MAX_ID), F("product", "text", 64), F("version", "text", CHECKOUT_VERSION_LIMIT),
        F("wait", "seconds", MAX_WAIT_SECONDS, 0.0),
    ]),
    "heartbeat": ("request", SAMPLES["heartbeat"], [
        F("id", "uint", MAX_ID), F("idle", "bool", 0, False), F("idle_for", "seconds", TEN_YEARS, 0.0),
    ]),
    "checkin": ("request", SAMPLES["checkin"], [F("id", "uint", MAX_ID), F("token", "text", 64)]),
    "resume": ("request", SAMPLES["resume"], [F("id", "uint", MAX_ID), F("tokens", "texts", MAX_TOKENS)]),
    "status": ("request", SAMPLES["status"], [F("id", "uint", MAX_ID)]),
    "admin": ("request", SAMPLES["admin"], [
        F("id", "uint", MAX_ID), F("command", "text", 64), F("args", "map", 0, {}),
        F("auth", "text", MAX_TEXT, ""),
    ]),
    "welcome": ("reply", SAMPLES["welcome"], [
        F("id", "uint", MAX_ID), F("proto", "uint", 65535), F("server_version", "text", MAX_TEXT),
        F("heartbeat_interval", "seconds", 86_400.0), F("lease_timeout", "seconds", 864_000.0),
        F("max_frame", "uint", MAX_ID), F("session", "uint", MAX_ID),
    ]),
    "granted": ("reply", SAMPLES["granted"], [
        F("id", "uint", MAX_ID), F("token", "text", 64), F("customer_id", "text", MAX_TEXT),
        F("product", "text", MAX_TEXT), F("version", "text", MAX_TEXT),
        F("lease_timeout", "seconds", 864_000.0), F("heartbeat_interval", "seconds", 86_400.0),
        F("waited", "seconds", MAX_WAIT_SECONDS * 2, 0.0),
    ]),
    "heartbeat_ack": ("reply", SAMPLES["heartbeat_ack"], [
        F("id", "uint", MAX_ID), F("renewed", "uint", MAX_ID),
    ]),
    "checked_in": ("reply", SAMPLES["checked_in"], [F("id", "uint", MAX_ID), F("released", "bool", 0, False)]),
    "resumed": ("reply", SAMPLES["resumed"], [
        F("id", "uint", MAX_ID), F("resumed", "texts", MAX_TOKENS),
    ]),
    "status_reply": ("reply", SAMPLES["status_reply"], [F("id", "uint", MAX_ID), F("data", "map", 0, {})]),
    "error": ("reply", SAMPLES["error"], [
        F("id", "uint", MAX_ID), F("message", "text", 4096), F("hint", "text", 4096, ""),
    ]),
}

WHAT = {
    "text": "a string of at most {limit} characters",
    "uint": "an integer from 0 to {limit}",
    "seconds": "a number of seconds from 0 to {limit:g}",
    "bool": "true or false",
    "texts": "a list of at most {limit} strings",
    "map": "a map",
}
WRONG_TYPE = {"text": 5, "uint": "7", "seconds": "1.5", "bool": 1, "texts": "t1", "map": ["k"]}


def parse(side: str, d: dict[str, Any]) -> Any:
    return parse_request(d) if side == "request" else parse_reply(d)


def wire_op(msg: Any) -> str:
    return str(msg.OP)


def what(f: F) -> str:
    return WHAT[f.kind].format(limit=f.limit)


def refusal(side: str, d: dict[str, Any]) -> str:
    with pytest.raises(MalformedMessage) as info:
        parse(side, d)
    assert info.value.code is ErrorCode.BAD_REQUEST
    return str(info.value.message)


FIELDS = [(name, f) for name, (_, _, fields) in SCHEMA.items() for f in fields]


@pytest.mark.parametrize("name", list(SCHEMA))
def test_the_full_message_round_trips(name: str) -> None:
    side, msg, _ = SCHEMA[name]
    assert parse(side, msg.to_wire()) == msg
    assert parse(side, dict(msg.to_wire(), extra_field_from_a_newer_peer=1)) == msg


@pytest.mark.parametrize("name, f", FIELDS, ids=[f"{n}.{f.key}" for n, f in FIELDS])
def test_a_missing_field_is_refused_by_name_or_takes_its_default(name: str, f: F) -> None:
    side, msg, _ = SCHEMA[name]
    d = msg.to_wire()
    del d[f.key]
    op = wire_op(msg)
    if f.default == REQUIRED:
        assert refusal(side, d) == f"{op}: missing field '{f.key}' ({what(f)})"
    else:
        got = parse(side, d)
        assert getattr(got, f.key) == f.default
        assert type(getattr(got, f.key)) is type(f.default)


@pytest.mark.parametrize("name, f", FIELDS, ids=[f"{n}.{f.key}" for n, f in FIELDS])
def test_a_wrong_type_is_refused_naming_field_type_and_value(name: str, f: F) -> None:
    side, msg, _ = SCHEMA[name]
    bad = WRONG_TYPE[f.kind]
    op = wire_op(msg)
    assert refusal(side, dict(msg.to_wire(), **{f.key: bad})) == (
        f"{op}: field '{f.key}' must be {what(f)}, got {type(bad).__name__} {bad!r}"
    )
    if f.kind in ("uint", "seconds"):  # bool is an int subclass, and never a number on the wire
        assert refusal(side, dict(msg.to_wire(), **{f.key: True})) == (
            f"{op}: field '{f.key}' must be {what(f)}, got bool True"
        )


TEXTS = [(n, f) for n, f in FIELDS if f.kind == "text"]


@pytest.mark.parametrize("name, f", TEXTS, ids=[f"{n}.{f.key}" for n, f in TEXTS])
def test_a_text_at_its_limit_passes_and_one_longer_is_refused(name: str, f: F) -> None:
    side, msg, _ = SCHEMA[name]
    limit = int(f.limit)
    at = parse(side, dict(msg.to_wire(), **{f.key: "é" * limit}))
    assert getattr(at, f.key) == "é" * limit
    assert refusal(side, dict(msg.to_wire(), **{f.key: "é" * (limit + 1)})) == (
        f"{wire_op(msg)}: field '{f.key}' is {limit + 1} characters long; the limit is {limit}"
    )


UINTS = [(n, f) for n, f in FIELDS if f.kind == "uint"]


@pytest.mark.parametrize("name, f", UINTS, ids=[f"{n}.{f.key}" for n, f in UINTS])
def test_an_integer_from_zero_to_its_limit_passes_and_outside_is_refused(name: str, f: F) -> None:
    side, msg, _ = SCHEMA[name]
    limit = int(f.limit)
    for ok in (0, limit):
        assert getattr(parse(side, dict(msg.to_wire(), **{f.key: ok})), f.key) == ok
    for bad in (-1, limit + 1):
        assert refusal(side, dict(msg.to_wire(), **{f.key: bad})) == (
            f"{wire_op(msg)}: field '{f.key}' must be from 0 to {limit}, got {bad}"
        )


SECONDS = [(n, f) for n, f in FIELDS if f.kind == "seconds"]


@pytest.mark.parametrize("name, f", SECONDS, ids=[f"{n}.{f.key}" for n, f in SECONDS])
def test_seconds_from_zero_to_the_limit_pass_as_floats_and_outside_or_nan_are_refused(name: str, f: F) -> None:
    side, msg, _ = SCHEMA[name]
    for ok in (0, f.limit, int(f.limit)):
        got = getattr(parse(side, dict(msg.to_wire(), **{f.key: ok})), f.key)
        assert got == ok and type(got) is float
    for bad in (-0.001, f.limit + 0.5, math.nan, math.inf):
        assert refusal(side, dict(msg.to_wire(), **{f.key: bad})) == (
            f"{wire_op(msg)}: field '{f.key}' must be from 0 to {f.limit:g} seconds, got {bad!r}"
        )


LISTS = [(n, f) for n, f in FIELDS if f.kind == "texts"]


@pytest.mark.parametrize("name, f", LISTS, ids=[f"{n}.{f.key}" for n, f in LISTS])
def test_a_token_list_is_bounded_in_length_and_items(name: str, f: F) -> None:
    side, msg, _ = SCHEMA[name]
    op, limit = wire_op(msg), int(f.limit)
    full = [f"t{i}" for i in range(limit)]
    assert getattr(parse(side, dict(msg.to_wire(), **{f.key: full})), f.key) == tuple(full)
    assert getattr(parse(side, dict(msg.to_wire(), **{f.key: []})), f.key) == ()
    assert refusal(side, dict(msg.to_wire(), **{f.key: [*full, "x"]})) == (
        f"{op}: field '{f.key}' holds {limit + 1} items; the limit is {limit}"
    )
    assert getattr(parse(side, dict(msg.to_wire(), **{f.key: ["t" * MAX_TEXT]})), f.key) == ("t" * MAX_TEXT,)
    for bad in (7, None, "t" * (MAX_TEXT + 1)):
        assert refusal(side, dict(msg.to_wire(), **{f.key: ["ok", bad]})) == (
            f"{op}: field '{f.key}[1]' must be a string, got {shown(bad)}"
        )


# -- exact wire maps ----------------------------------------------------------------------------------------


def test_each_message_encodes_to_exactly_its_documented_map() -> None:
    assert Admin(7, "lmremove", {"token": "t1"}, "secret").to_wire() == {
        "op": "admin", "id": 7, "command": "lmremove", "args": {"token": "t1"}, "auth": "secret"}
    assert Admin(7, "status").to_wire() == {"op": "admin", "id": 7, "command": "status", "args": {}, "auth": ""}
    assert StatusReply(13, {"a": 1}).to_wire() == {"op": "status", "id": 13, "data": {"a": 1}}
    assert Status(6).to_wire() == {"op": "status", "id": 6}
    assert Hello(1, (1, 2), "pc1", "alice", 77, "cv", ":0").to_wire() == {
        "op": "hello", "id": 1, "proto": [1, 2], "host": "pc1", "user": "alice", "pid": 77,
        "client_version": "cv", "display": ":0"}
    assert Checkout(2, "CADPRO", "2.1").to_wire() == {
        "op": "checkout", "id": 2, "product": "CADPRO", "version": "2.1", "wait": 0.0}
    assert Heartbeat(3).to_wire() == {"op": "heartbeat", "id": 3, "idle": False}
    assert Heartbeat(3, True, 2.5).to_wire() == {"op": "heartbeat", "id": 3, "idle": True, "idle_for": 2.5}
    assert Checkin(4, "t").to_wire() == {"op": "checkin", "id": 4, "token": "t"}
    assert Resume(5, ("a", "b")).to_wire() == {"op": "resume", "id": 5, "tokens": ["a", "b"]}
    assert Welcome(8, 1, "v", 10.0, 30.0, 99, 42).to_wire() == {
        "op": "welcome", "id": 8, "proto": 1, "server_version": "v", "heartbeat_interval": 10.0,
        "lease_timeout": 30.0, "max_frame": 99, "session": 42}
    assert Granted(9, "t", "C1", "P", "2.1", 30.0, 10.0).to_wire() == {
        "op": "granted", "id": 9, "token": "t", "customer_id": "C1", "product": "P", "version": "2.1",
        "lease_timeout": 30.0, "heartbeat_interval": 10.0, "waited": 0.0}
    lost = LostSeat("t", ErrorCode.SEAT_REMOVED, "removed by lmremove")
    assert lost.to_wire() == {"token": "t", "code": "SEAT_REMOVED", "message": "removed by lmremove"}
    assert HeartbeatAck(10, 2, (lost,)).to_wire() == {"op": "heartbeat_ack", "id": 10, "renewed": 2,
                                                      "lost": [lost.to_wire()]}
    assert HeartbeatAck(10, 2).to_wire() == {"op": "heartbeat_ack", "id": 10, "renewed": 2, "lost": []}
    assert CheckedIn(11, False).to_wire() == {"op": "checked_in", "id": 11, "released": False}
    assert Resumed(12, ("a",), (lost,)).to_wire() == {"op": "resumed", "id": 12, "resumed": ["a"],
                                                      "lost": [lost.to_wire()]}
    assert ErrorReply(14, ErrorCode.NO_SEATS, "m").to_wire() == {
        "op": "error", "id": 14, "code": "NO_SEATS", "message": "m", "hint": ""}


def test_the_hot_path_frames_equal_the_encoded_messages() -> None:
    g = Granted(9, "t", "C1", "P", "2.1", 30.0, 10.0, 1.5)
    assert Granted.frame(9, "t", "C1", "P", "2.1", 30.0, 10.0, 1.5) == encode_frame(g.to_wire())
    assert CheckedIn.frame(11, True) == encode_frame(CheckedIn(11, True).to_wire())
    assert CheckedIn.frame(11, False) == encode_frame(CheckedIn(11, False).to_wire())
    lost = LostSeat("tok", ErrorCode.SEAT_REMOVED, "freed")
    for rid in (0, 1, 127, 128, 65535, 2**32 - 1, 2**53):  # every msgpack width of an id
        assert Granted.frame(rid, "t" * 32, "C1", "P", "2.1", 30.0, 10.0, 0.0) == encode_frame(
            Granted(rid, "t" * 32, "C1", "P", "2.1", 30.0, 10.0, 0.0).to_wire())
        assert CheckedIn.frame(rid, True) == encode_frame(CheckedIn(rid, True).to_wire())
        for renewed in (0, 1, 300):
            assert HeartbeatAck.frame(rid, renewed) == encode_frame(HeartbeatAck(rid, renewed).to_wire())
            assert HeartbeatAck.frame(rid, renewed, [lost]) == encode_frame(
                HeartbeatAck(rid, renewed, (lost,)).to_wire())

    # The welcome builder, for the values a daemon's configuration can give (ints or floats of seconds).
    for version, hb, lt, mf in (("1.0.0", 30.0, 90.0, 65536), ("0.9.1+dev", 1, 3, 16), ("", 0.25, 1e9, 2**32)):
        welcome = Welcome.framer(version, hb, lt, mf)
        for rid in (0, 1, 127, 128, 65535, 2**32 - 1, 2**53):
            for proto, session in ((1, 1), (2, 255), (65535, 2**31)):
                assert welcome(rid, proto, session) == encode_frame(
                    Welcome(rid, proto, version, hb, lt, mf, session).to_wire()), (version, rid, proto, session)


# -- special fields -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("protos", [[], [0], [65536], [True], ["1"], [1.0], list(range(1, 18))])
def test_hello_proto_must_list_one_to_sixteen_versions_from_1_to_65535(protos: list[Any]) -> None:
    d = dict(SCHEMA["hello"][1].to_wire(), proto=protos)
    assert refusal("request", d) == f"hello: field 'proto' must list 1 to 16 positive integers, got {shown(protos)}"


def test_hello_proto_limits_are_inclusive_and_missing_or_wrong_type_is_named() -> None:
    base = SCHEMA["hello"][1].to_wire()
    assert parse_request(dict(base, proto=[1, 65535])).proto == (1, 65535)
    assert parse_request(dict(base, proto=list(range(1, 17)))).proto == tuple(range(1, 17))
    del base["proto"]
    assert refusal("request", base) == "hello: missing field 'proto' (a list of protocol version integers)"
    assert refusal("request", dict(base, proto=1)) == (
        "hello: field 'proto' must be a list of protocol version integers, got int 1"
    )


@pytest.mark.parametrize("op", ["heartbeat_ack", "resumed"])
def test_lost_seats_are_read_with_their_code_and_message(op: str) -> None:
    base = SCHEMA[op][1].to_wire()
    lost = [{"token": "t1", "code": "LEASE_EXPIRED", "message": "expired after 30 s"},
            {"token": "t2", "code": "FROM_A_NEWER_SERVER", "message": "m"}]
    got = parse_reply(dict(base, lost=lost)).lost
    assert got == (LostSeat("t1", ErrorCode.LEASE_EXPIRED, "expired after 30 s"),
                   LostSeat("t2", ErrorCode.INTERNAL_ERROR, "m"))
    assert parse_reply({k: v for k, v in base.items() if k != "lost"}).lost == ()
    assert refusal("reply", dict(base, lost="t1")) == f"{op}: field 'lost' must be a list, got str 't1'"
    assert refusal("reply", dict(base, lost=["t1"])) == f"{op}: each item of 'lost' must be a map, got 't1'"
    assert refusal("reply", dict(base, lost=[{"code": "LEASE_EXPIRED", "message": "m"}])) == (
        f"{op}: missing field 'token' (a string of at most 64 characters)"
    )
    assert refusal("reply", dict(base, lost=[{"token": "t" * 65, "code": "X", "message": "m"}])) == (
        f"{op}: field 'token' is 65 characters long; the limit is 64"
    )
    assert refusal("reply", dict(base, lost=[{"token": "t", "code": "C" * 65, "message": "m"}])) == (
        f"{op}: field 'code' is 65 characters long; the limit is 64"
    )
    assert refusal("reply", dict(base, lost=[{"token": "t", "code": "X"}])) == (
        f"{op}: missing field 'message' (a string of at most 4096 characters)"
    )
    long = {"token": "t" * 64, "code": "C" * 64, "message": "m" * 4096}
    assert parse_reply(dict(base, lost=[long])).lost == (LostSeat("t" * 64, ErrorCode.INTERNAL_ERROR, "m" * 4096),)
    assert refusal("reply", dict(base, lost=[dict(long, message="m" * 4097)])) == (
        f"{op}: field 'message' is 4097 characters long; the limit is 4096"
    )


def test_error_reply_codes_are_read_by_name_and_bounded() -> None:
    base = SCHEMA["error"][1].to_wire()
    assert parse_reply(dict(base, code="LEASE_NOT_FOUND")).code is ErrorCode.LEASE_NOT_FOUND
    assert parse_reply(dict(base, code="SOMETHING_NEW")).code is ErrorCode.INTERNAL_ERROR
    assert parse_reply(dict(base, code="C" * 64)).code is ErrorCode.INTERNAL_ERROR
    assert refusal("reply", dict(base, code="C" * 65)) == "error: field 'code' is 65 characters long; the limit is 64"
    del base["code"]
    assert refusal("reply", base) == "error: missing field 'code' (a string of at most 64 characters)"
    assert refusal("reply", dict(base, code=3)) == (
        "error: field 'code' must be a string of at most 64 characters, got int 3"
    )


def test_a_wrong_value_is_quoted_to_sixty_characters() -> None:
    base = SCHEMA["checkout"][1].to_wire()
    bad = list(range(100))
    assert refusal("request", dict(base, product=bad)) == (
        f"checkout: field 'product' must be a string of at most 64 characters, got list {shown(bad)}"
    )


def test_unknown_ops_are_refused_listing_the_known_ones() -> None:
    known_requests = "admin, checkin, checkout, heartbeat, hello, resume, status"
    assert refusal("request", {"op": "fly", "id": 1}) == f"unknown op 'fly'; known ops: {known_requests}"
    assert refusal("request", {"op": b"hello", "id": 1}) == f"unknown op b'hello'; known ops: {known_requests}"
    assert refusal("request", {"op": "granted", "id": 1}) == f"unknown op 'granted'; known ops: {known_requests}"
    assert refusal("request", {"op": "o" * 50}) == f"unknown op {shown('o' * 50, 40)}; known ops: {known_requests}"
    # A decoded map may hold any msgpack value as its op, unhashable ones included.
    assert refusal("request", {"op": ["hello"], "id": 1}) == f"unknown op ['hello']; known ops: {known_requests}"
    known_replies = "checked_in, error, granted, heartbeat_ack, resumed, status, welcome"
    assert refusal("reply", {"op": {"a": 1}}) == f"unknown reply op {{'a': 1}}; known: {known_replies}"
    assert refusal("reply", {"op": "hello", "id": 1}) == f"unknown reply op 'hello'; known: {known_replies}"
    assert refusal("reply", {"id": 1}) == f"unknown reply op None; known: {known_replies}"
    assert refusal("reply", {"op": 5}) == f"unknown reply op 5; known: {known_replies}"
    assert refusal("reply", {"op": "r" * 50}) == f"unknown reply op {shown('r' * 50, 40)}; known: {known_replies}"


def test_status_is_a_request_without_data_and_a_reply_with_it() -> None:
    assert parse_request({"op": "status", "id": 3, "data": {"x": 1}}) == Status(3)
    assert parse_reply({"op": "status", "id": 3}) == StatusReply(3, {})
    assert parse_reply({"op": "status", "id": 3, "data": {"x": [1]}}) == StatusReply(3, {"x": [1]})


def test_hello_fast_path_gives_what_the_checked_readers_give() -> None:
    """Hello.from_wire's exact-type path (once per connection) accepts only what the checked readers accept,
    with the same values; everything at or past a limit is refused the same way."""
    secret = "s" * 22
    base = {"op": "hello", "id": 7, "proto": [1, 2], "host": "pc1", "user": "alice", "pid": 42,
            "client_version": "1.0", "display": ":0", "secret": secret}
    assert Hello.from_wire(base) == Hello(7, (1, 2), "pc1", "alice", 42, "1.0", ":0", secret)
    bare = {k: v for k, v in base.items() if k not in ("client_version", "display", "secret")}
    assert Hello.from_wire(dict(bare, proto=[1])) == Hello(7, (1,), "pc1", "alice", 42, "", "", "")
    assert Hello.from_wire(dict(base, proto=[1])).secret == secret  # a secret without protocol 2 is kept
    for key, value in (("id", MAX_ID), ("pid", 2**32), ("host", "h" * MAX_TEXT), ("secret", "s" * 128),
                       ("proto", list(range(1, 17))), ("proto", [65535, 2])):
        got = getattr(Hello.from_wire(dict(base, **{key: value})), key)
        assert got == (tuple(value) if isinstance(value, list) else value), (key, got)
    for bad in ({"id": True}, {"id": -1}, {"id": MAX_ID + 1}, {"proto": []}, {"proto": [True]}, {"proto": [0]},
                {"proto": [1.0]}, {"proto": list(range(1, 18))}, {"proto": (1,)}, {"host": "h" * (MAX_TEXT + 1)},
                {"user": None}, {"pid": 2**32 + 1}, {"pid": False}, {"client_version": 1}, {"display": b":0"},
                {"secret": "s" * 21}, {"secret": "s" * 129}, {"secret": ""}, {"secret": 5}):
        with pytest.raises(MalformedMessage):
            Hello.from_wire(dict(base, **bad))
    with pytest.raises(MalformedMessage, match="secret"):
        Hello.from_wire({k: v for k, v in base.items() if k != "secret"})  # protocol 2 needs one
    with pytest.raises(MalformedMessage, match="secret"):
        Hello.from_wire(dict(base, proto=[1], secret="s" * 21))  # a short one is refused even on protocol 1


# -- the hot lane: hot_request / HOT_REQUESTS against parse_request ------------------------------------------




_CO: dict[str, Any] = {"op": "checkout", "id": 5, "product": "CADPRO", "version": "2.1"}
_CI: dict[str, Any] = {"op": "checkin", "id": 6, "token": "t1"}
_HB: dict[str, Any] = {"op": "heartbeat", "id": 7}

# Maps in exactly the hot shape, at every limit the predicates check: hot_request must take each (the daemon's
# fast lane), and parse_request must build the same message from it.
HOT_SHAPES: list[tuple[dict[str, Any], type]] = [
    (_CO, Checkout), (dict(_CO, wait=0.0), Checkout), (dict(_CO, wait=MAX_WAIT_SECONDS), Checkout),
    (dict(_CO, wait=2.5), Checkout), (dict(_CO, id=0), Checkout), (dict(_CO, id=MAX_ID), Checkout),
    (dict(_CO, product="p" * 64), Checkout), (dict(_CO, version="v" * MAX_VERSION_LENGTH), Checkout),
    (dict(_CO, product="", version=""), Checkout),
    (_CI, Checkin), (dict(_CI, id=0), Checkin), (dict(_CI, id=MAX_ID), Checkin), (dict(_CI, token="t" * 64), Checkin),
    (dict(_CI, token=""), Checkin),
    (_HB, Heartbeat), (dict(_HB, idle=False), Heartbeat), (dict(_HB, idle=True), Heartbeat),
    (dict(_HB, id=0), Heartbeat), (dict(_HB, id=MAX_ID), Heartbeat),
]

# Maps the hot lane must decline: a field of another type or past its limit, a key more or less, an idle_for.
# parse_request then decides (a refusal naming the field, or a message the checked readers build).
NOT_HOT: list[dict[str, Any]] = [
    dict(_CO, id=-1), dict(_CO, id=MAX_ID + 1), dict(_CO, id=True), dict(_CO, id=5.0),
    dict(_CO, product="p" * 65), dict(_CO, product=b"CADPRO"), dict(_CO, version="v" * (MAX_VERSION_LENGTH + 1)),
    dict(_CO, version=2.1), dict(_CO, wait=0), dict(_CO, wait=-0.5), dict(_CO, wait=MAX_WAIT_SECONDS + 0.5),
    dict(_CO, wait=math.nan), dict(_CO, extra=1), dict(_CO, wait=0.0, extra=1),
    {k: v for k, v in _CO.items() if k != "version"}, {k: v for k, v in _CO.items() if k != "product"},
    {k: v for k, v in _CO.items() if k != "id"},
    dict(_CI, id=-1), dict(_CI, id=MAX_ID + 1), dict(_CI, id=False), dict(_CI, token="t" * 65), dict(_CI, token=1),
    dict(_CI, extra=1), {"op": "checkin", "id": 6}, {"op": "checkin", "token": "t1", "x": 6},
    dict(_HB, id=-1), dict(_HB, id=MAX_ID + 1), dict(_HB, id=True), dict(_HB, idle=1), dict(_HB, idle=None),
    dict(_HB, idle_for=2.0), dict(_HB, idle=True, idle_for=2.0), dict(_HB, extra=1), dict(_HB, idle=True, extra=1),
    {"op": "heartbeat", "idle": True}, {"op": "heartbeat", "x": 7},
    dict(_CO, op="hello"), dict(_CO, op="status"), dict(_CO, op=b"checkout"), dict(_CI, op=["checkin"]),
    dict(_HB, op=None), {k: v for k, v in _HB.items() if k != "op"},
]


@pytest.mark.parametrize("d, kind", HOT_SHAPES, ids=[repr(d) for d, _ in HOT_SHAPES])
def test_hot_request_takes_every_map_in_the_hot_shape_and_parse_request_agrees(d: dict[str, Any], kind: type) -> None:
    assert hot_request(d) is kind
    assert HOT_REQUESTS[d["op"]][0] is kind and HOT_REQUESTS[d["op"]][1](d) is True
    msg = parse_request(d)
    assert type(msg) is kind and msg == hot_fields(kind, d)
    # the exact-type path of from_wire gives the same message, field types included
    assert [type(getattr(msg, f)) for f in msg.__slots__] == [  # type: ignore[union-attr]
        type(getattr(hot_fields(kind, d), f)) for f in msg.__slots__]  # type: ignore[union-attr]


@pytest.mark.parametrize("d", NOT_HOT, ids=[repr(d)[:80] for d in NOT_HOT])
def test_hot_request_declines_every_map_outside_the_hot_shape(d: dict[str, Any]) -> None:
    assert hot_request(d) is None
    entry = HOT_REQUESTS.get(d["op"]) if type(d.get("op")) is str else None
    if entry is not None:
        assert entry[1](d) is False


def test_the_hot_table_names_exactly_the_three_hot_requests() -> None:
    assert {op: kind for op, (kind, _) in HOT_REQUESTS.items()} == {
        "checkout": Checkout, "checkin": Checkin, "heartbeat": Heartbeat}


def test_the_checked_path_reads_what_the_hot_lane_declines() -> None:
    """Declined maps still parse exactly (the checked readers), or are refused naming the field."""
    assert parse_request(dict(_CO, wait=0)) == Checkout(5, "CADPRO", "2.1", 0.0)
    assert type(parse_request(dict(_CO, wait=0)).wait) is float  # type: ignore[union-attr]
    assert parse_request(dict(_CO, wait=3)) == Checkout(5, "CADPRO", "2.1", 3.0)
    assert parse_request(dict(_CO, extra=1)) == Checkout(5, "CADPRO", "2.1", 0.0)
    assert parse_request(dict(_HB, idle_for=2.0)) == Heartbeat(7, False, 2.0)
    assert parse_request(dict(_HB, idle=True, idle_for=2.0)) == Heartbeat(7, True, 2.0)
    assert parse_request(dict(_HB, extra=1)) == Heartbeat(7, False, 0.0)
    assert parse_request(dict(_CI, extra=1)) == Checkin(6, "t1")
    assert refusal("request", dict(_HB, idle=1)) == "heartbeat: field 'idle' must be true or false, got int 1"
    assert refusal("request", dict(_CO, wait=-0.5)) == (
        f"checkout: field 'wait' must be from 0 to {MAX_WAIT_SECONDS:g} seconds, got -0.5")
    assert refusal("request", dict(_CI, token="t" * 65)) == (
        "checkin: field 'token' is 65 characters long; the limit is 64")


# -- unknown keys never stand in for known ones; the checked path's defaults -----------------------------------

_HELLO_KEYS = ("id", "proto", "host", "user", "pid", "client_version", "display", "secret")


def _look_alikes(keys: tuple[str, ...]) -> dict[str, Any]:
    """Unknown keys that resemble the known ones (another case, wrapped, the empty key), with values that would
    make a different (still valid) message if any were read in place of the real field."""
    values: dict[str, Any] = {"id": 99, "proto": [3], "host": "other", "user": "mallory", "pid": 1234,
                              "client_version": "evil", "display": ":9", "secret": "x" * 40}
    out: dict[str, Any] = {"": "y" * 40}
    for key in keys:
        out[key.upper()] = values[key]
        out[f"XX{key}XX"] = values[key]
    return out


@pytest.mark.parametrize("drop", [(), ("client_version",), ("display",), ("client_version", "display")])
def test_hello_reads_each_field_by_its_exact_name_only(drop: tuple[str, ...]) -> None:
    hello = SAMPLES["hello"]
    d = {k: v for k, v in hello.to_wire().items() if k not in drop}
    want = parse_request(d)
    assert want == Hello(hello.id, hello.proto, hello.host, hello.user, hello.pid,
                         "" if "client_version" in drop else hello.client_version,
                         "" if "display" in drop else hello.display, hello.secret)
    assert parse_request(dict(d, **_look_alikes(_HELLO_KEYS))) == want


def test_a_hello_without_a_secret_is_not_given_one_from_an_unknown_key() -> None:
    base = {k: v for k, v in SAMPLES["hello"].to_wire().items() if k != "secret"}
    assert refusal("request", dict(base, **_look_alikes(_HELLO_KEYS))) == (
        "hello: missing field 'secret' (a string of at most 128 characters)")
    got = parse_request(dict(base, proto=[1], **_look_alikes(_HELLO_KEYS)))
    assert isinstance(got, Hello) and got.secret == "" and got.proto == (1,)


class _Name(str):
    """A str subclass: valid for the checked readers (isinstance), never taken by the exact-type paths."""


class _Id(int):
    """An int subclass (not bool): likewise."""


def test_the_checked_path_gives_the_documented_defaults() -> None:
    # Maps the exact-type predicates decline although every field is valid, so the checked readers build the
    # message: a left-out optional field takes its default there too.
    got = parse_request({"op": "checkout", "id": 5, "product": _Name("CADPRO"), "version": "2.1"})
    assert got == Checkout(5, "CADPRO", "2.1", 0.0) and type(got.wait) is float  # type: ignore[union-attr]
    got = parse_request({"op": "checkout", "id": _Id(5), "product": "CADPRO", "version": "2.1"})
    assert got == Checkout(5, "CADPRO", "2.1", 0.0)
    got = parse_request({"op": "heartbeat", "id": _Id(7)})
    assert got == Heartbeat(7, False, 0.0) and type(got.idle_for) is float  # type: ignore[union-attr]
    got = parse_request({"op": "heartbeat", "id": _Id(7), "idle": True})
    assert got == Heartbeat(7, True, 0.0)
    assert parse_request({"op": "checkin", "id": _Id(6), "token": "t1"}) == Checkin(6, "t1")


def test_granted_frames_equal_the_encoded_message_for_new_pools_and_timings() -> None:
    # Granted.frame caches the encoded pool names and timing: clear the caches so this test's frames are built,
    # not found (earlier tests in this process may have put the same values there).
    from protocol import messages

    messages._GRANTED_POOLS.clear()
    messages._GRANTED_TAILS.clear()
    for args in (("t", "C1", "P", "2.1", 30.0, 10.0, 1.5), ("tok", "C2", "Q", "1", 90.0, 30.0, 0.0),
                 ("tok", "C2", "Q", "1", 90.0, 30.0, 0.0), ("u", "C1", "P", "3", 30.0, 10.0, 1.5)):
        assert Granted.frame(7, *args) == encode_frame(Granted(7, *args).to_wire()), args  # type: ignore[arg-type]
    assert len(messages._GRANTED_POOLS) == 2 and len(messages._GRANTED_TAILS) == 2


def test_granted_frame_caches_stay_bounded_and_correct() -> None:
    from protocol import messages

    limit = messages._GRANTED_PARTS_LIMIT
    messages._GRANTED_POOLS.clear()
    messages._GRANTED_TAILS.clear()
    for i in range(limit + 1):
        Granted.frame(1, "t", f"C{i}", "P", "1", 30.0, 10.0, float(i))
        assert len(messages._GRANTED_POOLS) <= limit and len(messages._GRANTED_TAILS) <= limit
    assert len(messages._GRANTED_POOLS) == 1 and len(messages._GRANTED_TAILS) == 1  # cleared at the limit
    assert Granted.frame(2, "t", "C0", "P", "1", 30.0, 10.0, 0.0) == encode_frame(
        Granted(2, "t", "C0", "P", "1", 30.0, 10.0, 0.0).to_wire())


def test_hello_checked_path_reads_every_field_and_default_exactly() -> None:
    # host is a str subclass: valid for the checked readers, declined by the exact-type path, so each of these
    # is built by the checked readers alone.
    host = _Name("pc1")
    secret = "s" * 22  # MIN_SECRET_LENGTH: the shortest secret accepted
    full = {"op": "hello", "id": 7, "proto": [1, 2], "host": host, "user": "alice", "pid": 42,
            "client_version": "1.0", "display": ":0", "secret": secret}
    assert parse_request(full) == Hello(7, (1, 2), "pc1", "alice", 42, "1.0", ":0", secret)
    bare = {"op": "hello", "id": 7, "proto": [1], "host": host, "user": "alice", "pid": 42}
    got = parse_request(bare)
    assert got == Hello(7, (1,), "pc1", "alice", 42, "", "", "")
    assert isinstance(got, Hello)
    assert (type(got.proto), type(got.client_version), type(got.display), type(got.secret)) == (tuple, str, str, str)
    assert parse_request(dict(bare, secret=secret)).secret == secret  # type: ignore[union-attr]
    assert parse_request(dict(bare, secret="s" * 128)).secret == "s" * 128  # type: ignore[union-attr]
    assert parse_request(dict(bare, proto=list(range(1, 17)), secret=secret)).proto == tuple(  # type: ignore[union-attr]
        range(1, 17))
    assert parse_request(dict(bare, proto=[65535])).proto == (65535,)  # type: ignore[union-attr]
    assert refusal("request", dict(bare, proto=list(range(1, 18)))) == (
        f"hello: field 'proto' must list 1 to 16 positive integers, got {shown(list(range(1, 18)))}")


def test_a_protocol_1_hello_refuses_a_bad_secret_by_name() -> None:
    base = {k: v for k, v in SAMPLES["hello"].to_wire().items() if k != "secret"}
    base["proto"] = [1]
    assert refusal("request", dict(base, secret=5)) == (
        "hello: field 'secret' must be a string of at most 128 characters, got int 5")
    assert refusal("request", dict(base, secret="s" * 129)) == (
        "hello: field 'secret' is 129 characters long; the limit is 128")
    assert refusal("request", dict(base, secret="s" * 21)) == (
        "hello: field 'secret' is 21 characters long; at least 22 are required (128 random bits)")
    assert parse_request(dict(base, secret="s" * 22)).secret == "s" * 22  # type: ignore[union-attr]
