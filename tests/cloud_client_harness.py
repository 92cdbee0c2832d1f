"""The vendor's activation service as the daemon and the client stub meet it in tests: the real ``lmcloud``
as a subprocess on a port that stays the same across a restart (an outage, then the service back at the same
URL), a real HTTP CONNECT proxy (Debian tinyproxy), and licenses whose signed ``cloud_url`` names the service.
The CA and the service's own helpers are :mod:`tests.cloud_harness`'s. Nothing is mocked; every process is
stopped by its PID.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd.vendor.signing import new_customer_id, sign_license
from protocol.license import License, Product
from tests.cloud_harness import LMCLOUD, TLS, free_port
from tests.harness import HOSTNAME, REPO

__all__ = ["TLS", "Service", "TinyProxy", "cloud_license", "free_port", "lmcloud", "show", "write_private_key"]


def write_private_key(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def cloud_license(path: Path, key: Ed25519PrivateKey, url: str, *, license_type: str = "multi",
                  issued_at: datetime | None = None,
                  products: tuple[tuple[str, str, int], ...] = (("CADPRO", "2.1", 3),),
                  customer_id: str | None = None, expires: date | None = None) -> License:
    """A license issued now (so the 24 hours have not passed) whose activation the service at ``url`` decides."""
    lic = License(customer_id=customer_id or new_customer_id(os.urandom(10)),
                  license_type=license_type,  # type: ignore[arg-type]
                  customer="Test Customer", hostname=HOSTNAME, ip="127.0.0.1",
                  products=tuple(Product(n, v, c) for n, v, c in products),
                  issued_at=issued_at or datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5),
                  expires=expires, site_networks=(), share="user_host", cloud_url=url)
    path.write_text(sign_license(lic, key), encoding="utf-8")
    return lic


class Service:
    """``lmcloud serve`` as a subprocess on 127.0.0.1 (a fixed port once chosen, so a restart keeps the URL)."""

    def __init__(self, workdir: Path, vendor_key: Path, tls: TLS, db: str, *, valid_for: int = 60,
                 clock_offset: float = 0.0, port: int = 0) -> None:
        self.workdir, self.vendor_key, self.tls, self.db = workdir, vendor_key, tls, db
        self.valid_for, self.clock_offset = valid_for, clock_offset
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"lmcloud-{self.port}.log"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        if self.clock_offset:
            env["LMCLOUD_CLOCK_OFFSET_SECONDS"] = str(self.clock_offset)
        return env

    def start(self, timeout: float = 30.0) -> Service:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [LMCLOUD, "serve", "--key", str(self.vendor_key), "--bind", "127.0.0.1", "--port", str(self.port),
                 "--tls-cert", str(self.tls.cert_file), "--tls-key", str(self.tls.key_file),
                 "--valid-for", str(self.valid_for), "--db", self.db, "--rate-limit-customer", "0",
                 "--rate-limit-address", "0"],
                stdout=log, stderr=log, cwd=REPO, env=self.env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "lmcloud: serving" in self.log():
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise AssertionError(f"lmcloud exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"lmcloud did not start within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def lmcloud(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one ``lmcloud`` admin command (``register``, ``show``, ``supersede``, ``offline-response``, ...)
    against the real database ``db``: its real ``main`` in this process (an interpreter start saved per call;
    the service itself always runs as its own process)."""
    from lmgrd.vendor.lmcloud.commands import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*args, "--db", db], out=out)
    return subprocess.CompletedProcess(["lmcloud", *args], code, out.getvalue(), err.getvalue())


def show(db: str, customer_id: str) -> dict[str, Any]:
    res = lmcloud(db, "show", customer_id, "--json")
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


class TinyProxy:
    """Debian's tinyproxy on a free 127.0.0.1 port: a real HTTP CONNECT proxy, logging each connection."""

    def __init__(self, workdir: Path, connect_ports: list[int]) -> None:
        exe = shutil.which("tinyproxy")
        if exe is None:
            raise AssertionError("tinyproxy is not installed: run .ci/install-deps.sh")
        self.exe = exe
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "tinyproxy.log"
        self.conf = workdir / "tinyproxy.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", f"LogFile \"{self.log_path}\"",
                 "LogLevel Connect", "MaxClients 20", "Allow 127.0.0.1", "DisableViaHeader Yes",
                 *(f"ConnectPort {p}" for p in connect_ports)]
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> TinyProxy:
        self.proc = subprocess.Popen([self.exe, "-d", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"tinyproxy exited with {self.proc.returncode}") from None
                time.sleep(0.05)
        raise AssertionError("tinyproxy did not start")

    def connects(self) -> list[str]:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return re.findall(r"CONNECT [^ ]+", text)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
