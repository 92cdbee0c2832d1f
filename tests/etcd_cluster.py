"""Real etcd members for the HA tests and benchmarks: started on 127.0.0.1 free ports, stopped by PID.

Debian's ``etcd-server`` (3.4) is installed by ``.ci/install-deps.sh``. Fast elections for tests
(``--heartbeat-interval 10 --election-timeout 100``; never for production) and the auto-compaction the README
documents.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    cluster: str
    proc: subprocess.Popen[bytes] | None = None
    fast: bool = True

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def args(self) -> list[str]:
        a = [ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
             "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-cluster", self.cluster, "--initial-cluster-state", "new",
             "--initial-cluster-token", "lm-test",
             "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
             "--logger", "zap", "--log-outputs", "stderr"]
        if self.fast:
            a += ["--heartbeat-interval", "10", "--election-timeout", "100"]
        return a

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    """``n`` etcd members on loopback. ``start()`` waits until every member answers ``endpoint health``."""

    workdir: Path
    n: int = 1
    fast: bool = True
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * self.n)
        names = [f"m{i + 1}" for i in range(self.n)]
        cluster = ",".join(f"{nm}=http://127.0.0.1:{ports[self.n + i]}" for i, nm in enumerate(names))
        self.members = [Member(nm, ports[i], ports[self.n + i], self.workdir / f"{nm}.data",
                               self.workdir / f"{nm}.log", cluster, fast=self.fast) for i, nm in enumerate(names)]

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        for m in self.members:
            m.start()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20.0, members: list[Member] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for m in members or self.members:
            while True:
                r = subprocess.run([ETCDCTL, "--endpoints", m.endpoint, "--command-timeout=1s", "endpoint", "health"],
                                   capture_output=True, timeout=10)
                if r.returncode == 0:
                    break
                if time.monotonic() > deadline or not m.alive:
                    raise AssertionError(f"etcd {m.name} not healthy: {r.stderr.decode()}\n{m.log.read_text()}")
                time.sleep(0.1)

    def leader(self) -> Member:
        for _ in range(100):
            for m in self.members:
                if not m.alive:
                    continue
                r = subprocess.run([ETCDCTL, "--endpoints", m.endpoint, "--command-timeout=1s", "endpoint", "status",
                                    "-w", "json"], capture_output=True, timeout=10)
                if r.returncode == 0:
                    st = json.loads(r.stdout)[0]["Status"]
                    if st["header"]["member_id"] == st["leader"]:
                        return m
            time.sleep(0.1)
        raise AssertionError("no etcd leader found")

    def ctl(self, *args: str) -> str:
        r = subprocess.run([ETCDCTL, "--endpoints", self.endpoints, "--command-timeout=3s", *args],
                           capture_output=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"})
        if r.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)}: {r.stderr.decode()}")
        return r.stdout.decode()

    def stop(self) -> None:
        for m in self.members:
            m.kill(signal.SIGKILL)
