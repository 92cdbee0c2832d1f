"""The activation service's signed documents: their fields, canonical bytes, JSON form and verification.

Pure: imports only the standard library, msgpack, cryptography and the rest of ``protocol`` (never ``lmgrd`` or
``client_stub``). No sockets, no file access, no clock reads (the caller passes ``now``), no randomness (the
caller passes random bytes) and no private keys: whoever signs computes ``private_key.sign(canonical_bytes(doc))``
and wraps the result with :func:`signed_json`. The HTTP API that carries these documents is ``docs/CLOUD_API.md``.

Six document kinds, each with its own signing domain, so a signature made for one kind never verifies as
another:

========================  ==================================  =============================================
kind                      signed by                           carries
========================  ==================================  =============================================
``activation_request``    the installation key it names       customer ID, hostname, addresses, fingerprint
                                                              parts, installation public key, nonce, sent at,
                                                              mode (``manual`` or ``automatic``)
``activation_certificate`` the vendor key                     customer ID, hostname, fingerprint, installation
                                                              key, issued, valid until, next check-in, the
                                                              rotating check-in token and its sequence number,
                                                              how (``manual`` / ``automatic``), request nonce
``check_in_request``      the installation key on record      customer ID, hostname, addresses, fingerprint,
                                                              installation key, the last token and sequence,
                                                              nonce, sent at
``cloud_revocation``      the vendor key                      customer ID, revoked at, reason, successor
``offline_request``       the installation key it names       as an activation request, for a site without
                                                              internet (a file, small enough for a QR code)
``offline_response``      the vendor key                      an activation certificate with how ``offline``:
                                                              valid until the license's expiry, no token, no
                                                              check-in
========================  ==================================  =============================================

The signed bytes are ``DOMAIN + msgpack(fields)`` where ``fields`` holds ``format``, ``kind`` and every field
of the document, every mapping with its keys sorted (the same scheme as :mod:`protocol.license`). On the wire
and in files a signed document is the JSON object ``{"document": {fields}, "signature": "ed25519:BASE64"}``;
verification rebuilds the document from ``fields`` (refusing unknown, missing and ill-typed ones), recomputes
the bytes and checks the signature, so JSON key order and whitespace never matter.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeVar, cast

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.errors import ErrorCode, ProtocolError
from protocol.fingerprint import Fingerprint
from protocol.license import SIGNATURE_BYTES, customer_id_problem, format_timestamp, parse_timestamp
from protocol.validation import MAX_MESSAGE_LENGTH, MAX_TEXT, hostname_problem, normalize_ip, text_field_problem

__all__ = [
    "ACTIVATION_CERTIFICATE_SIGNING_DOMAIN",
    "ACTIVATION_REQUEST_SIGNING_DOMAIN",
    "CHECK_IN_REQUEST_SIGNING_DOMAIN",
    "CLOUD_FORMAT",
    "CLOUD_REVOCATION_SIGNING_DOMAIN",
    "HOW",
    "MAX_ADDRESSES",
    "MAX_BODY_BYTES",
    "MAX_MACS",
    "MAX_NONCE_CHARS",
    "MIN_NONCE_BYTES",
    "MODES",
    "OFFLINE_REQUEST_SIGNING_DOMAIN",
    "OFFLINE_RESPONSE_SIGNING_DOMAIN",
    "ActivationCertificate",
    "ActivationRequest",
    "Answer",
    "CheckInRequest",
    "CloudDocumentError",
    "CloudRevocation",
    "Document",
    "How",
    "Mode",
    "OfflineRequest",
    "canonical_bytes",
    "document_fields",
    "dumps_document",
    "fingerprint_from_json",
    "fingerprint_to_json",
    "installation_key_text",
    "load_installation_key",
    "loads_document",
    "nonce_text",
    "parse_answer",
    "parse_document",
    "signed_json",
    "verify_activation_request",
    "verify_certificate",
    "verify_check_in_request",
    "verify_cloud_revocation",
    "verify_offline_request",
]

Mode = Literal["manual", "automatic"]
How = Literal["manual", "automatic", "offline"]

#: The document format this module writes and reads.
CLOUD_FORMAT: Final = 1
#: Domain-separation prefixes of the signed bytes, one per kind (never change them for format 1).
ACTIVATION_REQUEST_SIGNING_DOMAIN: Final = b"lmgrd cloud activation request v1\x00"
ACTIVATION_CERTIFICATE_SIGNING_DOMAIN: Final = b"lmgrd cloud activation certificate v1\x00"
CHECK_IN_REQUEST_SIGNING_DOMAIN: Final = b"lmgrd cloud check-in request v1\x00"
CLOUD_REVOCATION_SIGNING_DOMAIN: Final = b"lmgrd cloud revocation v1\x00"
OFFLINE_REQUEST_SIGNING_DOMAIN: Final = b"lmgrd cloud offline request v1\x00"
OFFLINE_RESPONSE_SIGNING_DOMAIN: Final = b"lmgrd cloud offline response v1\x00"

#: What an activation request asks for: ``manual`` (an admin ran ``lmutil activate`` / ``lmclient activate``:
#: activate now) or ``automatic`` (the daemon's or the client stub's poll: activate once the license is 24 h old
#: by the service's clock).
MODES: Final[tuple[Mode, ...]] = ("manual", "automatic")
#: How a certificate came to be.
HOW: Final[tuple[How, ...]] = ("manual", "automatic", "offline")

#: Largest HTTP request body the service reads, and the largest document JSON this module parses (bytes).
MAX_BODY_BYTES: Final = 16 * 1024
#: Addresses an installation may report, and MAC digests in one fingerprint.
MAX_ADDRESSES: Final = 64
MAX_MACS: Final = 64
#: Nonces and tokens: base64url without padding, 16 to 64 random bytes.
MIN_NONCE_BYTES: Final = 16
MAX_NONCE_CHARS: Final = 86
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_PREFIX = "ed25519:"


class CloudDocumentError(ProtocolError):
    """A cloud document (request, certificate, revocation, answer) is malformed, or its signature fails.

    ``field`` names the offending field (``document.fingerprint.macs[2]``, ``signature``) or is ``""``;
    ``str(error)`` and ``error.message`` say what is wrong. The code is BAD_REQUEST for a malformed document
    and LICENSE_INVALID for a signature that does not verify.
    """

    def __init__(self, field: str, problem: str, code: ErrorCode = ErrorCode.BAD_REQUEST, hint: str = "") -> None:
        super().__init__(code, f"{field}: {problem}" if field else problem, hint)
        self.field = field
        self.problem = problem


# --------------------------------------------------------------------------------------------------
# Field helpers


def nonce_text(random_bytes: bytes) -> str:
    """A nonce or token from fresh random bytes (pass ``secrets.token_bytes(16)`` or more): base64url, no padding.

    Raises:
        ValueError: fewer than 16 or more than 64 bytes.
    """
    if not isinstance(random_bytes, bytes) or not MIN_NONCE_BYTES <= len(random_bytes) <= 64:
        raise ValueError(f"a nonce needs {MIN_NONCE_BYTES} to 64 random bytes")
    return base64.urlsafe_b64encode(random_bytes).rstrip(b"=").decode("ascii")


def installation_key_text(public_key: Ed25519PublicKey) -> str:
    """An installation's Ed25519 public key as the documents carry it: base64 of the 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def load_installation_key(text: str, field: str = "installation_key") -> Ed25519PublicKey:
    """The public key from :func:`installation_key_text`'s form. Raises CloudDocumentError naming ``field``."""
    if not isinstance(text, str) or len(text) != 44:
        raise CloudDocumentError(field, f"must be the base64 of a 32-byte Ed25519 public key, got {text!r:.80}")
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise CloudDocumentError(field, f"{text!r} is not the base64 of a 32-byte Ed25519 public key") from None


