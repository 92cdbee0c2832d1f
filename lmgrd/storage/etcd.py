"""Seats in etcd: the cluster-wide seat store of an HA deployment (``store: etcd``).

Several lmgrd nodes share one etcd cluster; any node can serve any client. The layout (research notes in
``shared/research/distributed.md``), under ``PREFIX`` (default ``/lmgrd``)::

    PREFIX/c/<customer>/seats/<product>/<slot:05d>  -> the seat: node, token, user, host, ... (JSON)
    PREFIX/tokens/<token>                           -> the lease record and the slot it uses (JSON)
    PREFIX/nodes/<node>                             -> a node that is up (its own etcd lease)

- **One key per seat slot**: a pool of ``count`` seats has slot keys ``00000`` .. ``count-1``, so at most
  ``count`` seats can exist *by construction*. A new seat is one transaction, ``If create_revision(slot_a) == 0
  Then put(slot_a), put(token) Else Txn(If create_revision(slot_b) == 0 ...)`` over up to 32 candidate slots,
  the innermost ``Else`` reading which slots are held (etcd Txn is linearizable: two nodes granting the last
  seat at the same instant cannot both succeed).
- **Release deletes only what this grant wrote**: ``If mod_revision(slot) == <revision of our put> Then
  delete``; a late release after the slot lapsed and was retaken frees nothing.
- **Keys live on the client session's etcd lease** (TTL = the daemon's lease timeout), kept alive by whichever
  node the client talks to. When a node dies the client resumes on another node, which *adopts* its seats
  (rewrites the slot with itself as holder, same etcd lease) and keeps the lease alive: no seat is lost, and the
  seat is freed only when the client stops heartbeating (its node ends the lease) or no node refreshes its etcd
  lease for the TTL.
- **Batches**: the acquires of a pool larger than ``MAX_CANDIDATES``, the joins and the releases queued in one
  loop iteration go in one transaction (:meth:`EtcdSeats._flush`), each a nested transaction with its own
  compares, on disjoint keys (etcd refuses a transaction that could write a key twice); at most
  ``MAX_BATCHES_IN_FLIGHT`` at once (group commit). A small pool's acquire names every slot and goes alone.
- **The cluster view** (every node's seats, for lmstat, metrics and the cluster-wide queue) is one read and
  then an etcd watch on the seat and node keys (:meth:`EtcdSeats.follow`); polled only while the watch is broken.
- Every call has a deadline (``timeout``) and carries gRPC metadata ``hasleader=true``: without quorum etcd
  answers "no leader" at once instead of hanging; both become :class:`StoreUnavailable`.

The gRPC stubs and messages come from ``aetcd`` (the optional extra ``lmgrd[ha]``; imported only when the store
is used). Its ``Client`` is not used: it has no TLS, no per-call metadata and flattens nested transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from lmgrd import LmgrdError
from lmgrd.core.ledger import LeaseRecord, PoolKey

__all__ = ["MAX_CANDIDATES", "Claim", "EtcdSeats", "EtcdSettings", "NullStore", "StoreUnavailable", "ha_missing"]

logger = logging.getLogger(__name__)

#: Candidate slots tried in one transaction (Python protobuf refuses > 50 nested levels; etcd's default
#: --max-txn-ops is 128: each level has 2 puts).
MAX_CANDIDATES = 32
#: Attempts of one acquire when the pool is larger than MAX_CANDIDATES and the candidates were all taken.
_ATTEMPTS = 8
#: Pause before the one retry of an idempotent call (a leader change, an overloaded member).
_RETRY_PAUSE = 0.2
#: Candidates per transaction in a pool larger than MAX_CANDIDATES, picked at random from the slots last seen free.
WIDE_CANDIDATES = 4
#: Operations (acquires, joins, releases) sent in one etcd transaction, at most (etcd's --max-txn-ops is 128).
MAX_BATCH = 64
#: Batches waiting for etcd at once; the operations queued meanwhile go in the next one (group commit).
MAX_BATCHES_IN_FLIGHT = 2


class StoreUnavailable(LmgrdError):
    """etcd did not answer within the deadline, has no leader, or refused the call."""


def ha_missing() -> str | None:
    """Why ``store: etcd`` cannot run here (the ``lmgrd[ha]`` extra is not installed), or ``None``."""
    try:
        import aetcd.rpc  # noqa: F401
        import grpc  # noqa: F401
    except ImportError as exc:
        return f"store: etcd needs the optional extra: pip install 'lmgrd[ha]' ({exc})"
    return None


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """How to reach etcd. ``endpoints`` are ``host:port``; TLS when ``ca`` is set (client cert optional)."""

    endpoints: tuple[str, ...]
    prefix: str = "/lmgrd"
    timeout: float = 2.0
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = None


@dataclass(slots=True)
class Claim:
    """A seat this node holds in etcd: its slot key, the revision of our write, the etcd lease it lives on."""

    slot: bytes
    rev: int
    lease: int
    tokens: set[str] = field(default_factory=set)


SeatKey = tuple[str, str, tuple[str, ...]]  # (customer, product, share key)


def _q(s: str) -> str:
    return quote(s, safe="")


class EtcdSeats:
    """The etcd side of seat grants and ends for one lmgrd node (see the module docstring)."""

    def __init__(self, settings: EtcdSettings, node: str, ttl: float, *,
                 observe: Callable[[str, float], None] | None = None) -> None:
        self.settings = settings
        self.node = node
        self.ttl = max(2, math.ceil(ttl))
        self.timeout = settings.timeout
        self.prefix = settings.prefix.rstrip("/")
        #: Called with (operation, seconds) after every etcd call (the metrics histogram plugs in here).
        self.observe = observe
        self.up = False
        self.last_ok = time.monotonic()
        self.keepalive_ok = time.monotonic()
        self.claims: dict[SeatKey, Claim] = {}
        self.token_seat: dict[str, SeatKey] = {}
        self.token_lease: dict[str, int] = {}
        self.session_lease: dict[int, int] = {}
        self.node_lease = 0
        self.node_info: dict[str, Any] = {}
        #: Releases etcd did not confirm yet (retried by the keepalive loop): (slot, our revision, last token of
        #: the seat, token key).
        self.pending: list[tuple[bytes, int, bool, bytes]] = []
        #: The cluster's seats as last read or watched (every node's): pool -> slot -> the seat's value (JSON,
        #: decoded only for lmstat and metrics: :attr:`view`).
        self._seats: dict[PoolKey, dict[str, bytes]] = {}
        #: True while the watch of the seats and nodes runs (else the view is read every poll interval).
        self.watching = False
        self.nodes: dict[str, dict[str, Any]] = {}
        #: Every node seen up since start (and those the license names): lmstat shows the ones not up as down.
        self.known_nodes: set[str] = {node}
        self.view_at = 0.0
        self._channel: Any = None
        self._kv: Any = None
        self._lease: Any = None
        self._metadata: tuple[tuple[str, str], ...] = (("hasleader", "true"),)
        self._rpc: Any = None
        self._free_hint: dict[PoolKey, set[int]] = {}
        self._inflight: dict[SeatKey, asyncio.Future[None]] = {}
        self._releasing: set[asyncio.Task[Any]] = set()
        #: Operations waiting for the next batch, whether one is scheduled, and batches in flight.
        self._queue: list[_Op] = []
        self._flush_soon = False
        self._batches = 0
        #: Keys the batches in flight may write (the next batch's candidates avoid them).
        self._flying: set[bytes] = set()
        #: How many batches of each size were sent (the benchmark reads it from the log).
        self.batch_sizes: dict[int, int] = {}

    # -- connection ------------------------------------------------------------------------------------------
    async def connect(self, node_info: dict[str, Any]) -> None:
        """Open the channel, authenticate, register this node. Raises StoreUnavailable if etcd cannot answer."""
        import grpc
        from aetcd import rpc

        self._rpc = rpc
        s = self.settings
        eps = list(s.endpoints)
        target = "ipv4:" + ",".join(eps) if all(_is_ipv4_endpoint(e) for e in eps) else eps[0]
        options = [("grpc.lb_policy_name", "pick_first"), ("grpc.enable_retries", 0),
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
        if s.ca is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=s.ca.read_bytes(),
                private_key=s.key.read_bytes() if s.key else None,
                certificate_chain=s.cert.read_bytes() if s.cert else None)
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        with contextlib.suppress(TimeoutError):  # the first call should not pay the connection set-up
            await asyncio.wait_for(self._channel.channel_ready(), max(5.0, self.timeout))
        self._kv = rpc.KVStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)
        if s.user:
            try:
                await self._authenticate()
            except StoreUnavailable as exc:
                logger.error("etcd authentication as %s failed: %s", s.user, exc)
        self.node_info = node_info
        try:
            await self._register()
        except StoreUnavailable as exc:
            logger.error("etcd (%s) cannot be reached: %s; new checkouts are refused (STORE_UNAVAILABLE) until "
                         "it answers", ",".join(s.endpoints), exc)

    async def _authenticate(self) -> None:
        """Get an etcd auth token for ``user`` (sent as metadata with every call). Simple tokens expire
        (etcd ``--auth-token-ttl``, 300 s by default): a call refused for its token gets a new one."""
        rpc = self._rpc
        s = self.settings
        auth = rpc.AuthStub(self._channel)
        resp = await self._call("auth", auth.Authenticate(rpc.AuthenticateRequest(name=s.user or "",
                                                                                    password=s.password or ""),
                                                           timeout=self.timeout, metadata=(("hasleader", "true"),)))
        self._metadata = (("hasleader", "true"), ("token", resp.token))

    async def _register(self) -> None:
        rpc = self._rpc
        grant = await self._call("lease_grant", self._lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=self.ttl),
                                                                        timeout=self.timeout,
                                                                        metadata=self._metadata))
        self.node_lease = grant.ID
        await self._call("put", self._kv.Put(rpc.PutRequest(key=self._node_key(self.node),
                                                            value=json.dumps(self.node_info).encode(),
                                                            lease=self.node_lease),
                                             timeout=self.timeout, metadata=self._metadata))

    async def announce(self, changes: dict[str, Any]) -> None:
        """Update this node's registration (its port once listening); a failure is retried by :meth:`maintain`."""
        self.node_info.update(changes)
        rpc = self._rpc
        try:
            await self._call("put", self._kv.Put(rpc.PutRequest(key=self._node_key(self.node),
                                                                value=json.dumps(self.node_info).encode(),
                                                                lease=self.node_lease),
                                                 timeout=self.timeout, metadata=self._metadata))
        except StoreUnavailable:
            self.node_lease = 0  # re-registered by maintain()

    async def close(self) -> None:
        """Deregister this node (best effort) and close the channel."""
        if self._channel is None:
            return
        if self.node_lease:
            with contextlib.suppress(StoreUnavailable):
                await self._call("delete", self._kv.DeleteRange(self._rpc.DeleteRangeRequest(
                    key=self._node_key(self.node)), timeout=min(self.timeout, 1.0), metadata=self._metadata))
        await self._channel.close()
        self._channel = None

    async def _call(self, op: str, awaitable: Any) -> Any:
        """One etcd call with its deadline; every failure becomes StoreUnavailable (and marks the store down)."""
        import grpc

        t0 = time.perf_counter()
        try:
            result = await awaitable
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if self.settings.user and op != "auth" and "auth token" in details:
                with contextlib.suppress(StoreUnavailable):  # expired token: a new one for the next call
                    await self._authenticate()
                raise StoreUnavailable(f"etcd {op} failed: {exc.code().name}: {details}") from None
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # a lapsed lease is one session's, etcd answered
                self._mark_down()
            raise StoreUnavailable(f"etcd {op} failed: {exc.code().name}: {details}") from None
        except (TimeoutError, OSError) as exc:
            self._mark_down()
            raise StoreUnavailable(f"etcd {op} failed: {exc}") from None
        finally:
            if self.observe is not None:
                self.observe(op, time.perf_counter() - t0)
        if not self.up:
            logger.info("etcd store is up (%s)", ",".join(self.settings.endpoints))
        self.up = True
        self.last_ok = time.monotonic()
        return result

    def _mark_down(self) -> None:
        if self.up:
            logger.warning("etcd store is unreachable or has no quorum: new checkouts are refused "
                           "(STORE_UNAVAILABLE); held seats keep their heartbeats for at most %d s", self.ttl)
        self.up = False

    # -- keys ------------------------------------------------------------------------------------------------
    def _seat_prefix(self, customer: str, product: str) -> bytes:
        return f"{self.prefix}/c/{_q(customer)}/seats/{_q(product)}/".encode()

    def _token_key(self, token: str) -> bytes:
        return f"{self.prefix}/tokens/{_q(token)}".encode()

    def _seats_prefix(self) -> bytes:
        return f"{self.prefix}/c/".encode()

    def _node_key(self, node: str) -> bytes:
        return f"{self.prefix}/nodes/{_q(node)}".encode()

    # -- leases of client sessions ---------------------------------------------------------------------------
    async def _lease_for(self, session: int) -> int:
        lease = self.session_lease.get(session)
        if lease:
            return lease
        rpc = self._rpc
        try:
            grant = await self._call("lease_grant", self._lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=self.ttl), timeout=self.timeout, metadata=self._metadata))
        except StoreUnavailable as exc:  # a fast failure: once more (a lease granted twice only lapses unused)
            if "DEADLINE_EXCEEDED" in str(exc):
                raise
            await asyncio.sleep(_RETRY_PAUSE)
            grant = await self._call("lease_grant", self._lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=self.ttl), timeout=self.timeout, metadata=self._metadata))
        self.session_lease[session] = grant.ID
        return int(grant.ID)

    def forget_session(self, session: int) -> None:
        """The client's connection closed: its seats keep their lease; new ones of a new session get another."""
        self.session_lease.pop(session, None)

    # -- grants ----------------------------------------------------------------------------------------------
    async def acquire(self, rec: LeaseRecord, count: int, session: int, seat_key: tuple[str, ...]) -> bool:
        """Write the seat of ``rec`` to etcd; False when all ``count`` slots are held cluster-wide.

        A lease joining a seat this node already holds (same share key) writes only its token key. Raises
        StoreUnavailable.
        """
        sk: SeatKey = (rec.customer_id, rec.product, seat_key)
        for attempt in range(2):  # a session lease that lapsed meanwhile: grant a new one, once
            lease = await self._lease_for(session)
            try:
                ok = await self._acquire(rec, count, lease, sk)
            except _LeaseGone:
                self.session_lease.pop(session, None)
                if attempt:
                    raise StoreUnavailable("etcd refused the session's lease twice") from None
                continue
            if ok:
                self.token_lease[rec.token] = lease
            return ok
        return False  # pragma: no cover - the loop returns or raises

    async def _acquire(self, rec: LeaseRecord, count: int, lease: int, sk: SeatKey) -> bool:
        while (busy := self._inflight.get(sk)) is not None:  # the same seat being acquired: join it after
            await asyncio.shield(busy)
        claim = self.claims.get(sk)
        if claim is not None or sk[2] == (rec.token,):
            return await self._acquire_one(rec, count, lease, sk, claim)
        done = asyncio.get_running_loop().create_future()
        self._inflight[sk] = done
        try:
            return await self._acquire_one(rec, count, lease, sk, claim)
        finally:
            del self._inflight[sk]
            done.set_result(None)

    async def _acquire_one(self, rec: LeaseRecord, count: int, lease: int, sk: SeatKey, claim: Claim | None) -> bool:
        rpc = self._rpc
        token_key = self._token_key(rec.token)
        if claim is not None:  # the seat exists on this node: a join takes no slot
            value = self._token_value(rec, claim.slot)
            join = rpc.TxnRequest(
                compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=claim.slot,
                                     mod_revision=claim.rev)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(key=token_key, value=value, lease=lease))],
                failure=[])
            _rev, joined = await self._batched("join", _fixed(join, token_key), retry=True)
            if joined.succeeded:
                claim.tokens.add(rec.token)
                self.token_seat[rec.token] = sk
                return True
            # The seat is no longer this node's in etcd (it lapsed, or its holder resumed elsewhere): the local
            # holders keep it until told; this lease needs a seat of its own.
            logger.warning("seat %s of %s is no longer held by this node in etcd", claim.slot.decode(), sk[1])
            if self.claims.get(sk) is claim:  # (a release of its last other token may have dropped it meanwhile)
                del self.claims[sk]
            claim = None
        if count <= 0:
            return False
        pool = (rec.customer_id, rec.product)
        prefix = self._seat_prefix(rec.customer_id, rec.product)
        cands: list[int] = []

        def build(taken: set[bytes], into: Any) -> bool:
            # Called when the batch is put together: the candidates avoid the slots other operations of the
            # same transaction write (etcd refuses a transaction that could write one key twice).
            nonlocal cands
            if token_key in taken:
                return False
            cands = self._candidates(pool, count, prefix, taken)
            if not cands:
                return False
            taken.add(token_key)
            taken.update(prefix + b"%05d" % i for i in cands)
            # Guarded by "our token key does not exist yet", so a retry after an answer lost in transit (a
            # leader change) finds the first attempt's seat instead of taking a second one.
            into.compare.add(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=token_key, create_revision=0)
            self._acquire_txn(rec, prefix, cands, lease, token_key, into.success.add().request_txn)
            into.failure.add().request_range.key = token_key
            return True

        # A small pool's acquire names every slot: two in one batch would write the same keys, so each is sent
        # alone (concurrently, as before batching); a large pool's acquires share the batch.
        alone = count <= MAX_CANDIDATES
        for _ in range(_ATTEMPTS):
            rev, resp = await self._batched("acquire", build, retry=True, alone=alone)
            if not resp.succeeded:  # an earlier attempt of this very grant committed
                kv = resp.responses[0].response_range.kvs[0]
                slot = json.loads(kv.value)["slot"].encode()
                self.claims[sk] = Claim(slot, kv.mod_revision, int(kv.lease), {rec.token})
                self.token_seat[rec.token] = sk
                return True
            node = resp.responses[0].response_txn
            for i in cands:
                if node.succeeded:
                    slot = prefix + b"%05d" % i
                    self.claims[sk] = Claim(slot, rev, lease, {rec.token})
                    self.token_seat[rec.token] = sk
                    self._free_hint.get(pool, set()).discard(i)
                    return True
                node = node.responses[0].response_txn
            held = set()
            for kv in node.responses[0].response_range.kvs:
                with contextlib.suppress(ValueError):
                    held.add(int(kv.key[len(prefix):]))
            live = {i for i in held if i < count}
            if len(live) >= count:
                return False
            self._free_hint[pool] = set(range(count)) - live
        return False

    def _candidates(self, pool: PoolKey, count: int, prefix: bytes, taken: set[bytes]) -> list[int]:
        """Slots to try, none of them in ``taken``.

        A small pool: every slot, the ones this node's view shows held last (one round trip gives a grant or a
        linearizable "full"). A large one: a few picked at random from the slots last seen free (the free-slot
        hint an earlier ``Else`` read, else any not held in this node's view); the innermost ``Else`` reads the
        pool if every candidate was taken.
        """
        held = self._held_slots(pool)
        if count <= MAX_CANDIDATES:
            free = [i for i in range(count) if prefix + b"%05d" % i not in taken]
            random.shuffle(free)  # nodes racing for the same pool rarely collide on their first choice
            free.sort(key=held.__contains__)  # stable: the shuffled free-looking ones first
            return free
        flying = self._flying

        def ok(i: int) -> bool:
            key = prefix + b"%05d" % i
            return i not in held and key not in taken and key not in flying

        hint = self._free_hint.get(pool)
        pick: list[int] = []
        for source in (sorted(hint) if hint else [], range(count)):
            for i in random.sample(source, min(len(source), 4 * WIDE_CANDIDATES)):
                if i not in pick and ok(i):
                    pick.append(i)
                    if len(pick) == WIDE_CANDIDATES:
                        return pick
        if pick:
            return pick
        # Sampling found no free-looking slot: the pool looks (nearly) full; look at every slot.
        free = [i for i in range(count) if i not in held]
        if not free:  # the view shows it full: any slots, and the innermost Else reads the pool
            return [i for i in random.sample(range(count), 4 * WIDE_CANDIDATES)
                    if prefix + b"%05d" % i not in taken][:WIDE_CANDIDATES]
        free = [i for i in free if ok(i)]
        # None: every free-looking slot is being written by this batch or one in flight: wait for the next batch.
        return random.sample(free, min(WIDE_CANDIDATES, len(free)))

    def _held_slots(self, pool: PoolKey) -> set[int]:
        """Slots of ``pool`` this node knows are held: its own seats and those of the last cluster view."""
        held = {int(slot) for slot in self._seats.get(pool, ()) if slot.isdigit()}
        for (cid, product, _share), claim in self.claims.items():
            if (cid, product) == pool:
                with contextlib.suppress(ValueError):
                    held.add(int(claim.slot.rsplit(b"/", 1)[1]))
        return held

    def _acquire_txn(self, rec: LeaseRecord, prefix: bytes, cands: list[int], lease: int, token_key: bytes,
                     into: Any) -> None:
        """Fill ``into``: ``If create_revision(slot_a) == 0 Then put(slot_a), put(token) Else Txn(If ...)`` over
        ``cands``, the innermost ``Else`` reading the pool's held slots. Built in place (protobuf copies a
        message assigned into another: building inside-out would copy the chain at every level)."""
        rpc = self._rpc
        seat_value = self._seat_value(rec)
        record = json.dumps(list(rec)).encode()
        node_name = json.dumps(self.node).encode()
        node = into
        for i in cands:
            slot = prefix + b"%05d" % i
            node.compare.add(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=slot, create_revision=0)
            put = node.success.add().request_put
            put.key, put.value, put.lease = slot, seat_value, lease
            put = node.success.add().request_put
            put.key, put.lease = token_key, lease
            put.value = b'{"slot":"' + slot + b'","node":' + node_name + b',"record":' + record + b"}"
            node = node.failure.add().request_txn
        read = node.success.add().request_range
        read.key, read.range_end, read.keys_only = prefix, _range_end(prefix), True

    def _seat_value(self, rec: LeaseRecord, node: str | None = None) -> bytes:
        return json.dumps({"node": self.node if node is None else node, "token": rec.token, "user": rec.user,
                           "host": rec.host, "pid": rec.pid, "display": rec.display, "version": rec.version,
                           "share_key": list(rec.share_key), "granted_at": rec.granted_at}).encode()

    def _token_value(self, rec: LeaseRecord, slot: bytes) -> bytes:
        return json.dumps({"slot": slot.decode(), "node": self.node, "record": list(rec)}).encode()

    # -- batching: the operations of one loop iteration in one etcd transaction ------------------------------
    async def _batched(self, op: str, build: Callable[[set[bytes], Any], bool], retry: bool = False,
                       alone: bool = False) -> tuple[int, Any]:
        """Run the transaction ``build`` fills as one branch of the next batch; (revision, its response).

        ``retry``: once more after a short pause if etcd failed fast (an idempotent operation only). ``alone``:
        in a transaction of its own, sent now.
        """
        for attempt in range(2 if retry else 1):
            fut: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
            o = _Op(op, build, fut)
            if alone:
                top = self._top()
                build(set(), top.success.add().request_txn)
                await self._send(op, [o], top, counted=False)
            else:
                self._queue.append(o)
                self._kick()
            try:
                return await fut
            except StoreUnavailable as exc:
                if attempt or not retry or "DEADLINE_EXCEEDED" in str(exc):  # a whole deadline spent: no more
                    raise
                await asyncio.sleep(_RETRY_PAUSE)
        raise AssertionError("unreachable")  # pragma: no cover

    def _top(self) -> Any:
        """The transaction around a batch. Its compare is always true but names a key under the prefix: etcd 3.4
        checks the permissions of a transaction's own compares and operations, not those nested in it, so a
        client without the right to the prefix (wrong password, no token) is refused here, not let through."""
        rpc = self._rpc
        top = rpc.TxnRequest()
        top.compare.add(result=rpc.Compare.LESS, target=rpc.Compare.MOD, key=self._node_key(self.node),
                        mod_revision=1 << 62)
        return top

    def _kick(self) -> None:
        if not self._flush_soon and self._queue and self._batches < MAX_BATCHES_IN_FLIGHT:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send the queued operations as one transaction: each is a nested transaction of the top one with its
        own compares, so one's failed compare takes only its own ``Else`` (etcd runs all of them or none: an
        error of one, e.g. its lease gone, fails the batch, which is then sent again one by one)."""
        self._flush_soon = False
        if self._batches >= MAX_BATCHES_IN_FLIGHT or not self._queue:
            return
        queue, self._queue = self._queue, []
        queue.sort(key=lambda o: o.op != "release")  # stable: a released slot is not a candidate of the batch
        taken: set[bytes] = set()
        batch: list[_Op] = []
        top = self._top()
        for o in queue:
            if o.fut.done():  # its caller gave up (cancelled)
                continue
            if len(batch) >= MAX_BATCH or (batch and (o.solo or batch[0].solo)):
                self._queue.append(o)
                continue
            try:
                ok = o.build(taken, top.success.add().request_txn)
            except Exception as exc:  # handed to the caller
                del top.success[-1]
                o.fut.set_exception(exc)
                continue
            if not ok:  # it would write a key another operation of this batch writes: the next batch
                del top.success[-1]
                self._queue.append(o)
                continue
            batch.append(o)
        if not batch:
            return
        self._batches += 1
        self._flying |= taken
        names = {o.op for o in batch}
        task = asyncio.get_running_loop().create_task(self._send(names.pop() if len(names) == 1 else "batch",
                                                                 batch, top, keys=taken))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _send(self, op: str, batch: list[_Op], top: Any, counted: bool = True,
                    keys: frozenset[bytes] | set[bytes] = frozenset()) -> None:
        """Send one batch (``counted``: it holds one of the MAX_BATCHES_IN_FLIGHT places; ``keys``: those it may
        write, which the acquires of the next batch avoid meanwhile) and answer its futures."""
        self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
        try:
            resp = await self._call(op, self._kv.Txn(top, timeout=self.timeout, metadata=self._metadata))
        except StoreUnavailable as exc:
            gone = "lease not found" in str(exc)
            if gone and len(batch) > 1:  # one of them named a lapsed lease: each again alone, to find which
                for o in batch:
                    o.solo = True
                self._queue[:0] = batch
                return
            for o in batch:
                if not o.fut.done():
                    o.fut.set_exception(_LeaseGone() if gone else exc)
            return
        except BaseException as exc:  # cancelled (shutdown): the callers are told
            for o in batch:
                if o.fut.done():
                    continue
                if counted:
                    o.fut.set_exception(StoreUnavailable(f"etcd {op} was cancelled: {exc!r}"))
                else:  # sent alone: its caller was the one cancelled
                    o.fut.cancel()
            raise
        finally:
            if counted:
                self._batches -= 1
                self._flying -= keys
                self._kick()
        if not resp.succeeded:  # pragma: no cover - the compare of _top always holds
            for o in batch:
                if not o.fut.done():
                    o.fut.set_exception(StoreUnavailable(f"etcd {op}: the batch's guard did not hold"))
            return
        rev = int(resp.header.revision)
        for o, r in zip(batch, resp.responses, strict=True):
            if not o.fut.done():
                o.fut.set_result((rev, r.response_txn))

    # -- ends ------------------------------------------------------------------------------------------------
    def release(self, token: str, customer: str) -> None:
        """Queue the end of ``token`` in etcd (sent with the loop iteration's batch; retried by :meth:`maintain`
        if etcd is down)."""
        sk = self.token_seat.pop(token, None)
        self.token_lease.pop(token, None)
        token_key = self._token_key(token)
        if sk is None:
            return
        claim = self.claims.get(sk)
        if claim is None:
            return
        claim.tokens.discard(token)
        last = not claim.tokens
        if last:
            del self.claims[sk]
        item = (claim.slot, claim.rev, last, token_key)
        task = asyncio.get_running_loop().create_task(self._release_one(item))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_one(self, item: tuple[bytes, int, bool, bytes], queue: bool = True) -> bool:
        """One release, only if the slot still holds this node's write: delete the token's key and, for the
        seat's last token, the slot. A seat another node has taken over (its client resumed there) or that
        lapsed is left alone. False (queued for a retry) if etcd did not answer."""
        rpc = self._rpc
        slot, rev, last, token_key = item
        ops = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=token_key))]
        if last:
            ops.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=slot)))
        req = rpc.TxnRequest(
            compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=slot, mod_revision=rev)],
            success=ops, failure=[])
        try:
            await self._batched("release", _fixed(req, token_key, *((slot,) if last else ())))
        except (StoreUnavailable, _LeaseGone):
            if queue:
                self.pending.append(item)
            return False
        return True

    async def flush_releases(self) -> None:
        """Retry the releases etcd did not confirm (in one batch; the confirmed ones leave the queue)."""
        items = list(self.pending)  # removed only once etcd confirmed them (a cancelled retry keeps them queued)
        done = await asyncio.gather(*(self._release_one(item, queue=False) for item in items))
        for item, ok in zip(items, done, strict=True):
            if ok:
                self.pending.remove(item)

    # -- resume on another node ------------------------------------------------------------------------------
    async def adopt(self, token: str, holds: Callable[[LeaseRecord], bool] = lambda rec: True
                    ) -> LeaseRecord | None:
        """Take over a seat another node granted (its client resumed here); None if etcd has no such seat or
        ``holds`` says the resuming client is not its holder (nothing is written then)."""
        rpc = self._rpc
        for token_key in (self._token_key(token),):
            r = await self._call("get", self._kv.Range(rpc.RangeRequest(key=token_key), timeout=self.timeout,
                                                       metadata=self._metadata))
            if not r.kvs:
                continue
            info = json.loads(r.kvs[0].value)
            f = info["record"]
            f[3] = tuple(f[3])
            rec = LeaseRecord(*f)
            if not holds(rec):
                logger.warning("refused to adopt lease %s: the resuming client is not its holder", token[:8])
                return None
            token_lease = int(r.kvs[0].lease)
            slot = info["slot"].encode()
            sk: SeatKey = (rec.customer_id, rec.product, rec.share_key)
            claim = self.claims.get(sk)
            if claim is None:
                claim = await self._take_over(rec, slot, str(info.get("node", "")), token_lease)
                if claim is None:
                    return None
                self.claims[sk] = claim
            claim.tokens.add(token)
            self.token_seat[token] = sk
            self.token_lease[token] = token_lease
            return rec
        return None

    async def _take_over(self, rec: LeaseRecord, slot: bytes, granted_by: str, token_lease: int) -> Claim | None:
        """Rewrite ``slot`` with this node as holder (same etcd lease), if it is still ``rec``'s seat.

        One round trip when the slot is exactly as its grant wrote it (compared by value); otherwise (it
        moved before, or the token joined another's seat) read it and compare its revision.
        """
        rpc = self._rpc
        mine = self._seat_value(rec)
        if rec.share_key == (rec.token,) and granted_by:
            t = await self._call("adopt", self._kv.Txn(rpc.TxnRequest(
                compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, key=slot,
                                     value=self._seat_value(rec, granted_by))],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(key=slot, value=mine, lease=token_lease))],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=slot))]),
                timeout=self.timeout, metadata=self._metadata))
            if t.succeeded:
                return Claim(slot, t.header.revision, token_lease)
            kvs = t.responses[0].response_range.kvs
        else:
            kvs = (await self._call("get", self._kv.Range(rpc.RangeRequest(key=slot), timeout=self.timeout,
                                                          metadata=self._metadata))).kvs
        if not kvs:
            return None  # the seat lapsed
        kv = kvs[0]
        seat = json.loads(kv.value)
        if seat.get("share_key") != list(rec.share_key):
            return None  # the seat lapsed and its slot was granted to someone else
        seat["node"] = self.node
        t = await self._call("adopt", self._kv.Txn(rpc.TxnRequest(
            compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=slot,
                                 mod_revision=kv.mod_revision)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=slot, value=json.dumps(seat).encode(),
                                                              lease=kv.lease))],
            failure=[]), timeout=self.timeout, metadata=self._metadata))
        return Claim(slot, t.header.revision, int(kv.lease)) if t.succeeded else None

    def drop_local(self, token: str) -> None:
        """Forget ``token`` here without touching etcd (its seat lapsed in etcd, or another node took it)."""
        sk = self.token_seat.pop(token, None)
        self.token_lease.pop(token, None)
        if sk is not None and (claim := self.claims.get(sk)) is not None:
            claim.tokens.discard(token)
            if not claim.tokens:
                del self.claims[sk]

    # -- keepalive, the cluster view -------------------------------------------------------------------------
    async def maintain(self) -> list[str]:
        """Refresh every etcd lease this node keeps alive; returns the tokens whose seat is gone from etcd.

        Also retries queued releases and re-registers the node. When no keepalive has succeeded for 2/3 of the
        TTL, every local token is returned: before etcd can free those seats, this node ends them.
        """
        leases: dict[int, list[str]] = {}
        for token, lease in self.token_lease.items():
            leases.setdefault(lease, []).append(token)
        for claim in self.claims.values():
            leases.setdefault(claim.lease, []).extend(claim.tokens)
        for lease in self.session_lease.values():
            leases.setdefault(lease, [])
        lost: set[str] = set()
        try:
            if self.pending:
                await self.flush_releases()
            if self.node_lease:
                alive = await self._keepalive([self.node_lease])
                if not alive.get(self.node_lease):
                    await self._register()
            else:
                await self._register()
            started = time.monotonic()
            alive = await self._keepalive(list(leases))
            self.keepalive_ok = started
        except StoreUnavailable:
            # etcd frees our seats TTL after the last refresh it saw (never earlier): end them here first, so
            # no client believes it holds a seat that another node may already have granted.
            return list(self.token_seat) if self.overdue() else []
        for lease, ok in alive.items():
            if not ok:
                lost.update(leases.get(lease, ()))
                for session, sl in list(self.session_lease.items()):
                    if sl == lease:
                        del self.session_lease[session]
        return sorted(lost)

    def time_left(self) -> float:
        """Seconds until :meth:`overdue` (<= 0: it is)."""
        return self.keepalive_ok + self.ttl * 2 / 3 - time.monotonic()

    def overdue(self) -> bool:
        """True once no keepalive has reached etcd for 2/3 of the TTL: this node's seats must end now."""
        return self.time_left() <= 0

    async def _keepalive(self, ids: list[int]) -> dict[int, bool]:
        if not ids:
            return {}
        rpc = self._rpc
        out: dict[int, bool] = {}

        async def run() -> None:
            call = self._lease.LeaseKeepAlive(timeout=min(self.timeout, self.ttl / 3), metadata=self._metadata)
            for i in ids:
                await call.write(rpc.LeaseKeepAliveRequest(ID=i))
            await call.done_writing()
            for _ in ids:
                resp = await call.read()
                if resp is None or isinstance(resp, type(call)):  # pragma: no cover - stream ended early
                    break
                out[int(resp.ID)] = resp.TTL > 0

        # Bounded by a third of the TTL too: the caller must be able to end seats before etcd could free them.
        await self._call("keepalive", asyncio.wait_for(run(), min(self.timeout, self.ttl / 3)))
        return out

    async def refresh_view(self) -> int:
        """Read every seat and node of the cluster (lmstat, metrics and the cluster-wide queue use it); returns
        the revision read at (a watch from the next one misses nothing)."""
        rpc = self._rpc
        seats, nodes = self._seats_prefix(), self._node_key("")
        r = await self._call("get", self._kv.Txn(rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(key=seats, range_end=_range_end(seats))),
            rpc.RequestOp(request_range=rpc.RangeRequest(key=nodes, range_end=_range_end(nodes)))], failure=[]),
            timeout=self.timeout, metadata=self._metadata))
        self._seats = {}
        self.nodes = {}
        for resp in r.responses:
            for kv in resp.response_range.kvs:
                self._apply_put(kv.key, kv.value)
        self.known_nodes.update(self.nodes)
        self.view_at = time.time()
        return int(r.header.revision)

    def _apply_put(self, key: bytes, value: bytes) -> None:
        parts = key.decode()[len(self.prefix) + 1:].split("/")
        if parts[0] == "nodes" and len(parts) == 2:
            name = unquote(parts[1])
            self.nodes[name] = json.loads(value)
            self.known_nodes.add(name)
        elif parts[0] == "c" and len(parts) == 5 and parts[2] == "seats":
            self._seats.setdefault((unquote(parts[1]), unquote(parts[3])), {})[parts[4]] = value

    def _apply_delete(self, key: bytes) -> bool:
        """Forget a deleted key; True if it was a seat (a seat came free)."""
        parts = key.decode()[len(self.prefix) + 1:].split("/")
        if parts[0] == "nodes" and len(parts) == 2:
            self.nodes.pop(unquote(parts[1]), None)
        elif parts[0] == "c" and len(parts) == 5 and parts[2] == "seats":
            pool = (unquote(parts[1]), unquote(parts[3]))
            held = self._seats.get(pool)
            if held is not None:
                held.pop(parts[4], None)
                if not held:
                    del self._seats[pool]
            return True
        return False

    @property
    def view(self) -> dict[PoolKey, list[dict[str, Any]]]:
        """The cluster's seats (every node's) as last read or watched: pool -> seat records, each with its slot."""
        return {pool: [{**json.loads(v), "slot": slot} for slot, v in sorted(held.items())]
                for pool, held in self._seats.items()}

    async def follow(self, freed: Callable[[], None], poll: float = 0.5) -> None:
        """Keep the cluster view current until cancelled: one read, then a watch on the seat and node keys from
        the revision after it; ``freed()`` is called after each read and each watched batch that freed a seat (a
        seat freed on another node reaches this node's cluster queue within a round trip). While the watch is
        broken (the member it was on died, no leader, history compacted past it) the view is read every ``poll``
        seconds until a new watch starts."""
        while True:
            try:
                rev = await self.refresh_view()
            except StoreUnavailable:
                await asyncio.sleep(poll)
                continue
            freed()
            try:
                await self._watch(rev + 1, freed)
            except StoreUnavailable as exc:
                logger.info("the watch of the cluster's seats broke (%s); reading them every %g s until a new "
                            "one starts", exc, poll)
            finally:
                self.watching = False
            await asyncio.sleep(poll)

    async def _watch(self, start: int, freed: Callable[[], None]) -> None:
        """Apply every change to seats and nodes from revision ``start``; returns or raises when the stream ends."""
        import grpc

        rpc = self._rpc
        call = rpc.WatchStub(self._channel).Watch(metadata=self._metadata)
        try:
            for key in (self._seats_prefix(), self._node_key("")):
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=key, range_end=_range_end(key), start_revision=start)))
            created = 0
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise StoreUnavailable("etcd ended the watch stream")
                if resp.canceled or resp.compact_revision:
                    raise StoreUnavailable(f"etcd cancelled the watch ({resp.cancel_reason or 'compacted to '}"
                                           f"{resp.compact_revision or ''})")
                if resp.created:
                    created += 1
                    self.watching = created == 2
                came_free = False
                for ev in resp.events:
                    if ev.type == ev.DELETE:
                        came_free |= self._apply_delete(ev.kv.key)
                    else:
                        self._apply_put(ev.kv.key, ev.kv.value)
                if resp.events:
                    self.view_at = time.time()
                if came_free:
                    freed()
        except grpc.aio.AioRpcError as exc:
            raise StoreUnavailable(f"etcd watch failed: {exc.code().name}: {exc.details() or ''}") from None
        finally:
            call.cancel()

    def node_lines(self) -> list[dict[str, Any]]:
        """Every known node, this one first: name, host, port, and whether it is up (registered in etcd)."""
        out = []
        for name in sorted(self.known_nodes, key=lambda n: (n != self.node, n)):
            info = self.nodes.get(name) or (self.node_info if name == self.node else {})
            up = name in self.nodes or (name == self.node and self.up)
            out.append({"node": name, "host": info.get("host", name), "port": info.get("port"), "up": up,
                        "this": name == self.node})
        return out

    def held(self, pool: PoolKey) -> int:
        """Seats of ``pool`` held cluster-wide, as last read or watched."""
        return len(self._seats.get(pool, ()))


