"""The activation records of this license server: ``STATE_DIR/activations.json``, read at load and written
atomically at each activation (``{"format": 1, "activations": {CUSTOMER_ID: record}}``; each record in the
one format of :mod:`protocol.activation`). The decisions are :class:`lmgrd.core.activation.Activations`'.
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmgrd.core.activation import Activations
from lmgrd.core.documents import load_json
from lmgrd.storage.atomic import write_atomic
from protocol.activation import ActivationRecord
from protocol.fingerprint import Fingerprint
from protocol.license import License

__all__ = ["ACTIVATIONS_FILE", "open_activations", "record_activation"]

ACTIVATIONS_FILE = "activations.json"
_MAX_STATE_BYTES = 16 * 1024 * 1024


def _read(path: Path) -> tuple[dict[str, ActivationRecord], dict[str, Any], list[str]]:
    records: dict[str, ActivationRecord] = {}
    raw: dict[str, Any] = {}
    problems: list[str] = []
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return records, raw, problems
    except OSError as exc:
        problems.append(f"{path}: cannot read the activation records: {exc.strerror or exc}")
        return records, raw, problems
    try:
        doc = load_json(data)
        entries = doc["activations"]
        if not isinstance(entries, dict):
            raise TypeError("'activations' is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"{path}: the activation records are damaged ({exc}); licenses are pending again until "
                        "activated (lmutil activate CUSTOMER_ID)")
        return records, raw, problems
    for cid, entry in entries.items():
        try:
            records[str(cid)] = ActivationRecord.from_json(str(cid), entry)
            raw[str(cid)] = entry
        except (ValueError, TypeError) as exc:
            problems.append(f"{path}: {exc}; that license is pending again until activated")
    return records, raw, problems


def open_activations(state_dir: Path, fingerprint: Fingerprint, hostname: str | None = None) -> Activations:
    """This server's activation state, from ``state_dir``; ``fingerprint`` is this machine's
    (:func:`lmgrd.storage.host.this_fingerprint`). Problems with the file are in ``.problems``."""
    path = state_dir / ACTIVATIONS_FILE

    def persist(entries: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": 1, "activations": entries}, indent=2, sort_keys=True) + "\n"
        write_atomic(path, text.encode("utf-8"))

    records, raw, problems = _read(path)
    return Activations(records, raw, fingerprint=fingerprint, hostname=hostname or socket.gethostname(),
                       persist=persist, where=str(path), problems=problems)


def record_activation(state_dir: Path, lic: License, how: str, fingerprint: Fingerprint,
                      now: datetime | None = None) -> ActivationRecord:
    """Activate ``lic`` on this machine (``fingerprint``) before the daemon starts (``make demo``)."""
    return open_activations(state_dir, fingerprint).activate(lic, now or datetime.now(UTC), how)
