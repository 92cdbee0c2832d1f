"""Single-user (node-locked) mode: check a license file on this PC, with no license server.

Imports ``protocol``, ``cryptography`` and the standard library (this PC's hostname and addresses come
from :mod:`client_stub.machine`); never ``lmgrd``. Checks, in the handbook's order: the signature against
the vendor public key the product ships with (never a key carried in the license file, which would prove
nothing), that the license is single-user, that it belongs to THIS PC (hostname and addresses as the
operating system reports them; a hostname the caller passes to the client is never used here, as that
would be a bypass), that it is activated on this PC (:mod:`client_stub.activation`), then expiry, product
and version (:func:`protocol.license.evaluate_use`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client_stub.activation import check_activation
from client_stub.cloud import check_cloud_activation
from client_stub.errors import LicenseError, SeatDenied
from client_stub.machine import this_machine
from protocol import ErrorCode, ProtocolError
from protocol.license import License, evaluate_use, host_mismatch, load_public_key, verify_license
from protocol.validation import hostname_problem

__all__ = ["ENV_VENDOR_KEY", "VendorKey", "check_license_file", "load_vendor_key", "verify_for_this_pc"]

ENV_VENDOR_KEY = "LM_VENDOR_KEY"
_MAX_KEY_BYTES = 64 * 1024
_MAX_LICENSE_BYTES = 4 * 1024 * 1024

#: What a product may pass as ``vendor_key=``: a path to vendor.pub, its PEM bytes, or a loaded key.
VendorKey = str | os.PathLike[str] | bytes | Ed25519PublicKey

_KEY_HINT = (
    f"pass the vendor public key the product ships with, as vendor_key=\"/path/to/vendor.pub\" (or its PEM "
    f"bytes), or set the environment variable {ENV_VENDOR_KEY}=/path/to/vendor.pub"
)


def _invalid(message: str, hint: str = "") -> LicenseError:
    return LicenseError(ErrorCode.LICENSE_INVALID, message, hint)


def load_vendor_key(vendor_key: VendorKey | None, environ: Mapping[str, str] | None = None) -> Ed25519PublicKey:
    """Load the vendor public key: the argument, else the file named by ``LM_VENDOR_KEY``.

    Args:
        vendor_key: a path to ``vendor.pub``, its PEM bytes, an ``Ed25519PublicKey``, or ``None``.
        environ: the environment to read (default ``os.environ``).

    Returns:
        The key.

    Raises:
        LicenseError: LICENSE_INVALID if no key is given anywhere, the file cannot be read, or it is not
            an Ed25519 public key; the message says how to supply one.
    """
    if isinstance(vendor_key, Ed25519PublicKey):
        return vendor_key
    if isinstance(vendor_key, bytes):
        pem, source = vendor_key, "the vendor_key bytes"
    else:
        env = os.environ if environ is None else environ
        path: str | os.PathLike[str] | None = vendor_key
        if path is None:
            path = env.get(ENV_VENDOR_KEY, "").strip() or None
        if path is None:
            raise _invalid("a single-user license is checked against the vendor public key, and none was given",
                           _KEY_HINT)
        source = os.fspath(path)
        try:
            with open(path, "rb") as f:
                pem = f.read(_MAX_KEY_BYTES + 1)
        except OSError as exc:
            raise _invalid(f"cannot read the vendor public key {source}: {exc.strerror or exc}", _KEY_HINT) from None
        if len(pem) > _MAX_KEY_BYTES:
            raise _invalid(f"{source} is far too large to be a vendor public key", _KEY_HINT)
    try:
        return load_public_key(pem, source)
    except ProtocolError as exc:
        raise _invalid(exc.message, exc.hint or _KEY_HINT) from None


def _read_license(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_LICENSE_BYTES + 1)
    except OSError as exc:
        raise _invalid(f"cannot read the license file {path}: {exc.strerror or exc}",
                       "check the path and its permissions, or ask the vendor for the license file") from None
    if len(data) > _MAX_LICENSE_BYTES:
        raise _invalid(f"{path} is far too large to be a license file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); it is damaged or not a "
                       "license file") from None


def check_license_file(path: Path, product: str, version: str, public_key: Ed25519PublicKey,
                       now: datetime | None = None) -> License:
    """Decide, on this PC, whether ``product`` at ``version`` may run under the license file at ``path``.

    Args:
        path: the single-user license file.
        product: the product name.
        version: the product's version (dotted).
        public_key: the vendor public key (see :func:`load_vendor_key`).
        now: the current time (timezone-aware; default: the system clock). Only tests pass it.

    Returns:
        The verified license.

    Raises:
        LicenseError: LICENSE_INVALID: unreadable, tampered, unsigned or signed by another key, or a
            multi-user license (which needs a license server); INVALID_HOSTNAME: this PC's name cannot be
            licensed.
        SeatDenied: HOST_NOT_LICENSED (naming both hosts), LICENSE_NOT_ACTIVATED (issued less than 24 h
            ago and not activated with ``lmclient activate``), LICENSE_MOVED, LICENSE_EXPIRED, UNKNOWN_PRODUCT,
            VERSION_NOT_PERMITTED, BAD_REQUEST (version not dotted).
    """
    source = os.fspath(path)
    lic = verify_for_this_pc(path, public_key)
    now = now if now is not None else datetime.now(UTC)
    if lic.cloud_url is not None:  # the vendor's activation service decides (client_stub.cloud)
        check_cloud_activation(lic, source, public_key, now)
    else:
        check_activation(lic, source, now)  # after signature and host, before expiry/product/version
    decision = evaluate_use(lic, product, version, now)
    if decision is not None:
        code, message = decision
        raise SeatDenied(code, f"{source}: {message}")
    return lic


def verify_for_this_pc(path: Path, public_key: Ed25519PublicKey) -> License:
    """The checks that do not depend on the product or the time: the signature, that the license is
    single-user, and that it belongs to this PC (as the operating system reports it).

    Raises:
        LicenseError: LICENSE_INVALID (unreadable, tampered, multi-user), INVALID_HOSTNAME.
        SeatDenied: HOST_NOT_LICENSED, naming both hosts.
    """
    source = os.fspath(path)
    try:
        lic = verify_license(_read_license(path), public_key, source)
    except ProtocolError as exc:
        raise _invalid(exc.message, exc.hint) from None
    if lic.license_type != "single":
        raise _invalid(
            f"{source} is a multi-user (floating) license for customer ID {lic.customer_id}; it must be served "
            f"by a license server, not used as a single-user license file",
            f"start lmgrd with it on {lic.hostname} and point the product at the server (PORT@{lic.hostname}, "
            "e.g. with the LM_LICENSE_SERVER environment variable)",
        )
    # Always the OS's view of this PC: a hostname override given to the client must not unlock a license.
    hostname, addresses = this_machine()
    problem = hostname_problem(hostname)
    if problem:
        raise LicenseError(ErrorCode.INVALID_HOSTNAME,
                           f"this PC cannot hold a single-user license: {problem}; use ASCII letters, digits "
                           "and hyphens in the computer name")
    mismatch = host_mismatch(lic, hostname, addresses)
    if mismatch:
        raise SeatDenied(
            ErrorCode.HOST_NOT_LICENSED,
            f"{source} is node-locked to another PC: " + "; ".join(mismatch),
            f"use this license on {lic.hostname} ({lic.ip}) only, or ask the vendor for a license issued to "
            f"this PC ({hostname})",
        )
    return lic
