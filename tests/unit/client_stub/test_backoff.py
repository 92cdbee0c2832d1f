"""Backoff: capped exponential ceilings, full jitter inside them, an injectable rng."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client_stub.backoff import Backoff
from client_stub.errors import LicenseError, SeatDenied, ServerUnavailable
from protocol import ErrorCode


class Fixed:
    """An rng that returns the given values in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_ceilings_double_then_cap() -> None:
    b = Backoff(base=0.5, cap=3.0)
    assert [b.ceiling(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.ceiling(10_000) == 3.0  # no overflow for huge attempt numbers


def test_full_jitter_spans_zero_to_ceiling() -> None:
    b = Backoff(base=1.0, cap=8.0, rng=Fixed(0.0, 0.5, 0.999, 0.25))
    assert b.delay(0) == 0.0
    assert b.delay(1) == 1.0  # 0.5 * 2
    assert b.delay(2) == pytest.approx(0.999 * 4)
    assert b.delay(9) == 2.0  # 0.25 * cap


def test_out_of_range_rng_is_clamped() -> None:
    b = Backoff(base=1.0, cap=4.0, rng=Fixed(-3.0, 7.0))
    assert b.delay(1) == 0.0
    assert b.delay(1) == 2.0


def test_seeded_rng_is_reproducible() -> None:
    a = Backoff(0.1, 5.0, rng=random.Random(42))
    b = Backoff(0.1, 5.0, rng=random.Random(42))
    assert [a.delay(n) for n in range(20)] == [b.delay(n) for n in range(20)]


@settings(max_examples=200, deadline=None)
@given(base=st.floats(0.001, 10.0), extra=st.floats(0.0, 100.0), attempt=st.integers(0, 200),
       u=st.floats(0.0, 1.0, exclude_max=True))
def test_delay_is_within_bounds(base: float, extra: float, attempt: int, u: float) -> None:
    cap = base + extra
    d = Backoff(base, cap, rng=Fixed(u)).delay(attempt)
    assert 0.0 <= d <= min(cap, base * 2.0 ** min(attempt, 60))


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (-1, 1), (1, 0.5), (float("nan"), 1), (1, float("inf")),
                                           (True, 2)])
def test_bad_settings_are_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base, cap)


def test_negative_attempt_is_refused() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().ceiling(-1)


def test_only_declared_errors_are_retryable() -> None:
    assert ServerUnavailable("down").retryable
    assert ServerUnavailable("busy", code=ErrorCode.TOO_MANY_CONNECTIONS).retryable
    assert not SeatDenied(ErrorCode.NO_SEATS, "all in use").retryable
    assert not LicenseError(ErrorCode.LICENSE_INVALID, "bad").retryable
