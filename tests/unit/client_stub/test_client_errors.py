"""LicenseError and its subclasses: stable codes, a message that says what to do, the right class per code."""

from __future__ import annotations

import pickle

import pytest

from client_stub import LicenseError, LicenseLost, ProtocolMismatch, SeatDenied, ServerUnavailable
from client_stub.errors import error_for
from protocol import RETRYABLE, ErrorCode


def test_str_says_what_happened_and_what_to_do() -> None:
    e = SeatDenied(ErrorCode.NO_SEATS, "all 3 seats of CADPRO are in use")
    assert e.code is ErrorCode.NO_SEATS
    assert str(e).startswith("NO_SEATS: all 3 seats of CADPRO are in use")
    assert "wait=SECONDS" in str(e)  # the default hint for the code
    e2 = LicenseError(ErrorCode.NO_SEATS, "m", "ask Bob")
    assert e2.hint == "ask Bob" and "What to do: ask Bob" in str(e2)


@pytest.mark.parametrize(("code", "cls"), [
    (ErrorCode.SERVER_UNAVAILABLE, ServerUnavailable),
    (ErrorCode.SHUTTING_DOWN, ServerUnavailable),
    (ErrorCode.TOO_MANY_CONNECTIONS, ServerUnavailable),
    (ErrorCode.HANDSHAKE_TIMEOUT, ServerUnavailable),
    (ErrorCode.UNSUPPORTED_PROTOCOL, ProtocolMismatch),
    (ErrorCode.UNEXPECTED_MESSAGE, ProtocolMismatch),
    (ErrorCode.NO_SEATS, SeatDenied),
    (ErrorCode.VERSION_NOT_PERMITTED, SeatDenied),
])
def test_error_for_picks_the_class(code: ErrorCode, cls: type[LicenseError]) -> None:
    e = error_for(code, "msg", "", decision=SeatDenied)
    assert type(e) is cls and e.code is code
    assert e.retryable is (cls is ServerUnavailable)


def test_decision_class_follows_the_context() -> None:
    assert type(error_for(ErrorCode.SEAT_REMOVED, "m", decision=LicenseLost)) is LicenseLost
    assert type(error_for(ErrorCode.NOT_AUTHORIZED, "m")) is LicenseError


@pytest.mark.parametrize("err", [
    ServerUnavailable("down", "start it", ErrorCode.SHUTTING_DOWN),
    SeatDenied(ErrorCode.NO_SEATS, "full", "wait"),
    LicenseLost(ErrorCode.LEASE_EXPIRED, "gone"),
])
def test_errors_pickle(err: LicenseError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert (back.code, back.message, back.hint) == (err.code, err.message, err.hint)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_retryable_is_exactly_protocol_retryable(code: ErrorCode) -> None:
    """One retryable set: the client retries a code if and only if ``protocol.RETRYABLE`` lists it."""
    for decision in (LicenseError, SeatDenied, LicenseLost):
        assert error_for(code, "m", decision=decision).retryable is (code in RETRYABLE), code
