"""The monitoring port: ``GET /metrics``, ``GET /healthz`` and a read-only status page at ``GET /``.

A deliberately small HTTP/1.1 server on the daemon's own event loop: an ``asyncio.Protocol`` that feeds the bytes
it receives to an ``h11.Connection(h11.SERVER)`` (sans-I/O, the model :mod:`protocol` follows) and sends the
bytes h11 frames. GET only; one request per connection, answered with ``Connection: close`` (pipelined requests
after the first are not read); the request head bounded to :data:`MAX_REQUEST_BYTES` however it arrives; a
per-connection deadline (:data:`REQUEST_TIMEOUT`) and a cap on concurrent connections (:data:`MAX_CONNECTIONS`),
so a slow or hostile scraper costs little and can never hold up license traffic. A request h11 cannot read is
answered with the 4xx it hints (400, or 431 for a head too large), never a traceback. Everything it shows is read
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

from lmgrd import __version__
from lmgrd.admin import commands as admin
from lmgrd.monitoring.metrics import CONTENT_TYPE, Metrics, TextfileWriter, activation_state, attach, reserved_seats

if TYPE_CHECKING:
    from lmgrd.config import DaemonConfig
    from lmgrd.daemon.api import DaemonView as Server

logger = logging.getLogger(__name__)

#: Largest request head (request line and headers) accepted; a GET needs far less.
MAX_REQUEST_BYTES = 8 * 1024
#: A connection must deliver its request and take its answer within this many seconds.
REQUEST_TIMEOUT = 10.0
#: Concurrent monitoring connections; more are closed at once (Prometheus uses one).
MAX_CONNECTIONS = 64
#: Holders listed per product on the status page (the page stays small with thousands of leases).
MAX_HOLDERS_SHOWN = 200
#: Seconds between the status page's own refreshes.
REFRESH_SECONDS = 5

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
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
class HTTPProtocol(asyncio.Protocol):
    """One monitoring connection: h11 reads one request; it is answered, then the connection closes."""

    def __init__(self, app: MonitorHTTP) -> None:
        self.app = app
        # h11 never holds more than MAX_REQUEST_BYTES of an unfinished head: data_received feeds it no more.
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        self.fed = 0  # bytes given to h11 so far (all of them part of the one request head we read)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False
        self.method = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.app.connections.add(self)
        if len(self.app.connections) > self.app.max_connections:
            transport.abort()  # type: ignore[attr-defined]
            return
        self.timer = asyncio.get_running_loop().call_later(self.app.request_timeout, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # a pipelined request, or the tail of a refused one: not read
        # Give h11 at most MAX_REQUEST_BYTES in all: a head that is complete within them is read whole, one
        # that is not is too large, whether it came in one piece or a byte at a time. (h11's own limit only
        # applies to an incomplete head, so a large head arriving in one piece would otherwise pass.)
        chunk = data[:MAX_REQUEST_BYTES - self.fed]
        self.fed += len(chunk)
        if chunk:  # an empty receive_data() means EOF to h11
            self.conn.receive_data(chunk)
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            self._refuse(exc)
            return
        if event is h11.NEED_DATA:
            if self.fed >= MAX_REQUEST_BYTES:
                self.respond(431, _TEXT, f"request head larger than {MAX_REQUEST_BYTES} bytes\n".encode())
            return
        if isinstance(event, h11.Request):
            self._handle(event)

    def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a request h11 could not read with the status it hints and what was wrong."""
        reason = str(exc)
        if reason.startswith(("illegal request line", "no request line")):
            self.respond(400, _TEXT, _BAD_REQUEST_LINE)
        elif exc.error_status_hint == 431:
            self.respond(431, _TEXT, f"request head larger than {MAX_REQUEST_BYTES} bytes\n".encode())
        else:
            # h11 names what it refused ("Missing mandatory Host: header", "illegal header line: ..."). Its
            # one other hint, 501 for a transfer coding other than chunked, is a client's fault here too: 400.
            self.respond(400, _TEXT, f"bad request: {reason[:200]}\n".encode("utf-8", "replace"))

    def _handle(self, request: h11.Request) -> None:
        self.method = request.method
        if not request.http_version.startswith(b"1."):
            self.respond(400, _TEXT, _BAD_REQUEST_LINE)
            return
        if request.method != b"GET":
            self.respond(405, _TEXT, b"only GET is supported\n", (("Allow", "GET"),))
            return
        try:
            path = urlsplit(request.target.decode("latin-1")).path
        except ValueError as exc:  # "Invalid IPv6 URL" for a target like http://[/
            self.respond(400, _TEXT, f"bad request: cannot read the request target: {exc}\n".encode())
            return
        status, ctype, body = self.app.route(path)
        self.respond(status, ctype, body)

    def respond(self, status: int, ctype: str, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.answered = True
        t = self.transport
        if t is None or t.is_closing():
            return
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close"),
                   ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                   ("Server", f"lmgrd/{__version__}")]
        if ctype == _HTML:
            headers.append(("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"))
        headers.extend(extra)
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
        t.write(out)
        # Close our side once the answer is flushed, and keep discarding what the client still sends until it
        # closes (or the deadline): closing at once with unread data would reset the connection, and a reset
        # can destroy the answer before the client reads it (a refused head that is still arriving).
        if t.can_write_eof():
            t.write_eof()
        else:
            t.close()

    def eof_received(self) -> bool | None:
        return None  # the client is done: close the transport


class MonitorHTTP:
    """Routes and the listening socket(s) of the monitoring port."""

    def __init__(self, server: Server, metrics: Metrics, *, request_timeout: float = REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.server = server
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.connections: set[HTTPProtocol] = set()
        self.listener: asyncio.AbstractServer | None = None
        self.port = 0
        self.urls: list[str] = []

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

    async def start(self, bind: str, port: int) -> bool:
        """Listen; on failure log why and return False (licenses keep being served either way)."""
        loop = asyncio.get_running_loop()
        try:
            self.listener = await loop.create_server(lambda: HTTPProtocol(self), host=bind or None, port=port,
                                                     reuse_address=True)
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
        http = MonitorHTTP(server, metrics)
        bind = cfg.metrics_bind if cfg.metrics_bind is not None else cfg.bind
        port = 0 if cfg.metrics_port == "auto" else cfg.metrics_port
        if not await http.start(bind, port):
            http = None
    else:
        logger.info("metrics port off (metrics_port 0); lmutil lmstat --prometheus still prints the metrics")
    textfile: TextfileWriter | None = None
    if cfg.metrics_textfile is not None:
        textfile = TextfileWriter(metrics, Path(cfg.metrics_textfile), cfg.metrics_textfile_interval)
        textfile.start()
    return Monitor(metrics, http, textfile)
