"""The protocol-package ceiling (the second row): a uvloop ``asyncio.Protocol`` seat server built on ``protocol/``.

It decodes the very same frames as the daemon (``protocol.framing.FrameDecoder`` then
``protocol.messages.parse_request``) and encodes its replies with the same message classes and
``encode_frame``, but answers from two dicts: no licensing checks, no ledger, no journal, no logging, no
timers. ``hello`` gets a ``welcome``; ``checkout`` gets a ``granted`` with a fresh 128-bit token while the
product's count is not reached and ``NO_SEATS`` otherwise; ``checkin`` frees the token; ``heartbeat`` is
acknowledged. Whatever the daemon does on top of this is its overhead.

    python benchmarks/ceiling_protocol.py --port 0 --pool BURST=4000 --pool CHURN=20000

prints ``ceiling-protocol listening on 127.0.0.1:PORT`` on stdout once it accepts connections, and exits 0 on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmgrd.storage.host import raise_nofile
from protocol.errors import ErrorCode, MalformedMessage
from protocol.framing import FrameDecoder, encode_frame
from protocol.messages import (
    CheckedIn,
    Checkin,
    Checkout,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Welcome,
    parse_request,
)

BACKLOG = 8192  # the daemon's default listen backlog (lmgrd.config.DEFAULT_BACKLOG)
LEASE_TIMEOUT = 90.0
HEARTBEAT = 30.0
CUSTOMER = "CEILING-0000"


class Pools:
    """product -> [count, in use]; token -> product. The whole "ledger"."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.pools: dict[str, list[int]] = {name: [count, 0] for name, count in counts.items()}
        self.tokens: dict[str, str] = {}
        self.sessions = 0


class SeatProtocol(asyncio.Protocol):
    __slots__ = ("decoder", "pools", "ready", "tokens", "transport")

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.ready = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        try:
            raws = self.decoder.feed(data)
        except MalformedMessage as exc:
            t.write(encode_frame(ErrorReply(0, ErrorCode.BAD_REQUEST, exc.message).to_wire()))
            t.close()
            return
        out: list[bytes] = []
        for raw in raws:
            try:
                req = parse_request(raw)
            except MalformedMessage as exc:
                out.append(encode_frame(ErrorReply(0, ErrorCode.BAD_REQUEST, exc.message).to_wire()))
                continue
            out.append(self.answer(req))
        if len(out) == 1:
            t.write(out[0])
        elif out:
            t.write(b"".join(out))

    def answer(self, req: Any) -> bytes:
        pools = self.pools
        if isinstance(req, Checkout):
            pool = pools.pools.get(req.product)
            if pool is None:
                return encode_frame(ErrorReply(req.id, ErrorCode.UNKNOWN_PRODUCT, "no such product").to_wire())
            if pool[1] >= pool[0]:
                return encode_frame(ErrorReply(req.id, ErrorCode.NO_SEATS,
                                               f"all {pool[0]} seat(s) of {req.product} are in use",
                                               "try again later").to_wire())
            pool[1] += 1
            token = secrets.token_hex(16)
            pools.tokens[token] = req.product
            return encode_frame(Granted(req.id, token, CUSTOMER, req.product, req.version, LEASE_TIMEOUT,
                                        HEARTBEAT).to_wire())
        if isinstance(req, Checkin):
            product = pools.tokens.pop(req.token, None)
            if product is not None:
                pools.pools[product][1] -= 1
            return encode_frame(CheckedIn(req.id, product is not None).to_wire())
        if isinstance(req, Heartbeat):
            return encode_frame(HeartbeatAck(req.id, 0).to_wire())
        if isinstance(req, Hello):
            pools.sessions += 1
            return encode_frame(Welcome(req.id, 1, "ceiling", HEARTBEAT, LEASE_TIMEOUT, 65536,
                                        pools.sessions).to_wire())
        return encode_frame(ErrorReply(req.id, ErrorCode.BAD_REQUEST, f"{req.OP} is not served here").to_wire())


async def serve(host: str, port: int, pools: Pools) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SeatProtocol(pools), host=host, port=port, backlog=BACKLOG,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = (server.sockets or ())[0]
    addr = sock.getsockname()
    print(f"ceiling-protocol listening on {addr[0]}:{addr[1]}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    p.add_argument("--pool", action="append", default=[], metavar="PRODUCT=COUNT", help="a product and its seats")
    ns = p.parse_args(argv)
    counts: dict[str, int] = {}
    for item in ns.pool:
        name, _, count = item.partition("=")
        if not name or not count.isdigit():
            p.error(f"--pool takes PRODUCT=COUNT, got {item!r}")
        counts[name] = int(count)
    raise_nofile()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(ns.host, ns.port, Pools(counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
