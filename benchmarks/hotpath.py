"""The daemon's own CPU per request, in-process: the steady measure for each hot-path change.

On a shared machine the socket benchmarks move by tens of percent from run to run; this moves by a few. It
builds the daemon as ``lmgrd.cli.serve`` does (the real ``Server``, the journal in a temporary state
directory, the metrics and their request timer attached) on a uvloop, opens C ``ClientProtocol``
connections on transports that only swallow the bytes (everything but the socket syscalls is the daemon's
real code: framing, the state table, parsing, the handlers, licensing, the lifecycle, the ledger, the journal
``write(2)``, the group-commit flush), and then, per loop iteration, hands every connection its next
request exactly as uvloop's ``data_received`` would (checkout, then checkin of the token it got). Reported:
CPU microseconds (``time.process_time``) per request over R rounds, best of N.

    python benchmarks/hotpath.py                 # 100 connections, 200 rounds, best of 5
    python benchmarks/hotpath.py --connections 1000 --rounds 40
    python benchmarks/hotpath.py --op heartbeat   # the heartbeat storm's request: one seat renewed each
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import msgpack  # noqa: E402

from lmgrd.config import build_config  # noqa: E402
from lmgrd.daemon.server import Server  # noqa: E402
from lmgrd.daemon.transport import ClientProtocol  # noqa: E402
from lmgrd.monitoring.metrics import attach  # noqa: E402
from lmgrd.storage.files import load_licensing  # noqa: E402
from lmgrd.storage.journal import open_store  # noqa: E402
from tests.harness import write_keys, write_license  # noqa: E402

_pack = msgpack.Packer(use_bin_type=True).pack


def frame(m: dict[str, Any]) -> bytes:
    body = _pack(m)
    return len(body).to_bytes(4, "big") + body


class Sink:
    """A transport that keeps only the last frame written (the reply the client would read). Also used by
    ``benchmarks/conncost.py``."""

    __slots__ = ("closing", "last", "port")

    def __init__(self, port: int = 40000) -> None:
        self.port = port
        self.last = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.last = data

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # A new tuple, address string and port int on every call, as uvloop's transports build them (what the
        # daemon keeps of them is what conncost.py's memory count sees).
        return (".".join(("127", "0", "0", "1")), self.port + 0) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def measure(ns: argparse.Namespace, workdir: Path) -> list[float]:
    key, pub = write_keys(workdir / "keys")
    lic = workdir / "bench.lic"
    fillers = [f"P{i:04d}" for i in range(ns.products)]
    per = -(-ns.held // max(1, ns.products)) + 1
    write_license(lic, key, (("CHURN", "1.0", 1_000_000), *((f, "1.0", per) for f in fillers)), share="none",
                  issued_at=datetime.now(UTC) - timedelta(days=2))
    state = workdir / "state"
    state.mkdir()
    cfg = build_config({}, {"licenses": [str(lic)], "vendor_key": str(pub), "port": 0, "state_dir": str(state),
                            "max_connections_per_address": 0, "log_level": "warning"}, "hotpath")
    licensing, problems = load_licensing(cfg)
    assert not problems, problems
    store = open_store(state)
    server = Server(cfg, licensing, store)
    attach(server, process=False)
    conns: list[tuple[Any, Sink]] = []
    if ns.target == "ceiling":
        import ceiling

        ceiling.SEATS["CHURN"] = [1_000_000, 0]
    for i in range(ns.connections):
        p = ceiling.SeatProtocol() if ns.target == "ceiling" else ClientProtocol(server)
        t = Sink()
        p.connection_made(t)  # type: ignore[arg-type]
        p.data_received(frame({"op": "hello", "id": 1, "proto": [1], "host": "bench-client", "user": f"u{i}",
                               "pid": 1000 + i, "client_version": "bench", "display": ""}))
        conns.append((p, t))
    await asyncio.sleep(0)
    # --held leases on --products other products, held by 100 more connections (the scaling question)
    holders = []
    for i in range(100 if ns.held else 0):
        p = ClientProtocol(server)
        t = Sink()
        p.connection_made(t)  # type: ignore[arg-type]
        p.data_received(frame({"op": "hello", "id": 1, "proto": [1], "host": "bench-client", "user": f"h{i}",
                               "pid": 5000 + i, "client_version": "bench", "display": ""}))
        holders.append(p)
    await asyncio.sleep(0)
    for k in range(ns.held):
        holders[k % 100].data_received(frame({"op": "checkout", "id": 2, "product": fillers[k % len(fillers)],
                                               "version": "1.0", "wait": 0.0}))
        if k % 1000 == 999:
            await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sum(server.ledger.in_use(pool) for pool in server.licensing.pools()) == ns.held, "fill failed"
    checkout = frame({"op": "checkout", "id": 2, "product": "CHURN", "version": "1.0", "wait": 0.0})
    unpackb = msgpack.unpackb
    if ns.op == "heartbeat":
        results = await measure_heartbeats(ns, conns, checkout)
        store.close()
        return results
    results = []
    for _ in range(ns.repeat):
        t0 = time.process_time()
        n = 0
        for _r in range(ns.rounds):
            for p, _t in conns:
                p.data_received(checkout)
            await asyncio.sleep(0)  # the outbox flush (journal write, then the replies)
            replies = [t.last for _p, t in conns]
            for p, t in conns:
                tok = unpackb(t.last[4:])["token"]
                p.data_received(frame({"op": "checkin", "id": 3, "token": tok}))
            await asyncio.sleep(0)
            n += 2 * len(conns)
        spent = time.process_time() - t0
        # the driver's own share (decoding each granted reply, encoding its checkin), timed alone
        d0 = time.process_time()
        for _r in range(ns.rounds):
            for g in replies:
                frame({"op": "checkin", "id": 3, "token": unpackb(g[4:])["token"]})
        results.append(1e6 * (spent - (time.process_time() - d0)) / n)
    for p, t in conns:
        if unpackb(t.last[4:]).get("released") is not True:
            raise SystemExit(f"a checkin did not release its seat: {unpackb(t.last[4:])}")
        t.closing = True
        p.connection_lost(None)
    store.close()
    return results


async def measure_heartbeats(ns: argparse.Namespace, conns: list[tuple[Any, Sink]], checkout: bytes) -> list[float]:
    """``--op heartbeat``: every connection holds one seat and sends a heartbeat per round (the storm's
    request); CPU microseconds per heartbeat, each ack checked to have renewed exactly that seat."""
    unpackb = msgpack.unpackb
    for p, _t in conns:
        p.data_received(checkout)
    await asyncio.sleep(0)
    for _p, t in conns:
        if unpackb(t.last[4:]).get("op") != "granted":
            raise SystemExit(f"a checkout was not granted: {unpackb(t.last[4:])}")
    beat = frame({"op": "heartbeat", "id": 4, "idle": False})  # what load.py and client_stub send
    results = []
    for _ in range(ns.repeat):
        t0 = time.process_time()
        for _r in range(ns.rounds):
            for p, _t in conns:
                p.data_received(beat)
            await asyncio.sleep(0)
        results.append(1e6 * (time.process_time() - t0) / (ns.rounds * len(conns)))
    for p, t in conns:
        ack = unpackb(t.last[4:])
        if ack.get("op") != "heartbeat_ack" or ack.get("renewed") != 1 or ack.get("lost"):
            raise SystemExit(f"a heartbeat did not renew its one seat: {ack}")
        t.closing = True
        p.connection_lost(None)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--held", type=int, default=0, help="leases held by other connections during the run")
    p.add_argument("--products", type=int, default=1, help="other products the held leases spread over")
    p.add_argument("--target", choices=("lmgrd", "ceiling"), default="lmgrd",
                   help="ceiling: the same driver against benchmarks/ceiling.py's protocol")
    p.add_argument("--op", choices=("churn", "heartbeat"), default="churn",
                   help="churn: checkout then checkin per round; heartbeat: each connection holds a seat and "
                        "heartbeats once per round")
    ns = p.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="lmgrd-hotpath-") as tmp, \
            asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        res = runner.run(measure(ns, Path(tmp)))
    what = "checkout or checkin" if ns.op == "churn" else "heartbeat, each renewing one seat"
    print(f"{ns.target} CPU per request ({what}), {ns.connections} connections, {ns.held} other "
          f"leases held on {ns.products} products: best "
          f"{min(res):.2f} us, median {statistics.median(res):.2f} us over {ns.repeat} x {ns.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
