"""The daemon as admin commands and monitoring see it: typing Protocols, no classes.

:mod:`lmgrd.admin` and :mod:`lmgrd.monitoring` are written against :class:`DaemonView` and
:class:`~lmgrd.daemon.events.ClientView`, so they depend on what the daemon offers, not on how the server
shell is built; the daemon never imports them (they are plugged in by :mod:`lmgrd.cli`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from lmgrd.config import DaemonConfig
from lmgrd.core.ledger import LeaseInfo, Ledger, PoolKey
from lmgrd.core.licensing import Licensing
from lmgrd.daemon.events import ClientView, Observers
from lmgrd.daemon.guard import RefusalCounts
from lmgrd.daemon.leases import Counters, WaitCtx
from lmgrd.daemon.session import AdminHandler
from lmgrd.storage.etcd import EtcdSeats
from lmgrd.storage.journal import StoreError

__all__ = ["ClientView", "CloudControl", "DaemonView"]


class Handlers(Protocol):
    admin: AdminHandler | None


class CloudControl(Protocol):
    """The cloud agent (:class:`lmgrd.daemon.cloud.CloudAgent`) as ``lmutil activate`` uses it."""

    async def activate_now(self, customer_id: str) -> dict[str, Any]: ...
    def offline_request(self, customer_id: str) -> dict[str, Any]: ...
    def install_offline(self, text: str) -> dict[str, Any]: ...


class DaemonView(Protocol):
    """The running daemon: its state for display, and the operations an administrator may ask for."""

    cfg: DaemonConfig
    licensing: Licensing
    ledger: Ledger
    observers: Observers
    metrics: Any
    cloud: CloudControl | None
    request_timer: Callable[[type, float], None] | None
    loop: asyncio.AbstractEventLoop
    closing: bool
    ports: list[int]
    started: float
    started_wall: float
    lease_timeout: float
    hb_interval: float
    admin_token: str
    admin_token_path: Path | None
    stopped: asyncio.Event
    #: HA (``store: etcd``): the cluster-wide seat store; None with the embedded journal.
    cluster: EtcdSeats | None
    refusals: RefusalCounts

    @property
    def handlers(self) -> Handlers: ...
    @property
    def sessions(self) -> Mapping[int, ClientView]: ...
    @property
    def counters(self) -> Counters: ...
    @property
    def store_error(self) -> StoreError | None: ...
    @property
    def store_write_failures(self) -> int: ...
    @property
    def waits(self) -> Mapping[int, WaitCtx]: ...

    def clock(self) -> float: ...
    def wall(self) -> float: ...
    def status(self) -> dict[str, Any]: ...
    def reload(self) -> dict[str, Any]: ...
    def request_shutdown(self, why: str) -> None: ...
    def remove_lease(self, token: str, why: str) -> LeaseInfo | None: ...
    def reserved(self, pool: PoolKey) -> int: ...
