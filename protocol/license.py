"""Signed licenses: the schema, the text file format, its Ed25519 *verification*, and the decisions on it.

Pure: imports only the standard library, msgpack and cryptography (never ``lmgrd`` or ``client_stub``).
No file access, no YAML, no clock reads (the caller passes ``now``), no logging, no private keys. The
daemon (floating licenses) and the client stub (node-locked licenses) both use this module, so one file
verifies the same way everywhere. Signing, private keys, new customer IDs and registration-request
checking are the vendor's and live in ``lmgrd.vendor.signing``.

The license file
================
Line-oriented UTF-8 text, one ``key  value`` pair per line; ``#`` lines and blank lines are comments
and are not signed. Example::

    # lmgrd license file (format 1), issued and signed by the software vendor.
    # DO NOT EDIT. Any change to a value below, even one character, invalidates the signature
    # and the whole file is refused. Ask the vendor for a reissued license instead.
    format        1
    kind          license
    customer_id   CID-ABCD-EFGH-IJKL-MNOP
    license_type  multi
    customer      Example Engineering Tokyo
    hostname      licsrv01
    ip            192.0.2.10
    issued_at     2025-11-28T09:30:00Z
    expires       2027-12-31            (or: never)
    share         user_host
    cloud_url     https://activation.vendor.example   (optional: activation decided by that service)
    site_network  192.0.2.0/24          (zero or more lines)
    product       CADPRO version=2.1 count=25   (one or more lines)
    signature     ed25519:<base64 of the 64-byte signature>

The signature line must be the last non-comment line. The signature is Ed25519 over
``LICENSE_SIGNING_DOMAIN + msgpack(dict of every field, keys sorted)`` (see ``canonical_license_bytes``),
so an edit to any value, the order of the products, or the set of site networks fails verification.
The domain prefix keeps a license signature from ever verifying as a revocation and vice versa.

``cloud_url`` is optional: a license that carries it is activated by the vendor's activation service at that
URL only (``protocol.cloud``, ``docs/CLOUD_API.md``), never by the local 24-hour rule; the signature covers it,
so it cannot be removed to fall back to that rule. It is in the signed bytes only when present, so licenses
issued before it existed verify unchanged. ``https://`` always; ``http://`` only for a loopback address.

A revocation file has the same shape with ``kind revocation`` and the keys ``customer_id``,
``revoked_at``, ``replaced_by`` (a customer ID or ``none``) and ``reason``. A revocation *list* is several
such revocations one after another in one file, each with its own signature line
(``verify_revocation_list``); a file holding one revocation is a list of one.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import ipaddress
import re
import unicodedata
from collections.abc import Iterable
from datetime import UTC, date, datetime, time
from typing import Final, Literal, cast

import msgpack
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.errors import ErrorCode, ProtocolError
from protocol.validation import (
    MAX_COUNT,
    hostname_problem,
    normalize_ip,
    parse_version,
    product_problem,
    short_hostname,
    shown,
    text_field_problem,
    version_permitted,
)

__all__ = [
    "CUSTOMER_ID_RE",
    "DATE_RE",
    "HA_SERVERS",
    "LICENSE_FORMAT",
    "LICENSE_SIGNING_DOMAIN",
    "LICENSE_TYPES",
    "MAX_COUNT",
    "MAX_LICENSE_TEXT_CHARS",
    "REVOCATION_SIGNING_DOMAIN",
    "SHARE_MODES",
    "SIGNATURE_BYTES",
    "License",
    "LicenseFileError",
    "LicenseType",
    "Product",
    "Revocation",
    "RevocationEntry",
    "ShareMode",
    "VendorKeyError",
    "canonical_license_bytes",
    "canonical_revocation_bytes",
    "cloud_url_problem",
    "customer_id_problem",
    "document_kind",
    "entry_source",
    "evaluate_use",
    "format_timestamp",
    "host_mismatch",
    "load_public_key",
    "parse_license",
    "parse_revocation",
    "parse_timestamp",
    "servers_problem",
    "split_revocation_list",
    "verify_license",
    "verify_revocation",
    "verify_revocation_list",
]

LicenseType = Literal["multi", "single"]
ShareMode = Literal["user_host", "host", "none"]

#: License types: ``multi`` is a floating license served by lmgrd, ``single`` is node-locked to one PC.
LICENSE_TYPES: Final[tuple[LicenseType, ...]] = ("multi", "single")
#: Seat sharing: same user on same host shares a seat (default), one seat per host, or one per checkout.
SHARE_MODES: Final[tuple[ShareMode, ...]] = ("user_host", "host", "none")
#: The file format this module writes and reads.
LICENSE_FORMAT: Final = 1
#: Domain-separation prefixes of the signed bytes (never change them for format 1).
LICENSE_SIGNING_DOMAIN: Final = b"lmgrd license v1\x00"
REVOCATION_SIGNING_DOMAIN: Final = b"lmgrd revocation v1\x00"
#: Largest license or revocation text accepted (a real one is well under 100 kB).
MAX_LICENSE_TEXT_CHARS: Final = 1_000_000
#: ``CID-`` and four groups of four base32 characters.
CUSTOMER_ID_RE: Final[re.Pattern[str]] = re.compile(r"CID-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}")

#: Longest ``cloud_url``: characters.
MAX_CLOUD_URL_LENGTH: Final = 200
#: ``https://HOST[:PORT][/PATH]`` (or ``http://`` for loopback): no user info, query or fragment.
_CLOUD_URL_RE = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?(/[A-Za-z0-9._~/-]*)?")

#: Bytes in an Ed25519 signature.
SIGNATURE_BYTES: Final = 64
#: Dates in the files and requests (``expires``): YYYY-MM-DD (then checked by ``date.fromisoformat``).
DATE_RE: Final[re.Pattern[str]] = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIMESTAMP_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")
_COUNT_RE = re.compile(r"[1-9][0-9]{0,8}")
_DEFAULT_FILE_HINT = "ask the software vendor for a new license file; never edit a license file by hand"


# --------------------------------------------------------------------------------------------------
# Errors


class LicenseFileError(ProtocolError):
    """A license or revocation file is unusable: unparsable, unsigned, or its signature fails.

    ``str(error)`` and ``error.message`` start with the file (``source``) and say what is wrong.
    """

    def __init__(self, source: str, problem: str, hint: str = _DEFAULT_FILE_HINT) -> None:
        super().__init__(ErrorCode.LICENSE_INVALID, f"{source}: {problem}", hint)
        self.source = source
        self.problem = problem


class VendorKeyError(ProtocolError):
    """A vendor key (public or private PEM) cannot be loaded."""

    def __init__(self, source: str, problem: str, hint: str = "") -> None:
        super().__init__(ErrorCode.LICENSE_INVALID, f"{source}: {problem}", hint)
        self.source = source
        self.problem = problem


# --------------------------------------------------------------------------------------------------
# Schema


def customer_id_problem(customer_id: object) -> str | None:
    """Say what is wrong with a customer ID, or ``None`` if it has the form ``CID-XXXX-XXXX-XXXX-XXXX``."""
    if isinstance(customer_id, str) and CUSTOMER_ID_RE.fullmatch(customer_id):
        return None
    return (
        f"customer ID {shown(customer_id)} is not of the form CID-XXXX-XXXX-XXXX-XXXX "
        "(four groups of four characters A-Z or 2-7)"
    )


def cloud_url_problem(url: object) -> str | None:
    """Say what is wrong with a license's ``cloud_url``, or ``None`` if it is usable.

    ``https://HOST[:PORT][/PATH]``; ``http://`` only when HOST is a loopback address (``127.0.0.1``, ``[::1]``,
    ``localhost``), for tests and local trials. No user info, query or fragment.
    """
    if not isinstance(url, str):
        return f"cloud_url must be a URL string such as https://activation.vendor.example, got {url!r}"
    if len(url) > MAX_CLOUD_URL_LENGTH:
        return f"cloud_url is {len(url)} characters long, more than the {MAX_CLOUD_URL_LENGTH} allowed"
    match = _CLOUD_URL_RE.fullmatch(url)
    if match is None:
        return (f"cloud_url {url!r} is not a URL like https://activation.vendor.example[:PORT][/PATH] "
                "(no user, query or fragment)")
    scheme, host, port = match.group(1), match.group(2), match.group(3)
    if port is not None and not 1 <= int(port) <= 65535:
        return f"cloud_url {url!r}: port {port} is outside 1..65535"
    bare = host[1:-1] if host.startswith("[") else host
    loopback = bare.lower() == "localhost"
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        if host.startswith("["):
            return f"cloud_url {url!r}: {host} is not an IPv6 address"
        problem = hostname_problem(bare)
        if problem:
            return f"cloud_url {url!r}: {problem}"
    else:
        loopback = ip.is_loopback
        if isinstance(ip, ipaddress.IPv6Address) and not host.startswith("["):
            return f"cloud_url {url!r}: write an IPv6 address in brackets, as https://[{bare}]/"
    if scheme == "http" and not loopback:
        return (f"cloud_url {url!r} uses http://, which is accepted only for a loopback address (127.0.0.1, "
                "[::1], localhost); use https://")
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class Product:
    """One licensed product: ``count`` seats of ``name`` up to ``version`` (a dotted version)."""

    name: str
    version: str
    count: int

    def __post_init__(self) -> None:
        problem = product_problem(self.name)
        if problem:
            raise ValueError(problem)
        parse_version(self.version)  # raises ValueError naming the version
        if isinstance(self.count, bool) or not isinstance(self.count, int):
            raise ValueError(f"product {self.name}: count must be a whole number, got {self.count!r}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"product {self.name}: count {self.count} is outside 1..{MAX_COUNT}")


@dataclasses.dataclass(frozen=True, slots=True)
class License:
    """A license as issued: who may run which products where, until when.

    ``issued_at`` is normalised to UTC with whole seconds (the file stores seconds). The constructor
    checks every field, so a ``License`` in hand is always one that could have been issued.
    """

    customer_id: str
    license_type: LicenseType
    customer: str
    hostname: str
    ip: str
    products: tuple[Product, ...]
    issued_at: datetime
    expires: date | None
    site_networks: tuple[str, ...]
    share: ShareMode
    #: The vendor's activation service deciding this license's activation (``None``: the local 24-hour rule).
    cloud_url: str | None = None
    #: An HA license (served by 2 or 3 lmgrd nodes on one etcd cluster, like a FlexNet triad's SERVER lines):
    #: every server's ``(hostname, ip)``; the first is also ``hostname``/``ip``. Empty for one server.
    servers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        problem = customer_id_problem(self.customer_id)
        if problem:
            raise ValueError(problem)
        if self.license_type not in LICENSE_TYPES:
            raise ValueError(f"license type {self.license_type!r} is not one of {', '.join(LICENSE_TYPES)}")
        problem = text_field_problem("customer", self.customer) or hostname_problem(self.hostname)
        if problem:
            raise ValueError(problem)
        normalize_ip(self.ip)
        if not isinstance(self.products, tuple) or not self.products:
            raise ValueError("a license must list at least one product, as a tuple of Product")
        seen: set[str] = set()
        for product in self.products:
            if not isinstance(product, Product):
                raise ValueError(f"products must be Product instances, got {product!r}")
            if product.name in seen:
                raise ValueError(f"product {product.name} is listed twice")
            seen.add(product.name)
        if self.license_type == "single" and (len(self.products) != 1 or self.products[0].count != 1):
            raise ValueError("a single-user license has exactly one product with count 1")
        if not isinstance(self.issued_at, datetime) or self.issued_at.utcoffset() is None:
            raise ValueError(f"issued_at must be a timezone-aware datetime, got {self.issued_at!r}")
        object.__setattr__(self, "issued_at", self.issued_at.astimezone(UTC).replace(microsecond=0))
        if self.expires is not None and (isinstance(self.expires, datetime) or not isinstance(self.expires, date)):
            raise ValueError(f"expires must be a date or None, got {self.expires!r}")
        if not isinstance(self.site_networks, tuple):
            raise ValueError("site_networks must be a tuple of network strings")
        for net in self.site_networks:
            ipaddress.ip_network(net, strict=True)  # raises ValueError naming the network
        problem = servers_problem(self.servers, self.license_type)
        if problem:
            raise ValueError(problem)
        if self.servers and (self.hostname, self.ip) != self.servers[0]:
            raise ValueError("an HA license's hostname and ip are those of its first server")
        if self.share not in SHARE_MODES:
            raise ValueError(f"share mode {self.share!r} is not one of {', '.join(SHARE_MODES)}")
        if self.cloud_url is not None:
            problem = cloud_url_problem(self.cloud_url)
            if problem:
                raise ValueError(problem)

    def product(self, name: str) -> Product | None:
        """The product called ``name`` (exact, case-sensitive match), or ``None``."""
        for product in self.products:
            if product.name == name:
                return product
        return None

    @property
    def expires_at(self) -> datetime | None:
        """The last instant the license is valid: the end of the expiry day, UTC (``None``: never)."""
        if self.expires is None:
            return None
        return datetime.combine(self.expires, time.max, tzinfo=UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class Revocation:
    """A vendor's signed statement that ``customer_id`` must no longer be served."""

    customer_id: str
    revoked_at: datetime
    reason: str
    replaced_by: str | None = None

    def __post_init__(self) -> None:
        problem = (
            customer_id_problem(self.customer_id)
            or (customer_id_problem(self.replaced_by) if self.replaced_by is not None else None)
            or text_field_problem("reason", self.reason)
        )
        if problem:
            raise ValueError(problem)
        if not isinstance(self.revoked_at, datetime) or self.revoked_at.utcoffset() is None:
            raise ValueError(f"revoked_at must be a timezone-aware datetime, got {self.revoked_at!r}")
        object.__setattr__(self, "revoked_at", self.revoked_at.astimezone(UTC).replace(microsecond=0))


