"""Which leases an ``lmremove`` names (the ``lmremove`` admin command in :mod:`lmgrd.admin.commands` frees them).

Two forms, as in FlexLM: ``PRODUCT USER HOST [DISPLAY]`` frees every lease of that product held by that
user on that host (users and hosts compare case-insensitively, hosts by their short name, as the ledger's
share keys do), and ``token`` frees one lease, named by its token or by a prefix of it that matches exactly
one lease (``lmstat -a`` prints the first 8 characters). Nothing matching is an error that says what was
asked and what is held, so an operator can correct a typo. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lmgrd.core.ledger import LeaseInfo
from protocol.errors import ErrorCode, ProtocolError
from protocol.validation import shown

__all__ = ["MIN_TOKEN_PREFIX", "match_leases"]

#: Shortest token prefix accepted: shorter ones would too easily name the wrong seat.
MIN_TOKEN_PREFIX = 4
#: Holders listed in a "nothing matched" error, at most.
_LISTED = 10


def _short(host: str) -> str:
    return host.split(".", 1)[0].lower()


def _held(leases: Iterable[LeaseInfo], product: str | None = None) -> str:
    """A short list of what is held (of ``product``, if given), for error messages."""
    items = sorted({f"{x.pool[1]} by {x.user}@{x.host} ({x.token[:8]})" for x in leases
                    if product is None or x.pool[1] == product})
    if not items:
        return f"no seat{f' of {product}' if product else ''} is held right now"
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return "held now: " + ", ".join(items[:_LISTED]) + more


def _text(args: Mapping[str, Any], key: str) -> str | None:
    v = args.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"lmremove: '{key}' must be a non-empty string, got {shown(v)}",
                            "give PRODUCT USER HOST, or --token TOKEN")
    return v.strip()


def match_leases(leases: Iterable[LeaseInfo], args: Mapping[str, Any]) -> list[LeaseInfo]:
    """The leases ``args`` names: ``{"token": T}`` or ``{"product": P, "user": U, "host": H[, "display": D]}``.

    Raises:
        ProtocolError: BAD_REQUEST when the arguments are neither form or a token prefix is ambiguous or too
            short; LEASE_NOT_FOUND when nothing matches (the message lists what is held).
    """
    all_leases = list(leases)
    token = _text(args, "token")
    product, user, host, display = (_text(args, k) for k in ("product", "user", "host", "display"))
    if token is not None:
        if product or user or host or display:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "lmremove: give either a token or PRODUCT USER HOST, not both")
        return [_by_token(all_leases, token)]
    if not (product and user and host):
        missing = [k.upper() for k, v in (("product", product), ("user", user), ("host", host)) if not v]
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"lmremove: {', '.join(missing)} missing",
                            "give PRODUCT USER HOST (as lmstat -a shows them), or --token TOKEN")
    u, h = user.lower(), _short(host)
    found = [x for x in all_leases if x.pool[1] == product and x.user.lower() == u and _short(x.host) == h
             and (display is None or x.display == display)]
    if not found:
        who = f"{user}@{host}" + (f" display {display}" if display else "")
        raise ProtocolError(ErrorCode.LEASE_NOT_FOUND, f"lmremove: no seat of {product} is held by {who}; nothing "
                            f"was removed; {_held(all_leases, product)}",
                            "check the names with lmutil lmstat -a (product, user and host columns)")
    return found


def _by_token(leases: list[LeaseInfo], token: str) -> LeaseInfo:
    t = token.lower()
    exact = [x for x in leases if x.token == t]
    if exact:
        return exact[0]
    if len(t) < MIN_TOKEN_PREFIX:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"lmremove: token prefix {shown(token)} is too short",
                            f"give at least {MIN_TOKEN_PREFIX} characters; lmstat -a shows 8")
    found = [x for x in leases if x.token.startswith(t)]
    if not found:
        raise ProtocolError(ErrorCode.LEASE_NOT_FOUND, f"lmremove: no lease token starts with {shown(token)}; nothing "
                            f"was removed; {_held(leases)}", "copy the token from lmutil lmstat -a")
    if len(found) > 1:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"lmremove: token prefix {shown(token)} matches {len(found)} leases "
                            f"({', '.join(x.token[:12] for x in found[:_LISTED])}); nothing was removed",
                            "give more characters of the token (lmutil lmstat -a --json shows whole tokens)")
    return found[0]
