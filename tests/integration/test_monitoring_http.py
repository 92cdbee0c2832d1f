"""The monitoring port's HTTP edges over real sockets, in process: a real ``Server`` and its real ``MonitorHTTP``
on this test's loop, raw bytes in, raw bytes out. What is pinned here is the contract of the port: GET only,
kept-alive HTTP/1.1 connections closed after an idle timeout (and ``Connection: close`` when the client asks or
the keep-alive timeout is 0), bounded request head and body, header and request deadlines, a cap on connections
that evicts the oldest, and every bad request answered with a 4xx (never a traceback, never an unhandled loop
exception). Short limits are passed to ``MonitorHTTP`` so the timeout tests take a fraction of a second; the
daemon's own defaults are checked against the real subprocess in ``test_monitoring.py``."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import write_license
from prometheus_client import CollectorRegistry

from lmgrd import __version__
from lmgrd.cli import load_licensing
from lmgrd.config import DaemonConfig, build_config
from lmgrd.daemon.server import Server
from lmgrd.monitoring.http import HTTPLimits, MonitorHTTP
from lmgrd.monitoring.metrics import attach
from lmgrd.storage.journal import open_store

Body = Callable[[int], Awaitable[None]]
BAD_LINE = b"expected an HTTP/1.x request line such as: GET /metrics HTTP/1.1\n"
DEFAULTS = HTTPLimits.from_config(DaemonConfig())
MAX_REQUEST_BYTES = DEFAULTS.max_header_bytes
#: The listener of the test running now (for a body that watches its connections).
LIVE: list[MonitorHTTP] = []


def serve(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], body: Body, **limits: Any) -> MonitorHTTP:
    """Run ``body(port)`` against a real daemon's monitoring port on this loop; fail on any loop exception.

    ``limits`` override fields of the default :class:`HTTPLimits`; the listener is returned for its counters.
    """
    key, pub = vendor
    lic = tmp_path / "site.lic"
    write_license(lic, key, (("CADPRO", "2.1", 2),))
    cfg = build_config({}, {"licenses": [str(lic)], "vendor_key": str(pub), "port": 0, "bind": "127.0.0.1",
                            "state_dir": str(tmp_path / "state"), "admin_token_file": str(tmp_path / "admin.token")},
                       "test")
    licensing, _problems = load_licensing(cfg)
    used: list[MonitorHTTP] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        (tmp_path / "state").mkdir(exist_ok=True)
        server = Server(cfg, licensing, open_store(tmp_path / "state"))
        http = MonitorHTTP(server, attach(server, CollectorRegistry()), dataclasses.replace(DEFAULTS, **limits))
        used.append(http)
        LIVE[:] = [http]
        await server.start()
        assert await http.start("127.0.0.1", 0)
        try:
            await body(http.port)
        finally:
            await http.close()
            server.request_shutdown("test over")
            await server.stopped.wait()
        assert not errors, errors

    asyncio.run(main())
    return used[0]


class Answer:
    """What came back on one connection: the raw bytes up to EOF, split into status, headers and body."""

    def __init__(self, raw: bytes, reset: bool) -> None:
        self.raw, self.reset = raw, reset
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.headers = [tuple(x.split(": ", 1)) for x in lines[1:] if x]

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ")[1])

    def header(self, name: str) -> str:
        found = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(found) == 1, (name, self.headers)
        return found[0]


async def exchange(port: int, *pieces: bytes, pause: float = 0.0, timeout: float = 5.0) -> Answer:
    """Send ``pieces`` (``pause`` seconds apart), then read to EOF; a reset counts as EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out, reset = b"", False
    try:
        for i, piece in enumerate(pieces):
            if i and pause:
                await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    except (ConnectionResetError, BrokenPipeError):
        reset = True
    finally:
        writer.close()
    return Answer(out, reset)


CLOSE = b"Host: lmgrd\r\nConnection: close\r\n"


