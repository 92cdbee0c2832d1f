"""A loopback TCP fault proxy: put it between clients and a server, then break the network on purpose.

Reusable by any test (lmgrd's fault scenarios, the HA tests' links between peers and their store). It
listens on 127.0.0.1 (an ephemeral port by default), opens one upstream connection per client connection
and copies bytes both ways, applying the faults switched on at that moment. Every switch takes effect at
once on live connections and on new ones, and may be flipped from any thread.

Faults (each independent; :meth:`FaultProxy.clear` turns them all off):

``delay(seconds)``
    Latency: every chunk is forwarded ``seconds`` after it was read (throughput is not reduced).
``bandwidth(bytes_per_second)``
    A rate limit per direction and connection (``None``: unlimited).
``stall()`` / ``resume()``
    Nothing is read or forwarded while stalled; connections stay open and TCP flow control pushes back on
    the senders. Resuming delivers everything, in order (a network pause that TCP survives).
``drop()`` / ``undrop()``
    Bytes read are thrown away (a black hole: connections stay open, data is lost for good).
``half_open()``
    Every live connection loses its upstream half: the server sees the connection close, the client sees
    nothing at all (no FIN, no RST; its bytes vanish), as when a NAT or firewall forgets a flow.
``reset()``
    Every live connection is reset (RST) on both sides, as when a router or the peer's host reboots.
``refuse()`` / ``accept()``
    New connections are reset as soon as they are accepted (nothing listening that answers).
``blip(seconds)``
    ``reset()`` and ``refuse()`` for ``seconds``, then ``accept()`` again: a short outage.

In-process::

    with FaultProxy(("127.0.0.1", daemon_port)) as proxy:
        client = connect(f"{proxy.port}@127.0.0.1")
        proxy.blip(1.5)

As a process (``python tests/faultproxy.py --upstream 127.0.0.1:27000 [--listen-port 0]``) it prints
``listening on 127.0.0.1:PORT`` and then reads one command per line on stdin: ``delay S``,
``bandwidth BPS|off``, ``stall``, ``resume``, ``drop``, ``undrop``, ``half_open``, ``reset``, ``refuse``,
``accept``, ``blip S``, ``clear``, ``stats``, ``quit``; each answers ``ok`` (``stats``: a JSON line) or
``error: ...``. EOF on stdin stops it.

Only the standard library; loopback only (the listen address is 127.0.0.1 unless you pass another).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FaultProxy", "ProxyStats"]

_CHUNK = 65536


@dataclass
class ProxyStats:
    """Counts since start (read with :meth:`FaultProxy.stats`)."""

    accepted: int = 0  # client connections accepted (refused ones included)
    refused: int = 0  # reset at accept while refusing
    resets: int = 0  # connections reset by reset() or blip()
    half_opened: int = 0  # connections whose upstream half was cut by half_open()
    bytes_up: int = 0  # forwarded client -> server
    bytes_down: int = 0  # forwarded server -> client
    dropped_bytes: int = 0  # read and thrown away (drop, half-open)
    live: int = 0  # connections open now


@dataclass(eq=False)
class _Link:
    down: asyncio.StreamWriter  # the client's connection to us
    up: asyncio.StreamWriter | None = None  # our connection to the server
    half_open: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(w: asyncio.StreamWriter | None) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a FIN."""
    if w is None:
        return
    sock = w.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


