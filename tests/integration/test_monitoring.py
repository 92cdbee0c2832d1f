"""The monitoring port of the real daemon: /metrics while clients hold seats, promtool, /healthz, the HTTP
edges, a port that cannot be bound, the metrics text file and ``lmutil lmstat --prometheus``."""

from __future__ import annotations

import http.client
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import Daemon, RawClient, write_license
from prometheus_client.parser import text_string_to_metric_families

from protocol import Checkout, ErrorCode, ErrorReply, Granted, Welcome

AUTO = ["--metrics-port", "auto"]


def get(url: str, path: str) -> tuple[int, dict[str, str], str]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode("utf-8")
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def seat(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], cid: str, product: str, state: str) -> float:
    return values[("lmgrd_seats", (("customer_id", cid), ("product", product), ("state", state)))]


def client(d: Daemon, user: str) -> RawClient:
    c = d.connect()
    assert isinstance(c.hello(user=user), Welcome)
    return c


def require_tool(name: str) -> str:
    """The tool's path; skip when absent, unless CI is set: then its absence fails the test."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required when CI is set; run .ci/install-deps.sh")
        pytest.skip(f"{name} is not installed (Debian: .ci/install-deps.sh)")
    return path


def customer_id(d: Daemon) -> str:
    m = d.wait_for_log(r"OUT \S+ \S+ to \S+ lease \S+ \(\d+/\d+ in use, customer (\S+)\)")
    return m.group(1)


def test_metrics_match_the_seats_clients_hold(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2), ("VIEWER", "1.0", 10)), extra=AUTO)
    url = d.metrics_url()
    a, b, w, x = (client(d, u) for u in ("ann", "ben", "wes", "xia"))
    assert isinstance(a.request(Checkout(a.id(), "CADPRO", "2.1", 0)), Granted)
    assert isinstance(b.request(Checkout(b.id(), "CADPRO", "2.1", 0)), Granted)
    assert isinstance(b.request(Checkout(b.id(), "VIEWER", "1.0", 0)), Granted)
    w.send(Checkout(w.id(), "CADPRO", "2.1", 60))  # queued: no reply until a seat frees
    d.wait_for_log(r"QUEUED CADPRO 2\.1 for wes@")
    refused = x.request(Checkout(x.id(), "CADPRO", "2.1", 0))
    assert isinstance(refused, ErrorReply) and refused.code is ErrorCode.NO_SEATS
    cid = customer_id(d)

    status, headers, text = get(url, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    v = samples(text)
    assert (seat(v, cid, "CADPRO", "issued"), seat(v, cid, "CADPRO", "in_use"), seat(v, cid, "CADPRO", "queued"),
            seat(v, cid, "CADPRO", "reserved")) == (2, 2, 1, 0)
    assert (seat(v, cid, "VIEWER", "issued"), seat(v, cid, "VIEWER", "in_use")) == (10, 1)
    assert v[("lmgrd_connected_clients", ())] == 4
    assert v[("lmgrd_checkouts_total", (("customer_id", cid), ("product", "CADPRO"), ("result", "granted")))] == 2
    assert v[("lmgrd_denials_total", (("customer_id", cid), ("product", "CADPRO"), ("reason", "NO_SEATS")))] == 1
    assert v[("lmgrd_request_duration_seconds_count", (("op", "checkout"),))] == 5
    assert v[("lmgrd_license_activated", (("customer_id", cid),))] == 1
    assert v[("lmgrd_process_resident_memory_bytes", ())] > 1_000_000
    assert v[("lmgrd_process_open_fds", ())] > 3
    assert ("lmgrd_lease_expirations_total", ()) in v
    assert all(k not in dict(labels) for _n, labels in v for k in ("user", "host"))

    # The same dump through lmutil, and the numbers move with the ledger.
    a.close()  # ann's seat is kept for a reconnect, so still in use
    d.wait_for_log(r"client ann@\S+ disconnected holding 1 seat")
    r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmstat", "--prometheus", "-c", d.address],
                       capture_output=True, text=True, timeout=30, env=d.env())
    assert r.returncode == 0, r.stderr
    v2 = samples(r.stdout)
    assert seat(v2, cid, "CADPRO", "in_use") == 2
    assert v2[("lmgrd_connected_clients", ())] == 4  # ben, wes, xia and lmutil itself
    assert d.stop() == 0


def test_promtool_accepts_the_real_scrape(daemon_factory: Callable[..., Daemon]) -> None:
    promtool = require_tool("promtool")
    d = daemon_factory((("CADPRO", "2.1", 1),), extra=AUTO)
    url = d.metrics_url()
    a, b = client(d, "ann"), client(d, "ben")
    assert isinstance(a.request(Checkout(a.id(), "CADPRO", "2.1", 0)), Granted)
    assert isinstance(b.request(Checkout(b.id(), "CADPRO", "2.1", 0)), ErrorReply)
    assert isinstance(b.request(Checkout(b.id(), "NOSUCH", "2.1", 0)), ErrorReply)
    status, _h, text = get(url, "/metrics")
    assert status == 200 and "lmgrd_denials_total" in text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr  # no lint warning either
    assert d.stop() == 0


def test_healthz_and_http_edges(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(extra=AUTO)
    url = d.metrics_url()
    assert get(url, "/healthz")[0::2] == (200, "ok\n")
    assert get(url, "/nowhere")[0] == 404
    status, headers, page = get(url, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "CADPRO" in page and "connection" not in headers  # HTTP/1.1: kept alive (metrics_keepalive_timeout)
    port = urlsplit(url).port
    assert port is not None

    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            out = b""
            for _ in range(1000):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
            return out

    assert raw(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw(b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    # The license port was never disturbed.
    c = client(d, "ann")
    assert isinstance(c.request(Checkout(c.id(), "CADPRO", "2.1", 0)), Granted)
    assert d.stop() == 0


def test_silent_and_trickling_scrapers_are_cut_at_the_five_second_header_deadline(
        daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(extra=AUTO)
    url = d.metrics_url()
    port = urlsplit(url).port
    assert port is not None
    start = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", port), timeout=20)
    slow = socket.create_connection(("127.0.0.1", port), timeout=20)
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    cut: dict[str, float] = {}
    got: dict[str, bytes] = {"silent": b"", "slow": b""}
    served_meanwhile = False
    try:
        while len(cut) < 2 and time.monotonic() - start < 20:
            if "slow" not in cut:
                try:
                    slow.sendall(b"X-Trickle: y\r\n")  # a header every 0.25 s: the head never ends
                except OSError:
                    cut["slow"] = time.monotonic() - start
            ready, _, _ = select.select([s for n, s in (("silent", silent), ("slow", slow)) if n not in cut], [], [],
                                        0.25)
            for s in ready:
                name = "silent" if s is silent else "slow"
                try:
                    chunk = s.recv(65536)
                except OSError:
                    chunk = b""
                got[name] += chunk
                if not chunk:
                    cut.setdefault(name, time.monotonic() - start)
            if not served_meanwhile and time.monotonic() - start > 3:
                assert get(url, "/healthz")[0::2] == (200, "ok\n")  # the port still serves others
                c = client(d, "ann")
                assert isinstance(c.request(Checkout(c.id(), "CADPRO", "2.1", 0)), Granted)
                served_meanwhile = True
    finally:
        silent.close()
        slow.close()
    assert served_meanwhile and got == {"silent": b"", "slow": b""}  # cut without an answer
    # metrics_header_timeout (default 5 s): the head of neither ever completes.
    assert set(cut) == {"silent", "slow"} and all(4.5 <= t < 8 for t in cut.values()), cut
    assert d.stop() == 0


def test_healthz_503_when_no_license_can_be_served(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    key, pub = vendor
    lic = tmp_path / "foreign.lic"
    write_license(lic, key, hostname="someotherhost")
    d = Daemon(tmp_path, [lic], pub, extra=AUTO).start()
    try:
        status, _h, body = get(d.metrics_url(), "/healthz")
        assert status == 503
        assert body.startswith("not serving: no license is being served") and "someotherhost" in body
        v = samples(get(d.metrics_url(), "/metrics")[2])
        assert v[("lmgrd_licenses", (("state", "refused"),))] == 1
    finally:
        assert d.stop() == 0


def test_a_busy_metrics_port_is_logged_and_licenses_still_serve(daemon_factory: Callable[..., Daemon]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d = daemon_factory(extra=["--metrics-port", str(port)])
        d.wait_for_log(rf"cannot serve metrics and the status page on 127\.0\.0\.1 port {port}: .*licenses are "
                       r"still served")
        c = client(d, "ann")
        assert isinstance(c.request(Checkout(c.id(), "CADPRO", "2.1", 0)), Granted)
        assert d.stop() == 0


def test_metrics_port_zero_is_off(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(extra=["--metrics-port", "0"])
    d.wait_for_log(r"metrics port off")
    assert "metrics and status page on" not in d.log()
    assert d.stop() == 0


def test_metrics_textfile_is_rewritten(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    out = tmp_path / "textfile" / "lmgrd.prom"
    out.parent.mkdir()
    cfg = tmp_path / "lmgrd.yaml"
    cfg.write_text(f"metrics_port: 0\nmetrics_textfile: {out}\nmetrics_textfile_interval: 1\n")
    d = daemon_factory(extra=["-c", str(cfg)])
    c = client(d, "ann")
    assert isinstance(c.request(Checkout(c.id(), "CADPRO", "2.1", 0)), Granted)
    cid = customer_id(d)
    deadline = time.monotonic() + 15
    in_use = -1.0
    while time.monotonic() < deadline:
        if out.exists():
            in_use = seat(samples(out.read_text()), cid, "CADPRO", "in_use")
            if in_use == 1:
                break
        time.sleep(0.1)
    assert in_use == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["lmgrd.prom"]
    assert d.stop() == 0
