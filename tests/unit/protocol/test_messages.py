"""Message schema: every field validated by name, type and range; unknown ops refused; replies round-trip."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    Checkin,
    Checkout,
    ErrorCode,
    Heartbeat,
    Hello,
    MalformedMessage,
    Resume,
    Status,
    parse_reply,
    parse_request,
)
from protocol.make_vectors import EXAMPLES
from protocol.samples import REQUESTS
from protocol.validation import MAX_TEXT, MAX_TOKENS, MAX_WAIT_SECONDS

HELLO = {"op": "hello", "id": 1, "proto": [1], "host": "pc1", "user": "alice", "pid": 7}


@pytest.mark.parametrize("raw, words", [
    ({"op": "fly", "id": 1}, "unknown op 'fly'"),
    ({"id": 1}, "unknown op None"),
    ({"op": 3, "id": 1}, "unknown op 3"),
    ({"op": "checkout", "id": 1, "version": "2.1"}, "'product'"),
    ({"op": "checkout", "id": "1", "product": "P", "version": "2.1"}, "'id'"),
    ({"op": "checkout", "id": True, "product": "P", "version": "2.1"}, "'id'"),
    ({"op": "checkout", "id": -1, "product": "P", "version": "2.1"}, "'id'"),
    ({"op": "checkout", "id": 1, "product": 5, "version": "2.1"}, "'product'"),
    ({"op": "checkout", "id": 1, "product": "P" * (MAX_TEXT + 1), "version": "2.1"}, "limit is"),
    ({"op": "checkout", "id": 1, "product": "P", "version": "2.1", "wait": -1}, "'wait'"),
    ({"op": "checkout", "id": 1, "product": "P", "version": "2.1", "wait": float("nan")}, "'wait'"),
    ({"op": "checkout", "id": 1, "product": "P", "version": "2.1", "wait": MAX_WAIT_SECONDS + 1}, "'wait'"),
    ({"op": "heartbeat", "id": 1, "idle": "yes"}, "'idle'"),
    ({"op": "heartbeat", "id": 1, "idle": True, "idle_for": -5}, "'idle_for'"),
    ({"op": "checkin", "id": 1, "token": "t" * 65}, "'token'"),
    ({"op": "resume", "id": 1, "tokens": "abc"}, "'tokens'"),
    ({"op": "resume", "id": 1, "tokens": ["a", 2]}, "'tokens[1]'"),
    ({"op": "resume", "id": 1, "tokens": ["a"] * (MAX_TOKENS + 1)}, "limit is"),
    ({**HELLO, "proto": []}, "'proto'"),
    ({**HELLO, "proto": [True]}, "'proto'"),
    ({**HELLO, "pid": 2**33}, "'pid'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_requests_name_the_field(raw: dict[str, Any], words: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_request(raw)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert words in info.value.message, info.value.message


def test_optional_fields_take_their_defaults() -> None:
    assert parse_request({"op": "checkout", "id": 4, "product": "P", "version": "1"}) == Checkout(4, "P", "1", 0.0)
    assert parse_request({"op": "heartbeat", "id": 5}) == Heartbeat(5, False, 0.0)
    assert parse_request(HELLO) == Hello(1, (1,), "pc1", "alice", 7, "", "")


def test_heartbeat_idle_for_is_sent_only_when_set() -> None:
    assert "idle_for" not in Heartbeat(1, True).to_wire()
    wire = Heartbeat(1, True, 1000.0).to_wire()
    assert wire["idle_for"] == 1000.0 and parse_request(wire) == Heartbeat(1, True, 1000.0)


ids = st.integers(0, 2**63 - 1)


@given(st.one_of(
    st.builds(Checkout, ids, st.text(min_size=1, max_size=64), st.text(min_size=1, max_size=32),
              st.floats(0, MAX_WAIT_SECONDS)),
    st.builds(Heartbeat, ids, st.booleans(), st.floats(0, 1e6)),
    st.builds(Checkin, ids, st.text(max_size=64)),
    st.builds(Resume, ids, st.lists(st.text(max_size=64), max_size=20).map(tuple)),
    st.builds(Status, ids),
))
def test_requests_round_trip(msg: Any) -> None:
    assert parse_request(msg.to_wire()) == msg


@pytest.mark.parametrize("name, msg", [(n, m) for n, m in EXAMPLES
                                       if not isinstance(m, tuple({type(r) for r in REQUESTS.values()}))])
def test_replies_round_trip(name: str, msg: Any) -> None:
    assert parse_reply(msg.to_wire()) == msg


def test_an_unknown_error_code_from_a_newer_server_keeps_its_message() -> None:
    reply = parse_reply({"op": "error", "id": 1, "code": "NOT_A_CODE_YET", "message": "x happened"})
    assert reply.code is ErrorCode.INTERNAL_ERROR and reply.message == "x happened"


# --------------------------------------------------------------------------- hello's secret (protocol 2)
def test_a_hello_offering_protocol_2_needs_a_secret_of_at_least_128_bits() -> None:
    from protocol import MalformedMessage, parse_request
    from protocol.messages import Hello as HelloMsg
    from protocol.validation import MAX_SECRET_LENGTH, MIN_SECRET_LENGTH

    base = {"op": "hello", "id": 1, "host": "pc1", "user": "alice", "pid": 7, "client_version": "t"}
    ok = parse_request({**base, "proto": [1, 2], "secret": "k" * MIN_SECRET_LENGTH})
    assert isinstance(ok, HelloMsg) and ok.secret == "k" * MIN_SECRET_LENGTH
    assert parse_request({**base, "proto": [1]}).secret == ""  # protocol 1: none, as before
    assert parse_request({**base, "proto": [7, 8]}).secret == ""  # a future client: left to negotiation
    for d, words in [
        ({**base, "proto": [1, 2]}, "missing field 'secret'"),
        ({**base, "proto": [2], "secret": ""}, "'secret' is empty"),
        ({**base, "proto": [2], "secret": "k" * (MIN_SECRET_LENGTH - 1)}, f"at least {MIN_SECRET_LENGTH}"),
        ({**base, "proto": [2], "secret": "k" * (MAX_SECRET_LENGTH + 1)}, f"the limit is {MAX_SECRET_LENGTH}"),
        ({**base, "proto": [1], "secret": "short-but-secret"}, f"at least {MIN_SECRET_LENGTH}"),
    ]:
        with pytest.raises(MalformedMessage) as info:
            parse_request(d)
        assert words in info.value.message, info.value.message
        assert "short-but-secret" not in info.value.message and "kkkk" not in info.value.message  # never echoed
    hello = HelloMsg(1, (1, 2), "pc1", "alice", 7, "t", "", "the-secret-value-0123456789")
    assert "the-secret-value" not in repr(hello)
    assert "secret" not in HelloMsg(1, (1,), "pc1", "alice", 7, "t").to_wire()  # protocol 1 bytes unchanged
