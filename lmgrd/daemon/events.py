"""Typed daemon events for observers (metrics, the usage log): what happened to a seat, and why it ended.

The lease lifecycle (:mod:`lmgrd.daemon.leases`) is the only producer. Observers are called synchronously on
the event loop, so they must be cheap (the usage log only enqueues a line); an observer that raises is logged
and the others still run. Imports nothing from admin or monitoring: they subscribe to this.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lmgrd.core.ledger import LeaseInfo
    from protocol.errors import ErrorCode

__all__ = ["ClientView", "EndReason", "Observer", "Observers"]

logger = logging.getLogger(__name__)


class EndReason(enum.StrEnum):
    """Why a seat ended. The values are contracts: the usage log writes them as its event names."""

    CHECKIN = "checkin"  # the client checked it in
    REMOVAL = "removal"  # lmutil lmremove
    IDLE = "idle"  # the usage policy's idle timeout reclaimed it
    EXPIRY = "expiry"  # no heartbeat for a lease timeout
    REVOKED = "revoked"  # the vendor revoked the customer ID
    UNLICENSED = "unlicensed"  # restored from the journal for a pool the licenses no longer name
    STORE_LOST = "store_lost"  # HA: the seat left the cluster store (etcd unreachable for a lease timeout)
    UNRECORDED = "unrecorded"  # granted, but the journal could not record it: undone before the client was told


class ClientView(Protocol):
    """The client a request came from, as observers and admin commands see it."""

    @property
    def user(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def peer(self) -> str: ...

    def who(self) -> str: ...


class Observer(Protocol):
    """What an observer may implement; every method is optional (:class:`Observers` skips missing ones)."""

    def on_grant(self, lease: LeaseInfo, who: ClientView, waited: float) -> None: ...
    def on_deny(self, product: str, version: str, code: ErrorCode, who: ClientView | None,
                customer_id: str | None) -> None: ...
    def on_release(self, lease: LeaseInfo, reason: EndReason) -> None: ...
    def on_shutdown(self) -> None: ...


class Observers:
    """The subscribed observers, each method bound once at :meth:`add` (no lookup per event)."""

    __slots__ = ("_deny", "_grant", "_release", "_shutdown", "any", "members")

    def __init__(self) -> None:
        self.members: list[object] = []
        #: True once anything subscribed: the hot path tests this attribute, not a __bool__ call.
        self.any = False
        self._grant: list[object] = []
        self._deny: list[object] = []
        self._release: list[object] = []
        self._shutdown: list[object] = []

    def add(self, observer: object) -> None:
        self.members.append(observer)
        self.any = True
        for name, bound in (("on_grant", self._grant), ("on_deny", self._deny), ("on_release", self._release),
                            ("on_shutdown", self._shutdown)):
            fn = getattr(observer, name, None)
            if fn is not None:
                bound.append(fn)

    append = add  # list-like spelling, as observers were attached before

    def __bool__(self) -> bool:
        return bool(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[object]:
        return iter(self.members)

    @staticmethod
    def _call(fns: list[object], event: str, *args: object) -> None:
        for fn in fns:
            try:
                fn(*args)  # type: ignore[operator]
            except Exception:
                logger.exception("observer %r failed on %s", fn, event)

    def grant(self, lease: LeaseInfo, who: ClientView, waited: float) -> None:
        for fn in self._grant:  # _call, inlined for the two events of every checkout and checkin
            try:
                fn(lease, who, waited)  # type: ignore[operator]
            except Exception:
                logger.exception("observer %r failed on %s", fn, "on_grant")

    def deny(self, product: str, version: str, code: ErrorCode, who: ClientView | None,
             customer_id: str | None) -> None:
        self._call(self._deny, "on_deny", product, version, code, who, customer_id)

    def release(self, lease: LeaseInfo, reason: EndReason) -> None:
        for fn in self._release:  # as grant
            try:
                fn(lease, reason)  # type: ignore[operator]
            except Exception:
                logger.exception("observer %r failed on %s", fn, "on_release")

    def shutdown(self) -> None:
        self._call(self._shutdown, "on_shutdown")
