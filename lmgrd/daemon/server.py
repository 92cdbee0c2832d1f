"""The server shell: listeners, connections, the one expiry timer, journal sync, reload, staged shutdown.

A checkout, end to end: ``ClientProtocol.data_received`` (:mod:`lmgrd.daemon.transport`) ->
``Connection.receive_data`` -> ``Handlers.checkout`` (:mod:`lmgrd.daemon.session`: licensing checks
in the documented order) -> ``LeaseLifecycle.checkout`` (:mod:`lmgrd.daemon.leases`: ledger, journal
record, counter, event, log) -> the reply queued on the :class:`~lmgrd.daemon.outbox.Outbox`, sent after
the group-commit flush has written the record.

After every change that can bring a deadline forward, :meth:`Server.arm` re-arms the one ``call_at``
timer at ``ledger.next_deadline()``; when it fires the lifecycle ends the lapsed leases in bounded batches.

Admin commands and monitoring plug in from the composition root (:mod:`lmgrd.cli`): ``handlers.admin``,
``observers`` and ``request_timer``. This package never imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from lmgrd import __version__
from lmgrd.config import DaemonConfig
from lmgrd.core.ledger import LeaseInfo, Ledger, PoolKey
from lmgrd.core.licensing import Licensing, revocation_reason
from lmgrd.daemon.events import EndReason, Observers
from lmgrd.daemon.guard import RefusalCounts, RefusalLog
from lmgrd.daemon.leases import Counters, LeaseLifecycle, Timers, WaitCtx
from lmgrd.daemon.outbox import Outbox
from lmgrd.daemon.session import Handlers, Session, refuse
from lmgrd.daemon.transport import ClientProtocol
from lmgrd.storage.etcd import EtcdSeats
from lmgrd.storage.journal import LeaseStore, StoreError
from protocol import ErrorCode, ErrorReply, ProtocolError, error_frame

__all__ = ["EXPIRE_BATCH", "Server", "install_signal_handlers"]

logger = logging.getLogger(__name__)

#: Lapsed leases handled per timer wake-up, so a mass expiry never stalls the loop (etcd's revokeLimit).
EXPIRE_BATCH = 2000


class _TokenSource:
    """Lease tokens: 128 random bits each, hex, cut from 4 KiB reads of the OS CSPRNG (one getrandom(2) per
    256 tokens instead of one per token; the bits are the same ``os.urandom`` bits ``secrets`` uses), each read
    hex-encoded at once (a token is then one string slice)."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0

    def __call__(self) -> str:
        pos = self.pos
        if pos >= len(self.buf):
            self.buf = os.urandom(4096).hex()
            pos = 0
        self.pos = pos + 32
        return self.buf[pos:pos + 32]


new_token = _TokenSource()


