"""Test harness: real signed licenses, the real daemon as a subprocess, a minimal blocking protocol client.

Nothing here mocks the network or the store: the daemon is ``python -m lmgrd`` on an ephemeral 127.0.0.1
port with its own state directory, and ``RawClient`` speaks the wire protocol over a real socket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd.vendor.signing import new_customer_id, sign_license
from protocol import Connection, Hello, Reply, Request, Role, Status, StatusReply, Welcome
from protocol.license import License, Product

REPO = Path(__file__).resolve().parent.parent
HOSTNAME = socket.gethostname().split(".")[0]


def write_keys(directory: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A fresh vendor key pair; returns the private key and the path of vendor.pub."""
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pub = directory / "vendor.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def write_license(
    path: Path,
    key: Ed25519PrivateKey,
    products: Sequence[tuple[str, str, int]] = (("CADPRO", "2.1", 3),),
    *,
    share: str = "user_host",
    license_type: str = "multi",
    hostname: str = HOSTNAME,
    ip: str = "127.0.0.1",
    expires: date | None = None,
    issued_at: datetime | None = None,
    customer_id: str | None = None,
    site_networks: Sequence[str] = (),
) -> License:
    """Sign a license for this host. ``issued_at`` defaults to 25 hours ago, so the license has already
    activated by itself (the 24-hour rule); pass a recent time to get a ``pending`` one."""
    lic = License(
        customer_id=customer_id or new_customer_id(os.urandom(10)),
        license_type=license_type,  # type: ignore[arg-type]
        customer="Test Customer",
        hostname=hostname,
        ip=ip,
        products=tuple(Product(n, v, c) for n, v, c in products),
        issued_at=issued_at or datetime.now(UTC) - timedelta(hours=25),
        expires=expires,
        site_networks=tuple(site_networks),
        share=share,  # type: ignore[arg-type]
    )
    path.write_text(sign_license(lic, key), encoding="utf-8")
    return lic


class Daemon:
    """``lmgrd`` as a subprocess. Logs go to a file so the pipe can never fill and block the daemon."""

    def __init__(self, workdir: Path, licenses: Sequence[Path], vendor_pub: Path, *, state_dir: Path | None = None,
                 heartbeat: float = 1.0, lease_timeout: float = 3.0, extra: Sequence[str] = (),
                 port: int = 0) -> None:
        self.workdir = workdir
        self.licenses = list(licenses)
        self.vendor_pub = vendor_pub
        self.state_dir = state_dir or workdir / "state"
        self.heartbeat = heartbeat
        self.lease_timeout = lease_timeout
        self.extra = list(extra)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "lmgrd.log"
        self._log_offset = 0
        self.starts = 0

    def args(self) -> list[str]:
        a = [sys.executable, "-m", "lmgrd", "--vendor-key", str(self.vendor_pub), "--port", str(self.port),
             "--bind", "127.0.0.1", "--state-dir", str(self.state_dir), "--heartbeat-interval",
             str(self.heartbeat), "--lease-timeout", str(self.lease_timeout), "--log-level", "debug"]
        for lic in self.licenses:
            a += ["--license", str(lic)]
        return a + self.extra

    def env(self) -> dict[str, str]:
        """The daemon's environment: its admin token goes to a runtime dir of this test's own."""
        return {**os.environ, "LMGRD_RUNTIME_DIR": str(self.workdir / "run")}

    def start(self, timeout: float = 60.0) -> Daemon:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log, cwd=REPO, env=self.env())
        m = self.wait_for_log(r"listening on [^ ]*:(\d+)", timeout)
        self.port = int(m.group(1))  # keep the same port across restarts
        return self

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def new_log(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.new_log())
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"lmgrd exited with {self.proc.returncode} before {pattern!r}:\n{self.new_log()}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {pattern!r} in the daemon log:\n{self.new_log()}")

    @property
    def address(self) -> str:
        return f"{self.port}@127.0.0.1"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def metrics_url(self, timeout: float = 10.0) -> str:
        """Base URL of the monitoring port as the daemon logged it (start with ``--metrics-port auto``)."""
        return self.wait_for_log(r"metrics and status page on (http://[^ ,]+/)", timeout).group(1)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("lmgrd did not exit within the shutdown timeout after SIGTERM") from None

    def connect(self, **kw: Any) -> RawClient:
        return RawClient(self.port, **kw)


#: The ``daemon_factory`` fixture (tests/conftest.py): ``daemon_factory(products, **Daemon arguments) -> Daemon``.
Factory = Callable[..., Daemon]


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 50 ms until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def hello_client(d: Daemon, user: str = "alice", host: str = HOSTNAME, timeout: float = 10.0) -> RawClient:
    """A raw connection to ``d`` that said hello as ``user`` on ``host`` and was welcomed."""
    c = RawClient(d.port, timeout=timeout)
    w = c.hello(host=host, user=user)
    assert isinstance(w, Welcome), w
    return c


def status(c: RawClient) -> dict[str, Any]:
    """The daemon's status map, asked on ``c``."""
    r = c.request(Status(c.id()))
    assert isinstance(r, StatusReply), r
    return r.data


def in_use(c: RawClient) -> int:
    """Seats in use in the daemon's first pool (the tests' one license)."""
    n = status(c)["pools"][0]["in_use"]
    assert isinstance(n, int), n
    return n


def holder_secret(user: str, host: str = HOSTNAME) -> str:
    """The hello secret tests use for ``user@host`` (fixed per identity, 128 bits of hex)."""
    return hashlib.sha256(f"test-holder {user}@{host}".encode()).hexdigest()[:32]


class RawClient:
    """A blocking client that speaks the wire protocol directly (for protocol-level integration tests)."""

    opened: ClassVar[list[RawClient]] = []  # closed by the conftest after each test

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0, source: str | None = None) -> None:
        # source: the local address to connect from (any 127.0.0.0/8 address works on Linux loopback).
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        RawClient.opened.append(self)
        self.conn = Connection(Role.CLIENT)
        self.replies: list[Reply] = []
        self.next_id = 1

    def send(self, req: Request) -> None:
        self.sock.sendall(self.conn.send(req))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> Reply:
        self.sock.settimeout(timeout)
        while not self.replies:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.replies.extend(self.conn.receive_data(data))
        return self.replies.pop(0)

    def request(self, req: Request, timeout: float = 10.0) -> Reply:
        self.send(req)
        return self.recv(timeout)

    def id(self) -> int:
        self.next_id += 1
        return self.next_id

    def hello(self, host: str = HOSTNAME, user: str = "alice", pid: int | None = None, secret: str | None = None,
              display: str = "") -> Reply:
        """Protocol 2's hello; the secret defaults to one of this user@host's own, so a second RawClient of the
        same user and host is the same holder (resumes its leases) and one of another user is not."""
        return self.request(Hello(self.id(), (1, 2), host, user, pid or os.getpid(), "test", display,
                                  secret if secret is not None else holder_secret(user, host)))

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (reads EOF)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.replies.extend(self.conn.receive_data(data))
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    """A ledger holder as a plain value, for tests that drive the ledger without a daemon session
    (the daemon passes its sessions, which satisfy ``lmgrd.core.ledger.HolderLike``)."""

    user: str
    host: str
    pid: int
    display: str
    session: int | None
    owner: str = ""
    addr: str = ""
