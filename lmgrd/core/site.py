"""The site restriction: which client addresses a license may serve.

Handbook rule: a license with ``site_networks`` serves only clients whose address is inside one of them.
Without ``site_networks`` the site is the customer's LAN: private, loopback and link-local addresses
(RFC 1918, RFC 4193 ``fc00::/7``, ``127.0.0.0/8``, ``::1``, ``169.254.0.0/16``, ``fe80::/10``); a client
from a public address is refused. The daemon config (``site_networks:``) may narrow the site further but
never widen it past the license: an address must be inside the license's site AND, when the config names
networks, inside one of those too.

Addresses arrive already normalised by the server (an IPv4-mapped IPv6 peer is its IPv4 address). Pure
decisions, no I/O; never imports ``client_stub``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from protocol.validation import normalize_ip, shown

__all__ = ["LAN_NETWORKS", "Network", "Site", "parse_networks", "site_networks_problems"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The default site: the customer's LAN.
LAN_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
              "::1/128", "fc00::/7", "fe80::/10")
)
_LAN_TEXT = "the local network (private, loopback and link-local addresses)"
#: Decisions cached per site; cleared when full so a scan of many addresses cannot grow memory.
_CACHE_LIMIT = 65536


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Networks from their text form (``192.0.2.0/24``, ``2001:db8::/32``, a bare address = one host).

    Raises:
        ValueError: a value that is not a network, or has host bits set.
    """
    return tuple(ipaddress.ip_network(v, strict=True) for v in values)


def site_networks_problems(value: Any, key: str = "site_networks") -> list[str]:
    """Config validation: every problem with a ``site_networks:`` setting, each naming its path and value."""
    if not isinstance(value, list):
        return [f"{key}: expected a list of networks such as [192.168.10.0/24], got {shown(value)}"]
    problems: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(f"{key}[{i}]: expected a network such as 192.168.10.0/24, got {shown(item)}")
            continue
        try:
            ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            problems.append(f"{key}[{i}]: {shown(item)} is not a network ({exc}); write it as ADDRESS/PREFIX with "
                            "the host bits zero, for example 192.168.10.0/24")
    return problems


def _inside(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Sequence[Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)


class Site:
    """One license's site, possibly narrowed by the daemon config."""

    __slots__ = ("_cache", "daemon", "license", "text")

    def __init__(self, license_networks: Sequence[str], daemon_networks: Sequence[Network] = ()) -> None:
        self.license: tuple[Network, ...] = parse_networks(license_networks) if license_networks else LAN_NETWORKS
        self.daemon = tuple(daemon_networks)
        lic_text = ", ".join(map(str, self.license)) if license_networks else _LAN_TEXT
        self.text = lic_text + (f"; narrowed by the daemon config to {', '.join(map(str, self.daemon))}"
                                if self.daemon else "")
        self._cache: dict[str, bool] = {}

    def allows(self, addr: str) -> bool:
        """True if a client at ``addr`` is inside the site. An address that cannot be read is outside."""
        hit = self._cache.get(addr)
        if hit is not None:
            return hit
        try:
            ip = normalize_ip(addr)
        except ValueError:
            ok = False
        else:
            ok = _inside(ip, self.license) and (not self.daemon or _inside(ip, self.daemon))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[addr] = ok
        return ok
