"""Refusals under attack: counted always, logged at a bounded rate.

A hostile or broken client can make the daemon refuse thousands of things a second (bad requests, requests
over the per-connection rate limit, connections over the per-address cap, hellos that never come, tokens
it does not hold). Each refusal is counted in :class:`RefusalCounts` (exported by
:mod:`lmgrd.monitoring.metrics`), and :class:`RefusalLog` writes at most :data:`LOG_LINES` lines per kind of
refusal every :data:`LOG_INTERVAL` seconds; the rest become one summary line per interval ("suppressed K
more ..."). One INFO line per bad request once made 47 MB of log in 32 s of garbage; now a flood costs a
few lines a minute.

Imports only the standard library; the server passes its clock and ``call_later``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LOG_INTERVAL", "LOG_LINES", "RefusalCounts", "RefusalLog"]

logger = logging.getLogger("lmgrd.daemon.refusals")

#: Lines of one kind of refusal logged per interval; later ones in the interval are only counted.
LOG_LINES = 10
#: The interval, seconds.
LOG_INTERVAL = 10.0


@dataclass(slots=True)
class RefusalCounts:
    """Refusals since start, by kind (metrics read them at scrape time; the loop thread bumps them)."""

    #: (request, reason) -> n: a checkin or resume naming a lease this client does not hold
    #: (reason ``not_holder``) or no lease at all (``unknown``: lapsed, checked in, or guessed).
    token_refusals: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Requests answered RATE_LIMITED (over the per-connection request rate).
    rate_limited: int = 0
    #: Well-framed requests that failed the schema (answered BAD_REQUEST).
    bad_requests: int = 0
    #: reason -> connections refused at accept: ``per_address_limit``, ``shutting_down``.
    connection_refusals: dict[str, int] = field(default_factory=dict)
    #: Connections that held no seat and sent nothing for ``idle_connection_timeout``.
    idle_closed: int = 0
    #: Log lines of refusals not written because of the rate limit (summarised instead).
    log_suppressed: int = 0

    def token(self, request: str, reason: str) -> None:
        key = (request, reason)
        self.token_refusals[key] = self.token_refusals.get(key, 0) + 1

    def connection(self, reason: str) -> None:
        self.connection_refusals[reason] = self.connection_refusals.get(reason, 0) + 1


class _Window:
    __slots__ = ("logged", "start", "suppressed", "timer")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0
        self.timer: Any = None


class RefusalLog:
    """Log refusals of each kind at most ``lines`` times per ``interval`` seconds, then summarise.

    Args:
        clock: monotonic seconds (the server's loop time).
        call_later: ``loop.call_later``: the summary of an interval is written when it ends, even if the
            flood stopped in the middle of it.
        counts: where suppressed lines are counted (``log_suppressed``).
    """

    __slots__ = ("_call_later", "_clock", "_windows", "counts", "interval", "lines")

    def __init__(self, clock: Callable[[], float], call_later: Callable[..., Any], counts: RefusalCounts, *,
                 lines: int = LOG_LINES, interval: float = LOG_INTERVAL) -> None:
        self._clock = clock
        self._call_later = call_later
        self.counts = counts
        self.lines = lines
        self.interval = interval
        self._windows: dict[str, _Window] = {}

    def __call__(self, kind: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``kind`` already had its lines this interval.

        Returns:
            True if the line was written.
        """
        if not logger.isEnabledFor(level):
            return False
        now = self._clock()
        w = self._windows.get(kind)
        if w is None or now >= w.start + self.interval:
            if w is not None:
                self._summarise(kind, w)
            w = self._windows[kind] = _Window(now)
        if w.logged < self.lines:
            w.logged += 1
            logger.log(level, msg, *args)
            return True
        w.suppressed += 1
        self.counts.log_suppressed += 1
        if w.timer is None:
            w.timer = self._call_later(max(0.0, w.start + self.interval - now), self._summarise, kind, w)
        return False

    def _summarise(self, kind: str, w: _Window) -> None:
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        if w.suppressed:
            logger.warning("suppressed %d more line(s) of %s in %g s (each is counted in the metrics)",
                           w.suppressed, kind, self.interval)
            w.suppressed = 0

    def close(self) -> None:
        """Write the pending summaries now (at shutdown)."""
        for kind, w in list(self._windows.items()):
            self._summarise(kind, w)
