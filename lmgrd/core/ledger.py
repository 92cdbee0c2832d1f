"""The seat ledger: who holds which seat of which pool, until when, and who waits for one.

Pure and synchronous. It performs no I/O, reads no clock and logs nothing: every method that depends on
time takes ``now`` (a monotonic instant, ``loop.time()``) and, where a lease is created, ``wall`` (a
wall-clock epoch kept for display and storage). It imports only the standard library and the ``lmgrd``
package root; never ``protocol`` transports, asyncio, sockets or files (the etcd ``lessor.go`` model).

Vocabulary
    *pool*   ``(customer_id, product)`` with a ``count`` of seats.
    *seat*   one unit of ``count``, identified inside its pool by a *share key*. A seat exists while at
             least one lease holds it.
    *lease*  one checkout, with its own random token, holding one seat. Several leases share a seat
             when they have the same share key (see :func:`share_key_for`).
    *waiter* a checkout that found no free seat and chose to wait; served first come, first served.

Invariants (the property tests in ``tests/unit/lmgrd/test_ledger_properties.py`` check each one after
every step):

1. No new seat is created in a pool whose ``in_use`` is at or above its ``count``. Hence
   ``in_use <= count`` always, except after :meth:`Ledger.restore` or :meth:`Ledger.set_pool` lowered
   the count below the seats already held; then no new seat is granted until ``in_use`` falls below the
   count, while joining an existing seat (which takes nothing) is still allowed.
2. A lease leaves the ledger only through a method that returns it to the caller (``release``,
   ``expire``, ``remove_pool``), so the daemon can journal every departure: no seat is lost silently.
3. Waiters that need a new seat are granted strictly in arrival order; a waiter whose share key gains a
   seat joins at once (it takes nothing from those ahead of it). While a pool has waiters it has no
   free seat, once :meth:`Ledger.serve` has run after a count was raised. In a pool with a usage policy
   (:meth:`Ledger.set_policy`) the same holds among the waiters a seat is *admissible* for: a seat
   reserved for a group goes to the first waiter of that group, a waiter blocked by its ``max`` lets
   the next one pass.
5. Usage policy: a new seat never exceeds a ``max`` rule, and seats reserved for a subject never go to
   anyone else: seats held by people outside every reservation stay <= ``count - reserved``. (A policy
   set or restored over existing seats may start above these; then, as for counts, only new grants are
   refused.)
4. Every lease has exactly one authoritative entry in the expiry heap, so expiry never scans all
   leases and the heap holds O(leases) entries (stale entries are bounded and swept by a rebuild).
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from lmgrd import LmgrdError
from lmgrd.core.policy import ProductPolicy, Subject
from protocol.validation import short_hostname

__all__ = [
    "LeaseInfo",
    "LeaseRecord",
    "Ledger",
    "PoolKey",
    "ShareMode",
    "UnknownPoolError",
    "Waiter",
    "owner_digest",
    "share_key_for",
]

PoolKey = tuple[str, str]  # (customer_id, product)

#: A heap rebuild runs when stale entries outnumber live leases by this much; it keeps the heap at most
#: ``2 * leases + _HEAP_SLACK`` entries while costing O(1) amortised per release.
_HEAP_SLACK = 1024
#: Same idea for the per-pool waiter deque, which drops cancelled waiters lazily.
_QUEUE_SLACK = 64
#: Seat handles (what ``lmstat`` prints as FlexNet's decimal license handle) lie in this range.
HANDLE_MIN, HANDLE_MAX = 100, 99_999_999

#: A new seat's place under a usage policy: the reserve rule it counts against (-1: the unreserved
#: seats) and the max rules its holder falls under.
Tag = tuple[int, tuple[int, ...]]


class ShareMode(enum.StrEnum):
    """How checkouts of one product share a seat (per license, ``share:``)."""

    USER_HOST = "user_host"  # same user on the same host: one seat (the default)
    HOST = "host"  # one seat per host, whoever the user
    NONE = "none"  # every checkout its own seat


def share_key_for(mode: ShareMode | str, user: str, host: str) -> tuple[str, ...]:
    """Return the share key of a checkout under ``mode`` (the ONE definition of who shares a seat).

    Hosts compare by their short form (the first label), case-insensitively, and users
    case-insensitively, so ``Alice@PC1.corp.example`` and ``alice@pc1`` share a seat. ``NONE`` returns
    ``()``, which :meth:`Ledger.checkout` replaces by ``(token,)``: a seat of its own.
    """
    # Plain string constants (ShareMode's values): a str comparison, no enum __eq__, on every checkout.
    if mode == "user_host":
        return (user.lower(), short_hostname(host))
    if mode == "host":
        return (short_hostname(host),)
    if mode == "none":
        return ()
    raise ValueError(f"unknown share mode {mode!r}; expected one of {', '.join(m.value for m in ShareMode)}")


def owner_digest(user: str, host: str, secret: str) -> str:
    """Who holds a lease, as the ledger and the journal keep it: a digest of the client's user, host (short
    form) and the secret from its hello (the ONE definition). Only a connection presenting the same three
    may resume or check in the lease; the secret itself is never stored.

    BLAKE2b of the three, NUL-separated (none may contain NUL: the protocol's text fields are UTF-8 strings
    and a NUL in one only changes that client's own digest), 128 bits, hex.
    """
    return hashlib.blake2b(f"{user}\x00{host}\x00{secret}".encode(), digest_size=16,
                           person=b"lmgrd-lease-own").hexdigest()


class HolderLike(Protocol):
    """Who checks out, as the ledger reads it: the client's user, host (short form), pid, display, the address
    it connects from (``addr``, ``""`` when unknown; usage-policy rules by INTERNET match it), connection
    (``session``; ``None`` for a lease not bound to a connection) and ``owner`` (:func:`owner_digest`, or a value
    of one connection's own for a client that sent no secret). The daemon passes its client session itself (no
    second object per connection)."""

    @property
    def user(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def display(self) -> str: ...
    @property
    def addr(self) -> str: ...
    @property
    def session(self) -> int | None: ...
    @property
    def owner(self) -> str: ...


class UnknownPoolError(LmgrdError, LookupError):
    """A pool was named that :meth:`Ledger.set_pool` never created (a daemon bug, not a client error)."""


class LeaseRecord(NamedTuple):
    """What the store keeps of a lease: everything except its (monotonic, process-local) deadline and
    its (connection-local) session. ``share_key`` is the resolved key, ``(token,)`` for unshared seats.
    ``addr`` is the address the client connected from at the grant (kept so that a ``reserve`` or ``max`` rule
    by address still counts the seat after a restart; ``""`` in records of journals written before it was).
    Re-exported by :mod:`lmgrd.storage.journal`, which persists it.

    Immutable like a frozen dataclass, but a NamedTuple because one is built per grant on the hot path:
    a frozen, slotted dataclass of ten fields takes about 2.4 us to construct here, a NamedTuple 0.4 us.
    """

    token: str
    customer_id: str
    product: str
    share_key: tuple[str, ...]
    user: str
    host: str
    pid: int
    version: str
    display: str
    granted_at: float
    #: :func:`owner_digest` of the holder ("" in a record written before leases were bound: such a lease
    #: may be resumed or checked in by a connection of the same user and host).
    owner: str = ""
    addr: str = ""


@dataclass(slots=True)
class LeaseInfo:
    """One checkout holding a seat. The ledger owns and mutates it; callers read it.

    ``deadline`` is a monotonic instant: the lease lapses when ``deadline <= now``. ``session`` is the
    connection the lease is bound to, ``None`` once detached (disconnected or restored after a restart).
    ``owner`` is who may resume or check it in from another connection (:func:`owner_digest`).
    """

    token: str
    pool: PoolKey
    share_key: tuple[str, ...]
    user: str
    host: str
    pid: int
    version: str
    display: str
    granted_at: float
    session: int | None
    deadline: float
    owner: str = ""
    # The lease's authoritative heap entry: its sequence number and the deadline it was filed under.
    # heap_at <= deadline always; a later real deadline is re-filed lazily when the entry pops.
    heap_seq: int = field(default=0, repr=False, compare=False)
    heap_at: float = field(default=0.0, repr=False, compare=False)
    addr: str = ""  # the client's address at the grant (see LeaseRecord)

    def to_record(self) -> LeaseRecord:
        """The durable part of this lease, for :meth:`LeaseStore.record_grant`."""
        return LeaseRecord(
            self.token,
            self.pool[0],
            self.pool[1],
            self.share_key,
            self.user,
            self.host,
            self.pid,
            self.version,
            self.display,
            self.granted_at,
            self.owner,
            self.addr,
        )


@dataclass(slots=True, eq=False)
class Waiter:
    """A checkout waiting for a seat. ``ctx`` is the daemon's own (request id, connection, timer...).

    ``share_key`` is as for :meth:`Ledger.checkout` (``()`` for an unshared seat). Identity matters: the
    ledger compares waiters with ``is``, so a reused ``waiter_id`` never revives a cancelled entry.
    """

    waiter_id: int
    pool: PoolKey
    share_key: tuple[str, ...]
    holder: HolderLike
    version: str
    ctx: object | None = None  # not a bare `object`: mypyc (benchmarks/mypyc_build.py) cannot build that annotation

    @property
    def user(self) -> str:
        return self.holder.user

    @property
    def host(self) -> str:
        return self.holder.host

    @property
    def pid(self) -> int:
        return self.holder.pid

    @property
    def display(self) -> str:
        return self.holder.display

    @property
    def addr(self) -> str:
        return self.holder.addr

    @property
    def session(self) -> int | None:
        return self.holder.session

    @property
    def owner(self) -> str:
        return self.holder.owner


class _Pool:
    """Seats, leases and waiters of one pool."""

    __slots__ = ("bucket_used", "by_key", "count", "general_used", "handles", "key", "leases", "max_used", "policy",
                 "queue", "seats", "tags", "waiting")

    def __init__(self, count: int, key: PoolKey) -> None:
        self.count = count
        #: The pool's key, shared by every lease of the pool: a lease holds this tuple (and its product name)
        #: rather than its own copy built from the request (about 110 bytes a lease less).
        self.key = key
        # share key -> number of leases holding that seat; len(seats) is in_use.
        self.seats: dict[tuple[str, ...], int] = {}
        self.handles: dict[tuple[str, ...], int] = {}  # share key -> the seat's handle (same keys as seats)
        self.leases: dict[str, LeaseInfo] = {}
        # FIFO of waiters. Cancelled or already served entries stay until they reach the head (or a
        # rebuild) and are recognised because Ledger._waiters no longer maps their id to them. A deque,
        # not a dict: popping the first item of a dict repeatedly is quadratic.
        self.queue: deque[Waiter] = deque()
        self.waiting = 0  # live entries in queue
        # share key -> live waiters with that key, in arrival order (kept exact, not lazy): when a seat
        # with that key appears they join it without waiting for their turn.
        self.by_key: dict[tuple[str, ...], list[Waiter]] = {}
        # Usage policy (None: only the count limits). tags: share key -> Tag of each seat; bucket_used[i]
        # seats count against reserve rule i, general_used against the unreserved ones; max_used[i]
        # seats are held by subjects of max rule i.
        self.policy: ProductPolicy | None = None
        self.tags: dict[tuple[str, ...], Tag] = {}
        self.bucket_used: list[int] = []
        self.max_used: list[int] = []
        self.general_used = 0


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"a pool count must be an integer >= 0, got {count!r}")


class Ledger:
    """Seat ledger for every pool the daemon serves. See the module docstring for the invariants.

    Args:
        lease_timeout: seconds a lease lives without renewal (``renew_session``/``resume``).
        token_factory: returns a new unique lease token (the daemon passes
            ``lambda: secrets.token_urlsafe(16)``: 128 random bits). A repeated token is refused.
    """

    def __init__(self, lease_timeout: float, token_factory: Callable[[], str]) -> None:
        if not lease_timeout > 0:
            raise ValueError(f"lease_timeout must be > 0 seconds, got {lease_timeout!r}")
        self.lease_timeout = float(lease_timeout)
        self._new_token = token_factory
        self._pools: dict[PoolKey, _Pool] = {}
        self._leases: dict[str, LeaseInfo] = {}
        # session -> tokens of its bound leases: the token itself while there is one (the common case: a set
        # costs 216 bytes a client), a set from the second on. Read through _session_tokens, changed by
        # _bind and _unbind.
        self._sessions: dict[int, str | set[str]] = {}
        self._waiters: dict[int, Waiter] = {}
        self._session_waiters: dict[int | None, set[int]] = {}
        # Min-heap of (deadline, seq, token). seq is unique, so tuples never compare tokens.
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        # Seat handle -> its seat's share key, for every live seat of every pool (handles are unique among
        # them). The key object is the seat's own (no allocation per seat); seat_of() finds the pool.
        self._handles: dict[int, tuple[str, ...]] = {}

    # -- pools -------------------------------------------------------------------------------------------

    def set_pool(self, pool: PoolKey, count: int) -> None:
        """Add a pool or change its count (license reread).

        Lowering the count below the seats in use keeps every lease (invariant 1). Raising it may leave
        waiters behind a free seat: call :meth:`serve` afterwards to grant them.
        """
        _check_count(count)
        p = self._pools.get(pool)
        if p is None:
            self._pools[pool] = _Pool(count, pool)
        else:
            p.count = count

    def remove_pool(self, pool: PoolKey) -> tuple[list[LeaseInfo], list[Waiter]]:
        """Forget a pool (its product left the license). Unknown pools are a no-op.

        Returns:
            The leases removed, which the caller must journal as released and may tell their clients
            about (``SEAT_REMOVED``), and the waiters dropped, which the caller must answer.
        """
        p = self._pools.pop(pool, None)
        if p is None:
            return [], []
        removed = list(p.leases.values())
        for h in p.handles.values():
            del self._handles[h]
        for lease in removed:
            del self._leases[lease.token]
            self._unbind(lease)
        dropped = [w for w in p.queue if self._waiters.get(w.waiter_id) is w]
        for w in dropped:
            self._forget_waiter(w)
        self._maybe_rebuild_heap()
        return removed, dropped

    def pools(self) -> list[PoolKey]:
        return list(self._pools)

    def count(self, pool: PoolKey) -> int:
        return self._pool(pool).count

    def in_use(self, pool: PoolKey) -> int:
        """Seats held in ``pool`` (not leases: shared leases count once)."""
        return len(self._pool(pool).seats)

    def queued(self, pool: PoolKey) -> int:
        return self._pool(pool).waiting

    def _pool(self, pool: PoolKey) -> _Pool:
        try:
            return self._pools[pool]
        except KeyError:
            raise UnknownPoolError(
                f"no pool {pool!r} in the ledger; call set_pool() for every licensed product first"
            ) from None

    # -- grants and releases ------------------------------------------------------------------------------

    def checkout(
        self,
        pool: PoolKey,
        share_key: tuple[str, ...],
        holder: HolderLike,
        version: str,
        now: float,
        wall: float,
    ) -> LeaseInfo | None:
        """Grant a lease, or return ``None`` when it would need a new seat and none is free.

        Joining an existing seat of the same share key always succeeds, even over the count (it takes
        no seat). A new seat is refused while the pool has waiters: a newcomer never overtakes them, except
        under a usage policy, where it may take a seat no waiter is admitted to. Such a seat can have a waiter's
        share key (host sharing): call :meth:`serve` after a grant while :meth:`queued` is non-zero, and those
        waiters join it. ``share_key=()`` asks for an unshared seat (its key becomes ``(token,)``).
        """
        p = self._pool(pool)
        if p.policy is not None and (not share_key or share_key not in p.seats):
            # Waiters ahead cannot use what the policy admits this one to (serve() ran after every
            # change), so only admissibility matters here.
            if self._admit(p, holder.user, holder.host, holder.addr, holder.display) is None:
                return None
        elif (not share_key or share_key not in p.seats) and (p.waiting or len(p.seats) >= p.count):
            return None
        return self._grant(p, share_key, holder, version, now, wall)

    # -- usage policy --------------------------------------------------------------------------------------

    def set_policy(self, pool: PoolKey, policy: ProductPolicy | None) -> None:
        """Apply (or with ``None`` lift) a product's ``reserve``/``max`` rules to a pool.

        Existing seats are re-tagged in grant order and kept even where they now exceed a rule. Call
        :meth:`serve` afterwards: the change may admit waiters.
        """
        p = self._pool(pool)
        p.policy = policy if policy is not None and policy.limits_seats else None
        self._retag(p)

    def reserved(self, pool: PoolKey) -> int:
        """Free seats that only the subjects of a ``reserve`` rule may take (0 without a policy)."""
        p = self._pool(pool)
        pol = p.policy
        if pol is None:
            return 0
        unused = sum(max(0, r.seats - used) for r, used in zip(pol.reserve, p.bucket_used, strict=True))
        return min(unused, max(0, p.count - len(p.seats)))

    def refusal(self, pool: PoolKey, share_key: tuple[str, ...], user: str, host: str, addr: str = "",
                display: str = "") -> str | None:
        """Why :meth:`checkout` would refuse this now: ``"max"`` (a max rule is full), ``"reserved"``
        (free seats are reserved for others), ``"full"`` (no free seat, or waiters ahead), or ``None``.
        ``addr`` and ``display`` are the client's, as for the holder of :meth:`checkout`."""
        p = self._pool(pool)
        if share_key and share_key in p.seats:
            return None
        pol = p.policy
        if pol is None:
            return "full" if p.waiting or len(p.seats) >= p.count else None
        for i, r in enumerate(pol.max):
            if p.max_used[i] >= r.seats and r.subject.matches(user, host, addr, display):
                return "max"
        if len(p.seats) >= p.count:
            return "full"
        return None if self._admit(p, user, host, addr, display) is not None else "reserved"

    def _admit(self, p: _Pool, user: str, host: str, addr: str, display: str) -> Tag | None:
        """The tag a new seat for ``user``@``host`` (from ``addr``, on ``display``) would get under the pool's
        policy, or None if refused."""
        pol = p.policy
        assert pol is not None
        maxes = tuple(i for i, r in enumerate(pol.max) if r.subject.matches(user, host, addr, display))
        for i in maxes:
            if p.max_used[i] >= pol.max[i].seats:
                return None
        if len(p.seats) >= p.count:
            return None
        for i, r in enumerate(pol.reserve):
            if p.bucket_used[i] < r.seats and r.subject.matches(user, host, addr, display):
                return (i, maxes)
        if p.general_used < p.count - pol.reserved_total:
            return (-1, maxes)
        return None

    def _tag_seat(self, p: _Pool, key: tuple[str, ...], user: str, host: str, addr: str, display: str) -> None:
        """Count a new seat against the policy (its reserve rule if one has room, else the general seats)."""
        pol = p.policy
        assert pol is not None
        maxes = tuple(i for i, r in enumerate(pol.max) if r.subject.matches(user, host, addr, display))
        bucket = -1
        for i, r in enumerate(pol.reserve):
            if p.bucket_used[i] < r.seats and r.subject.matches(user, host, addr, display):
                bucket = i
                break
        if bucket < 0:
            p.general_used += 1
        else:
            p.bucket_used[bucket] += 1
        for i in maxes:
            p.max_used[i] += 1
        p.tags[key] = (bucket, maxes)

    def _untag_seat(self, p: _Pool, key: tuple[str, ...]) -> None:
        bucket, maxes = p.tags.pop(key)
        if bucket < 0:
            p.general_used -= 1
        else:
            p.bucket_used[bucket] -= 1
        for i in maxes:
            p.max_used[i] -= 1

    def _retag(self, p: _Pool) -> None:
        pol = p.policy
        p.tags = {}
        p.general_used = 0
        p.bucket_used = [0] * len(pol.reserve) if pol else []
        p.max_used = [0] * len(pol.max) if pol else []
        if pol is None:
            return
        for lease in p.leases.values():  # grant order: the first lease of a seat created it
            if lease.share_key not in p.tags:
                self._tag_seat(p, lease.share_key, lease.user, lease.host, lease.addr, lease.display)

    def _grant(
        self,
        p: _Pool,
        share_key: tuple[str, ...],
        holder: HolderLike,
        version: str,
        now: float,
        wall: float,
    ) -> LeaseInfo:
        # The caller has decided the grant is allowed (join, or a free seat).
        token = self._new_token()
        if token in self._leases:
            raise RuntimeError(f"token factory returned a token already in use ({token[:6]}...)")
        if not share_key:
            share_key = (token,)
        seats = p.seats
        held = seats.get(share_key, 0)
        seats[share_key] = held + 1
        if not held and p.policy is not None:
            self._tag_seat(p, share_key, holder.user, holder.host, holder.addr, holder.display)
        deadline = now + self.lease_timeout
        self._seq += 1
        session = holder.session
        lease = LeaseInfo(
            token, p.key, share_key, holder.user, holder.host, holder.pid, version, holder.display, wall, session,
            deadline, holder.owner, self._seq, deadline, holder.addr,
        )  # fmt: skip
        heapq.heappush(self._heap, (deadline, self._seq, token))
        self._leases[token] = lease
        p.leases[token] = lease
        if session is not None:
            self._bind(session, token)
        return lease

    def release(self, token: str, now: float, wall: float) -> tuple[LeaseInfo | None, list[tuple[Waiter, LeaseInfo]]]:
        """Check a lease in: its seat frees at once (if no other lease shares it) and goes to waiters.

        Returns:
            The released lease (``None`` if the token is unknown: already released or expired) and the
            waiters granted a lease as a result, first come, first served.
        """
        lease = self._leases.pop(token, None)
        if lease is None:
            return None, []
        grants: list[tuple[Waiter, LeaseInfo]] = []
        p = self._pools[lease.pool]
        if self._drop_lease(p, lease) and p.waiting:
            self._serve(p, now, wall, grants)
        # The lease's heap entry is now stale; bound how many of those accumulate.
        if len(self._heap) > 2 * len(self._leases) + _HEAP_SLACK:
            self._rebuild_heap()
        return lease, grants

    def _drop_lease(self, p: _Pool, lease: LeaseInfo) -> bool:
        """Remove an already-unindexed lease from its pool and session; True if its seat freed."""
        del p.leases[lease.token]
        if lease.session is not None:
            self._unbind(lease)
        key = lease.share_key
        held = p.seats[key] - 1
        if held:
            p.seats[key] = held
            return False
        del p.seats[key]
        h = p.handles.pop(key, None)
        if h is not None:
            del self._handles[h]
        if p.policy is not None:
            self._untag_seat(p, key)
        return True

    def _bind(self, session: int, token: str) -> None:
        tokens = self._sessions.get(session)
        if tokens is None:
            self._sessions[session] = token
        elif isinstance(tokens, str):
            self._sessions[session] = {tokens, token}
        else:
            tokens.add(token)

    def _unbind(self, lease: LeaseInfo) -> None:
        s = lease.session
        if s is None:
            return
        tokens = self._sessions.get(s)
        if tokens is None:
            return
        if isinstance(tokens, str):
            if tokens == lease.token:
                del self._sessions[s]
            return
        tokens.discard(lease.token)
        if not tokens:
            del self._sessions[s]

    @staticmethod
    def _as_tokens(tokens: str | set[str] | None) -> tuple[str, ...] | set[str]:
        if tokens is None:
            return ()
        return (tokens,) if isinstance(tokens, str) else tokens

    def _session_tokens(self, session: int) -> tuple[str, ...] | set[str]:
        """The tokens of the leases bound to ``session`` (no copy: do not bind or unbind while iterating)."""
        return self._as_tokens(self._sessions.get(session))

    # -- waiters ------------------------------------------------------------------------------------------

    def enqueue(self, waiter: Waiter) -> int:
        """Queue a checkout that :meth:`checkout` refused; returns its 1-based position in the pool.

        Raises:
            ValueError: the waiter could be granted now (call :meth:`checkout` first), or its id is
                already queued.
            UnknownPoolError: the pool does not exist.
        """
        p = self._pool(waiter.pool)
        if waiter.waiter_id in self._waiters:
            raise ValueError(f"waiter id {waiter.waiter_id} is already queued; waiter ids must be unique")
        key = waiter.share_key
        if p.policy is not None:
            grantable = bool(key and key in p.seats) or self._admit(
                p, waiter.user, waiter.host, waiter.addr, waiter.display) is not None
        else:
            grantable = bool(key and key in p.seats) or (not p.waiting and len(p.seats) < p.count)
        if grantable:
            raise ValueError("this checkout can be granted now; call checkout() before enqueue()")
        if len(p.queue) > 2 * p.waiting + _QUEUE_SLACK:
            # Sweep dead entries here, the only place the deque grows: it stays O(peak waiters).
            p.queue = deque(x for x in p.queue if self._waiters.get(x.waiter_id) is x)
        self._waiters[waiter.waiter_id] = waiter
        p.queue.append(waiter)
        p.waiting += 1
        if key:
            same = p.by_key.get(key)
            if same is None:
                p.by_key[key] = [waiter]
            else:
                same.append(waiter)
        ids = self._session_waiters.get(waiter.session)
        if ids is None:
            self._session_waiters[waiter.session] = {waiter.waiter_id}
        else:
            ids.add(waiter.waiter_id)
        return p.waiting

    def cancel_wait(self, waiter_id: int) -> bool:
        """Drop a waiter (its wait timed out or its client left). False if it is not queued."""
        w = self._waiters.get(waiter_id)
        if w is None:
            return False
        self._forget_waiter(w)
        return True

    def waiting(self, pool: PoolKey) -> list[Waiter]:
        """The pool's live waiters in arrival order (for status pages and tests)."""
        return [w for w in self._pool(pool).queue if self._waiters.get(w.waiter_id) is w]

    def _forget_waiter(self, w: Waiter) -> None:
        """Unindex a live waiter; its deque entry becomes dead and is skipped later."""
        del self._waiters[w.waiter_id]
        ids = self._session_waiters.get(w.session)
        if ids is not None:
            ids.discard(w.waiter_id)
            if not ids:
                del self._session_waiters[w.session]
        p = self._pools.get(w.pool)
        if p is None:  # remove_pool already detached the pool
            return
        p.waiting -= 1
        if w.share_key:
            same = p.by_key[w.share_key]
            same.remove(w)
            if not same:
                del p.by_key[w.share_key]

    def serve(self, pool: PoolKey, now: float, wall: float) -> list[tuple[Waiter, LeaseInfo]]:
        """Grant queued waiters whatever seats are free (call after :meth:`set_pool` raised a count)."""
        grants: list[tuple[Waiter, LeaseInfo]] = []
        p = self._pool(pool)
        if p.waiting:
            self._serve(p, now, wall, grants)
        return grants

    def _serve(self, p: _Pool, now: float, wall: float, grants: list[tuple[Waiter, LeaseInfo]]) -> None:
        if p.policy is not None:
            self._serve_policy(p, now, wall, grants)
            return
        queue = p.queue
        waiters = self._waiters
        while queue:
            w = queue[0]
            if waiters.get(w.waiter_id) is not w:
                queue.popleft()  # cancelled or already joined
                continue
            key = w.share_key
            new_seat = not key or key not in p.seats
            if new_seat and len(p.seats) >= p.count:
                return  # strict FIFO: the head waits for the next free seat
            queue.popleft()
            self._grant_waiter(p, w, new_seat, now, wall, grants)

    def _grant_waiter(self, p: _Pool, w: Waiter, new_seat: bool, now: float, wall: float,
                      grants: list[tuple[Waiter, LeaseInfo]]) -> None:
        key = w.share_key
        self._forget_waiter(w)
        grants.append((w, self._grant(p, key, w.holder, w.version, now, wall)))
        if new_seat and key:
            # Waiters further back with the same share key join the new seat now: it costs nothing.
            for j in list(p.by_key.get(key, ())):
                self._forget_waiter(j)
                grants.append((j, self._grant(p, key, j.holder, j.version, now, wall)))

    def _serve_policy(self, p: _Pool, now: float, wall: float, grants: list[tuple[Waiter, LeaseInfo]]) -> None:
        """Under a usage policy: grant, in arrival order, every waiter a free seat is admissible for; then every
        waiter whose share key is held joins that seat, even in a full pool (a join takes no seat).

        A seat can gain a waiter's key without a waiter being served: under host sharing another user's
        checkout (which a policy admits past the queue) creates it. O(waiters) per call at worst; only pools
        with ``reserve``/``max`` rules take this path.
        """
        waiters = self._waiters
        if len(p.seats) < p.count:
            for w in list(p.queue):
                if len(p.seats) >= p.count:
                    break
                if waiters.get(w.waiter_id) is not w:
                    continue
                key = w.share_key
                if not (key and key in p.seats) and self._admit(p, w.user, w.host, w.addr, w.display) is None:
                    continue
                self._grant_waiter(p, w, not key or key not in p.seats, now, wall, grants)
        for key in [k for k in p.by_key if k in p.seats]:
            for j in list(p.by_key[key]):  # in arrival order; the list goes when its last waiter does
                self._forget_waiter(j)
                grants.append((j, self._grant(p, key, j.holder, j.version, now, wall)))
        queue = p.queue
        while queue and waiters.get(queue[0].waiter_id) is not queue[0]:
            queue.popleft()

    # -- sessions -----------------------------------------------------------------------------------------

    def renew_session(self, session: int, now: float) -> int:
        """Heartbeat: every lease bound to ``session`` lives until ``now + lease_timeout``.

        O(session's leases): the heap is not touched; an entry that pops before the real deadline is
        re-filed then. Returns the number of leases renewed.
        """
        tokens = self._session_tokens(session)
        if not tokens:
            return 0
        deadline = now + self.lease_timeout
        leases = self._leases
        for token in tokens:
            self._set_deadline(leases[token], deadline)
        return len(tokens)

    def detach_session(self, session: int, now: float, grace: float) -> list[LeaseInfo]:
        """The session's connection dropped: keep its leases for a reconnect grace, drop its waiters.

        Each lease's deadline becomes ``min(deadline, now + min(grace, lease_timeout))`` (never later
        than it was: a crashed client's seat frees within one lease timeout) and it is unbound, so
        heartbeats on another session do not renew it; :meth:`resume` rebinds it. Returns those leases.
        """
        ids = self._session_waiters.get(session)
        if ids:
            for waiter_id in list(ids):
                self._forget_waiter(self._waiters[waiter_id])
        tokens = self._as_tokens(self._sessions.pop(session, None))
        if not tokens:
            return []
        limit = now + max(0.0, min(grace, self.lease_timeout))
        detached = []
        for token in tokens:
            lease = self._leases[token]
            lease.session = None
            if lease.deadline > limit:
                self._set_deadline(lease, limit)
            detached.append(lease)
        self._maybe_rebuild_heap()
        return detached

    def resume(self, token: str, session: int, now: float) -> LeaseInfo | None:
        """Rebind an existing lease to ``session`` and renew it; ``None`` if the token is unknown.

        Idempotent and never takes a seat: resuming twice, or resuming a lease still bound to
        ``session``, changes nothing but the deadline (the FlexNet "extra license consumed on
        reconnection" bug cannot happen). A lease bound to another live session moves to this one. Who may
        do so is the daemon's decision (the token together with the lease's ``owner``), taken before this.
        """
        lease = self._leases.get(token)
        if lease is None:
            return None
        if lease.session != session:
            self._unbind(lease)
            lease.session = session
            self._bind(session, token)
        self._set_deadline(lease, now + self.lease_timeout)
        return lease

    def holds(self, session: int) -> bool:
        """True while ``session`` has at least one lease bound to it (O(1))."""
        return bool(self._sessions.get(session))

    def session_leases(self, session: int) -> list[LeaseInfo]:
        return [self._leases[t] for t in self._session_tokens(session)]

    # -- expiry -------------------------------------------------------------------------------------------

    def _set_deadline(self, lease: LeaseInfo, deadline: float) -> None:
        lease.deadline = deadline
        if deadline < lease.heap_at:
            # Moving a deadline earlier than its heap entry would expire it late: file a new entry and
            # let the old one go stale (recognised by its seq).
            self._seq += 1
            lease.heap_seq = self._seq
            lease.heap_at = deadline
            heapq.heappush(self._heap, (deadline, self._seq, lease.token))

    def _refile(self, lease: LeaseInfo) -> None:
        self._seq += 1
        lease.heap_seq = self._seq
        lease.heap_at = lease.deadline
        heapq.heappush(self._heap, (lease.deadline, self._seq, lease.token))

    def _maybe_rebuild_heap(self) -> None:
        if len(self._heap) > 2 * len(self._leases) + _HEAP_SLACK:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        # O(leases); runs once per > leases + _HEAP_SLACK stale entries, so O(1) amortised.
        heap = []
        for token, lease in self._leases.items():
            lease.heap_at = lease.deadline
            heap.append((lease.deadline, lease.heap_seq, token))
        heapq.heapify(heap)
        self._heap = heap

    def expire(
        self, now: float, wall: float, limit: int = 1000
    ) -> tuple[list[LeaseInfo], list[tuple[Waiter, LeaseInfo]]]:
        """Reclaim leases whose deadline is ``<= now``, earliest deadline first, at most ``limit``.

        Bounded work per call (etcd's ``revokeLimit``): if exactly ``limit`` leases come back, more may
        be due and :meth:`next_deadline` is ``<= now``; call again on the next loop iteration.

        Returns:
            The lapsed leases (removed; the caller journals each as released) and the waiters granted
            the seats they freed.
        """
        expired: list[LeaseInfo] = []
        grants: list[tuple[Waiter, LeaseInfo]] = []
        heap = self._heap
        leases = self._leases
        while heap and len(expired) < limit:
            deadline, seq, token = heap[0]
            if deadline > now:
                break
            heapq.heappop(heap)
            lease = leases.get(token)
            if lease is None or lease.heap_seq != seq:
                continue  # released, or superseded by an earlier entry
            if lease.deadline > deadline:
                self._refile(lease)  # renewed since filed; keeps expiry in real-deadline order
                continue
            del leases[token]
            p = self._pools[lease.pool]
            expired.append(lease)
            if self._drop_lease(p, lease) and p.waiting:
                self._serve(p, now, wall, grants)
        return expired, grants

    def next_deadline(self) -> float | None:
        """The earliest lease deadline, exactly (``None`` without leases): arm the expiry timer here."""
        heap = self._heap
        leases = self._leases
        while heap:
            deadline, seq, token = heap[0]
            lease = leases.get(token)
            if lease is None or lease.heap_seq != seq:
                heapq.heappop(heap)
            elif lease.deadline > deadline:
                heapq.heappop(heap)
                self._refile(lease)
            else:
                return deadline
        return None

    # -- restart ------------------------------------------------------------------------------------------

    def restore(self, records: Iterable[LeaseRecord], now: float) -> list[LeaseInfo]:
        """Reload the leases a store kept across a restart: unbound, each with a full lease timeout.

        They count against their pool even above its count (invariant 1), so no seat is granted twice;
        clients that reconnect within the timeout :meth:`resume` them, the rest expire. A record whose
        pool is unknown creates that pool with count 0 (the product left the license while the daemon
        was down): its leases stay visible and expire normally, and no new seat is granted there.

        Raises:
            ValueError: a token is repeated or already in the ledger (nothing is restored then).
        """
        recs = list(records)
        seen: set[str] = set()
        for rec in recs:
            if rec.token in self._leases or rec.token in seen:
                raise ValueError(f"lease token {rec.token[:6]}... appears twice; refusing to restore")
            seen.add(rec.token)
        deadline = now + self.lease_timeout
        restored = []
        for rec in recs:
            pool = (rec.customer_id, rec.product)
            p = self._pools.get(pool)
            if p is None:
                p = self._pools[pool] = _Pool(0, pool)
            key = rec.share_key or (rec.token,)
            p.seats[key] = p.seats.get(key, 0) + 1
            self._seq += 1
            lease = LeaseInfo(
                rec.token, p.key, key, rec.user, rec.host, rec.pid, rec.version, rec.display,
                rec.granted_at, None, deadline, rec.owner, self._seq, deadline, rec.addr,
            )  # fmt: skip
            heapq.heappush(self._heap, (deadline, self._seq, rec.token))
            self._leases[rec.token] = lease
            p.leases[rec.token] = lease
            restored.append(lease)
        for pool in {lease.pool for lease in restored}:
            if self._pools[pool].policy is not None:
                self._retag(self._pools[pool])
        return restored

    # -- seat handles -------------------------------------------------------------------------------------

    def _new_handle(self, pool: PoolKey, key: tuple[str, ...]) -> int:
        """A handle for a new seat: derived from the seat's identity (so a seat restored after a restart
        gets the handle it had, unless that one was taken meanwhile), then the next free one."""
        span = HANDLE_MAX - HANDLE_MIN + 1
        h = HANDLE_MIN + zlib.crc32("\x1f".join((pool[0], pool[1], *key)).encode()) % span
        while h in self._handles:
            h = HANDLE_MIN + (h - HANDLE_MIN + 1) % span
        self._handles[h] = key
        return h

    def handle(self, pool: PoolKey, share_key: tuple[str, ...]) -> int:
        """The decimal handle of a live seat (FlexNet's license handle in ``lmstat``): fixed for the seat's
        life, unique among the live seats of every pool. Raises KeyError for a seat not held.

        Assigned the first time it is asked for (lmstat), not at the grant: a checkout pays nothing for it,
        and a seat nobody looks at holds no handle."""
        p = self._pool(pool)
        h = p.handles.get(share_key)
        if h is None:
            if share_key not in p.seats:
                raise KeyError(share_key)
            h = p.handles[share_key] = self._new_handle(pool, share_key)
        return h

    def seat_of(self, handle: int) -> tuple[PoolKey, tuple[str, ...]] | None:
        """The live seat (pool, share key) with this handle, or None (an admin lookup: O(seats), as it first
        gives every seat its handle, so a handle printed by any lmstat is found)."""
        for pool, p in self._pools.items():
            for seat in p.seats:
                if seat not in p.handles:
                    p.handles[seat] = self._new_handle(pool, seat)
        key = self._handles.get(handle)
        if key is None:
            return None
        for pool, p in self._pools.items():
            if p.handles.get(key) == handle:
                return pool, key
        return None

    def reservations(self, pool: PoolKey) -> list[tuple[Subject, int]]:
        """The free seats held back by each ``reserve`` rule, in rule order; they add up to
        :meth:`reserved` (``[]`` without a policy)."""
        p = self._pool(pool)
        pol = p.policy
        if pol is None:
            return []
        left = self.reserved(pool)
        out = []
        for r, used in zip(pol.reserve, p.bucket_used, strict=True):
            n = min(max(0, r.seats - used), left)
            left -= n
            out.append((r.subject, n))
        return out

    # -- reading ------------------------------------------------------------------------------------------

    def get(self, token: str) -> LeaseInfo | None:
        return self._leases.get(token)

    def leases(self, pool: PoolKey | None = None) -> list[LeaseInfo]:
        """A snapshot of the leases (of one pool, or all), in grant order."""
        if pool is None:
            return list(self._leases.values())
        return list(self._pool(pool).leases.values())

    def __len__(self) -> int:
        return len(self._leases)