#: How many servers an HA license may name (FlexNet's triad has three; two nodes are the smallest HA pair).
HA_SERVERS = (2, 3)


def servers_problem(servers: object, license_type: str = "multi") -> str | None:
    """Why ``servers`` is not a valid HA server list (``()``, or 2-3 distinct ``(hostname, ip)``), or None."""
    if not isinstance(servers, tuple):
        return "servers must be a tuple of (hostname, ip) pairs"
    if not servers:
        return None
    if license_type == "single":
        return "a single-user (node-locked) license has no servers"
    if len(servers) not in HA_SERVERS:
        return f"an HA license names 2 or 3 servers, got {len(servers)}"
    names: set[str] = set()
    for entry in servers:
        if not isinstance(entry, tuple) or len(entry) != 2:
            return f"each server is a (hostname, ip) pair, got {entry!r}"
        name, ip = entry
        problem = hostname_problem(name) if isinstance(name, str) else f"hostname must be text, got {name!r}"
        if problem:
            return problem
        normalize_ip(ip)
        if short_hostname(name) in names:
            return f"server {short_hostname(name)!r} is listed twice"
        names.add(short_hostname(name))
    return None


# --------------------------------------------------------------------------------------------------
# Canonical encoding and signatures


def format_timestamp(moment: datetime) -> str:
    """``moment`` as the files and the signed bytes write it: ``2025-11-28T09:30:00Z`` (UTC, seconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pack(domain: bytes, fields: dict[str, object]) -> bytes:
    packed = msgpack.packb(dict(sorted(fields.items())), use_bin_type=True)
    return domain + cast(bytes, packed)


def parse_timestamp(text: str) -> datetime | None:
    """Read a time as :func:`format_timestamp` writes it (``2025-11-28T09:30:00Z``), else ``None``."""
    match = _TIMESTAMP_RE.fullmatch(text) if isinstance(text, str) else None
    if match is not None:
        try:
            year, month, day, hour, minute, second = (int(g) for g in match.groups())
            return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        except ValueError:
            pass
    return None


def canonical_license_bytes(lic: License) -> bytes:
    """The exact bytes a license signature covers: every field, keys sorted, products in file order.

    ``cloud_url`` and ``servers`` (an HA license) are included only when the license has them, so a license
    without them has the bytes it always had.
    """
    fields: dict[str, object] = {
        "format": LICENSE_FORMAT,
        "kind": "license",
        "customer_id": lic.customer_id,
        "license_type": lic.license_type,
        "customer": lic.customer,
        "hostname": lic.hostname,
        "ip": lic.ip,
        "products": [[p.name, p.version, p.count] for p in lic.products],
        "issued_at": format_timestamp(lic.issued_at),
        "expires": lic.expires.isoformat() if lic.expires is not None else None,
        "site_networks": list(lic.site_networks),
        "share": lic.share,
    }
    if lic.cloud_url is not None:
        fields["cloud_url"] = lic.cloud_url
    if lic.servers:  # an HA license: covered only when present, like cloud_url
        fields["servers"] = [list(x) for x in lic.servers]
    return _pack(LICENSE_SIGNING_DOMAIN, fields)


def canonical_revocation_bytes(rev: Revocation) -> bytes:
    """The exact bytes a revocation signature covers."""
    return _pack(
        REVOCATION_SIGNING_DOMAIN,
        {
            "format": LICENSE_FORMAT,
            "kind": "revocation",
            "customer_id": rev.customer_id,
            "revoked_at": format_timestamp(rev.revoked_at),
            "replaced_by": rev.replaced_by,
            "reason": rev.reason,
        },
    )


# --------------------------------------------------------------------------------------------------
# Parsing


_LICENSE_SINGLE_KEYS = (
    "format",
    "kind",
    "customer_id",
    "license_type",
    "customer",
    "hostname",
    "ip",
    "issued_at",
    "expires",
    "share",
    "cloud_url",
)
_LICENSE_MULTI_KEYS = ("site_network", "product", "server")
_REVOCATION_SINGLE_KEYS = ("format", "kind", "customer_id", "revoked_at", "replaced_by", "reason")
_LINE_RE = re.compile(r"([a-z_]+)(?:[ \t]+(.*))?")


class _Records:
    """The ``key value`` lines of one file, with their line numbers, and the signature."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.single: dict[str, tuple[int, str]] = {}
        self.multi: dict[str, list[tuple[int, str]]] = {}
        self.signature = b""

    def fail(self, problem: str, lineno: int | None = None) -> LicenseFileError:
        where = f"line {lineno}: " if lineno is not None else ""
        return LicenseFileError(self.source, where + problem)

    def get(self, key: str) -> tuple[int, str]:
        if key not in self.single:
            raise self.fail(f"the {shown(key)} line is missing; the file is incomplete or damaged")
        return self.single[key]