def fingerprint_to_json(fp: Fingerprint) -> dict[str, Any]:
    """``{"host": HEX, "machine": HEX, "macs": [HEX, ...]}`` (MACs sorted): the hashed parts, never raw values."""
    return {"host": fp.host, "machine": fp.machine, "macs": sorted(fp.macs)}


def fingerprint_from_json(value: object, field: str = "fingerprint") -> Fingerprint:
    """Read :func:`fingerprint_to_json`'s form. Raises CloudDocumentError naming the field."""
    mapping = _mapping(value, field, ("host", "machine", "macs"))
    host = _hex_digest(mapping, "host", field)
    machine = _hex_digest(mapping, "machine", field)
    macs = mapping["macs"]
    if not isinstance(macs, list) or len(macs) > MAX_MACS:
        raise CloudDocumentError(f"{field}.macs", f"must be a list of at most {MAX_MACS} sha256 hex digests")
    for i, mac in enumerate(macs):
        if not isinstance(mac, str) or not _HEX64_RE.fullmatch(mac):
            raise CloudDocumentError(f"{field}.macs[{i}]", f"must be a sha256 hex digest, got {mac!r:.80}")
    if len(set(macs)) != len(macs):
        raise CloudDocumentError(f"{field}.macs", "lists a MAC digest twice")
    return Fingerprint(host, machine, frozenset(macs))


