"""Field rules both ends share: hostnames, product names, versions and IP addresses.

Pure: imports only the standard library. No I/O, no clock, no logging. Every rule here is used by the
license issuer (``lmissue``), the daemon and the client stub alike, so a value accepted at one end is
accepted at the other. Problems are returned as messages (``*_problem`` functions return ``None`` when
the value is fine) or raised as ``ValueError`` (``parse_version``, ``normalize_ip``); each message
quotes the offending value and says what to do.
"""

from __future__ import annotations

import functools
import ipaddress
import re

__all__ = [
    "HOSTNAME_RULE",
    "MAX_VERSION_LENGTH",
    "PRODUCT_NAME_RE",
    "hostname_problem",
    "normalize_ip",
    "parse_version",
    "product_problem",
    "short_hostname",
    "version_permitted",
]

#: The hostname rule, in the words the handbook uses. Quoted by every hostname error.
HOSTNAME_RULE = (
    "hostnames must consist only of ASCII letters (A-Z, a-z), digits (0-9) and hyphens (-), "
    "in dot-separated labels of 1 to 63 characters that do not start or end with a hyphen; "
    "hosts named with Japanese or other special characters cannot be licensed and must be renamed"
)

# One DNS label (RFC 1123 "LDH" rule). ASCII only: `str.isalnum()` would accept Japanese letters.
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LABEL_CHARS_RE = re.compile(r"[A-Za-z0-9-]*")
_MAX_HOSTNAME_LENGTH = 253

#: Product names: ASCII letters, digits, underscore and hyphen, 1 to 64 characters (use ``fullmatch``).
PRODUCT_NAME_RE: re.Pattern[str] = re.compile(r"[A-Za-z0-9_-]{1,64}")

# A version is one or more dot-separated non-negative decimal integers (ASCII digits only).
_VERSION_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
#: Longest version string accepted (keeps comparisons cheap and int() conversions bounded).
MAX_VERSION_LENGTH = 64


def hostname_problem(name: str) -> str | None:
    """Say what is wrong with a hostname, or return ``None`` if it may be licensed.

    Each dot-separated label must be 1-63 ASCII letters, digits or hyphens, not starting or ending
    with a hyphen; the whole name must be non-empty and at most 253 characters.

    Args:
        name: the hostname as the operating system or a request reports it.

    Returns:
        ``None`` if the name is valid, else a message quoting ``name`` and ending with HOSTNAME_RULE.
    """
    if not isinstance(name, str):
        return f"hostname must be a string, got {type(name).__name__} {name!r}; {HOSTNAME_RULE}"
    if not name:
        return f"hostname is empty; {HOSTNAME_RULE}"
    if len(name) > _MAX_HOSTNAME_LENGTH:
        return (
            f"hostname {name[:40]!r}... is {len(name)} characters long, more than {_MAX_HOSTNAME_LENGTH}; "
            f"{HOSTNAME_RULE}"
        )
    for label in name.split("."):
        if _LABEL_RE.fullmatch(label):
            continue
        if not label:
            reason = "it has an empty label (two dots in a row, or a leading or trailing dot)"
        elif not _LABEL_CHARS_RE.fullmatch(label):
            bad = sorted({ch for ch in label if not (ch.isascii() and (ch.isalnum() or ch == "-"))})
            shown = ", ".join(repr(ch) for ch in bad[:8])
            reason = f"it contains characters that are not allowed ({shown})"
        elif len(label) > 63:
            reason = f"the label {label[:20]!r}... is {len(label)} characters long, more than 63"
        else:
            reason = f"the label {label!r} starts or ends with a hyphen"
        return f"hostname {name!r} cannot be licensed: {reason}; {HOSTNAME_RULE}"
    return None


def short_hostname(name: str) -> str:
    """The short form hosts are compared by: the first label, lowercased.

    ``licsrv01.corp.example`` and ``LICSRV01`` both give ``licsrv01``.
    """
    return name.split(".", 1)[0].lower()


def parse_version(s: str) -> tuple[int, ...]:
    """Parse a dotted version such as ``3``, ``2.10`` or ``11.0.4`` into a tuple of ints.

    Args:
        s: the version string.

    Returns:
        The parts as integers, e.g. ``(2, 10)``.

    Raises:
        ValueError: ``s`` is not one or more dot-separated non-negative integers (message quotes it).
    """
    if not isinstance(s, str):
        raise ValueError(
            f'version must be a string of dot-separated numbers such as "2.10", got {type(s).__name__} {s!r}'
        )
    if len(s) > MAX_VERSION_LENGTH:
        raise ValueError(f"version {s[:20]!r}... is longer than {MAX_VERSION_LENGTH} characters")
    if not _VERSION_RE.fullmatch(s):
        raise ValueError(
            f"version {s!r} is not a dotted version: use one or more dot-separated non-negative "
            "integers such as 3, 2.10 or 11.0.4"
        )
    return tuple(int(part) for part in s.split("."))


def _padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)), b + (0,) * (width - len(b))


@functools.lru_cache(maxsize=4096)  # a site has a handful of versions; every checkout asks this
def version_permitted(requested: str, permitted: str) -> bool:
    """True if ``requested`` <= ``permitted`` as dotted numbers, missing parts counting as 0.

    So ``2.10`` > ``2.9`` and ``2`` == ``2.0``.

    Raises:
        ValueError: either string is not a dotted version.
    """
    req, perm = _padded(parse_version(requested), parse_version(permitted))
    return req <= perm


def normalize_ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an IP address the way every comparison in lmgrd needs it.

    An IPv6 zone (``fe80::1%eth0``) is dropped, and an IPv4-mapped IPv6 address (``::ffff:192.0.2.10``)
    becomes its IPv4 address, so a peer seen through a dual-stack socket matches its registration.

    Raises:
        ValueError: ``addr`` is not an IP address (message quotes it).
    """
    if not isinstance(addr, str):
        raise ValueError(f"IP address must be a string, got {type(addr).__name__} {addr!r}")
    text = addr.strip().split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"{addr!r} is not an IP address (expected IPv4 such as 192.0.2.10 or IPv6 such as 2001:db8::10)"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def product_problem(name: str) -> str | None:
    """Say what is wrong with a product name, or return ``None`` if it is valid.

    Product names are 1 to 64 ASCII letters, digits, underscores or hyphens.
    """
    if not isinstance(name, str):
        return f"product name must be a string, got {type(name).__name__} {name!r}"
    if PRODUCT_NAME_RE.fullmatch(name):
        return None
    if not name:
        return "product name is empty; use 1 to 64 ASCII letters, digits, '_' or '-'"
    if len(name) > 64:
        return f"product name {name[:20]!r}... is {len(name)} characters long; the limit is 64"
    return f"product name {name!r} may contain only ASCII letters, digits, '_' and '-' (1 to 64 characters)"