def _parse_records(
    text: str, source: str, kind: str, single_keys: tuple[str, ...], multi_keys: tuple[str, ...]
) -> _Records:
    records = _Records(source)
    if not isinstance(text, str):
        raise records.fail(f"expected the file's text, got {type(text).__name__}")
    if len(text) > MAX_LICENSE_TEXT_CHARS:
        raise records.fail(f"the file is {len(text)} characters long, more than a {kind} file can be")
    found = document_kind(text)
    if found is not None and found != kind:
        # Say so plainly before the first key of the other kind is reported as unknown.
        raise records.fail(f"this is a {found} file, not a {kind} file")
    known = (*single_keys, *multi_keys, "signature")
    signature_line = 0
    for lineno, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw.rstrip("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        if signature_line:
            raise records.fail(
                f"unparsable line: text after the signature (line {signature_line}); "
                "the signature must be the last line",
                lineno,
            )
        bad = next((ch for ch in line if unicodedata.category(ch) in ("Cc", "Zl", "Zp") and ch != "\t"), None)
        if bad is not None:
            raise records.fail(f"unparsable line: it contains the control character U+{ord(bad):04X}", lineno)
        match = _LINE_RE.fullmatch(line)
        if match is None:
            raise records.fail(f"unparsable line {shown(line)}: expected 'key  value'", lineno)
        key, value = match.group(1), (match.group(2) or "").strip()
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {shown(near[0])}?)" if near else ""
            raise records.fail(f"unparsable line: unknown key {shown(key)}{hint}", lineno)
        if not value:
            raise records.fail(f"unparsable line: {shown(key)} has no value", lineno)
        if key == "signature":
            records.signature = _parse_signature(records, value, lineno)
            signature_line = lineno
        elif key in multi_keys:
            records.multi.setdefault(key, []).append((lineno, value))
        elif key in records.single:
            raise records.fail(f"{shown(key)} is given twice (first on line {records.single[key][0]})", lineno)
        else:
            records.single[key] = (lineno, value)
    if not signature_line:
        raise records.fail(
            "missing signature: there is no 'signature ed25519:...' line at the end; "
            f"the file is unsigned or was cut short, so it is not a valid {kind}"
        )
    lineno, fmt = records.get("format")
    if fmt != str(LICENSE_FORMAT):
        raise records.fail(
            f"unsupported format {shown(fmt)}: this version reads format {LICENSE_FORMAT}; upgrade lmgrd", lineno
        )
    lineno, found = records.get("kind")
    if found != kind:
        raise records.fail(f"this is a {shown(found)} file, not a {kind} file", lineno)
    return records


