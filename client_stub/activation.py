"""Activation of single-user (node-locked) licenses on this PC, recorded in the per-user data directory.

The handbook's rule, as on the license server: a new license is activated with the admin utility
(``lmclient activate LICENSE.lic``) or by itself 24 hours after it was issued. Until then a local
checkout gets ``LICENSE_NOT_ACTIVATED``. Activation binds the license to this PC's fingerprint
(:mod:`protocol.fingerprint`); a record whose fingerprint is another machine's (the user's data was copied
to another PC) gives ``LICENSE_MOVED``.

Records live in ``platformdirs.user_data_dir("lmgrd")/activations.json`` (``XDG_DATA_HOME`` moves it on
Linux), written atomically: a mapping of customer ID to record, each record in the one format the license
server writes too (:class:`protocol.activation.ActivationRecord`). Imports ``protocol``, ``platformdirs``
and the standard library; never ``lmgrd``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client_stub.errors import LicenseError, SeatDenied
from client_stub.files import write_atomic
from client_stub.machine import this_fingerprint
from protocol import ErrorCode
from protocol.activation import AUTO_ACTIVATION_AFTER, ActivationRecord, auto_activation_at
from protocol.fingerprint import Fingerprint
from protocol.license import License

__all__ = ["AUTO_ACTIVATION_AFTER", "activate", "activation_path", "check_activation", "record_for"]

FILE_NAME = "activations.json"


def activation_path() -> Path:
    """Where this user's single-user activations are recorded."""
    import platformdirs

    return Path(platformdirs.user_data_dir("lmgrd", appauthor=False)) / FILE_NAME


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:  # json.loads recurses on nesting
        raise LicenseError(ErrorCode.CLIENT_CONFIG_INVALID,
                           f"the activation record file {path} cannot be read: {exc}",
                           f"repair or delete {path}, then run 'lmclient activate LICENSE.lic' again") from None
    if not isinstance(data, dict):
        raise LicenseError(ErrorCode.CLIENT_CONFIG_INVALID, f"{path} is not an activation record file",
                           f"delete {path}, then run 'lmclient activate LICENSE.lic' again")
    return data


def record_for(customer_id: str, path: Path | None = None) -> dict[str, Any] | None:
    """The stored record of ``customer_id`` as written (a mapping), or ``None``."""
    rec = _load(path or activation_path()).get(customer_id)
    return rec if isinstance(rec, dict) else None


def _recorded(customer_id: str, rec: dict[str, Any]) -> ActivationRecord | None:
    """The record read with the one format both ends share; ``None`` if it is damaged (it then matches no PC)."""
    try:
        return ActivationRecord.from_json(customer_id, rec)
    except ValueError:
        return None


def _fmt(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def check_activation(lic: License, source: str, now: datetime, path: Path | None = None,
                     fingerprint: Fingerprint | None = None) -> None:
    """Raise unless ``lic`` is active on this PC: activated here, or issued 24 hours ago or more.

    Raises:
        SeatDenied: LICENSE_MOVED (activated on another machine) or LICENSE_NOT_ACTIVATED.
    """
    path = path or activation_path()
    rec = record_for(lic.customer_id, path)
    if rec is not None:
        recorded = _recorded(lic.customer_id, rec)
        here = fingerprint or this_fingerprint()
        if recorded is not None and recorded.fingerprint.matches(here):
            return
        raise SeatDenied(
            ErrorCode.LICENSE_MOVED,
            f"{source} (customer ID {lic.customer_id}) was activated on another machine "
            f"({rec.get('hostname', '?')}), and {path} was copied here: it does not run on this PC",
            "a single-user license runs on the PC it was activated on; to move it, ask the vendor for a "
            "reissued license for this PC",
        )
    auto = auto_activation_at(lic)
    if now >= auto:
        return
    raise SeatDenied(
        ErrorCode.LICENSE_NOT_ACTIVATED,
        f"{source} (customer ID {lic.customer_id}) is not activated on this PC yet; it activates by itself "
        f"at {_fmt(auto)} (24 hours after it was issued)",
        f"run 'lmclient activate {source}' to activate it now",
    )


def activate(lic: License, now: datetime, path: Path | None = None,
             fingerprint: Fingerprint | None = None, hostname: str = "") -> ActivationRecord:
    """Record ``lic`` as activated on this PC now (idempotent on the same PC); returns the record.

    Raises:
        SeatDenied: LICENSE_MOVED if it is already activated on another machine.
        LicenseError: CLIENT_CONFIG_INVALID if the record file cannot be read or written.
    """
    path = path or activation_path()
    here = fingerprint or this_fingerprint()
    data = _load(path)
    old = data.get(lic.customer_id)
    if isinstance(old, dict):
        recorded = _recorded(lic.customer_id, old)
        if recorded is not None and recorded.fingerprint.matches(here):
            return recorded
        check_activation(lic, str(lic.customer_id), now, path, here)  # raises LICENSE_MOVED
    rec = ActivationRecord(lic.customer_id, here, hostname, now.astimezone(UTC), "lmclient activate")
    data[lic.customer_id] = rec.to_json()
    try:
        write_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))
    except OSError as exc:
        raise LicenseError(ErrorCode.CLIENT_CONFIG_INVALID,
                           f"cannot record the activation in {path}: {exc.strerror or exc}",
                           "check that this user can write its data directory (XDG_DATA_HOME)") from None
    return rec
