"""The honest ceiling: the smallest uvloop seat server that speaks lmgrd's wire bytes, and nothing more.

Nothing from ``protocol/`` or ``lmgrd/``: a bare ``asyncio.Protocol`` that splits the 4-byte big-endian
length prefix itself, unpacks each body with ``msgpack.unpackb`` straight into a dict, and answers from one
dict of seats (``product -> [count, in use]``) and one of tokens (``token -> product``). No validation beyond
what msgpack does, no ledger, no journal, no logging, no timers. The replies carry the same fields as the
daemon's (``protocol/PROTOCOL.md``), so ``benchmarks/load.py`` drives both with the same frames and checks
both the same way. This is what an outside reviewer writes in ten minutes to ask "how fast could Python go
here?"; whatever the daemon costs above it is the price of its checks, its durability and its structure.

    python benchmarks/ceiling.py --port 0 --pool BURST=8000 --pool CHURN=100000

prints ``ceiling listening on 127.0.0.1:PORT`` on stdout once it accepts connections, and exits 0 on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys
from typing import Any

import msgpack

BACKLOG = 8192  # the daemon's default listen backlog
LEASE_TIMEOUT = 90.0
HEARTBEAT = 30.0
CUSTOMER = "CEILING-0000"

_pack = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb
_token = os.urandom


def frame(msg: dict[str, Any]) -> bytes:
    body: bytes = _pack(msg)
    return len(body).to_bytes(4, "big") + body


SEATS: dict[str, list[int]] = {}  # product -> [count, in use]
TOKENS: dict[str, str] = {}  # token -> product
SESSIONS = [0]


class SeatProtocol(asyncio.Protocol):
    __slots__ = ("buf", "held", "transport")

    def __init__(self) -> None:
        self.buf = b""
        self.held = 0  # seats this connection holds (the heartbeat ack's "renewed")
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        if not self.buf and len(data) > 4 and int.from_bytes(data[:4], "big") == len(data) - 4:
            t.write(self.answer(_unpackb(data[4:])))  # the common case: exactly one whole frame
            return
        buf = self.buf + data
        pos, end = 0, len(buf)
        out = []
        while end - pos >= 4:
            n = int.from_bytes(buf[pos:pos + 4], "big")
            if end - pos - 4 < n:
                break
            out.append(self.answer(_unpackb(buf[pos + 4:pos + 4 + n])))
            pos += 4 + n
        self.buf = buf[pos:]
        if out:
            t.write(b"".join(out))

    def answer(self, m: dict[str, Any]) -> bytes:
        op = m["op"]
        rid = m["id"]
        if op == "checkout":
            product = m["product"]
            pool = SEATS.get(product)
            if pool is None:
                return frame({"op": "error", "id": rid, "code": "UNKNOWN_PRODUCT", "message": "no such product",
                              "hint": ""})
            if pool[1] >= pool[0]:
                return frame({"op": "error", "id": rid, "code": "NO_SEATS",
                              "message": f"all {pool[0]} seat(s) of {product} are in use", "hint": "try again later"})
            pool[1] += 1
            self.held += 1
            token = _token(16).hex()
            TOKENS[token] = product
            return frame({"op": "granted", "id": rid, "token": token, "customer_id": CUSTOMER, "product": product,
                          "version": m["version"], "lease_timeout": LEASE_TIMEOUT, "heartbeat_interval": HEARTBEAT,
                          "waited": 0.0})
        if op == "checkin":
            product = TOKENS.pop(m["token"], None)
            if product is not None:
                SEATS[product][1] -= 1
                self.held -= 1
            return frame({"op": "checked_in", "id": rid, "released": product is not None})
        if op == "heartbeat":
            return frame({"op": "heartbeat_ack", "id": rid, "renewed": self.held, "lost": []})
        if op == "hello":
            SESSIONS[0] += 1
            return frame({"op": "welcome", "id": rid, "proto": 1, "server_version": "ceiling",
                          "heartbeat_interval": HEARTBEAT, "lease_timeout": LEASE_TIMEOUT, "max_frame": 65536,
                          "session": SESSIONS[0]})
        return frame({"op": "error", "id": rid, "code": "BAD_REQUEST", "message": f"{op} is not served here",
                      "hint": ""})


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SeatProtocol, host=host, port=port, backlog=BACKLOG, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    addr = (server.sockets or ())[0].getsockname()
    print(f"ceiling listening on {addr[0]}:{addr[1]}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    p.add_argument("--pool", action="append", default=[], metavar="PRODUCT=COUNT", help="a product and its seats")
    ns = p.parse_args(argv)
    for item in ns.pool:
        name, _, count = item.partition("=")
        if not name or not count.isdigit():
            p.error(f"--pool takes PRODUCT=COUNT, got {item!r}")
        SEATS[name] = [int(count), 0]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(ns.host, ns.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