def _parse_signature(records: _Records, value: str, lineno: int) -> bytes:
    scheme, _, encoded = value.partition(":")
    if scheme != "ed25519":
        raise records.fail(f"unparsable line: signature scheme {shown(scheme)} is not 'ed25519'", lineno)
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise records.fail("unparsable line: the signature is not valid base64", lineno) from None
    if len(signature) != SIGNATURE_BYTES:
        raise records.fail(
            f"unparsable line: the signature is {len(signature)} bytes, an Ed25519 signature is 64", lineno
        )
    return signature


def _parse_timestamp(records: _Records, key: str) -> datetime:
    lineno, value = records.get(key)
    moment = parse_timestamp(value)
    if moment is not None:
        return moment
    raise records.fail(f"unparsable line: {key} {shown(value)} is not a UTC time like 2025-01-31T09:30:00Z", lineno)


def _parse_product(records: _Records, lineno: int, value: str) -> Product:
    parts = value.split()
    if len(parts) != 3:
        raise records.fail(f"unparsable line: product {shown(value)} is not 'NAME version=V count=N'", lineno)
    name, attrs = parts[0], dict(part.partition("=")[::2] for part in parts[1:])
    if set(attrs) != {"version", "count"}:
        raise records.fail(f"unparsable line: product {shown(value)} is not 'NAME version=V count=N'", lineno)
    if not _COUNT_RE.fullmatch(attrs["count"]):
        raise records.fail(f"unparsable line: product count {shown(attrs['count'])} is not a whole number >= 1", lineno)
    try:
        return Product(name, attrs["version"], int(attrs["count"]))
    except ValueError as exc:
        raise records.fail(f"unparsable line: {exc}", lineno) from None