class Server:
    """Holds the ledger, the store, the licensing decisions and every connection."""

    def __init__(
        self,
        cfg: DaemonConfig,
        licensing: Licensing,
        store: LeaseStore,
        *,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
        reload: Callable[[], tuple[Licensing, list[str]]] | None = None,
        cluster: EtcdSeats | None = None,
    ) -> None:
        self.cfg = cfg
        self.reload_fn = reload
        #: Metrics and the usage log subscribe here (see :class:`lmgrd.daemon.events.Observer`).
        self.observers = Observers()
        #: Set by lmgrd.monitoring.metrics.attach: the Metrics object and the per-request timer.
        self.metrics: Any = None
        self.request_timer: Callable[[type, float], None] | None = None
        #: Set by lmgrd.cli when a served license has a cloud_url: the agent talking to the activation service
        #: (lmgrd.daemon.cloud.CloudAgent), which lmutil activate reaches through lmgrd.admin.
        self.cloud: Any = None
        self.licensing = licensing
        self.store = store
        self.loop = asyncio.get_running_loop()
        self.clock = clock or self.loop.time
        self.wall = wall
        self.hb_interval = cfg.heartbeat_interval
        self.lease_timeout = cfg.lease_timeout
        self.ledger = Ledger(cfg.lease_timeout, new_token)
        self.sessions: dict[int, ClientProtocol] = {}
        self.per_address: dict[str, int] = {}
        #: Refusals of hostile or broken input, counted (metrics) and logged at a bounded rate.
        self.refusals = RefusalCounts()
        self.refusal_log = RefusalLog(self.clock, self.loop.call_later, self.refusals)
        #: Per-connection request rate (0: no limit) and the bucket's size: two seconds' worth.
        self.request_rate = cfg.max_requests_per_second
        self.request_burst = max(1.0, 2.0 * cfg.max_requests_per_second)
        self.idle_handle: asyncio.TimerHandle | None = None
        #: Connections that owe their hello, each with its deadline (``clock()`` + handshake_timeout), in arrival
        #: order: one sweep timer serves them all (no timer per connection); a hello removes its connection.
        self.awaiting_hello: dict[ClientProtocol, float] = {}
        self.handshake_handle: asyncio.TimerHandle | None = None
        self.outbox = Outbox(store, self.loop.call_soon, self.loop.call_later, self.clock)
        self.leases = LeaseLifecycle(
            self.ledger, store, self.outbox, self.observers, sessions=self.sessions,
            count_of=lambda pool: self.licensing.count(pool), timers=cast(Timers, self.loop), clock=self.clock,
            wall=wall, lease_timeout=cfg.lease_timeout, heartbeat_interval=cfg.heartbeat_interval,
            arm=self.arm, cluster=cluster)
        #: The cluster-wide seat store (HA, ``store: etcd``), or None.
        self.cluster = cluster
        self._cluster_tasks: list[asyncio.Task[None]] = []
        self.handlers = Handlers(
            self, self.leases, self.outbox, cast(dict[int, Session], self.sessions),
            heartbeat_interval=cfg.heartbeat_interval, lease_timeout=cfg.lease_timeout,
            max_frame_bytes=cfg.max_frame_bytes, clock=self.clock, wall=wall, fail=self.fail,
            refusals=self.refusals, refusal_log=self.refusal_log,
            awaiting_hello=cast(dict[Any, float], self.awaiting_hello))
        #: The handlers' hot routes (Handlers.hot), one attribute away for every hot read of the transport.
        self.hot_routes = self.handlers.hot
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.timer_when = 0.0
        self.sync_handle: asyncio.TimerHandle | None = None
        self.started_wall = wall()
        self.started = self.clock()
        self.closing = False
        self.forced = False
        self._force = asyncio.Event()
        self.open_connections = 0
        self._all_closed = asyncio.Event()
        self.listeners: list[asyncio.AbstractServer] = []
        self.ports: list[int] = []
        self.stopped = asyncio.Event()
        #: The admin credential, written by lmgrd.admin.token at start (empty: every admin command refused).
        self.admin_token = ""
        self.admin_token_path: Path | None = None
        for pool, count in licensing.pools().items():
            self.ledger.set_pool(pool, count)
        self._apply_policy()
        kept = self.leases.restore(self.store.load(), lambda pool: pool in self.licensing.pools())
        if kept or self.leases.counters.released:
            logger.info("restored %d lease(s) from the state directory; their clients have %.0f s to resume them",
                        kept, self.lease_timeout)
        self.arm()

    @property
    def timer(self) -> asyncio.TimerHandle | asyncio.Handle | None:
        """The one expiry timer (``None``: none armed; the lifecycle then arms it at its next grant)."""
        return self._timer

    @timer.setter
    def timer(self, handle: asyncio.TimerHandle | asyncio.Handle | None) -> None:
        self._timer = handle
        self.leases.timer_idle = handle is None

    @property
    def store_error(self) -> StoreError | None:
        """Why the lease store cannot write now (new checkouts refused with STORE_UNAVAILABLE), or ``None``."""
        return self.outbox.store_error

    @property
    def store_write_failures(self) -> int:
        """Failed lease-store writes since start (the first failure and every failed retry)."""
        return self.outbox.store_failures

    @property
    def counters(self) -> Counters:
        return self.leases.counters

    @property
    def waits(self) -> dict[int, WaitCtx]:
        return self.leases.waits

    # -- start-up and shutdown -----------------------------------------------------------------------------
    async def start(self) -> None:
        host = self.cfg.bind or None
        cluster = self.cluster
        if cluster is not None:  # HA: reach etcd before taking clients (a first checkout must not find it unknown)
            node_info = {"node": cluster.node, "host": socket.gethostname(), "port": self.cfg.port,
                         "bind": self.cfg.bind, "pid": os.getpid(), "version": __version__,
                         "started": self.started_wall}
            for _path, lic in self.licensing.served:  # an HA license's servers are the cluster's nodes (lmstat)
                cluster.known_nodes.update(name.split(".")[0] for name, _ip in lic.servers)
            await cluster.connect(node_info)
        srv = await self.loop.create_server(
            lambda: ClientProtocol(self), host=host, port=self.cfg.port, backlog=self.cfg.backlog,
            reuse_address=True,
        )
        self.listeners.append(srv)
        socks = srv.sockets or ()
        self.ports = sorted({s.getsockname()[1] for s in socks})
        addrs = ", ".join(sorted({f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in socks}))
        logger.info("lmgrd %s listening on %s (heartbeat %g s, lease timeout %g s, reconnect grace %g s)",
                    __version__, addrs, self.hb_interval, self.lease_timeout, self.cfg.grace)
        self.sync_handle = self.loop.call_later(self.cfg.sync_interval, self._sync_tick)
        if self.cfg.idle_connection_timeout:
            self.idle_handle = self.loop.call_later(self._idle_sweep_interval(), self._idle_tick)
        if cluster is not None:
            if self.ports and self.ports[0] != self.cfg.port:  # port 0: announce the one the kernel picked
                await cluster.announce({"port": self.ports[0]})
            self._cluster_tasks = [self.loop.create_task(self._keepalive_loop()),
                                   self.loop.create_task(self._view_loop())]

    def _idle_sweep_interval(self) -> float:
        # A connection is closed between 1 and 1.25 idle timeouts after its last request (at most 30 s late).
        return max(0.05, min(self.cfg.idle_connection_timeout / 4.0, 30.0))

    def _idle_tick(self) -> None:
        """Close the connections that hold no seat, wait for none and sent nothing for the idle timeout.

        O(connections) every sweep interval; a connection holding a seat (or queued for one) is never closed
        here: its heartbeats keep the lease, and a silent one loses the lease by its own timeout."""
        self.idle_handle = None
        if self.closing:
            return
        timeout = self.cfg.idle_connection_timeout
        limit = self.clock() - timeout
        holds = self.ledger.holds
        for s in list(self.sessions.values()):
            if s.last_active > limit or s.waiters or holds(s.session):
                continue
            t = s.transport
            if t is None or t.is_closing():
                continue
            self.refusals.idle_closed += 1
            self.refusal_log("idle connections", logging.INFO, "closing the connection of %s (%s): it holds no "
                             "seat and sent nothing for %g s (idle_connection_timeout)", s.who(), s.peer, timeout)
            self.outbox.send(s, None)
        self.idle_handle = self.loop.call_later(self._idle_sweep_interval(), self._idle_tick)

    # -- the cluster store (HA) -------------------------------------------------------------------------------
    async def _keepalive_loop(self) -> None:
        """Keep alive the etcd leases of every seat this node serves (TTL/3); end seats etcd no longer has."""
        cluster = self.cluster
        assert cluster is not None
        period = cluster.ttl / 3
        while not self.closing:
            await asyncio.sleep(period)
            try:  # bounded: ending seats in time must not wait for a slow etcd
                lost = await asyncio.wait_for(cluster.maintain(), max(0.05, cluster.time_left()))
            except TimeoutError:
                lost = []
            if not lost and cluster.overdue():
                lost = list(cluster.token_seat)
            if lost:
                n = self.leases.store_lost(lost)
                if n:
                    logger.warning("%d seat(s) ended: the shared seat store no longer holds them", n)

    async def _view_loop(self) -> None:
        """The cluster's seats and nodes (lmstat, metrics and the cluster-wide queue), kept current by a watch;
        a seat freed on another node is offered to this node's cluster queue at once."""
        cluster = self.cluster
        assert cluster is not None
        await cluster.follow(self.leases.serve_cluster)

    def request_shutdown(self, why: str) -> None:
        """Stop in stages: no new connections, clients told, wait up to ``shutdown_timeout`` for them to
        close, then the rest dropped. Asked again while stopping (a second SIGTERM), skip the wait."""
        if self.closing:
            if not self.forced:
                self.forced = True
                logger.warning("asked again to stop (%s): not waiting for clients any longer", why)
                self._force.set()
            return
        self.closing = True
        logger.info("shutting down (%s): no new connections; leases are kept for their clients to resume", why)
        for srv in self.listeners:
            srv.close()
        self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        self.outbox.flush()
        for s in list(self.sessions.values()):
            self.outbox.reply(s, ErrorReply, error_frame(0, ProtocolError(
                ErrorCode.SHUTTING_DOWN, "the license server is shutting down",
                "your seats are kept; the client resumes them when the server is back")))
            self.outbox.send(s, None)
        self.outbox.flush()
        # Wait (up to shutdown_timeout) for every client to take its replies and go, or for a second signal.
        if self.open_connections:
            closed = asyncio.ensure_future(self._all_closed.wait())
            force = asyncio.ensure_future(self._force.wait())
            _done, pending = await asyncio.wait({closed, force}, timeout=self.cfg.shutdown_timeout,
                                                return_when=asyncio.FIRST_COMPLETED)
            if not closed.done() and not force.done():
                logger.warning("%d connection(s) did not close within %.1f s", self.open_connections,
                               self.cfg.shutdown_timeout)
            for fut in pending:
                fut.cancel()
        left = [s for s in self.sessions.values() if s.transport is not None and not s.transport.is_closing()]
        for s in list(self.sessions.values()):
            s.abort()
        if left:
            logger.info("closed %d connection(s) that were still open", len(left))
        self.outbox.cancel_retry()
        try:
            self.store.close()  # flush, sync, close
        except StoreError as exc:
            logger.error("stopping with records not written: %s. Seats checked in since the state directory "
                         "failed come back at the next start and lapse after a lease timeout if nobody resumes "
                         "them; no grant was acknowledged without its record", exc)
        except OSError as exc:
            logger.error("could not sync the lease journal at shutdown: %s", exc)
        for task in self._cluster_tasks:
            task.cancel()
        if self.cluster is not None:
            # The seats stay in etcd, on their clients' etcd leases: the clients resume them on another node.
            await self.cluster.close()
        if self.timer is not None:
            self.timer.cancel()
        if self.sync_handle is not None:
            self.sync_handle.cancel()
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.handshake_handle is not None:
            self.handshake_handle.cancel()
        self.refusal_log.close()
        self.observers.shutdown()  # observers flush (the usage log drains its queue; the admin token goes)
        logger.info("lmgrd stopped; %d lease(s) persisted", len(self.ledger))
        self.stopped.set()

    def _sync_tick(self) -> None:
        if self.outbox.dirty:
            self.outbox.dirty = False
            try:
                self.store.sync()
            except OSError as exc:
                logger.error("cannot sync the lease journal: %s", exc)
        if not self.closing:
            self.sync_handle = self.loop.call_later(self.cfg.sync_interval, self._sync_tick)

    # -- connections ---------------------------------------------------------------------------------------
    def on_connect(self, proto: ClientProtocol) -> None:
        limit = self.cfg.max_connections_per_address
        n = self.per_address.get(proto.addr, 0) + 1
        self.per_address[proto.addr] = n
        self.counters.connections += 1
        self.open_connections += 1
        proto.last_active = self.clock()
        proto.allowance = self.request_burst
        if self.closing:
            self.refusals.connection("shutting_down")
            self.fail(proto, ProtocolError(ErrorCode.SHUTTING_DOWN, "the license server is shutting down",
                                           "retry in a few seconds"))
            return
        if limit and n > limit:
            self.refusals.connection("per_address_limit")
            self.refusal_log("connection refusals", logging.WARNING, "refused a connection from %s: %d connections "
                             "from that address (limit %d)", proto.addr, n - 1, limit)
            self.fail(proto, ProtocolError(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"too many connections from {proto.addr}: the limit is {limit} per address",
                "close idle connections, or ask the administrator to raise max_connections_per_address",
            ))
            return
        timeout = self.cfg.handshake_timeout
        self.awaiting_hello[proto] = proto.last_active + timeout
        if self.handshake_handle is None:
            self.handshake_handle = self.loop.call_later(timeout, self._handshake_tick)

    def _handshake_tick(self) -> None:
        """Drop the connections whose hello is overdue; re-arm at the next deadline (at most 1/16 of the timeout
        late, so a wave of silent connections costs a few wake-ups, not one each)."""
        self.handshake_handle = None
        awaiting = self.awaiting_hello
        now = self.clock()
        due: list[ClientProtocol] = []
        nxt = 0.0
        for proto, deadline in awaiting.items():  # arrival order = deadline order (one timeout for all)
            if deadline > now:
                nxt = deadline
                break
            due.append(proto)
        for proto in due:
            del awaiting[proto]
            proto.handshake_expired()
        if awaiting and not self.closing:
            delay = max(nxt - now, self.cfg.handshake_timeout / 16)
            self.handshake_handle = self.loop.call_later(delay, self._handshake_tick)

    def on_disconnect(self, proto: ClientProtocol) -> None:
        self.open_connections -= 1
        if self.closing and self.open_connections <= 0:
            self._all_closed.set()
        n = self.per_address.get(proto.addr, 1) - 1
        if n <= 0:
            self.per_address.pop(proto.addr, None)
        else:
            self.per_address[proto.addr] = n
        self.awaiting_hello.pop(proto, None)
        self.leases.drop_waits(proto)
        if proto.session:
            self.sessions.pop(proto.session, None)
            if self.cluster is not None:
                self.cluster.forget_session(proto.session)
            detached = self.ledger.detach_session(proto.session, self.clock(), self.cfg.grace)
            if detached:
                logger.info("client %s disconnected holding %d seat(s); kept %.0f s for a reconnect",
                            proto.who(), len(detached), self.cfg.grace)
                self.arm()

    def fail(self, s: Session, exc: ProtocolError, request_id: int = 0) -> None:
        """Answer with an error and close this one client."""
        refuse(s, self.outbox, exc, request_id, self.refusal_log)

    # -- the expiry timer -------------------------------------------------------------------------------------
    def arm(self) -> None:
        nd = self.ledger.next_deadline()
        if nd is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            return
        if self.timer is not None:
            if nd >= self.timer_when:
                return
            self.timer.cancel()
        self.timer_when = nd
        self.timer = self.loop.call_at(nd, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.leases.expire(EXPIRE_BATCH) >= EXPIRE_BATCH:
            self.timer_when = self.clock()
            self.timer = self.loop.call_soon(self._on_timer)  # more may be due: next iteration
        else:
            self.arm()

    # -- admin operations (lmgrd.admin calls these) -------------------------------------------------------------
    def remove_lease(self, token: str, why: str) -> LeaseInfo | None:
        """Free one lease now (``lmutil lmremove``); ``None`` if no lease has that token. The holder learns
        it at its next heartbeat (``SEAT_REMOVED``, ``why`` in the message), or at its resume."""
        return self.leases.end(token, EndReason.REMOVAL, why)

    def _apply_policy(self) -> None:
        """Give every pool its product's reserve/max rules (or none); serving the queue must follow a change."""
        policy = self.licensing.policy
        for pool in self.ledger.pools():
            self.ledger.set_policy(pool, policy.get(pool[1]))

    def reload(self) -> dict[str, Any]:
        """Reload licenses without dropping a connection or a lease.

        A license file that now fails validation is refused with the reason and, if it was served before,
        the old copy keeps serving. Pools that disappear get count 0: their leases run on until checked in
        or lapsed, and no new seat is granted there. Seats under a revoked customer ID end now.
        """
        if self.reload_fn is None:
            return {"reloaded": False, "problems": ["this server was started without a reload source"]}
        new, problems = self.reload_fn()
        merged = self.licensing.merged_with(new, problems)
        old_pools = set(self.licensing.pools())
        self.licensing = merged
        for pool in [p for p in self.ledger.pools() if p[0] in merged.revoked]:
            self.leases.end_pool(pool, EndReason.REVOKED, revocation_reason(merged.revoked[pool[0]]),
                                 ErrorCode.LICENSE_REVOKED, "install the reissued license it was replaced by")
        for pool, count in merged.pools().items():
            self.ledger.set_pool(pool, count)
        for pool in old_pools - set(merged.pools()):
            if pool in self.ledger.pools():
                self.ledger.set_pool(pool, 0)
                logger.warning("pool %s/%s is no longer licensed: no new seats; %d held seat(s) run on until "
                               "checked in or lapsed", pool[0], pool[1], self.ledger.in_use(pool))
        self._apply_policy()
        if merged.policy.active:
            logger.info("reread: usage policy for %s", ", ".join(
                [*sorted(merged.policy.products), *(["every product"] if merged.policy.every_product else [])]))
        for prob in problems:
            logger.error("reread: %s", prob)
        served = [lic.customer_id for _, lic in merged.served]
        logger.info("reread: serving %d license(s): %s", len(served), ", ".join(served) or "none")
        for pool in merged.pools():
            self.leases.serve_pool(pool)
        return {"reloaded": True, "serving": served, "problems": problems}

    # -- status ----------------------------------------------------------------------------------------------
    def reserved(self, pool: PoolKey) -> int:
        """Free seats of ``pool`` held back for the subjects of a usage-policy ``reserve`` rule."""
        return self.ledger.reserved(pool)

    def status(self) -> dict[str, Any]:
        pools: list[dict[str, Any]] = []
        for pool, count in sorted(self.licensing.pools().items()):
            lic = self.licensing.license_for(pool)
            prod = lic.product(pool[1]) if lic else None
            pools.append({
                "customer_id": pool[0], "product": pool[1], "version": prod.version if prod else "",
                "count": count, "in_use": self.ledger.in_use(pool), "queued": self.ledger.queued(pool),
                "reserved": self.ledger.reserved(pool),
                "expires": lic.expires.isoformat() if lic and lic.expires else None,
                "share": lic.share if lic else "",
                "activation": self.licensing.activation_state(pool[0], datetime.fromtimestamp(self.wall(), UTC)),
            })
        cluster = self.cluster
        if cluster is not None:  # HA: seat counts are the cluster's; in_use_here is this node's share
            for entry in pools:
                here = int(entry["in_use"])
                entry["in_use_here"] = here
                entry["in_use"] = max(cluster.held((str(entry["customer_id"]), str(entry["product"]))), here)
        return {
            **({"cluster": {"node": cluster.node, "store": "etcd", "store_up": cluster.up,
                            "endpoints": list(cluster.settings.endpoints), "nodes": cluster.node_lines(),
                            "view_at": cluster.view_at}} if cluster is not None else {}),
            "server_version": __version__,
            "uptime_seconds": round(self.clock() - self.started, 3),
            "heartbeat_interval": self.hb_interval,
            "lease_timeout": self.lease_timeout,
            "connections": len(self.sessions),
            "pools": pools,
            "refused_licenses": self.licensing.refusals(),
            "cloud": self.cloud_status(),
            "store": {"writable": self.outbox.store_error is None,
                      "error": str(self.outbox.store_error) if self.outbox.store_error is not None else None},
        }

    def cloud_status(self) -> list[dict[str, Any]]:
        """Each license activated by the vendor's activation service: state, certificate, last contact, and
        the warning while the service is unreachable near the certificate's end (lmstat --json/--extended)."""
        acts = self.licensing.activations
        cloud = acts.cloud if acts is not None else None
        if cloud is None:
            return []
        now = datetime.fromtimestamp(self.wall(), UTC)
        return [cloud.view(lic, now) for _p, lic in self.licensing.served
                if lic.cloud_url is not None and lic.customer_id in cloud.licenses]


def install_signal_handlers(server: Server) -> None:
    """SIGHUP rereads; SIGTERM/SIGINT stop in stages, and a second one stops without waiting for clients."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):  # Windows has no SIGHUP
        loop.add_signal_handler(signal.SIGHUP, server.reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, server.request_shutdown, signal.Signals(sig).name)
        except (NotImplementedError, RuntimeError):  # Windows
            signal.signal(sig, lambda s, f: loop.call_soon_threadsafe(server.request_shutdown, "signal"))