def get(path: str = "/healthz", version: str = "1.1", headers: bytes = CLOSE) -> bytes:
    """A GET; by default it asks for ``Connection: close`` so that ``exchange`` reads its answer to EOF."""
    return f"GET {path} HTTP/{version}\r\n".encode() + headers + b"\r\n"


def test_a_get_is_answered_once_with_the_same_headers_as_before(tmp_path: Path,
                                                                vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(port: int) -> None:
        a = await exchange(port, get())
        assert a.status_line == "HTTP/1.1 200 OK" and a.body == b"ok\n"
        assert a.headers == [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "3"),
                             ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                             ("Server", f"lmgrd/{__version__}"), ("Connection", "close")]
        page = await exchange(port, get("/"))
        assert page.status == 200 and page.header("Content-Type") == "text/html; charset=utf-8"
        assert page.header("Content-Security-Policy") == "default-src 'none'; style-src 'unsafe-inline'"
        assert int(page.header("Content-Length")) == len(page.body) and b"CADPRO" in page.body
        index = await exchange(port, get("/index.html"))  # the same page under its file name
        assert index.status == 200 and index.body.startswith(b"<!DOCTYPE html>") and b"CADPRO" in index.body
        m = await exchange(port, get("/metrics?format=ignored"))  # the query string is ignored
        assert m.status == 200 and m.header("Content-Type").startswith("text/plain; version=0.0.4")
        assert b"lmgrd_seats" in m.body
        absolute = await exchange(port, get("http://lmgrd:9000/healthz"))  # absolute-form target
        assert absolute.status == 200 and absolute.body == b"ok\n"
        old = await exchange(port, get(version="1.0", headers=b""))  # HTTP/1.0 needs no Host
        assert old.status_line == "HTTP/1.1 200 OK" and old.body == b"ok\n" and old.header("Connection") == "close"
        # bare LF line ends are read too
        bare = await exchange(port, b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n")
        assert bare.status == 200

    serve(tmp_path, vendor, body)


def test_unknown_path_method_and_head(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(port: int) -> None:
        a = await exchange(port, get("/nowhere"))
        assert a.status_line == "HTTP/1.1 404 Not Found" and a.body == b"not found; try /metrics, /healthz or /\n"
        post = await exchange(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert post.status_line == "HTTP/1.1 405 Method Not Allowed" and post.header("Allow") == "GET"
        assert post.body == b"only GET is supported\n"
        lower = await exchange(port, b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # methods are case-sensitive
        assert lower.status == 405
        # HEAD is refused like any other method; its answer carries the headers but, as HTTP requires of a
        # response to HEAD, no body.
        head = await exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.status_line == "HTTP/1.1 405 Method Not Allowed" and head.header("Allow") == "GET"
        assert head.header("Content-Length") == str(len(b"only GET is supported\n")) and head.body == b""

    serve(tmp_path, vendor, body)


def test_malformed_requests_get_a_400_never_a_traceback(tmp_path: Path,
                                                        vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(port: int) -> None:
        for bad in (b"hello\r\n\r\n", b"GET /\r\n\r\n", b"GET  /healthz  HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"\r\n\r\n", b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", b"GET /healthz FTP/1.1\r\n\r\n",
                    b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n"):
            a = await exchange(port, bad)
            assert (a.status_line, a.body) == ("HTTP/1.1 400 Bad Request", BAD_LINE), (bad, a.raw)
            assert a.header("Connection") == "close"
        for bad, why in ((b"GET /healthz HTTP/1.1\r\n\r\n", b"Host"),  # HTTP/1.1 requires Host (RFC 9112 3.2)
                         (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"Host"),
                         (b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", b"header"),
                         (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n", b"Content-Length"),
                         (b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", b"Transfer-Encoding"),
                         (b"GET http://[/ HTTP/1.1\r\nHost: x\r\n\r\n", b"target")):
            a = await exchange(port, bad)
            assert a.status_line == "HTTP/1.1 400 Bad Request", (bad, a.raw)
            assert a.body.startswith(b"bad request: ") and why in a.body and a.body.endswith(b"\n"), a.body
            assert b"Traceback" not in a.raw

    serve(tmp_path, vendor, body)


def test_request_head_is_bounded_however_it_arrives(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    too_long = f"request head larger than {MAX_REQUEST_BYTES} bytes\n".encode()

    async def body(port: int) -> None:
        fits = get(headers=b"Host: x\r\nConnection: close\r\nX-Pad: " + b"a" * (MAX_REQUEST_BYTES - 200) + b"\r\n")
        assert len(fits) < MAX_REQUEST_BYTES
        assert (await exchange(port, fits)).status == 200
        big = get(headers=b"Host: x\r\nX-Big: " + b"a" * 20000 + b"\r\n")
        whole = await exchange(port, big)  # in one piece: the head is complete, but too large
        assert (whole.status_line, whole.body) == ("HTTP/1.1 431 Request Header Fields Too Large", too_long)
        pieces = [big[i:i + 1000] for i in range(0, len(big), 1000)]
        trickled = await exchange(port, *pieces, pause=0.005)  # a piece at a time: refused once past the limit
        assert (trickled.status, trickled.body) == (431, too_long), trickled.raw[:200]
        endless = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 3000)  # never ends
        assert endless.status == 431

    serve(tmp_path, vendor, body)


def test_pipelined_requests_get_one_answer_and_a_close(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(port: int) -> None:
        a = await exchange(port, get("/healthz") + get("/nowhere") + get("/metrics"))
        assert a.status == 200 and a.body == b"ok\n"  # exactly one response: no second status line follows
        assert a.raw.count(b"HTTP/1.1 ") == 1 and not a.reset
        # Sent in separate writes after the first was answered: the connection is already closed.
        b = await exchange(port, get("/healthz"), get("/nowhere"), pause=0.2)
        assert b.raw.count(b"HTTP/1.1 ") == 1 and b.status == 200

    serve(tmp_path, vendor, body)


def test_slow_and_silent_clients_are_cut_at_the_deadline(tmp_path: Path,
                                                         vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(port: int) -> None:
        start = time.monotonic()
        slowloris = asyncio.ensure_future(exchange(port, *[bytes([c]) for c in get()], pause=0.05, timeout=10))
        silent = asyncio.ensure_future(exchange(port, timeout=10))
        await asyncio.sleep(0.2)
        assert (await exchange(port, get())).status == 200  # others are served meanwhile
        for task in (slowloris, silent):
            a = await task
            assert a.raw == b"", a.raw  # cut without an answer (an abort, not a 408)
        took = time.monotonic() - start
        assert 0.5 <= took < 2.5, took

    http = serve(tmp_path, vendor, body, request_timeout=0.6)
    assert http.dropped == {"header_timeout": 0, "request_timeout": 2, "evicted": 0}, http.dropped


def test_at_the_cap_the_oldest_connection_makes_room(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(port: int) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        new = await exchange(port, get(), timeout=2)
        assert new.status == 200, new.raw  # the 4th is served...
        oldest_reader = held[0][0]
        async with asyncio.timeout(2):
            assert await oldest_reader.read() == b""  # ...and the oldest, which never sent a byte, was cut
        for _reader, writer in held:
            writer.close()
        await asyncio.sleep(0.1)
        assert (await exchange(port, get())).status == 200

    http = serve(tmp_path, vendor, body, max_connections=3)
    assert http.dropped["evicted"] >= 1, http.dropped


@pytest.mark.parametrize("split", [1, 7, 64])
def test_a_request_split_anywhere_is_read_the_same(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path],
                                                   split: int) -> None:
    async def body(port: int) -> None:
        req = get("/nowhere", headers=b"Host: x\r\nConnection: close\r\nUser-Agent: test\r\n")
        a = await exchange(port, *[req[i:i + split] for i in range(0, len(req), split)], pause=0.002)
        assert a.status == 404

    serve(tmp_path, vendor, body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One answer on a kept-alive connection: the head, then exactly Content-Length bytes."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return Answer(head + await reader.readexactly(length), False)


def test_keep_alive_serves_requests_in_turn_then_closes_when_idle(tmp_path: Path,
                                                                  vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    keep = b"Host: lmgrd\r\n"

    async def body(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path in ("/healthz", "/metrics", "/nowhere"):
            writer.write(get(path, headers=keep))
            a = await read_answer(reader)
            assert a.status == (404 if path == "/nowhere" else 200), a.raw[:200]
            assert all(k.lower() != "connection" for k, _v in a.headers), a.headers  # kept alive
        # Pipelined: three requests in one write, three answers in order, the last closes.
        writer.write(get("/healthz", headers=keep) + get("/nowhere", headers=keep) + get("/healthz"))
        answers = [await read_answer(reader) for _ in range(3)]
        assert [x.status for x in answers] == [200, 404, 200]
        assert answers[2].header("Connection") == "close"
        async with asyncio.timeout(2):
            assert await reader.read() == b""
        writer.close()
        # Idle: closed quietly after the keep-alive timeout (not counted as a drop).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get(headers=keep))
        assert (await read_answer(reader)).status == 200
        start = time.monotonic()
        async with asyncio.timeout(3):
            assert await reader.read() == b""
        assert time.monotonic() - start >= 0.2
        writer.close()

    http = serve(tmp_path, vendor, body, keepalive_timeout=0.3)
    assert http.dropped == {"header_timeout": 0, "request_timeout": 0, "evicted": 0}, http.dropped


def test_keepalive_timeout_zero_closes_after_every_answer(tmp_path: Path,
                                                          vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(port: int) -> None:
        a = await exchange(port, get(headers=b"Host: lmgrd\r\n"), timeout=2)
        assert a.status == 200 and a.header("Connection") == "close"

    serve(tmp_path, vendor, body, keepalive_timeout=0.0)


def test_request_body_is_bounded(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    too_large = b"request body larger than 100 bytes\n"

    async def body(port: int) -> None:
        small = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                     b"Content-Length: 100\r\n\r\n" + b"a" * 100)
        assert small.status == 200  # a body within the limit is read and ignored
        announced = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
        assert (announced.status, announced.body) == (413, too_large)  # refused from the header, unread
        chunk = b"40\r\n" + b"a" * 64 + b"\r\n"
        chunked = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + chunk * 2, timeout=2)
        assert (chunked.status, chunked.body) == (413, too_large)  # refused once past the limit

    serve(tmp_path, vendor, body, max_body_bytes=100)


def test_a_head_slower_than_the_header_timeout_is_cut(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(port: int) -> None:
        req = get()
        slow = asyncio.ensure_future(exchange(port, *[req[i:i + 4] for i in range(0, len(req), 4)], pause=0.05,
                                              timeout=5))
        # A body slower than the header timeout but within the request timeout is fine: only the head is timed.
        ok = asyncio.ensure_future(exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                                  b"Content-Length: 4\r\n\r\n", b"a", b"b", b"c", b"d", pause=0.15))
        assert (await slow).raw == b""
        assert (await ok).status == 200

    http = serve(tmp_path, vendor, body, header_timeout=0.3, request_timeout=3.0)
    assert http.dropped == {"header_timeout": 1, "request_timeout": 0, "evicted": 0}, http.dropped


def test_a_client_that_pipelines_without_reading_holds_one_answer(tmp_path: Path,
                                                                  vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(port: int) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/", headers=b"Host: x\r\n") * 2000)  # ~10 MB of answers, never read
        # Once the socket buffers are full the server stops reading, and cuts the connection at the request
        # deadline of the answer it could not deliver (the burst of answers before that takes under a second).
        async with asyncio.timeout(10):
            while LIVE[0].connections:
                await asyncio.sleep(0.05)
        writer.close()
        # The server is still fine for everyone else.
        assert (await exchange(port, get())).status == 200

    http = serve(tmp_path, vendor, body, request_timeout=0.5)
    assert http.dropped["request_timeout"] == 1, http.dropped  # cut: it never took its answers
