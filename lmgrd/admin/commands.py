"""Administrative commands (``lmutil``) and their credential.

An admin request is an ``admin`` message with a ``command``, ``args`` and ``auth``. ``auth`` must equal the
daemon's admin token, which the daemon writes at start into a mode-0600 file in its OS user's runtime
directory, keyed by port (``admin-PORT.token``), so ``lmutil`` run on the license server by the same user
finds it with nothing but ``-c PORT@HOST``; from elsewhere the operator passes ``--token-file``. A wrong or
missing token gets ``NOT_AUTHORIZED``, logged with the client's address.

Commands register themselves in ``COMMANDS`` with ``@command("name")``; each gets the daemon (as a
:class:`~lmgrd.daemon.api.DaemonView`), the client (a ``ClientView``) and the args, and returns the reply
data (a dict) or raises ``ProtocolError``. :func:`enable_admin` plugs them into a started daemon.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from lmgrd.admin.token import TokenDirUnsafe, remove_token, token_path, write_token
from lmgrd.daemon.api import ClientView, DaemonView
from protocol.errors import ErrorCode, ProtocolError

logger = logging.getLogger(__name__)

#: A command's reply data, or (a command waiting on something outside the daemon) an awaitable of it.
Reply = dict[str, Any] | Awaitable[dict[str, Any]]
Handler = Callable[[DaemonView, ClientView, dict[str, Any]], Reply]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        if name in COMMANDS:
            raise TypeError(f"admin command {name!r} registered twice")
        COMMANDS[name] = fn
        return fn

    return register


def handle(server: DaemonView, proto: ClientView, command_name: str, args: dict[str, Any], auth: str
           ) -> Reply:
    """Authenticate and run one admin command.

    Raises:
        ProtocolError: NOT_AUTHORIZED, BAD_REQUEST (unknown command or bad args), or the command's own error.
    """
    if not auth or not secrets.compare_digest(auth.encode(), server.admin_token.encode()):
        logger.warning("NOT_AUTHORIZED admin command %r from %s (%s)", command_name, proto.peer, proto.who())
        raise ProtocolError(
            ErrorCode.NOT_AUTHORIZED,
            f"admin command '{command_name}' refused: missing or wrong admin token",
            f"run lmutil on the license server as the daemon's user, or pass --token-file with the token from "
            f"{token_path(server.ports[0] if server.ports else 0)} on the server",
        )
    fn = COMMANDS.get(command_name)
    if fn is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown admin command {command_name!r}; known: "
                            f"{', '.join(sorted(COMMANDS))}")
    logger.info("admin %s from %s %s", command_name, proto.peer, args or "")
    return fn(server, proto, args)


def lease_view(lease: Any, now: float, wall: float, lease_timeout: float, handle: int | None = None
               ) -> dict[str, Any]:
    """A lease as lmstat shows it (no secrets beyond the token prefix an admin needs for lmremove).

    ``handle`` is its seat's decimal handle (:meth:`Ledger.handle`): leases sharing a seat share it."""
    remaining = max(0.0, lease.deadline - now)
    view = {
        "token": lease.token, "customer_id": lease.pool[0], "product": lease.pool[1], "user": lease.user,
        "host": lease.host, "pid": lease.pid, "version": lease.version, "display": lease.display,
        "checkout_at": lease.granted_at, "expires_in": round(remaining, 3),
        "last_heartbeat_at": round(wall - max(0.0, lease_timeout - remaining), 3),
        "connected": lease.session is not None,
    }
    if handle is not None:
        view["handle"] = handle
    return view


def _handle(server: DaemonView, lease: Any) -> int | None:
    try:
        return server.ledger.handle(lease.pool, lease.share_key)
    except KeyError:  # not a live seat (cannot happen for a lease the ledger lists)
        return None


