"""A real ``Server`` without sockets, for unit tests of the handlers, the lease lifecycle and admin: ledger,
journal store in a temp dir, licensing from real signed files, on the test's own loop; sessions write to a
recording transport whose frames are decoded back into replies."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import HOSTNAME, holder_secret, write_license

from lmgrd.config import DaemonConfig, build_config
from lmgrd.core.ledger import LeaseInfo
from lmgrd.core.licensing import Licensing
from lmgrd.daemon.events import EndReason
from lmgrd.daemon.server import Server
from lmgrd.daemon.session import Session
from lmgrd.storage.files import load_licensing
from lmgrd.storage.journal import JournalStore, read_journal
from protocol import Checkout, Connection, ErrorCode, Hello, Role
from protocol.framing import FrameDecoder


class RecordingTransport:
    """Stands in for the socket: keeps what the daemon writes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.decoder = FrameDecoder()

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def replies(self) -> list[dict[str, Any]]:
        out = self.decoder.feed(bytes(self.data))
        self.data.clear()
        return out


class Recorder:
    """An observer that keeps every event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.denials: list[tuple[str, str, ErrorCode, str | None, str | None]] = []

    def on_grant(self, lease: LeaseInfo, who: Any, waited: float) -> None:
        self.events.append(("grant", (lease.token, who.user, who.host, waited)))

    def on_release(self, lease: LeaseInfo, reason: EndReason) -> None:
        self.events.append(("release", (lease.token, reason)))

    def on_deny(self, product: str, version: str, code: ErrorCode, who: Any, customer_id: str | None) -> None:
        self.events.append(("deny", (product, code)))
        self.denials.append((product, version, code, who.user if who is not None else None, customer_id))


class Rig:
    def __init__(self, server: Server, recorder: Recorder, state: Path) -> None:
        self.server, self.recorder, self.state = server, recorder, state
        self.ids = 0

    def connect(self, user: str, host: str = HOSTNAME, pid: int = 4242, display: str = ":0",
                secret: str | None = None, proto: tuple[int, ...] = (1, 2)) -> Session:
        """A session after hello; ``secret`` defaults to this user@host's fixed one (harness.holder_secret)."""
        s = Session(self.server.cfg.max_frame_bytes)
        t = RecordingTransport()
        s.transport = t
        s.addr, s.port = "127.0.0.1", 5000
        if secret is None and 2 in proto:
            secret = holder_secret(user, host)
        hello = Hello(self.rid(), proto, host, user, pid, "test", display, secret or "")
        (received,) = s.conn.receive_data(Connection(Role.CLIENT).send(hello))  # the handshake's state
        self.server.handlers.hello(s, received)
        self.server.outbox.flush()
        (welcome,) = t.replies()
        assert welcome["op"] == "welcome", welcome
        return s

    def rid(self) -> int:
        self.ids += 1
        return self.ids

    def send(self, s: Session, req: Any) -> list[dict[str, Any]]:
        self.server.handlers.dispatch(s, req)
        self.server.outbox.flush()
        return self.replies(s)

    @staticmethod
    def replies(s: Session) -> list[dict[str, Any]]:
        t = s.transport
        assert isinstance(t, RecordingTransport)
        return t.replies()

    def checkout(self, s: Session, product: str = "CADPRO", version: str = "2.1", wait: float = 0) -> dict[str, Any]:
        (reply,) = self.send(s, Checkout(self.rid(), product, version, wait))
        return reply

    def journal(self) -> dict[str, Any]:
        """The live leases in the journal on disk (token -> record)."""
        return {r.token: r for r in read_journal(self.state / "leases.journal")}


Body = Callable[[Rig], Awaitable[None]]


def run(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], body: Body, *,
        products: Any = (("CADPRO", "2.1", 1),), share: str = "user_host", extra: dict[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
        reload: Callable[[DaemonConfig], tuple[Licensing, list[str]]] | None = None,
        keep_license: bytes | None = None) -> None:
    """Run ``body`` against a fresh Server; ``keep_license`` serves that license file again instead of a new one."""
    key, pub = vendor
    lic = tmp_path / "site.lic"
    if keep_license is not None:
        lic.write_bytes(keep_license)
    else:
        write_license(lic, key, products, share=share)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    cfg = build_config(dict(extra or {}), {"licenses": [str(lic)], "vendor_key": str(pub), "port": 0,
                                           "state_dir": str(state), "heartbeat_interval": 1.0, "lease_timeout": 3.0},
                       "test")
    licensing, problems = load_licensing(cfg)
    assert not problems, problems

    async def main() -> None:
        store = JournalStore(state)
        server = Server(cfg, licensing, store, clock=clock,
                        reload=(lambda: reload(cfg)) if reload is not None else None)
        rec = Recorder()
        server.observers.add(rec)
        try:
            await body(Rig(server, rec, state))
        finally:
            store.close()

    asyncio.run(main())
