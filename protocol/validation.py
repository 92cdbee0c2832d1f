"""Field rules both ends share: every length and range limit, hostnames, product names, versions, IP addresses.

Pure: imports only the standard library (never ``lmgrd`` or ``client_stub``). No I/O, no clock, no logging.
This module is the one home of every field limit: the message schema (:mod:`protocol.messages`), the
license format (:mod:`protocol.license`), the license issuer (``lmissue``), the daemon and the client stub
all read them from here, so a value accepted at one end is accepted at the other. Problems are returned as
messages (``*_problem`` functions return ``None`` when the value is fine) or raised as ``ValueError``
(``parse_version``, ``normalize_ip``); each message quotes the offending value and says what to do.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import reprlib
import unicodedata
from typing import Any

__all__ = [
    "HOSTNAME_RULE",
    "MAX_CODE_LENGTH",
    "MAX_COMMAND_LENGTH",
    "MAX_COUNT",
    "MAX_HEARTBEAT_INTERVAL_SECONDS",
    "MAX_HOSTNAME_LENGTH",
    "MAX_ID",
    "MAX_IDLE_FOR_SECONDS",
    "MAX_LEASE_TIMEOUT_SECONDS",
    "MAX_MESSAGE_LENGTH",
    "MAX_NAME_TEXT_LENGTH",
    "MAX_NESTING_DEPTH",
    "MAX_PID",
    "MAX_PRODUCT_LENGTH",
    "MAX_PROTOCOLS_OFFERED",
    "MAX_PROTOCOL_VERSION",
    "MAX_SECRET_LENGTH",
    "MAX_TEXT",
    "MAX_TOKENS",
    "MAX_TOKEN_LENGTH",
    "MAX_VERSION_LENGTH",
    "MAX_WAITED_SECONDS",
    "MAX_WAIT_SECONDS",
    "MIN_SECRET_LENGTH",
    "PRODUCT_NAME_RE",
    "hostname_problem",
    "nesting_depth_exceeds",
    "normalize_ip",
    "parse_version",
    "product_problem",
    "short_hostname",
    "shown",
    "text_field_problem",
    "version_permitted",
]

# --------------------------------------------------------------------------- the limits, each written once
#: Request ids, session numbers and other unsigned wire integers (msgpack's signed 64-bit range).
MAX_ID = 2**63 - 1
#: Free text on the wire (user, host as sent, client and server versions, display, customer ID, each
#: string of a list): characters.
MAX_TEXT = 256
#: Strings in one list on the wire (the tokens of a resume).
MAX_TOKENS = 1024
#: Product names: characters.
MAX_PRODUCT_LENGTH = 64
#: Versions (requested on the wire, permitted in a license): characters. The server has always refused a
#: longer requested version (BAD_REQUEST), so the client and the license format refuse it too.
MAX_VERSION_LENGTH = 32
#: Lease tokens: characters.
MAX_TOKEN_LENGTH = 64
#: Admin command names: characters.
MAX_COMMAND_LENGTH = 64
#: hello's ``secret`` (protocol 2): the client's proof that it is the holder of its leases. At least 128 bits
#: written as 22+ characters (a client sends 32 hex digits); at most MAX_SECRET_LENGTH.
MIN_SECRET_LENGTH = 22
MAX_SECRET_LENGTH = 128
#: Error code names on the wire: characters.
MAX_CODE_LENGTH = 64
#: Error messages and hints on the wire: characters.
MAX_MESSAGE_LENGTH = 4096
#: A process id in hello is below this.
MAX_PID = 2**32
#: Protocol version numbers are 1 to this; a hello offers 1 to MAX_PROTOCOLS_OFFERED of them.
MAX_PROTOCOL_VERSION = 65535
MAX_PROTOCOLS_OFFERED = 16
#: Longest checkout wait in the server's queue: one day.
MAX_WAIT_SECONDS = 86_400.0
#: Longest time a granted seat may report having waited (a wait spans a reconnect at most once).
MAX_WAITED_SECONDS = MAX_WAIT_SECONDS * 2
#: Heartbeat interval and lease timeout a server may announce: one day, ten days.
MAX_HEARTBEAT_INTERVAL_SECONDS = 86_400.0
MAX_LEASE_TIMEOUT_SECONDS = 864_000.0
#: Longest idle time a heartbeat may report: ten years.
MAX_IDLE_FOR_SECONDS = 10 * 365 * 86_400.0
#: Hostnames: characters (RFC 1123); each dot-separated label 1 to 63.
MAX_HOSTNAME_LENGTH = 253
_MAX_LABEL_LENGTH = 63
#: Customer names and revocation reasons in a license file: characters.
MAX_NAME_TEXT_LENGTH = 200
#: Seats of one product in one license.
MAX_COUNT = 1_000_000
#: Deepest nesting of lists and maps in one decoded message (the message map itself is level 1) or in a file
#: the daemon and its tools read (YAML, JSON). The deepest real message (a status reply's pool, holder, field)
#: needs 5; deeper input is refused before anything walks it recursively (repr, a parser, a validator).
MAX_NESTING_DEPTH = 32

#: The hostname rule, in the words the handbook uses. Quoted by every hostname error.
HOSTNAME_RULE = (
    "hostnames must consist only of ASCII letters (A-Z, a-z), digits (0-9) and hyphens (-), "
    "in dot-separated labels of 1 to 63 characters that do not start or end with a hyphen; "
    "hosts named with Japanese or other special characters cannot be licensed and must be renamed"
)

# Quoting a value that came from outside (a peer, a file): bounded in depth, items and characters, so an error
# message about hostile input can never recurse without end or grow with the input. reprlib does not recurse
# past maxlevel; every other limit keeps the text short before it is cut to the caller's length.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel = 3
_SHOWN.maxdict = _SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxset = _SHOWN.maxfrozenset = _SHOWN.maxdeque = 6
_SHOWN.maxarray = 6
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlong = 40


def shown(value: object, limit: int = 60) -> str:
    """A short ``repr`` of a value from outside, for an error message: never longer than ``limit`` characters.

    The one way ``protocol``, ``lmgrd`` and ``client_stub`` quote a value a peer or a file supplied: the plain
    ``repr`` of a deeply nested list raises ``RecursionError`` and the ``repr`` of a huge one is as large as the
    input. Nested containers show as ``[[[...]]]``, long strings and numbers are cut, and anything whose
    ``repr`` fails shows as its type name.

    Args:
        value: anything.
        limit: the most characters returned (at least 8).

    Returns:
        The bounded ``repr``; a cut one ends in ``...``.
    """
    try:
        text = _SHOWN.repr(value)
    except Exception:  # a repr that raises (an int past Python's digit limit, a broken object)
        text = f"<{type(value).__name__}>"
    limit = max(limit, 8)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: The types a nesting walk descends into, as a tuple for ``isinstance`` (a ``list | tuple | dict`` union is built
#: again on every evaluation).
_CONTAINERS = (list, tuple, dict)


def nesting_depth_exceeds(value: object, limit: int = MAX_NESTING_DEPTH) -> bool:
    """Whether lists, tuples and maps nest deeper than ``limit`` levels in ``value`` (itself level 1).

    Iterative and breadth-first (never recursive), so it is safe on any input, and it stops at the first level
    past the limit: at most every container of the first ``limit`` levels is visited once. A value that is not
    a container is depth 0.
    """
    level: list[list[Any] | tuple[Any, ...] | dict[Any, Any]] = (
        [value] if isinstance(value, _CONTAINERS) else [])
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[list[Any] | tuple[Any, ...] | dict[Any, Any]] = []
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            for item in items:
                if isinstance(item, _CONTAINERS):
                    below.append(item)
            if isinstance(container, dict):
                below.extend(k for k in container if isinstance(k, tuple))
        level = below
    return False


# One DNS label (RFC 1123 "LDH" rule). ASCII only: `str.isalnum()` would accept Japanese letters.
_LABEL_RE = re.compile(rf"[A-Za-z0-9](?:[A-Za-z0-9-]{{0,{_MAX_LABEL_LENGTH - 2}}}[A-Za-z0-9])?")
_LABEL_CHARS_RE = re.compile(r"[A-Za-z0-9-]*")

#: Product names: ASCII letters, digits, underscore and hyphen, 1 to 64 characters (use ``fullmatch``).
PRODUCT_NAME_RE: re.Pattern[str] = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_PRODUCT_LENGTH}}}")

# A version is one or more dot-separated non-negative decimal integers (ASCII digits only).
_VERSION_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")


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
        return f"hostname must be a string, got {type(name).__name__} {shown(name)}; {HOSTNAME_RULE}"
    if not name:
        return f"hostname is empty; {HOSTNAME_RULE}"
    if len(name) > MAX_HOSTNAME_LENGTH:
        return (
            f"hostname {name[:40]!r}... is {len(name)} characters long, more than {MAX_HOSTNAME_LENGTH}; "
            f"{HOSTNAME_RULE}"
        )
    for label in name.split("."):
        if _LABEL_RE.fullmatch(label):
            continue
        if not label:
            reason = "it has an empty label (two dots in a row, or a leading or trailing dot)"
        elif not _LABEL_CHARS_RE.fullmatch(label):
            bad = sorted({ch for ch in label if not (ch.isascii() and (ch.isalnum() or ch == "-"))})
            chars = ", ".join(repr(ch) for ch in bad[:8])
            reason = f"it contains characters that are not allowed ({chars})"
        elif len(label) > _MAX_LABEL_LENGTH:
            reason = f"the label {label[:20]!r}... is {len(label)} characters long, more than {_MAX_LABEL_LENGTH}"
        else:
            reason = f"the label {shown(label, 70)} starts or ends with a hyphen"
        return f"hostname {shown(name, 260)} cannot be licensed: {reason}; {HOSTNAME_RULE}"
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
            f'version must be a string of dot-separated numbers such as "2.10", got {type(s).__name__} {shown(s)}'
        )
    if len(s) > MAX_VERSION_LENGTH:
        raise ValueError(f"version {s[:20]!r}... is longer than {MAX_VERSION_LENGTH} characters")
    if not _VERSION_RE.fullmatch(s):
        raise ValueError(
            f"version {shown(s)} is not a dotted version: use one or more dot-separated non-negative "
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
        raise ValueError(f"IP address must be a string, got {type(addr).__name__} {shown(addr)}")
    text = addr.strip().split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"{shown(addr)} is not an IP address (expected IPv4 such as 192.0.2.10 or IPv6 such as 2001:db8::10)"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def product_problem(name: str) -> str | None:
    """Say what is wrong with a product name, or return ``None`` if it is valid.

    Product names are 1 to 64 ASCII letters, digits, underscores or hyphens.
    """
    if not isinstance(name, str):
        return f"product name must be a string, got {type(name).__name__} {shown(name)}"
    if PRODUCT_NAME_RE.fullmatch(name):
        return None
    if not name:
        return f"product name is empty; use 1 to {MAX_PRODUCT_LENGTH} ASCII letters, digits, '_' or '-'"
    if len(name) > MAX_PRODUCT_LENGTH:
        return f"product name {name[:20]!r}... is {len(name)} characters long; the limit is {MAX_PRODUCT_LENGTH}"
    return (f"product name {shown(name, 70)} may contain only ASCII letters, digits, '_' and '-' "
            f"(1 to {MAX_PRODUCT_LENGTH} characters)")


def text_field_problem(what: str, value: object) -> str | None:
    """Say what is wrong with a customer name or a reason, or return ``None`` if it is fine.

    One line of printable text in any script (Japanese is fine), no leading or trailing spaces, at most
    ``MAX_NAME_TEXT_LENGTH`` characters.

    Args:
        what: the field's name, for the message (``customer``, ``reason``).
        value: the value to check.
    """
    if not isinstance(value, str):
        return f"{what} must be text, got {type(value).__name__} {shown(value)}"
    if not value.strip():
        return f"{what} is empty"
    if value != value.strip():
        return f"{what} {shown(value, 210)} has leading or trailing spaces"
    if len(value) > MAX_NAME_TEXT_LENGTH:
        return f"{what} is {len(value)} characters long; the limit is {MAX_NAME_TEXT_LENGTH}"
    for ch in value:
        # Control, format-less line breaks, surrogates, private use and unassigned code points would
        # make the file ambiguous (a line break) or unreadable; everything else is allowed.
        if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn", "Zl", "Zp"):
            return f"{what} {shown(value, 210)} contains the control or line-break character U+{ord(ch):04X}"
    return None
