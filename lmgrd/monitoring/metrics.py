"""Prometheus metrics for one ``Server``: event counters, scrape-time gauges, request timing, the stats dump.

Counters (``lmgrd_checkouts_total``, ``lmgrd_denials_total``, ``lmgrd_lease_expirations_total``) are bumped
by :class:`Metrics`, an observer in ``server.observers``. Everything that describes the present (seats,
clients, license expiry and activation, process figures) is computed when scraped by a custom collector that
reads the ledger and the licensing; a scrape costs O(products), never O(leases) (``Ledger.in_use`` and
``Ledger.queued`` are O(1)). Request timing is a plain-Python histogram fed by ``Server.request_timer``
(two ``perf_counter`` calls, a bisect and two increments per request) and exported as
``lmgrd_request_duration_seconds``.

Every ``Metrics`` owns its own ``CollectorRegistry`` (injectable; never the process-global one), so two
servers in one process, or a test, never share counts. No label names a user or a host (cardinality).

Features added by other modules are read defensively, so this module works before and after them:

* reserved seats: ``server.reserved(pool) -> int`` when the usage policy defines it (a mapping
  ``server.reserved[pool]`` works too); 0 otherwise.
* activation: ``server.licensing.activation_state(customer_id, now) -> str`` ("active", "pending",
  "moved"); "active" when the licensing has no such method.

Must not import ``client_stub``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from lmgrd import __version__
from lmgrd.admin import commands as admin
from lmgrd.storage.atomic import write_atomic
from protocol.errors import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from lmgrd.core.ledger import LeaseInfo, PoolKey
    from lmgrd.daemon.api import ClientView as ClientProtocol
    from lmgrd.daemon.api import DaemonView as Server

logger = logging.getLogger(__name__)

#: What ``GET /metrics`` and the text file carry: the Prometheus text format that ``generate_latest`` writes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Upper bounds of the request-duration buckets, seconds. A heartbeat is handled in tens of microseconds;
#: anything near a second means the loop was blocked.
DURATION_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
#: Recent denials kept for the status page.
RECENT_DENIALS = 50
SEAT_STATES = ("issued", "in_use", "reserved", "queued")


# --------------------------------------------------------------------------- features read defensively
def reserved_seats(server: Server, pool: PoolKey) -> int:
    """Seats of ``pool`` held back by the usage policy; 0 until a policy defines ``server.reserved``."""
    source = getattr(server, "reserved", None)
    if source is None:
        return 0
    try:
        value = source(pool) if callable(source) else source.get(pool, 0)
    except Exception:  # a policy bug must not break a scrape
        logger.exception("reading reserved seats of %s/%s failed", pool[0], pool[1])
        return 0
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def activation_state(server: Server, customer_id: str) -> str:
    """'active', 'pending' or 'moved' from ``Licensing.activation_state``; 'active' where that is absent."""
    fn = getattr(server.licensing, "activation_state", None)
    if not callable(fn):
        return "active"
    try:
        return str(fn(customer_id, datetime.fromtimestamp(server.wall(), UTC)))
    except Exception:  # an activation bug must not break a scrape or the status page
        logger.exception("reading the activation state of %s failed", customer_id)
        return "unknown"


def expiry_timestamp(lic: Any) -> float | None:
    """The license's last valid instant as a Unix time, or None for a license that never expires."""
    at = getattr(lic, "expires_at", None)
    return at.timestamp() if isinstance(at, datetime) else None


# --------------------------------------------------------------------------- request timing
class _OpHistogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last slot is +Inf
        self.total = 0.0


def _family(name: str, documentation: str, by_op: dict[str, _OpHistogram]) -> HistogramMetricFamily:
    """One histogram family labelled ``op``, cumulative buckets as Prometheus wants them."""
    fam = HistogramMetricFamily(name, documentation, labels=["op"])
    for op, h in sorted(by_op.items()):
        cum = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip((*map(repr, DURATION_BUCKETS), "+Inf"), h.counts, strict=True):
            cum += n
            buckets.append((bound, cum))
        fam.add_metric([op], buckets, h.total)
    return fam