class NullStore:
    """The :class:`~lmgrd.storage.journal.LeaseStore` of a node whose seats live in etcd: it keeps nothing
    locally (a restarted node gets its seats back from etcd as their clients resume, never from a stale file)."""

    def load(self) -> list[LeaseRecord]:
        return []

    def record_grant(self, rec: LeaseRecord) -> None:
        pass

    def record_release(self, token: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class _LeaseGone(Exception):
    """etcd says the session lease a write named no longer exists."""


@dataclass(slots=True)
class _Op:
    """One operation waiting for the next batch: ``build(taken, into)`` fills ``into`` with its transaction (and
    adds the keys it may write to ``taken``), or returns False when it would write a key already in ``taken`` (it
    waits for the next batch)."""

    op: str
    build: Callable[[set[bytes], Any], bool]
    fut: asyncio.Future[tuple[int, Any]]
    #: Sent alone (after a batch failed for one of its operations' leases).
    solo: bool = False


def _fixed(req: Any, *keys: bytes) -> Callable[[set[bytes], Any], bool]:
    """The builder of a transaction that writes exactly ``keys``."""

    def build(taken: set[bytes], into: Any) -> bool:
        if not taken.isdisjoint(keys):
            return False
        taken.update(keys)
        into.CopyFrom(req)
        return True

    return build


def _range_end(prefix: bytes) -> bytes:
    s = bytearray(prefix)
    for i in reversed(range(len(s))):
        if s[i] < 0xFF:
            s[i] += 1
            return bytes(s[: i + 1])
    return b"\0"


def _is_ipv4_endpoint(ep: str) -> bool:
    host, _, port = ep.rpartition(":")
    parts = host.split(".")
    return port.isdigit() and len(parts) == 4 and all(p.isdigit() for p in parts)
