"""The monitoring port: ``GET /metrics``, ``GET /healthz`` and a read-only status page at ``GET /``.

A deliberately small HTTP/1.1 server on the daemon's own event loop: an ``asyncio.Protocol`` that feeds the bytes
it receives to an ``h11.Connection(h11.SERVER)`` (sans-I/O, the model :mod:`protocol` follows) and sends the
bytes h11 frames. GET only. Every cost a client can impose is bounded by an :class:`HTTPLimits` (the
``metrics_*`` settings): the request head (``metrics_max_header_bytes``, however it arrives) and body
(``metrics_max_body_bytes``) sizes; the time to deliver a head (``metrics_header_timeout``) and a whole request
(``metrics_request_timeout``); the idle time of a kept-alive HTTP/1.1 connection between requests
(``metrics_keepalive_timeout``; 0 answers every request with ``Connection: close``); and the connections open at
once (``metrics_max_connections``; at the cap the connection idle or slow the longest is evicted, so a flood of
slow connections cannot lock honest scrapers out). Connections cut by a deadline or evicted are counted in
``lmgrd_http_connections_dropped_total{reason}``. A slow or hostile scraper costs little and can never hold up
license traffic. A request h11 cannot read is answered with the 4xx it hints (400, 413 or 431 for a body or head
too large), never a traceback. Everything it shows is read
from the server at request time; it changes nothing. If the port cannot be bound the daemon says why and keeps
serving licenses.

Must not import ``client_stub``.
"""

from __future__ import annotations

import asyncio
import html
import logging
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h11
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmgrd import __version__
from lmgrd.admin import commands as admin
from lmgrd.config import DaemonConfig
from lmgrd.monitoring.metrics import CONTENT_TYPE, Metrics, TextfileWriter, activation_state, attach, reserved_seats

if TYPE_CHECKING:
    from collections.abc import Iterator

    from lmgrd.daemon.api import DaemonView as Server

logger = logging.getLogger(__name__)

#: Holders listed per product on the status page (the page stays small with thousands of leases).
MAX_HOLDERS_SHOWN = 200
#: Seconds between the status page's own refreshes.
REFRESH_SECONDS = 5

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}
_HTML = "text/html; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_BAD_REQUEST_LINE = b"expected an HTTP/1.x request line such as: GET /metrics HTTP/1.1\n"


# --------------------------------------------------------------------------- health
def health(server: Server) -> tuple[bool, str]:
    """Whether the server is serving licenses, and a one-line reason.

    Serving means: not shutting down, the lease store can record grants (a full or read-only state directory
    answers 503 with the journal's error: held seats keep running, new checkouts are refused), and at least one
    served license that has not expired and is activated.
    """
    if server.closing:
        return False, "shutting down"
    cluster = server.cluster
    if cluster is not None and not cluster.up:
        return False, (f"degraded: the shared seat store (etcd {','.join(cluster.settings.endpoints)}) is unreachable "
                       "or has no quorum; new checkouts are refused with STORE_UNAVAILABLE, held seats are kept for "
                       "at most the lease timeout")
    if server.store_error is not None:
        return False, f"degraded, new checkouts refused (STORE_UNAVAILABLE): {server.store_error}"
    now = datetime.now(UTC)
    served = server.licensing.served
    if not served:
        refused = server.licensing.refused
        why = "; ".join(f"{r.source}: {', '.join(r.reasons)}" for r in refused[:3]) if refused else ""
        return False, "no license is being served" + (f" ({why})" if why else "") + \
            "; fix the license files, then run lmutil lmreread"
    states: list[str] = []
    for _path, lic in served:
        at = lic.expires_at
        if at is not None and now > at:
            states.append(f"{lic.customer_id} expired {lic.expires}")
            continue
        state = activation_state(server, lic.customer_id)
        if state == "active":
            return True, "ok"
        states.append(f"{lic.customer_id} {state}")
    return False, "no license is active: " + ", ".join(states)


