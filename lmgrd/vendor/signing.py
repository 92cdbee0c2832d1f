"""The vendor's half of the license format: signing, private keys, new customer IDs, request checking.

Runs only where the vendor's private key is (``lmissue``, the demo, tests): the daemon and the client stub
never import it. The format itself, the signed bytes and their verification live in :mod:`protocol.license`;
this module renders a license or a revocation as its text file around a signature made over
:func:`protocol.license.canonical_license_bytes`, so what it writes is exactly what verification reads.
Imports ``protocol``, ``cryptography`` and the standard library; never ``client_stub``. No file access:
``lmissue`` reads and writes the files.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import difflib
import ipaddress
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from typing import Final, cast

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.license import (
    DATE_RE,
    HA_SERVERS,
    LICENSE_FORMAT,
    LICENSE_TYPES,
    SHARE_MODES,
    SIGNATURE_BYTES,
    License,
    LicenseType,
    Product,
    Revocation,
    ShareMode,
    VendorKeyError,
    canonical_license_bytes,
    canonical_revocation_bytes,
    cloud_url_problem,
    format_timestamp,
)
from protocol.validation import (
    MAX_COUNT,
    hostname_problem,
    normalize_ip,
    parse_version,
    product_problem,
    short_hostname,
    text_field_problem,
)

__all__ = [
    "CUSTOMER_ID_RANDOM_BYTES",
    "FieldProblem",
    "RequestSpec",
    "check_request",
    "dump_private_key",
    "dump_public_key",
    "format_license",
    "format_revocation",
    "load_private_key",
    "new_customer_id",
    "sign_license",
    "sign_revocation",
]

#: Random bytes in a customer ID (80 bits, 16 base32 characters).
CUSTOMER_ID_RANDOM_BYTES: Final = 10


# --------------------------------------------------------------------------------------------------
# Customer IDs


def new_customer_id(rng_bytes: bytes) -> str:
    """Make a readable customer ID from fresh random bytes (pass ``os.urandom(CUSTOMER_ID_RANDOM_BYTES)``).

    Returns:
        ``CID-XXXX-XXXX-XXXX-XXXX``: the RFC 4648 base32 of the 10 bytes (no 0/1/8/9, no O/I confusion).

    Raises:
        ValueError: ``rng_bytes`` is not exactly 10 bytes.
    """
    if not isinstance(rng_bytes, bytes) or len(rng_bytes) != CUSTOMER_ID_RANDOM_BYTES:
        raise ValueError(f"new_customer_id needs exactly {CUSTOMER_ID_RANDOM_BYTES} random bytes")
    text = base64.b32encode(rng_bytes).decode("ascii")
    return "CID-" + "-".join(text[i : i + 4] for i in range(0, 16, 4))


# --------------------------------------------------------------------------------------------------
# The text files and their signatures


def _line(key: str, value: str) -> str:
    return f"{key:<14}{value}\n"


def _signature_line(signature: bytes) -> str:
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"an Ed25519 signature is {SIGNATURE_BYTES} bytes")
    return _line("signature", "ed25519:" + base64.b64encode(signature).decode("ascii"))


_LICENSE_HEADER = (
    "# lmgrd license file (format 1), issued and signed by the software vendor.\n"
    "# DO NOT EDIT. Any change to a value below, even one character, invalidates the signature\n"
    "# and the whole file is refused. Ask the vendor for a reissued license instead.\n"
)
_REVOCATION_HEADER = (
    "# lmgrd license revocation (format 1), signed by the software vendor.\n"
    "# Give this file to lmgrd (--revocations) to stop serving the customer ID below.\n"
    "# DO NOT EDIT. Any change to a value below invalidates the signature.\n"
)


def format_license(lic: License, signature: bytes) -> str:
    """Render a license and its signature as the text file (see the module docstring)."""
    out = [
        _LICENSE_HEADER,
        _line("format", str(LICENSE_FORMAT)),
        _line("kind", "license"),
        _line("customer_id", lic.customer_id),
        _line("license_type", lic.license_type),
        _line("customer", lic.customer),
        _line("hostname", lic.hostname),
        _line("ip", lic.ip),
        _line("issued_at", format_timestamp(lic.issued_at)),
        _line("expires", lic.expires.isoformat() if lic.expires is not None else "never"),
        _line("share", lic.share),
    ]
    out += [_line("server", f"{name} {ip}") for name, ip in lic.servers]
    if lic.cloud_url is not None:
        out.append(_line("cloud_url", lic.cloud_url))
    out += [_line("site_network", net) for net in lic.site_networks]
    out += [_line("product", f"{p.name} version={p.version} count={p.count}") for p in lic.products]
    out.append(_signature_line(signature))
    return "".join(out)


def sign_license(lic: License, private_key: Ed25519PrivateKey) -> str:
    """Sign ``lic`` with the vendor's private key and return the complete license file text."""
    return format_license(lic, private_key.sign(canonical_license_bytes(lic)))


