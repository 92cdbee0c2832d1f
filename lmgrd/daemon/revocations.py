"""Revocations on the daemon: load the vendor's signed revocation files, and end seats held under them.

Handbook rules enforced here: the daemon loads revocations from the config (``revocations:``) and from
``--revocations FILE`` (repeatable), at start and at every ``lmutil lmreread`` / SIGHUP. Each is verified with
the vendor key; one that fails verification is refused LOUDLY (an ERROR line naming the file and why, and a
problem in ``lmgrd --check``) and revokes nothing. A revoked customer ID grants no new seat
(``LICENSE_REVOKED``), and the seats held under it are lost at their holder's next heartbeat with that code.

``lmissue revoke`` writes a revocation alone; ``lmissue reissue`` writes ``NEW.revoked`` beside ``NEW.lic``.
Never imports ``client_stub``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lmgrd.storage.files import read_revocation_file
from protocol import LostSeat
from protocol.errors import ErrorCode, ProtocolError
from protocol.license import Revocation

if TYPE_CHECKING:
    from lmgrd.daemon.server import Server

__all__ = ["end_revoked_seats", "load_revocations", "revocation_reason"]

logger = logging.getLogger(__name__)


def revocation_reason(rev: Revocation) -> str:
    """One line saying what a revocation says."""
    text = (f"customer ID {rev.customer_id} was revoked by the vendor on "
            f"{rev.revoked_at.strftime('%Y-%m-%d %H:%M:%S')} UTC ({rev.reason})")
    if rev.replaced_by:
        text += f"; it is replaced by {rev.replaced_by}"
    return text


def load_revocations(paths: Iterable[str | os.PathLike[str]], key: Ed25519PublicKey
                     ) -> tuple[dict[str, Revocation], list[str]]:
    """Read and verify every revocation file.

    Returns:
        The verified revocations by customer ID, and one problem per file refused (unreadable, damaged,
        unsigned or signed by another key), each naming the file and saying it revokes nothing.
    """
    revoked: dict[str, Revocation] = {}
    problems: list[str] = []
    for path in paths:
        try:
            rev = read_revocation_file(path, key)
        except ProtocolError as exc:
            problems.append(f"REVOCATION REFUSED: {exc.message}; it revokes nothing until the vendor's signed "
                            "file is given")
            continue
        logger.info("revocation %s loaded: %s", os.fspath(path), revocation_reason(rev))
        revoked.setdefault(rev.customer_id, rev)
    return revoked, problems


def end_revoked_seats(server: Server, revoked: Mapping[str, Revocation]) -> int:
    """Take back every seat (and queued checkout) under a revoked customer ID; return how many leases ended.

    Each lease is released in the ledger and the store, reported to observers as ``on_release(lease,
    "revoked")``, and put in its holder's ``lost`` list so the next heartbeat ack says ``LICENSE_REVOKED``.
    """
    ended = 0
    for pool in [p for p in server.ledger.pools() if p[0] in revoked]:
        rev = revoked[pool[0]]
        why = revocation_reason(rev)
        leases, waiters = server.ledger.remove_pool(pool)
        for lease in leases:
            ended += 1
            server.store.record_release(lease.token)
            server.counters.released += 1
            server._notify("on_release", lease, "revoked")
            logger.warning("REVOKED %s %s of %s@%s lease %s: %s", lease.pool[1], lease.version, lease.user,
                           lease.host, lease.token[:8], why)
            proto = server.sessions.get(lease.session) if lease.session is not None else None
            if proto is not None:
                proto.lost.append(LostSeat(lease.token, ErrorCode.LICENSE_REVOKED,
                                           f"this seat of {lease.pool[1]} is lost: {why}"))
        for w in waiters:
            ctx = server.waits.pop(w.waiter_id, None)
            if ctx is None:
                continue
            if ctx.timer is not None:
                ctx.timer.cancel()
            ctx.proto.waiters.pop(w.waiter_id, None)
            server._error(ctx.proto, ctx.request_id, ErrorCode.LICENSE_REVOKED, f"{ctx.product} is not served: {why}",
                          "install the reissued license it was replaced by")
    if ended:
        server._send_nothing()  # make the releases durable promptly
    return ended
