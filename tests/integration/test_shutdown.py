"""Staged shutdown of the real daemon: SIGTERM waits (up to ``shutdown_timeout``) for clients to take their
last replies, a second SIGTERM stops without waiting (as uvicorn's second Ctrl-C), and held seats are
persisted either way."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from harness import HOSTNAME, Daemon, RawClient

from lmgrd.storage.journal import read_journal
from protocol import Checkout, Connection, Granted, Hello, Role, Status, Welcome


def _stalled_reader(d: Daemon) -> socket.socket:
    """A client that asks for a lot and reads nothing: the daemon cannot finish writing to it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small receive window
    sock.connect(("127.0.0.1", d.port))
    conn = Connection(Role.CLIENT)
    sock.sendall(conn.send(Hello(1, (1,), HOSTNAME, "slow", os.getpid(), "test", "")))
    sock.settimeout(0.5)
    burst = b"".join(conn.send(Status(i)) for i in range(2, 1002))
    try:
        for _ in range(2000):  # bounded: at most 2 million requests
            sock.sendall(burst)
    except TimeoutError:
        pass  # the daemon stopped reading us: its write buffer towards us is full
    return sock


def test_sigterm_waits_for_clients_and_a_second_one_does_not(daemon_factory: Callable[..., Daemon],
                                                              tmp_path: Path) -> None:
    cfg = tmp_path / "lmgrd.yaml"
    cfg.write_text("shutdown_timeout: 30\n")
    d = daemon_factory(extra=["-c", str(cfg), "--metrics-port", "0"], heartbeat=20.0, lease_timeout=60.0)
    holder = RawClient(d.port)
    assert isinstance(holder.hello(host=HOSTNAME, user="alice"), Welcome)
    g = holder.request(Checkout(holder.id(), "CADPRO", "2.1", 0))
    assert isinstance(g, Granted)
    stalled = _stalled_reader(d)
    d.wait_for_log(r"is not reading its replies")
    assert d.proc is not None
    d.signal(signal.SIGTERM)
    d.wait_for_log(r"shutting down \(SIGTERM\)")
    time.sleep(1.5)
    assert d.proc.poll() is None, "the first SIGTERM must wait for the stalled client (shutdown_timeout 30 s)"
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    assert "asked again to stop" in d.log()
    assert [r.token for r in read_journal(d.state_dir / "leases.journal")] == [g.token]
    stalled.close()


def test_sigterm_stops_promptly_when_clients_go(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    cfg = tmp_path / "lmgrd.yaml"
    cfg.write_text("shutdown_timeout: 30\n")
    d = daemon_factory(extra=["-c", str(cfg), "--metrics-port", "0"])
    c = RawClient(d.port)
    assert isinstance(c.hello(host=HOSTNAME, user="alice"), Welcome)
    assert isinstance(c.request(Checkout(c.id(), "CADPRO", "2.1", 0)), Granted)
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 5  # the client read SHUTTING_DOWN and the daemon closed it: no 30 s wait
    assert c.closed()