def parse_license(text: str, source: str) -> tuple[License, bytes]:
    """Parse a license file WITHOUT checking its signature (use ``verify_license`` to trust it).

    Args:
        text: the file's text.
        source: the file path (or another name) used in error messages.

    Returns:
        The license as written and its 64-byte signature.

    Raises:
        LicenseFileError: the text is not a well-formed license file (the message names the line).
    """
    records = _parse_records(text, source, "license", _LICENSE_SINGLE_KEYS, _LICENSE_MULTI_KEYS)
    for key in ("customer_id", "license_type", "customer", "hostname", "ip", "share", "expires"):
        records.get(key)  # every required line is present, reported in file order
    issued_at = _parse_timestamp(records, "issued_at")
    lineno, expires_text = records.get("expires")
    expires: date | None = None
    if expires_text != "never":
        if not DATE_RE.fullmatch(expires_text):
            raise records.fail(f"unparsable line: expires {shown(expires_text)} is not a date like 2027-12-31", lineno)
        try:
            expires = date.fromisoformat(expires_text)
        except ValueError:
            raise records.fail(f"unparsable line: expires {shown(expires_text)} is not a real date", lineno) from None
    products = tuple(_parse_product(records, n, v) for n, v in records.multi.get("product", []))
    if not products:
        raise records.fail("the file has no 'product' line; a license names at least one product")
    networks: list[str] = []
    for lineno, value in records.multi.get("site_network", []):
        try:
            ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise records.fail(f"unparsable line: site_network: {exc}", lineno) from None
        networks.append(value)
    # Field-by-field checks whose failure is best reported against its own line.
    for key, check in (
        ("customer_id", customer_id_problem),
        ("hostname", hostname_problem),
        ("customer", lambda v: text_field_problem("customer", v)),
    ):
        lineno, value = records.get(key)
        problem = check(value)
        if problem:
            raise records.fail(f"unparsable line: {problem}", lineno)
    lineno, ip = records.get("ip")
    try:
        normalize_ip(ip)
    except ValueError as exc:
        raise records.fail(f"unparsable line: {exc}", lineno) from None
    servers: list[tuple[str, str]] = []
    for lineno, value in records.multi.get("server", []):
        parts = value.split()
        if len(parts) != 2:
            raise records.fail(f"unparsable line: server {value!r}: expected 'server HOSTNAME IP'", lineno)
        problem = hostname_problem(parts[0])
        if problem:
            raise records.fail(f"unparsable line: server: {problem}", lineno)
        try:
            normalize_ip(parts[1])
        except ValueError as exc:
            raise records.fail(f"unparsable line: server: {exc}", lineno) from None
        servers.append((parts[0], parts[1]))
    cloud_url: str | None = None
    if "cloud_url" in records.single:
        lineno, cloud_url = records.single["cloud_url"]
        problem = cloud_url_problem(cloud_url)
        if problem:
            raise records.fail(f"unparsable line: {problem}", lineno)
    try:
        lic = License(
            customer_id=records.get("customer_id")[1],
            license_type=cast(LicenseType, records.get("license_type")[1]),
            customer=records.get("customer")[1],
            hostname=records.get("hostname")[1],
            ip=ip,
            products=products,
            issued_at=issued_at,
            expires=expires,
            site_networks=tuple(networks),
            share=cast(ShareMode, records.get("share")[1]),
            servers=tuple(servers),
            cloud_url=cloud_url,
        )
    except ValueError as exc:
        raise records.fail(str(exc)) from None
    return lic, records.signature


