"""The license server's state for the vendor's activation service, in ``STATE_DIR/cloud/``.

* ``installation.key``: this installation's Ed25519 key pair (PEM, PKCS#8, mode 0600), generated once at
  the first start that serves a license with a ``cloud_url`` and kept from then on. Its public half goes in
  every activation request; check-ins are signed with it. A copied state directory copies it too: that is
  what the rotating check-in token catches (the service refuses the instance presenting a stale token).
* ``CUSTOMER_ID.json``: per cloud license, ``{"format": 1, "certificate": TEXT, "revocation": TEXT,
  "last_reached_at": EPOCH, "last_attempt_at": EPOCH, "last_error": TEXT, "refusal": {...}}``. The
  certificate and the revocation are kept as the vendor signed them and verified again on every read
  (:mod:`lmgrd.core.cloud`), so editing this file can only lose an activation, never forge one.

Every write is atomic (:func:`lmgrd.storage.atomic.write_atomic`, fsynced): the certificate carrying a new
check-in token is durable before the daemon uses it, so a crash can never leave the daemon presenting a
token older than the one the service last issued. Never imports ``client_stub``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lmgrd import LmgrdError
from lmgrd.core.cloud import CloudActivations, CloudLicense, read_cloud_license
from lmgrd.storage.atomic import write_atomic
from protocol.cloud import installation_key_text
from protocol.fingerprint import Fingerprint
from protocol.license import License

__all__ = ["CLOUD_DIR", "INSTALLATION_KEY", "installation_key", "open_cloud", "read_cloud_state",
           "write_cloud_state"]

CLOUD_DIR = "cloud"
INSTALLATION_KEY = "installation.key"
_MAX_STATE_BYTES = 1024 * 1024


def _dir(state_dir: Path) -> Path:
    return state_dir / CLOUD_DIR


def installation_key(state_dir: Path) -> Ed25519PrivateKey:
    """This installation's key pair: read from the state directory, or generated and written there once.

    Raises:
        LmgrdError: the key file exists but is not an Ed25519 private key, or it cannot be read or written
            (the message names the file and what to do).
    """
    path = _dir(state_dir) / INSTALLATION_KEY
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        pem = b""
    except OSError as exc:
        raise LmgrdError(f"{path}: cannot read the installation key: {exc.strerror or exc}; check the state "
                         "directory's permissions") from None
    if pem:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise LmgrdError(f"{path}: not an installation key ({exc}); it is damaged. Deleting it makes a new "
                             "one, and every cloud license then needs activating again") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise LmgrdError(f"{path}: the installation key is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, mode=0o600, replace=False)
    except FileExistsError:  # another process made it meanwhile: use that one
        return installation_key(state_dir)
    except OSError as exc:
        raise LmgrdError(f"{path}: cannot write the installation key: {exc.strerror or exc}; check that the "
                         "daemon's user can write its state directory") from None
    return key


def _state_path(state_dir: Path, customer_id: str) -> Path:
    # Customer IDs are validated when the license is read (CID-XXXX-...): safe as a file name.
    return _dir(state_dir) / f"{customer_id}.json"


def read_cloud_state(state_dir: Path, customer_id: str) -> tuple[dict[str, Any], list[str]]:
    """The stored state of cloud license ``customer_id`` (``{}`` if none), and what was wrong with the file
    (a damaged file reads as empty: the license is then pending until the service answers again)."""
    path = _state_path(state_dir, customer_id)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        return {}, [f"{path}: cannot read the activation service state: {exc.strerror or exc}"]
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != 1:
            raise ValueError("not a format 1 state file")
    except ValueError as exc:
        return {}, [f"{path}: the activation service state is damaged ({exc}); the license asks the service "
                    "again"]
    return doc, []


def write_cloud_state(state_dir: Path, customer_id: str, state: dict[str, Any]) -> None:
    """Write the state of cloud license ``customer_id`` durably (old file or new, never a part).

    Raises:
        OSError: it cannot be written (the caller keeps the old state in force).
    """
    path = _state_path(state_dir, customer_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**state, "format": 1}, indent=2, sort_keys=True) + "\n"
    write_atomic(path, text.encode("utf-8"), mode=0o600)



def open_cloud(state_dir: Path, licenses: Iterable[License], vendor_key: Ed25519PublicKey, fingerprint: Fingerprint,
               *, create_key: bool = True) -> CloudActivations | None:
    """The activation-service state of the licenses with a ``cloud_url`` (``None`` if none has one), read
    from ``state_dir`` and verified again; the installation key is made on first use (unless ``create_key``
    is False: ``lmgrd --check`` writes nothing). Problems are in ``.problems``.

    Raises:
        LmgrdError: the installation key cannot be read or made (the cloud licenses cannot serve).
    """
    cloud = [lic for lic in licenses if lic.cloud_url is not None]
    if not cloud:
        return None
    key_text = ""
    if create_key or (_dir(state_dir) / INSTALLATION_KEY).exists():
        key_text = installation_key_text(installation_key(state_dir).public_key())
    records: dict[str, CloudLicense] = {}
    problems: list[str] = []
    for lic in cloud:
        stored, more = read_cloud_state(state_dir, lic.customer_id)
        problems.extend(more)
        where = str(_state_path(state_dir, lic.customer_id))
        records[lic.customer_id], more = read_cloud_license(lic, stored, vendor_key, key_text, where)
        problems.extend(more)

    def persist(customer_id: str, state: dict[str, Any]) -> None:
        write_cloud_state(state_dir, customer_id, state)

    return CloudActivations(records, fingerprint=fingerprint, installation_key=key_text, vendor_key=vendor_key,
                            persist=persist, problems=problems)