class FaultProxy:
    """A TCP proxy from ``listen`` to ``upstream`` with run-time switchable faults (see the module docstring).

    Args:
        upstream: (host, port) of the real server.
        listen: (host, port) to listen on; port 0 picks a free one (read :attr:`port` after :meth:`start`).

    The proxy runs its own event loop on a daemon thread, so it works the same from blocking tests, from
    async tests (any loop) and as a subprocess. Every method is thread-safe and returns once the change is
    in effect.
    """

    def __init__(self, upstream: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.upstream = upstream
        self.listen = listen
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._links: set[_Link] = set()
        self._stats = ProxyStats()
        self._delay = 0.0
        self._bps: float | None = None
        self._dropping = False
        self._refusing = False
        self._flowing: asyncio.Event | None = None  # cleared while stalled
        self._blip_timer: asyncio.TimerHandle | None = None

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        """Start listening (returns self; :attr:`port` is then set)."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # reported to start()'s caller
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close_all())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"faultproxy->{self.upstream[1]}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start within 10 s")
        if errors:
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection (with a reset), and stop the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """The proxy as an lmgrd server address, ``port@127.0.0.1``."""
        return f"{self.port}@{self.listen[0]}"

    # -- faults -------------------------------------------------------------------------------------------------
    def delay(self, seconds: float) -> None:
        """Forward every chunk ``seconds`` after it was read (0: no added latency)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._call(lambda: setattr(self, "_delay", float(seconds)))

    def bandwidth(self, bytes_per_second: float | None) -> None:
        """Limit each direction of each connection to ``bytes_per_second`` (``None``: unlimited)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bandwidth must be > 0 bytes per second, or None")
        self._call(lambda: setattr(self, "_bps", bytes_per_second))

    def stall(self) -> None:
        """Stop reading and forwarding (connections stay open) until :meth:`resume`."""
        self._call(lambda: self._ev().clear())

    def resume(self) -> None:
        """End a stall: everything held back is delivered, in order."""
        self._call(lambda: self._ev().set())

    def drop(self) -> None:
        """Throw away every byte read, both ways, until :meth:`undrop` (connections stay open)."""
        self._call(lambda: setattr(self, "_dropping", True))

    def undrop(self) -> None:
        self._call(lambda: setattr(self, "_dropping", False))

    def half_open(self) -> int:
        """Cut the upstream half of every live connection (the server sees it close; the client sees nothing,
        and what it sends is lost). Returns how many connections were cut."""
        return self._call(self._half_open)

    def reset(self) -> int:
        """Reset every live connection on both sides; returns how many."""
        return self._call(self._reset)

    def refuse(self) -> None:
        """Reset new connections at accept until :meth:`accept`."""
        self._call(lambda: setattr(self, "_refusing", True))

    def accept(self) -> None:
        self._call(self._accept)

    def blip(self, seconds: float) -> int:
        """A short outage: reset every connection and refuse new ones for ``seconds``; returns connections reset.
        Returns at once; the proxy accepts again by itself."""
        def go() -> int:
            self._refusing = True
            if self._blip_timer is not None:
                self._blip_timer.cancel()
            assert self._loop is not None
            self._blip_timer = self._loop.call_later(seconds, self._accept)
            return self._reset()
        return self._call(go)

    def clear(self) -> None:
        """Every fault off: a plain pass-through again (connections already cut stay cut)."""
        def go() -> None:
            self._delay = 0.0
            self._bps = None
            self._dropping = False
            self._accept()
            self._ev().set()
        self._call(go)

    def stats(self) -> ProxyStats:
        """A copy of the counters."""
        return self._call(lambda: ProxyStats(**{**vars(self._stats), "live": len(self._links)}))

    # -- internals ----------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fault proxy is not running; call start() first")

        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    def _ev(self) -> asyncio.Event:
        assert self._flowing is not None
        return self._flowing

    def _accept(self) -> None:
        self._refusing = False
        if self._blip_timer is not None:
            self._blip_timer.cancel()
            self._blip_timer = None

    def _reset(self) -> int:
        n = 0
        for link in list(self._links):
            _rst(link.down)
            _rst(link.up)
            for t in link.tasks:
                t.cancel()
            self._links.discard(link)
            n += 1
        self._stats.resets += n
        return n

    def _half_open(self) -> int:
        n = 0
        for link in self._links:
            if not link.half_open and link.up is not None:
                link.half_open = True
                link.up.close()  # a FIN to the server; the client's side stays open and silent
                n += 1
        self._stats.half_opened += n
        return n

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._on_client, self.listen[0], self.listen[1])
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset()  # cancels every pump; the per-connection tasks then finish by themselves
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._stats.accepted += 1
        if self._refusing:
            self._stats.refused += 1
            _rst(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._links.discard(link)
            _rst(writer)
            return
        if link not in self._links:  # reset while connecting
            _rst(up_w)
            return
        link.up = up_w
        link.tasks = [asyncio.ensure_future(self._pump(link, reader, lambda: link.up, True)),
                      asyncio.ensure_future(self._pump(link, up_r, lambda: link.down, False))]
        try:
            # Ends when both directions have (or reset() cancelled them); this task itself is never cancelled.
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            if link in self._links:
                self._links.discard(link)
                for w in (link.down, link.up):
                    if w is not None:
                        w.close()

    async def _pump(self, link: _Link, reader: asyncio.StreamReader,
                    dest: Callable[[], asyncio.StreamWriter | None], upward: bool) -> None:
        """Copy one direction: read, wait out a stall, drop or delay, pace to the bandwidth, write."""
        flowing = self._ev()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(link, queue, dest, upward))
        try:
            while True:
                await flowing.wait()
                try:
                    data = await reader.read(_CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    await queue.put((0.0, b""))  # EOF: pass it on after what is queued
                    await sender
                    return
                if self._dropping or (link.half_open and upward):
                    self._stats.dropped_bytes += len(data)
                    continue
                if link.half_open and not upward:
                    continue  # the server's half is gone
                await queue.put((time.monotonic() + self._delay, data))
        finally:
            sender.cancel()

    async def _send(self, link: _Link, queue: asyncio.Queue[tuple[float, bytes]],
                    dest: Callable[[], asyncio.StreamWriter | None], upward: bool) -> None:
        flowing = self._ev()
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await flowing.wait()
            w = dest()
            if w is None or w.is_closing():
                return
            if not data:
                if not (link.half_open and not upward):  # a half-open client never hears of the close
                    with contextlib.suppress(OSError, RuntimeError):
                        w.write_eof()
                return
            if self._dropping:
                self._stats.dropped_bytes += len(data)
                continue
            view = memoryview(data)
            while view:
                bps = self._bps
                n = len(view) if bps is None else max(1, min(len(view), int(bps / 20)))
                piece, view = view[:n], view[n:]
                try:
                    w.write(piece)
                    await w.drain()
                except (ConnectionError, OSError):
                    return
                if upward:
                    self._stats.bytes_up += n
                else:
                    self._stats.bytes_down += n
                if bps is not None:
                    await asyncio.sleep(n / bps)


# -- the command line ---------------------------------------------------------------------------------------
def _command(proxy: FaultProxy, line: str) -> str:
    words = line.split()
    if not words:
        return "ok"
    cmd, args = words[0], words[1:]
    try:
        if cmd == "delay":
            proxy.delay(float(args[0]))
        elif cmd == "bandwidth":
            proxy.bandwidth(None if args[0] == "off" else float(args[0]))
        elif cmd == "blip":
            proxy.blip(float(args[0]))
        elif cmd in ("stall", "resume", "drop", "undrop", "half_open", "reset", "refuse", "accept", "clear"):
            if args:
                return f"error: {cmd} takes no argument"
            getattr(proxy, cmd)()
        elif cmd == "stats":
            return json.dumps(vars(proxy.stats()))
        else:
            return f"error: unknown command {cmd!r}"
    except (IndexError, ValueError) as exc:
        return f"error: {cmd}: {exc or 'missing argument'}"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Loopback TCP fault proxy; commands on stdin (see the module doc).")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the real server")
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--listen-port", type=int, default=0, help="0 picks a free port (printed)")
    a = p.parse_args(argv)
    host, _, port = a.upstream.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--upstream must be HOST:PORT, not {a.upstream!r}")
    with FaultProxy((host, int(port)), (a.listen_host, a.listen_port)) as proxy:
        print(f"listening on {a.listen_host}:{proxy.port}", flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            print(_command(proxy, line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