def _bad_signature(source: str, kind: str) -> LicenseFileError:
    return LicenseFileError(
        source,
        f"signature does not verify: the {kind} file was edited after it was signed, "
        "or it was signed with another vendor's key",
        f"use the vendor public key that belongs to this {kind}, and ask the vendor for a fresh copy "
        "of the file; a license file cannot be edited by hand",
    )


def verify_license(text: str, public_key: Ed25519PublicKey, source: str) -> License:
    """Parse a license file and check its Ed25519 signature against the vendor's public key.

    Args:
        text: the file's text.
        public_key: the vendor public key (shipped with the product or given to lmgrd; never one
            carried inside the license, which would prove nothing).
        source: the file path, named in every error.

    Returns:
        The verified license.

    Raises:
        LicenseFileError: code LICENSE_INVALID; unparsable line N, missing signature, or a signature
            that does not verify (the file was edited or signed by another vendor key).
    """
    lic, signature = parse_license(text, source)
    try:
        public_key.verify(signature, canonical_license_bytes(lic))
    except InvalidSignature:
        raise _bad_signature(source, "license") from None
    return lic


def parse_revocation(text: str, source: str) -> tuple[Revocation, bytes]:
    """Parse a revocation file WITHOUT checking its signature. Raises LicenseFileError."""
    records = _parse_records(text, source, "revocation", _REVOCATION_SINGLE_KEYS, ())
    for key in ("customer_id", "replaced_by", "reason"):
        records.get(key)
    revoked_at = _parse_timestamp(records, "revoked_at")
    replaced_by: str | None = records.get("replaced_by")[1]
    if replaced_by == "none":
        replaced_by = None
    try:
        rev = Revocation(records.get("customer_id")[1], revoked_at, records.get("reason")[1], replaced_by)
    except ValueError as exc:
        raise records.fail(str(exc)) from None
    return rev, records.signature