def _flexnet_facts(server: DaemonView, data: dict[str, Any]) -> None:
    """Add what FlexNet's lmstat layout prints and ``status()`` lacks: the server's short host name, the
    license files, and per pool its license kind and free seats per ``reserve`` rule."""
    from lmgrd.storage.files import this_host

    data["hostname"] = this_host().hostname.split(".")[0] or "localhost"
    data["license_files"] = [str(path) for path, _lic in server.licensing.served]
    ledger_pools = set(server.ledger.pools())
    # FlexNet lists features in license-file order: (file, line) of each product, for the text layout.
    order = {(lic.customer_id, prod.name): [i, j] for i, (_p, lic) in enumerate(server.licensing.served)
             for j, prod in enumerate(lic.products)}
    for pool in data.get("pools", []):
        key = (pool["customer_id"], pool["product"])
        pool["license_order"] = order.get(key, [len(order), 0])
        lic = server.licensing.license_for(key)
        # lmgrd serves only floating (multi) licenses; single-user ones are node-locked on their PC.
        pool["license_type"] = lic.license_type if lic else ""
        pool["reservations"] = [
            {"kind": subject.kind, "name": subject.name, "seats": n}
            for subject, n in (server.ledger.reservations(key) if key in ledger_pools else []) if n > 0
        ]


@command("lmstat")
def _lmstat(server: DaemonView, proto: ClientView, args: dict[str, Any]) -> dict[str, Any]:
    data = server.status()
    product = args.get("product")
    if product is not None and not isinstance(product, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "lmstat: 'product' must be a string")
    _flexnet_facts(server, data)
    if args.get("all") or product:
        now, wall = server.clock(), server.wall()
        data["leases"] = [lease_view(x, now, wall, server.lease_timeout, _handle(server, x))
                          for x in server.ledger.leases() if product is None or x.pool[1] == product]
        cluster = server.cluster
        if cluster is not None:  # HA: every node's seats, each with the node that holds its client
            for lease in data["leases"]:
                lease["node"] = cluster.node
            for (cid, prod), seats in sorted(cluster.view.items()):
                if product is not None and prod != product:
                    continue
                for seat in seats:
                    if seat.get("node") == cluster.node:
                        continue
                    data["leases"].append({
                        "token": seat["token"], "customer_id": cid, "product": prod, "user": seat["user"],
                        "host": seat["host"], "pid": seat.get("pid", 0), "version": seat["version"],
                        "display": seat.get("display", seat["host"]), "checkout_at": seat["granted_at"],
                        "handle": int(seat.get("slot", "0")) + 1, "node": seat.get("node", ""),
                        "connected": True})
        queue = []
        for pool in server.ledger.pools():
            if product is not None and pool[1] != product:
                continue
            for pos, w in enumerate(server.ledger.waiting(pool), 1):
                ctx = server.waits.get(w.waiter_id)  # None once answered
                queue.append({"customer_id": pool[0], "product": pool[1], "position": pos, "user": w.user,
                              "host": w.host, "pid": w.pid, "version": w.version,
                              "waiting_s": round(now - ctx.started, 3) if ctx else 0.0})
        data["queue"] = queue
    data["started_at"] = server.started_wall
    return data


@command("lmhostid")
def _lmhostid(server: DaemonView, proto: ClientView, args: dict[str, Any]) -> dict[str, Any]:
    from lmgrd.storage.files import this_host

    host = this_host()
    return {"hostname": host.hostname, "short_hostname": socket.gethostname().split(".")[0],
            "addresses": list(host.addresses)}


@command("lmdown")
def _lmdown(server: DaemonView, proto: ClientView, args: dict[str, Any]) -> dict[str, Any]:
    server.loop.call_soon(server.request_shutdown, f"lmdown from {proto.peer}")
    return {"stopping": True, "leases_persisted": len(server.ledger.leases())}


@command("lmreread")
def _lmreread(server: DaemonView, proto: ClientView, args: dict[str, Any]) -> dict[str, Any]:
    return server.reload()


@command("lmremove")
def _lmremove(server: DaemonView, proto: ClientView, args: dict[str, Any]) -> dict[str, Any]:
    """Free stuck seats now: by ``token`` (or a unique prefix of one, as lmstat -a shows), by ``handle`` (the
    decimal seat handle lmstat prints, with ``product``: FlexNet's ``lmremove -h``), or every lease of
    ``product`` held by ``user`` on ``host`` (and ``display``, if given). Each holder is told SEAT_REMOVED."""
    from lmgrd.core.removal import match_leases

    leases = _by_handle(server, args) if "handle" in args else match_leases(server.ledger.leases(), args)
    now, wall = server.clock(), server.wall()
    views = [lease_view(x, now, wall, server.lease_timeout, _handle(server, x)) for x in leases]
    removed = []
    for lease, view in zip(leases, views, strict=True):
        if server.remove_lease(lease.token, f"lmremove from {proto.peer}") is not None:
            view["held_seconds"] = round(max(0.0, wall - lease.granted_at), 3)
            removed.append(view)
    return {"removed": removed}


