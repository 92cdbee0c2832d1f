"""A scripted protocol server for the client stub's tests.

A real asyncio TCP server on 127.0.0.1 that speaks the real wire protocol (``protocol.Connection(Role.SERVER)``);
each test chooses its behaviour (delay a reply, drop a connection, report a seat lost, never answer).
Nothing is mocked: the client under test uses real sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from protocol import (
    BadRequest,
    CheckedIn,
    Checkin,
    Checkout,
    Connection,
    ErrorCode,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    LostSeat,
    ProtocolError,
    Reply,
    Request,
    Resume,
    Resumed,
    Role,
    Status,
    StatusReply,
    Welcome,
)


class ServerConn:
    """One accepted connection of the scripted server."""

    def __init__(self, server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.proto = Connection(Role.SERVER)
        self.hello: Hello | None = None
        self.tokens: set[str] = set()

    def send(self, reply: Reply) -> None:
        if not self.writer.is_closing():
            self.writer.write(self.proto.send(reply))

    def abort(self) -> None:
        self.writer.transport.abort()


Handler = Callable[[ServerConn, Request], Awaitable[bool]]


class ScriptedServer:
    """A real protocol server whose answers the test chooses.

    By default it welcomes, grants every checkout with a fresh token, acknowledges heartbeats, resumes the
    tokens it granted, and answers status and checkin. ``handler`` runs first for every request; if it
    returns True the request counts as answered (the handler sent what it wanted, or nothing).
    """

    def __init__(self, heartbeat: float = 0.1, lease_timeout: float = 0.6) -> None:
        self.heartbeat = heartbeat
        self.lease_timeout = lease_timeout
        self.handler: Handler | None = None
        self.requests: list[tuple[int, Request]] = []  # (connection number, request)
        self.conns: list[ServerConn] = []
        self.granted: set[str] = set()
        self.released: list[str] = []
        self.lost_next: list[LostSeat] = []  # reported at the next heartbeat
        self.welcome: bool = True
        self.server: asyncio.Server | None = None
        self.port = 0
        self._sessions = itertools.count(1)
        self.event = asyncio.Event()  # set after every request
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"{self.port}@127.0.0.1"

    async def start(self, port: int = 0) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for c in self.conns:
                c.abort()
            for t in self._tasks:
                t.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks)
            await self.server.wait_closed()
            self.server = None

    def of(self, kind: type) -> list[Any]:
        return [r for _, r in self.requests if isinstance(r, kind)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.event.clear()
                await self.event.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = ServerConn(self, reader, writer)
        self.conns.append(conn)
        n = len(self.conns)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                try:
                    requests = conn.proto.receive_data(data)
                except ProtocolError as exc:
                    conn.send(ErrorReply(0, exc.code, exc.message, exc.hint))
                    return
                for req in requests:
                    if isinstance(req, BadRequest):
                        conn.send(ErrorReply(req.id, req.error.code, req.error.message, req.error.hint))
                        continue
                    self.requests.append((n, req))
                    if self.handler is None or not await self.handler(conn, req):
                        self.default(conn, req)
                    self.event.set()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    def grant(self, conn: ServerConn, req: Checkout, waited: float = 0.0) -> Granted:
        token = secrets.token_hex(16)
        self.granted.add(token)
        conn.tokens.add(token)
        return Granted(req.id, token, "CID-AAAA-BBBB-CCCC-DDDD", req.product, req.version, self.lease_timeout,
                       self.heartbeat, waited)

    def default(self, conn: ServerConn, req: Request) -> None:
        if isinstance(req, Hello):
            conn.hello = req
            if self.welcome:
                conn.send(Welcome(req.id, 1, "scripted-1", self.heartbeat, self.lease_timeout, 65536,
                                  next(self._sessions)))
        elif isinstance(req, Checkout):
            conn.send(self.grant(conn, req))
        elif isinstance(req, Heartbeat):
            lost, self.lost_next = tuple(self.lost_next), []
            conn.send(HeartbeatAck(req.id, len(conn.tokens), lost))
        elif isinstance(req, Checkin):
            held = req.token in self.granted
            self.granted.discard(req.token)
            self.released.append(req.token)
            conn.send(CheckedIn(req.id, held))
        elif isinstance(req, Resume):
            ok = tuple(t for t in req.tokens if t in self.granted)
            lost = tuple(LostSeat(t, ErrorCode.LEASE_NOT_FOUND, "not held") for t in req.tokens if t not in ok)
            conn.tokens.update(ok)
            conn.send(Resumed(req.id, ok, lost))
        elif isinstance(req, Status):
            conn.send(StatusReply(req.id, {"server_version": "scripted-1", "pid": os.getpid()}))
