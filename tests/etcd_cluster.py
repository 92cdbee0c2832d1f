"""Real etcd members for the HA tests and benchmarks: started on 127.0.0.1 free ports, stopped by PID.

Debian's ``etcd-server`` (3.4) is installed by ``.ci/install-deps.sh``. Faster elections for tests
(``--heartbeat-interval 50 --election-timeout 500``; 100 ms flapped under load; never for production) and
the auto-compaction the README documents.
"""

from __future__ import annotations

import contextlib
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
    #: Further addresses to serve clients on (the host ends of network-namespace veth pairs).
    also_listen: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def args(self) -> list[str]:
        a = [ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
             "--listen-client-urls", ",".join(f"http://{ip}:{self.client_port}"
                                              for ip in ("127.0.0.1", *self.also_listen)),
             "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-cluster", self.cluster, "--initial-cluster-state", "new",
             "--initial-cluster-token", "lm-test",
             "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
             "--logger", "zap", "--log-outputs", "stderr"]
        if self.fast:
            a += ["--heartbeat-interval", "50", "--election-timeout", "500"]
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


def _poll(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    """One etcdctl probe of a poll loop. A probe that hangs past 10 s (a starved machine: etcdctl's own
    --command-timeout does not bound its start-up or dial) counts as one failed probe, not as the test's end."""
    try:
        return subprocess.run(args, capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 1, b"", b"etcdctl did not answer within 10 s")


@dataclass
class EtcdCluster:
    """``n`` etcd members on loopback. ``start()`` waits until every member answers ``endpoint health``."""

    workdir: Path
    n: int = 1
    fast: bool = True
    also_listen: tuple[str, ...] = ()
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * self.n)
        names = [f"m{i + 1}" for i in range(self.n)]
        cluster = ",".join(f"{nm}=http://127.0.0.1:{ports[self.n + i]}" for i, nm in enumerate(names))
        self.members = [Member(nm, ports[i], ports[self.n + i], self.workdir / f"{nm}.data",
                               self.workdir / f"{nm}.log", cluster, fast=self.fast, also_listen=self.also_listen)
                        for i, nm in enumerate(names)]

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
                r = _poll([ETCDCTL, "--endpoints", m.endpoint, "--command-timeout=1s", "endpoint", "health"])
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
                r = _poll([ETCDCTL, "--endpoints", m.endpoint, "--command-timeout=1s", "endpoint", "status", "-w",
                           "json"])
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


class SeatOracle:
    """A watch on the seat keys from revision 1 (``etcdctl watch --rev 1 -w json``), replayed in revision order.

    ``check(count)`` asserts the live seat set of every pool never exceeded ``count`` at any revision, and no
    token ever held two live seats; returns the replay (max live per pool, every token granted, deletes).
    """

    def __init__(self, cluster: EtcdCluster, prefix: str = "/lmgrd/c/") -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.out = cluster.workdir / f"watch-{time.monotonic_ns()}.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SeatOracle:
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen([ETCDCTL, "--endpoints", self.cluster.endpoints, "watch", "--prefix",
                                          self.prefix, "--rev", "1", "-w", "json"], stdout=f,
                                         stderr=subprocess.DEVNULL)
        return self

    def stop(self, settle: float = 1.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(settle)  # let the watch deliver what happened up to now
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def events(self) -> list[tuple[int, str, str, dict[str, object] | None]]:
        """(revision, PUT/DELETE, key, value) for every seat-key event, in revision order."""
        import base64

        evs: list[tuple[int, str, str, dict[str, object] | None]] = []
        for line in self.out.read_text().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            resp = json.loads(line)
            for ev in resp.get("Events") or ():
                kv = ev["kv"]
                key = base64.b64decode(kv["key"]).decode()
                if "/seats/" not in key:
                    continue
                kind = "DELETE" if ev.get("type") == 1 else "PUT"
                value = json.loads(base64.b64decode(kv["value"])) if kind == "PUT" and kv.get("value") else None
                evs.append((int(kv["mod_revision"]), kind, key, value))
        evs.sort(key=lambda e: e[0])
        return evs

    def check(self, count: int) -> dict[str, object]:
        live: dict[str, str] = {}  # slot key -> token
        max_live: dict[str, int] = {}
        granted: set[str] = set()
        deletes: list[tuple[int, str, str]] = []
        for rev, kind, key, value in self.events():
            pool = key.rsplit("/", 1)[0]
            if kind == "PUT":
                assert value is not None
                token = str(value["token"])
                if key not in live:  # a new seat (a PUT on a live key is an adoption: same seat, new node)
                    assert token not in live.values(), f"token {token[:8]} holds two seats at revision {rev}"
                else:
                    assert live[key] == token, f"slot {key} changed holder without a delete at revision {rev}"
                live[key] = token
                granted.add(token)
                n = sum(1 for k in live if k.rsplit("/", 1)[0] == pool)
                max_live[pool] = max(max_live.get(pool, 0), n)
                assert n <= count, f"{n} live seats in {pool} at revision {rev}, count {count}"
            else:
                deletes.append((rev, key, live.pop(key, "")))
        return {"max_live": max_live, "granted": granted, "deletes": deletes, "live": dict(live)}


class BlackholeProxy:
    """A loopback TCP forwarder to one etcd member that can be cut (``cut()``: open connections stop
    passing bytes and new ones hang, like a partition; ``heal()``). Runs its own asyncio loop in a thread."""

    def __init__(self, target_port: int) -> None:
        import asyncio
        import threading

        self.target_port = target_port
        self.port = free_ports(1)[0]
        self.blocked = False
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        ready = threading.Event()

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    while self.blocked:
                        await asyncio.sleep(0.05)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while self.blocked:
                await asyncio.sleep(0.05)
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                w.close()
                return
            self.writers.update((w, uw))
            await asyncio.gather(pipe(r, uw), pipe(ur, w))

        async def main() -> None:
            self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            ready.set()
            await self.server.serve_forever()

        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                self.loop.run_until_complete(main())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.blocked = True

    def heal(self) -> None:
        self.blocked = False

    def close(self) -> None:
        def stop() -> None:
            self.server.close()
            for w in self.writers:
                w.close()
            for t in __import__("asyncio").all_tasks(self.loop):
                t.cancel()

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(5)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


class NetNamespace:
    """A network namespace joined to this one by a veth pair: ``host_ip`` here, ``ip`` inside (a /30 of
    10.213.0.0/16 picked from the PID so parallel runs do not collide). Needs root; removed by ``close()``."""

    def __init__(self, index: int) -> None:
        n = (os.getpid() * 4 + index) % 16000
        self.name = f"lmha{os.getpid()}x{index}"
        self.host_if, self.ns_if = f"lmh{os.getpid() % 100000}{index}", f"lmn{os.getpid() % 100000}{index}"
        base = 4 * n
        self.host_ip = f"10.213.{base // 256}.{base % 256 + 1}"
        self.ip = f"10.213.{base // 256}.{base % 256 + 2}"
        cmds = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
            ["ip", "link", "set", self.ns_if, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.ip}/30", "dev", self.ns_if],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
        ]
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                self.close()
                raise AssertionError(f"{' '.join(c)}: {r.stderr}")

    def prefix(self, hostname: str) -> list[str]:
        """Run a command in this namespace with its own hostname (a UTS namespace of its own)."""
        return ["ip", "netns", "exec", self.name, "unshare", "--uts", "sh", "-c",
                f'hostname {hostname} && exec "$@"', "sh"]

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