def _by_handle(server: DaemonView, args: dict[str, Any]) -> list[Any]:
    """The leases of the seat ``args["handle"]`` names (all leases sharing that seat), of ``args["product"]``."""
    handle, product = args.get("handle"), args.get("product")
    if isinstance(handle, bool) or not isinstance(handle, int) or not isinstance(product, str) or not product:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "lmremove: 'handle' must be an integer and 'product' a name",
                            "lmutil lmremove -h FEATURE SERVER PORT HANDLE, with the handle lmstat -a prints")
    seat = server.ledger.seat_of(handle)
    if seat is None or seat[0][1] != product:
        held = ", ".join(sorted({f"{x.pool[1]} {_handle(server, x)} ({x.user}@{x.host})"
                                 for x in server.ledger.leases()})[:10]) or "none"
        raise ProtocolError(ErrorCode.LEASE_NOT_FOUND, f"lmremove: no seat of {product} has handle {handle}; "
                            f"nothing was removed; seats held now: {held}",
                            "copy FEATURE and the handle (the number after server/port) from lmutil lmstat -a")
    pool, key = seat
    return [x for x in server.ledger.leases(pool) if x.share_key == key]


@command("activate")
def _activate(server: DaemonView, proto: ClientView, args: dict[str, Any]) -> Reply:
    """Activate a served license now. One with a ``cloud_url`` asks the vendor's activation service
    (``manual``; the reply waits for its answer), or with ``offline_request`` returns a signed request for a
    site without internet; ``offline_response`` (the vendor's answer to one, as text) installs it."""
    if "offline_response" in args:
        text = args["offline_response"]
        if not isinstance(text, str) or not text:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "activate: 'offline_response' must be the response file's text")
        if server.cloud is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this license server serves no license activated by the "
                                "vendor's activation service (none has a cloud_url)")
        return server.cloud.install_offline(text)
    cid = args.get("customer_id")
    if not isinstance(cid, str) or not cid:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "activate: 'customer_id' must be a customer ID string",
                            "lmutil activate CID-XXXX-XXXX-XXXX-XXXX")
    lic = next((lic for _p, lic in server.licensing.served if lic.customer_id == cid), None)
    if lic is not None and lic.cloud_url is not None:
        if server.cloud is None:
            raise ProtocolError(ErrorCode.INTERNAL_ERROR, f"license {cid} is activated by the vendor's activation "
                                f"service {lic.cloud_url}, and this license server cannot reach it (no installation "
                                "key: see the daemon's log)")
        if args.get("offline_request"):
            return server.cloud.offline_request(cid)
        return server.cloud.activate_now(cid)
    if args.get("offline_request"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"license {cid} has no cloud_url: it is activated locally, "
                            f"no offline request is needed", f"lmutil activate {cid}")
    now = datetime.fromtimestamp(server.wall(), UTC)
    return server.licensing.activate(cid, now, f"lmutil activate from {proto.peer} ({proto.who()})")


class _TokenFile:
    """Removes the admin token file when the daemon stops (an observer of its shutdown)."""

    def __init__(self, server: DaemonView) -> None:
        self.server = server

    def on_shutdown(self) -> None:
        if self.server.admin_token_path is not None and self.server.admin_token:
            remove_token(self.server.admin_token_path, self.server.admin_token)


def enable_admin(server: DaemonView) -> None:
    """Write the admin token for a started daemon and route its admin requests to :data:`COMMANDS`.

    A token file that cannot be written is logged; every admin command is then refused (NOT_AUTHORIZED).
    """
    server.admin_token_path = server.cfg.admin_token_file or token_path(server.ports[0])
    try:
        server.admin_token = write_token(server.admin_token_path)
        logger.info("admin token for lmutil written to %s (mode 0600)", server.admin_token_path)
    except TokenDirUnsafe as exc:
        server.admin_token = ""
        logger.error("refusing to write the admin token file %s: %s; lmutil will be refused",
                     server.admin_token_path, exc)
    except OSError as exc:
        server.admin_token = ""
        logger.error("cannot write the admin token file %s: %s; lmutil will be refused", server.admin_token_path,
                     exc)
    server.observers.add(_TokenFile(server))
    server.handlers.admin = partial(handle, server)
