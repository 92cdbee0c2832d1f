"""lmgrd.monitoring.metrics and lmgrd.monitoring.http without a subprocess: a real Server on this test's loop, real
sockets on 127.0.0.1, a fresh CollectorRegistry per test, values read with ``registry.get_sample_value``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import HOSTNAME, write_license
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lmgrd.config import ConfigInvalid, DaemonConfig, build_config
from lmgrd.daemon.server import Server
from lmgrd.monitoring.http import health, render_status
from lmgrd.monitoring.metrics import Denial, Metrics, TextfileWriter, attach
from lmgrd.storage.atomic import write_atomic
from lmgrd.storage.files import load_licensing
from lmgrd.storage.journal import open_store
from protocol import Checkin, Checkout, Connection, ErrorCode, ErrorReply, Granted, Hello, Reply, Role, Welcome

ALLOWED_LABELS = {"customer_id", "product", "state", "result", "reason", "op", "le", "version", "python",
                  "request"}  # request: checkin or resume (lmgrd_token_refusals_total)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class AsyncClient:
    """The wire protocol over a real asyncio connection, for use inside the server's own loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = Connection(Role.CLIENT)
        self.replies: list[Reply] = []
        self.next_id = 0

    @classmethod
    async def connect(cls, port: int, user: str) -> AsyncClient:
        c = cls(*await asyncio.open_connection("127.0.0.1", port))
        w = await c.request(Hello(c.id(), (1,), HOSTNAME, user, os.getpid(), "test", ""))
        assert isinstance(w, Welcome), w
        return c

    def id(self) -> int:
        self.next_id += 1
        return self.next_id

    async def request(self, req: Any) -> Reply:
        self.writer.write(self.conn.send(req))
        async with asyncio.timeout(10):
            while not self.replies:
                data = await self.reader.read(65536)
                assert data, "server closed the connection"
                self.replies.extend(self.conn.receive_data(data))
        return self.replies.pop(0)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


Body = Callable[[Server, Metrics, CollectorRegistry, FakeClock], Awaitable[None]]


def run_server(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], body: Body,
               products: Any = (("CADPRO", "2.1", 2), ("VIEWER", "1.0", 5)), **lic_kw: Any) -> None:
    key, pub = vendor
    lic = tmp_path / "site.lic"
    write_license(lic, key, products, **lic_kw)
    cfg = build_config({}, {"licenses": [str(lic)], "vendor_key": str(pub), "port": 0, "bind": "127.0.0.1",
                            "state_dir": str(tmp_path / "state"), "heartbeat_interval": 1.0,
                            "lease_timeout": 3.0, "admin_token_file": str(tmp_path / "admin.token")}, "test")
    licensing, _problems = load_licensing(cfg)

    async def main() -> None:
        clock = FakeClock()
        clock.now = asyncio.get_running_loop().time()  # frozen at the loop's now, so no timer fires early
        (tmp_path / "state").mkdir(exist_ok=True)
        server = Server(cfg, licensing, open_store(tmp_path / "state"), clock=clock)
        registry = CollectorRegistry()
        metrics = attach(server, registry)
        await server.start()
        try:
            await body(server, metrics, registry, clock)
        finally:
            server.request_shutdown("test over")
            await server.stopped.wait()

    asyncio.run(main())


def _cid(server: Server) -> str:
    return server.licensing.served[0][1].customer_id


