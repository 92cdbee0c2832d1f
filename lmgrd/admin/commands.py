"""Administrative commands (``lmutil``) and their credential.

An admin request is an ``admin`` message with a ``command``, ``args`` and ``auth``. ``auth`` must equal the
daemon's admin token, which the daemon writes at start into a mode-0600 file in its OS user's runtime
directory, keyed by port (``admin-PORT.token``), so ``lmutil`` run on the license server by the same user
finds it with nothing but ``-c PORT@HOST``; from elsewhere the operator passes ``--token-file``. A wrong or
missing token gets ``NOT_AUTHORIZED``, logged with the client's address.

Commands register themselves in ``COMMANDS`` with ``@command("name")``; each gets the server, the
connection and the args, and returns the reply data (a dict) or raises ``ProtocolError``.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from lmgrd.daemon.server import ClientProtocol, Server

logger = logging.getLogger(__name__)

Handler = Callable[["Server", "ClientProtocol", dict[str, Any]], dict[str, Any]]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        if name in COMMANDS:
            raise TypeError(f"admin command {name!r} registered twice")
        COMMANDS[name] = fn
        return fn

    return register


def runtime_dir() -> Path:
    """Where the admin token lives: $LMGRD_RUNTIME_DIR, else the platform's per-user runtime directory."""
    env = os.environ.get("LMGRD_RUNTIME_DIR")
    if env:
        return Path(env)
    import warnings

    import platformdirs

    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR (a service account, a container) platformdirs falls back to
        # /tmp/runtime-UID and warns on every call; the daemon logs the token path it uses instead.
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir("lmgrd"))


def token_path(port: int, directory: Path | None = None) -> Path:
    return (directory or runtime_dir()) / f"admin-{port}.token"


def write_token(path: Path) -> str:
    """Create a fresh admin token in ``path`` (mode 0600, replacing any stale one) and return it."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token


def remove_token(path: Path, token: str) -> None:
    """Remove the token file if it is still ours (a newer daemon on the same port may have replaced it)."""
    try:
        if path.read_text().strip() == token:
            path.unlink()
    except OSError:
        pass


def handle(server: Server, proto: ClientProtocol, command_name: str, args: dict[str, Any], auth: str
           ) -> dict[str, Any]:
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


def lease_view(lease: Any, now: float, wall: float, lease_timeout: float) -> dict[str, Any]:
    """A lease as lmstat shows it (no secrets beyond the token prefix an admin needs for lmremove)."""
    remaining = max(0.0, lease.deadline - now)
    return {
        "token": lease.token, "customer_id": lease.pool[0], "product": lease.pool[1], "user": lease.user,
        "host": lease.host, "pid": lease.pid, "version": lease.version, "display": lease.display,
        "checkout_at": lease.granted_at, "expires_in": round(remaining, 3),
        "last_heartbeat_at": round(wall - max(0.0, lease_timeout - remaining), 3),
        "connected": lease.session is not None,
    }


@command("lmstat")
def _lmstat(server: Server, proto: ClientProtocol, args: dict[str, Any]) -> dict[str, Any]:
    data = server.status()
    product = args.get("product")
    if product is not None and not isinstance(product, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "lmstat: 'product' must be a string")
    if args.get("all") or product:
        now, wall = server.clock(), server.wall()
        data["leases"] = [lease_view(x, now, wall, server.lease_timeout) for x in server.ledger.leases()
                          if product is None or x.pool[1] == product]
        queue = []
        for pool in server.ledger.pools():
            if product is not None and pool[1] != product:
                continue
            for pos, w in enumerate(server.ledger.waiting(pool), 1):
                ctx = server.waits.get(w.waiter_id)
                queue.append({"customer_id": pool[0], "product": pool[1], "position": pos, "user": w.user,
                              "host": w.host, "pid": w.pid, "version": w.version,
                              "waiting_s": round(now - ctx.started, 3) if ctx else 0.0})
        data["queue"] = queue
    data["started_at"] = server.started_wall
    return data


@command("lmhostid")
def _lmhostid(server: Server, proto: ClientProtocol, args: dict[str, Any]) -> dict[str, Any]:
    from lmgrd.storage.files import this_host

    host = this_host()
    return {"hostname": host.hostname, "short_hostname": socket.gethostname().split(".")[0],
            "addresses": list(host.addresses)}


@command("lmdown")
def _lmdown(server: Server, proto: ClientProtocol, args: dict[str, Any]) -> dict[str, Any]:
    server.loop.call_soon(server.request_shutdown, f"lmdown from {proto.peer}")
    return {"stopping": True, "leases_persisted": len(server.ledger.leases())}


@command("lmreread")
def _lmreread(server: Server, proto: ClientProtocol, args: dict[str, Any]) -> dict[str, Any]:
    return server.reload()


@command("lmremove")
def _lmremove(server: Server, proto: ClientProtocol, args: dict[str, Any]) -> dict[str, Any]:
    """Free stuck seats now: by ``token`` (or a unique prefix of one, as lmstat -a shows), or every lease of
    ``product`` held by ``user`` on ``host`` (and ``display``, if given). Each holder is told SEAT_REMOVED."""
    from lmgrd.core.removal import match_leases

    leases = match_leases(server.ledger.leases(), args)
    now, wall = server.clock(), server.wall()
    views = [lease_view(x, now, wall, server.lease_timeout) for x in leases]
    removed = []
    for lease, view in zip(leases, views, strict=True):
        if server.remove_lease(lease.token, f"lmremove from {proto.peer}") is not None:
            view["held_seconds"] = round(max(0.0, wall - lease.granted_at), 3)
            removed.append(view)
    return {"removed": removed}
