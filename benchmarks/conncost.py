"""What one connection costs the daemon, in-process: memory per client holding a seat, CPU per connect+hello.

The steady measures for issue 9's idle and burst targets on a shared machine (the socket-level ``run.py bench
--only idle`` and ``--only burst`` move with the machine's load; these do not). The daemon is built as
``benchmarks/hotpath.py`` builds it (the real ``Server``, the journal in a temporary state directory, the
metrics attached) on a uvloop; each client is a C ``ClientProtocol`` on a transport that swallows the bytes
(created before measuring, so what is counted is the daemon's own), driven as uvloop would drive it, with
the hello ``benchmarks/load.py`` sends (protocol 1 with a secret).

- ``memory``: N clients connect, say hello and check out one seat each; ``tracemalloc`` counts what the
  daemon allocated and still holds for them (after ``gc.collect()``), per client, and lists the sites that
  hold the most (``--top``). The uvloop transport and the kernel's socket are not in it (they are the same
  for every server); ``run.py``'s idle RSS includes them.
- ``connect``: CPU (``time.process_time``) per connect+hello (``connection_made``, the hello, the welcome
  flushed) and per disconnect of a client that held nothing, N clients per round, best of ``--repeat``.
- ``burst``: the burst scenario's daemon side: N clients connect and say hello, then all check out at once
  against ``--seats`` seats (the counts checked exactly: granted = seats, the rest NO_SEATS); CPU per client,
  best of ``--repeat`` (a fresh daemon each).

    python benchmarks/conncost.py memory --clients 4000 --top 15
    python benchmarks/conncost.py connect --clients 2000 --repeat 7
    python benchmarks/conncost.py burst --clients 10000 --seats 8000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
import tracemalloc
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
from lmgrd.storage.journal import JournalStore, open_store  # noqa: E402
from tests.harness import write_keys, write_license  # noqa: E402

_pack = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb
SECRET_BASE = "5eed" * 4  # load.py's form: 16 hex digits of its own, then the client's number in 16 more


def frame(m: dict[str, Any]) -> bytes:
    body = _pack(m)
    return len(body).to_bytes(4, "big") + body


def hello_frame(i: int) -> bytes:
    """Byte for byte the hello ``benchmarks/load.py`` sends (the idle and burst scenarios' clients)."""
    return frame({"op": "hello", "id": 1, "proto": [1], "host": "bench-client", "user": f"bench{i}",
                  "pid": 1000 + i, "client_version": "bench", "display": "", "secret": f"{SECRET_BASE}{i:016x}"})


CHECKOUT = frame({"op": "checkout", "id": 2, "product": "IDLE", "version": "1.0", "wait": 0.0})


class Sink:
    """A transport that keeps only the last reply (checked by the driver)."""

    __slots__ = ("closing", "last", "port")

    def __init__(self, port: int) -> None:
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
        # A new tuple, address string and port int on every call, as uvloop's transports build them: what the
        # daemon keeps of them is counted.
        return (".".join(("127", "0", "0", "1")), self.port + 0) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def build(workdir: Path, seats: int) -> tuple[Server, JournalStore]:
    key, pub = write_keys(workdir / "keys")
    lic = workdir / "bench.lic"
    write_license(lic, key, (("IDLE", "1.0", seats),), share="none", issued_at=datetime.now(UTC) - timedelta(days=2))
    state = workdir / "state"
    state.mkdir()
    cfg = build_config({}, {"licenses": [str(lic)], "vendor_key": str(pub), "port": 0, "state_dir": str(state),
                            "max_connections_per_address": 0, "max_requests_per_second": 0,
                            "log_level": "warning"}, "conncost")
    licensing, problems = load_licensing(cfg)
    assert not problems, problems
    store = open_store(state)
    server = Server(cfg, licensing, store)
    attach(server, process=False)
    return server, store


def op_of(sink: Sink) -> str:
    return str(_unpackb(sink.last[4:]).get("op"))


async def connect(server: Server, sinks: list[Sink], hellos: list[bytes], base: int) -> list[ClientProtocol]:
    """Connect and say hello for every sink (the welcomes flushed); the protocols, in order."""
    out = []
    for i, t in enumerate(sinks):
        p = ClientProtocol(server)
        p.connection_made(t)  # type: ignore[arg-type]
        p.data_received(hellos[i])
        out.append(p)
    await asyncio.sleep(0)
    return out


async def memory(ns: argparse.Namespace, workdir: Path) -> None:
    n, warm = ns.clients, 500
    server, store = build(workdir, n + warm + 10)
    sinks = [Sink(20000 + i) for i in range(n + warm)]
    hellos = [hello_frame(i) for i in range(n + warm)]
    warmed = await connect(server, sinks[:warm], hellos[:warm], 0)  # first-use allocations, dict growth
    for p in warmed:
        p.data_received(CHECKOUT)
    await asyncio.sleep(0)
    keep_sinks, keep_hellos = sinks[warm:], hellos[warm:]
    del sinks, hellos
    gc.collect()
    tracemalloc.start(ns.frames)
    before = tracemalloc.take_snapshot()
    t0 = tracemalloc.get_traced_memory()[0]
    protos = await connect(server, keep_sinks, keep_hellos, warm)
    for p in protos:
        p.data_received(CHECKOUT)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for t in keep_sinks:
        t.last = t.last[:0]  # the driver's copy of the reply is not the daemon's memory
    gc.collect()
    t1 = tracemalloc.get_traced_memory()[0]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(1 for p in protos if server.ledger.holds(p.session))
    if held != n:
        raise SystemExit(f"only {held} of {n} clients hold a seat")
    print(f"memory: {n} clients, each connected, said hello and holds one seat: "
          f"{(t1 - t0) / n:.0f} bytes per client (tracemalloc, the daemon's own allocations)")
    if ns.top:
        key = "traceback" if ns.frames > 1 else "lineno"
        stats = after.compare_to(before, key)
        stats.sort(key=lambda s: -s.size_diff)
        for s in stats[: ns.top]:
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in s.traceback)
            print(f"  {s.size_diff / n:7.1f} B  {s.count_diff / n:5.2f} blocks  {where}")
    for p, t in zip(protos + warmed, keep_sinks + [Sink(0)] * warm, strict=False):
        t.closing = True
        p.connection_lost(None)
    store.close()