def test_counters_and_seat_gauges_follow_real_checkouts(tmp_path: Path,
                                                        vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(server: Server, m: Metrics, reg: CollectorRegistry, clock: FakeClock) -> None:
        cid = _cid(server)
        a, b, c = [await AsyncClient.connect(server.ports[0], u) for u in ("ann", "ben", "cat")]
        ga = await a.request(Checkout(a.id(), "CADPRO", "2.1", 0))
        gb = await b.request(Checkout(b.id(), "CADPRO", "2.1", 0))
        assert isinstance(ga, Granted) and isinstance(gb, Granted)
        refused = await c.request(Checkout(c.id(), "CADPRO", "2.1", 0))
        assert isinstance(refused, ErrorReply) and refused.code is ErrorCode.NO_SEATS
        unknown = await c.request(Checkout(c.id(), "NOSUCH", "1.0", 0))
        assert isinstance(unknown, ErrorReply) and unknown.code is ErrorCode.UNKNOWN_PRODUCT

        def seats(product: str, state: str) -> float | None:
            return reg.get_sample_value("lmgrd_seats", {"customer_id": cid, "product": product, "state": state})

        assert (seats("CADPRO", "issued"), seats("CADPRO", "in_use"), seats("CADPRO", "queued")) == (2, 2, 0)
        assert (seats("VIEWER", "issued"), seats("VIEWER", "in_use"), seats("VIEWER", "reserved")) == (5, 0, 0)
        assert reg.get_sample_value("lmgrd_connected_clients") == 3
        assert reg.get_sample_value("lmgrd_checkouts_total",
                                    {"customer_id": cid, "product": "CADPRO", "result": "granted"}) == 2
        # NO_SEATS is attributed to the only license with the product; an unlicensed name is not a label value.
        assert reg.get_sample_value("lmgrd_denials_total",
                                    {"customer_id": cid, "product": "CADPRO", "reason": "NO_SEATS"}) == 1
        assert reg.get_sample_value("lmgrd_denials_total",
                                    {"customer_id": "", "product": "", "reason": "UNKNOWN_PRODUCT"}) == 1
        assert reg.get_sample_value("lmgrd_checkouts_total",
                                    {"customer_id": cid, "product": "VIEWER", "result": "granted"}) == 0
        assert reg.get_sample_value("lmgrd_request_duration_seconds_count", {"op": "checkout"}) == 4
        assert reg.get_sample_value("lmgrd_request_duration_seconds_count", {"op": "hello"}) == 3
        assert reg.get_sample_value("lmgrd_request_duration_seconds_bucket", {"op": "checkout", "le": "+Inf"}) == 4
        assert [(d.product, d.reason, d.user) for d in m.recent_denials] == [
            ("CADPRO", "NO_SEATS", "cat"), ("NOSUCH", "UNKNOWN_PRODUCT", "cat")]

        # A checkin frees the seat; a lease whose client goes silent expires and is counted.
        done = await a.request(Checkin(a.id(), ga.token))
        assert seats("CADPRO", "in_use") == 1, done
        assert reg.get_sample_value("lmgrd_lease_expirations_total") == 0
        clock.now += 60  # past every deadline; the timer callback reads the injected clock
        server._on_timer()
        assert reg.get_sample_value("lmgrd_lease_expirations_total") == 1
        assert seats("CADPRO", "in_use") == 0
        for cl in (a, b, c):
            await cl.close()

    run_server(tmp_path, vendor, body)


def test_scrape_is_per_product_never_per_lease_or_user(tmp_path: Path,
                                                       vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(server: Server, m: Metrics, reg: CollectorRegistry, clock: FakeClock) -> None:
        def sample_keys() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
            return {(s.name, tuple(sorted(s.labels.items()))) for fam in reg.collect() for s in fam.samples
                    if not s.name.startswith("lmgrd_request_duration")}

        one = await AsyncClient.connect(server.ports[0], "u0")
        assert isinstance(await one.request(Checkout(one.id(), "VIEWER", "1.0", 0)), Granted)
        before = sample_keys()
        clients = [await AsyncClient.connect(server.ports[0], f"user{i}") for i in range(1, 5)]
        for cl in clients:
            assert isinstance(await cl.request(Checkout(cl.id(), "VIEWER", "1.0", 0)), Granted)
        after = sample_keys()
        assert before == after  # five holders or one: the same series
        for name, labels in after:
            assert {k for k, _ in labels} <= ALLOWED_LABELS, (name, labels)
            assert not any(v.startswith("user") for _, v in labels), (name, labels)
        assert reg.get_sample_value("lmgrd_seats", {"customer_id": _cid(server), "product": "VIEWER",
                                                    "state": "in_use"}) == 5
        for cl in [one, *clients]:
            await cl.close()

    run_server(tmp_path, vendor, body)


def test_process_build_and_license_gauges(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    from datetime import date

    async def body(server: Server, m: Metrics, reg: CollectorRegistry, clock: FakeClock) -> None:
        cid = _cid(server)
        rss = reg.get_sample_value("lmgrd_process_resident_memory_bytes")
        assert rss is not None and rss > 1_000_000
        cpu = reg.get_sample_value("lmgrd_process_cpu_seconds_total")
        assert cpu is not None and cpu > 0
        fds = reg.get_sample_value("lmgrd_process_open_fds")
        assert fds is not None and fds >= 3
        import platform

        from lmgrd import __version__
        assert reg.get_sample_value("lmgrd_build_info", {"version": __version__,
                                                         "python": platform.python_version()}) == 1
        exp = server.licensing.served[0][1].expires_at
        assert exp is not None
        assert reg.get_sample_value("lmgrd_license_expiry_timestamp_seconds", {"customer_id": cid}) == \
            exp.timestamp()
        assert reg.get_sample_value("lmgrd_license_activated", {"customer_id": cid}) == 1
        assert health(server) == (True, "ok")
        server.closing = True
        assert health(server) == (False, "shutting down")
        assert reg.get_sample_value("lmgrd_up") == 0
        server.closing = False

    run_server(tmp_path, vendor, body, expires=date(2099, 12, 31))


def test_textfile_is_written_atomically_and_parses(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(server: Server, m: Metrics, reg: CollectorRegistry, clock: FakeClock) -> None:
        out = tmp_path / "prom" / "lmgrd.prom"
        writer = TextfileWriter(m, out, 60)
        assert await writer.write_once() is False  # the directory does not exist yet: logged, not raised
        out.parent.mkdir()
        assert await writer.write_once() is True
        fams = {f.name: f for f in text_string_to_metric_families(out.read_text())}
        assert {"lmgrd_seats", "lmgrd_checkouts", "lmgrd_process_resident_memory_bytes"} <= set(fams)
        assert [p.name for p in out.parent.iterdir()] == ["lmgrd.prom"]  # no temporary file left behind
        writer.start()
        await writer.close()
        assert writer.task is None

    run_server(tmp_path, vendor, body)


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "x.prom"
    write_atomic(p, b"a 1\n")
    write_atomic(p, b"b 2\n")
    assert p.read_bytes() == b"b 2\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.prom"]
    with pytest.raises(OSError):
        write_atomic(tmp_path / "missing" / "x.prom", b"")


def test_status_page_escapes_everything(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(server: Server, m: Metrics, reg: CollectorRegistry, clock: FakeClock) -> None:
        m.recent_denials.append(Denial(server.wall(), "", "<script>alert(1)</script>", "1.0", "UNKNOWN_PRODUCT",
                                       "eve\"><img src=x>", "h"))
        page = render_status(server, m)
        assert "<script>" not in page and "<img" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "eve&quot;&gt;&lt;img src=x&gt;" in page
        assert '<meta http-equiv="refresh" content="5">' in page

    run_server(tmp_path, vendor, body)


def test_health_without_a_served_license(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(server: Server, m: Metrics, reg: CollectorRegistry, clock: FakeClock) -> None:
        ok, why = health(server)
        assert not ok and "no license is being served" in why and "elsewhere" in why
        assert reg.get_sample_value("lmgrd_licenses", {"state": "refused"}) == 1

    run_server(tmp_path, vendor, body, hostname="elsewhere")


@pytest.mark.parametrize(("values", "expect"), [
    ({"metrics_port": 0}, {"metrics_port": 0}),
    ({"metrics_port": "auto"}, {"metrics_port": "auto"}),
    ({"metrics_port": 9105, "metrics_bind": "127.0.0.1"}, {"metrics_port": 9105, "metrics_bind": "127.0.0.1"}),
    ({"metrics_textfile": "/tmp/x.prom", "metrics_textfile_interval": 5},
     {"metrics_textfile": Path("/tmp/x.prom"), "metrics_textfile_interval": 5.0}),
    ({}, {"metrics_port": 27001, "metrics_bind": None, "metrics_textfile": None, "metrics_textfile_interval": 15.0}),
])
def test_metrics_config_accepts(values: dict[str, Any], expect: dict[str, Any]) -> None:
    cfg = build_config({"licenses": ["a.lic"], "vendor_key": "v.pub", **values}, {}, "test.yaml")
    assert isinstance(cfg, DaemonConfig)
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert not {"metrics_port", "metrics_bind", "metrics_textfile"} & set(cfg.extra)


def test_metrics_config_reports_every_problem() -> None:
    with pytest.raises(ConfigInvalid) as ei:
        build_config({"licenses": ["a.lic"], "vendor_key": "v.pub", "metrics_port": 70000, "metrics_bind": 5,
                      "metrics_textfile": "", "metrics_textfile_interval": 0}, {}, "test.yaml")
    text = "\n".join(ei.value.problems)
    for key in ("metrics_port", "metrics_bind", "metrics_textfile:", "metrics_textfile_interval"):
        assert key in text, text
    with pytest.raises(ConfigInvalid, match="metrics_port"):
        build_config({"licenses": ["a.lic"], "vendor_key": "v.pub", "metrics_port": True}, {}, "t")
