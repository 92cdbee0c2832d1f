"""The daemon's side of licenses: read the files, learn this host's identity, say what cannot be served.

The pure work (parsing, signature checks, host comparison) lives in ``protocol.license``; this module
adds the file system and the operating system (``socket.gethostname()`` and ``psutil.net_if_addrs()``).
Never imports ``client_stub``.

Errors: every failure to read or trust a file raises ``protocol.license.LicenseFileError`` (code
LICENSE_INVALID) or, for a key file, ``protocol.license.VendorKeyError``; both are
``protocol.errors.ProtocolError`` and their message starts with the file's path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lmgrd import LmgrdError
from lmgrd.config import DaemonConfig
from lmgrd.core.licensing import Licensing, Refusal, revocation_reason
from lmgrd.core.site import parse_networks
from lmgrd.storage.activations import open_activations
from lmgrd.storage.cloud import open_cloud
from lmgrd.storage.host import this_fingerprint
from protocol.errors import ErrorCode, ProtocolError
from protocol.license import (
    MAX_LICENSE_TEXT_CHARS,
    License,
    LicenseFileError,
    Revocation,
    VendorKeyError,
    host_mismatch,
    load_public_key,
    verify_license,
    verify_revocation,
    verify_revocation_list,
)

__all__ = [
    "HostIdentity",
    "license_problems_for_daemon",
    "load_licensing",
    "load_revocations",
    "read_license_file",
    "read_public_key_file",
    "read_revocation_file",
    "read_revocation_list",
    "revocation_files",
    "state_dir",
    "this_host",
]

logger = logging.getLogger(__name__)

# A key file is a few hundred bytes; a license well under 100 kB. Read a little more than the limit
# so an oversized file is reported as such rather than silently truncated.
_MAX_KEY_FILE_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class HostIdentity:
    """This machine as the operating system reports it: its hostname and every address (loopback too)."""

    hostname: str
    addresses: tuple[str, ...]


def _read_text(path: str | os.PathLike[str], what: str) -> str:
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read(MAX_LICENSE_TEXT_CHARS * 4 + 1)
    except OSError as exc:
        raise LicenseFileError(
            source, f"cannot read the {what} file: {exc.strerror or exc}", "check the path and its permissions"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LicenseFileError(
            source,
            f"the {what} file is not UTF-8 text (bad byte at offset {exc.start}); it is damaged or not a {what}",
        ) from None


def read_license_file(path: str | os.PathLike[str], public_key: Ed25519PublicKey) -> License:
    """Read and verify one license file.

    Raises:
        LicenseFileError: unreadable, not UTF-8, unparsable, unsigned, or the signature does not verify;
            the message names ``path``.
    """
    return verify_license(_read_text(path, "license"), public_key, os.fspath(path))


def read_revocation_file(path: str | os.PathLike[str], public_key: Ed25519PublicKey) -> Revocation:
    """Read and verify one revocation file (written by ``lmissue revoke`` or ``lmissue reissue``).

    Raises:
        LicenseFileError: as ``read_license_file``; a revocation that fails verification must be refused.
    """
    return verify_revocation(_read_text(path, "revocation"), public_key, os.fspath(path))


def read_public_key_file(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read the vendor's public key (``vendor.pub``).

    Raises:
        VendorKeyError: unreadable, too large, or not an Ed25519 public key in PEM; the message names ``path``.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            pem = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise VendorKeyError(
            source,
            f"cannot read the vendor public key: {exc.strerror or exc}",
            "pass the vendor.pub your software vendor gave you (--vendor-key)",
        ) from None
    if len(pem) > _MAX_KEY_FILE_BYTES:
        raise VendorKeyError(source, "the file is far too large to be a vendor public key")
    return load_public_key(pem, source)


def this_host() -> HostIdentity:
    """This machine's hostname and all its interface addresses, loopback included, as the OS reports them.

    IPv6 zone suffixes are dropped (``fe80::1%eth0`` -> ``fe80::1``); the order is the OS's, without duplicates.
    """
    addresses: list[str] = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            addr = entry.address.split("%", 1)[0]
            if addr not in addresses:
                addresses.append(addr)
    return HostIdentity(hostname=socket.gethostname(), addresses=tuple(addresses))


def license_problems_for_daemon(lic: License, host: HostIdentity) -> list[str]:
    """Why lmgrd must not serve ``lic`` on ``host``; ``[]`` if it may.

    A single-user (node-locked) license is never served by the daemon; a multi-user license only on the
    host it is registered to (short hostname, case-insensitive, and one of this host's addresses).
    """
    if lic.license_type == "single":
        return [
            f"customer ID {lic.customer_id} is a single-user (node-locked) license; it belongs on its PC "
            f"({lic.hostname}) and is not served by lmgrd"
        ]
    return host_mismatch(lic, host.hostname, host.addresses)


def read_revocation_list(path: str | os.PathLike[str], public_key: Ed25519PublicKey
                         ) -> tuple[list[Revocation], list[LicenseFileError]]:
    """Read a revocation file holding one or several revocations and verify each on its own.

    Returns:
        The verified revocations, and one error per entry refused (naming the file and the entry); an
        unreadable file is one error.
    """
    try:
        text = _read_text(path, "revocation")
    except LicenseFileError as exc:
        return [], [exc]
    return verify_revocation_list(text, public_key, os.fspath(path))


def revocation_files(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` itself, or for a directory every file in it (sorted by name; not hidden files, not
    subdirectories), so a vendor's revocation file can be dropped in and picked up by ``lmreread``.

    Raises:
        OSError: the directory cannot be listed.
    """
    p = Path(path)
    if not p.is_dir():
        return [p]
    # Hidden names are skipped: write_atomic's temporary files (.NAME.XXXX.tmp), editor swap files.
    return sorted(f for f in p.iterdir() if not f.name.startswith(".") and f.is_file())


def load_revocations(paths: Iterable[str | os.PathLike[str]], key: Ed25519PublicKey
                     ) -> tuple[dict[str, Revocation], list[str]]:
    """Read and verify every revocation (the config's ``revocations:`` and ``--revocations``: files, each
    holding one or more revocations, and directories, whose every file is read).

    Returns:
        The verified revocations by customer ID, and one problem per entry refused (unreadable, damaged,
        unsigned or signed by another key), each naming the file and entry and saying it revokes nothing;
        the valid entries of the same file still revoke.
    """
    revoked: dict[str, Revocation] = {}
    problems: list[str] = []
    for given in paths:
        try:
            files = revocation_files(given)
        except OSError as exc:
            problems.append(f"REVOCATION REFUSED: {os.fspath(given)}: cannot list the revocations directory: "
                            f"{exc.strerror or exc}; nothing in it revokes anything")
            continue
        for path in files:
            revs, refused = read_revocation_list(path, key)
            for err in refused:
                problems.append(f"REVOCATION REFUSED: {err.message}; it revokes nothing until the vendor's signed "
                                "file is given")
            for rev in revs:
                logger.info("revocation %s loaded: %s", os.fspath(path), revocation_reason(rev))
                revoked.setdefault(rev.customer_id, rev)
    return revoked, problems


def state_dir(cfg: DaemonConfig) -> Path:
    """The daemon's state directory: the config's ``state_dir``, else the platform's per-user state dir."""
    if cfg.state_dir is not None:
        return cfg.state_dir
    import platformdirs

    return Path(platformdirs.user_state_dir("lmgrd"))


def load_licensing(cfg: DaemonConfig, *, create_key: bool = True) -> tuple[Licensing, list[str]]:
    """Load every license; return what serves and the list of problems (each naming its file).

    ``create_key`` False (``lmgrd --check``): the installation key of cloud licenses is not made if missing."""
    problems: list[str] = []
    assert cfg.vendor_key is not None
    try:
        key = read_public_key_file(cfg.vendor_key)
    except ProtocolError as exc:
        refusals = [Refusal(str(p), ErrorCode.LICENSE_INVALID, (exc.message,)) for p in cfg.licenses]
        return Licensing([], refusals), [exc.message]
    host = this_host()
    served = []
    refused: list[Refusal] = []
    seen: dict[str, Path] = {}
    revoked, rev_problems = load_revocations(cfg.extra.get("revocations", []), key)
    problems.extend(rev_problems)
    activations = open_activations(state_dir(cfg), this_fingerprint())
    problems.extend(activations.problems)
    for path in cfg.licenses:
        try:
            lic = read_license_file(path, key)
        except ProtocolError as exc:
            problems.append(exc.message)
            refused.append(Refusal(str(path), exc.code, (exc.message,)))
            continue
        names = tuple(p.name for p in lic.products)
        rev = revoked.get(lic.customer_id)
        if rev is not None:  # revocation comes before the host check (the handbook's order)
            why = revocation_reason(rev) + "; remove this license file from the configuration"
            problems.append(f"{path}: {why}")
            refused.append(Refusal(str(path), ErrorCode.LICENSE_REVOKED, (why,), lic.customer_id, names))
            continue
        issues = license_problems_for_daemon(lic, host)
        if lic.customer_id in seen:
            issues.append(f"customer ID {lic.customer_id} is already loaded from {seen[lic.customer_id]}")
        if issues:
            code = ErrorCode.LICENSE_INVALID if lic.license_type != "multi" else ErrorCode.HOST_NOT_LICENSED
            for i in issues:
                problems.append(f"{path}: {i}")
            refused.append(Refusal(str(path), code, tuple(issues), lic.customer_id, names))
            continue
        seen[lic.customer_id] = path
        served.append((path, lic))
    try:
        activations.cloud = open_cloud(state_dir(cfg), (lic for _p, lic in served), key, activations.fingerprint,
                                       create_key=create_key)
    except LmgrdError as exc:
        problems.append(f"{exc}; the licenses activated by the vendor's activation service serve nothing")
    if activations.cloud is not None:
        problems.extend(activations.cloud.problems)
    policy = cfg.policy  # parsed (and its problems refused) with the config
    problems.extend(cfg.options_problems)  # bad options-file lines: ignored, reported, never fatal
    for _path, lic in served:
        for prod in lic.products:
            pp = policy.get(prod.name)
            if pp is not None and pp.reserved_total > prod.count:
                problems.append(f"policy.{prod.name}.reserve: reserves {pp.reserved_total} seat(s) but license "
                                f"{lic.customer_id} has {prod.count}; the reservations fill the count in rule order "
                                "and nobody else gets a seat")
    return Licensing(served, refused, activations=activations, revoked=revoked,
                     daemon_site=parse_networks(cfg.extra.get("site_networks") or []), policy=policy), problems