# --------------------------------------------------------------------------- the status page
def _t(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}h {m}m" if d else f"{h}h {m}m {s}s" if h else f"{m}m {s}s"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f4f5f7;
color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c5cad6;font-size:13px}
main{padding:16px 24px;max-width:1200px}
p{font-size:13px}section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:14px 18px;margin:0 0 16px}
h2{font-size:17px;margin:0 0 8px}h2 small{color:#687085;font-weight:normal;font-size:13px}
.bar{display:flex;height:22px;border-radius:4px;overflow:hidden;background:#e3e7ee;margin:6px 0}
.bar div{height:100%}.seg-in-use{background:#2f6fde}.seg-reserved{background:#f0a329}.seg-free{background:#cfe8d3}
.legend{font-size:13px;color:#3c4456}.legend b{font-size:15px}
.key{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 12px}
table{border-collapse:collapse;width:100%;font-size:13px;margin-top:8px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef2}th{color:#687085;font-weight:600}
.ok{color:#17803d}.bad{color:#b3261e}.muted{color:#687085}
"""


def render_status(server: Server, metrics: Metrics | None) -> str:
    """The status page as one HTML string; every value from the server goes through ``html.escape``."""
    e = html.escape
    now_wall, now = server.wall(), server.clock()
    ledger, licensing = server.ledger, server.licensing
    ok, why = health(server)
    host = socket.gethostname()
    out: list[str] = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>lmgrd on {e(host)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>lmgrd {e(__version__)} on {e(host)}</h1>",
        f"<p>port {e(', '.join(map(str, server.ports)))} · up {e(_duration(now - server.started))} · "
        f"<span id=\"clients\">{len(server.sessions)}</span> client connection(s) · "
        f"<span id=\"health\" class=\"{'ok' if ok else 'bad'}\">{e('serving' if ok else 'not serving: ' + why)}"
        f"</span> · page generated {e(_t(now_wall))}, refreshes every {REFRESH_SECONDS} s</p></header><main>",
    ]
    # Licenses: expiry and activation.
    out.append("<section id=\"licenses\"><h2>Licenses</h2><table><thead><tr><th>Customer ID</th><th>Customer</th>"
               "<th>Products</th><th>Expires</th><th>Activation</th><th>File</th></tr></thead><tbody>")
    today = datetime.now(UTC)
    for path, lic in licensing.served:
        if lic.expires is None:
            exp = "never"
        else:
            days = (lic.expires_at - today).total_seconds() / 86400 if lic.expires_at else 0
            exp = f"{lic.expires.isoformat()} ({'expired' if days < 0 else f'{int(days)} days left'})"
        state = activation_state(server, lic.customer_id)
        prods = ", ".join(f"{p.name} {p.version} ×{p.count}" for p in lic.products)
        out.append(f"<tr class=\"license\" data-customer=\"{e(lic.customer_id)}\"><td>{e(lic.customer_id)}</td>"
                   f"<td>{e(lic.customer)}</td><td>{e(prods)}</td><td class=\"expires\">{e(exp)}</td>"
                   f"<td class=\"activation {'ok' if state == 'active' else 'bad'}\">{e(state)}</td>"
                   f"<td class=\"muted\">{e(str(path))}</td></tr>")
    for ref in licensing.refused:
        out.append(f"<tr class=\"refused\"><td>{e(ref.customer_id or '?')}</td><td colspan=\"3\" class=\"bad\">"
                   f"refused: {e('; '.join(ref.reasons))}</td><td class=\"bad\">{e(str(ref.code))}</td>"
                   f"<td class=\"muted\">{e(ref.source)}</td></tr>")
    if not licensing.served and not licensing.refused:
        out.append("<tr><td colspan=\"6\" class=\"muted\">no license loaded</td></tr>")
    out.append("</tbody></table></section>")

    # One section per pool: the seats bar, the queue, the holders.
    for pool in sorted(ledger.pools()):
        cid, product = pool
        issued, in_use, queued = ledger.count(pool), ledger.in_use(pool), ledger.queued(pool)
        reserved = max(0, min(reserved_seats(server, pool), issued - in_use))
        free = max(0, issued - in_use - reserved)
        width = max(issued, in_use, 1)
        pool_lic = licensing.license_for(pool)
        prod = pool_lic.product(product) if pool_lic is not None else None
        out.append(
            f"<section class=\"product\" data-customer=\"{e(cid)}\" data-product=\"{e(product)}\">"
            f"<h2>{e(product)} <small>{e('v' + prod.version if prod else 'no longer licensed')} · customer "
            f"{e(cid)}</small></h2>"
            f"<div class=\"bar\" title=\"{in_use} in use, {reserved} reserved, {free} free of {issued}\">"
            f"<div class=\"seg-in-use\" style=\"width:{100 * in_use / width:.2f}%\"></div>"
            f"<div class=\"seg-reserved\" style=\"width:{100 * reserved / width:.2f}%\"></div>"
            f"<div class=\"seg-free\" style=\"width:{100 * free / width:.2f}%\"></div></div>"
            f"<div class=\"legend\"><span class=\"key seg-in-use\"></span>in use <b class=\"in-use\">{in_use}</b>"
            f"<span class=\"key seg-reserved\"></span>reserved <b class=\"reserved\">{reserved}</b>"
            f"<span class=\"key seg-free\"></span>free <b class=\"free\">{free}</b>"
            f" · issued <b class=\"issued\">{issued}</b> · queued <b class=\"queued\">{queued}</b></div>"
        )
        leases = ledger.leases(pool)
        if leases:
            out.append("<table class=\"holders\"><thead><tr><th>User</th><th>Host</th><th>Display</th>"
                       "<th>Version</th><th>Checked out</th><th>Last heartbeat</th><th>Connected</th></tr>"
                       "</thead><tbody>")
            for lease in leases[:MAX_HOLDERS_SHOWN]:
                v = admin.lease_view(lease, now, now_wall, server.lease_timeout)
                out.append(f"<tr class=\"holder\"><td class=\"user\">{e(v['user'])}</td>"
                           f"<td class=\"host\">{e(v['host'])}</td><td>{e(v['display'])}</td>"
                           f"<td>{e(v['version'])}</td><td>{e(_t(v['checkout_at']))}</td>"
                           f"<td>{e(_t(v['last_heartbeat_at']))}</td><td>{'yes' if v['connected'] else 'no'}</td>"
                           "</tr>")
            if len(leases) > MAX_HOLDERS_SHOWN:
                out.append(f"<tr><td colspan=\"7\" class=\"muted\">… and {len(leases) - MAX_HOLDERS_SHOWN} more "
                           "(lmutil lmstat -a lists them all)</td></tr>")
            out.append("</tbody></table>")
        else:
            out.append("<p class=\"muted\">no seat is held</p>")
        out.append("</section>")

    # Recent denials, newest first.
    denials = list(metrics.recent_denials)[::-1] if metrics is not None else []
    out.append(f"<section id=\"denials\"><h2>Recent denials <small>last {len(denials)}</small></h2>")
    if denials:
        out.append("<table><thead><tr><th>When</th><th>Product</th><th>Version</th><th>Customer ID</th>"
                   "<th>Reason</th><th>User</th><th>Host</th></tr></thead><tbody>")
        for d in denials:
            out.append(f"<tr class=\"denial\"><td>{e(_t(d.at))}</td><td>{e(d.product)}</td><td>{e(d.version)}</td>"
                       f"<td>{e(d.customer_id)}</td><td class=\"reason\">{e(d.reason)}</td><td>{e(d.user)}</td>"
                       f"<td>{e(d.host)}</td></tr>")
        out.append("</tbody></table>")
    else:
        out.append("<p class=\"muted\">none since the daemon started</p>")
    out.append("</section></main></body></html>\n")
    return "".join(out)


# --------------------------------------------------------------------------- HTTP
@dataclass(frozen=True, slots=True)
class HTTPLimits:
    """What one monitoring connection may cost: the ``metrics_*`` settings of :class:`lmgrd.config.DaemonConfig`
    (their defaults are written there once; :meth:`from_config` copies them)."""

    max_connections: int
    header_timeout: float
    request_timeout: float
    keepalive_timeout: float
    max_header_bytes: int
    max_body_bytes: int

    @classmethod
    def from_config(cls, cfg: DaemonConfig) -> HTTPLimits:
        return cls(cfg.metrics_max_connections, cfg.metrics_header_timeout, cfg.metrics_request_timeout,
                   cfg.metrics_keepalive_timeout, cfg.metrics_max_header_bytes, cfg.metrics_max_body_bytes)


#: Why the listener cut a connection itself (lmgrd_http_connections_dropped_total{reason}).
DROP_REASONS = ("header_timeout", "request_timeout", "evicted")


class HTTPProtocol(asyncio.Protocol):
    """One monitoring connection: h11 reads requests one at a time and each is answered in turn.

    A request's head must arrive within ``header_timeout`` and the whole request (head, body, and the client
    taking the answer) within ``request_timeout``, both counted from its first byte (from the connection's start
    for the first request); past either the connection is aborted. Between requests an idle kept-alive connection
    is closed after ``keepalive_timeout`` (0: every answer closes the connection). Reading is paused while an
    answer waits to be taken, so a client that pipelines without reading holds at most one answer and one read.
    """

    def __init__(self, app: MonitorHTTP) -> None:
        self.app = app
        self.limits = app.limits
        # h11 holds no more than max_header_bytes of an unfinished head; a head that arrives whole is measured
        # in _process (h11's limit only applies to an incomplete one).
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=app.limits.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.idle = False  # between requests of a kept-alive connection
        self.closing = False  # the last answer said Connection: close; what the client still sends is discarded
        self.draining = False  # an answer is written but the client has not taken it all yet
        self.fed = 0  # bytes of this request cycle given to h11 (leftovers of the previous cycle included)
        self.body_bytes = 0
        self.header_deadline = 0.0
        self.request_deadline = 0.0
        self.request: h11.Request | None = None
        self.keep_alive = False
        self.method = b""

    # -- timers ------------------------------------------------------------------------------------------
    def _arm(self, when: float, why: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_at(when, self._expired, why)

    def _start_request(self) -> None:
        """The first byte of a request (or the connection itself): both deadlines start now."""
        now = asyncio.get_running_loop().time()
        self.idle = False
        self.header_deadline = now + self.limits.header_timeout
        self.request_deadline = now + self.limits.request_timeout
        if self.header_deadline < self.request_deadline:
            self._arm(self.header_deadline, "header_timeout")
        else:
            self._arm(self.request_deadline, "request_timeout")

    def _expired(self, why: str) -> None:
        self.timer = None
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.idle:  # a kept-alive connection nobody used: closing it is routine, not a drop
            t.close()
            return
        if why == "header_timeout" and self.request is not None:  # the head came; the request deadline remains
            self._arm(self.request_deadline, "request_timeout")
            return
        if not self.closing:
            self.app.dropped[why] += 1
        t.abort()

    # -- asyncio callbacks ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport  # type: ignore[assignment]
        # high=0: pause_writing as soon as an answer is not written at once, resume_writing once it all is.
        t.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]
        self.app.admit(self)
        self._start_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connections.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # the tail of a refused request, or requests after a Connection: close answer: not read
        if self.idle:
            self._start_request()
        self.fed += len(data)
        self.conn.receive_data(data)
        if not self.draining:
            self._process()

    def eof_received(self) -> bool | None:
        return None  # the client is done: close the transport

    def pause_writing(self) -> None:
        if self.draining and self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.draining:
            self.draining = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
                self._next_cycle()
                self._process()

    # -- requests ------------------------------------------------------------------------------------------
    def _unread(self) -> int:
        return len(self.conn.trailing_data[0])

    def _process(self) -> None:
        """Read the events h11 has for us until it needs more bytes, answering each request when it is whole."""
        limits = self.limits
        while not self.closing and not self.draining:
            if self.request is None and self.fed > limits.max_header_bytes and not self._head_fits():
                self._too_large_head()  # before h11 parses it: a huge head is refused for its size alone
                return
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc)
                return
            if event is h11.NEED_DATA:
                if self.request is None and self._unread() >= limits.max_header_bytes:
                    self._too_large_head()
                return
            if isinstance(event, h11.Request):
                if self.fed - self._unread() > limits.max_header_bytes:
                    self._too_large_head()
                    return
                self.request = event
                self._check_request(event)
            elif isinstance(event, h11.Data):
                self.body_bytes += len(event.data)
                if self.body_bytes > limits.max_body_bytes:
                    self._too_large_body()
                    return
            elif isinstance(event, h11.EndOfMessage):
                request = self.request
                if request is not None:
                    self._answer(request)
            else:  # ConnectionClosed or PAUSED: nothing more to read on this cycle
                return

    def _head_fits(self) -> bool:
        """Whether the next request head ends within max_header_bytes of the unread bytes (or has not come)."""
        limit = self.limits.max_header_bytes
        start = self.conn.trailing_data[0][: limit + 4]
        return len(start) <= limit or b"\r\n\r\n" in start or b"\n\n" in start

    def _too_large_head(self) -> None:
        self.respond(431, _TEXT, f"request head larger than {self.limits.max_header_bytes} bytes\n".encode(),
                     close=True)

    def _too_large_body(self) -> None:
        self.respond(413, _TEXT, f"request body larger than {self.limits.max_body_bytes} bytes\n".encode(),
                     close=True)

    def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a request h11 could not read with the status it hints and what was wrong."""
        reason = str(exc)
        if reason.startswith(("illegal request line", "no request line")):
            self.respond(400, _TEXT, _BAD_REQUEST_LINE, close=True)
        elif exc.error_status_hint == 431:
            self._too_large_head()
        else:
            # h11 names what it refused ("Missing mandatory Host: header", "illegal header line: ..."). Its
            # one other hint, 501 for a transfer coding other than chunked, is a client's fault here too: 400.
            self.respond(400, _TEXT, f"bad request: {reason[:200]}\n".encode("utf-8", "replace"), close=True)

    def _check_request(self, request: h11.Request) -> None:
        """Refuse at once what will not be served (before reading any body); otherwise read on."""
        self.method = request.method
        if not request.http_version.startswith(b"1."):
            self.respond(400, _TEXT, _BAD_REQUEST_LINE, close=True)
            return
        if request.method != b"GET":
            self.respond(405, _TEXT, b"only GET is supported\n", (("Allow", "GET"),), close=True)
            return
        for name, value in request.headers:
            if name == b"content-length" and int(value) > self.limits.max_body_bytes:  # h11 checked the digits
                self._too_large_body()
                return
        tokens = {t.strip() for name, v in request.headers if name == b"connection" for t in v.lower().split(b",")}
        self.keep_alive = (self.limits.keepalive_timeout > 0 and request.http_version == b"1.1"
                           and b"close" not in tokens)

    def _answer(self, request: h11.Request) -> None:
        try:
            path = urlsplit(request.target.decode("latin-1")).path
        except ValueError as exc:  # "Invalid IPv6 URL" for a target like http://[/
            self.respond(400, _TEXT, f"bad request: cannot read the request target: {exc}\n".encode(), close=True)
            return
        status, ctype, body = self.app.route(path)
        self.respond(status, ctype, body, close=not self.keep_alive)

    def respond(self, status: int, ctype: str, body: bytes, extra: tuple[tuple[str, str], ...] = (), *,
                close: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                   ("X-Content-Type-Options", "nosniff"), ("Server", f"lmgrd/{__version__}")]
        if ctype == _HTML:
            headers.append(("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"))
        headers.extend(extra)
        if close:  # last, where h11 puts it when the client asked for the close itself
            headers.append(("Connection", "close"))
        try:
            out = self.conn.send(h11.Response(status_code=status, headers=headers,
                                              reason=_REASONS.get(status, "Unknown")))
            if self.method != b"HEAD":  # the answer to a HEAD has the headers of a GET and no body
                out += self.conn.send(h11.Data(data=body))
            out += self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            logger.exception("monitoring: cannot frame a %d answer", status)
            t.abort()
            return
        if close or self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
            self.closing = True
            t.write(out)
            # Close our side once the answer is flushed, and keep discarding what the client still sends until
            # it closes (or the request deadline): closing at once with unread data would reset the connection,
            # and a reset can destroy the answer before the client reads it (a refused head still arriving).
            if t.can_write_eof():
                t.write_eof()
            else:
                t.close()
            return
        self.draining = True
        self.app.touch(self)
        t.write(out)
        if t.get_write_buffer_size() == 0:  # written at once (the usual case): no resume_writing will come
            self.draining = False
            self._next_cycle()
        else:
            t.pause_reading()

    def _next_cycle(self) -> None:
        """The answer is taken: wait (keepalive_timeout) for the next request, or time the pipelined one (the
        caller's ``_process`` loop reads it: never from here, so pipelined requests never recurse)."""
        self.conn.start_next_cycle()
        self.request = None
        self.body_bytes = 0
        self.method = b""
        self.fed = self._unread()  # bytes of the next request already here
        if self.fed:
            self._start_request()
        else:
            self.idle = True
            self._arm(asyncio.get_running_loop().time() + self.limits.keepalive_timeout, "keepalive")


class MonitorHTTP:
    """Routes and the listening socket(s) of the monitoring port."""

    def __init__(self, server: Server, metrics: Metrics, limits: HTTPLimits | None = None) -> None:
        self.server = server
        self.metrics = metrics
        self.limits = limits if limits is not None else HTTPLimits.from_config(DaemonConfig())
        # Open connections, oldest activity first (connected, or last answered): the one to evict at the cap.
        self.connections: dict[HTTPProtocol, None] = {}
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.listener: asyncio.AbstractServer | None = None
        self.port = 0
        self.urls: list[str] = []
        metrics.registry.register(_HTTPCollector(self))

    def admit(self, proto: HTTPProtocol) -> None:
        """A new connection: at the cap, the connection idle or slow the longest makes room for it.

        Evicting the oldest rather than refusing the newest keeps the port usable under a flood of slow
        connections: an honest scraper sends its request at once and is answered long before max_connections
        newer connections push it to the front, while a slowloris connection ages there and is cut.
        """
        while len(self.connections) >= self.limits.max_connections:
            oldest = next(iter(self.connections))
            del self.connections[oldest]
            self.dropped["evicted"] += 1
            if oldest.transport is not None:
                oldest.transport.abort()
        self.connections[proto] = None

    def touch(self, proto: HTTPProtocol) -> None:
        """``proto`` was just answered: it goes to the back of the eviction order."""
        if self.connections.pop(proto, 0) is None:
            self.connections[proto] = None

    def route(self, path: str) -> tuple[int, str, bytes]:
        try:
            if path == "/metrics":
                return 200, CONTENT_TYPE, self.metrics.dump()
            if path == "/healthz":
                ok, why = health(self.server)
                return (200, _TEXT, b"ok\n") if ok else (503, _TEXT, f"not serving: {why}\n".encode())
            if path in ("/", "/index.html"):
                return 200, _HTML, render_status(self.server, self.metrics).encode("utf-8")
        except Exception:
            logger.exception("monitoring request %s failed", path)
            return 503, _TEXT, b"internal error rendering this page; see the lmgrd log\n"
        return 404, _TEXT, b"not found; try /metrics, /healthz or /\n"

    async def start(self, bind: str, port: int, backlog: int | None = None) -> bool:
        """Listen; on failure log why and return False (licenses keep being served either way).

        ``backlog`` is the listen queue (default: the daemon's ``backlog`` setting). asyncio's own default of 100
        is too short for a flood of connections: once it is full the kernel drops handshakes, and honest scrapers
        wait for SYN retransmits (a second or more) however fast the connections ahead of them are shed.
        """
        loop = asyncio.get_running_loop()
        try:
            self.listener = await loop.create_server(lambda: HTTPProtocol(self), host=bind or None, port=port,
                                                     reuse_address=True,
                                                     backlog=backlog if backlog is not None else DaemonConfig().backlog)
        except OSError as exc:
            logger.error("cannot serve metrics and the status page on %s port %d: %s; licenses are still served. "
                         "Choose another --metrics-port (0 turns it off) or --metrics-bind",
                         bind or "every interface", port, exc.strerror or exc)
            return False
        socks = self.listener.sockets or ()
        seen: list[str] = []
        for s in socks:
            addr, p = s.getsockname()[:2]
            self.port = p
            url = f"http://[{addr}]:{p}/" if ":" in addr else f"http://{addr}:{p}/"
            if url not in seen:
                seen.append(url)
        self.urls = seen
        logger.info("metrics and status page on %s (GET /metrics, /healthz, /)", ", ".join(seen))
        return True

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            for proto in list(self.connections):
                if proto.transport is not None:
                    proto.transport.abort()
            await self.listener.wait_closed()
            self.listener = None


class _HTTPCollector(Collector):
    """The monitoring port's own gauges and counters, read at scrape time."""

    def __init__(self, http: MonitorHTTP) -> None:
        self.http = http

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("lmgrd_http_connections", "Connections open to the monitoring port",
                                value=len(self.http.connections))
        dropped = CounterMetricFamily("lmgrd_http_connections_dropped", "Monitoring connections the daemon cut: a "
                                      "request head or whole request too slow, or evicted at metrics_max_connections",
                                      labels=["reason"])
        for reason, n in self.http.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped


@dataclass
class Monitor:
    """What :func:`start_monitoring` started; ``close()`` stops it."""

    metrics: Metrics
    http: MonitorHTTP | None
    textfile: TextfileWriter | None

    async def close(self) -> None:
        if self.textfile is not None:
            await self.textfile.close()
        if self.http is not None:
            await self.http.close()


async def start_monitoring(server: Server, cfg: DaemonConfig) -> Monitor:
    """Attach metrics to ``server`` and start the monitoring port and the text file as configured."""
    metrics = attach(server)
    http: MonitorHTTP | None = None
    if cfg.metrics_port:
        http = MonitorHTTP(server, metrics, HTTPLimits.from_config(cfg))
        bind = cfg.metrics_bind if cfg.metrics_bind is not None else cfg.bind
        port = 0 if cfg.metrics_port == "auto" else cfg.metrics_port
        if not await http.start(bind, port, cfg.backlog):
            http = None
    else:
        logger.info("metrics port off (metrics_port 0); lmutil lmstat --prometheus still prints the metrics")
    textfile: TextfileWriter | None = None
    if cfg.metrics_textfile is not None:
        textfile = TextfileWriter(metrics, Path(cfg.metrics_textfile), cfg.metrics_textfile_interval)
        textfile.start()
    return Monitor(metrics, http, textfile)