class StoreTimer:
    """``timer(op, seconds)``: ``lmgrd_store_request_duration_seconds``, fed by the etcd store after each call."""

    __slots__ = ("by_op",)

    def __init__(self) -> None:
        self.by_op: dict[str, _OpHistogram] = {}

    def __call__(self, op: str, seconds: float) -> None:
        h = self.by_op.get(op)
        if h is None:
            h = self.by_op[op] = _OpHistogram()
        h.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        h.total += seconds

    def family(self) -> HistogramMetricFamily:
        return _family("lmgrd_store_request_duration_seconds",
                       "HA: time of each call to the seat store (etcd), by operation", self.by_op)


class RequestTimer:
    """``timer(request_type, seconds)``: the hot-path half of ``lmgrd_request_duration_seconds``.

    No locks: it is fed and read on the event loop thread only (the text-file writer renders on the loop).
    """

    __slots__ = ("by_op", "by_type")

    def __init__(self) -> None:
        self.by_type: dict[type, _OpHistogram] = {}
        self.by_op: dict[str, _OpHistogram] = {}

    def __call__(self, req_type: type, seconds: float) -> None:
        h = self.by_type.get(req_type)
        if h is None:
            op = str(getattr(req_type, "OP", "bad_request"))
            h = self.by_op.setdefault(op, _OpHistogram())
            self.by_type[req_type] = h
        h.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        h.total += seconds

    def family(self) -> HistogramMetricFamily:
        return _family("lmgrd_request_duration_seconds", "Time spent handling one client request on the event "
                       "loop, by operation (excludes the batched journal write)", self.by_op)


# --------------------------------------------------------------------------- the observer
@dataclass(frozen=True, slots=True)
class Denial:
    """One refused checkout, for the status page (user and host appear there, never in a label)."""

    at: float
    customer_id: str
    product: str
    version: str
    reason: str
    user: str
    host: str


