"""Capped exponential backoff with full jitter.

Imports only the standard library; no asyncio, no clock, never ``lmgrd``. The caller sleeps. Which errors
are worth retrying is ``LicenseError.retryable`` (the codes of :data:`protocol.RETRYABLE`).

Full jitter (the redis-py ``FullJitterBackoff`` model): the n-th retry waits a uniformly random time in
``[0, min(cap, base * 2**n))``. The randomness spreads thousands of clients that lost the same server at
the same moment over the whole window, so the restarted daemon is not hit by one synchronized wave.
"""

from __future__ import annotations

import random
from typing import Protocol

__all__ = ["Backoff", "SupportsRandom"]

# 2**63 overflows nothing as a float, but beyond ~60 doublings every ceiling is the cap anyway.
_MAX_EXPONENT = 60


class SupportsRandom(Protocol):
    """Anything with ``random() -> float`` in ``[0, 1)``, such as :class:`random.Random`."""

    def random(self) -> float: ...


class Backoff:
    """Capped exponential backoff with full jitter.

    Args:
        base: ceiling of the first delay, seconds (> 0).
        cap: largest ceiling, seconds (>= base).
        rng: source of uniform numbers in ``[0, 1)``; a fresh :class:`random.Random` by default. Inject a
            seeded one (or any object with ``random()``) to make delays reproducible in tests.

    Raises:
        ValueError: ``base`` or ``cap`` is not a positive finite number, or ``cap < base``.
    """

    __slots__ = ("_rng", "base", "cap")

    def __init__(self, base: float = 0.2, cap: float = 10.0, rng: SupportsRandom | None = None) -> None:
        for name, value in (("base", base), ("cap", cap)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ValueError(f"backoff {name} must be a positive number of seconds, got {value!r}")
        if cap < base:
            raise ValueError(f"backoff cap ({cap!r} s) must be at least its base ({base!r} s)")
        self.base = float(base)
        self.cap = float(cap)
        self._rng: SupportsRandom = rng if rng is not None else random.Random()

    def ceiling(self, attempt: int) -> float:
        """The largest delay of retry number ``attempt`` (0 for the first): ``min(cap, base * 2**attempt)``.

        Raises:
            ValueError: ``attempt`` is negative.
        """
        if attempt < 0:
            raise ValueError(f"attempt must be 0 or more, got {attempt!r}")
        return min(self.cap, self.base * 2.0 ** min(attempt, _MAX_EXPONENT))

    def delay(self, attempt: int) -> float:
        """A random delay in ``[0, ceiling(attempt)]`` for retry number ``attempt``.

        An rng that returns values outside ``[0, 1)`` is clamped, so the bound holds whatever is injected.
        """
        fraction = min(1.0, max(0.0, self._rng.random()))
        return fraction * self.ceiling(attempt)