async def connect_cpu(ns: argparse.Namespace, workdir: Path) -> None:
    n = ns.clients
    server, store = build(workdir, 10)
    hellos = [hello_frame(i) for i in range(n)]
    conn_us: list[float] = []
    drop_us: list[float] = []
    for _ in range(ns.repeat):
        sinks = [Sink(20000 + i) for i in range(n)]
        gc.collect()
        t0 = time.process_time()
        protos = await connect(server, sinks, hellos, 0)
        t1 = time.process_time()
        bad = [op_of(t) for t in sinks if op_of(t) != "welcome"]
        if bad:
            raise SystemExit(f"{len(bad)} hellos not welcomed: {bad[:3]}")
        t2 = time.process_time()
        for p, t in zip(protos, sinks, strict=True):
            t.closing = True
            p.connection_lost(None)
        await asyncio.sleep(0)
        t3 = time.process_time()
        conn_us.append(1e6 * (t1 - t0) / n)
        drop_us.append(1e6 * (t3 - t2) / n)
        if server.sessions or server.per_address:
            raise SystemExit("a disconnected client was left in the server's tables")
    store.close()
    print(f"connect: {n} clients per round, best of {ns.repeat}: connect+hello+welcome {min(conn_us):.2f} us "
          f"(median {sorted(conn_us)[len(conn_us) // 2]:.2f}), disconnect {min(drop_us):.2f} us "
          f"(median {sorted(drop_us)[len(drop_us) // 2]:.2f}) CPU per client")


async def burst(ns: argparse.Namespace, workdir: Path) -> float:
    n, seats = ns.clients, ns.seats
    server, store = build(workdir, seats)
    sinks = [Sink(20000 + i) for i in range(n)]
    hellos = [hello_frame(i) for i in range(n)]
    gc.collect()
    t0 = time.process_time()
    protos = await connect(server, sinks, hellos, 0)
    for p in protos:
        p.data_received(CHECKOUT)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    spent = time.process_time() - t0
    outcomes: dict[str, int] = {}
    for t in sinks:
        r = _unpackb(t.last[4:])
        k = r["op"] if r["op"] == "granted" else str(r.get("code"))
        outcomes[k] = outcomes.get(k, 0) + 1
    if outcomes != {"granted": seats, "NO_SEATS": n - seats}:
        raise SystemExit(f"burst: wrong outcomes {outcomes}")
    for p, t in zip(protos, sinks, strict=True):
        t.closing = True
        p.connection_lost(None)
    store.close()
    return 1e6 * spent / n


async def bursts(ns: argparse.Namespace, workdir: Path) -> None:
    res = []
    for i in range(ns.repeat):
        d = workdir / f"run{i}"
        d.mkdir()
        res.append(await burst(ns, d))
    print(f"burst: {ns.clients} clients connect, say hello and check out against {ns.seats} seats (counts exact), "
          f"best of {ns.repeat}: {min(res):.2f} us CPU per client (median {sorted(res)[len(res) // 2]:.2f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("memory", "connect", "burst"))
    p.add_argument("--clients", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=7, help="connect: rounds (best of)")
    p.add_argument("--seats", type=int, default=8000, help="burst: seats (default 8000)")
    p.add_argument("--top", type=int, default=0, help="memory: list the N allocation sites that grew most")
    p.add_argument("--frames", type=int, default=1, help="memory: traceback depth of each site (--top)")
    ns = p.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="lmgrd-conncost-") as tmp, \
            asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        what = {"memory": memory, "connect": connect_cpu, "burst": bursts}[ns.what]
        runner.run(what(ns, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