class Metrics:
    """Counters, recent denials and the scrape-time collector of one server; register with :func:`attach`."""

    def __init__(self, server: Server, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.server = server
        self.registry = registry if registry is not None else CollectorRegistry()
        self.timer = RequestTimer()
        self.store_timer = StoreTimer()
        if server.cluster is not None:
            server.cluster.observe = self.store_timer
        self.recent_denials: deque[Denial] = deque(maxlen=RECENT_DENIALS)
        self._primed_of: object = None
        # Plain dicts, not prometheus_client Counters: bumped on the loop thread only, no lock, no _created
        # series; exported by StateCollector. Keys are label values in label order.
        self.checkouts: dict[tuple[str, str, str], int] = {}  # (customer_id, product, result)
        self.denials: dict[tuple[str, str, str], int] = {}  # (customer_id, product, reason)
        self.expirations = 0
        self.registry.register(StateCollector(self))
        if process:
            self.registry.register(ProcessCollector())

    # -- server.observers hooks (called on the loop; keep them cheap) ------------------------------------
    def on_grant(self, lease: LeaseInfo, who: Any, waited: float) -> None:
        key = (lease.pool[0], lease.pool[1], "granted")
        self.checkouts[key] = self.checkouts.get(key, 0) + 1

    def on_deny(self, product: str, version: str, code: ErrorCode | str, who: Any, customer_id: str | None) -> None:
        known = self._customer_of(product)
        cid = customer_id if customer_id is not None else (known or "")
        # The product name comes from the client: one that no license names becomes "" so a client
        # asking for random names cannot grow the series without bound (the status page shows the name).
        label = product if known is not None else ""
        reason = str(code)
        key = (cid, label, "denied")
        self.checkouts[key] = self.checkouts.get(key, 0) + 1
        key = (cid, label, reason)
        self.denials[key] = self.denials.get(key, 0) + 1
        self.recent_denials.append(Denial(self.server.wall(), cid, product, version, reason,
                                          str(getattr(who, "user", "") or ""), str(getattr(who, "host", "") or "")))

    def on_release(self, lease: LeaseInfo, reason: str) -> None:
        if reason == "expiry":
            self.expirations += 1

    def _customer_of(self, product: str) -> str | None:
        """None when no license (served or refused) names ``product``; else the customer ID when exactly one
        license has it, "" when several do."""
        return self.server.licensing.customer_of(product)

    def prime(self) -> None:
        """Create the counter series of every licensed pool at 0, so rate() works from the first event."""
        lic = self.server.licensing
        if self._primed_of is lic:
            return
        self._primed_of = lic
        for cid, product in lic.pools():
            for result in ("granted", "denied"):
                self.checkouts.setdefault((cid, product, result), 0)

    # -- output ------------------------------------------------------------------------------------------
    def dump(self) -> bytes:
        """The Prometheus text exposition of everything (what /metrics serves). Call on the loop thread."""
        return generate_latest(self.registry)


def attach(server: Server, registry: CollectorRegistry | None = None, *, process: bool = True) -> Metrics:
    """Create the metrics of ``server``, register them as an observer and as its request timer."""
    m = Metrics(server, registry, process=process)
    server.observers.append(m)
    server.metrics = m
    server.request_timer = m.timer
    return m


# --------------------------------------------------------------------------- scrape-time collectors
class StateCollector(Collector):
    """Gauges read from the ledger and the licensing when scraped: O(products)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        server = m.server
        m.prime()
        ledger, licensing = server.ledger, server.licensing
        seats = GaugeMetricFamily("lmgrd_seats", "Seats per customer ID and product: issued by the license, "
                                  "in use, reserved by policy, and checkouts queued for one",
                                  labels=["customer_id", "product", "state"])
        for pool in sorted(ledger.pools()):
            cid, product = pool
            seats.add_metric([cid, product, "issued"], ledger.count(pool))
            in_use = ledger.in_use(pool)
            if server.cluster is not None:  # HA: the cluster-wide count (this node's share: lmgrd_cluster_seats)
                in_use = max(in_use, server.cluster.held(pool))
            seats.add_metric([cid, product, "in_use"], in_use)
            seats.add_metric([cid, product, "reserved"], reserved_seats(server, pool))
            seats.add_metric([cid, product, "queued"], ledger.queued(pool))
        yield seats
        yield GaugeMetricFamily("lmgrd_connected_clients", "Client connections that completed the handshake",
                                value=len(server.sessions))
        expiry = GaugeMetricFamily("lmgrd_license_expiry_timestamp_seconds", "When each served license expires "
                                   "(Unix time; absent for a license that never expires)", labels=["customer_id"])
        activated = GaugeMetricFamily("lmgrd_license_activated", "1 if the served license is activated, else 0",
                                      labels=["customer_id"])
        served = GaugeMetricFamily("lmgrd_licenses", "License files by state: served or refused",
                                   labels=["state"])
        for _path, lic in licensing.served:
            ts = expiry_timestamp(lic)
            if ts is not None:
                expiry.add_metric([lic.customer_id], ts)
            activated.add_metric([lic.customer_id], 1 if activation_state(server, lic.customer_id) == "active"
                                 else 0)
        served.add_metric(["served"], len(licensing.served))
        served.add_metric(["refused"], len(licensing.refused))
        yield expiry
        yield activated
        yield served
        yield from _cloud_families(server)
        yield GaugeMetricFamily("lmgrd_up", "1 while serving licenses, 0 once shutting down",
                                value=0 if server.closing else 1)
        cluster = server.cluster
        yield GaugeMetricFamily("lmgrd_store_up", "1 while this node can use its seat store (the embedded journal, "
                                "or with store: etcd the etcd cluster answers with a leader), else 0",
                                value=1 if server.store_error is None and (cluster is None or cluster.up) else 0)
        yield m.store_timer.family()
        if cluster is not None:
            held = GaugeMetricFamily("lmgrd_cluster_seats", "HA: seats in use cluster-wide, by the node holding "
                                     "the client (as this node last read etcd)",
                                     labels=["customer_id", "product", "node"])
            for (cid, product), seats_ in sorted(cluster.view.items()):
                by_node: dict[str, int] = {}
                for seat in seats_:
                    by_node[str(seat.get("node", ""))] = by_node.get(str(seat.get("node", "")), 0) + 1
                for node, n in sorted(by_node.items()):
                    held.add_metric([cid, product, node], n)
            yield held
            node_up = GaugeMetricFamily("lmgrd_cluster_node_up", "HA: 1 for each lmgrd node registered in etcd, "
                                      "0 for a known node that is not", labels=["node"])
            for line in cluster.node_lines():
                node_up.add_metric([line["node"]], 1 if line["up"] else 0)
            yield node_up
        yield GaugeMetricFamily("lmgrd_store_writable", "1 while the lease journal can be written, 0 while the "
                                "state directory is full or read-only (new checkouts refused, retried by itself)",
                                value=1 if server.store_error is None else 0)
        yield CounterMetricFamily("lmgrd_store_write_failures", "Failed lease journal writes (the first failure "
                                  "and every failed retry)", value=server.store_write_failures)
        yield GaugeMetricFamily("lmgrd_start_time_seconds", "When this daemon started (Unix time)",
                                value=server.started_wall)
        info = GaugeMetricFamily("lmgrd_build_info", "lmgrd version and Python version; always 1",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield m.timer.family()
        checkouts = CounterMetricFamily("lmgrd_checkouts", "Checkout requests answered, by result (granted or "
                                        "denied)", labels=["customer_id", "product", "result"])
        for labels, n in sorted(m.checkouts.items()):
            checkouts.add_metric(list(labels), n)
        yield checkouts
        denials = CounterMetricFamily("lmgrd_denials", "Checkouts refused, by the error code given to the client",
                                      labels=["customer_id", "product", "reason"])
        for labels, n in sorted(m.denials.items()):
            denials.add_metric(list(labels), n)
        yield denials
        yield CounterMetricFamily("lmgrd_lease_expirations", "Leases reclaimed because their client stopped "
                                  "heartbeating", value=m.expirations)
        yield CounterMetricFamily("lmgrd_handshake_timeouts", "Connections dropped because they sent no complete "
                                  "hello within handshake_timeout (silent or slow clients)",
                                  value=server.counters.handshake_timeouts)
        yield from refusal_families(server)


#: Label values every refusal series is created with (at 0), so rate() works from the first refusal.
TOKEN_REFUSAL_LABELS = (("checkin", "not_holder"), ("checkin", "unknown"), ("resume", "not_holder"),
                        ("resume", "unknown"))
CONNECTION_REFUSAL_REASONS = ("per_address_limit", "shutting_down")


def refusal_families(server: Server) -> Iterator[Metric]:
    """The counters of refused input (lmgrd.daemon.guard.RefusalCounts): what the log only samples."""
    r = server.refusals
    tokens = CounterMetricFamily("lmgrd_token_refusals", "Checkins and resumes refused because the lease is "
                                 "another client's (not_holder) or does not exist (unknown): nothing was freed, "
                                 "renewed or moved", labels=["request", "reason"])
    for labels in sorted({*TOKEN_REFUSAL_LABELS, *r.token_refusals}):
        tokens.add_metric(list(labels), r.token_refusals.get(labels, 0))
    yield tokens
    yield CounterMetricFamily("lmgrd_rate_limited_requests", "Requests answered RATE_LIMITED (over "
                              "max_requests_per_second on their connection) and not run", value=r.rate_limited)
    yield CounterMetricFamily("lmgrd_bad_requests", "Well-framed requests that failed the message schema "
                              "(answered BAD_REQUEST)", value=r.bad_requests)
    conns = CounterMetricFamily("lmgrd_connection_refusals", "Connections refused when accepted, by reason "
                                "(per_address_limit: max_connections_per_address)", labels=["reason"])
    for reason in sorted({*CONNECTION_REFUSAL_REASONS, *r.connection_refusals}):
        conns.add_metric([reason], r.connection_refusals.get(reason, 0))
    yield conns
    yield CounterMetricFamily("lmgrd_idle_connections_closed", "Connections closed because they held no seat "
                              "and sent nothing for idle_connection_timeout", value=r.idle_closed)
    yield CounterMetricFamily("lmgrd_refusal_log_lines_suppressed", "Log lines about refusals not written "
                              "because of the log's rate limit (each refusal is still counted above)",
                              value=r.log_suppressed)


def _cloud_families(server: Server) -> Iterator[Metric]:
    """The licenses activated by the vendor's activation service: certificate end, last contact, warning."""
    fn = getattr(server, "cloud_status", None)
    try:
        views = fn() if fn is not None else []
    except Exception:  # a bug here must not break a scrape
        logger.exception("reading the activation service state failed")
        views = []
    valid = GaugeMetricFamily("lmgrd_cloud_certificate_valid_until_timestamp_seconds", "When the activation "
                              "certificate of each cloud license ends (Unix time; absent without one, or for an "
                              "offline certificate of a license that never expires)", labels=["customer_id"])
    reached = GaugeMetricFamily("lmgrd_cloud_last_reached_timestamp_seconds", "When the vendor's activation "
                                "service was last reached for each cloud license (Unix time)", labels=["customer_id"])
    warning = GaugeMetricFamily("lmgrd_cloud_unreachable_warning", "1 while the activation service cannot be "
                                "reached and the certificate ends within 7 days (or has ended), else 0",
                                labels=["customer_id"])
    for v in views:
        if v.get("valid_until_epoch") is not None:
            valid.add_metric([v["customer_id"]], v["valid_until_epoch"])
        if v.get("last_reached_epoch") is not None:
            reached.add_metric([v["customer_id"]], v["last_reached_epoch"])
        warning.add_metric([v["customer_id"]], 1 if v.get("warning") else 0)
    yield valid
    yield reached
    yield warning


class ProcessCollector(Collector):
    """Resident memory, CPU seconds and open descriptors of this process, read with psutil at scrape time."""

    def __init__(self, pid: int | None = None) -> None:
        self.proc = psutil.Process(pid)

    def collect(self) -> Iterator[Metric]:
        try:
            with self.proc.oneshot():
                mem = self.proc.memory_info().rss
                cpu = self.proc.cpu_times()
                fds = self.proc.num_fds() if os.name != "nt" else getattr(self.proc, "num_handles")()  # noqa: B009
                started = self.proc.create_time()
        except psutil.Error as exc:
            logger.warning("cannot read this process's figures with psutil: %s", exc)
            return
        yield GaugeMetricFamily("lmgrd_process_resident_memory_bytes", "Resident memory of the lmgrd process",
                                value=mem)
        yield CounterMetricFamily("lmgrd_process_cpu_seconds", "User and system CPU time of the lmgrd process",
                                  value=cpu.user + cpu.system)
        yield GaugeMetricFamily("lmgrd_process_open_fds", "Open file descriptors (handles on Windows) of the lmgrd "
                                "process", value=fds)
        yield GaugeMetricFamily("lmgrd_process_start_time_seconds", "When the lmgrd process started (Unix time)",
                                value=started)


# --------------------------------------------------------------------------- the stats dump
@admin.command("metrics")
def _metrics_command(server: Server, proto: ClientProtocol, args: dict[str, Any]) -> dict[str, Any]:
    """``lmutil lmstat --prometheus``: the same text as ``GET /metrics``."""
    m: Metrics | None = getattr(server, "metrics", None)
    if m is None:
        raise ProtocolError(ErrorCode.INTERNAL_ERROR, "metrics are not enabled in this server",
                            "restart lmgrd with a version that has metrics")
    return {"text": m.dump().decode("utf-8"), "content_type": CONTENT_TYPE}


class TextfileWriter:
    """Writes the dump to ``path`` every ``interval`` seconds for node_exporter's (or windows_exporter's)
    textfile collector. The text is rendered on the loop (O(products)); the file write runs in a thread."""

    def __init__(self, metrics: Metrics, path: Path, interval: float) -> None:
        self.metrics = metrics
        self.path = path
        self.interval = interval
        self.task: asyncio.Task[None] | None = None
        self.writes = 0
        self._last_error = ""

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="lmgrd-metrics-textfile")
        logger.info("writing metrics to %s every %g s", self.path, self.interval)

    async def write_once(self) -> bool:
        data = self.metrics.dump()
        try:
            await asyncio.to_thread(write_atomic, self.path, data, durable=False)
        except OSError as exc:
            msg = f"{exc.strerror or exc}"
            if msg != self._last_error:  # say it once per distinct problem, not every interval
                logger.error("cannot write the metrics text file %s: %s; check the directory exists and is "
                             "writable by lmgrd's user", self.path, msg)
            self._last_error = msg
            return False
        if self._last_error:
            logger.info("metrics text file %s written again", self.path)
            self._last_error = ""
        self.writes += 1
        return True

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.write_once()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task])  # our own cancellation of the writer; the caller's still propagates
            self.task = None