def _hex_digest(mapping: Mapping[str, object], key: str, field: str) -> str:
    value = mapping[key]
    if not isinstance(value, str) or not _HEX64_RE.fullmatch(value):
        raise CloudDocumentError(f"{field}.{key}", f"must be a sha256 hex digest (64 of 0-9a-f), got {value!r:.80}")
    return value


def _mapping(value: object, field: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CloudDocumentError(field, f"must be a JSON object, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in keys and k not in optional)
    if unknown:
        raise CloudDocumentError(field, f"unknown field {unknown[0]!r}; the fields are {', '.join(keys)}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise CloudDocumentError(field, f"missing field {missing[0]!r}")
    return cast(dict[str, Any], value)


def _str(value: object, field: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise CloudDocumentError(field, f"must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise CloudDocumentError(field, f"is {len(value)} characters long, more than the {limit} allowed")
    return value


def _timestamp(value: object, field: str) -> datetime:
    text = _str(value, field, 32)
    moment = parse_timestamp(text)
    if moment is None:
        raise CloudDocumentError(field, f"{text!r} is not a UTC time like 2026-01-31T09:30:00Z")
    return moment


def _optional_timestamp(value: object, field: str) -> datetime | None:
    return None if value is None else _timestamp(value, field)


def _random_text(value: object, field: str) -> str:
    text = _str(value, field, MAX_NONCE_CHARS)
    if not _B64URL_RE.fullmatch(text) or len(text) < 22:
        raise CloudDocumentError(field, f"must be base64url text of at least {MIN_NONCE_BYTES} random bytes")
    return text


def _customer_id(value: object, field: str = "customer_id") -> str:
    problem = customer_id_problem(value)
    if problem:
        raise CloudDocumentError(field, problem)
    return cast(str, value)


def _hostname(value: object, field: str = "hostname") -> str:
    text = _str(value, field)
    problem = hostname_problem(text)
    if problem:
        raise CloudDocumentError(field, problem)
    return text


def _addresses(value: object, field: str = "addresses") -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
        raise CloudDocumentError(field, f"must be a list of at most {MAX_ADDRESSES} IP addresses")
    out: list[str] = []
    for i, item in enumerate(value):
        text = _str(item, f"{field}[{i}]", 64)
        try:
            normalize_ip(text)
        except ValueError as exc:
            raise CloudDocumentError(f"{field}[{i}]", str(exc)) from None
        out.append(text)
    return tuple(out)


def _choice(value: object, field: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise CloudDocumentError(field, f"must be one of {', '.join(choices)}, got {value!r:.80}")
    return value


def _sequence(value: object, field: str = "sequence") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
        raise CloudDocumentError(field, f"must be a whole number 0..2**53, got {value!r:.80}")
    return value


def _key_text(value: object, field: str) -> str:
    load_installation_key(cast(str, value), field)
    return cast(str, value)


def _reason(value: object, field: str) -> str:
    text = _str(value, field, MAX_MESSAGE_LENGTH)
    problem = text_field_problem("reason", text)
    if problem:
        raise CloudDocumentError(field, problem)
    return text


def _aware(moment: object, field: str) -> None:
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise ValueError(f"{field} must be a timezone-aware datetime, got {moment!r}")


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------------------------------
# The documents


def _optional(read: Any) -> Any:
    return lambda v, f: None if v is None else read(v, f)


@dataclasses.dataclass(frozen=True, slots=True)
class _Signed:
    """Base of the signed documents. Each field's metadata ``read`` is its reader
    ``read(value, field) -> value``, how a verifier checks and rebuilds it; at construction the
    times are made whole seconds in UTC, then every field is checked as a verifier would check it."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["read"] is _timestamp or (f.metadata["read"] is _optional_timestamp and value is not None):
                _aware(value, f.name)
                object.__setattr__(self, f.name, _utc(value))
        _from_fields(cast("type[Any]", type(self)), document_fields(cast(Document, self)))


@dataclasses.dataclass(frozen=True, slots=True)
class _MachineDocument(_Signed):
    """The fields with which an installation names itself, first in every request."""

    customer_id: str = dataclasses.field(metadata={"read": _customer_id})
    hostname: str = dataclasses.field(metadata={"read": _hostname})
    addresses: tuple[str, ...] = dataclasses.field(metadata={"read": _addresses})
    fingerprint: Fingerprint = dataclasses.field(metadata={"read": fingerprint_from_json})
    installation_key: str = dataclasses.field(metadata={"read": _key_text})


@dataclasses.dataclass(frozen=True, slots=True)
class ActivationRequest(_MachineDocument):
    """An installation asks the service to activate ``customer_id`` on this machine (signed by ``installation_key``)."""

    nonce: str = dataclasses.field(metadata={"read": _random_text})
    sent_at: datetime = dataclasses.field(metadata={"read": _timestamp})
    mode: Mode = dataclasses.field(metadata={"read": lambda v, f: _choice(v, f, MODES)})


@dataclasses.dataclass(frozen=True, slots=True)
class OfflineRequest(_MachineDocument):
    """The same request for a site without internet: a file the vendor answers with ``lmcloud offline-response``."""

    nonce: str = dataclasses.field(metadata={"read": _random_text})
    sent_at: datetime = dataclasses.field(metadata={"read": _timestamp})


@dataclasses.dataclass(frozen=True, slots=True)
class CheckInRequest(_MachineDocument):
    """An active installation renews its certificate, presenting the last token it was given."""

    token: str = dataclasses.field(metadata={"read": _random_text})
    sequence: int = dataclasses.field(metadata={"read": _sequence})
    nonce: str = dataclasses.field(metadata={"read": _random_text})
    sent_at: datetime = dataclasses.field(metadata={"read": _timestamp})


@dataclasses.dataclass(frozen=True, slots=True)
class ActivationCertificate(_Signed):
    """The vendor's statement that ``customer_id`` is active on the machine ``fingerprint``.

    Online certificates (``how`` manual or automatic) carry the check-in ``token`` and its ``sequence``
    (1 for the first certificate of an activation, +1 at every check-in), ``valid_until`` and
    ``next_check_in``. An offline certificate (``how`` offline, the document kind ``offline_response``) has
    ``token`` ``None``, ``sequence`` 0 and ``next_check_in`` ``None``, and is valid until the license's expiry
    (``valid_until`` ``None`` for a license that never expires).
    """

    customer_id: str = dataclasses.field(metadata={"read": _customer_id})
    hostname: str = dataclasses.field(metadata={"read": _hostname})
    fingerprint: Fingerprint = dataclasses.field(metadata={"read": fingerprint_from_json})
    installation_key: str = dataclasses.field(metadata={"read": _key_text})
    issued_at: datetime = dataclasses.field(metadata={"read": _timestamp})
    valid_until: datetime | None = dataclasses.field(metadata={"read": _optional_timestamp})
    next_check_in: datetime | None = dataclasses.field(metadata={"read": _optional_timestamp})
    token: str | None = dataclasses.field(metadata={"read": _optional(_random_text)})
    sequence: int = dataclasses.field(metadata={"read": _sequence})
    how: How = dataclasses.field(metadata={"read": lambda v, f: _choice(v, f, HOW)})
    request_nonce: str = dataclasses.field(metadata={"read": _random_text})

    @property
    def offline(self) -> bool:
        """An offline certificate: no check-in, valid until the license's expiry."""
        return self.how == "offline"

    def valid_at(self, now: datetime) -> bool:
        """``now`` (aware) is no later than ``valid_until`` (always true for ``None``: an offline certificate
        of a license that never expires). There is no lower bound: a machine whose clock is behind the
        service's must not lose a certificate it was just given."""
        if now.utcoffset() is None:
            raise ValueError("valid_at needs a timezone-aware 'now'")
        return self.valid_until is None or now <= self.valid_until


@dataclasses.dataclass(frozen=True, slots=True)
class CloudRevocation(_Signed):
    """The vendor's signed statement, delivered at check-in, that ``customer_id`` must no longer be served."""

    customer_id: str = dataclasses.field(metadata={"read": _customer_id})
    revoked_at: datetime = dataclasses.field(metadata={"read": _timestamp})
    reason: str = dataclasses.field(metadata={"read": _reason})
    replaced_by: str | None = dataclasses.field(metadata={"read": _optional(_customer_id)})


Document = ActivationRequest | OfflineRequest | CheckInRequest | ActivationCertificate | CloudRevocation
_D = TypeVar("_D", ActivationRequest, OfflineRequest, CheckInRequest, ActivationCertificate, CloudRevocation)

_KINDS: dict[type[Any], str] = {
    ActivationRequest: "activation_request",
    OfflineRequest: "offline_request",
    CheckInRequest: "check_in_request",
    ActivationCertificate: "activation_certificate",  # "offline_response" when how is offline
    CloudRevocation: "cloud_revocation",
}
_DOMAINS: dict[str, bytes] = {
    "activation_request": ACTIVATION_REQUEST_SIGNING_DOMAIN,
    "offline_request": OFFLINE_REQUEST_SIGNING_DOMAIN,
    "check_in_request": CHECK_IN_REQUEST_SIGNING_DOMAIN,
    "activation_certificate": ACTIVATION_CERTIFICATE_SIGNING_DOMAIN,
    "offline_response": OFFLINE_RESPONSE_SIGNING_DOMAIN,
    "cloud_revocation": CLOUD_REVOCATION_SIGNING_DOMAIN,
}


def _kind_of(doc: Document) -> str:
    if isinstance(doc, ActivationCertificate) and doc.how == "offline":
        return "offline_response"
    return _KINDS[type(doc)]


def document_fields(doc: Document) -> dict[str, Any]:
    """The JSON object of ``doc`` (``format``, ``kind`` and every field), as it is signed and sent."""
    fields: dict[str, Any] = {"format": CLOUD_FORMAT, "kind": _kind_of(doc)}
    for f in dataclasses.fields(doc):
        value = getattr(doc, f.name)
        if isinstance(value, datetime):
            value = format_timestamp(value)
        elif isinstance(value, Fingerprint):
            value = fingerprint_to_json(value)
        elif isinstance(value, tuple):
            value = list(value)
        fields[f.name] = value
    return fields


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def canonical_bytes(doc: Document) -> bytes:
    """The exact bytes a signature of ``doc`` covers: its kind's domain + msgpack of its fields, keys sorted."""
    fields = document_fields(doc)
    return _DOMAINS[fields["kind"]] + cast(bytes, msgpack.packb(_sorted(fields), use_bin_type=True))


def signed_json(doc: Document, signature: bytes) -> dict[str, Any]:
    """The wire and file form: ``{"document": document_fields(doc), "signature": "ed25519:BASE64"}``."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"an Ed25519 signature is {SIGNATURE_BYTES} bytes")
    return {"document": document_fields(doc), "signature": _SIGNATURE_PREFIX + base64.b64encode(signature).decode()}


def dumps_document(signed: Mapping[str, Any]) -> str:
    """Compact JSON text of a signed document (what the offline request and response files hold)."""
    return json.dumps(signed, separators=(",", ":"), sort_keys=True) + "\n"


def loads_document(text: str | bytes, source: str) -> Any:
    """Decode a signed document's JSON text (a file or a body). Raises CloudDocumentError naming ``source``."""
    if len(text) > MAX_BODY_BYTES:
        raise CloudDocumentError(source, f"is {len(text)} bytes, more than the {MAX_BODY_BYTES} a document can be")
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CloudDocumentError(source, f"is not valid JSON ({exc})") from None


def _from_fields(cls: type[_D], fields: object, where: str = "document") -> _D:
    readers: dict[str, Any] = {f.name: f.metadata["read"] for f in dataclasses.fields(cls)}
    mapping = _mapping(fields, where, ("format", "kind", *readers))
    if mapping["format"] != CLOUD_FORMAT or isinstance(mapping["format"], bool):
        raise CloudDocumentError(f"{where}.format", f"unsupported format {mapping['format']!r:.40}; this version "
                                 f"reads format {CLOUD_FORMAT}")
    values = {name: read(mapping[name], f"{where}.{name}") for name, read in readers.items()}
    expected = _KINDS[cls]
    kind = mapping["kind"]
    if cls is ActivationCertificate:
        want = "offline_response" if values["how"] == "offline" else "activation_certificate"
        if kind != want:
            raise CloudDocumentError(f"{where}.kind", f"a certificate with how {values['how']!r} is of kind {want!r}, "
                                     f"got {kind!r:.40}")
        _check_certificate_shape(values, where)
    elif kind != expected:
        raise CloudDocumentError(f"{where}.kind", f"expected {expected!r}, got {kind!r:.40}")
    return _build(cls, values)


def _check_certificate_shape(values: dict[str, Any], where: str) -> None:
    offline = values["how"] == "offline"
    if offline and (values["token"] is not None or values["next_check_in"] is not None or values["sequence"] != 0):
        raise CloudDocumentError(where, "an offline certificate has token null, sequence 0 and next_check_in null")
    if not offline and (values["token"] is None or values["valid_until"] is None or values["next_check_in"] is None
                        or values["sequence"] < 1):
        raise CloudDocumentError(where, "an online certificate has a token, a sequence >= 1, valid_until and "
                                 "next_check_in")
    if values["valid_until"] is not None and values["valid_until"] < values["issued_at"]:
        raise CloudDocumentError(f"{where}.valid_until", "is before issued_at")


def _build(cls: type[_D], values: dict[str, Any]) -> _D:
    # Bypass __post_init__ (which calls back here): the values were just read and checked field by field.
    obj = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj


def parse_document(data: object, cls: type[_D], where: str = "request") -> tuple[_D, bytes]:
    """Read a signed document of class ``cls`` from its decoded JSON WITHOUT checking the signature.

    Args:
        data: the decoded JSON (``{"document": {...}, "signature": "ed25519:..."}``).
        cls: the expected document class.
        where: the name used in error messages (``request``, a file path).

    Returns:
        The document and its 64-byte signature.

    Raises:
        CloudDocumentError: BAD_REQUEST naming the first bad field (``request.document.fingerprint.host``).
    """
    envelope = _mapping(data, where, ("document", "signature"))
    doc = _from_fields(cls, envelope["document"], f"{where}.document")
    text = _str(envelope["signature"], f"{where}.signature", 200)
    if not text.startswith(_SIGNATURE_PREFIX):
        raise CloudDocumentError(f"{where}.signature", "must start with 'ed25519:'")
    try:
        signature = base64.b64decode(text[len(_SIGNATURE_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise CloudDocumentError(f"{where}.signature", "is not valid base64") from None
    if len(signature) != SIGNATURE_BYTES:
        raise CloudDocumentError(f"{where}.signature", f"is {len(signature)} bytes, an Ed25519 signature is 64")
    return doc, signature


def _verify(doc: Document, signature: bytes, key: Ed25519PublicKey, where: str, whose: str) -> None:
    try:
        key.verify(signature, canonical_bytes(doc))
    except InvalidSignature:
        raise CloudDocumentError(
            f"{where}.signature", f"does not verify against {whose}: the document was changed after it was signed, "
            "or signed with another key", ErrorCode.LICENSE_INVALID) from None


def verify_activation_request(data: object, where: str = "request") -> ActivationRequest:
    """Parse an activation request and check it is signed by the installation key it carries.

    Raises:
        CloudDocumentError: malformed (BAD_REQUEST) or the signature fails (LICENSE_INVALID).
    """
    doc, sig = parse_document(data, ActivationRequest, where)
    _verify(doc, sig, load_installation_key(doc.installation_key), where, "the installation key it names")
    return doc


def verify_offline_request(data: object, where: str = "offline request") -> OfflineRequest:
    """Parse an offline request and check it is signed by the installation key it carries. Raises as above."""
    doc, sig = parse_document(data, OfflineRequest, where)
    _verify(doc, sig, load_installation_key(doc.installation_key), where, "the installation key it names")
    return doc


def verify_check_in_request(data: object, installation_key: str, where: str = "request") -> CheckInRequest:
    """Parse a check-in request and check it is signed by ``installation_key`` (the one on record).

    A request naming another installation key than ``installation_key`` is refused before its signature.

    Raises:
        CloudDocumentError: malformed, another installation's key (BAD_REQUEST), or a bad signature
            (LICENSE_INVALID).
    """
    doc, sig = parse_document(data, CheckInRequest, where)
    if doc.installation_key != installation_key:
        raise CloudDocumentError(f"{where}.document.installation_key", "is not the installation key this customer "
                                 "ID was activated with")
    _verify(doc, sig, load_installation_key(installation_key), where, "the installation key on record")
    return doc


def verify_certificate(data: object, vendor_key: Ed25519PublicKey, where: str = "certificate"
                       ) -> ActivationCertificate:
    """Parse an activation certificate or an offline response and check the vendor's signature.

    Raises:
        CloudDocumentError: malformed (BAD_REQUEST) or not signed by ``vendor_key`` (LICENSE_INVALID).
    """
    doc, sig = parse_document(data, ActivationCertificate, where)
    _verify(doc, sig, vendor_key, where, "the vendor key")
    return doc


def verify_cloud_revocation(data: object, vendor_key: Ed25519PublicKey, where: str = "revocation"
                            ) -> CloudRevocation:
    """Parse a cloud revocation and check the vendor's signature. Raises CloudDocumentError as above."""
    doc, sig = parse_document(data, CloudRevocation, where)
    _verify(doc, sig, vendor_key, where, "the vendor key")
    return doc


# --------------------------------------------------------------------------------------------------
# The service's answers (docs/CLOUD_API.md), read by the daemon and the client stub


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """What the service said to an activation or a check-in, after verification.

    ``status`` is ``active`` (``certificate`` set and verified), ``pending`` (``activates_at`` set: when the
    service will activate it by itself), ``revoked`` (``revocation`` set and verified) or ``error`` (``code``,
    ``message``, ``hint`` from the body; ``retry_after_seconds`` on RATE_LIMITED). ``code`` is set for every
    status but ``active`` (LICENSE_NOT_ACTIVATED for pending, LICENSE_REVOKED for revoked). ``conflict_hostname``
    and ``conflict_since`` name the other machine on ACTIVATION_CONFLICT. ``http_status`` is the HTTP code.
    """

    status: Literal["active", "pending", "revoked", "error"]
    http_status: int
    code: ErrorCode | None = None
    message: str = ""
    hint: str = ""
    certificate: ActivationCertificate | None = None
    revocation: CloudRevocation | None = None
    activates_at: datetime | None = None
    retry_after_seconds: float | None = None
    conflict_hostname: str | None = None
    conflict_since: datetime | None = None

    @property
    def service_said_no(self) -> bool:
        """A decision by the service (4xx, revoked, pending), as opposed to a fault to retry (5xx, 429)."""
        return self.status != "active" and self.http_status < 500 and self.code is not ErrorCode.RATE_LIMITED


def parse_answer(http_status: int, body: bytes, vendor_key: Ed25519PublicKey) -> Answer:
    """Read the service's reply to ``POST /v1/activations`` or ``POST /v1/check-ins``.

    Args:
        http_status: the HTTP status code.
        body: the response body (JSON).
        vendor_key: the vendor public key; certificates and revocations are verified against it.

    Returns:
        The answer. A signed part that fails verification is never returned as trusted.

    Raises:
        CloudDocumentError: the body is not the API's JSON, or a certificate or revocation in it is malformed
            or its signature fails (LICENSE_INVALID): treat as "could not reach the service" (a proxy or an
            impostor answered), never as the service's decision.
    """
    data = loads_document(body, "response")
    mapping = _mapping(data, "response", ("status",),
                       ("certificate", "revocation", "error", "activates_at", "retry_after_seconds", "conflict"))
    status = _choice(mapping["status"], "response.status", ("active", "pending", "revoked", "error"))
    code: ErrorCode | None = None
    message = hint = ""
    if "error" in mapping:
        err = _mapping(mapping["error"], "response.error", ("code", "message"), ("hint",))
        try:
            code = ErrorCode(err["code"])
        except ValueError:
            code = ErrorCode.INTERNAL_ERROR
        message = _str(err["message"], "response.error.message", MAX_MESSAGE_LENGTH)
        hint = _str(err.get("hint", ""), "response.error.hint", MAX_MESSAGE_LENGTH)
    if status == "active":
        cert = verify_certificate(mapping.get("certificate"), vendor_key, "response.certificate")
        return Answer("active", http_status, certificate=cert)
    if code is None:
        raise CloudDocumentError("response.error", f"a {status!r} answer carries an error object")
    if status == "revoked":
        rev = verify_cloud_revocation(mapping.get("revocation"), vendor_key, "response.revocation")
        return Answer("revoked", http_status, code, message, hint, revocation=rev)
    if status == "pending":
        return Answer("pending", http_status, code, message, hint,
                      activates_at=_timestamp(mapping.get("activates_at"), "response.activates_at"))
    retry = mapping.get("retry_after_seconds")
    if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int | float) or retry < 0):
        raise CloudDocumentError("response.retry_after_seconds", "must be a number >= 0")
    conflict_host: str | None = None
    conflict_since: datetime | None = None
    if "conflict" in mapping:
        conflict = _mapping(mapping["conflict"], "response.conflict", ("hostname", "since"))
        conflict_host = _str(conflict["hostname"], "response.conflict.hostname")
        conflict_since = _timestamp(conflict["since"], "response.conflict.since")
    return Answer("error", http_status, code, message, hint,
                  retry_after_seconds=float(retry) if retry is not None else None,
                  conflict_hostname=conflict_host, conflict_since=conflict_since)
