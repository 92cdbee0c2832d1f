"""What a connection costs to set up and hold (issue 9): the handshake sweep, the shared address strings, and
what a session allocates only on first use. A real Server (journal, licensing) with ClientProtocol on a
transport that records the frames the daemon writes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_rig import Rig, run
from harness import HOSTNAME, holder_secret

from lmgrd.daemon.transport import ClientProtocol, client_address
from protocol import Checkout, Connection, ErrorCode, Hello, LostSeat, Role
from protocol.framing import FrameDecoder

Vendor = tuple[Ed25519PrivateKey, Path]


class PeerTransport:
    """A socket stand-in with a peer address: keeps the frames written, and whether it was closed."""

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port = ip, port
        self.data = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("".join(self.ip), self.port) if name == "peername" else default  # a new string, as uvloop's

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def replies(self) -> list[dict[str, Any]]:
        return FrameDecoder().feed(bytes(self.data))


def connect(rig: Rig, ip: str = "127.0.0.1", port: int = 40000) -> tuple[ClientProtocol, PeerTransport]:
    p = ClientProtocol(rig.server)
    t = PeerTransport(ip, port)
    p.connection_made(t)  # type: ignore[arg-type]
    return p, t


def hello(user: str) -> bytes:
    return Connection(Role.CLIENT).send(Hello(1, (1, 2), HOSTNAME, user, 7, "test", "", holder_secret(user, HOSTNAME)))


def test_one_sweep_drops_every_silent_connection_and_a_hello_leaves_it(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        server = rig.server
        silent, ts = connect(rig, port=40001)
        talker, tt = connect(rig, port=40002)
        partial, tp = connect(rig, port=40003)
        assert list(server.awaiting_hello) == [silent, talker, partial]  # arrival order = deadline order
        assert server.handshake_handle is not None  # one timer for all of them
        talker.data_received(hello("talker"))
        partial.data_received(hello("partial")[:9])  # a hello cut short is no hello
        assert list(server.awaiting_hello) == [silent, partial]
        await asyncio.sleep(0.35)  # the timeout is 0.2 s; the sweep is at most 1/16 of it late
        for t in (ts, tp):
            (r,) = t.replies()
            assert r["op"] == "error" and r["code"] == str(ErrorCode.HANDSHAKE_TIMEOUT) and r["id"] == 0, r
            assert t.closed
        assert not tt.closed and [r["op"] for r in tt.replies()] == ["welcome"]
        assert server.counters.handshake_timeouts == 2
        assert server.awaiting_hello == {} and server.handshake_handle is None  # nothing left to wait for
        late, _ = connect(rig, port=40004)  # the sweep is armed again by the next connection
        assert server.handshake_handle is not None
        late.connection_lost(None)  # a connection gone before its hello leaves the table
        assert server.awaiting_hello == {}
        for p in (silent, talker, partial):
            p.connection_lost(None)

    run(tmp_path, vendor, body, extra={"handshake_timeout": 0.2})


def test_addresses_are_normalized_once_and_shared(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        a, _ = connect(rig, "::ffff:192.0.2.10", 1000)
        b, _ = connect(rig, "::ffff:192.0.2.10", 1001)
        c, _ = connect(rig, "not-an-ip", 1002)
        assert a.addr == "192.0.2.10" and a.addr is b.addr  # one string for every client of an address
        assert (a.peer, b.peer, c.peer) == ("192.0.2.10:1000", "192.0.2.10:1001", "not-an-ip:1002")
        assert rig.server.per_address == {"192.0.2.10": 2, "not-an-ip": 1}
        for p in (a, b, c):
            p.connection_lost(None)
        assert rig.server.per_address == {}

    client_address.cache_clear()
    run(tmp_path, vendor, body)


def test_a_client_allocates_lost_and_waiters_only_when_it_needs_them(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        p, _ = connect(rig)
        p.data_received(hello("alice"))
        assert p.conn.proto == 2 and p.conn.hello is None  # the daemon keeps no Hello, only its proto
        assert p.lost == () and p.waiters is None
        assert p.who() == f"alice@{HOSTNAME.split('.')[0].lower()}"
        holder = rig.connect("holder")
        rig.checkout(holder)  # the one seat
        rig.server.handlers.dispatch(p, Checkout(2, "CADPRO", "2.1", 30.0))
        assert p.waiters is not None and len(p.waiters) == 1
        p.connection_lost(None)  # leaving drops its wait, and the dict with it
        assert p.waiters is None and rig.server.leases.waits == {}
        p.tell(LostSeat("t1", ErrorCode.SEAT_REMOVED, "gone"))
        p.tell(LostSeat("t2", ErrorCode.LEASE_EXPIRED, "gone"))
        assert [x.token for x in p.lost] == ["t1", "t2"]

    run(tmp_path, vendor, body)


def test_the_welcome_is_what_the_message_class_encodes(tmp_path: Path, vendor: Vendor) -> None:
    async def body(rig: Rig) -> None:
        p, t = connect(rig)
        p.data_received(hello("bob"))
        await asyncio.sleep(0)
        (w,) = t.replies()
        cfg = rig.server.cfg
        from lmgrd import __version__
        assert w == {"op": "welcome", "id": 1, "proto": 2, "server_version": __version__,
                     "heartbeat_interval": cfg.heartbeat_interval, "lease_timeout": cfg.lease_timeout,
                     "max_frame": cfg.max_frame_bytes, "session": p.session}, w
        assert msgpack.unpackb(bytes(t.data[4:]))["session"] == p.session
        p.connection_lost(None)

    run(tmp_path, vendor, body)
