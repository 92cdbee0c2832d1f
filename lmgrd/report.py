"""``lmutil report``: how many seats should we buy? Read from the daemon's usage log (:mod:`lmgrd.monitoring.usage`).

Runs on the log files alone (plain, rotated ``.1`` .. ``.N`` or gzip-compressed ``.gz``), with no connection
to a daemon. For each pool (customer ID and product) over the period (``--since`` .. ``--until``, default the
first to the last event):

- *seats in use* over time, from the ``in_use`` each checkout and release line carries (seats, not leases:
  processes sharing a seat count once); a line without it counts +1 / -1;
- *peak*: the most seats in use at any moment; *95th percentile*, time-weighted: the fewest seats that
  covered the use 95 % of the period;
- *hours at the limit*: time with every licensed seat in use (the count comes from the checkout lines);
- denials by reason, total checkouts, top users by seat-hours (a user's overlapping leases on one host
  count once, as their seat does);
- a one-line recommendation.

The level before a pool's first line in the period is what the lines before ``--since`` left it at, or 0
when the log starts inside the period. ``--plot`` draws seats in use against the count (matplotlib, Agg).
matplotlib is the optional ``report`` extra (``pip install 'lmgrd[report]'``), not a dependency of the daemon:
it is imported inside :func:`write_plot` only, and ``--plot`` without it is refused up front (exit 2, the
message names the extra) before any output. Never imports ``client_stub``.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lmgrd.i18n import Text, gettext_, tr

__all__ = ["PLOT_EXTRA", "PoolReport", "Report", "ReportError", "add_report_arguments", "build_report",
           "format_text", "load_events", "parse_date", "plot_unavailable", "run_report", "write_plot"]

RELEASES = frozenset({"checkin", "expiry", "removal", "revoked", "unrecorded"})
#: How to get what --plot needs.
PLOT_EXTRA = "pip install 'lmgrd[report]'"
TOP_USERS = 10
PERCENTILE = 0.95


class ReportError(Exception):
    """The report cannot be made (unreadable file, bad date); the message says which and what to do."""


# --------------------------------------------------------------------------- reading
def _open(path: Path) -> Iterator[str]:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            yield from f
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def load_events(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], int]:
    """Every usage line of ``paths``, in time order (stable: equal times keep file order), and how many
    lines were skipped as not usage events (damaged, truncated by a crash, or another format).

    Raises:
        ReportError: a file cannot be read.
    """
    events: list[dict[str, Any]] = []
    skipped = 0
    seen: set[Path] = set()
    for p in paths:
        path = Path(p)
        if path.resolve() in seen:  # the same file named twice (a glob and a name) would count twice
            continue
        seen.add(path.resolve())
        try:
            for line in _open(path):
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                except ValueError:
                    skipped += 1
                    continue
                if not _usable(e):
                    skipped += 1
                    continue
                events.append(e)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ReportError(f"cannot read the usage log {path}: {getattr(exc, 'strerror', None) or exc}; give "
                              "the daemon's usage_log file (and its rotated .1, .2 ... files)") from None
    events.sort(key=lambda e: e["epoch"])
    return events, skipped


def _usable(e: Any) -> bool:
    if not isinstance(e, dict) or not isinstance(e.get("event"), str):
        return False
    epoch = e.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int | float) or not math.isfinite(epoch):
        ts = e.get("ts")
        if not isinstance(ts, str):
            return False
        try:
            e["epoch"] = parse_date(ts).timestamp()
        except ReportError:
            return False
    if e["event"] == "dropped":
        return True
    return isinstance(e.get("product"), str)


def parse_date(text: str, *, end_of_day: bool = False) -> datetime:
    """``2024-04-01``, ``2024-04-01T09:30``, ``2024-04-01 09:30:00+02:00`` or ``...Z``; UTC unless an offset is
    given. A bare date with ``end_of_day`` means the end of that day (so ``--until`` includes it).

    Raises:
        ReportError: not a date.
    """
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReportError(f"cannot read the date {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC unless an "
                          "offset such as +02:00 is given)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    if end_of_day and len(text.strip()) == 10:
        dt += timedelta(days=1)
    return dt


# --------------------------------------------------------------------------- computing
@dataclass(slots=True)
class _Pool:
    """Running state of one pool during the sweep."""

    level: int = 0
    count: int | None = None
    last_t: float = -math.inf
    peak: int = 0
    durations: dict[int, float] = field(default_factory=dict)  # level -> seconds in the period
    at_limit: float = 0.0
    checkouts: int = 0
    denials: dict[str, int] = field(default_factory=dict)
    # (user, host) -> open leases: [lease id or None, start]
    open: dict[tuple[str, str], list[tuple[str | None, float]]] = field(default_factory=dict)
    intervals: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    user_checkouts: dict[str, int] = field(default_factory=dict)
    series: list[tuple[float, int, int | None]] = field(default_factory=list)  # (time, level, count) in period
    seen_in_period: bool = False


@dataclass(frozen=True, slots=True)
class PoolReport:
    customer_id: str
    product: str
    count: int | None
    peak: int
    p95: int
    hours_at_limit: float
    checkouts: int
    denials: dict[str, int]
    top_users: list[dict[str, Any]]
    recommendation: Text  # English in --json, the user's language in the text output
    series: list[tuple[float, int, int | None]]

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id, "product": self.product, "count": self.count, "peak": self.peak,
            "p95": self.p95, "hours_at_limit": round(self.hours_at_limit, 6), "checkouts": self.checkouts,
            "denials": dict(sorted(self.denials.items())), "top_users": self.top_users,
            "recommendation": self.recommendation.english(),
        }


@dataclass(frozen=True, slots=True)
class Report:
    start: float
    end: float
    pools: list[PoolReport]
    events: int
    skipped_lines: int
    dropped_events: int

    @property
    def hours(self) -> float:
        return max(0.0, self.end - self.start) / 3600

    def to_json(self) -> dict[str, Any]:
        return {
            "period": {"start": _iso(self.start), "end": _iso(self.end), "start_epoch": self.start,
                       "end_epoch": self.end, "hours": round(self.hours, 6)},
            "products": [p.to_json() for p in self.pools],
            "events": self.events, "skipped_lines": self.skipped_lines, "dropped_events": self.dropped_events,
        }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def build_report(events: list[dict[str, Any]], *, since: float | None = None, until: float | None = None,
                 product: str | None = None, skipped: int = 0) -> Report:
    """Sweep the time-ordered events once and compute every pool's figures over ``[since, until]``."""
    if not events:
        now = since if since is not None else 0.0
        return Report(now, until if until is not None else now, [], 0, skipped, 0)
    start = since if since is not None else float(events[0]["epoch"])
    end = until if until is not None else float(events[-1]["epoch"])
    end = max(end, start)
    if product is not None:
        events = [e for e in events if e.get("product") == product or e["event"] == "dropped"]
    pools: dict[tuple[str, str], _Pool] = {}
    dropped = 0
    counted = 0

    def advance(p: _Pool, t: float) -> None:
        """Account the time from the pool's last change to ``t`` (clipped to the period) at its level."""
        a, b = max(p.last_t, start), min(t, end)
        if b > a:
            d = b - a
            p.durations[p.level] = p.durations.get(p.level, 0.0) + d
            if p.count and p.level >= p.count:
                p.at_limit += d
            p.peak = max(p.peak, p.level)
            p.seen_in_period = True
        p.last_t = max(p.last_t, t)

    for e in events:
        t = float(e["epoch"])
        if t > end:
            break
        inside = t >= start
        kind = e["event"]
        if kind == "dropped":
            dropped += _int(e.get("count")) or 0
            continue
        key = (str(e.get("customer_id") or ""), str(e["product"]))
        p = pools.get(key)
        if p is None:
            p = pools[key] = _Pool()
        if not p.series and inside:
            p.series.append((start, p.level, p.count))
        advance(p, t)
        counted += inside
        user, host = str(e.get("user", "")), str(e.get("host", ""))
        who = (user.lower(), host.split(".", 1)[0].lower())
        lease = e.get("lease") if isinstance(e.get("lease"), str) else None
        if kind == "checkout":
            in_use = _int(e.get("in_use"))
            p.level = in_use if in_use is not None else p.level + 1
            p.count = _int(e.get("count")) if _int(e.get("count")) is not None else p.count
            p.open.setdefault(who, []).append((lease, t))
            if inside:
                p.checkouts += 1
                p.user_checkouts[user] = p.user_checkouts.get(user, 0) + 1
        elif kind in RELEASES:
            in_use = _int(e.get("in_use"))
            p.level = in_use if in_use is not None else max(0, p.level - 1)
            began = _pop_open(p.open.get(who), lease)
            if began is None:  # checked out before the log began: its line says how long it was held
                held = e.get("held_s")
                began = t - float(held) if isinstance(held, int | float) and not isinstance(held, bool) else None
            if began is not None:
                p.intervals.setdefault(who, []).append((began, t))
        elif kind == "denial":
            if inside:
                reason = str(e.get("reason") or "UNKNOWN")
                p.denials[reason] = p.denials.get(reason, 0) + 1
                p.seen_in_period = True
        else:
            continue
        if inside:
            p.peak = max(p.peak, p.level)
            p.seen_in_period = True
            p.series.append((t, p.level, p.count))
    out: list[PoolReport] = []
    for (cid, prod), p in sorted(pools.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        advance(p, end)
        if not p.seen_in_period:
            continue
        if not p.series:  # no line inside the period: the level it started at held throughout
            p.series.append((start, p.level, p.count))
        p.series.append((end, p.level, p.count))
        for who, opens in p.open.items():
            for _lease, began in opens:
                p.intervals.setdefault(who, []).append((began, end))
        out.append(_pool_report(cid, prod, p, start, end))
    return Report(start, end, out, counted, skipped, dropped)


def _pop_open(opens: list[tuple[str | None, float]] | None, lease: str | None) -> float | None:
    if not opens:
        return None
    if lease is not None:
        for i, (lid, began) in enumerate(opens):
            if lid == lease:
                del opens[i]
                return began
        if any(lid is not None for lid, _ in opens):
            return None  # not one of ours: a lease checked out before the log began
    return opens.pop(0)[1]


def _union_seconds(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds covered by the union of ``intervals`` within ``[start, end]``."""
    total = 0.0
    cur: tuple[float, float] | None = None
    for a, b in sorted((max(a, start), min(b, end)) for a, b in intervals):
        if b <= a:
            continue
        if cur is None or a > cur[1]:
            if cur is not None:
                total += cur[1] - cur[0]
            cur = (a, b)
        else:
            cur = (cur[0], max(cur[1], b))
    if cur is not None:
        total += cur[1] - cur[0]
    return total


def _pool_report(cid: str, prod: str, p: _Pool, start: float, end: float) -> PoolReport:
    total = sum(p.durations.values())
    if total > 0:
        acc = 0.0
        p95 = max(p.durations)
        for level in sorted(p.durations):
            acc += p.durations[level]
            if acc >= PERCENTILE * total - 1e-9:
                p95 = level
                break
    else:
        p95 = p.peak
    per_user: dict[str, float] = {}
    for (user, _host), ivs in p.intervals.items():
        per_user[user] = per_user.get(user, 0.0) + _union_seconds(ivs, start, end)
    names = {u.lower(): u for u in p.user_checkouts}
    top = sorted(per_user.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_USERS]
    top_users = [{"user": names.get(u, u), "seat_hours": round(s / 3600, 6),
                  "checkouts": p.user_checkouts.get(names.get(u, u), 0)} for u, s in top if s > 0]
    hours = p.at_limit / 3600
    return PoolReport(cid, prod, p.count, p.peak, p95, hours, p.checkouts, p.denials, top_users,
                      _recommend(p.count, p.peak, p95, hours, p.denials.get("NO_SEATS", 0)), p.series)


def _recommend(count: int | None, peak: int, p95: int, hours_at_limit: float, no_seats: int) -> Text:
    if count is None:
        return tr("peak {peak}; the seat count is unknown (no checkout in this period's logs states it)", peak=peak)
    if hours_at_limit > 0 or no_seats > 0:
        return tr("peak {peak} of {count}, at the limit {hours:.1f} h, {no_seats} NO_SEATS denials: consider buying "
                  "more seats", peak=peak, count=count, hours=hours_at_limit, no_seats=no_seats)
    if p95 < count:
        unused = count - p95
        if unused == 1:
            return tr("95th percentile {p95} of {count}: {unused} seat unused most of the time", p95=p95, count=count,
                      unused=unused)
        return tr("95th percentile {p95} of {count}: {unused} seats unused most of the time", p95=p95, count=count,
                  unused=unused)
    return tr("peak {peak} of {count}, never at the limit: the seats fit the use", peak=peak, count=count)


# --------------------------------------------------------------------------- output
def format_text(report: Report, files: int) -> str:
    """The report for a person, in the user's language (product names, codes and figures as they are)."""
    _ = gettext_
    lines = [_("Usage report {start} .. {end} ({hours:.1f} h) from {files} file(s), {events} event(s)").format(
        start=_iso(report.start), end=_iso(report.end), hours=report.hours, files=files, events=report.events)]
    if report.skipped_lines:
        lines.append("  " + _("({n} line(s) that are not usage events were skipped)").format(n=report.skipped_lines))
    if report.dropped_events:
        lines.append("  " + _("(the daemon dropped {n} event(s) when its disk stalled: figures are "
                              "approximate)").format(n=report.dropped_events))
    if not report.pools:
        lines.append("")
        lines.append(_("no usage in this period"))
    for p in report.pools:
        lines.append("")
        count = _("{n} seats").format(n=p.count) if p.count is not None else _("seat count unknown")
        lines.append(_("{product} (customer {customer_id}): {count}").format(
            product=p.product, customer_id=p.customer_id or "?", count=count))
        pct = ("" if report.hours <= 0 else
               " " + _("({share} of the period)").format(share=f"{100 * p.hours_at_limit / report.hours:.1f} %"))
        lines.append("  " + _("peak {peak}, 95th percentile {p95}, at the limit {hours:.1f} h").format(
            peak=p.peak, p95=p.p95, hours=p.hours_at_limit) + pct)
        den = (", ".join(f"{k} {v}" for k, v in sorted(p.denials.items(), key=lambda kv: (-kv[1], kv[0])))
               or _("none"))
        lines.append("  " + _("checkouts {n}; denials: {denials}").format(n=p.checkouts, denials=den))
        if p.top_users:
            lines.append("  " + _("top users (seat-hours): {users}").format(users=", ".join(
                f"{u['user']} {u['seat_hours']:.1f} h" for u in p.top_users)))
        lines.append(f"  -> {p.recommendation.localized()}")
    return "\n".join(lines) + "\n"


def plot_unavailable() -> str | None:
    """Why ``--plot`` cannot run in this environment, or None when it can; looks matplotlib up without
    importing it (that is :func:`write_plot`'s job, and only when a plot is asked for)."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        found = False
    if found:
        return None
    return f"--plot needs matplotlib, which is not installed; install the report extra: {PLOT_EXTRA}"


def write_plot(report: Report, path: Path) -> None:
    """Seats in use over time against the licensed count, one panel per pool, as a PNG (matplotlib Agg).

    Raises:
        ReportError: matplotlib (the ``report`` extra) cannot be imported.
        OSError: the file cannot be written.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ReportError(f"--plot needs matplotlib, which cannot be imported ({exc}); install the report "
                          f"extra: {PLOT_EXTRA}") from None

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    pools = report.pools or []
    n = max(1, len(pools))
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.8 * n + 0.6), squeeze=False)
    try:
        for ax, p in zip(axes[:, 0], pools, strict=False):
            xs = [datetime.fromtimestamp(t, UTC) for t, _, _ in p.series]
            levels = [lv for _, lv, _ in p.series]
            ax.step(xs, levels, where="post", color="tab:blue", label="seats in use")
            ax.fill_between(xs, levels, step="post", color="tab:blue", alpha=0.15)
            if p.count is not None:
                ax.step(xs, [c if c is not None else p.count for _, _, c in p.series], where="post",
                        color="tab:red", linestyle="--", label="seats licensed")
            ax.set_title(f"{p.product} ({p.customer_id or '?'}): peak {p.peak}, 95th pct {p.p95}"
                         + (f" of {p.count}" if p.count is not None else "")
                         + f", at the limit {p.hours_at_limit:.1f} h", fontsize=10)
            ax.set_ylabel("seats")
            top = max([p.peak, p.count or 0, 1])
            ax.set_ylim(0, top * 1.3 + 0.6)  # headroom for the legend
            ax.yaxis.get_major_locator().set_params(integer=True)
            locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
            ax.grid(alpha=0.3)
            ax.legend(loc="upper left", fontsize=8, ncol=2)
        if not pools:
            axes[0, 0].text(0.5, 0.5, "no usage in this period", ha="center", va="center")
        fig.suptitle(f"lmgrd usage {_iso(report.start)} .. {_iso(report.end)} (UTC)", fontsize=11)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- command line
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    _ = gettext_
    p.add_argument("logs", nargs="+", metavar="LOG", help=_("usage log files (usage.log, its rotated usage.log.1 .. "
                                                            ".N, and .gz copies)"))
    p.add_argument("--since", metavar="DATE", help=_("start of the period (YYYY-MM-DD or YYYY-MM-DDTHH:MM; UTC "
                                                     "unless an offset is given; default: the first event)"))
    p.add_argument("--until", metavar="DATE", help=_("end of the period (a bare date includes that whole day; "
                                                     "default: the last event)"))
    p.add_argument("--product", metavar="P", help=_("this product only"))
    p.add_argument("--json", action="store_true", help=_("print machine-readable JSON"))
    p.add_argument("--plot", metavar="FILE.png", help=_("also draw seats in use over time against the count "
                                                        "(needs the report extra: {extra})").format(extra=PLOT_EXTRA))