def verify_revocation(text: str, public_key: Ed25519PublicKey, source: str) -> Revocation:
    """Parse a revocation file and check its signature; like ``verify_license``. Raises LicenseFileError."""
    rev, signature = parse_revocation(text, source)
    try:
        public_key.verify(signature, canonical_revocation_bytes(rev))
    except InvalidSignature:
        raise _bad_signature(source, "revocation") from None
    return rev


# --------------------------------------------------------------------------------------------------
# Revocation lists: one file holding several revocations, each signed on its own


@dataclasses.dataclass(frozen=True, slots=True)
class RevocationEntry:
    """One revocation of a revocation list, as written (not yet verified)."""

    #: 1-based position in the file.
    number: int
    #: The file's line where the entry starts (its first non-comment line).
    first_line: int
    #: The entry's lines, preceded by blank lines so that parse errors name the file's own line numbers.
    text: str


def split_revocation_list(text: str) -> list[RevocationEntry]:
    """Cut a revocation file into its entries (``lmissue revoke`` appends one per customer ID).

    An entry ends with its ``signature`` line; a second ``format`` line before a signature also starts a new
    entry (so one damaged entry never swallows the next). A file written before lists existed is one entry.
    Comment and blank lines are kept with the entry they follow. Nothing is verified here.
    """
    entries: list[RevocationEntry] = []
    lines = text.removeprefix("\ufeff").split("\n")
    start: int | None = None  # index of the current entry's first non-comment line
    begin = 0  # index where the current entry's text begins
    has_format = False
    for i, raw in enumerate(lines):
        line = raw.rstrip("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        words = line.split(None, 1)  # empty for a line of other whitespace (U+000B, U+3000): it has no key
        key = words[0] if words else ""
        if start is not None and key == "format" and has_format:  # a new entry, the last one unsigned
            entries.append(RevocationEntry(len(entries) + 1, start + 1, "\n" * begin + "\n".join(lines[begin:i])))
            start, begin, has_format = None, i, False
        if start is None:
            start = i
        has_format = has_format or key == "format"
        if key == "signature":
            entries.append(RevocationEntry(len(entries) + 1, start + 1,
                                           "\n" * begin + "\n".join(lines[begin:i + 1])))
            start, begin, has_format = None, i + 1, False
    if start is not None:
        entries.append(RevocationEntry(len(entries) + 1, start + 1, "\n" * begin + "\n".join(lines[begin:])))
    return entries


def entry_source(source: str, entry: RevocationEntry, total: int) -> str:
    """How messages name an entry: the file alone when it holds one, else ``FILE (entry N of M, line L)``."""
    return source if total == 1 else f"{source} (entry {entry.number} of {total}, line {entry.first_line})"


def verify_revocation_list(text: str, public_key: Ed25519PublicKey, source: str
                           ) -> tuple[list[Revocation], list[LicenseFileError]]:
    """Verify every revocation of a revocation file, each against its own signature.

    Args:
        text: the file's text (one revocation, or several appended by ``lmissue revoke``).
        public_key: the vendor public key.
        source: the file path, named in every error.

    Returns:
        The verified revocations in file order, and one error per entry refused (damaged, unsigned, signed
        with another key), naming the file and the entry. A refused entry never hides the valid ones.
    """
    entries = split_revocation_list(text)
    if not entries:
        return [], [LicenseFileError(source, "the file holds no revocation (only comments or nothing at all)",
                                     "give lmgrd the file lmissue revoke wrote, or remove this one")]
    good: list[Revocation] = []
    bad: list[LicenseFileError] = []
    for entry in entries:
        try:
            good.append(verify_revocation(entry.text, public_key, entry_source(source, entry, len(entries))))
        except LicenseFileError as exc:
            bad.append(exc)
    return good, bad


def document_kind(text: str) -> str | None:
    """``"license"`` or ``"revocation"`` from a file's ``kind`` line (unverified), else ``None``."""
    for raw in text.removeprefix("\ufeff").split("\n"):
        match = _LINE_RE.fullmatch(raw.strip(" \t\r"))
        if match is not None and match.group(1) == "kind":
            value = (match.group(2) or "").strip()
            return value if value in ("license", "revocation") else None
    return None


# --------------------------------------------------------------------------------------------------
# Keys


def load_public_key(pem: bytes, source: str = "vendor public key") -> Ed25519PublicKey:
    """Load the vendor's Ed25519 public key from PEM (SubjectPublicKeyInfo; comment lines allowed before it).

    Raises:
        VendorKeyError: not a PEM public key, a private key given by mistake, or not Ed25519.
    """
    if b"PRIVATE KEY-----" in pem:
        raise VendorKeyError(
            source,
            "this is a PRIVATE key; verification needs the vendor PUBLIC key (vendor.pub)",
            "give lmgrd and customers vendor.pub only; keep vendor.key with the vendor",
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise VendorKeyError(
            source,
            f"not a PEM public key ({exc})",
            "use the vendor.pub written by 'lmissue keygen' (it starts with -----BEGIN PUBLIC KEY-----)",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise VendorKeyError(source, f"the key is {type(key).__name__}, not an Ed25519 vendor key")
    return key


# --------------------------------------------------------------------------------------------------
# Decisions


def evaluate_use(lic: License, product: str, version: str, now: datetime) -> tuple[ErrorCode, str] | None:
    """Decide whether ``product`` at ``version`` may run under ``lic`` at ``now``.

    Checks, in the handbook's order, and the first failure wins: expiry (LICENSE_EXPIRED), product
    (UNKNOWN_PRODUCT), version (BAD_REQUEST if the requested version is not a dotted version, else
    VERSION_NOT_PERMITTED). Signature, revocation, host, site and activation are checked before this
    by the caller; seats after it.

    Args:
        lic: a verified license.
        product: the product name the client asks for.
        version: the client's product version.
        now: the current time, timezone-aware.

    Returns:
        ``None`` if allowed, else ``(code, message)``.

    Raises:
        ValueError: ``now`` is naive.
    """
    if now.utcoffset() is None:
        raise ValueError("evaluate_use needs a timezone-aware 'now'")
    expires_at = lic.expires_at
    if expires_at is not None and now > expires_at:
        return (
            ErrorCode.LICENSE_EXPIRED,
            f"license {lic.customer_id} ({lic.customer}) expired at the end of {lic.expires} (UTC); "
            "ask the vendor to renew it",
        )
    entry = lic.product(product)
    if entry is None:
        have = ", ".join(f"{p.name} {p.version}" for p in lic.products)
        return (
            ErrorCode.UNKNOWN_PRODUCT,
            f"product {shown(product)} is not licensed by {lic.customer_id}; this license has: {have}",
        )
    try:
        allowed = version_permitted(version, entry.version)
    except ValueError as exc:
        return ErrorCode.BAD_REQUEST, f"requested {exc}"
    if not allowed:
        return (
            ErrorCode.VERSION_NOT_PERMITTED,
            f"{entry.name} version {version} is not permitted: license {lic.customer_id} permits versions "
            f"up to {entry.version}",
        )
    return None


def host_mismatch(lic: License, hostname: str, addresses: Iterable[str]) -> list[str]:
    """Compare the license's registered host with this machine.

    Hostnames compare by short form, case-insensitively; the registered IP must be one of
    ``addresses`` (after normalisation: IPv4-mapped IPv6 counts as IPv4, zones are ignored).

    An HA license (``servers``) belongs on each of its servers: here if this machine is one of them.

    Returns:
        ``[]`` if the license belongs here, else one message per differing item naming both sides.
    """
    if lic.servers:
        addresses = list(addresses)
        for name, server_ip in lic.servers:
            one = dataclasses.replace(lic, hostname=name, ip=server_ip, servers=())
            if not host_mismatch(one, hostname, addresses):
                return []
        listed = ", ".join(f"{short_hostname(n)} ({a})" for n, a in lic.servers)
        return [f"license {lic.customer_id} is an HA license for the servers {listed}; this machine "
                f"({short_hostname(hostname)}, {', '.join(addresses) or 'no addresses'}) is not one of them"]
    problems: list[str] = []
    if short_hostname(lic.hostname) != short_hostname(hostname):
        problems.append(
            f"license {lic.customer_id} is registered to host {short_hostname(lic.hostname)!r} "
            f"but this machine is {short_hostname(hostname)!r}"
        )
    here: list[str] = []
    seen: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for addr in addresses:
        try:
            ip = normalize_ip(addr)
        except ValueError:
            continue
        if ip not in seen:
            seen.add(ip)
            here.append(str(ip))
    registered = normalize_ip(lic.ip)
    if registered not in seen:
        problems.append(
            f"license {lic.customer_id} is registered to IP address {registered} "
            f"but this machine's addresses are {', '.join(here) or '(none found)'}"
        )
    return problems
