"""The activation service as the tests and benchmarks run it: a throwaway PostgreSQL cluster, a CA and server
certificate made with trustme, ``lmcloud serve`` as a real uvicorn subprocess on loopback, and a simulated
installation (key pair, fingerprint, certificate) that makes the signed requests a daemon would.

Every process started here is stopped by its PID (``stop()``); nothing is left running.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import os
import pwd
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trustme
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.cloud import (
    ActivationCertificate,
    ActivationRequest,
    CheckInRequest,
    OfflineRequest,
    canonical_bytes,
    installation_key_text,
    nonce_text,
    signed_json,
)
from protocol.fingerprint import Fingerprint

BIN = Path(sys.executable).parent
LMCLOUD = str(BIN / "lmcloud")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# TLS


class TLS:
    """A CA made in the test and a server certificate for 127.0.0.1 and localhost, written to ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost", "::1")
        self.ca_file = directory / "ca.pem"
        self.cert_file = directory / "server.pem"
        self.key_file = directory / "server.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(self.key_file))
        with open(self.cert_file, "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


# --------------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresCluster:
    """A throwaway cluster (initdb + pg_ctl) on a free loopback port in a temp dir, trust authentication.

    As root, the server runs as ``nobody`` (PostgreSQL refuses root) in a directory it owns.
    """

    def __init__(self, fsync: bool = False) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (run .ci/install-deps.sh: Debian package postgresql)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="lmcloud-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.fsync = fsync
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "nobody"
            os.chmod(self.root, 0o755)
            pw = pwd.getpwnam("nobody")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        subprocess.run([str(self.bindir / args[0]), *args[1:]], check=True, user=self.user, cwd=self.root,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> PostgresCluster:
        self._run("initdb", "-D", str(self.data), "-U", "lmcloud", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.fsync:
            opts += " -c fsync=off -c synchronous_commit=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "-t", "60", "start")
        return self

    def create_database(self, name: str) -> str:
        """A new database; returns its ``postgresql://`` URL."""
        subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "lmcloud", name],
                       check=True, timeout=60, stderr=subprocess.PIPE)
        return f"postgresql://lmcloud@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The service


def lmcloud(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run an ``lmcloud`` command to completion."""
    return subprocess.run([LMCLOUD, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def lmcloud_here(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an ``lmcloud`` command in this process (the same ``main``, without a new interpreter's start-up).

    The tests use it for the many admin commands; ``lmcloud`` itself (console script, exit code, stderr) is
    run as a subprocess where that is what is tested.
    """
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from lmgrd.vendor.lmcloud.commands import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args), out)
            except SystemExit as exc:  # argparse usage errors
                code = int(exc.code or 0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["lmcloud", *args], code, out.getvalue(), err.getvalue())


class CloudService:
    """``lmcloud serve`` as a subprocess on 127.0.0.1 (port chosen by the OS, read from the ready line)."""

    def __init__(self, db: str, key: Path, tls: TLS | None, *, valid_for: int = 3600, clock_offset: float = 0,
                 rate_limit_customer: float = 0, rate_limit_address: float = 0, log: Path | None = None) -> None:
        self.db, self.key, self.tls = db, key, tls
        self.args = ["--valid-for", str(valid_for), "--rate-limit-customer", str(rate_limit_customer),
                     "--rate-limit-address", str(rate_limit_address)]
        self.env = {**os.environ}
        if clock_offset:
            self.env["LMCLOUD_CLOCK_OFFSET_SECONDS"] = str(clock_offset)
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 30) -> CloudService:
        cmd = [LMCLOUD, "serve", "--db", self.db, "--key", str(self.key), "--bind", "127.0.0.1", "--port", "0",
               *self.args]
        if self.tls is not None:
            cmd += ["--tls-cert", str(self.tls.cert_file), "--tls-key", str(self.tls.key_file)]
        if self.log is not None:
            with open(self.log, "w") as stderr:  # the child keeps its own copy of the descriptor
                self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=self.env)
        else:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         env=self.env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                break
        if not line.startswith("lmcloud: serving "):
            self.stop()
            detail = self.log.read_text() if self.log and self.log.exists() else ""
            raise RuntimeError(f"lmcloud serve did not start: {line!r} {detail[-2000:]}")
        self.url = line.split()[2]
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


# --------------------------------------------------------------------------------------------------
# A simulated installation (what the daemon keeps in its state directory)


class Installation:
    """One installation of a license server: its key pair, its machine's fingerprint, its latest certificate."""

    def __init__(self, customer_id: str, hostname: str = "licsrv01", machine_id: str | None = None,
                 macs: tuple[str, ...] = ("02:00:00:00:00:01", "02:00:00:00:00:02"),
                 addresses: tuple[str, ...] = ("192.0.2.10",)) -> None:
        self.customer_id = customer_id
        self.hostname = hostname
        self.addresses = addresses
        self.key = Ed25519PrivateKey.generate()
        self.fingerprint = Fingerprint.of(hostname, machine_id or nonce_text(os.urandom(16)), macs)
        self.certificate: ActivationCertificate | None = None

    @property
    def key_text(self) -> str:
        return installation_key_text(self.key.public_key())

    def clone(self) -> Installation:
        """A byte-for-byte copy (a cloned VM or disk): same key, same fingerprint, same certificate."""
        twin = copy.copy(self)
        return twin

    def _sign(self, doc: Any) -> dict[str, Any]:
        return signed_json(doc, self.key.sign(canonical_bytes(doc)))

    def activation(self, mode: str = "manual", nonce: str | None = None, sent_at: datetime | None = None
                   ) -> dict[str, Any]:
        return self._sign(ActivationRequest(
            self.customer_id, self.hostname, self.addresses, self.fingerprint, self.key_text,
            nonce or nonce_text(os.urandom(16)), sent_at or datetime.now(UTC), mode))  # type: ignore[arg-type]

    def check_in(self, token: str | None = None, sequence: int | None = None, nonce: str | None = None
                 ) -> dict[str, Any]:
        cert = self.certificate
        assert cert is not None or token is not None
        return self._sign(CheckInRequest(
            self.customer_id, self.hostname, self.addresses, self.fingerprint, self.key_text,
            token or (cert.token if cert else "") or "", sequence if sequence is not None else (
                cert.sequence if cert else 0), nonce or nonce_text(os.urandom(16)), datetime.now(UTC)))

    def offline_request(self) -> dict[str, Any]:
        return self._sign(OfflineRequest(self.customer_id, self.hostname, self.addresses, self.fingerprint,
                                         self.key_text, nonce_text(os.urandom(16)), datetime.now(UTC)))