def run_report(ns: argparse.Namespace) -> int:
    """``lmutil report``: 0 ok, 1 nothing to report, 2 unreadable input or bad arguments."""
    try:
        if ns.plot and (why := plot_unavailable()) is not None:
            raise ReportError(why)  # before any output: nothing half done
        since = parse_date(ns.since).timestamp() if ns.since else None
        until = parse_date(ns.until, end_of_day=True).timestamp() if ns.until else None
        if since is not None and until is not None and until < since:
            raise ReportError(f"--until {ns.until} is before --since {ns.since}")
        events, skipped = load_events(ns.logs)
    except ReportError as exc:
        if ns.json:
            print(json.dumps({"error": "ERROR", "message": str(exc)}))
        print(f"lmutil report: {exc}", file=sys.stderr)
        return 2
    if not events:
        msg = (f"no usage events in {', '.join(ns.logs)} ({skipped} other line(s)); is this the file the daemon's "
               "usage_log setting names?")
        if ns.json:
            print(json.dumps({"error": "NO_EVENTS", "message": msg}))
        print(f"lmutil report: {msg}", file=sys.stderr)
        return 1
    report = build_report(events, since=since, until=until, product=ns.product, skipped=skipped)
    if ns.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_text(report, len(ns.logs)))
    if ns.plot:
        try:
            write_plot(report, Path(ns.plot))
        except ReportError as exc:
            print(f"lmutil report: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"lmutil report: cannot write the plot {ns.plot}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        if not ns.json:
            print(gettext_("plot written to {path}").format(path=ns.plot))
    return 0