def format_revocation(rev: Revocation, signature: bytes) -> str:
    """Render a revocation and its signature as the text file."""
    return "".join(
        [
            _REVOCATION_HEADER,
            _line("format", str(LICENSE_FORMAT)),
            _line("kind", "revocation"),
            _line("customer_id", rev.customer_id),
            _line("revoked_at", format_timestamp(rev.revoked_at)),
            _line("replaced_by", rev.replaced_by or "none"),
            _line("reason", rev.reason),
            _signature_line(signature),
        ]
    )


def sign_revocation(rev: Revocation, private_key: Ed25519PrivateKey) -> str:
    """Sign ``rev`` with the vendor's private key and return the complete revocation file text."""
    return format_revocation(rev, private_key.sign(canonical_revocation_bytes(rev)))


# --------------------------------------------------------------------------------------------------
# Keys


def load_private_key(pem: bytes, source: str = "vendor private key") -> Ed25519PrivateKey:
    """Load the vendor's Ed25519 private key from unencrypted PEM (PKCS8).

    Raises:
        VendorKeyError: not a PEM private key, a public key given by mistake, encrypted, or not Ed25519.
    """
    if b"PRIVATE KEY-----" not in pem and b"PUBLIC KEY-----" in pem:
        raise VendorKeyError(
            source,
            "this is a PUBLIC key; signing needs the vendor PRIVATE key (vendor.key)",
            "pass the vendor.key written by 'lmissue keygen'",
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise VendorKeyError(source, "the private key is encrypted; lmissue needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise VendorKeyError(
            source,
            f"not a PEM private key ({exc})",
            "use the vendor.key written by 'lmissue keygen' (it starts with -----BEGIN PRIVATE KEY-----)",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise VendorKeyError(source, f"the key is {type(key).__name__}, not an Ed25519 vendor key")
    return key


def dump_private_key(key: Ed25519PrivateKey) -> bytes:
    """PEM PKCS8, unencrypted (protect the file itself: mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def dump_public_key(key: Ed25519PublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------------------------------
# The registration request


@dataclasses.dataclass(frozen=True, slots=True)
class FieldProblem:
    """One problem in a request: the field's path (``host.hostname``, ``products[1].count``) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclasses.dataclass(frozen=True, slots=True)
class RequestSpec:
    """A checked registration request: a license without its customer ID and issue time."""

    license_type: LicenseType
    customer: str
    hostname: str
    ip: str
    products: tuple[Product, ...]
    expires: date | None
    site_networks: tuple[str, ...]
    share: ShareMode
    servers: tuple[tuple[str, str], ...] = ()  # an HA license's servers (the request's ``hosts:``)
    cloud_url: str | None = None

    def to_license(self, customer_id: str, issued_at: datetime) -> License:
        """The license this request becomes under ``customer_id``, issued at ``issued_at`` (aware)."""
        return License(
            customer_id=customer_id,
            license_type=self.license_type,
            customer=self.customer,
            hostname=self.hostname,
            ip=self.ip,
            products=self.products,
            issued_at=issued_at,
            expires=self.expires,
            site_networks=self.site_networks,
            share=self.share,
            servers=self.servers,
            cloud_url=self.cloud_url,
        )


_REQUEST_KEYS = ("license_type", "customer", "host", "hosts", "products", "expires", "site_networks", "share",
                 "cloud_url")
_HOST_KEYS = ("hostname", "ip")
_PRODUCT_KEYS = ("name", "version", "count")
_MISSING = object()


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _did_you_mean(value: str, choices: Iterable[str]) -> str:
    near = difflib.get_close_matches(value, list(choices), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def _check_keys(
    mapping: Mapping[object, object], allowed: tuple[str, ...], path: str, problems: list[FieldProblem]
) -> None:
    for key in mapping:
        if key in allowed:
            continue
        near = difflib.get_close_matches(str(key), allowed, n=1)
        suggestion = f"did you mean {near[0]!r}?" if near else f"allowed keys: {', '.join(allowed)}"
        problems.append(FieldProblem(_join(path, key), f"unknown key {key!r}; {suggestion}"))


def _check_version(value: object, path: str, problems: list[FieldProblem]) -> str | None:
    if isinstance(value, bool):
        problems.append(FieldProblem(path, f'version must be a dotted version such as "2.1", got {value!r}'))
        return None
    if isinstance(value, float):
        problems.append(
            FieldProblem(
                path,
                f'version {value!r} was read as a number; quote it (version: "2.10") so that 2.10 is not read as 2.1',
            )
        )
        return None
    text = str(value) if isinstance(value, int) and value >= 0 else value
    try:
        parse_version(cast(str, text))
    except ValueError as exc:
        problems.append(FieldProblem(path, str(exc)))
        return None
    return cast(str, text)


def _check_products(value: object, license_type: object, problems: list[FieldProblem]) -> tuple[Product, ...] | None:
    if value is _MISSING:
        problems.append(FieldProblem("products", "missing required field: a list of {name, version, count}"))
        return None
    if not isinstance(value, list) or not value:
        problems.append(
            FieldProblem(
                "products",
                f'must be a non-empty list such as [{{name: CADPRO, version: "2.1", count: 25}}], got {value!r}',
            )
        )
        return None
    single = license_type == "single"
    if single and len(value) > 1:
        problems.append(
            FieldProblem(
                "products",
                f"a single-user (node-locked) license covers exactly one product, this request lists {len(value)}; "
                "issue one single-user license per product, or use license_type: multi",
            )
        )
    products: list[Product] = []
    first_index: dict[str, int] = {}
    ok = True
    for index, item in enumerate(value):
        path = f"products[{index}]"
        if not isinstance(item, dict):
            problems.append(FieldProblem(path, f"must be a mapping {{name, version, count}}, got {item!r}"))
            ok = False
            continue
        _check_keys(item, _PRODUCT_KEYS, path, problems)
        name = item.get("name", _MISSING)
        if name is _MISSING:
            problems.append(FieldProblem(f"{path}.name", "missing required field: the product name"))
            name = None
        else:
            problem = product_problem(cast(str, name))
            if problem:
                problems.append(FieldProblem(f"{path}.name", problem))
                name = None
            elif cast(str, name) in first_index:
                problems.append(
                    FieldProblem(
                        f"{path}.name",
                        f"product {name!r} is already listed at products[{first_index[cast(str, name)]}]; "
                        "list each product once",
                    )
                )
            else:
                first_index[cast(str, name)] = index
        version: str | None = None
        if "version" not in item:
            problems.append(FieldProblem(f"{path}.version", "missing required field: the highest permitted version"))
        else:
            version = _check_version(item["version"], f"{path}.version", problems)
        count = item.get("count", 1 if single else _MISSING)
        if count is _MISSING:
            problems.append(FieldProblem(f"{path}.count", "missing required field: the number of seats"))
            count = None
        elif isinstance(count, bool) or not isinstance(count, int):
            problems.append(FieldProblem(f"{path}.count", f"count must be a whole number >= 1, got {count!r}"))
            count = None
        elif count < 1:
            problems.append(FieldProblem(f"{path}.count", f"count must be at least 1, got {count}"))
            count = None
        elif count > MAX_COUNT:
            problems.append(FieldProblem(f"{path}.count", f"count {count} is more than the maximum {MAX_COUNT}"))
            count = None
        elif single and count != 1:
            problems.append(
                FieldProblem(
                    f"{path}.count",
                    f"a single-user (node-locked) license has count 1 (one PC), got {count}; "
                    "for several seats use license_type: multi",
                )
            )
            count = None
        if name is None or version is None or count is None:
            ok = False
            continue
        products.append(Product(cast(str, name), version, cast(int, count)))
    return tuple(products) if ok else None


def _check_hosts(value: object, license_type: object, problems: list[FieldProblem]
                 ) -> tuple[tuple[str, str], ...] | None:
    """``hosts:`` of an HA license: 2 or 3 ``{hostname, ip}``, like a triad's SERVER lines."""
    if not isinstance(value, list) or len(value) not in HA_SERVERS:
        problems.append(FieldProblem("hosts", "must list 2 or 3 servers of an HA license, each {hostname: NAME, "
                                     f"ip: ADDRESS}}, got {value!r}"))
        return None
    if license_type == "single":
        problems.append(FieldProblem("hosts", "a single-user (node-locked) license has one host: use host:"))
        return None
    out = []
    for i, item in enumerate(value):
        host = _check_host(item, problems, f"hosts[{i}]")
        if host is not None:
            out.append(host)
    if len(out) != len(value):
        return None
    names = [short_hostname(h) for h, _ in out]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.append(FieldProblem(f"hosts[{i}].hostname", f"{name!r} is listed twice"))
            return None
    return tuple(out)


def _check_host(value: object, problems: list[FieldProblem], path: str = "host") -> tuple[str, str] | None:
    if value is _MISSING:
        problems.append(FieldProblem(path, "missing required field: {hostname: NAME, ip: ADDRESS}"))
        return None
    if not isinstance(value, dict):
        problems.append(FieldProblem(path, f"must be a mapping {{hostname: NAME, ip: ADDRESS}}, got {value!r}"))
        return None
    _check_keys(value, _HOST_KEYS, path, problems)
    hostname = value.get("hostname", _MISSING)
    ip = value.get("ip", _MISSING)
    result_name: str | None = None
    result_ip: str | None = None
    if hostname is _MISSING:
        problems.append(
            FieldProblem(f"{path}.hostname", "missing required field: the license server's (or PC's) hostname")
        )
    else:
        problem = hostname_problem(cast(str, hostname))
        if problem:
            problems.append(FieldProblem(f"{path}.hostname", problem))
        else:
            result_name = cast(str, hostname)
    if ip is _MISSING:
        problems.append(FieldProblem(f"{path}.ip", "missing required field: the host's IP address"))
    else:
        try:
            addr = normalize_ip(cast(str, ip))
        except ValueError as exc:
            problems.append(FieldProblem(f"{path}.ip", str(exc)))
        else:
            if addr.is_unspecified or addr.is_multicast:
                problems.append(
                    FieldProblem(f"{path}.ip", f"{ip!r} is not the address of one host; give the host's own address")
                )
            else:
                result_ip = str(addr)
    if result_name is None or result_ip is None:
        return None
    return result_name, result_ip


def _check_expires(value: object, today: date, problems: list[FieldProblem]) -> tuple[bool, date | None]:
    if value is _MISSING or value is None:
        return True, None
    expires: date | None = None
    if isinstance(value, date) and not isinstance(value, datetime):
        expires = value
    elif isinstance(value, str) and DATE_RE.fullmatch(value.strip()):
        with contextlib.suppress(ValueError):  # 2027-02-30 matches the pattern but is no date
            expires = date.fromisoformat(value.strip())
    if expires is None:
        problems.append(
            FieldProblem("expires", f"must be a date like 2027-12-31 (or omitted for no expiry), got {value!r}")
        )
        return False, None
    if expires < today:
        problems.append(
            FieldProblem(
                "expires",
                f"expiry date {expires.isoformat()} is in the past (today is {today.isoformat()}); "
                "use a future date, or omit expires for a license that does not expire",
            )
        )
        return False, None
    return True, expires


def _check_networks(value: object, problems: list[FieldProblem]) -> tuple[str, ...] | None:
    if value is _MISSING or value is None:
        return ()
    if not isinstance(value, list):
        problems.append(
            FieldProblem("site_networks", f"must be a list of networks such as [192.0.2.0/24], got {value!r}")
        )
        return None
    networks: list[str] = []
    ok = True
    for index, item in enumerate(value):
        path = f"site_networks[{index}]"
        if not isinstance(item, str):
            problems.append(FieldProblem(path, f"must be a network such as 192.0.2.0/24, got {item!r}"))
            ok = False
            continue
        try:
            networks.append(str(ipaddress.ip_network(item.strip(), strict=True)))
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                problems.append(FieldProblem(path, f"{item!r} is not a network such as 192.0.2.0/24 ({exc})"))
            else:
                problems.append(FieldProblem(path, f"{item!r} has host bits set; did you mean {str(loose)!r}?"))
            ok = False
    return tuple(networks) if ok else None


def check_request(data: object, today: date) -> tuple[RequestSpec | None, list[FieldProblem]]:
    """Check a registration request (the YAML mapping, already loaded) and report EVERY problem.

    Args:
        data: what ``yaml.safe_load`` returned for the request file.
        today: the issuer's current date (UTC), to refuse an expiry in the past.

    Returns:
        ``(spec, [])`` when the request is good; ``(None, problems)`` otherwise, one ``FieldProblem``
        per problem, in field order, each with the field path (``host.hostname``, ``products[1].count``).
    """
    problems: list[FieldProblem] = []
    if not isinstance(data, dict):
        problems.append(
            FieldProblem(
                "request",
                "must be a YAML mapping with the keys license_type, customer, host, products "
                f"(and optionally expires, site_networks, share, cloud_url); got {type(data).__name__}",
            )
        )
        return None, problems
    _check_keys(data, _REQUEST_KEYS, "", problems)

    license_type = data.get("license_type", _MISSING)
    if license_type is _MISSING:
        problems.append(
            FieldProblem(
                "license_type", "missing required field: multi (floating, served by lmgrd) or single (node-locked PC)"
            )
        )
    elif license_type not in LICENSE_TYPES:
        problems.append(
            FieldProblem(
                "license_type",
                f"unknown license type {license_type!r}: use multi (floating, served by lmgrd) or single "
                f"(node-locked PC){_did_you_mean(str(license_type), LICENSE_TYPES)}",
            )
        )

    customer = data.get("customer", _MISSING)
    if customer is _MISSING:
        problems.append(FieldProblem("customer", "missing required field: the customer's name"))
    else:
        problem = text_field_problem("customer", customer.strip() if isinstance(customer, str) else customer)
        if problem:
            problems.append(FieldProblem("customer", problem))

    servers: tuple[tuple[str, str], ...] = ()
    if "hosts" in data and "host" in data:
        problems.append(FieldProblem("hosts", "give either host: (one license server) or hosts: (an HA license's "
                                     "2 or 3 servers), not both"))
        host = None
    elif "hosts" in data:
        checked = _check_hosts(data["hosts"], license_type, problems)
        host = checked[0] if checked else None
        servers = checked or ()
    else:
        host = _check_host(data.get("host", _MISSING), problems)
    products = _check_products(data.get("products", _MISSING), license_type, problems)
    expires_ok, expires = _check_expires(data.get("expires", _MISSING), today, problems)
    networks = _check_networks(data.get("site_networks", _MISSING), problems)

    share = data.get("share", "user_host")
    if share not in SHARE_MODES:
        problems.append(
            FieldProblem(
                "share",
                f"unknown share mode {share!r}: use user_host (the default: one seat per user and host), "
                f"host (one seat per PC) or none (one seat per checkout){_did_you_mean(str(share), SHARE_MODES)}",
            )
        )

    cloud_url = data.get("cloud_url")
    if cloud_url is not None:
        problem = cloud_url_problem(cloud_url)
        if problem:
            problems.append(FieldProblem("cloud_url", problem))

    if problems or host is None or products is None or networks is None or not expires_ok:
        return None, problems
    spec = RequestSpec(
        license_type=cast(LicenseType, license_type),
        customer=cast(str, customer).strip(),
        hostname=host[0],
        ip=host[1],
        products=products,
        expires=expires,
        site_networks=networks,
        share=cast(ShareMode, share),
        servers=servers,
        cloud_url=cast("str | None", cloud_url),
    )
    return spec, problems
